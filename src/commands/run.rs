//! `etpo run`: runs every spec found in the given files and folders for a budget of environment
//! steps per spec and seed, and writes a run folder a user can read, plot and resume:
//! `config.json`, `steps.jsonl`, `summary.csv`, `summary.md`, `best_reward.png`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use envspec::Algorithm;

use crate::commands::model_args::ModelArgs;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use etpo::experiment::lock::RunLock;
use etpo::experiment::provenance::{digest, folder_digests, git_commit, python_versions, utc_timestamp, FileDigest};
use etpo::experiment::remote::{self, ExpectedSpec};
use etpo::experiment::{
    self, plot, read_steps, run_loop, summary, Agent, Environments, ExperimentError, LlmPolicy, Observer, Policy,
    Reflection, RemoteError, RemoteSpec, SamplingConfig, ScriptedPolicy, Servers, SpecRun, SpecStats, StepLog,
    StepRecord, TrainSchedule, Trained, TrainerConfig,
};

/// `--algo`'s parser: the names of [`Algorithm::NAMES`].
fn algorithm_arg() -> impl clap::builder::TypedValueParser<Value = Algorithm> {
    use clap::builder::TypedValueParser as _;
    let names: Vec<&'static str> = Algorithm::NAMES.iter().map(|(n, _)| *n).collect();
    clap::builder::PossibleValuesParser::new(names)
        .try_map(|name| Algorithm::from_name(&name).ok_or(format!("unknown algorithm {name}")))
}

/// Hyper-parameters of `--algo etpo` and `--algo ppo-kl`. Each is also read from the specs'
/// `training:` block (which must then agree between the specs of one run); the command line
/// wins over the spec, the spec over the trainer's defaults.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainFlags {
    /// β, the weight of the KL(π‖ρ) penalty (default: `training.beta`, else the trainer's: 0.1 for
    /// ETPO, 0.01 for PPO-KL).
    #[arg(long, conflicts_with = "resume")]
    beta: Option<f64>,
    /// γ, the discount between actions (default: `training.gamma`, else 0.99).
    #[arg(long, conflicts_with = "resume")]
    gamma: Option<f64>,
    /// Learning rate of the trained adapters (default: `training.lr`, else the trainer's). ETPO:
    /// the policy's; the Q adapter's is a third of it and its value head's 10 times that.
    #[arg(long, conflicts_with = "resume")]
    lr: Option<f64>,
    /// λ, the Polyak coefficient of ETPO's target Q-network (default: `training.polyak`, else 0.5).
    #[arg(long, conflicts_with = "resume")]
    polyak: Option<f64>,
    /// How ETPO reads Q out of the Q-network: `dueling` (the default: a value head plus β times
    /// a log-ratio) or `logits` (the paper's literal reading).
    #[arg(long, conflicts_with = "resume")]
    q_readout: Option<trainer::etpo::QReadout>,
    /// Environment steps (over all specs and seeds) per update (default: `training.batch_size`,
    /// else 16). A final batch smaller than this is not trained on.
    #[arg(long, conflicts_with = "resume")]
    update_every: Option<usize>,
    /// Updates between checkpoints (default 1; a checkpoint is also written when the run stops).
    #[arg(long, conflicts_with = "resume")]
    checkpoint_every: Option<u64>,
    /// The ETPO(disc.) ablation: discount by γ between the tokens of an action too.
    #[arg(long, conflicts_with = "resume")]
    disc: bool,
    /// The ETPO(1-step) ablation: episodes of one step (every spec's `max_steps` forced to 1).
    #[arg(long, conflicts_with = "resume")]
    one_step: bool,
    /// Any other hyper-parameter of the trainer, by its configuration key, applied last:
    /// `--set q_epochs=4 --set q_optim.lr=1e-3` (ETPO) or `--set gae_lambda=0.9` (PPO-KL).
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
    set: Vec<String>,
}

/// Applies `--set KEY=VALUE` overrides with `set` (the trainer configuration's own setter).
fn apply_sets(
    sets: &[String],
    algo: &str,
    mut set: impl FnMut(&str, &str) -> Result<(), String>,
) -> anyhow::Result<()> {
    for kv in sets {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {kv}: expected KEY=VALUE"))?;
        set(k, v).map_err(|e| anyhow::anyhow!("--algo {algo}: --set {kv}: {e}"))?;
    }
    Ok(())
}

/// Where actions come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// A language model (`--model`, default: the embedded default model).
    Llm,
    /// Action files replayed in name order (`--actions DIR`).
    Scripted,
}

