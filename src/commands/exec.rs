//! `etpo exec SPEC FILE.py [--seed N] [--json]`: runs one action file against a spec's data in
//! the sandbox and prints the outcome, for debugging specs and actions.
//!
//! FILE.py is either a whole program that defines `build_model` (run as it is) or the text a model
//! generates after the prompt, which is cut and assembled exactly as during training
//! (`Spec::extract_action`, then `Spec::assemble_program`). The action is scored like the
//! environment scores it: ROC AUC on the validation rows of the seed's split (the mean over the
//! spec's evaluation splits), computed here, outside the sandbox; a failed action gets the spec's
//! failure reward.

use anyhow::Context;
use envspec::data::{Split, SplitMix64};
use envspec::Evaluation;
use runtime::metrics::{roc_auc, Multiclass};
use runtime::{Job, Limits, Pool, PoolConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The spec file (YAML).
    pub spec: PathBuf,
    /// The action: a program defining `build_model`, or raw generated text.
    pub file: PathBuf,
    /// Split seed (default: the spec's first seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object: reward, error, ran, wall_s, cpu_s, peak_rss_mb, kind, program.
    #[arg(long)]
    pub json: bool,
    /// The Python interpreter of the sandbox (default: $ETPO_PYTHON, else the repository's .venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let spec = envspec::load(&args.spec).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read the action file {}", args.file.display()))?;
    let (program, assembled) = if defines_build_model(&text) {
        (text, false)
    } else {
        let action = spec.extract_action(&text);
        let program = spec.assemble_program(&action).map_err(|e| anyhow::anyhow!("{}: {e}", spec.name))?;
        (program, true)
    };

    let base_dir = spec.path.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let dataset = envspec::data::load(&spec.dataset.source, &base_dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the data set: {e}", spec.path.display()))?;
    let seed = args.seed.or_else(|| spec.dataset.seeds.first().copied()).unwrap_or(0);
    let n_splits = match spec.reward.evaluation {
        Evaluation::SingleSplit => 1,
        Evaluation::MeanOfSplits(n) => n.max(1) as usize,
    };
    let splits: Vec<Split> = split_seeds(seed, n_splits)
        .into_iter()
        .map(|s| dataset.split(s, spec.dataset.max_samples, spec.dataset.train_fraction))
        .collect();
    let multiclass = match spec.reward.multiclass {
        envspec::Multiclass::Ovo => Multiclass::Ovo,
        envspec::Multiclass::Ovr => Multiclass::Ovr,
    };
    let l = &spec.limits;
    let limits = Limits { wall_s: l.wall_s, cpu_s: l.cpu_s, memory_mb: l.memory_mb, output_kb: l.output_kb, max_processes: l.max_processes };

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let python = args.python.clone().unwrap_or_else(runtime::default_python);
    let pool = Pool::new(PoolConfig { workers: splits.len().min(cores), python, limits })?;

    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = splits
            .iter()
            .map(|split| {
                let job = Job {
                    program: program.clone(),
                    x_train: split.x_train.clone(),
                    y_train: split.y_train.clone(),
                    x_val: split.x_val.clone(),
                    n_classes: split.n_classes(),
                    limits,
                };
                let pool = &pool;
                scope.spawn(move || pool.evaluate(&job))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("evaluation thread panicked")).collect::<Vec<_>>()
    });

    // Scores like the environment: the first failure (in split order) is the action's error.
    let mut report = Report { wall_s: 0.0, cpu_s: 0.0, peak_rss_mb: 0.0, error: None, kind: None, output: String::new() };
    let mut aucs = Vec::new();
    for (outcome, split) in outcomes.into_iter().zip(&splits) {
        let outcome = outcome.context("the sandbox failed (infrastructure fault)")?;
        report.wall_s = report.wall_s.max(outcome.wall_s);
        report.cpu_s += outcome.cpu_s;
        report.peak_rss_mb = report.peak_rss_mb.max(outcome.peak_rss_mb);
        if report.output.is_empty() {
            report.output = outcome.output;
        }
        if report.error.is_some() {
            continue;
        }
        match outcome.result {
            Ok(proba) => match roc_auc(&split.y_val, &proba, split.n_classes(), multiclass) {
                Ok(auc) => aucs.push(auc),
                Err(e) => report.error = Some(format!("the predictions could not be scored: {e}")),
            },
            Err(e) => {
                report.kind = Some(format!("{:?}", e.kind));
                report.error = Some(e.message);
            }
        }
    }
    let ran = report.error.is_none();
    let reward = if ran { aucs.iter().sum::<f64>() / aucs.len() as f64 } else { spec.reward.failure_reward };

    if args.json {
        let obj = serde_json::json!({
            "spec": spec.name,
            "seed": seed,
            "reward": reward,
            "ran": ran,
            "error": report.error,
            "kind": report.kind,
            "wall_s": report.wall_s,
            "cpu_s": report.cpu_s,
            "peak_rss_mb": report.peak_rss_mb,
            "assembled": assembled,
            "program": program,
            "output": report.output,
        });
        println!("{obj}");
    } else {
        if assembled {
            println!("program (assembled from the action as during training):");
            for line in program.lines() {
                println!("    {line}");
            }
        }
        if !report.output.is_empty() {
            println!("output:");
            for line in report.output.lines() {
                println!("    {line}");
            }
        }
        match &report.error {
            None => println!("ran: yes"),
            Some(e) => {
                println!("ran: no ({})", report.kind.as_deref().unwrap_or("error"));
                println!("error:");
                for line in e.lines() {
                    println!("    {line}");
                }
            }
        }
        println!("reward: {reward}");
        println!(
            "wall: {:.3} s   cpu: {:.3} s   peak memory: {:.1} MB   ({} split{}, seed {seed})",
            report.wall_s,
            report.cpu_s,
            report.peak_rss_mb,
            splits.len(),
            if splits.len() == 1 { "" } else { "s" }
        );
    }
    Ok(0)
}

struct Report {
    wall_s: f64,
    cpu_s: f64,
    peak_rss_mb: f64,
    error: Option<String>,
    kind: Option<String>,
    output: String,
}

/// Whether `text` is a whole program: it defines `build_model` at module level.
fn defines_build_model(text: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix("def build_model").is_some_and(|rest| rest.trim_start().starts_with('('))
    })
}

/// The split seeds an action is scored on, as the environment draws them (runtime::env): `seed`
/// itself, then `n − 1` seeds from `SplitMix64::new(seed)`.
fn split_seeds(seed: u64, n: usize) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    std::iter::once(seed).chain((1..n).map(|_| rng.next_u64())).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_programs_are_told_from_generated_text() {
        assert!(defines_build_model("import numpy as np\ndef build_model(x_train, y_train):\n    pass\n"));
        assert!(defines_build_model("def build_model (x, y):\n    pass"));
        assert!(!defines_build_model("RandomForestClassifier(n_estimators=10)"));
        assert!(!defines_build_model("    def build_model(x, y):\n"));
        assert!(!defines_build_model("def build_model_two(x, y):\n"));
    }

    #[test]
    fn split_seeds_start_with_the_seed() {
        assert_eq!(split_seeds(3, 1), vec![3]);
        let s = split_seeds(3, 3);
        assert_eq!(s[0], 3);
        assert_eq!(s[1], SplitMix64::new(3).next_u64());
    }
}
