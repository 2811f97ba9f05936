//! `etpo experiment`: the paper's protocol in one command. Every spec × algorithm × seed is one
//! `etpo run` with the same budget in environment steps (each seed its own run, so a trained
//! model sees one seed's data), in a folder of its own under `DIR/runs/`; then the results
//! folder gets the paper's Table 2 (best reward within k, mean ± std over seeds, the best
//! marked), Figure 3 (best reward against steps, one line per algorithm) and Figure 4 (batch
//! reward per update of the training algorithms), per spec, and `results.csv` / `results.md`.
//!
//! Killed at any moment and started again with the same command, it skips the runs that used
//! their budget, resumes (`etpo run --resume`) the one that was cut, and starts the others: no
//! run is repeated or lost. While it runs, one bar counts the experiment's environment steps and
//! one the run in flight ([`progress`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use envspec::Algorithm;
use etpo::experiment::summary::{mean_std, stats_from_records, write_atomic, SpecStats};
use etpo::experiment::trained::{batch_reward_png, read_metrics, MetricsRecord, METRICS};
use etpo::experiment::{plot, read_steps};
use serde::Serialize;

use crate::commands::model_args::ModelArgs;

mod progress;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files, or folders whose *.yaml / *.yml files are all run.
    #[arg(required_unless_present = "grid")]
    paths: Vec<PathBuf>,
    /// The grid from a YAML file: any of `specs` (paths relative to the file), `algos`,
    /// `seeds`, `steps`, `update_every`, `set` (a mapping), `model`, `workers`, `out`; options
    /// given on the command line take precedence.
    #[arg(long, value_name = "FILE")]
    grid: Option<PathBuf>,
    /// The algorithms to compare (reflection, etpo, ppo-kl, grpo, and ETPO's ablations of the
    /// paper's Appendix G: etpo-disc, discounted inside actions; etpo-1step, episodes of one
    /// step) [default: reflection,etpo,ppo-kl,grpo]
    #[arg(long, value_delimiter = ',')]
    algos: Option<Vec<String>>,
    /// Data split seeds; each is a run of its own [default: 0,1,2]
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Environment steps per run, the paper's k (default: the spec's `training.steps`, else 10).
    #[arg(long)]
    steps: Option<u32>,
    /// The results folder, created or continued when it exists [default: experiment]
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Passed to the training runs: environment steps per update.
    #[arg(long)]
    update_every: Option<usize>,
    /// Passed to the training runs: `--set KEY=VALUE` (repeatable; keys one trainer lacks are
    /// an error of that run).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Sandbox workers per run (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Text files for the paper's Table 3: the perplexity of the base model and of each trained
    /// run's policy adapter on them (`etpo perplexity`), in `results.md` and `perplexity.csv`.
    #[arg(long, value_delimiter = ',', value_name = "FILE")]
    perplexity: Vec<PathBuf>,
    /// No progress bars (the runs' messages are still printed).
    #[arg(long)]
    no_progress: bool,
}

/// The grid, resolved: the command line's values over the grid file's over the defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Grid {
    paths: Vec<PathBuf>,
    algos: Vec<String>,
    seeds: Vec<u64>,
    steps: Option<u32>,
    out: PathBuf,
    model: Option<PathBuf>,
    device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_weights: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    activation_checkpointing: bool,
    update_every: Option<usize>,
    set: Vec<String>,
    workers: Option<usize>,
    perplexity: Vec<PathBuf>,
    /// The grid file, if any.
    grid: Option<PathBuf>,
}

/// The keys of a grid file.
const GRID_KEYS: [&str; 10] =
    ["specs", "algos", "seeds", "steps", "update_every", "set", "model", "workers", "out", "perplexity"];

