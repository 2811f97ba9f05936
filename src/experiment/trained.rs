//! The learning algorithms of `etpo run`: ETPO and the PPO-KL baseline, as [`Agent`]s that
//! own the language-model policy and a trainer from `trainer` (the equations live there; this
//! module turns the run loop's steps into token-level transitions, schedules updates, and keeps
//! the run folder's training files).
//!
//! Files in the run folder:
//! - `replay.jsonl`: every round's transitions as token ids, appended and flushed before they are
//!   trained on (the replay data of a checkpoint);
//! - `checkpoint.safetensors`: the trainer's state (adapters, optimisers, target network,
//!   counters) and the loop's position in `replay.jsonl`, written atomically every
//!   `checkpoint_every` updates and when the run stops (Ctrl-C included);
//! - `metrics.jsonl`: one line per update; `batch_reward.png`: the mean batch reward against
//!   environment steps (the paper's Figure 4);
//! - `adapter/`: the trained policy adapter in PEFT layout (`etpo perplexity --adapter`).
//!
//! Resuming is exact on the CPU: the checkpoint restores the trainer, then the rounds that
//! `replay.jsonl` holds beyond it are fed through the same schedule again, so the updates (and the
//! adapters the next actions are sampled with) are those of an uninterrupted run. Only a final
//! partial batch is left untrained, so that stopping early never adds an update the
//! uninterrupted run would not make.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use envspec::data::SplitMix64;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use trainer::etpo::{EtpoConfig, EtpoTrainer, TrainError, UpdateMetrics, POLICY};
use trainer::grpo::{GrpoConfig, GrpoTrainer};
use trainer::ppo::{PpoConfig, PpoTrainer};

use super::llm::LlmPolicy;
use super::plot::{draw_legend, legend_mark, steps_chart};
use super::policy::Policy;
use super::record::StepRecord;
use super::runner::{Agent, FinishedStep, SpecRun};
use super::ExperimentError;

/// The checkpoint file in the run folder.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The replay data: one line per round of transitions.
pub const REPLAY: &str = "replay.jsonl";
/// One line per update.
pub const METRICS: &str = "metrics.jsonl";
/// The batch reward figure.
pub const BATCH_REWARD_PNG: &str = "batch_reward.png";
/// The trained policy adapter (PEFT folder).
pub const ADAPTER_DIR: &str = "adapter";

/// Which trainer, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainerConfig {
    Etpo(EtpoConfig),
    PpoKl(PpoConfig),
    Grpo(GrpoConfig),
}

/// The schedule of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSchedule {
    /// Environment steps (over all specs and seeds) per update; the update uses all of them.
    pub update_every: usize,
    /// Updates between checkpoints (a checkpoint is also written when the run stops).
    pub checkpoint_every: u64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Updates done, this one included (from 1).
    pub update: u64,
    /// Environment steps taken when the update ran.
    pub env_steps: u64,
    pub q_loss: f64,
    pub policy_loss: f64,
    pub kl: f64,
    pub entropy: f64,
    pub batch_reward: f64,
    /// Wall-clock seconds of the update.
    pub time_s: f64,
    /// Everything else the trainer measured (targets, gradient norms, phase times...).
    #[serde(default)]
    pub detail: UpdateMetrics,
}

/// The loop's position, stored in the checkpoint beside the trainer state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Position {
    /// Rounds of `replay.jsonl` processed.
    rounds: u64,
    /// The first round of the pending (not yet trained on) batch.
    pending_from: u64,
    /// Environment steps processed.
    env_steps: u64,
}

/// One line of `replay.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplayRound {
    round: u64,
    /// Environment steps of the round (transitions without tokens are not trained on).
    steps: u64,
    /// Steps in `steps.jsonl` before this round's (absent in files of older versions): a round
    /// whose steps did not reach the log (the run was killed in between) is dropped on resume
    /// and run again.
    #[serde(default)]
    logged_before: Option<u64>,
    transitions: Vec<trainer::etpo::Transition>,
}

enum Learner {
    Etpo(Box<EtpoTrainer>),
    PpoKl(Box<PpoTrainer>),
    Grpo(Box<GrpoTrainer>),
}

