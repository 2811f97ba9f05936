//! Environments with Gymnasium's semantics over a spec: [`Env::reset`] gives the first state η(g)
//! rendered with the split's task context; [`Env::step`] takes the policy's raw generation, cuts
//! the action out of it, assembles and runs the program in the sandbox [`Pool`], and scores the
//! predictions with ROC AUC here, outside the sandbox. An action that ran ends the episode
//! (`terminated`, reward = its AUC); one that failed gets the spec's failure reward and leads to the
//! reflection state η(g, a, e); the episode is `truncated` when it reaches the spec's `max_steps`.
//!
//! Text games (`kind: wasm`, see [`crate::wasm`]) use the same environment: [`Env::reset`] starts
//! a fresh instance of the game with the environment's seed and renders its first observation
//! with the spec's prompt template; [`Env::step`] cuts the action out of the generation, assembles
//! it, plays it, and renders the game's answer with the reflection template. The game's reward,
//! `terminated` and `truncated` are the step's; the episode is also truncated at `max_steps`. A
//! step on which the game fails (trap, fuel, memory cap, malformed output) ends the episode
//! (`truncated`, `reward.failure_reward`, the error in [`StepInfo::error`]): the run goes on and
//! the next episode gets a fresh instance.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use envspec::data::{Dataset, Split, SplitMix64};
use envspec::{Evaluation, History, Prompt, RenderError, Spec, TaskContext, Turn};

use crate::metrics::{roc_auc, Multiclass};
use crate::wasm::{Game, GameEngine, GameError, GameInstance, GameLimits};
use crate::{Job, Limits, Pool, PoolConfig, RuntimeError};

/// What environments run on, shared by every spec of a process: the sandbox worker pool and the
/// WebAssembly engine of the games, each started on first use (a run whose specs never execute
/// Python starts no worker; one without games compiles nothing).
pub struct Host {
    pool_config: PoolConfig,
    pool: Mutex<Option<Arc<Pool>>>,
    engine: Mutex<Option<GameEngine>>,
}

impl Host {
    /// A host whose sandbox pool will be started with `pool_config`.
    pub fn new(pool_config: PoolConfig) -> Host {
        Host { pool_config, pool: Mutex::new(None), engine: Mutex::new(None) }
    }

    /// A host over a pool that is already running.
    pub fn with_pool(pool: Arc<Pool>) -> Host {
        // The configuration is never used: the pool exists.
        Host { pool_config: PoolConfig::default(), pool: Mutex::new(Some(pool)), engine: Mutex::new(None) }
    }

