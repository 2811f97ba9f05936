//! Environments with Gymnasium's semantics over a spec: [`Env::reset`] gives the first state η(g)
//! rendered with the split's task context; [`Env::step`] takes the policy's raw generation, cuts
//! the action out of it, assembles and runs the program in the sandbox [`Pool`], and scores the
//! predictions with ROC AUC here, outside the sandbox. An action that ran ends the episode
//! (`terminated`, reward = its AUC); one that failed gets the spec's failure reward and leads to the
//! reflection state η(g, a, e); the episode is `truncated` when it reaches the spec's `max_steps`.

use std::sync::{Arc, Mutex};

use envspec::data::{Dataset, Split, SplitMix64};
use envspec::{Evaluation, Prompt, Spec, TaskContext};

use crate::metrics::{roc_auc, Multiclass};
use crate::{Job, Limits, Pool, PoolConfig, RuntimeError};

/// What environments run on, shared by every spec of a process: the sandbox worker pool, started
/// on first use (a run whose specs never execute Python starts no worker).
pub struct Host {
    pool_config: PoolConfig,
    pool: Mutex<Option<Arc<Pool>>>,
}

impl Host {
    /// A host whose sandbox pool will be started with `pool_config`.
    pub fn new(pool_config: PoolConfig) -> Host {
        Host { pool_config, pool: Mutex::new(None) }
    }

    /// A host over a pool that is already running.
    pub fn with_pool(pool: Arc<Pool>) -> Host {
        // The configuration is never used: the pool exists.
        Host { pool_config: PoolConfig::default(), pool: Mutex::new(Some(pool)) }
    }

    /// The sandbox pool, started now if this is its first use.
    pub fn pool(&self) -> Result<Arc<Pool>, RuntimeError> {
        let mut slot = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = slot.as_ref() {
            return Ok(pool.clone());
        }
        let pool = Arc::new(Pool::new(self.pool_config.clone())?);
        *slot = Some(pool.clone());
        Ok(pool)
    }
}

/// A spec made ready to run: its data set loaded once and shared by the environments of every
/// seed. [`Task::env`] makes one environment per seed.
pub struct Task {
    spec: Arc<Spec>,
    dataset: Arc<Dataset>,
    pool: Arc<Pool>,
}

impl Task {
    /// Loads what `spec` needs (its data set, resolved against the spec's folder) and takes the
    /// host's resources it runs on.
    pub fn load(spec: Arc<Spec>, host: &Host) -> Result<Task, EnvError> {
        let dataset = envspec::data::load(&spec.dataset.source, spec.base_dir()).map_err(|e| EnvError::Spec {
            spec: spec.name.clone(),
            message: format!("{}: cannot load the data set: {e}", spec.path.display()),
        })?;
        let pool = host.pool().map_err(|source| EnvError::Runtime { spec: spec.name.clone(), source })?;
        Ok(Task { spec, dataset: Arc::new(dataset), pool })
    }

    /// The spec this task runs.
    pub fn spec(&self) -> &Arc<Spec> {
        &self.spec
    }

    /// The environment for one seed (for data tasks, the seed picks the train/validation split).
    pub fn env(&self, seed: u64) -> Result<Env, EnvError> {
        Env::new(self.spec.clone(), self.dataset.clone(), seed, self.pool.clone())
    }
}

/// A state of the language MDP.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The rendered state: η(g) at the start of an episode, η(g, a, e) after a failed action.
    pub prompt: Prompt,
    /// Steps taken in this episode before this state (0 after `reset`).
    pub step: u32,
}

/// What happened in one step, beyond the reward.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepInfo {
    /// The action cut out of the generation.
    pub action: String,
    /// The error shown in the reflection state; empty when the action ran.
    pub error: String,
    /// Whether the program ran and its predictions were scored.
    pub ran: bool,
    /// Seconds of wall clock and CPU of the evaluation (summed over the evaluation splits for CPU,
    /// the longest for wall clock), and the largest peak memory of the program.
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
}

/// The result of [`Env::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// The next state; after a failure the reflection state (also when the episode was truncated,
    /// as Gymnasium returns the final observation).
    pub observation: Observation,
    pub reward: f64,
    /// The action ran: the episode is over.
    pub terminated: bool,
    /// The step limit was reached without a runnable action.
    pub truncated: bool,
    pub info: StepInfo,
}

/// Errors of the environment itself (never of the action, which only ever gives a reward).
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("step() called before reset()")]
    NotReset,
    #[error("step() called after the episode ended; call reset()")]
    EpisodeOver,
    #[error("restore(): an episode state needs at least one step taken and fewer than max_steps ({max_steps}), got {steps}")]
    BadRestore { steps: u32, max_steps: u32 },
    #[error("{spec}: {message}")]
    Spec { spec: String, message: String },
    #[error("{spec}: evaluation failed: {source}")]
    Runtime {
        spec: String,
        #[source]
        source: RuntimeError,
    },
}

