//! The run loop: every spec × seed is an environment slot (or, for an agent that compares
//! several actions per state, [`Agent::group_size`] slots of one seed acting in lockstep); each
//! round, the policy acts for every slot that still has budget (one batch, so a model batches
//! its generation), the environments
//! evaluate those actions in parallel threads (sharing one worker pool, or spread over `etpo
//! serve` servers: the loop drives them through [`Environment`] and does not know which), the
//! steps are logged in slot order, and the agent sees the finished transitions and may update the
//! policy before the next round.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use envspec::{Prompt, Spec};
use runtime::env::{Observation, StepInfo, StepResult};

use super::environment::{Environment, Environments};
use super::policy::{prompt_sha256, ActRequest, Action, Policy};
use super::record::{StepLog, StepRecord};
use super::summary::SpecStats;
use super::ExperimentError;

/// One spec made ready to run, the seeds to run it on and its budget.
pub struct SpecRun {
    pub spec: Arc<Spec>,
    /// Where its environments run: a local `runtime::env::Task`, or `etpo serve` servers
    /// ([`super::remote::RemoteSpec`]).
    pub envs: Box<dyn Environments>,
    pub seeds: Vec<u64>,
    /// Environment steps per seed (the paper's k).
    pub steps: u32,
}

/// One finished environment step, as an agent sees it.
#[derive(Debug, Clone)]
pub struct FinishedStep {
    /// Index of the task (spec) in the run.
    pub task: usize,
    pub seed: u64,
    pub episode: u32,
    /// The episodes of one seed's members that started side by side (see [`Agent::group_size`])
    /// share this number: steps with the same task, seed, `siblings` and `step` are the group
    /// GRPO compares. Without groups it is the episode number.
    pub siblings: u32,
    /// Step within the episode, from 0.
    pub step: u32,
    /// The state the action answered.
    pub prompt: Prompt,
    pub action: Action,
    pub reward: f64,
    pub terminated: bool,
    pub truncated: bool,
    /// The next state (the reflection state after a failure; after the episode ended it is the
    /// final observation and must not be bootstrapped from).
    pub next: Prompt,
    pub info: StepInfo,
}

/// An agent: owns the policy and its learning algorithm and may learn from each round's transitions.
///
/// The loop calls [`start`](Agent::start) once, then per round `policy().act(...)` for every
/// waiting environment and [`learn`](Agent::learn) with the round's finished transitions, and
/// [`finish`](Agent::finish) once at the end (budget used, Ctrl-C, or an error).
pub trait Agent {
    /// Its name, as given to `--algo`.
    fn name(&self) -> &str;
    /// How many environments of each seed act side by side (GRPO's G; 1 for every other agent).
    /// They start from the same first state, act in lockstep, and share the seed's budget of
    /// environment steps; member `m`'s `e`-th episode is episode `e·G + m` of the seed, so that
    /// episode numbers stay unique and `episode / G` names the siblings.
    fn group_size(&self) -> u32 {
        1
    }
    /// The policy acting now.
    fn policy(&mut self) -> &mut dyn Policy;
    /// Before the first round: the run's tasks, its folder (for checkpoints and metrics) and the
    /// steps already logged when resuming (a training agent restores its checkpoint here).
    fn start(&mut self, _tasks: &[SpecRun], _run_dir: &Path, _previous: &[StepRecord]) -> Result<(), ExperimentError> {
        Ok(())
    }
    /// Called with a round's transitions (slot order) before its steps are logged: an agent
    /// that must replay them on resume records them here, so that a logged step is always
    /// recorded too (the loop logs a round's steps in one write after this returns).
    fn record(&mut self, _batch: &[FinishedStep]) -> Result<(), ExperimentError> {
        Ok(())
    }
    /// Called after each round, once its steps are logged, with its transitions (slot order).
    /// May update the policy.
    fn learn(&mut self, batch: &[FinishedStep]) -> Result<(), ExperimentError>;
    /// After the last round (also after Ctrl-C or an error): write a final checkpoint.
    fn finish(&mut self, _run_dir: &Path) -> Result<(), ExperimentError> {
        Ok(())
    }
}

/// The paper's Reflection baseline: the interactive loop with no training; its score is the best
/// reward found within k steps.
pub struct Reflection<P: Policy> {
    pub policy: P,
}

impl<P: Policy> Agent for Reflection<P> {
    fn name(&self) -> &str {
        "reflection"
    }
    fn policy(&mut self) -> &mut dyn Policy {
        &mut self.policy
    }
    fn learn(&mut self, _batch: &[FinishedStep]) -> Result<(), ExperimentError> {
        Ok(())
    }
}