    /// The engine text games run on, started now if this is its first use.
    pub fn game_engine(&self) -> Result<GameEngine, GameError> {
        let mut slot = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(engine) = slot.as_ref() {
            return Ok(engine.clone());
        }
        let engine = GameEngine::new()?;
        *slot = Some(engine.clone());
        Ok(engine)
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

/// Counts the tokens of a state as the policy's model will see it (its tokenizer, and for chat
/// prompts its chat template), for the spec's `prompt.max_tokens`. Without one, a state is
/// measured in bytes ([`Prompt::byte_len`]), which bounds the tokens of byte-level BPE models
/// from above.
pub type TokenCounter = Arc<dyn Fn(&Prompt) -> Result<usize, String> + Send + Sync>;

/// A spec made ready to run: its data set loaded once (or its game compiled once) and shared by
/// the environments of every seed. [`Task::env`] makes one environment per seed.
pub struct Task {
    spec: Arc<Spec>,
    resources: TaskResources,
    token_counter: Option<TokenCounter>,
}

enum TaskResources {
    Data { dataset: Arc<Dataset>, pool: Arc<Pool> },
    Game(Game),
}

impl Task {
    /// Loads what `spec` needs (its data set, resolved against the spec's folder, or its game,
    /// compiled and checked) and takes the host's resources it runs on.
    pub fn load(spec: Arc<Spec>, host: &Host) -> Result<Task, EnvError> {
        if let Some(g) = spec.kind.game() {
            let engine = host.game_engine().map_err(|source| EnvError::Game { spec: spec.name.clone(), source })?;
            let limits = GameLimits {
                fuel: g.fuel,
                memory_bytes: g.memory_mb.saturating_mul(1 << 20),
                max_observation_bytes: usize::try_from(g.observation_kb.saturating_mul(1 << 10)).unwrap_or(usize::MAX),
            };
            let game =
                engine.load(&g.module, limits).map_err(|source| EnvError::Game { spec: spec.name.clone(), source })?;
            return Ok(Task { spec, resources: TaskResources::Game(game), token_counter: None });
        }
        let dataset = envspec::data::load_for(&spec.dataset, spec.base_dir()).map_err(|e| EnvError::Spec {
            spec: spec.name.clone(),
            message: format!("{}: cannot load the data set: {e}", spec.path.display()),
        })?;
        let pool = host.pool().map_err(|source| EnvError::Runtime { spec: spec.name.clone(), source })?;
        Ok(Task { spec, resources: TaskResources::Data { dataset: Arc::new(dataset), pool }, token_counter: None })
    }

    /// How the environments made from now on measure a state against `prompt.max_tokens`.
    pub fn set_token_counter(&mut self, counter: TokenCounter) {
        self.token_counter = Some(counter);
    }

    /// The spec this task runs.
    pub fn spec(&self) -> &Arc<Spec> {
        &self.spec
    }

    /// The compiled game of a `kind: wasm` task.
    pub fn game(&self) -> Option<&Game> {
        match &self.resources {
            TaskResources::Game(game) => Some(game),
            TaskResources::Data { .. } => None,
        }
    }

    /// The environment for one seed (for data tasks, the seed picks the train/validation split;
    /// for games, it is the reset seed).
    pub fn env(&self, seed: u64) -> Result<Env, EnvError> {
        let mut env = match &self.resources {
            TaskResources::Data { dataset, pool } => Env::new(self.spec.clone(), dataset.clone(), seed, pool.clone())?,
            TaskResources::Game(game) => Env::game(self.spec.clone(), game.clone(), seed),
        };
        env.token_counter = self.token_counter.clone();
        Ok(env)
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
    /// Whether the program ran and its predictions were scored (games: the game played the
    /// action without failing).
    pub ran: bool,
    /// Seconds of wall clock and CPU of the evaluation (summed over the evaluation splits for CPU,
    /// the longest for wall clock), and the largest peak memory of the program (games: of the
    /// step, and the game's memory).
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
    #[error(
        "restore(): an episode state needs at least one step taken and fewer than max_steps ({max_steps}), got {steps}"
    )]
    BadRestore { steps: u32, max_steps: u32 },
    #[error("{spec}: {message}")]
    Spec { spec: String, message: String },
    #[error("{spec}: evaluation failed: {source}")]
    Runtime {
        spec: String,
        #[source]
        source: RuntimeError,
    },
    /// A game could not be loaded, or failed where no reward can stand for it (`reset`).
    #[error("{spec}: {source}")]
    Game {
        spec: String,
        #[source]
        source: GameError,
    },
    /// The operation needs the other kind of environment.
    #[error("{spec}: {message}")]
    WrongKind { spec: String, message: String },
}

/// One environment: a spec, its data set and one split seed, or its game and one reset seed.
pub struct Env {
    spec: Arc<Spec>,
    backend: Backend,
    /// Steps taken in the current episode; `None` before the first reset.
    step: Option<u32>,
    done: bool,
    /// The current episode's steps, shown to templates as `history`.
    history: Vec<Turn>,
    token_counter: Option<TokenCounter>,
}

// One per environment, never in bulk: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Data(DataEnv),
    Game(GameEnv),
}

/// A data task: programs scored on splits in the sandbox pool.
struct DataEnv {
    pool: Arc<Pool>,
    /// The splits an action is scored on; the first is the one the prompt describes.
    splits: Vec<Split>,
    context: TaskContext,
    multiclass: Multiclass,
    limits: Limits,
}