/// One environment: a spec, its data set and one split seed.
pub struct Env {
    spec: Arc<Spec>,
    pool: Arc<Pool>,
    /// The splits an action is scored on; the first is the one the prompt describes.
    splits: Vec<Split>,
    context: TaskContext,
    multiclass: Multiclass,
    limits: Limits,
    /// Steps taken in the current episode; `None` before the first reset.
    step: Option<u32>,
    done: bool,
}

impl Env {
    /// An environment for `spec` on `dataset`'s split for `seed`. With
    /// `evaluation: mean_of_splits(n)`, actions are scored on `n` splits: the seed's own, then
    /// `n − 1` more whose seeds are drawn from `SplitMix64::new(seed)`.
    pub fn new(spec: Arc<Spec>, dataset: Arc<Dataset>, seed: u64, pool: Arc<Pool>) -> Result<Env, EnvError> {
        let ds = &spec.dataset;
        let n_splits = match spec.reward.evaluation {
            Evaluation::SingleSplit => 1,
            Evaluation::MeanOfSplits(n) => n.max(1) as usize,
        };
        let splits = split_seeds(seed, n_splits)
            .into_iter()
            .map(|s| dataset.split(s, ds.max_samples, ds.train_fraction))
            .collect::<Vec<_>>();
        let context = spec.task_context(&splits[0]);
        let multiclass = match spec.reward.multiclass {
            envspec::Multiclass::Ovo => Multiclass::Ovo,
            envspec::Multiclass::Ovr => Multiclass::Ovr,
        };
        let limits = Limits::from(&spec.limits);
        Ok(Env { spec, pool, splits, context, multiclass, limits, step: None, done: false })
    }

    /// The spec this environment runs.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Starts an episode: the first state η(g). Every episode of an environment starts from the
    /// same state (the split is fixed by the seed).
    pub fn reset(&mut self) -> Result<Observation, EnvError> {
        let prompt = self.spec.render_initial(&self.context).map_err(|e| self.spec_err(e))?;
        self.step = Some(0);
        self.done = false;
        Ok(Observation { prompt, step: 0 })
    }

    /// Puts the environment back into an episode that had taken `steps` steps, the last one
    /// failing with `error` on `action` (for resuming a run from its log without running the
    /// recorded actions again). Returns that reflection state.
    pub fn restore(&mut self, steps: u32, action: &str, error: &str) -> Result<Observation, EnvError> {
        if steps == 0 || steps >= self.spec.max_steps {
            return Err(EnvError::BadRestore { steps, max_steps: self.spec.max_steps });
        }
        let prompt = self.spec.render_reflection(&self.context, action, error).map_err(|e| self.spec_err(e))?;
        self.step = Some(steps);
        self.done = false;
        Ok(Observation { prompt, step: steps })
    }

    /// Takes one step with the policy's raw `generation`.
    pub fn step(&mut self, generation: &str) -> Result<StepResult, EnvError> {
        let taken = self.step.ok_or(EnvError::NotReset)?;
        if self.done {
            return Err(EnvError::EpisodeOver);
        }
        let action = self.spec.extract_action(generation);
        let program = self.spec.assemble_program(&action).map_err(|e| self.spec_err(e))?;
        let scored = self.score_program(&program)?;
        let step = taken + 1;
        let (terminated, truncated) = episode_end(scored.result.is_ok(), step, self.spec.max_steps);
        let (reward, error) = match scored.result {
            Ok(auc) => (auc, String::new()),
            Err(message) => (self.spec.reward.failure_reward, message),
        };
        let observation = if terminated {
            // Gymnasium still returns a final observation after the end; there is no next state
            // in the paper's MDP, so this is the start state (never bootstrapped from).
            let prompt = self.spec.render_initial(&self.context).map_err(|e| self.spec_err(e))?;
            Observation { prompt, step }
        } else {
            let prompt = self.spec.render_reflection(&self.context, &action, &error).map_err(|e| self.spec_err(e))?;
            Observation { prompt, step }
        };
        self.step = Some(step);
        self.done = terminated || truncated;
        Ok(StepResult {
            observation,
            reward,
            terminated,
            truncated,
            info: StepInfo {
                action,
                error,
                ran: terminated,
                wall_s: scored.wall_s,
                cpu_s: scored.cpu_s,
                peak_rss_mb: scored.peak_rss_mb,
            },
        })
    }

    /// The number of splits an action is scored on (1, or n with `mean_of_splits: n`).
    pub fn n_splits(&self) -> usize {
        self.splits.len()
    }