#[derive(clap::Args)]
pub struct Args {
    /// Spec files, or folders whose *.yaml / *.yml files are all run.
    #[arg(required_unless_present = "resume", conflicts_with = "resume")]
    paths: Vec<PathBuf>,
    /// The algorithm: reflection (no training), etpo, ppo-kl or grpo (default: the specs'
    /// `training.algorithm`, else reflection).
    #[arg(long, value_parser = algorithm_arg(), conflicts_with = "resume")]
    algo: Option<Algorithm>,
    /// Environment steps per spec and seed, the paper's k (default: the spec's
    /// `training.steps`, else 10).
    #[arg(long, conflicts_with = "resume")]
    steps: Option<u32>,
    /// Comma-separated data split seeds (default: each spec's `dataset.seeds`).
    #[arg(long, value_delimiter = ',', conflicts_with = "resume")]
    seeds: Option<Vec<u64>>,
    /// The model (`--model` cannot change on `--resume`; `--device` may).
    #[command(flatten)]
    model: ModelArgs,
    /// The run folder to create (default: runs/<UTC timestamp>-<algo>).
    #[arg(long, conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder with its recorded configuration (`--device`, `--workers`
    /// and `--remote` may differ). Every recorded step is kept and none is repeated: a half-written
    /// last line of steps.jsonl is dropped, and an episode that was in progress continues from
    /// the reflection state rebuilt from its recorded last action and error (nothing is re-run).
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    resume: Option<PathBuf>,
    /// Where actions come from.
    #[arg(long, value_enum, default_value = "llm", conflicts_with = "resume")]
    policy: PolicyKind,
    /// Folder of action files for `--policy scripted`: step n of every spec and seed gets the n-th
    /// file (name order); a subfolder named after a spec is used for that spec.
    #[arg(long, value_name = "DIR", required_if_eq("policy", "scripted"), conflicts_with = "resume")]
    actions: Option<PathBuf>,
    /// Sandbox workers evaluating actions in parallel (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Run the environments on these `etpo serve` servers (comma-separated http://HOST:PORT, each
    /// serving the run's spec files) instead of this machine's sandbox and game engine, spread
    /// over them; the episodes of a server that fails continue on the others. `--resume` uses the
    /// run's servers unless given again.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    remote: Option<Vec<String>>,
    /// Sampling temperature of the model (default: the spec's `training.temperature`, else 0.5).
    #[arg(long, conflicts_with = "resume")]
    temperature: Option<f64>,
    /// Top-k sampling, 0 turns it off (default: the spec's `training.top_k`, else 50).
    #[arg(long, conflicts_with = "resume")]
    top_k: Option<usize>,
    /// Nucleus sampling threshold (default: the spec's `training.top_p`, else off).
    #[arg(long, conflicts_with = "resume")]
    top_p: Option<f64>,
    /// Seed of the model's sampling.
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    sampling_seed: u64,
    /// At most this many prompts per generation batch.
    #[arg(long, default_value_t = 16, conflicts_with = "resume")]
    batch_size: usize,
    /// Do not draw progress bars.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    train: TrainFlags,
}

/// The configuration a run folder records, enough to continue or repeat it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunConfig {
    /// Absolute spec paths, in run order.
    specs: Vec<PathBuf>,
    algo: Algorithm,
    /// As given on the command line; each spec's resolved budget is in `specs[].steps`.
    steps: Option<u32>,
    seeds: Option<Vec<u64>>,
    policy: PolicyKind,
    actions: Option<PathBuf>,
    model: Option<PathBuf>,
    device: String,
    /// The weights actions are sampled with: `--generation-weights`, else `quantized` (which
    /// falls back to the model's own weights where it cannot be quantised: off the CPU, or not
    /// f32). `None`: a run made before etpo had quantised generation, which sampled with f32
    /// weights and resumes with them.
    #[serde(default)]
    generation_weights: Option<String>,
    /// `--activation-checkpointing`: the trainer's passes recompute each block in the backward
    /// pass (memory, not results; a resume may turn it on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    activation_checkpointing: bool,
    workers: Option<usize>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    sampling_seed: u64,
    batch_size: usize,
    /// Training hyper-parameters as given on the command line.
    #[serde(default)]
    train: TrainFlags,
    /// The `etpo serve` servers the environments run on (`--remote`); empty: this machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    remote: Vec<String>,
}