impl Learner {
    fn update(
        &mut self,
        model: &trainer::Llama,
        batch: &[trainer::etpo::Transition],
    ) -> Result<UpdateMetrics, TrainError> {
        match self {
            Learner::Etpo(t) => t.update(model, batch),
            Learner::PpoKl(t) => t.update(model, batch),
            Learner::Grpo(t) => t.update(model, batch),
        }
    }
    /// Environments per seed stepped side by side (GRPO's groups; 1 for the others).
    fn group_size(&self) -> u32 {
        match self {
            Learner::Grpo(t) => t.config().group_size,
            Learner::Etpo(_) | Learner::PpoKl(_) => 1,
        }
    }
    fn updates(&self) -> u64 {
        match self {
            Learner::Etpo(t) => t.updates(),
            Learner::PpoKl(t) => t.updates(),
            Learner::Grpo(t) => t.updates(),
        }
    }
    fn save(&self, model: &trainer::Llama, path: &Path, extra: &serde_json::Value) -> Result<(), TrainError> {
        match self {
            Learner::Etpo(t) => t.save_checkpoint(model, path, extra),
            Learner::PpoKl(t) => t.save_checkpoint(model, path, extra),
            Learner::Grpo(t) => t.save_checkpoint(model, path, extra),
        }
    }
    fn load(&mut self, model: &trainer::Llama, path: &Path) -> Result<serde_json::Value, TrainError> {
        match self {
            Learner::Etpo(t) => t.load_checkpoint(model, path),
            Learner::PpoKl(t) => t.load_checkpoint(model, path),
            Learner::Grpo(t) => t.load_checkpoint(model, path),
        }
    }
}

/// ETPO, PPO-KL or GRPO over a language-model policy, as an [`Agent`] of the run loop. The policy
/// samples with the trained [`POLICY`] adapter set (equal to the base model before the first
/// update).
pub struct Trained {
    name: &'static str,
    policy: LlmPolicy,
    learner: Learner,
    schedule: TrainSchedule,
    pos: Position,
    pending: Vec<trainer::etpo::Transition>,
    pending_steps: u64,
    run_dir: PathBuf,
    replay: Option<File>,
    metrics: Option<File>,
    /// An update failed half-way: the state must not be checkpointed.
    failed: bool,
    /// Steps in `steps.jsonl` (those of rounds being recorded are added once logged).
    logged: u64,
    /// The round recorded by `record` and not yet learnt from.
    recorded: Option<ReplayRound>,
}

/// Test hook: `ETPO_FAILPOINT=abort-after-recording-round:N` aborts the process (as a SIGKILL
/// would) right after round N is recorded and before its steps are logged, the window the resume
/// logic must close. Unset in normal use.
const FAILPOINT_ENV: &str = "ETPO_FAILPOINT";

fn train_err(e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Algorithm(e.to_string())
}

impl Trained {
    /// Adds the trainer's adapter sets to the policy's model and samples with [`POLICY`] from now on.
    pub fn new(
        mut policy: LlmPolicy,
        config: TrainerConfig,
        schedule: TrainSchedule,
    ) -> Result<Trained, ExperimentError> {
        if schedule.update_every == 0 || schedule.checkpoint_every == 0 {
            return Err(train_err("update_every and checkpoint_every must be at least 1"));
        }
        let model = &mut policy.model_mut().model;
        let (name, learner) = match config {
            TrainerConfig::Etpo(cfg) => {
                ("etpo", Learner::Etpo(Box::new(EtpoTrainer::new(model, cfg).map_err(train_err)?)))
            }
            TrainerConfig::Grpo(cfg) => {
                ("grpo", Learner::Grpo(Box::new(GrpoTrainer::new(model, cfg).map_err(train_err)?)))
            }
            TrainerConfig::PpoKl(cfg) => {
                ("ppo-kl", Learner::PpoKl(Box::new(PpoTrainer::new(model, cfg).map_err(train_err)?)))
            }
        };
        policy.set_adapter(Some(POLICY.to_string()));
        Ok(Trained {
            name,
            policy,
            learner,
            schedule,
            pos: Position::default(),
            pending: Vec::new(),
            pending_steps: 0,
            run_dir: PathBuf::new(),
            replay: None,
            metrics: None,
            failed: false,
            logged: 0,
            recorded: None,
        })
    }

