//! End-to-end tests of `etpo run --algo etpo`, `--algo ppo-kl` and `--algo grpo`: a tiny random model trained
//! on the default Balance Scale spec through the CLI binary. Its actions are noise and nearly all
//! fail (reward -1), which still trains. They need the project's Python environment
//! (`scripts/setup.sh python`).

use crate::common::{balance_scale, jsonl, ok, venv_python, ETPO};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn etpo(args: &[&str], cwd: &Path) -> Output {
    venv_python();
    Command::new(ETPO).args(args).current_dir(cwd).output().expect("the etpo binary runs")
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// A tiny model in `tmp/tiny-model` and the arguments of a short training run into `tmp/<out>`.
fn setup(tmp: &Path) {
    crate::common::write_tiny_model(&tmp.join("tiny-model"));
}

fn train_args<'a>(algo: &'a str, spec: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        spec,
        "--algo",
        algo,
        "--model",
        "tiny-model",
        "--steps",
        steps,
        "--seeds",
        "0",
        "--workers",
        "1",
        "--out",
        out,
        "--no-progress",
    ]
}

/// The run wrote one metrics line per update with finite losses, a checkpoint, the figure and
/// the trained adapter.
fn check_training_outputs(dir: &Path, updates: u64, update_every: u64) {
    let metrics = jsonl(&dir.join("metrics.jsonl"));
    assert_eq!(metrics.len() as u64, updates, "one line per update: {metrics:?}");
    for (i, m) in metrics.iter().enumerate() {
        assert_eq!(m["update"].as_u64(), Some(i as u64 + 1), "{m}");
        assert_eq!(m["env_steps"].as_u64(), Some((i as u64 + 1) * update_every), "{m}");
        for key in ["q_loss", "policy_loss", "kl", "entropy", "batch_reward", "time_s"] {
            let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {m}"));
            assert!(v.is_finite(), "{key} = {v}");
        }
        let r = m["batch_reward"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&r), "rewards are -1 or a ROC AUC: {r}");
        assert!(m["entropy"].as_f64().unwrap() > 0.0 && m["kl"].as_f64().unwrap() >= -1e-6, "{m}");
    }
    // The policy starts equal to ρ, so the first update's KL(π‖ρ) is zero.
    assert!(metrics[0]["kl"].as_f64().unwrap().abs() < 1e-5, "{}", metrics[0]);
    let checkpoint = std::fs::read(dir.join("checkpoint.safetensors")).expect("a checkpoint");
    assert!(checkpoint.len() > 8);
    let png = std::fs::read(dir.join("batch_reward.png")).expect("batch_reward.png");
    assert_eq!(&png[1..4], b"PNG");
    assert!(dir.join("adapter/adapter_model.safetensors").is_file(), "the trained adapter is saved");
}

#[test]
fn etpo_trains_a_tiny_model_and_writes_metrics_checkpoint_and_figure() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let spec = balance_scale();
    let mut args = train_args("etpo", spec.to_str().unwrap(), "run", "4");
    args.extend(["--update-every", "2", "--beta", "0.05", "--q-readout", "logits", "--disc", "--set", "q_epochs=2"]);
    let out = etpo(&args, tmp.path());
    ok(&out);
    let dir = tmp.path().join("run");
    check_training_outputs(&dir, 2, 2);
    let steps = jsonl(&dir.join("steps.jsonl"));
    assert_eq!(steps.len(), 4);
    // The reward before and after training: the first and last step (a quarter of 4).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (first, last) = (steps[0]["reward"].as_f64().unwrap(), steps[3]["reward"].as_f64().unwrap());
    let line = format!(
        "etpo balance_scale: mean reward {first:.3} over the first 1 steps of each seed -> {last:.3} over the last 1"
    );
    assert!(stdout.contains(&line), "{line:?} not in\n{stdout}");
    assert!(stdout.contains("## First and last steps"), "{stdout}");
    let trainer = &config(&dir)["trainer"];
    assert_eq!(trainer["update_every"], 2);
    assert_eq!(trainer["hyper_parameters"]["beta"], 0.05);
    assert_eq!(trainer["hyper_parameters"]["q_readout"], "logits");
    assert_eq!(trainer["hyper_parameters"]["discount_inside_actions"], true);
    assert_eq!(trainer["hyper_parameters"]["gamma"], 0.99, "the paper's default");
    assert_eq!(trainer["hyper_parameters"]["q_epochs"], 2, "--set reaches the trainer");
}