/// `config.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    etpo_version: String,
    git_commit: Option<String>,
    created_utc: String,
    command_line: Vec<String>,
    config: RunConfig,
    specs: Vec<SpecEntry>,
    model: Vec<FileDigest>,
    actions: Vec<FileDigest>,
    python: PathBuf,
    /// Versions of Python and the packages the sandbox imports (rewards depend on them).
    python_versions: Option<serde_json::Value>,
    /// Earlier invocations that continued this run.
    #[serde(default)]
    resumed: Vec<ResumeEntry>,
    /// The trainer's resolved hyper-parameters and schedule (training algorithms only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trainer: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SpecEntry {
    name: String,
    seeds: Vec<u64>,
    /// Environment steps per seed (k).
    steps: u32,
    /// The sampling parameters this spec's actions are drawn with (model policies).
    sampling: Option<experiment::Sampling>,
    #[serde(flatten)]
    file: FileDigest,
    /// The data file the spec reads, if any.
    data: Option<FileDigest>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ResumeEntry {
    at_utc: String,
    command_line: Vec<String>,
    steps_before: usize,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    // `_lock` is held to the end: one process per run folder.
    let (dir, mut manifest, previous, _lock, checked) = match &args.resume {
        Some(dir) => open_resumed(dir, &args)?,
        None => create_run(&args)?,
    };
    let config = manifest.config.clone();
    eprintln!("run folder: {}", dir.display());

    // Specs, their data or games, and seeds. The sandbox pool starts when a task first needs it.
    let host = runtime::env::Host::new(runtime::PoolConfig {
        workers: config.workers.unwrap_or_else(default_workers),
        python: manifest.python.clone(),
        limits: runtime::Limits::default(),
    });
    let mut specs = Vec::new();
    for entry in &manifest.specs {
        specs.push((envspec::load(&entry.file.path).map_err(|e| anyhow::anyhow!("{e}"))?, entry));
    }
    // With --remote, the environments run on the servers, checked to serve the same specs
    // (already by `create_run` for a new run).
    let servers = match checked {
        Some(servers) => Some(servers),
        None if config.remote.is_empty() => None,
        None => {
            let refs: Vec<(&envspec::Spec, &SpecEntry)> = specs.iter().map(|(s, e)| (s, *e)).collect();
            Some(connect(&config, &refs)?)
        }
    };
    if let Some(servers) = &servers {
        eprintln!("environments on {}", servers.urls().join(", "));
    }
    let mut tasks = Vec::new();
    for (mut spec, entry) in specs {
        if config.train.one_step {
            spec.max_steps = 1;
        }
        let spec = Arc::new(spec);
        let envs: Box<dyn Environments> = match &servers {
            Some(servers) => Box::new(RemoteSpec::new(spec.clone(), servers.clone())),
            None => Box::new(
                runtime::env::Task::load(spec.clone(), &host)
                    .with_context(|| format!("{}: preparing the environment", entry.file.path.display()))?,
            ),
        };
        tasks.push(SpecRun { spec, envs, seeds: entry.seeds.clone(), steps: entry.steps });
    }

    // A model policy also measures states against `prompt.max_tokens` in its own tokens.
    let load_llm = |tasks: &mut Vec<SpecRun>| -> anyhow::Result<LlmPolicy> {
        let model = config.model.clone().unwrap_or_else(trainer::default_model_path);
        eprintln!("loading {} on {}", model.display(), config.device);
        let mut policy = LlmPolicy::load(&model, &config.device, sampling_config(&config))?;
        policy.model_mut().model.set_generation_weights(generation_weights(&config)?);
        policy.model_mut().model.set_activation_checkpointing(config.activation_checkpointing);
        if policy.model().model.device().is_cpu() {
            let m = &policy.model().model;
            eprintln!(
                "sampling with {} weights; scoring and training multiply by the frozen weights in {}",
                m.generation_weights().name(),
                m.matmul_precision().name()
            );
        }
        let counter = policy.token_counter();
        for task in tasks.iter_mut() {
            task.envs.set_token_counter(counter.clone())?;
        }
        Ok(policy)
    };
    let mut agent: Box<dyn Agent> = if config.algo.trains() {
        let specs: Vec<&envspec::Spec> = tasks.iter().map(|t| t.spec.as_ref()).collect();
        let env_steps = tasks.iter().map(|t| u64::from(t.steps) * t.seeds.len() as u64).sum();
        let (trainer_config, schedule) = train_config(&config, &specs, env_steps)?;
        Box::new(Trained::new(load_llm(&mut tasks)?, trainer_config, schedule)?)
    } else {
        let policy: Box<dyn Policy> = match config.policy {
            PolicyKind::Scripted => {
                let dir = config.actions.as_deref().context("--policy scripted needs --actions DIR")?;
                Box::new(ScriptedPolicy::new(dir)?)
            }
            PolicyKind::Llm => Box::new(load_llm(&mut tasks)?),
        };
        Box::new(Reflection { policy })
    };

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after the current step (Ctrl-C again to quit at once)");
        })
        .context("installing the Ctrl-C handler")?;
    }

    let names: Vec<(String, Vec<u64>, u32)> =
        tasks.iter().map(|t| (t.spec.name.clone(), t.seeds.clone(), t.steps)).collect();
    let resumed_stats = summary::stats_from_records(&names, &previous);
    let mut bars = Bars::new(&resumed_stats, args.no_progress);
    let steps_path = dir.join("steps.jsonl");
    let mut log = StepLog::append(&steps_path)?;
    let outcome = run_loop(&tasks, agent.as_mut(), &dir, &mut log, &previous, &mut bars, &stop);
    bars.finish();

    // Summaries come from the log itself, so they are right also after an error or Ctrl-C.
    let records = read_steps(&steps_path)?;
    let stats = summary::stats_from_records(&names, &records);
    // The held-out score needs the sandbox (or a live server); when it fails the summaries are
    // written without it, and the run's own error, if any, comes first.
    let (tests, test_error) = match experiment::held_out::score_best_on_test(&tasks, &records) {
        Ok(tests) => (tests, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    write_summaries(&dir, &stats, &tests, config.algo.name())?;
    if args.resume.is_some() {
        manifest.resumed.push(ResumeEntry {
            at_utc: utc_timestamp(std::time::SystemTime::now(), true),
            command_line: std::env::args().collect(),
            steps_before: previous.len(),
        });
        write_json(&dir.join("config.json"), &manifest)?;
    }
    print!("{}{}", summary::to_markdown(&stats, config.algo.name()), experiment::held_out::to_markdown(&tests));
    if config.algo.trains() {
        // Before and after training, in one line per spec: what a newcomer looks for.
        for spec in &stats {
            let w = spec.window_len();
            if let (Some(first), Some(last)) = (spec.window(w, false), spec.window(w, true)) {
                println!(
                    "\n{} {}: mean reward {:.3} over the first {w} steps of each seed -> {:.3} over the last {w} \
                     (runnable {:.0}% -> {:.0}%)",
                    config.algo.name(),
                    spec.spec,
                    first.1,
                    last.1,
                    first.0 * 100.0,
                    last.0 * 100.0
                );
            }
        }
    }
    println!("\nresults: {}", dir.display());
    let outcome = match outcome {
        Err(e @ ExperimentError::Remote(RemoteError::AllDown(_))) => bail!(
            "{e}\n{} keeps every finished step: once a server is back, continue with `etpo run --resume {}` (with \
             --remote URL,... to use other servers)",
            dir.display(),
            dir.display()
        ),
        outcome => outcome?,
    };
    if !outcome.interrupted {
        for spec in &stats {
            for seed in spec.seeds.iter().filter(|s| s.steps < spec.k) {
                eprintln!(
                    "note: {} seed {}: the policy had no more actions after {} of {} steps",
                    spec.spec, seed.seed, seed.steps, spec.k
                );
            }
        }
    }
    if let Some(e) = test_error {
        bail!(
            "scoring the best actions on the held-out test part failed: {e}\n{} keeps every step; `etpo run --resume {}` \
             scores them again",
            dir.display(),
            dir.display()
        );
    }
    if outcome.interrupted {
        eprintln!("interrupted; continue with: etpo run --resume {}", dir.display());
        return Ok(130);
    }
    Ok(0)
}

/// A run folder opened for writing: its path, `config.json`, the steps already logged, its lock,
/// and the `--remote` servers if they were checked already.
type Opened = (PathBuf, Manifest, Vec<StepRecord>, RunLock, Option<Arc<Servers>>);

/// A new run: resolve the specs, create the folder, write `config.json`.
fn create_run(args: &Args) -> anyhow::Result<Opened> {
    let found = envspec::find_specs(&args.paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    if found.is_empty() {
        bail!("no spec files (*.yaml, *.yml) found in {}", join_paths(&args.paths));
    }
    let mut specs = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for path in &found {
        let path = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
        let spec = envspec::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        if names.contains(&spec.name) {
            bail!("{}: a second spec named {:?}; spec names must be unique within a run", path.display(), spec.name);
        }
        names.push(spec.name.clone());
        let seeds = args.seeds.clone().unwrap_or_else(|| spec.dataset.seeds.clone());
        if seeds.is_empty() {
            bail!("{}: no seeds to run (the spec's dataset.seeds is empty and --seeds was not given)", path.display());
        }
        let steps = match args.steps.map(u64::from).or(spec.training.steps) {
            None => DEFAULT_STEPS,
            Some(0) => bail!("{}: the step budget must be at least 1", path.display()),
            Some(n) => u32::try_from(n).with_context(|| format!("{}: {n} steps is too many", path.display()))?,
        };
        // The file the environment runs on besides the spec: its data, or its game.
        let data = match spec.kind.game() {
            Some(game) => Some(digest(&game.module)?),
            None => spec.dataset.source.path().map(digest).transpose()?,
        };
        let entry = SpecEntry { name: spec.name.clone(), seeds, steps, sampling: None, file: digest(&path)?, data };
        specs.push((spec, entry));
    }
    let abs = |p: &Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
        p.as_ref().map(|p| std::fs::canonicalize(p).with_context(|| format!("{}: not found", p.display()))).transpose()
    };
    let config = RunConfig {
        specs: specs.iter().map(|(_, e)| e.file.path.clone()).collect(),
        algo: resolve_algorithm(args.algo, &specs)?,
        steps: args.steps,
        seeds: args.seeds.clone(),
        policy: args.policy,
        actions: abs(&args.actions)?,
        model: abs(&args.model.path)?,
        device: args.model.device.clone(),
        generation_weights: Some(
            args.model.generation_weights()?.unwrap_or(trainer::GenerationWeights::Quantized).name().to_string(),
        ),
        activation_checkpointing: args.model.activation_checkpointing,
        workers: args.workers,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        sampling_seed: args.sampling_seed,
        batch_size: args.batch_size,
        train: args.train.clone(),
        remote: args.remote.clone().unwrap_or_default(),
    };
    // Check the training configuration before anything is written.
    let trainer = if config.algo.trains() {
        if config.policy != PolicyKind::Llm {
            bail!("--algo {} trains a language model; it cannot learn with --policy scripted", config.algo.name());
        }
        let refs: Vec<&envspec::Spec> = specs.iter().map(|(s, _)| s).collect();
        let env_steps = specs.iter().map(|(_, e)| u64::from(e.steps) * e.seeds.len() as u64).sum();
        let (trainer_config, schedule) = train_config(&config, &refs, env_steps)?;
        Some(describe_trainer(&trainer_config, &schedule))
    } else {
        let f = &config.train;
        if f.beta.is_some()
            || f.gamma.is_some()
            || f.lr.is_some()
            || f.polyak.is_some()
            || f.q_readout.is_some()
            || f.update_every.is_some()
            || f.checkpoint_every.is_some()
            || f.disc
            || !f.set.is_empty()
        {
            bail!(
                "training hyper-parameters (--beta, --gamma, --lr, ...) need a training --algo (etpo, ppo-kl or grpo)"
            );
        }
        None
    };
    // The servers are checked before anything is written.
    let servers = if config.remote.is_empty() {
        None
    } else {
        let refs: Vec<(&envspec::Spec, &SpecEntry)> = specs.iter().map(|(s, e)| (s, e)).collect();
        Some(connect(&config, &refs)?)
    };
    // Record the sampling parameters each spec's actions will be drawn with.
    let sampling = sampling_config(&config);
    let specs: Vec<SpecEntry> = specs
        .into_iter()
        .map(|(spec, entry)| SpecEntry {
            sampling: (config.policy == PolicyKind::Llm).then(|| sampling.resolve(&spec)),
            ..entry
        })
        .collect();
    let model = match config.policy {
        PolicyKind::Llm => model_digest(&config.model.clone().unwrap_or_else(trainer::default_model_path))?,
        PolicyKind::Scripted => Vec::new(),
    };
    let actions = match &config.actions {
        Some(dir) if config.policy == PolicyKind::Scripted => folder_digests(dir)?,
        _ => Vec::new(),
    };
    let now = std::time::SystemTime::now();
    let dir = match &args.out {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
                bail!("{} already exists and is not empty; give a new --out, or --resume it", dir.display());
            }
            dir.clone()
        }
        None => unique_dir(&Path::new("runs").join(format!("{}-{}", utc_timestamp(now, false), config.algo.name()))),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = RunLock::acquire(&dir)?;
    let manifest = Manifest {
        etpo_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(),
        created_utc: utc_timestamp(now, true),
        command_line: std::env::args().collect(),
        config,
        specs,
        model,
        actions,
        python_versions: python_versions(&runtime::default_python()),
        python: runtime::default_python(),
        resumed: Vec::new(),
        trainer,
    };
    write_json(&dir.join("config.json"), &manifest)?;
    Ok((dir, manifest, Vec::new(), lock, servers))
}