impl Grid {
    fn resolve(args: Args) -> anyhow::Result<Grid> {
        let generation_weights = args.model.generation_weights()?.map(|w| w.name().to_string());
        let mut grid = Grid {
            paths: args.paths,
            algos: args.algos.unwrap_or_default(),
            seeds: args.seeds.unwrap_or_default(),
            steps: args.steps,
            out: args.out.unwrap_or_default(),
            model: args.model.path,
            device: args.model.device,
            generation_weights,
            activation_checkpointing: args.model.activation_checkpointing,
            update_every: args.update_every,
            set: args.set,
            workers: args.workers,
            perplexity: args.perplexity,
            grid: args.grid.clone(),
        };
        if let Some(file) = &args.grid {
            grid.fill_from(file)?;
        }
        if grid.algos.is_empty() {
            grid.algos = ["reflection", "etpo", "ppo-kl", "grpo"].map(String::from).to_vec();
        }
        if grid.seeds.is_empty() {
            grid.seeds = vec![0, 1, 2];
        }
        if grid.out.as_os_str().is_empty() {
            grid.out = PathBuf::from("experiment");
        }
        Ok(grid)
    }

    /// Fills what the command line left unset from the grid file `file`.
    fn fill_from(&mut self, file: &Path) -> anyhow::Result<()> {
        let entries = envspec::plain::read_mapping(file, &GRID_KEYS).map_err(|e| anyhow::anyhow!("{e}"))?;
        let base = file.parent().unwrap_or(Path::new(""));
        for e in entries {
            let at = format!("{}:{}:{}", file.display(), e.pos.line, e.pos.col);
            let bad = |what: &str| anyhow::anyhow!("{at}: error: `{}` must be {what}, found {}", e.key, e.value);
            let paths = |v: &serde_json::Value| -> Option<Vec<PathBuf>> {
                v.as_array()?.iter().map(|p| p.as_str().map(|p| base.join(p))).collect()
            };
            match e.key.as_str() {
                "specs" if self.paths.is_empty() => {
                    self.paths = paths(&e.value).ok_or_else(|| bad("a list of spec files or folders"))?
                }
                "algos" if self.algos.is_empty() => {
                    self.algos =
                        serde_json::from_value(e.value.clone()).map_err(|_| bad("a list of algorithm names"))?
                }
                "seeds" if self.seeds.is_empty() => {
                    self.seeds = serde_json::from_value(e.value.clone()).map_err(|_| bad("a list of seeds"))?
                }
                "steps" if self.steps.is_none() => {
                    self.steps = Some(serde_json::from_value(e.value.clone()).map_err(|_| bad("a number of steps"))?)
                }
                "update_every" if self.update_every.is_none() => {
                    self.update_every =
                        Some(serde_json::from_value(e.value.clone()).map_err(|_| bad("a number of steps"))?)
                }
                "workers" if self.workers.is_none() => {
                    self.workers = Some(serde_json::from_value(e.value.clone()).map_err(|_| bad("a number"))?)
                }
                "model" if self.model.is_none() => {
                    self.model = Some(base.join(e.value.as_str().ok_or_else(|| bad("a path"))?))
                }
                "perplexity" if self.perplexity.is_empty() => {
                    self.perplexity = paths(&e.value).ok_or_else(|| bad("a list of text files"))?
                }
                "out" if self.out.as_os_str().is_empty() => {
                    self.out = base.join(e.value.as_str().ok_or_else(|| bad("a path"))?)
                }
                "set" => {
                    // The command line's --set come after the file's, so they win.
                    let map = e.value.as_object().ok_or_else(|| bad("a mapping of hyper-parameters"))?;
                    let mut from_file: Vec<String> = map
                        .iter()
                        .map(|(k, v)| match v {
                            serde_json::Value::String(s) => format!("{k}={s}"),
                            v => format!("{k}={v}"),
                        })
                        .collect();
                    from_file.append(&mut self.set);
                    self.set = from_file;
                }
                _ => {} // given on the command line
            }
        }
        if self.paths.is_empty() {
            bail!("{}: no specs: give `specs:` in the file or spec paths on the command line", file.display());
        }
        Ok(())
    }
}

/// One column of the comparison: an algorithm, or one of ETPO's ablations (the paper's
/// Appendix G), which is `etpo run --algo etpo` with a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Arm {
    name: &'static str,
    algo: Algorithm,
    flag: Option<&'static str>,
}