#[test]
fn ppo_kl_trains_with_hyper_parameters_from_the_spec_unless_given() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    // A copy of the spec with a training block; the command line overrides its beta.
    let text = std::fs::read_to_string(balance_scale()).unwrap();
    let spec = tmp.path().join("balance_scale.yaml");
    std::fs::write(&spec, format!("{text}\ntraining:\n  batch_size: 3\n  beta: 0.2\n  gamma: 0.5\n")).unwrap();
    let mut args = train_args("ppo-kl", "balance_scale.yaml", "run", "6");
    args.extend(["--beta", "0.03", "--one-step"]);
    let out = etpo(&args, tmp.path());
    ok(&out);
    let dir = tmp.path().join("run");
    check_training_outputs(&dir, 2, 3);
    let trainer = &config(&dir)["trainer"];
    assert_eq!(trainer["update_every"], 3, "training.batch_size");
    assert_eq!(trainer["hyper_parameters"]["beta"], 0.03, "the command line wins");
    assert_eq!(trainer["hyper_parameters"]["gamma"], 0.5, "the spec's");
    // --one-step: every episode is a single step.
    for s in jsonl(&dir.join("steps.jsonl")) {
        assert_eq!(s["step"], 0, "{s}");
        assert!(s["terminated"].as_bool().unwrap() || s["truncated"].as_bool().unwrap(), "{s}");
    }
    // ETPO-only options are refused for PPO-KL, before any folder is made.
    let mut args = train_args("ppo-kl", "balance_scale.yaml", "bad", "2");
    args.extend(["--polyak", "0.9"]);
    let out = etpo(&args, tmp.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--polyak"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!tmp.path().join("bad").exists());
}