/// Receives progress as the loop runs (the CLI draws progress bars with it).
pub trait Observer {
    /// After each logged step; `stats` are the step's spec's statistics so far.
    fn on_step(&mut self, task: usize, record: &StepRecord, stats: &SpecStats);
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {
    fn on_step(&mut self, _: usize, _: &StepRecord, _: &SpecStats) {}
}

/// How the loop ended.
#[derive(Debug)]
pub struct LoopOutcome {
    /// Statistics per task (spec), in task order, including resumed steps.
    pub stats: Vec<SpecStats>,
    /// True if `stop` was raised before every slot used its budget.
    pub interrupted: bool,
}

struct Slot {
    task: usize,
    seed_index: usize,
    seed: u64,
    /// Which of the seed's [`Agent::group_size`] environments this is, from 0.
    member: u32,
    /// The seed's number of members.
    group_size: u32,
    /// Steps this slot may take (its share of the seed's budget).
    budget: u32,
    env: Box<dyn Environment>,
    /// Steps used (all episodes).
    used: u32,
    /// Episodes this member started; the next one is the seed's episode
    /// `started · group_size + member`.
    started: u32,
    /// The running episode and its current observation; `None` between episodes.
    current: Option<(u32, Observation)>,
    /// The policy has no more actions for this slot.
    exhausted: bool,
}

/// Runs each task's `steps` environment steps for each of its seeds, continuing after `previous` (the steps
/// already in the log, for `--resume`). Each step is appended to `log` as soon as it is finished.
/// Returns when every slot used its budget, the policy ran out of actions, or `stop` was raised
/// (checked between rounds: the round in flight is finished and logged first).
#[allow(clippy::too_many_arguments)]
pub fn run_loop(
    tasks: &[SpecRun],
    agent: &mut dyn Agent,
    run_dir: &Path,
    log: &mut StepLog,
    previous: &[StepRecord],
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<LoopOutcome, ExperimentError> {
    agent.start(tasks, run_dir, previous)?;
    let result = rounds(tasks, agent, log, previous, observer, stop);
    let finished = agent.finish(run_dir);
    let outcome = result?;
    finished?;
    Ok(outcome)
}

fn rounds(
    tasks: &[SpecRun],
    agent: &mut dyn Agent,
    log: &mut StepLog,
    previous: &[StepRecord],
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<LoopOutcome, ExperimentError> {
    let mut stats: Vec<SpecStats> = tasks.iter().map(|t| SpecStats::new(&t.spec.name, &t.seeds, t.steps)).collect();
    let mut slots = make_slots(tasks, agent.group_size())?;
    // Environment steps used per task and seed (over all its members), which number the log.
    let mut seed_steps: HashMap<(usize, usize), u32> = HashMap::new();
    restore(tasks, &mut slots, &mut stats, &mut seed_steps, previous)?;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(LoopOutcome { stats, interrupted: slots.iter().any(|s| !s.exhausted && s.used < s.budget) });
        }
        let active = start_episodes(&mut slots)?;
        if active.is_empty() {
            return Ok(LoopOutcome { stats, interrupted: false });
        }
        let work = ask_policy(tasks, &mut slots, &active, &seed_steps, agent)?;
        let round = finish_round(tasks, evaluate(&mut slots, work), &mut seed_steps);
        // The agent records the round first, then the round's steps go to the log in one
        // write, so a kill never leaves logged steps that the agent did not record.
        if round.fault.is_none() {
            agent.record(&round.batch)?;
        }
        log.write_all(round.logged.iter().map(|(_, _, record)| record))?;
        for (task, seed_index, record) in &round.logged {
            let spec_stats = &mut stats[*task];
            spec_stats.seeds[*seed_index].push(record);
            observer.on_step(*task, record, spec_stats);
        }
        if let Some(e) = round.fault {
            return Err(e);
        }
        agent.learn(&round.batch)?;
    }
}

/// `group_size` environment slots per task and seed, before any step; the seed's budget is
/// split between them as evenly as it goes (the first members take the remainder).
fn make_slots(tasks: &[SpecRun], group_size: u32) -> Result<Vec<Slot>, ExperimentError> {
    let group_size = group_size.max(1);
    let mut slots = Vec::new();
    for (ti, task) in tasks.iter().enumerate() {
        for (si, &seed) in task.seeds.iter().enumerate() {
            for member in 0..group_size {
                let budget = task.steps / group_size + u32::from(member < task.steps % group_size);
                slots.push(Slot {
                    task: ti,
                    seed_index: si,
                    seed,
                    member,
                    group_size,
                    budget,
                    env: task.envs.env(seed)?,
                    used: 0,
                    started: 0,
                    current: None,
                    exhausted: false,
                });
            }
        }
    }
    Ok(slots)
}

/// Starts an episode in every slot with budget left and none running; returns the slots that
/// act this round.
fn start_episodes(slots: &mut [Slot]) -> Result<Vec<usize>, ExperimentError> {
    let mut active = Vec::new();
    for (i, slot) in slots.iter_mut().enumerate() {
        if slot.exhausted || slot.used >= slot.budget {
            continue;
        }
        if slot.current.is_none() {
            let obs = slot.env.reset()?;
            slot.current = Some((slot.started * slot.group_size + slot.member, obs));
            slot.started += 1;
        }
        active.push(i);
    }
    Ok(active)
}

/// Asks the policy for every active slot at once (one batch, so a model batches its
/// generation). A slot the policy has no action for is marked exhausted.
fn ask_policy(
    tasks: &[SpecRun],
    slots: &mut [Slot],
    active: &[usize],
    seed_steps: &HashMap<(usize, usize), u32>,
    agent: &mut dyn Agent,
) -> Result<Vec<(usize, Action)>, ExperimentError> {
    // The members of a seed that act this round take its next environment steps in slot order.
    let mut taken: HashMap<(usize, usize), u32> = HashMap::new();
    let requests: Vec<ActRequest<'_>> = active
        .iter()
        .map(|&i| {
            let slot = &slots[i];
            let (episode, obs) = slot.current.as_ref().expect("active slots have an observation");
            let key = (slot.task, slot.seed_index);
            let before = seed_steps.get(&key).copied().unwrap_or(0);
            let offset = taken.entry(key).or_default();
            *offset += 1;
            ActRequest {
                spec: &tasks[slot.task].spec,
                seed: slot.seed,
                episode: *episode,
                step: obs.step,
                env_step: before + *offset,
                prompt: &obs.prompt,
            }
        })
        .collect();
    let actions = agent.policy().act(&requests)?;
    drop(requests);
    if actions.len() != active.len() {
        return Err(ExperimentError::Policy(super::PolicyError::Config(format!(
            "the policy answered {} of {} requests",
            actions.len(),
            active.len()
        ))));
    }
    let mut work = Vec::new();
    for (&i, action) in active.iter().zip(actions) {
        match action {
            Some(a) => work.push((i, a)),
            None => slots[i].exhausted = true,
        }
    }
    Ok(work)
}

/// What one slot's step returned, or its thread's panic.
type Evaluated<'s> = std::thread::Result<(&'s mut Slot, Action, Result<StepResult, ExperimentError>)>;