const ABLATIONS: [Arm; 2] = [
    Arm { name: "etpo-disc", algo: Algorithm::Etpo, flag: Some("--disc") },
    Arm { name: "etpo-1step", algo: Algorithm::Etpo, flag: Some("--one-step") },
];

impl Arm {
    fn from_name(name: &str) -> Option<Arm> {
        match Algorithm::from_name(name) {
            Some(algo) => Some(Arm { name: algo.name(), algo, flag: None }),
            None => ABLATIONS.iter().find(|a| a.name == name).copied(),
        }
    }

    fn trains(self) -> bool {
        self.algo.trains()
    }
}

/// One run of the grid.
struct Cell {
    spec: PathBuf,
    name: String,
    algo: Arm,
    seed: u64,
    dir: PathBuf,
    steps: u32,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let no_progress = args.no_progress;
    let args = Grid::resolve(args)?;
    let algos = parse_algos(&args.algos)?;
    if args.seeds.is_empty() {
        bail!("--seeds is empty");
    }
    let specs = envspec::find_specs(&args.paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    if specs.is_empty() {
        bail!("no spec files (*.yaml, *.yml) found");
    }
    let mut cells = Vec::new();
    let mut names: Vec<(String, u32)> = Vec::new();
    for path in &specs {
        let spec = envspec::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        if names.iter().any(|(n, _)| *n == spec.name) {
            bail!("{}: a second spec named {:?}; spec names must be unique", path.display(), spec.name);
        }
        let steps = match args.steps.map(u64::from).or(spec.training.steps).unwrap_or(10) {
            0 => bail!("{}: the step budget must be at least 1", path.display()),
            n => u32::try_from(n).with_context(|| format!("{}: {n} steps is too many", path.display()))?,
        };
        names.push((spec.name.clone(), steps));
        for &algo in &algos {
            for &seed in &args.seeds {
                let dir = args.out.join("runs").join(&spec.name).join(algo.name).join(format!("seed{seed}"));
                cells.push(Cell { spec: path.clone(), name: spec.name.clone(), algo, seed, dir, steps });
            }
        }
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    write_config(&args, &algos)?;

    let exe = std::env::current_exe().context("locating the etpo binary")?;
    let mut logged_steps = Vec::with_capacity(cells.len());
    for cell in &cells {
        logged_steps.push(read_steps(&cell.dir.join("steps.jsonl"))?.len());
    }
    let total = cells.iter().map(|c| u64::from(c.steps)).sum();
    let done = cells.iter().zip(&logged_steps).map(|(c, &n)| (n as u64).min(u64::from(c.steps))).sum();
    let progress = progress::Progress::new(total, done, no_progress);
    for (i, (cell, &logged)) in cells.iter().zip(&logged_steps).enumerate() {
        let label = format!("[{}/{}] {} {} seed {}", i + 1, cells.len(), cell.name, cell.algo.name, cell.seed);
        if logged >= cell.steps as usize {
            progress.say(&format!("{label}: done ({logged} steps)"));
            continue;
        }
        let mut cmd = Command::new(&exe);
        end_with_this_process(&mut cmd);
        if cell.dir.join("config.json").is_file() {
            progress.say(&format!("{label}: resuming after {logged} steps"));
            cmd.args(["run", "--resume"]).arg(&cell.dir).args(["--device", &args.device]);
            cmd.args(args.generation_weights.iter().flat_map(|w| ["--generation-weights", w]));
            cmd.args(args.activation_checkpointing.then_some("--activation-checkpointing"));
        } else {
            progress.say(&format!("{label}: starting"));
            cmd.arg("run").arg(&cell.spec).args(["--algo", cell.algo.algo.name()]);
            cmd.args(cell.algo.flag);
            cmd.args(["--seeds", &cell.seed.to_string(), "--steps", &cell.steps.to_string()]);
            cmd.arg("--out").arg(&cell.dir).args(["--device", &args.device]);
            cmd.args(args.generation_weights.iter().flat_map(|w| ["--generation-weights", w]));
            cmd.args(args.activation_checkpointing.then_some("--activation-checkpointing"));
            if let Some(m) = &args.model {
                cmd.arg("--model").arg(m);
            }
            if cell.algo.trains() {
                if let Some(n) = args.update_every {
                    cmd.args(["--update-every", &n.to_string()]);
                }
                for kv in &args.set {
                    cmd.args(["--set", kv]);
                }
            }
        }
        if let Some(w) = args.workers {
            cmd.args(["--workers", &w.to_string()]);
        }
        if let Some(parent) = cell.dir.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let status = progress
            .run(&label, &mut cmd, &cell.dir.join("steps.jsonl"), u64::from(cell.steps))
            .context("starting etpo run")?;
        if !status.success() {
            progress.finish();
            bail!(
                "{label} failed ({status}); its folder is {}; run the same command again to resume",
                cell.dir.display()
            );
        }
    }
    progress.finish();
    report(&args.out, &names, &algos, &args.seeds, &cells)?;
    if !args.perplexity.is_empty() {
        table_3(&args, &exe, &cells)?;
    }
    Ok(0)
}

fn parse_algos(names: &[String]) -> anyhow::Result<Vec<Arm>> {
    let mut out = Vec::new();
    for n in names {
        let Some(a) = Arm::from_name(n) else {
            let known: Vec<&str> =
                Algorithm::NAMES.iter().map(|(n, _)| *n).chain(ABLATIONS.iter().map(|a| a.name)).collect();
            bail!("--algos: unknown algorithm {n:?}; expected some of: {}", known.join(", "));
        };
        if out.contains(&a) {
            bail!("--algos names {n} twice");
        }
        out.push(a);
    }
    if out.is_empty() {
        bail!("--algos is empty");
    }
    Ok(out)
}

/// `config.json` of the results folder: the command line and the grid.
fn write_config(args: &Grid, algos: &[Arm]) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "command_line": std::env::args().collect::<Vec<_>>(),
        "paths": args.paths,
        "algos": algos.iter().map(|a| a.name).collect::<Vec<_>>(),
        "seeds": args.seeds,
        "steps": args.steps,
        "model": args.model,
        "device": args.device,
        "grid": args.grid,
        "update_every": args.update_every,
        "set": args.set,
        "perplexity": args.perplexity,
    });
    write_atomic(&args.out.join("config.json"), format!("{:#}\n", config).as_bytes())?;
    Ok(())
}