/// An existing run: its recorded configuration, checked against the spec files as they are now,
/// and the steps it has already taken.
fn open_resumed(dir: &Path, args: &Args) -> anyhow::Result<Opened> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: not a run folder", dir.display()))?;
    let lock = RunLock::acquire(dir)?;
    let mut manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{}: not an etpo run configuration", path.display()))?;
    for spec in &manifest.specs {
        for then in std::iter::once(&spec.file).chain(&spec.data) {
            let now = digest(&then.path)?;
            if now.sha256 != then.sha256 || now.size_bytes != then.size_bytes {
                bail!(
                    "{} changed since the run started (sha256 {} then, {} now); resuming would mix two different environments",
                    then.path.display(),
                    then.sha256.as_deref().unwrap_or("?"),
                    now.sha256.as_deref().unwrap_or("?")
                );
            }
        }
    }
    if let Some(workers) = args.workers {
        manifest.config.workers = Some(workers);
    }
    if let Some(remote) = &args.remote {
        manifest.config.remote = remote.clone();
    }
    manifest.config.device = args.model.device.clone();
    if let Some(w) = args.model.generation_weights()? {
        manifest.config.generation_weights = Some(w.name().to_string());
    }
    manifest.config.activation_checkpointing |= args.model.activation_checkpointing;
    let previous = read_steps(&dir.join("steps.jsonl"))?;
    Ok((dir.to_path_buf(), manifest, previous, lock, None))
}

