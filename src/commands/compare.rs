//! `etpo compare`: the average batch reward of several training runs in one figure (the paper's
//! Figure 4: ETPO against PPO-KL), with a table of how each run ended.

use std::path::PathBuf;

use anyhow::bail;
use etpo::experiment::trained::{batch_reward_png, read_metrics, MetricsRecord, METRICS, RUNNING_MEAN_UPDATES};

#[derive(clap::Args)]
pub struct Args {
    /// Run folders of `etpo run --algo etpo|ppo-kl|grpo` (each with a metrics.jsonl)
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// The figure to write
    #[arg(long, short, value_name = "FILE", default_value = "batch_reward.png")]
    out: PathBuf,
    /// Labels of the runs, in order [default: each run's --algo, with its folder name when two
    /// runs share one]
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    labels: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        bail!("--labels gives {} names for {} runs", args.labels.len(), args.runs.len());
    }
    let mut runs: Vec<(String, Vec<MetricsRecord>)> = Vec::new();
    let mut algos = Vec::new();
    for dir in &args.runs {
        let metrics = dir.join(METRICS);
        if !metrics.is_file() {
            bail!(
                "{}: no {METRICS} (is it the folder of a training run, `etpo run --algo etpo|ppo-kl|grpo`?)",
                dir.display()
            );
        }
        let records = read_metrics(&metrics)?;
        if records.is_empty() {
            bail!("{}: the run has made no update yet", dir.display());
        }
        algos.push(run_algo(dir).unwrap_or_else(|| "run".to_string()));
        runs.push((String::new(), records));
    }
    for (i, (label, _)) in runs.iter_mut().enumerate() {
        *label = match args.labels.get(i) {
            Some(l) => l.clone(),
            None if algos.iter().filter(|a| **a == algos[i]).count() > 1 => {
                let folder = args.runs[i].file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                format!("{} ({folder})", algos[i])
            }
            None => algos[i].clone(),
        };
    }
    batch_reward_png(&args.out, &runs)?;

    let width = runs.iter().map(|(l, _)| l.len()).max().unwrap_or(3).max(3);
    println!(
        "{:<width$}  {:>7}  {:>9}  {:>12}  {:>18}",
        "run",
        "updates",
        "env steps",
        "first reward",
        format!("last {RUNNING_MEAN_UPDATES} (mean)")
    );
    for (label, records) in &runs {
        let first = records[0].batch_reward;
        let tail = &records[records.len().saturating_sub(RUNNING_MEAN_UPDATES)..];
        let last = tail.iter().map(|m| m.batch_reward).sum::<f64>() / tail.len() as f64;
        let steps = records.last().map_or(0, |m| m.env_steps);
        println!("{label:<width$}  {:>7}  {steps:>9}  {first:>12.3}  {last:>18.3}", records.len());
    }
    eprintln!("wrote {}", args.out.display());
    Ok(0)
}

/// The `--algo` a run was made with, from its config.json.
fn run_algo(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("config")?.get("algo")?.as_str().map(str::to_string)
}