/// Steps the environments in parallel threads: each blocks on the shared worker pool, which
/// bounds the number of programs running at once. Results come back in `work`'s order.
fn evaluate(slots: &mut [Slot], work: Vec<(usize, Action)>) -> Vec<Evaluated<'_>> {
    let mut by_index: HashMap<usize, &mut Slot> = slots.iter_mut().enumerate().collect();
    let jobs: Vec<(&mut Slot, Action)> =
        work.into_iter().map(|(i, a)| (by_index.remove(&i).expect("each slot acts once per round"), a)).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(slot, action)| {
                scope.spawn(move || {
                    let result = slot.env.step(&action.generation);
                    (slot, action, result)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

/// A round's finished steps: what the agent sees, what the log gets (with the task and seed
/// index each belongs to), and the first infrastructure fault, if any.
struct Round {
    batch: Vec<FinishedStep>,
    logged: Vec<(usize, usize, StepRecord)>,
    fault: Option<ExperimentError>,
}

/// Turns every step that finished into its log record and its [`FinishedStep`], in slot order,
/// and advances the slots; an infrastructure fault in one environment is kept (the run ends
/// after the others' steps of this round are safely logged).
fn finish_round(
    tasks: &[SpecRun],
    results: Vec<Evaluated<'_>>,
    seed_steps: &mut HashMap<(usize, usize), u32>,
) -> Round {
    let mut round = Round { batch: Vec::with_capacity(results.len()), logged: Vec::new(), fault: None };
    for joined in results {
        let (slot, action, result) = match joined {
            Ok((slot, action, Ok(result))) => (slot, action, result),
            Ok((_, _, Err(e))) => {
                round.fault.get_or_insert(e);
                continue;
            }
            Err(_) => {
                round.fault.get_or_insert(ExperimentError::Internal("an evaluation thread panicked".into()));
                continue;
            }
        };
        let (episode, obs) = slot.current.take().expect("a slot that acted has an observation");
        slot.used += 1;
        let env_step = seed_steps.entry((slot.task, slot.seed_index)).or_default();
        *env_step += 1;
        let record = StepRecord {
            spec: tasks[slot.task].spec.name.clone(),
            seed: slot.seed,
            member: slot.member,
            episode,
            step: obs.step,
            env_step: *env_step,
            prompt_sha256: prompt_sha256(&obs.prompt),
            generation: action.generation.clone(),
            action: result.info.action.clone(),
            reward: result.reward,
            ran: result.info.ran,
            terminated: result.terminated,
            truncated: result.truncated,
            error: result.info.error.clone(),
            wall_s: result.info.wall_s,
            cpu_s: result.info.cpu_s,
            peak_rss_mb: result.info.peak_rss_mb,
            gen_s: action.gen_s,
        };
        round.logged.push((slot.task, slot.seed_index, record));
        let ended = result.terminated || result.truncated;
        round.batch.push(FinishedStep {
            task: slot.task,
            seed: slot.seed,
            siblings: episode / slot.group_size,
            episode,
            step: obs.step,
            prompt: obs.prompt,
            action,
            reward: result.reward,
            terminated: result.terminated,
            truncated: result.truncated,
            next: result.observation.prompt.clone(),
            info: result.info,
        });
        if !ended {
            slot.current = Some((episode, result.observation));
        }
    }
    round
}

/// Rebuilds the slots from the steps already logged. Finished episodes need nothing; an episode
/// that was in progress when the run stopped is re-entered with [`Environment::resume`] after a
/// reset whose first state is checked against the log. Locally, a data task's episode is rebuilt
/// from its recorded last action and error (`Env::restore`), without running anything again:
/// re-running could give a different outcome (time limits, randomised estimators), and the log
/// must stay the truth; a game's episode is replayed (`Env::replay`): a game is deterministic
/// given its seed and actions. Remote environments replay the recorded generations and check
/// each outcome against the log ([`super::remote`]).
fn restore(
    tasks: &[SpecRun],
    slots: &mut [Slot],
    stats: &mut [SpecStats],
    seed_steps: &mut HashMap<(usize, usize), u32>,
    previous: &[StepRecord],
) -> Result<(), ExperimentError> {
    let resume_err = |message: String| ExperimentError::Resume { path: "steps.jsonl".into(), message };
    let mut index: HashMap<(&str, u64, u32), usize> = HashMap::new();
    for (i, slot) in slots.iter().enumerate() {
        index.insert((tasks[slot.task].spec.name.as_str(), slot.seed, slot.member), i);
    }
    for record in previous {
        let &i = index.get(&(record.spec.as_str(), record.seed, record.member)).ok_or_else(|| {
            resume_err(format!(
                "a step of spec {:?} seed {} member {} is not part of this run (a different --algo or group_size?)",
                record.spec, record.seed, record.member
            ))
        })?;
        let slot = &mut slots[i];
        let used = seed_steps.entry((slot.task, slot.seed_index)).or_default();
        if record.env_step != *used + 1 {
            return Err(resume_err(format!(
                "spec {:?} seed {}: expected environment step {}, found {} (duplicated or missing steps)",
                record.spec,
                record.seed,
                *used + 1,
                record.env_step
            )));
        }
        if record.episode % slot.group_size != slot.member {
            return Err(resume_err(format!(
                "spec {:?} seed {}: episode {} is not one of member {}'s",
                record.spec, record.seed, record.episode, record.member
            )));
        }
        *used += 1;
        slot.used += 1;
        stats[slot.task].seeds[slot.seed_index].push(record);
        slot.started = record.episode / slot.group_size + 1;
    }
    // Re-enter the episodes that were in progress.
    let mut last: HashMap<usize, &StepRecord> = HashMap::new();
    for record in previous {
        last.insert(index[&(record.spec.as_str(), record.seed, record.member)], record);
    }
    for (i, record) in last {
        if record.terminated || record.truncated {
            continue;
        }
        let slot = &mut slots[i];
        let first = slot.env.reset()?;
        let episode_start = previous
            .iter()
            .find(|r| r.spec == record.spec && r.seed == record.seed && r.episode == record.episode && r.step == 0);
        if let Some(start) = episode_start {
            if start.prompt_sha256 != prompt_sha256(&first.prompt) {
                return Err(resume_err(format!(
                    "spec {:?} seed {}: the first observation differs from the recorded one (the spec or its data changed)",
                    record.spec, record.seed
                )));
            }
        }
        let steps: Vec<&StepRecord> = previous
            .iter()
            .filter(|r| r.spec == record.spec && r.seed == record.seed && r.episode == record.episode)
            .collect();
        let obs = slot.env.resume(&steps)?;
        slot.current = Some((record.episode, obs));
    }
    Ok(())
}