/// A text game: one instance per episode.
struct GameEnv {
    game: Game,
    seed: u64,
    /// The running episode's instance; `None` before reset and after the game failed.
    instance: Option<GameInstance>,
    /// The game's latest observation, and its first of the episode.
    observation: String,
    first_observation: String,
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
        let splits = split_seeds(seed, n_splits).into_iter().map(|s| dataset.split_for(ds, s)).collect::<Vec<_>>();
        let context = spec.task_context(&splits[0]);
        let multiclass = match spec.reward.multiclass {
            envspec::Multiclass::Ovo => Multiclass::Ovo,
            envspec::Multiclass::Ovr => Multiclass::Ovr,
        };
        let limits = Limits::from(&spec.limits);
        let data = DataEnv { pool, splits, context, multiclass, limits };
        Ok(Env {
            spec,
            backend: Backend::Data(data),
            step: None,
            done: false,
            history: Vec::new(),
            token_counter: None,
        })
    }

    /// An environment for a text game (`kind: wasm`) and one reset seed.
    fn game(spec: Arc<Spec>, game: Game, seed: u64) -> Env {
        let game = GameEnv { game, seed, instance: None, observation: String::new(), first_observation: String::new() };
        Env { spec, backend: Backend::Game(game), step: None, done: false, history: Vec::new(), token_counter: None }
    }

    /// The spec this environment runs.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// How this environment measures a state against `prompt.max_tokens` (see [`TokenCounter`]).
    pub fn set_token_counter(&mut self, counter: TokenCounter) {
        self.token_counter = Some(counter);
    }

    /// The steps of the current episode so far, oldest first.
    pub fn history(&self) -> &[Turn] {
        &self.history
    }

    /// A state rendered with as much of the episode's history as `prompt.max_tokens` allows:
    /// the oldest turns are left out first. `after` (steps taken) names the state in the error
    /// when it does not fit even without history.
    fn fit(&self, after: u32, render: impl Fn(History<'_>) -> Result<Prompt, RenderError>) -> Result<Prompt, EnvError> {
        let Some(budget) = self.spec.prompt_max_tokens else {
            return render(History::all(&self.history)).map_err(|e| spec_err(&self.spec, e));
        };
        let mut length = 0;
        for omitted in 0..=self.history.len() {
            let prompt =
                render(History::without_oldest(&self.history, omitted)).map_err(|e| spec_err(&self.spec, e))?;
            length = match &self.token_counter {
                Some(count) => count(&prompt).map_err(|message| EnvError::Spec {
                    spec: self.spec.name.clone(),
                    message: format!("counting the tokens of a state: {message}"),
                })?,
                None => prompt.byte_len(),
            };
            if length <= budget {
                return Ok(prompt);
            }
        }
        let unit = if self.token_counter.is_some() { "tokens" } else { "bytes (no tokenizer given)" };
        let without = if self.history.is_empty() { "" } else { " even without its history" };
        Err(EnvError::Spec {
            spec: self.spec.name.clone(),
            message: format!(
                "{}: the state after step {after} is {length} {unit}{without}, over prompt.max_tokens = {budget}; raise it or shorten the templates",
                self.spec.path.display()
            ),
        })
    }

    /// Starts an episode: the first state η(g). Every episode of an environment starts from the
    /// same state (the split is fixed by the seed; a game is reset with the seed on a fresh
    /// instance).
    pub fn reset(&mut self) -> Result<Observation, EnvError> {
        self.history.clear();
        if let Backend::Game(g) = &mut self.backend {
            g.instance = None;
            let mut instance =
                g.game.instantiate().map_err(|source| EnvError::Game { spec: self.spec.name.clone(), source })?;
            g.observation =
                instance.reset(g.seed).map_err(|source| EnvError::Game { spec: self.spec.name.clone(), source })?;
            g.instance = Some(instance);
            g.first_observation = g.observation.clone();
        }
        let prompt = match &self.backend {
            Backend::Data(d) => self.fit(0, |_| self.spec.render_initial(&d.context))?,
            Backend::Game(g) => {
                let ctx = self.spec.game_context(&g.observation, 0);
                self.fit(0, |h| self.spec.render_game(&ctx, None, h))?
            }
        };
        self.step = Some(0);
        self.done = false;
        Ok(Observation { prompt, step: 0 })
    }

    /// Puts the environment back into an episode whose steps were `turns` (oldest first, as
    /// logged; the last one failed), for resuming a run from its log without running the
    /// recorded actions again. Returns that reflection state, with the same history as when
    /// the episode ran. Data tasks only: a game's state is rebuilt by [`Env::replay`].
    pub fn restore(&mut self, turns: &[Turn]) -> Result<Observation, EnvError> {
        let steps = u32::try_from(turns.len()).unwrap_or(u32::MAX);
        let Some(last) = turns.last().filter(|_| steps < self.spec.max_steps) else {
            return Err(EnvError::BadRestore { steps, max_steps: self.spec.max_steps });
        };
        let Backend::Data(d) = &self.backend else {
            return Err(EnvError::WrongKind {
                spec: self.spec.name.clone(),
                message: "a game's state cannot be restored from the last action alone; replay the episode's actions (Env::replay)".into(),
            });
        };
        self.history = turns.to_vec();
        let prompt = self.fit(steps, |h| self.spec.render_reflection(&d.context, &last.action, &last.error, h))?;
        self.step = Some(steps);
        self.done = false;
        Ok(Observation { prompt, step: steps })
    }

    /// Puts a game back into an episode that took `actions` (the extracted actions, in order, as
    /// logged), by playing them again on a fresh instance: an episode of a game is a pure
    /// function of its seed and actions (a game has no clock and no randomness but the seed).
    /// Fails if the game fails or ends before the last action, which means the game changed
    /// since the actions were recorded. Returns the state after the last action.
    pub fn replay(&mut self, actions: &[&str]) -> Result<Observation, EnvError> {
        let steps = u32::try_from(actions.len()).unwrap_or(u32::MAX);
        if steps == 0 || steps >= self.spec.max_steps {
            return Err(EnvError::BadRestore { steps, max_steps: self.spec.max_steps });
        }
        if !matches!(self.backend, Backend::Game(_)) {
            return Err(EnvError::WrongKind {
                spec: self.spec.name.clone(),
                message: "replay applies to games; a data task's state is restored by Env::restore without running anything again".into(),
            });
        }
        let mut observation = self.reset()?;
        for (i, action) in actions.iter().enumerate() {
            let r = self.step(action)?;
            if r.terminated || r.truncated {
                let end =
                    if r.info.error.is_empty() { "ended".to_string() } else { format!("failed ({})", r.info.error) };
                return Err(EnvError::Spec {
                    spec: self.spec.name.clone(),
                    message: format!("replaying the recorded actions: the game {end} at action {} of {}; was the game changed since they were recorded?", i + 1, actions.len()),
                });
            }
            observation = r.observation;
        }
        Ok(observation)
    }

    /// Takes one step with the policy's raw `generation`.
    pub fn step(&mut self, generation: &str) -> Result<StepResult, EnvError> {
        let taken = self.step.ok_or(EnvError::NotReset)?;
        if self.done {
            return Err(EnvError::EpisodeOver);
        }
        if matches!(self.backend, Backend::Game(_)) {
            return self.game_step(taken, generation);
        }
        let action = self.spec.extract_action(generation);
        let program = self.spec.assemble_program(&action).map_err(|e| spec_err(&self.spec, e))?;
        let scored = self.score_program(&program)?;
        let step = taken + 1;
        let (terminated, truncated) = episode_end(scored.result.is_ok(), step, self.spec.max_steps);
        let (reward, error) = match scored.result {
            Ok(auc) => (auc, String::new()),
            Err(message) => (self.spec.reward.failure_reward, message),
        };
        let turn =
            Turn { step: taken, action: action.clone(), reward, error: error.clone(), observation: String::new() };
        self.history.push(turn);
        let Backend::Data(d) = &self.backend else { unreachable!("games returned above") };
        let observation = if terminated {
            // Gymnasium still returns a final observation after the end; there is no next state
            // in the paper's MDP, so this is the start state (never bootstrapped from).
            let prompt = self.spec.render_initial(&d.context).map_err(|e| spec_err(&self.spec, e))?;
            Observation { prompt, step }
        } else {
            let prompt = self.fit(step, |h| self.spec.render_reflection(&d.context, &action, &error, h))?;
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

    /// One step of a game: play the assembled action on the episode's instance.
    fn game_step(&mut self, taken: u32, generation: &str) -> Result<StepResult, EnvError> {
        let action = self.spec.extract_action(generation);
        let text = self.spec.assemble_program(&action).map_err(|e| spec_err(&self.spec, e))?;
        let Backend::Game(g) = &mut self.backend else { unreachable!("called for games only") };
        let step = taken + 1;
        let started = Instant::now();
        let cpu_started = thread_cpu_s();
        let played = match g.instance.as_mut() {
            Some(instance) => instance.step(&text),
            // The instance is gone only after a failure, which ended the episode.
            None => return Err(EnvError::EpisodeOver),
        };
        let (wall_s, cpu_s) = (started.elapsed().as_secs_f64(), (thread_cpu_s() - cpu_started).max(0.0));
        let peak_rss_mb = g.instance.as_ref().map_or(0.0, |i| i.peak_memory_bytes() as f64 / f64::from(1 << 20));
        let (reward, terminated, truncated, error, ran) = match played {
            Ok(r) => {
                g.observation = r.observation;
                let truncated = !r.terminated && (r.truncated || step >= self.spec.max_steps);
                (r.reward, r.terminated, truncated, String::new(), true)
            }
            Err(e) => {
                // The instance may be in any state: drop it; the next episode gets a new one.
                g.instance = None;
                (self.spec.reward.failure_reward, false, true, e.to_string(), false)
            }
        };
        let ctx = self.spec.game_context(&g.observation, step);
        let observation = g.observation.clone();
        self.history.push(Turn { step: taken, action: action.clone(), reward, error: error.clone(), observation });
        let Backend::Game(g) = &self.backend else { unreachable!("called for games only") };
        let first = g.first_observation.as_str();
        let prompt =
            self.fit(step, |h| self.spec.render_game(&ctx, Some((&action, reward)), h.starting_with(first)))?;
        self.step = Some(step);
        self.done = terminated || truncated;
        Ok(StepResult {
            observation: Observation { prompt, step },
            reward,
            terminated,
            truncated,
            info: StepInfo { action, error, ran, wall_s, cpu_s, peak_rss_mb },
        })
    }

    /// The number of splits an action is scored on (1, or n with `mean_of_splits: n`; 0 for a
    /// game).
    pub fn n_splits(&self) -> usize {
        match &self.backend {
            Backend::Data(d) => d.splits.len(),
            Backend::Game(_) => 0,
        }
    }

    /// Scores an assembled program as a step would, without changing the episode: runs it on
    /// every evaluation split (in parallel; the pool bounds the concurrency) and averages the
    /// AUCs. The first failure, in split order, is the action's error. Data tasks only.
    pub fn score_program(&self, program: &str) -> Result<Score, EnvError> {
        let Backend::Data(d) = &self.backend else {
            return Err(EnvError::WrongKind {
                spec: self.spec.name.clone(),
                message: "a game has no program to score; play it with reset() and step()".into(),
            });
        };
        d.score_program(&self.spec, program, Part::Validation)
    }

    /// Scores an assembled program on the held-out test part of the spec's splits
    /// (`dataset.test_fraction`), as [`Env::score_program`] does on the validation rows: the
    /// sandbox gets the training rows and the test features, never a label of the test part.
    /// `None` when the spec holds out no test part (or is a game).
    pub fn score_on_test(&self, program: &str) -> Result<Option<Score>, EnvError> {
        match &self.backend {
            Backend::Data(d) if d.splits.iter().all(|s| !s.y_test.is_empty()) => {
                d.score_program(&self.spec, program, Part::Test).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// [`Env::score_on_test`] of an action as a step's `info.action` gives it (already cut out by
    /// the spec's extraction), assembled into the program as a step assembles it: how a seed's
    /// best action gets its honest score.
    pub fn score_action_on_test(&self, action: &str) -> Result<Option<Score>, EnvError> {
        let program = self.spec.assemble_program(action).map_err(|e| spec_err(&self.spec, e))?;
        self.score_on_test(&program)
    }
}

/// Which held-out rows a program is scored on.
#[derive(Clone, Copy)]
enum Part {
    Validation,
    Test,
}

impl DataEnv {
    fn score_program(&self, spec: &Spec, program: &str, part: Part) -> Result<Score, EnvError> {
        let outcomes: Vec<Result<crate::Outcome, RuntimeError>> = if self.splits.len() == 1 {
            vec![self.pool.evaluate(&self.job(program, &self.splits[0], part))]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self
                    .splits
                    .iter()
                    .map(|split| scope.spawn(move || self.pool.evaluate(&self.job(program, split, part))))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| Err(RuntimeError::Worker("an evaluation thread panicked".into())))
                    })
                    .collect()
            })
        };
        let mut scored = Score {
            result: Ok(0.0),
            error_kind: None,
            wall_s: 0.0,
            cpu_s: 0.0,
            peak_rss_mb: 0.0,
            output: String::new(),
        };
        let mut aucs = Vec::with_capacity(outcomes.len());
        for (outcome, split) in outcomes.into_iter().zip(&self.splits) {
            let outcome = outcome.map_err(|source| EnvError::Runtime { spec: spec.name.clone(), source })?;
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
                Ok(proba) => match roc_auc(part.labels(split), &proba, split.n_classes(), self.multiclass) {
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

    fn job(&self, program: &str, split: &Split, part: Part) -> Job {
        Job {
            program: program.to_string(),
            x_train: split.x_train.clone(),
            y_train: split.y_train.clone(),
            x_val: part.features(split).to_vec(),
            n_classes: split.n_classes(),
            limits: self.limits,
        }
    }
}

impl Part {
    fn features(self, split: &Split) -> &[Vec<f64>] {
        match self {
            Part::Validation => &split.x_val,
            Part::Test => &split.x_test,
        }
    }

    fn labels(self, split: &Split) -> &[usize] {
        match self {
            Part::Validation => &split.y_val,
            Part::Test => &split.y_test,
        }
    }
}

fn spec_err(spec: &Spec, e: impl std::fmt::Display) -> EnvError {
    EnvError::Spec { spec: spec.name.clone(), message: e.to_string() }
}

/// CPU seconds of the calling thread (a game runs on the thread that steps it).
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
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