#[test]
fn grpo_trains_through_the_cli_with_its_own_settings() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let spec = balance_scale();
    // Groups of 3 environments share the seed's 12 steps: 4 rounds of 3 steps, an update every
    // 2 rounds.
    let mut args = train_args("grpo", spec.to_str().unwrap(), "run", "12");
    args.extend(["--update-every", "6", "--beta", "0.02", "--set", "scale_rewards=false", "--set", "epochs=1"]);
    args.extend(["--set", "group_size=3"]);
    ok(&etpo(&args, tmp.path()));
    let dir = tmp.path().join("run");
    check_training_outputs(&dir, 2, 6);
    let trainer = &config(&dir)["trainer"];
    assert_eq!(config(&dir)["config"]["algo"], "grpo");
    assert_eq!(trainer["hyper_parameters"]["beta"], 0.02);
    assert_eq!(trainer["hyper_parameters"]["scale_rewards"], false, "--set reaches the trainer");
    assert_eq!(trainer["hyper_parameters"]["epochs"], 1);
    assert_eq!(trainer["hyper_parameters"]["group_size"], 3);
    // The members step side by side: member m's e-th episode is the seed's episode 3e + m, the
    // steps are numbered over the seed, and every round starts the members from one state.
    let steps = jsonl(&dir.join("steps.jsonl"));
    assert_eq!(steps.len(), 12);
    for (i, s) in steps.iter().enumerate() {
        let member = (i % 3) as u64;
        assert_eq!(s["env_step"].as_u64(), Some(i as u64 + 1), "{s}");
        assert_eq!(s.get("member").and_then(Value::as_u64).unwrap_or(0), member, "{s}");
        assert_eq!(s["episode"].as_u64().unwrap() % 3, member, "{s}");
        if s["step"] == 0 {
            assert_eq!(s["prompt_sha256"], steps[i - i % 3]["prompt_sha256"], "one first state per group");
        }
    }
    // Every transition was in a group of 3 (the metric is the fraction in groups of two or more).
    for m in jsonl(&dir.join("metrics.jsonl")) {
        assert_eq!(m["detail"]["q_taken_mean"].as_f64(), Some(1.0), "{m}");
    }
    // An ETPO-only key is refused with the name of the key.
    let mut args = train_args("grpo", spec.to_str().unwrap(), "bad", "2");
    args.extend(["--set", "q_epochs=2"]);
    let out = etpo(&args, tmp.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("q_epochs"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn compare_draws_etpo_and_ppo_kl_in_one_figure_with_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let spec = balance_scale();
    for algo in ["etpo", "ppo-kl"] {
        let mut args = train_args(algo, spec.to_str().unwrap(), algo, "4");
        args.extend(["--update-every", "2"]);
        ok(&etpo(&args, tmp.path()));
    }
    let out = etpo(&["compare", "etpo", "ppo-kl", "--out", "fig4.png"], tmp.path());
    ok(&out);
    assert_eq!(&std::fs::read(tmp.path().join("fig4.png")).unwrap()[1..4], b"PNG");
    // One row per run, labelled by its algorithm, with the run's own numbers.
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    for algo in ["etpo", "ppo-kl"] {
        let metrics = jsonl(&tmp.path().join(algo).join("metrics.jsonl"));
        let rewards: Vec<f64> = metrics.iter().map(|m| m["batch_reward"].as_f64().unwrap()).collect();
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        let row =
            table.lines().find(|l| l.split_whitespace().next() == Some(algo)).unwrap_or_else(|| panic!("{table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], rewards.len().to_string(), "{row}");
        assert_eq!(cells[2], metrics.last().unwrap()["env_steps"].to_string(), "{row}");
        assert_eq!(cells[3], format!("{:.3}", rewards[0]), "{row}");
        assert_eq!(cells[4], format!("{mean:.3}"), "{row}");
    }
    // A folder that is not a training run is a clear error.
    let out = etpo(&["compare", "etpo", "nowhere"], tmp.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nowhere: no metrics.jsonl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The arguments of a short training run of `algo` into `out` on the default spec, then `extra`.
fn resumable_args(algo: &str, out: &str, steps: &str, extra: &[&str]) -> Vec<String> {
    let spec = balance_scale();
    let mut a: Vec<String> =
        train_args(algo, spec.to_str().unwrap(), out, steps).iter().map(|s| s.to_string()).collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The uninterrupted run into `tmp/reference` that [`assert_resumed_as_uninterrupted`] compares
/// the killed one against.
fn reference_run(tmp: &Path, algo: &str, steps: &str, extra: &[&str]) {
    ok(&etpo(&resumable_args(algo, "reference", steps, extra).iter().map(String::as_str).collect::<Vec<_>>(), tmp));
}

/// Runs `reference` to the end, then the same run into `killed` with the failpoint that aborts
/// the process right after round 1 reaches replay.jsonl and before its steps reach steps.jsonl
/// (the window resuming must close: it drops that round and runs it again).
fn reference_and_aborted_runs(tmp: &Path, algo: &str, steps: &str, extra: &[&str]) {
    let args = |out| resumable_args(algo, out, steps, extra);
    reference_run(tmp, algo, steps, extra);
    venv_python();
    let killed = Command::new(ETPO)
        .args(args("killed"))
        .current_dir(tmp)
        .env("ETPO_FAILPOINT", "abort-after-recording-round:1")
        .output()
        .unwrap();
    assert!(!killed.status.success(), "the failpoint aborts the run");
}

/// The interrupted and resumed run in `tmp/killed` ended as the uninterrupted one in
/// `tmp/reference`: the same adapters, the same steps and updates, each logged once.
fn assert_resumed_as_uninterrupted(tmp: &Path) {
    let (dir, reference) = (tmp.join("killed"), tmp.join("reference"));
    let want = adapter(&reference);
    assert!(want.iter().any(|(_, v)| v.iter().any(|&x| x != 0.0)), "training moved the adapter");
    assert_eq!(adapter(&dir), want, "the resumed run's adapters equal the uninterrupted run's");
    let s = |d: &Path| jsonl(&d.join("steps.jsonl")).iter().map(step_essence).collect::<Vec<_>>();
    assert_eq!(s(&dir), s(&reference), "the same steps (the same actions sampled), each logged once");
    let m = |d: &Path| jsonl(&d.join("metrics.jsonl")).iter().map(metrics_essence).collect::<Vec<_>>();
    assert_eq!(m(&dir), m(&reference), "the same updates, each logged once");
}

#[test]
fn a_run_killed_between_recording_a_round_and_logging_it_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    reference_and_aborted_runs(tmp.path(), "etpo", "6", &["--update-every", "1", "--lr", "0.01"]);
    let dir = tmp.path().join("killed");
    let replay = std::fs::read_to_string(dir.join("replay.jsonl")).unwrap();
    assert_eq!(replay.lines().count(), 2, "rounds 0 and 1 recorded");
    assert_eq!(jsonl(&dir.join("steps.jsonl")).len(), 1, "only round 0's step logged");

    let out = etpo(&["run", "--resume", "killed", "--no-progress"], tmp.path());
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dropping 1 recorded round(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_resumed_as_uninterrupted(tmp.path());
}

#[test]
fn a_grpo_run_with_groups_killed_mid_round_resumes_exactly() {
    // Two members per seed; round 1 is steps 3-4: on resume the members are rebuilt from the log.
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let extra = ["--update-every", "2", "--lr", "0.01", "--set", "group_size=2"];
    reference_and_aborted_runs(tmp.path(), "grpo", "8", &extra);
    assert_eq!(jsonl(&tmp.path().join("killed/steps.jsonl")).len(), 2, "only round 0's two steps logged");
    ok(&etpo(&["run", "--resume", "killed", "--no-progress"], tmp.path()));
    let members = jsonl(&tmp.path().join("killed/steps.jsonl")).iter().filter(|s| s["member"] == 1).count();
    assert_eq!(members, 4, "half of the 8 steps are the second member's");
    assert_resumed_as_uninterrupted(tmp.path());
}

/// The trained adapter's tensors, by name.
fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let path = dir.join("adapter/adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The fields of a metrics line that must not depend on interruptions (timings may).
fn metrics_essence(m: &Value) -> String {
    ["update", "env_steps", "q_loss", "policy_loss", "kl", "entropy", "batch_reward"]
        .iter()
        .map(|k| m[k].to_string())
        .collect::<Vec<_>>()
        .join("|")
}

fn step_essence(s: &Value) -> String {
    [
        "episode",
        "member",
        "step",
        "env_step",
        "prompt_sha256",
        "generation",
        "reward",
        "terminated",
        "truncated",
        "error",
    ]
    .iter()
    .map(|k| s[k].to_string())
    .collect::<Vec<_>>()
    .join("|")
}

#[test]
fn a_training_run_killed_and_resumed_ends_with_the_adapters_of_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let extra = ["--update-every", "2", "--lr", "0.01"];
    reference_run(tmp.path(), "etpo", "8", &extra);
    let args = |out| resumable_args("etpo", out, "8", &extra);

    // Killed (SIGKILL) once the first checkpoint is there: later rounds are replayed on resume.
    venv_python();
    let dir = tmp.path().join("killed");
    let mut child = Command::new(ETPO)
        .args(args("killed"))
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !dir.join("checkpoint.safetensors").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("etpo exited ({status}) before its first checkpoint");
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dir.join("adapter").exists(), "the run was killed before it finished");
    let logged = jsonl(&dir.join("steps.jsonl")).len();
    assert!(logged < 8, "killed after {logged} of 8 steps");

    ok(&etpo(&["run", "--resume", "killed", "--no-progress"], tmp.path()));
    assert_resumed_as_uninterrupted(tmp.path());
}

#[test]
fn activation_checkpointing_is_a_flag_that_trains_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let spec = balance_scale();
    // One update on the same two actions (sampled before any update), with and without.
    for (out, extra) in [("plain", &[][..]), ("checkpointed", &["--activation-checkpointing"][..])] {
        let mut args = train_args("etpo", spec.to_str().unwrap(), out, "2");
        args.extend(["--update-every", "2", "--lr", "0.01"]);
        args.extend(extra);
        ok(&etpo(&args, tmp.path()));
    }
    let (plain, checkpointed) = (tmp.path().join("plain"), tmp.path().join("checkpointed"));
    check_training_outputs(&checkpointed, 1, 2);
    assert_eq!(config(&checkpointed)["config"]["activation_checkpointing"], true, "recorded");
    assert!(config(&plain)["config"].get("activation_checkpointing").is_none(), "off is the default");
    let (a, b) = (adapter(&plain), adapter(&checkpointed));
    assert_eq!(a.len(), b.len());
    let mut moved = 0f32;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() <= 1e-5 * u.abs().max(1.0), "{name}: {u} against {v}");
        }
        if name.contains("lora_B") {
            moved = moved.max(x.iter().map(|u| u.abs()).fold(0.0, f32::max));
        }
    }
    assert!(moved > 0.0, "the update moved B from zero");
}