    /// Token-level transitions of one round: the state is the exact prompt text the model was
    /// given, encoded as generation encoded it; the action is the sampled token ids; the next
    /// state is left out when the episode ended (terminated or truncated: nothing to bootstrap).
    /// Steps without a prompt text or tokens (an empty generation) are not trainable.
    fn tokenize(&self, batch: &[FinishedStep]) -> Result<Vec<trainer::etpo::Transition>, ExperimentError> {
        let tok = &self.policy.model().tokenizer;
        let encode = |text: &str| tok.encode(text).map_err(|e| train_err(format!("encoding a state: {e}")));
        let mut out = Vec::with_capacity(batch.len());
        for t in batch {
            let Some(prompt) = &t.action.prompt_text else { continue };
            if t.action.tokens.is_empty() {
                continue;
            }
            let next_state =
                if t.terminated || t.truncated { None } else { Some(encode(&self.policy.render(&t.next)?)?) };
            // Steps taken side by side by one seed's group, at the same step of their episodes.
            let group = (self.learner.group_size() > 1).then(|| {
                let mut h = SplitMix64::new(t.task as u64).next_u64();
                for x in [t.seed, u64::from(t.siblings), u64::from(t.step)] {
                    h = SplitMix64::new(h ^ x).next_u64();
                }
                h
            });
            out.push(trainer::etpo::Transition {
                state: encode(prompt)?,
                action: t.action.tokens.clone(),
                reward: t.reward,
                next_state,
                group,
            });
        }
        Ok(out)
    }

    /// Adds a round to the pending batch and updates when the batch has `update_every` steps.
    fn process(&mut self, round: ReplayRound) -> Result<(), ExperimentError> {
        self.pending.extend(round.transitions);
        self.pending_steps += round.steps;
        self.pos.rounds = round.round + 1;
        self.pos.env_steps += round.steps;
        if self.pending_steps >= self.schedule.update_every as u64 && !self.pending.is_empty() {
            self.update()?;
        }
        Ok(())
    }

    fn update(&mut self) -> Result<(), ExperimentError> {
        let batch = std::mem::take(&mut self.pending);
        self.pending_steps = 0;
        self.pos.pending_from = self.pos.rounds;
        let start = Instant::now();
        self.failed = true;
        let m = self.learner.update(&self.policy.model().model, &batch).map_err(train_err)?;
        self.failed = false;
        let record = MetricsRecord {
            update: self.learner.updates(),
            env_steps: self.pos.env_steps,
            q_loss: m.q_loss,
            policy_loss: m.policy_loss,
            kl: m.kl,
            entropy: m.entropy,
            batch_reward: m.batch_reward,
            time_s: start.elapsed().as_secs_f64(),
            detail: m,
        };
        let path = self.run_dir.join(METRICS);
        if let Some(file) = &mut self.metrics {
            append_line(file, &path, &record)?;
        }
        if self.learner.updates().is_multiple_of(self.schedule.checkpoint_every) {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), ExperimentError> {
        let extra = serde_json::to_value(self.pos).map_err(train_err)?;
        self.learner.save(&self.policy.model().model, &self.run_dir.join(CHECKPOINT), &extra).map_err(train_err)?;
        let records = read_own_metrics(&self.run_dir.join(METRICS))?;
        if let Err(e) = batch_reward_png(&self.run_dir.join(BATCH_REWARD_PNG), &[(self.name.to_string(), records)]) {
            eprintln!("warning: {e}");
        }
        Ok(())
    }
}

impl Agent for Trained {
    fn name(&self) -> &str {
        self.name
    }

    fn policy(&mut self) -> &mut dyn Policy {
        &mut self.policy
    }

    fn group_size(&self) -> u32 {
        self.learner.group_size()
    }