/// The statistics of one spec and algorithm over its seeds' runs.
fn stats_of(cells: &[&Cell], name: &str, seeds: &[u64], steps: u32) -> anyhow::Result<SpecStats> {
    let mut records = Vec::new();
    for cell in cells {
        records.extend(read_steps(&cell.dir.join("steps.jsonl"))?);
    }
    Ok(stats_from_records(&[(name.to_string(), seeds.to_vec(), steps)], &records).remove(0))
}

fn cell_text(v: Option<(f64, Option<f64>)>) -> String {
    match v {
        None => "–".into(),
        Some((m, Some(s))) => format!("{m:.4} ± {s:.4}"),
        Some((m, None)) => format!("{m:.4}"),
    }
}

/// `results.csv`, `results.md` and the figures.
fn report(out: &Path, names: &[(String, u32)], algos: &[Arm], seeds: &[u64], cells: &[Cell]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "spec,algo,seed,steps,best_reward,runnable_rate,mean_reward,first_quarter_reward,last_quarter_reward,test_of_best,test_gap,run\n",
    );
    let mut md = format!(
        "# etpo experiment\n\n`{}`\n\n## Table 2: best reward within k (mean ± std over seeds {})\n\nThe best reward is selected on the split that scores it, as in the paper: an optimistic score.\n\n| spec | k |",
        std::env::args().collect::<Vec<_>>().join(" "),
        seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    );
    for a in algos {
        md.push_str(&format!(" {} |", a.name));
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---|".repeat(algos.len()));
    let mut late = format!(
        "\n\n## Mean reward over the last quarter of each run's steps (mean ± std over seeds)\n\nWhat a policy does once trained, every action counted (a failed one is the spec's failure reward).\n\n| spec |{}\n|---|{}",
        algos.iter().map(|a| format!(" {} |", a.name)).collect::<String>(),
        "---|".repeat(algos.len())
    );
    let mut held_out = format!(
        "\n\n## Held-out test score of the best action (mean ± std over seeds)\n\nThe action of each run's best validation reward, scored once on the spec's test part (`dataset.test_fraction`), which no reward used; in brackets the mean gap, best validation reward − test score: how optimistic Table 2 is.\n\n| spec |{}\n|---|{}",
        algos.iter().map(|a| format!(" {} |", a.name)).collect::<String>(),
        "---|".repeat(algos.len())
    );
    let mut any_test = false;
    // Per spec, for the averaged figures: each algorithm's Figure 3 curve and its runs' metrics.
    let mut all_curves: Vec<Vec<plot::Curve>> = Vec::new();
    let mut all_training: Vec<(String, Vec<MetricsRecord>)> = Vec::new();
    for (name, steps) in names {
        let mut best_row = Vec::new();
        let mut late_row = Vec::new();
        let mut test_row = Vec::new();
        let mut curves: Vec<plot::Curve> = Vec::new();
        let mut training: Vec<(String, Vec<MetricsRecord>)> = Vec::new();
        for &algo in algos {
            let mine: Vec<&Cell> = cells.iter().filter(|c| c.name == *name && c.algo == algo).collect();
            let stats = stats_of(&mine, name, seeds, *steps)?;
            let window = stats.window_len();
            let mut lates = Vec::new();
            let (mut tests, mut gaps) = (Vec::new(), Vec::new());
            for (cell, seed) in mine.iter().zip(&stats.seeds) {
                let (test, gap) = test_of_best(&cell.dir, seed.seed).unzip();
                tests.extend(test);
                gaps.extend(gap);
                let first = seed_window(&stats, seed.seed, window, false);
                let last = seed_window(&stats, seed.seed, window, true);
                if let Some(l) = last {
                    lates.push(l);
                }
                let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
                csv.push_str(&format!(
                    "{name},{},{},{},{},{},{},{},{},{},{},{}\n",
                    algo.name,
                    seed.seed,
                    seed.steps,
                    f(seed.best()),
                    f(seed.runnable_rate()),
                    f(seed.mean_reward()),
                    f(first),
                    f(last),
                    f(test),
                    f(gap),
                    cell.dir.display()
                ));
                if algo.trains() {
                    let metrics = cell.dir.join(METRICS);
                    if metrics.is_file() {
                        let records = read_metrics(&metrics)?;
                        all_training.push((algo.name.to_string(), records.clone()));
                        training.push((format!("{} seed {}", algo.name, seed.seed), records));
                    }
                }
            }
            best_row.push(stats.best_mean_std());
            late_row.push(mean_std(&lates));
            any_test |= !tests.is_empty();
            test_row.push(mean_std(&tests).map(|t| (t, mean_std(&gaps).map_or(f64::NAN, |g| g.0))));
            curves.push((
                algo.name.to_string(),
                (1..=*steps as usize).filter_map(|t| stats.mean_best_at(t).map(|v| (t as u32, v))).collect(),
            ));
        }
        let top = best_row.iter().flatten().map(|(m, _)| *m).fold(f64::NEG_INFINITY, f64::max);
        md.push_str(&format!("\n| {name} | {steps} |"));
        for v in &best_row {
            let text = cell_text(*v);
            md.push_str(&match v {
                Some((m, _)) if *m == top => format!(" **{text}** |"),
                _ => format!(" {text} |"),
            });
        }
        late.push_str(&format!("\n| {name} |"));
        for v in &late_row {
            late.push_str(&format!(" {} |", cell_text(*v)));
        }
        held_out.push_str(&format!("\n| {name} |"));
        for v in &test_row {
            let text = match v {
                Some((test, gap)) => format!("{} ({gap:+.4})", cell_text(Some(*test))),
                None => cell_text(None),
            };
            held_out.push_str(&format!(" {text} |"));
        }
        let fig3 = out.join(format!("{name}_best_reward.png"));
        if let Err(e) = plot::curves_png(&fig3, &format!("{name}: best reward within k (mean over seeds)"), &curves) {
            eprintln!("warning: {e}");
        }
        all_curves.push(curves);
        training.retain(|(_, m)| !m.is_empty());
        if !training.is_empty() {
            if let Err(e) = batch_reward_png(&out.join(format!("{name}_batch_reward.png")), &training) {
                eprintln!("warning: {e}");
            }
        }
    }
    let averaged = names.len() > 1;
    if averaged {
        let fig3 = out.join("mean_best_reward.png");
        let title = "best reward within k, mean over specs and seeds";
        if let Err(e) = plot::curves_png(&fig3, title, &mean_curves(&all_curves)) {
            eprintln!("warning: {e}");
        }
        let per_update = mean_batch_reward(&all_training);
        if !per_update.is_empty() {
            if let Err(e) = batch_reward_png(&out.join("mean_batch_reward.png"), &per_update) {
                eprintln!("warning: {e}");
            }
        }
    }
    md.push_str(&late);
    if any_test {
        md.push_str(&held_out);
    }
    let spec_names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(table) = etpo::experiment::paper::markdown(&spec_names) {
        md.push_str(
            "

## The paper's Table 2 for the same data sets

",
        );
        md.push_str(&table);
    }
    md.push_str("\n\nFigures: `<spec>_best_reward.png` (Figure 3), `<spec>_batch_reward.png` (Figure 4)");
    if averaged {
        md.push_str(", and both averaged over the specs: `mean_best_reward.png`, `mean_batch_reward.png`");
    }
    md.push_str("; every run's folder is under `runs/`.\n");
    write_atomic(&out.join("results.csv"), csv.as_bytes())?;
    write_atomic(&out.join("results.md"), md.as_bytes())?;
    print!("{md}");
    eprintln!("wrote {}", out.join("results.md").display());
    Ok(())
}

