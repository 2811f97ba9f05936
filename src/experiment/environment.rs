//! The interface the run loop drives environments through, so that it does not know where they
//! run: [`Environment`] is one spec × seed (reset, step, and re-entering an interrupted episode
//! from the log), [`Environments`] makes them for one spec. Two implementations: the local
//! `runtime::env::Env` / `runtime::env::Task` (the sandbox pool and the game engine of this
//! process), below, and the client of `etpo serve` servers in [`super::remote`] (`--remote`).

use runtime::env::{Env, Observation, Score, StepResult, Task, TokenCounter};

use super::record::StepRecord;
use super::ExperimentError;

/// One environment: a spec and one seed, with Gymnasium's semantics (see `runtime::env::Env`).
pub trait Environment: Send {
    /// Starts an episode and returns its first state.
    fn reset(&mut self) -> Result<Observation, ExperimentError>;
    /// Takes one step with the policy's raw generation.
    fn step(&mut self, generation: &str) -> Result<StepResult, ExperimentError>;
    /// Puts the environment back into the episode whose logged steps are `steps` (oldest first;
    /// the episode was still running after the last), right after [`reset`](Environment::reset)
    /// gave its first state; returns the state the next step answers, which must be the one the
    /// episode was in when it was logged.
    fn resume(&mut self, steps: &[&StepRecord]) -> Result<Observation, ExperimentError>;
}

/// The environments of one spec, one per seed.
pub trait Environments: Send + Sync {
    /// The environment of `seed` (for data tasks, the split; for games, the reset seed).
    fn env(&self, seed: u64) -> Result<Box<dyn Environment>, ExperimentError>;
    /// Measure states against the spec's `prompt.max_tokens` with the policy model's tokens (see
    /// `runtime::env::TokenCounter`) in the environments made from now on; an error when these
    /// environments cannot.
    fn set_token_counter(&mut self, counter: TokenCounter) -> Result<(), ExperimentError>;
    /// Scores an action (as a step's `info.action` gave it: already extracted) on the held-out
    /// test part of `seed`'s split (`dataset.test_fraction`), assembled into the spec's program
    /// as a step assembles it; `None` when the spec holds out no test part (or is a game).
    fn score_action_on_test(&self, seed: u64, action: &str) -> Result<Option<Score>, ExperimentError>;
}

impl Environment for Env {
    fn reset(&mut self) -> Result<Observation, ExperimentError> {
        Ok(Env::reset(self)?)
    }

    fn step(&mut self, generation: &str) -> Result<StepResult, ExperimentError> {
        Ok(Env::step(self, generation)?)
    }

    /// A data task's state is rebuilt from the recorded actions and errors without running
    /// anything again (`Env::restore`: re-running could give another outcome, and the log is the
    /// truth); a game's is rebuilt by playing the recorded actions again (`Env::replay`: a game
    /// is a pure function of its seed and actions).
    fn resume(&mut self, steps: &[&StepRecord]) -> Result<Observation, ExperimentError> {
        if self.spec().kind.game().is_some() {
            let actions: Vec<&str> = steps.iter().map(|r| r.action.as_str()).collect();
            return Ok(self.replay(&actions)?);
        }
        let turns: Vec<envspec::Turn> = steps
            .iter()
            .map(|r| envspec::Turn {
                step: r.step,
                action: r.action.clone(),
                reward: r.reward,
                error: r.error.clone(),
                observation: String::new(),
            })
            .collect();
        Ok(self.restore(&turns)?)
    }
}

impl Environments for Task {
    fn env(&self, seed: u64) -> Result<Box<dyn Environment>, ExperimentError> {
        Ok(Box::new(Task::env(self, seed)?))
    }

    fn set_token_counter(&mut self, counter: TokenCounter) -> Result<(), ExperimentError> {
        Task::set_token_counter(self, counter);
        Ok(())
    }

    fn score_action_on_test(&self, seed: u64, action: &str) -> Result<Option<Score>, ExperimentError> {
        Ok(Task::env(self, seed)?.score_action_on_test(action)?)
    }
}