    /// Restores the checkpoint (if any) and replays the recorded rounds beyond it.
    fn start(&mut self, _tasks: &[SpecRun], run_dir: &Path, previous: &[StepRecord]) -> Result<(), ExperimentError> {
        self.run_dir = run_dir.to_path_buf();
        let checkpoint = run_dir.join(CHECKPOINT);
        if checkpoint.exists() {
            let extra = self.learner.load(&self.policy.model().model, &checkpoint).map_err(train_err)?;
            self.pos = serde_json::from_value(extra)
                .map_err(|e| resume_err(&checkpoint, format!("no loop position in the checkpoint: {e}")))?;
        }
        // Metrics of updates after the checkpoint are written again as they are replayed.
        let metrics_path = run_dir.join(METRICS);
        let kept: Vec<MetricsRecord> =
            read_own_metrics(&metrics_path)?.into_iter().filter(|m| m.update <= self.learner.updates()).collect();
        write_jsonl_atomic(&metrics_path, &kept)?;
        self.metrics = Some(open_append(&metrics_path)?);

        let replay_path = run_dir.join(REPLAY);
        self.logged = previous.len() as u64;
        let mut rounds = read_replay(&replay_path)?;
        // Rounds recorded but not logged (killed between the two) are dropped: the loop runs
        // them again, exactly as it did, since it resumes from the log.
        let keep = rounds.iter().take_while(|r| r.logged_before.is_none_or(|b| b + r.steps <= self.logged)).count();
        if keep < rounds.len() {
            eprintln!(
                "dropping {} recorded round(s) whose steps were never logged; they run again",
                rounds.len() - keep
            );
            rounds.truncate(keep);
            write_jsonl_atomic(&replay_path, &rounds)?;
        }
        if (rounds.len() as u64) < self.pos.rounds {
            return Err(resume_err(
                &replay_path,
                format!("holds {} rounds, the checkpoint has seen {}", rounds.len(), self.pos.rounds),
            ));
        }
        let recorded: u64 = rounds.iter().map(|r| r.steps).sum();
        if (previous.len() as u64) > recorded {
            eprintln!(
                "warning: {} step(s) of steps.jsonl were logged but not recorded for training (the run stopped \
                 between the two); they stay in the log and are not trained on",
                previous.len() as u64 - recorded
            );
        }
        let replayed = rounds.len() as u64 - self.pos.rounds;
        if self.pos.rounds > 0 || replayed > 0 {
            eprintln!(
                "resuming training after update {} (environment step {}); replaying {replayed} recorded round(s)",
                self.learner.updates(),
                self.pos.env_steps
            );
        }
        let mut rounds = rounds.into_iter();
        for r in rounds.by_ref().take(self.pos.rounds as usize) {
            if r.round >= self.pos.pending_from {
                self.pending_steps += r.steps;
                self.pending.extend(r.transitions);
            }
        }
        for r in rounds {
            self.process(r)?;
        }
        self.replay = Some(open_append(&replay_path)?);
        Ok(())
    }

    /// Appends the round to `replay.jsonl` before its steps are logged and long before it is
    /// trained on, so a resumed run can replay it.
    fn record(&mut self, batch: &[FinishedStep]) -> Result<(), ExperimentError> {
        if batch.is_empty() {
            return Ok(());
        }
        let round = ReplayRound {
            round: self.pos.rounds,
            steps: batch.len() as u64,
            logged_before: Some(self.logged),
            transitions: self.tokenize(batch)?,
        };
        let path = self.run_dir.join(REPLAY);
        match &mut self.replay {
            Some(file) => append_line(file, &path, &round)?,
            None => return Err(train_err("record() before start()")),
        }
        if std::env::var(FAILPOINT_ENV).ok().as_deref() == Some(&format!("abort-after-recording-round:{}", round.round))
        {
            std::process::abort();
        }
        self.recorded = Some(round);
        Ok(())
    }

    fn learn(&mut self, batch: &[FinishedStep]) -> Result<(), ExperimentError> {
        self.logged += batch.len() as u64;
        match self.recorded.take() {
            Some(round) => self.process(round),
            None if batch.is_empty() => Ok(()),
            None => Err(train_err("learn() without record() of the round")),
        }
    }