/// Makes the kernel kill a child started with `cmd` when this process dies, however it dies
/// (`PR_SET_PDEATHSIG`): a killed experiment leaves no `etpo run` behind holding its folder's
/// lock, and the same command resumes at once. SIGKILL is safe because a run folder survives a
/// kill at any moment. (The signal follows the spawning thread: runs are spawned from the main
/// thread, which lives as long as the experiment.)
fn end_with_this_process(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure only calls prctl and getppid, which are
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The experiment died before the signal was armed: do not start an orphan.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// The paper's Table 3: `etpo perplexity FILES --adapter <run>/adapter` for every training run,
/// appended to `results.md`, and `perplexity.csv`.
fn table_3(args: &Grid, exe: &Path, cells: &[Cell]) -> anyhow::Result<()> {
    let mut csv = String::from("spec,algo,seed,file,tokens,base_ppl,adapter_ppl,ratio\n");
    let mut md = String::from(
        "\n## Table 3: perplexity of the base model and of each trained policy\n\nRL training should leave the language model intact: a ratio near 1.\n\n| spec | algo | seed | file | tokens | base | trained | ratio |\n|---|---|---|---|---|---|---|---|\n",
    );
    for cell in cells.iter().filter(|c| c.algo.trains()) {
        let adapter = cell.dir.join("adapter");
        if !adapter.is_dir() {
            eprintln!("{} {} seed {}: no adapter yet, left out of Table 3", cell.name, cell.algo.name, cell.seed);
            continue;
        }
        let mut cmd = Command::new(exe);
        end_with_this_process(&mut cmd);
        cmd.arg("perplexity").args(&args.perplexity).arg("--adapter").arg(&adapter).arg("--json");
        cmd.args(["--device", &args.device]);
        if let Some(m) = &args.model {
            cmd.arg("--model").arg(m);
        }
        let out = cmd.output().context("starting etpo perplexity")?;
        if !out.status.success() {
            bail!("etpo perplexity on {} failed: {}", adapter.display(), String::from_utf8_lossy(&out.stderr));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line).context("reading etpo perplexity's output")?;
            let (base, tuned) =
                (v["base_ppl"].as_f64().unwrap_or(f64::NAN), v["adapter_ppl"].as_f64().unwrap_or(f64::NAN));
            let (file, tokens) = (v["file"].as_str().unwrap_or(""), v["tokens"].as_u64().unwrap_or(0));
            let ratio = tuned / base;
            csv.push_str(&format!(
                "{},{},{},{file},{tokens},{base:.4},{tuned:.4},{ratio:.4}\n",
                cell.name, cell.algo.name, cell.seed
            ));
            md.push_str(&format!(
                "| {} | {} | {} | {file} | {tokens} | {base:.3} | {tuned:.3} | {ratio:.4} |\n",
                cell.name, cell.algo.name, cell.seed
            ));
        }
    }
    write_atomic(&args.out.join("perplexity.csv"), csv.as_bytes())?;
    let results = args.out.join("results.md");
    let mut text = std::fs::read_to_string(&results).with_context(|| format!("reading {}", results.display()))?;
    text.push_str(&md);
    write_atomic(&results, text.as_bytes())?;
    print!("{md}");
    Ok(())
}