/// The run's `etpo serve` servers (`--remote`), once each live one is checked to serve every spec
/// in the version this run has (name, kind, max_steps, seeds, prompt format, and the sha256 of
/// the spec file and of its data file or game module) and the specs are checked to need nothing
/// a server cannot give.
fn connect(config: &RunConfig, specs: &[(&envspec::Spec, &SpecEntry)]) -> anyhow::Result<Arc<Servers>> {
    let counts_tokens = config.policy == PolicyKind::Llm || config.algo.trains();
    for (spec, _) in specs {
        if let Some(why) = remote::unsupported(spec, counts_tokens, config.train.one_step) {
            bail!("--remote: {why}");
        }
    }
    let servers = Servers::new(&config.remote)?;
    let expected: Vec<ExpectedSpec<'_>> = specs
        .iter()
        .map(|(spec, entry)| ExpectedSpec {
            spec,
            sha256: entry.file.sha256.as_deref(),
            data_sha256: entry.data.as_ref().and_then(|d| d.sha256.as_deref()),
        })
        .collect();
    servers.check_specs(&expected)?;
    Ok(servers)
}

/// The budget when neither `--steps` nor the spec's `training.steps` sets one.
const DEFAULT_STEPS: u32 = 10;

/// The run's algorithm: `--algo`, else the one the specs pin with `training.algorithm` (they
/// must agree), else Reflection.
fn resolve_algorithm(cli: Option<Algorithm>, specs: &[(envspec::Spec, SpecEntry)]) -> anyhow::Result<Algorithm> {
    if let Some(a) = cli {
        return Ok(a);
    }
    let mut pinned: Option<(Algorithm, &Path)> = None;
    for (spec, entry) in specs {
        let Some(a) = spec.training.algorithm else { continue };
        match pinned {
            Some((b, first)) if b != a => bail!(
                "{} pins training.algorithm {} but {} pins {}; one run has one algorithm: choose it with --algo",
                first.display(),
                b.name(),
                entry.file.path.display(),
                a.name()
            ),
            Some(_) => {}
            None => pinned = Some((a, &entry.file.path)),
        }
    }
    Ok(pinned.map_or(Algorithm::Reflection, |(a, _)| a))
}