    fn finish(&mut self, run_dir: &Path) -> Result<(), ExperimentError> {
        if self.failed || self.replay.is_none() {
            return Ok(());
        }
        self.checkpoint()?;
        self.policy
            .model()
            .model
            .save_adapter(POLICY, &run_dir.join(ADAPTER_DIR))
            .map_err(|e| train_err(format!("saving the policy adapter: {e}")))
    }
}

fn resume_err(path: &Path, message: String) -> ExperimentError {
    ExperimentError::Resume { path: path.to_path_buf(), message }
}

fn open_append(path: &Path) -> Result<File, ExperimentError> {
    OpenOptions::new().create(true).append(true).open(path).map_err(|e| ExperimentError::io(path, e))
}

/// Writes one JSON line and flushes it to the OS (a kill after this cannot lose it).
fn append_line<T: Serialize>(file: &mut File, path: &Path, value: &T) -> Result<(), ExperimentError> {
    let mut line = serde_json::to_string(value).map_err(|e| ExperimentError::io(path, std::io::Error::other(e)))?;
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(|e| ExperimentError::io(path, e))?;
    file.flush().map_err(|e| ExperimentError::io(path, e))
}

/// Replaces a JSON-lines file with `items`, one per line, atomically (a kill leaves the old file
/// or the new one).
fn write_jsonl_atomic<T: Serialize>(path: &Path, items: &[T]) -> Result<(), ExperimentError> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item).map_err(train_err)?);
        text.push('\n');
    }
    super::summary::write_atomic(path, text.as_bytes())
}

/// The complete lines of a JSON-lines file (none if it does not exist). A last line without its
/// newline (the process was killed while writing it) is skipped, and with `repair` also cut from
/// the file (only the run's own process may repair: another may be appending); any other
/// unreadable line is an error naming it.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, repair: bool) -> Result<Vec<T>, ExperimentError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ExperimentError::io(path, e)),
    };
    let mut reader = BufReader::new(file);
    let (mut out, mut good_bytes, mut line, mut n) = (Vec::new(), 0u64, String::new(), 0usize);
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(|e| ExperimentError::io(path, e))?;
        if read == 0 {
            break;
        }
        n += 1;
        if !line.ends_with('\n') {
            if !repair {
                break;
            }
            let file = OpenOptions::new().write(true).open(path).map_err(|e| ExperimentError::io(path, e))?;
            file.set_len(good_bytes).map_err(|e| ExperimentError::io(path, e))?;
            break;
        }
        let value = serde_json::from_str(line.trim_end())
            .map_err(|e| resume_err(path, format!("line {n} is not a valid record: {e}")))?;
        out.push(value);
        good_bytes += read as u64;
    }
    Ok(out)
}

fn read_replay(path: &Path) -> Result<Vec<ReplayRound>, ExperimentError> {
    let rounds: Vec<ReplayRound> = read_jsonl(path, true)?;
    for (i, r) in rounds.iter().enumerate() {
        if r.round != i as u64 {
            return Err(resume_err(path, format!("line {} holds round {}, expected {i}", i + 1, r.round)));
        }
    }
    Ok(rounds)
}

/// The records of this run's `metrics.jsonl` (none if it does not exist), cutting a half-written
/// last line from the file.
fn read_own_metrics(path: &Path) -> Result<Vec<MetricsRecord>, ExperimentError> {
    read_jsonl(path, true)
}

/// The complete records of a run's `metrics.jsonl`, read only (the run may still be writing it).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, ExperimentError> {
    read_jsonl(path, false).map_err(|e| match e {
        ExperimentError::Resume { path, message } => {
            ExperimentError::Io { path, source: std::io::Error::other(message) }
        }
        other => other,
    })
}

/// Draws the batch reward of each update against environment steps (a thin line) and its running
/// mean over the last 5 updates (thick), one colour per run, like the paper's Figure 4 (ETPO
/// against PPO-KL when given both runs). `runs`: a label and the run's metrics records.
pub fn batch_reward_png(path: &Path, runs: &[(String, Vec<MetricsRecord>)]) -> Result<(), ExperimentError> {
    draw(path, runs).map_err(|e| ExperimentError::Plot { path: path.to_path_buf(), message: e.to_string() })
}

/// The window of the running mean drawn by [`batch_reward_png`].
pub const RUNNING_MEAN_UPDATES: usize = 5;

