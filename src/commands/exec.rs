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
use runtime::env::Env;
use runtime::{Limits, Pool, PoolConfig};
use std::path::PathBuf;
use std::sync::Arc;

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
    if spec.kind.game().is_some() {
        anyhow::bail!(
            "{}: a text game (kind: wasm) has no program to run; play actions with `etpo show --action FILE` or `etpo run --policy scripted --actions DIR`",
            args.spec.display()
        );
    }
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
    let dataset = envspec::data::load_for(&spec.dataset, &base_dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the data set: {e}", spec.path.display()))?;
    let seed = args.seed.or_else(|| spec.dataset.seeds.first().copied()).unwrap_or(0);
    let limits = Limits::from(&spec.limits);
    let n_splits = match spec.reward.evaluation {
        envspec::Evaluation::SingleSplit => 1,
        envspec::Evaluation::MeanOfSplits(n) => n.max(1) as usize,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let python = args.python.clone().unwrap_or_else(runtime::default_python);
    let pool = Pool::new(PoolConfig { workers: n_splits.min(cores), python, limits })?;

    // Scored exactly as the environment scores a step.
    let spec = Arc::new(spec);
    let env = Env::new(spec.clone(), Arc::new(dataset), seed, Arc::new(pool))?;
    let score = env.score_program(&program).context("the sandbox failed (infrastructure fault)")?;
    let (ran, reward, error) = match &score.result {
        Ok(auc) => (true, *auc, None),
        Err(message) => (false, spec.reward.failure_reward, Some(message.clone())),
    };
    let kind = score.error_kind.map(|k| format!("{k:?}"));

    if args.json {
        let obj = serde_json::json!({
            "spec": spec.name,
            "seed": seed,
            "reward": reward,
            "ran": ran,
            "error": error,
            "kind": kind,
            "wall_s": score.wall_s,
            "cpu_s": score.cpu_s,
            "peak_rss_mb": score.peak_rss_mb,
            "assembled": assembled,
            "program": program,
            "output": score.output,
        });
        println!("{obj}");
    } else {
        if assembled {
            println!("program (assembled from the action as during training):");
            for line in program.lines() {
                println!("    {line}");
            }
        }
        if !score.output.is_empty() {
            println!("output:");
            for line in score.output.lines() {
                println!("    {line}");
            }
        }
        match &error {
            None => println!("ran: yes"),
            Some(e) => {
                println!("ran: no ({})", kind.as_deref().unwrap_or("error"));
                println!("error:");
                for line in e.lines() {
                    println!("    {line}");
                }
            }
        }
        println!("reward: {reward}");
        println!(
            "wall: {:.3} s   cpu: {:.3} s   peak memory: {:.1} MB   ({} split{}, seed {seed})",
            score.wall_s,
            score.cpu_s,
            score.peak_rss_mb,
            env.n_splits(),
            if env.n_splits() == 1 { "" } else { "s" }
        );
    }
    Ok(0)
}

/// Whether `text` is a whole program: it defines `build_model` at module level.
fn defines_build_model(text: &str) -> bool {
    text.lines().any(|l| l.strip_prefix("def build_model").is_some_and(|rest| rest.trim_start().starts_with('(')))
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
}