/// A run's `test.csv` test score of `seed`'s best action and its gap (best validation reward −
/// test score), written when its spec holds out a test part.
fn test_of_best(run: &Path, seed: u64) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(run.join("test.csv")).ok()?;
    let seed = seed.to_string();
    let row =
        text.lines().skip(1).map(|l| l.split(',').collect::<Vec<_>>()).find(|c| c.get(1) == Some(&seed.as_str()))?;
    Some((row.get(4)?.parse().ok()?, row.get(5)?.parse().ok()?))
}

/// Figure 3 averaged over specs: per algorithm, the mean over specs of each spec's curve (itself
/// a mean over seeds), at the steps every spec reached.
fn mean_curves(per_spec: &[Vec<plot::Curve>]) -> Vec<plot::Curve> {
    let Some(first) = per_spec.first() else { return Vec::new() };
    first
        .iter()
        .map(|(algo, _)| {
            let curves: Vec<&Vec<(u32, f64)>> =
                per_spec.iter().filter_map(|spec| spec.iter().find(|(a, _)| a == algo).map(|(_, c)| c)).collect();
            let points = curves[0]
                .iter()
                .filter_map(|&(t, _)| {
                    let at: Vec<f64> = curves.iter().filter_map(|c| c.iter().find(|p| p.0 == t).map(|p| p.1)).collect();
                    (at.len() == curves.len()).then(|| (t, at.iter().sum::<f64>() / at.len() as f64))
                })
                .collect();
            (algo.clone(), points)
        })
        .collect()
}