/// Environment steps per update when neither `--update-every` nor `training.batch_size` sets it
/// (16: the batch ETPO's defaults were chosen with, README "ETPO").
const DEFAULT_UPDATE_EVERY: usize = 16;

/// The trainer's keys of the specs' `training:` blocks, which must agree between the specs of a
/// run (one model is trained on all of them).
fn training_block(specs: &[&envspec::Spec]) -> anyhow::Result<envspec::TrainingOverrides> {
    let keys = |s: &envspec::Spec| {
        let t = &s.training;
        envspec::TrainingOverrides {
            batch_size: t.batch_size,
            lr: t.lr,
            beta: t.beta,
            gamma: t.gamma,
            polyak: t.polyak,
            lora_rank: t.lora_rank,
            lora_alpha: t.lora_alpha,
            epochs: t.epochs,
            grad_clip: t.grad_clip,
            clip_eps: t.clip_eps,
            ..Default::default()
        }
    };
    let Some(first) = specs.first() else { return Ok(envspec::TrainingOverrides::default()) };
    let block = keys(first);
    for s in &specs[1..] {
        if keys(s) != block {
            bail!(
                "{} and {} set different training hyper-parameters (`training:`), but one model is trained on \
                 both; run them separately or set the values on the command line",
                first.path.display(),
                s.path.display()
            );
        }
    }
    Ok(block)
}

/// The trainer's hyper-parameters, resolved in this one place: the command line's flags over the
/// specs' `training:` block over the trainer's defaults; then `--set KEY=VALUE` over all of them.
/// `env_steps`, the run's whole budget (steps × seeds over the specs), sets the number of updates
/// ETPO's schedules (trust region, β) span.
fn train_config(
    config: &RunConfig,
    specs: &[&envspec::Spec],
    env_steps: u64,
) -> anyhow::Result<(TrainerConfig, TrainSchedule)> {
    let f = &config.train;
    let flags = envspec::TrainingOverrides {
        lr: f.lr,
        beta: f.beta,
        gamma: f.gamma,
        polyak: f.polyak,
        batch_size: f.update_every,
        ..Default::default()
    };
    let t = flags.or(&training_block(specs)?);
    let update_every = t.batch_size.unwrap_or(DEFAULT_UPDATE_EVERY);
    let trainer_config = match config.algo {
        Algorithm::Etpo => {
            let mut c = trainer::etpo::EtpoConfig::default();
            c.apply_spec(&t);
            c.q_readout = f.q_readout.unwrap_or(c.q_readout);
            c.discount_inside_actions = f.disc;
            c.single_step = f.one_step;
            c.seed = config.sampling_seed;
            c.planned_updates = Some((env_steps / update_every.max(1) as u64).max(1));
            apply_sets(&f.set, "etpo", |k, v| c.set(k, v))?;
            c.validate().map_err(|e| anyhow::anyhow!("--algo etpo: {e}"))?;
            TrainerConfig::Etpo(c)
        }
        Algorithm::PpoKl => {
            if f.polyak.is_some() || f.q_readout.is_some() || f.disc {
                bail!("--polyak, --q-readout and --disc are ETPO's; --algo ppo-kl has no Q-network");
            }
            let mut c = trainer::ppo::PpoConfig::default();
            c.apply_spec(&t);
            c.seed = config.sampling_seed;
            apply_sets(&f.set, "ppo-kl", |k, v| c.set(k, v))?;
            c.validate().map_err(|e| anyhow::anyhow!("--algo ppo-kl: {e}"))?;
            TrainerConfig::PpoKl(c)
        }
        Algorithm::Grpo => {
            if f.polyak.is_some() || f.q_readout.is_some() || f.disc {
                bail!("--polyak, --q-readout and --disc are ETPO's; --algo grpo has no Q-network");
            }
            let mut c = trainer::grpo::GrpoConfig::default();
            c.apply_spec(&t);
            c.seed = config.sampling_seed;
            apply_sets(&f.set, "grpo", |k, v| c.set(k, v))?;
            c.validate().map_err(|e| anyhow::anyhow!("--algo grpo: {e}"))?;
            TrainerConfig::Grpo(c)
        }
        Algorithm::Reflection => bail!("--algo reflection does not train"),
    };
    let schedule = TrainSchedule { update_every, checkpoint_every: f.checkpoint_every.unwrap_or(1) };
    if schedule.update_every == 0 || schedule.checkpoint_every == 0 {
        bail!("--update-every and --checkpoint-every must be at least 1");
    }
    Ok((trainer_config, schedule))
}

