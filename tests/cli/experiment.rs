//! `etpo experiment`: a grid of specs × algorithms × seeds run as separate `etpo run`s, with the
//! paper's Table 2 and figures in one folder, and a second invocation that skips finished runs.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{balance_scale, ok, steps, venv_python, ETPO};

fn etpo(args: &[&str], cwd: &Path) -> Output {
    venv_python();
    Command::new(ETPO).args(args).current_dir(cwd).output().expect("the etpo binary runs")
}

const ARGS: [&str; 15] = [
    "experiment",
    "bs.yaml",
    "--algos",
    "reflection,grpo",
    "--seeds",
    "0,1",
    "--steps",
    "4",
    "--update-every",
    "2",
    "--model",
    "tiny-model",
    "--workers",
    "1",
    "--out",
];

#[test]
fn a_grid_of_runs_gives_table_2_and_figures_and_skips_finished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // The shipped spec holds out a test part, so the honest score is in the results too.
    let text = std::fs::read_to_string(balance_scale()).unwrap();
    assert!(text.contains("\n  test_fraction: 0.2\n"), "{text}");
    std::fs::write(tmp.path().join("bs.yaml"), text).unwrap();
    crate::common::write_tiny_model(&tmp.path().join("tiny-model"));
    let mut args = ARGS.to_vec();
    args.push("exp");
    let out = etpo(&args, tmp.path());
    let stdout = ok(&out);
    let exp = tmp.path().join("exp");

    // One run per algorithm and seed, each with the whole budget and its own seed only.
    let csv = std::fs::read_to_string(exp.join("results.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4, "{csv}");
    let mut best_by_algo: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    for row in &rows {
        let (algo, seed) = (row[1], row[2]);
        let dir = exp.join("runs/balance_scale").join(algo).join(format!("seed{seed}"));
        let records = steps(&dir);
        assert_eq!(records.len(), 4, "{algo} seed {seed}");
        assert!(
            records.iter().all(|r| r["seed"].as_u64().map(|s| s.to_string()).as_deref() == Some(seed)),
            "{algo} seed {seed}: only its own seed"
        );
        // The best reward is the run's own, read independently from its step log.
        let best = records.iter().map(|r| r["reward"].as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(row[4], format!("{best:.4}"), "{row:?}");
        best_by_algo.entry(algo).or_default().push(best);
        // The test score of the best action, as the run wrote it: the tiny model's noise never
        // runs, so there is no best action and no score (`run::` tests the score itself).
        match std::fs::read_to_string(dir.join("test.csv")) {
            Ok(t) => {
                let cols: Vec<&str> = t.lines().nth(1).unwrap().split(',').collect();
                assert_eq!(row[9], cols[4], "{row:?}");
                assert_eq!(row[10], cols[5], "the gap, best validation − test: {row:?}");
            }
            Err(_) => assert_eq!((row[9], row[10]), ("", ""), "no score without an action that ran: {row:?}"),
        }
        if algo == "grpo" {
            assert!(dir.join("metrics.jsonl").is_file(), "the GRPO run trained");
        }
    }
    // Table 2: mean ± std over the seeds, one column per algorithm.
    let md = std::fs::read_to_string(exp.join("results.md")).unwrap();
    assert!(md.contains("| spec | k | reflection | grpo |"), "{md}");
    for (algo, bests) in &best_by_algo {
        let mean = bests.iter().sum::<f64>() / 2.0;
        let std = ((bests[0] - mean).powi(2) + (bests[1] - mean).powi(2)).sqrt();
        assert!(md.contains(&format!("{mean:.4} ± {std:.4}")), "{algo}: {mean:.4} ± {std:.4} not in\n{md}");
    }
    assert!(stdout.contains("Table 2"), "{stdout}");
    let any_ran = rows.iter().any(|r| !r[4].is_empty() && r[4] != "-1.0000");
    assert_eq!(md.contains("## Held-out test score of the best action"), any_ran, "{md}");
    for fig in ["balance_scale_best_reward.png", "balance_scale_batch_reward.png"] {
        assert_eq!(&std::fs::read(exp.join(fig)).unwrap()[1..4], b"PNG", "{fig}");
    }
    assert!(!exp.join("mean_best_reward.png").exists(), "one spec: nothing to average");

    // Again: finished runs are not touched; a missing one is run.
    let kept = exp.join("runs/balance_scale/reflection/seed0/steps.jsonl");
    let before = std::fs::read(&kept).unwrap();
    std::fs::remove_dir_all(exp.join("runs/balance_scale/grpo/seed1")).unwrap();
    let out = etpo(&args, tmp.path());
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches(": done (4 steps)").count(), 3, "{err}");
    assert!(err.contains("[4/4] balance_scale grpo seed 1: starting"), "{err}");
    assert_eq!(std::fs::read(&kept).unwrap(), before, "a finished run is not repeated");
    assert_eq!(steps(&exp.join("runs/balance_scale/grpo/seed1")).len(), 4);

    // The paper's Table 2 for the same data set, beside ours.
    assert!(md.contains("## The paper's Table 2 for the same data sets"), "{md}");
    assert!(
        md.contains("| balance_scale | 0.8833 ± 0.043 | 0.8833 ± 0.043 | 0.8833 ± 0.043 | 0.9289 ± 0.038 |"),
        "{md}"
    );

    // An ablation of Appendix G is a column of its own: `etpo run --algo etpo` with its flag;
    // with --perplexity, Table 3 for the trained policy.
    // Two specs: the figures averaged over them too.
    std::fs::write(tmp.path().join("text.txt"), "The quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let bs = std::fs::read_to_string(tmp.path().join("bs.yaml")).unwrap();
    std::fs::write(tmp.path().join("bs2.yaml"), bs.replacen("name: balance_scale\n", "name: balance_scale_2\n", 1))
        .unwrap();
    let out = etpo(
        &["experiment", "bs.yaml", "bs2.yaml", "--algos", "etpo-1step", "--seeds", "0", "--steps", "2"]
            .into_iter()
            .chain(["--update-every", "2"])
            .chain(["--model", "tiny-model", "--workers", "1", "--out", "ablation", "--perplexity", "text.txt"])
            .collect::<Vec<_>>(),
        tmp.path(),
    );
    ok(&out);
    let run = tmp.path().join("ablation/runs/balance_scale/etpo-1step/seed0");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["algo"], "etpo", "{config}");
    assert_eq!(config["config"]["train"]["one_step"], true, "{config}");
    let records = steps(&run);
    assert!(records.iter().all(|r| r["step"] == 0), "episodes of one step");
    let md = std::fs::read_to_string(tmp.path().join("ablation/results.md")).unwrap();
    assert!(md.contains("| spec | k | etpo-1step |"), "{md}");
    assert!(md.contains("## Table 3: perplexity of the base model and of each trained policy"), "{md}");
    let ppl = std::fs::read_to_string(tmp.path().join("ablation/perplexity.csv")).unwrap();
    let rows: Vec<Vec<&str>> = ppl.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{ppl}");
    assert_eq!(&rows[0][..4], ["balance_scale", "etpo-1step", "0", "text.txt"]);
    assert_eq!(&rows[1][..4], ["balance_scale_2", "etpo-1step", "0", "text.txt"]);
    for fig in ["mean_best_reward.png", "mean_batch_reward.png"] {
        assert_eq!(&std::fs::read(tmp.path().join("ablation").join(fig)).unwrap()[1..4], b"PNG", "{fig}");
    }
    assert!(md.contains("both averaged over the specs: `mean_best_reward.png`, `mean_batch_reward.png`"), "{md}");
    let (base, trained, ratio): (f64, f64, f64) =
        (rows[0][5].parse().unwrap(), rows[0][6].parse().unwrap(), rows[0][7].parse().unwrap());
    assert!(base > 1.0 && trained > 1.0 && (ratio - trained / base).abs() < 1e-3, "{ppl}");

    // An unknown algorithm is refused before anything runs.
    let out = etpo(&["experiment", "bs.yaml", "--algos", "etpo,dpo", "--out", "bad"], tmp.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "unknown algorithm \"dpo\"; expected some of: etpo, ppo-kl, grpo, reflection, etpo-disc, etpo-1step"
    ));
    assert!(!tmp.path().join("bad").exists());
}