    /// Scores an assembled program as a step would, without changing the episode: runs it on
    /// every evaluation split (in parallel; the pool bounds the concurrency) and averages the
    /// AUCs. The first failure, in split order, is the action's error.
    pub fn score_program(&self, program: &str) -> Result<Score, EnvError> {
        let outcomes: Vec<Result<crate::Outcome, RuntimeError>> = if self.splits.len() == 1 {
            vec![self.pool.evaluate(&self.job(program, &self.splits[0]))]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .splits
                    .iter()
                    .map(|split| scope.spawn(move || self.pool.evaluate(&self.job(program, split))))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(RuntimeError::Worker("an evaluation thread panicked".into()))))
                    .collect()
            })
        };
        let mut scored =
            Score { result: Ok(0.0), error_kind: None, wall_s: 0.0, cpu_s: 0.0, peak_rss_mb: 0.0, output: String::new() };
        let mut aucs = Vec::with_capacity(outcomes.len());
        for (outcome, split) in outcomes.into_iter().zip(&self.splits) {
            let outcome = outcome.map_err(|source| EnvError::Runtime { spec: self.spec.name.clone(), source })?;
            scored.wall_s = scored.wall_s.max(outcome.wall_s);
            scored.cpu_s += outcome.cpu_s;
            scored.peak_rss_mb = scored.peak_rss_mb.max(outcome.peak_rss_mb);
            if scored.output.is_empty() {
                scored.output = outcome.output;
            }
            if scored.result.is_err() {
                continue;
            }
            match outcome.result {
                Ok(proba) => match roc_auc(&split.y_val, &proba, split.n_classes(), self.multiclass) {
                    Ok(auc) => aucs.push(auc),
                    Err(e) => scored.result = Err(format!("the predictions could not be scored: {e}")),
                },
                Err(e) => {
                    scored.error_kind = Some(e.kind);
                    scored.result = Err(e.message);
                }
            }
        }
        if scored.result.is_ok() {
            scored.result = Ok(aucs.iter().sum::<f64>() / aucs.len() as f64);
        }
        Ok(scored)
    }

    fn job(&self, program: &str, split: &Split) -> Job {
        Job {
            program: program.to_string(),
            x_train: split.x_train.clone(),
            y_train: split.y_train.clone(),
            x_val: split.x_val.clone(),
            n_classes: split.n_classes(),
            limits: self.limits,
        }
    }

    fn spec_err(&self, e: impl std::fmt::Display) -> EnvError {
        EnvError::Spec { spec: self.spec.name.clone(), message: e.to_string() }
    }
}

/// How one program scored on an environment's evaluation splits.
#[derive(Debug, Clone)]
pub struct Score {
    /// Mean ROC AUC over the splits, or the error message shown to the model.
    pub result: Result<f64, String>,
    /// The sandbox's kind of failure; `None` when the program ran (or its predictions could
    /// not be scored).
    pub error_kind: Option<crate::ActionErrorKind>,
    /// Slowest split's wall time, CPU time summed over splits, largest peak memory.
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
    /// What the program printed on the first split (capped by the sandbox).
    pub output: String,
}

/// Whether the episode ends after step number `step` (from 1): it terminates when the action ran
/// and is truncated when it did not and the step limit is reached.
fn episode_end(ran: bool, step: u32, max_steps: u32) -> (bool, bool) {
    (ran, !ran && step >= max_steps)
}

/// The split seeds an action is scored on: `seed` itself, then `n − 1` seeds drawn from
/// `SplitMix64::new(seed)`.
fn split_seeds(seed: u64, n: usize) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    std::iter::once(seed).chain((1..n).map(|_| rng.next_u64())).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_and_truncation() {
        // max_steps 3: failures at steps 1 and 2 continue, a failure at step 3 truncates.
        assert_eq!(episode_end(false, 1, 3), (false, false));
        assert_eq!(episode_end(false, 2, 3), (false, false));
        assert_eq!(episode_end(false, 3, 3), (false, true));
        // An action that runs terminates, also on the last allowed step.
        assert_eq!(episode_end(true, 1, 3), (true, false));
        assert_eq!(episode_end(true, 3, 3), (true, false));
        // The 1-step environment: every failure truncates at once.
        assert_eq!(episode_end(false, 1, 1), (false, true));
    }

    #[test]
    fn split_seeds_start_with_the_seed_and_are_distinct() {
        assert_eq!(split_seeds(7, 1), vec![7]);
        let s = split_seeds(7, 3);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], 7);
        assert_ne!(s[1], s[2]);
        assert_eq!(s, split_seeds(7, 3));
        let mut rng = SplitMix64::new(7);
        assert_eq!(s[1], rng.next_u64());
    }
}