/// The resolved trainer configuration as `config.json` records it.
fn describe_trainer(trainer: &TrainerConfig, schedule: &TrainSchedule) -> serde_json::Value {
    let hyper = match trainer {
        TrainerConfig::Etpo(c) => serde_json::to_value(c),
        TrainerConfig::PpoKl(c) => serde_json::to_value(c),
        TrainerConfig::Grpo(c) => serde_json::to_value(c),
    }
    .unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "hyper_parameters": hyper,
        "update_every": schedule.update_every,
        "checkpoint_every": schedule.checkpoint_every,
    })
}

/// The weights a run samples with (see [`RunConfig::generation_weights`]).
fn generation_weights(config: &RunConfig) -> anyhow::Result<trainer::GenerationWeights> {
    match &config.generation_weights {
        Some(w) => Ok(trainer::GenerationWeights::parse(w).context("generation_weights")?),
        None => Ok(trainer::GenerationWeights::Exact),
    }
}

fn sampling_config(config: &RunConfig) -> SamplingConfig {
    SamplingConfig {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
        seed: config.sampling_seed,
        max_batch: config.batch_size.max(1),
    }
}

fn write_summaries(
    dir: &Path,
    stats: &[SpecStats],
    tests: &[experiment::held_out::TestScore],
    algo: &str,
) -> anyhow::Result<()> {
    use experiment::held_out;
    summary::write_atomic(&dir.join("summary.csv"), summary::to_csv(stats).as_bytes())?;
    let md = summary::to_markdown(stats, algo) + &held_out::to_markdown(tests);
    summary::write_atomic(&dir.join("summary.md"), md.as_bytes())?;
    if !tests.is_empty() {
        summary::write_atomic(&dir.join("test.csv"), held_out::to_csv(tests).as_bytes())?;
    }
    // A figure that cannot be drawn (no usable font, say) must not cost the run its tables.
    if let Err(e) = plot::best_reward_png(&dir.join("best_reward.png"), stats) {
        eprintln!("warning: {e}");
    }
    Ok(())
}

/// One progress bar per spec: steps done over all its seeds, best reward (mean over seeds),
/// runnable rate and mean reward, time left.
struct Bars {
    _multi: MultiProgress,
    bars: Vec<ProgressBar>,
}