/// `etpo experiment` killed with SIGKILL while a run is in flight takes that run with it (no
/// orphan keeps stepping or holds the run folder's lock), and the same command again resumes the
/// run where its log ends: every step once.
#[test]
fn a_killed_experiment_leaves_no_run_behind_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(balance_scale(), tmp.path().join("bs.yaml")).unwrap();
    crate::common::write_tiny_model(&tmp.path().join("tiny-model"));
    let args = ["experiment", "bs.yaml", "--algos", "reflection", "--seeds", "0", "--steps", "200"]
        .into_iter()
        .chain(["--model", "tiny-model", "--workers", "1", "--out", "exp", "--no-progress"]);
    let args: Vec<&str> = args.collect();
    venv_python();
    let mut child = Command::new(ETPO)
        .args(&args)
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = tmp.path().join("exp/runs/balance_scale/reflection/seed0");
    let start = std::time::Instant::now();
    let logged = |run: &Path| std::fs::read_to_string(run.join("steps.jsonl")).map_or(0, |t| t.lines().count());
    while logged(&run) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the experiment ended before its run logged 3 steps");
        assert!(start.elapsed() < std::time::Duration::from_secs(120), "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let run_pid: i32 = std::fs::read_to_string(run.join(".lock")).unwrap().trim().parse().unwrap();
    assert_ne!(run_pid as u32, child.id(), "the run is a process of its own");
    child.kill().unwrap();
    child.wait().unwrap();
    // The kernel ends the run as its parent dies; it was not done.
    let dead = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{run_pid}")).exists() {
        // A zombie waiting for init to reap it has stopped stepping too.
        let stat = std::fs::read_to_string(format!("/proc/{run_pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(dead.elapsed() < std::time::Duration::from_secs(10), "the run outlived its experiment");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let at_kill = logged(&run);
    assert!(at_kill < 200, "the run was cut ({at_kill} steps)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(logged(&run), at_kill, "nothing steps after the kill");

    let out = etpo(&args, tmp.path());
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(": resuming after "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = steps(&run);
    let mut env_steps: Vec<u64> = records.iter().map(|r| r["env_step"].as_u64().unwrap()).collect();
    env_steps.sort();
    assert_eq!(env_steps, (1..=200).collect::<Vec<_>>(), "every step once");
}