/// Figure 4 averaged over specs and seeds: per training algorithm, the batch reward of update
/// `i` averaged over the runs that made `i` updates (at the first such run's step count).
fn mean_batch_reward(runs: &[(String, Vec<MetricsRecord>)]) -> Vec<(String, Vec<MetricsRecord>)> {
    let mut algos: Vec<&str> = Vec::new();
    for (algo, _) in runs {
        if !algos.contains(&algo.as_str()) {
            algos.push(algo);
        }
    }
    algos
        .into_iter()
        .map(|algo| {
            let mine: Vec<&Vec<MetricsRecord>> = runs.iter().filter(|(a, _)| a == algo).map(|(_, r)| r).collect();
            let updates = mine.iter().map(|r| r.len()).max().unwrap_or(0);
            let mean = (0..updates)
                .map(|i| {
                    let at: Vec<&MetricsRecord> = mine.iter().filter_map(|r| r.get(i)).collect();
                    let mut m = at[0].clone();
                    m.batch_reward = at.iter().map(|r| r.batch_reward).sum::<f64>() / at.len() as f64;
                    m
                })
                .collect();
            (algo.to_string(), mean)
        })
        .collect()
}

/// The mean reward of one seed's first or last `len` steps.
fn seed_window(stats: &SpecStats, seed: u64, len: usize, late: bool) -> Option<f64> {
    let picked = stats.seeds.iter().find(|s| s.seed == seed)?.window(len, late)?;
    Some(picked.iter().map(|(r, _)| r).sum::<f64>() / len as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cli: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("experiment").chain(cli.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
            .args
    }

    #[test]
    fn figure_3_averaged_over_specs_keeps_the_steps_every_spec_reached() {
        let c = |algo: &str, pts: &[(u32, f64)]| (algo.to_string(), pts.to_vec());
        let per_spec = vec![
            vec![c("etpo", &[(1, 0.5), (2, 0.7), (3, 0.9)]), c("grpo", &[(1, 0.1), (2, 0.3), (3, 0.3)])],
            vec![c("etpo", &[(1, 0.7), (2, 0.9)]), c("grpo", &[(1, 0.3), (2, 0.5)])],
        ];
        assert_eq!(mean_curves(&per_spec), vec![c("etpo", &[(1, 0.6), (2, 0.8)]), c("grpo", &[(1, 0.2), (2, 0.4)])]);
    }

    #[test]
    fn figure_4_averaged_over_runs_is_the_mean_batch_reward_of_each_update() {
        let m = |update: u64, r: f64| -> MetricsRecord {
            serde_json::from_value(serde_json::json!({"update": update, "env_steps": 8 * update, "q_loss": 0.0,
                "policy_loss": 0.0, "kl": 0.0, "entropy": 0.0, "batch_reward": r, "time_s": 1.0}))
            .unwrap()
        };
        let runs = vec![
            ("etpo".to_string(), vec![m(1, -1.0), m(2, 0.5)]),
            ("grpo".to_string(), vec![m(1, 0.25)]),
            ("etpo".to_string(), vec![m(1, 0.0), m(2, 0.75), m(3, 1.0)]),
        ];
        let got = mean_batch_reward(&runs);
        let rewards: Vec<(&str, Vec<(u64, f64)>)> =
            got.iter().map(|(a, r)| (a.as_str(), r.iter().map(|m| (m.env_steps, m.batch_reward)).collect())).collect();
        assert_eq!(rewards, vec![("etpo", vec![(8, -0.5), (16, 0.625), (24, 1.0)]), ("grpo", vec![(8, 0.25)])]);
    }

    #[test]
    fn a_grid_file_fills_what_the_command_line_leaves_unset() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("grid.yaml");
        std::fs::write(
            &file,
            "specs: [envs/a.yaml, envs]\nalgos: [reflection, etpo-disc]\nseeds: [3, 4]\nsteps: 64\nupdate_every: 16\nset:\n  beta: 0.3\n  q_readout: logits\nout: results\n",
        )
        .unwrap();
        let grid = file.to_str().unwrap();
        let g = Grid::resolve(args(&["--grid", grid, "--seeds", "7", "--set", "beta=0.5"])).unwrap();
        assert_eq!(g.paths, [dir.path().join("envs/a.yaml"), dir.path().join("envs")]);
        assert_eq!(g.algos, ["reflection", "etpo-disc"]);
        assert_eq!(g.seeds, [7], "the command line wins");
        assert_eq!((g.steps, g.update_every), (Some(64), Some(16)));
        assert_eq!(g.set, ["beta=0.3", "q_readout=logits", "beta=0.5"], "the command line's --set comes last and wins");
        assert_eq!(g.out, dir.path().join("results"));
        // Without a file: the defaults.
        let g = Grid::resolve(args(&["envs/x.yaml"])).unwrap();
        assert_eq!((g.algos.len(), g.seeds.clone(), g.out.clone()), (4, vec![0, 1, 2], PathBuf::from("experiment")));
        // A bad value is placed in the file.
        std::fs::write(&file, "specs: [a.yaml]\nseeds: zero\n").unwrap();
        let e = Grid::resolve(args(&["--grid", grid])).unwrap_err().to_string();
        assert_eq!(e, format!("{grid}:2:8: error: `seeds` must be a list of seeds, found \"zero\""));
        std::fs::write(&file, "seeds: [1]\n").unwrap();
        let e = Grid::resolve(args(&["--grid", grid])).unwrap_err().to_string();
        assert!(e.ends_with("no specs: give `specs:` in the file or spec paths on the command line"), "{e}");
    }
}