impl Bars {
    fn new(stats: &[SpecStats], hidden: bool) -> Bars {
        let multi = MultiProgress::new();
        if hidden {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        let style = ProgressStyle::with_template("{prefix:>20.bold} [{bar:25}] {pos}/{len} {msg} (ETA {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let width = stats.iter().map(|s| s.spec.len()).max().unwrap_or(0).min(20);
        let bars = stats
            .iter()
            .map(|s| {
                let bar = multi.add(ProgressBar::new(u64::from(s.k) * s.seeds.len() as u64));
                bar.set_style(style.clone());
                bar.set_prefix(truncate(&s.spec, width));
                bar.set_position(u64::from(s.steps()));
                bar.reset_eta();
                bar.set_message(bar_message(s));
                bar
            })
            .collect();
        Bars { _multi: multi, bars }
    }

    fn finish(&self) {
        for bar in &self.bars {
            bar.finish();
        }
    }
}

impl Observer for Bars {
    fn on_step(&mut self, task: usize, _record: &StepRecord, stats: &SpecStats) {
        if let Some(bar) = self.bars.get(task) {
            bar.inc(1);
            bar.set_message(bar_message(stats));
        }
    }
}

fn bar_message(s: &SpecStats) -> String {
    let f = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.3}"));
    format!(
        "best {} | ran {} | mean {}",
        f(s.best_mean_std().map(|m| m.0)),
        s.runnable_rate().map_or_else(|| "–".to_string(), |r| format!("{:.0}%", r * 100.0)),
        f(s.mean_reward())
    )
}

fn truncate(s: &str, width: usize) -> String {
    s.chars().take(width).collect()
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    summary::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// `base`, or `base-2`, `base-3`... whichever does not exist yet.
fn unique_dir(base: &Path) -> PathBuf {
    let mut dir = base.to_path_buf();
    let mut n = 2;
    while dir.exists() {
        dir = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    dir
}

/// A GGUF file, or every file of a Hugging Face folder.
fn model_digest(path: &Path) -> anyhow::Result<Vec<FileDigest>> {
    if !path.exists() {
        bail!(
            "model {} not found (the default model is installed by `scripts/setup.sh model`; or give --model)",
            path.display()
        );
    }
    if path.is_dir() {
        return Ok(folder_digests(path)?);
    }
    Ok(vec![digest(path)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(algo: Algorithm, train: TrainFlags) -> RunConfig {
        RunConfig {
            specs: Vec::new(),
            algo,
            steps: None,
            seeds: None,
            policy: PolicyKind::Llm,
            actions: None,
            model: None,
            device: "cpu".into(),
            generation_weights: Some("quantized".into()),
            activation_checkpointing: false,
            workers: None,
            temperature: None,
            top_k: None,
            top_p: None,
            sampling_seed: 7,
            batch_size: 16,
            train,
            remote: Vec::new(),
        }
    }

    #[test]
    fn a_run_from_before_quantised_generation_resumes_sampling_with_f32_weights() {
        let new = config(Algorithm::Reflection, TrainFlags::default());
        assert_eq!(generation_weights(&new).unwrap(), trainer::GenerationWeights::Quantized);
        let mut json = serde_json::to_value(&new).unwrap();
        json.as_object_mut().unwrap().remove("generation_weights");
        let old: RunConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.generation_weights, None);
        assert_eq!(generation_weights(&old).unwrap(), trainer::GenerationWeights::Exact);
        let bad = RunConfig { generation_weights: Some("int3".into()), ..new };
        assert!(format!("{:#}", generation_weights(&bad).unwrap_err()).contains("expected f32 or quantized"));
    }

    #[test]
    fn hyper_parameters_come_from_the_command_line_then_the_specs_then_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("envs/balance_scale.yaml");
        let mut a = envspec::load(&path).unwrap_or_else(|e| panic!("{e}"));
        a.training =
            envspec::TrainingOverrides { beta: Some(0.2), gamma: Some(0.5), batch_size: Some(3), ..Default::default() };
        let mut b = a.clone();
        // Sampling keys may differ between specs; the trainer's may not.
        b.training.temperature = Some(0.9);
        let flags = TrainFlags { beta: Some(0.05), disc: true, ..Default::default() };
        let (t, schedule) = train_config(&config(Algorithm::Etpo, flags), &[&a, &b], 256).unwrap();
        let TrainerConfig::Etpo(c) = t else { panic!("{t:?}") };
        assert_eq!((c.beta, c.gamma, c.polyak, c.seed), (0.05, 0.5, 0.5, 7));
        // 256 steps in updates of 3: ETPO's schedules span 85 updates.
        assert_eq!(c.planned_updates, Some(85));
        assert!(c.discount_inside_actions);
        assert_eq!((schedule.update_every, schedule.checkpoint_every), (3, 1));

        let (_, schedule) = train_config(&config(Algorithm::PpoKl, TrainFlags::default()), &[], 256).unwrap();
        assert_eq!(schedule.update_every, DEFAULT_UPDATE_EVERY);
        b.training.beta = Some(0.3);
        let e = train_config(&config(Algorithm::Etpo, TrainFlags::default()), &[&a, &b], 256).unwrap_err();
        assert!(e.to_string().contains("different training hyper-parameters"), "{e}");
        let flags = TrainFlags { q_readout: Some(trainer::etpo::QReadout::Logits), ..Default::default() };
        assert!(train_config(&config(Algorithm::PpoKl, flags), &[&a], 256)
            .unwrap_err()
            .to_string()
            .contains("--q-readout"));
        let flags = TrainFlags { gamma: Some(1.5), ..Default::default() };
        assert!(train_config(&config(Algorithm::Etpo, flags), &[&a], 256).unwrap_err().to_string().contains("gamma"));
        // --set reaches every key of the trainer's configuration, last.
        let flags = TrainFlags {
            set: vec!["q_epochs=3".into(), "q_optim.lr=0.002".into()],
            lr: Some(0.5),
            ..Default::default()
        };
        let (t, _) = train_config(&config(Algorithm::Etpo, flags), &[&a], 256).unwrap();
        let TrainerConfig::Etpo(c) = t else { panic!("{t:?}") };
        assert_eq!((c.q_epochs, c.q_optim.lr, c.policy_optim.lr), (3, 0.002, 0.5), "--set wins over --lr");
        let flags = TrainFlags { set: vec!["gae_lambda=0.5".into()], ..Default::default() };
        let (t, _) = train_config(&config(Algorithm::PpoKl, flags), &[&a], 256).unwrap();
        let TrainerConfig::PpoKl(c) = t else { panic!("{t:?}") };
        assert_eq!(c.gae_lambda, 0.5);
        for bad in ["q_epoch=3", "q_epochs", "q_epochs=0"] {
            let flags = TrainFlags { set: vec![bad.into()], ..Default::default() };
            let e = train_config(&config(Algorithm::Etpo, flags), &[&a], 256).unwrap_err().to_string();
            assert!(e.contains("--set") || e.contains("q_epochs"), "{bad}: {e}");
        }
    }
}