/// Running mean over a trailing window of `w` points.
pub fn running_mean(values: &[f64], w: usize) -> Vec<f64> {
    (0..values.len())
        .map(|i| {
            let lo = (i + 1).saturating_sub(w);
            values[lo..=i].iter().sum::<f64>() / (i + 1 - lo) as f64
        })
        .collect()
}

fn draw(path: &Path, runs: &[(String, Vec<MetricsRecord>)]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = runs.iter().flat_map(|(_, r)| r.iter());
    let x_max = all.clone().map(|m| m.env_steps).max().unwrap_or(1).max(2);
    let lo = all.clone().map(|m| m.batch_reward).fold(f64::INFINITY, f64::min);
    let hi = all.map(|m| m.batch_reward).fold(f64::NEG_INFINITY, f64::max);
    let (y_min, y_max) = if lo.is_finite() { (lo.min(-1.0) - 0.05, hi.max(1.0) + 0.05) } else { (-1.05, 1.05) };
    let title = match runs {
        [(label, _)] => format!("{label}: average batch reward"),
        _ => "average batch reward".to_string(),
    };
    let mut chart = steps_chart(&root, &title, 0u64..x_max, y_min..y_max, "batch reward")?;
    for (i, (label, records)) in runs.iter().enumerate() {
        let color = if runs.len() == 1 { BLUE.to_rgba() } else { Palette99::pick(i).to_rgba() };
        let thin = color.mix(0.35);
        let xs: Vec<u64> = records.iter().map(|m| m.env_steps).collect();
        let ys: Vec<f64> = records.iter().map(|m| m.batch_reward).collect();
        let (thin_label, mean_label) = if runs.len() == 1 {
            ("per update".to_string(), format!("mean of the last {RUNNING_MEAN_UPDATES} updates"))
        } else {
            (format!("{label}, per update"), format!("{label}, mean of the last {RUNNING_MEAN_UPDATES}"))
        };
        chart
            .draw_series(LineSeries::new(xs.iter().copied().zip(ys.iter().copied()), thin.stroke_width(1)))?
            .label(thin_label)
            .legend(legend_mark(thin.stroke_width(1)));
        let mean = running_mean(&ys, RUNNING_MEAN_UPDATES);
        chart
            .draw_series(LineSeries::new(xs.iter().copied().zip(mean), color.stroke_width(2)))?
            .label(mean_label)
            .legend(legend_mark(color.stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_mean_uses_a_trailing_window() {
        assert_eq!(running_mean(&[1.0, 3.0, 5.0, 7.0], 2), vec![1.0, 2.0, 4.0, 6.0]);
        assert_eq!(running_mean(&[], 5), Vec::<f64>::new());
    }

    #[test]
    fn a_half_written_last_line_is_cut_and_others_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let round = |i: u64| ReplayRound { round: i, steps: 1, logged_before: Some(i), transitions: Vec::new() };
        let mut text = String::new();
        for i in 0..2 {
            text.push_str(&serde_json::to_string(&round(i)).unwrap());
            text.push('\n');
        }
        let whole = text.len() as u64;
        text.push_str("{\"round\": 2, \"ste");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_replay(&path).unwrap().len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        std::fs::write(&path, "{\"round\": 1, \"steps\": 1, \"transitions\": []}\n").unwrap();
        assert!(read_replay(&path).unwrap_err().to_string().contains("expected 0"));
        std::fs::write(&path, "not json\n").unwrap();
        assert!(read_replay(&path).unwrap_err().to_string().contains("line 1"));
        assert!(read_replay(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn draws_the_batch_reward_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.png");
        let rec = |update: u64, r: f64| MetricsRecord {
            update,
            env_steps: update * 4,
            q_loss: 0.0,
            policy_loss: 0.0,
            kl: 0.0,
            entropy: 0.0,
            batch_reward: r,
            time_s: 0.0,
            detail: UpdateMetrics::default(),
        };
        let run = vec![rec(1, -1.0), rec(2, -0.5), rec(3, 0.8)];
        batch_reward_png(&path, &[("etpo".into(), run.clone())]).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        batch_reward_png(&path, &[("etpo".into(), run.clone()), ("ppo-kl".into(), run)]).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
    }
}
