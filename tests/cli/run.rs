//! End-to-end tests of `etpo run`, driving the CLI binary the way a user would.
//!
//! They need the project's Python environment (`scripts/setup.sh python`); the last test also
//! needs the embedded default model (`scripts/setup.sh model`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{balance_scale, ok, steps, venv_python, write_tiny_model, ETPO};

fn etpo(args: &[&str], cwd: &Path) -> Output {
    venv_python();
    Command::new(ETPO).args(args).current_dir(cwd).output().expect("the etpo binary runs")
}

fn write_actions(dir: &Path, actions: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, a) in actions.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:03}.txt")), a).unwrap();
    }
}

/// The spec, its data and one seed's split, through the library (to compute expectations the
/// way an independent reader of the spec would).
struct Loaded {
    spec: envspec::Spec,
    split: envspec::data::Split,
}

fn load(spec_path: &Path, seed: u64) -> Loaded {
    let spec = envspec::load(spec_path).unwrap_or_else(|e| panic!("{e}"));
    let dataset = envspec::data::load_for(&spec.dataset, spec.path.parent().unwrap()).unwrap();
    let split = dataset.split_for(&spec.dataset, seed);
    Loaded { spec, split }
}

fn sha256_hex(prompt: &envspec::Prompt) -> String {
    etpo::experiment::prompt_sha256(prompt)
}

/// ROC AUC of `estimator` (a Python expression over sklearn) fitted on the split's training rows,
/// computed by plain scikit-learn in the project's venv, outside etpo.
fn sklearn_auc(split: &envspec::data::Split, imports: &str, estimator: &str, multi_class: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let data = serde_json::json!({
        "x_train": split.x_train, "y_train": split.y_train, "x_val": split.x_val, "y_val": split.y_val,
        "n_classes": split.class_names.len(),
    });
    let data_path = dir.path().join("data.json");
    std::fs::write(&data_path, data.to_string()).unwrap();
    let script = format!(
        r#"
import json, sys
import numpy as np
from sklearn.metrics import roc_auc_score
{imports}
d = json.load(open(sys.argv[1]))
model = {estimator}
model.fit(np.array(d["x_train"]), np.array(d["y_train"]))
p = model.predict_proba(np.array(d["x_val"]))
y = np.array(d["y_val"])
if d["n_classes"] == 2:
    print(repr(float(roc_auc_score(y, p[:, 1]))))
else:
    print(repr(float(roc_auc_score(y, p, multi_class="{multi_class}", labels=list(range(d["n_classes"]))))))
"#
    );
    let out = Command::new(venv_python()).arg("-c").arg(script).arg(&data_path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn run_dir(tmp: &Path) -> PathBuf {
    tmp.join("run")
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or_else(|| panic!("step record without {key}: {v}"))
}

fn num(v: &Value, key: &str) -> f64 {
    field(v, key).as_f64().unwrap()
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key).as_str().unwrap()
}

fn flag(v: &Value, key: &str) -> bool {
    field(v, key).as_bool().unwrap()
}

fn records_of(records: &[Value], seed: u64) -> Vec<&Value> {
    records.iter().filter(|r| field(r, "seed").as_u64() == Some(seed)).collect()
}

#[test]
fn scripted_actions_get_the_rewards_plain_sklearn_gives_and_failures_reflect() {
    let tmp = tempfile::tempdir().unwrap();
    let actions = tmp.path().join("actions");
    // Raw generations: the spec keeps the first line of each.
    write_actions(
        &actions,
        &["UndefinedClassifier()\n", "LogisticRegression(max_iter=1000)\nprint('ignored')", "GaussianNB()"],
    );
    let dir = run_dir(tmp.path());
    let out = etpo(
        &[
            "run",
            balance_scale().to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--steps",
            "3",
            "--seeds",
            "0,1",
            "--workers",
            "1",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let records = steps(&dir);
    assert_eq!(records.len(), 6, "2 seeds x 3 steps");
    let imports = "from sklearn.linear_model import LogisticRegression\nfrom sklearn.naive_bayes import GaussianNB";
    let mut bests = Vec::new();
    for seed in [0u64, 1] {
        let l = load(&balance_scale(), seed);
        let ctx = l.spec.task_context(&l.split);
        let initial = l.spec.render_initial(&ctx).unwrap();
        let r = records_of(&records, seed);
        assert_eq!(r.len(), 3);

        // Step 1: the broken action fails with the failure reward and its Python error.
        assert_eq!(text(r[0], "action"), "UndefinedClassifier()");
        assert!(!flag(r[0], "ran") && !flag(r[0], "terminated") && !flag(r[0], "truncated"));
        assert_eq!(num(r[0], "reward"), l.spec.reward.failure_reward);
        let error = text(r[0], "error");
        assert!(error.contains("NameError") && error.contains("UndefinedClassifier"), "{error}");
        assert_eq!(text(r[0], "prompt_sha256"), sha256_hex(&initial));

        // Step 2 answers the reflection state, which shows that error.
        let failed = [envspec::Turn {
            step: 0,
            action: "UndefinedClassifier()".into(),
            reward: l.spec.reward.failure_reward,
            error: error.into(),
            observation: String::new(),
        }];
        let history = envspec::History::all(&failed);
        let reflection = l.spec.render_reflection(&ctx, "UndefinedClassifier()", error, history).unwrap();
        assert_eq!(text(r[1], "prompt_sha256"), sha256_hex(&reflection));
        assert!(reflection.to_text(None).unwrap().contains("UndefinedClassifier"));
        assert_eq!((field(r[1], "episode").as_u64(), field(r[1], "step").as_u64()), (Some(0), Some(1)));
        let lr = sklearn_auc(&l.split, imports, "LogisticRegression(max_iter=1000)", "ovo");
        assert!(flag(r[1], "ran") && flag(r[1], "terminated"));
        assert!((num(r[1], "reward") - lr).abs() < 1e-9, "etpo {} vs sklearn {lr}", num(r[1], "reward"));

        // Step 3: the episode ended, a new one starts from η(g).
        assert_eq!((field(r[2], "episode").as_u64(), field(r[2], "step").as_u64()), (Some(1), Some(0)));
        assert_eq!(text(r[2], "prompt_sha256"), sha256_hex(&initial));
        let nb = sklearn_auc(&l.split, imports, "GaussianNB()", "ovo");
        assert!((num(r[2], "reward") - nb).abs() < 1e-9, "etpo {} vs sklearn {nb}", num(r[2], "reward"));
        bests.push(lr.max(nb));
    }

    // summary.csv: the per-spec row holds the mean and sample std of the best rewards.
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let all = csv.lines().find(|l| l.starts_with("balance_scale,all,")).expect("a row for all seeds");
    let cols: Vec<&str> = all.split(',').collect();
    let mean = (bests[0] + bests[1]) / 2.0;
    let std = ((bests[0] - mean).powi(2) + (bests[1] - mean).powi(2)).sqrt();
    assert_eq!(cols[2], "6");
    assert_eq!(cols[5], "0.6667", "runnable rate 4 of 6");
    assert_eq!(cols[8], format!("{mean:.4}"));
    assert_eq!(cols[9], format!("{std:.4}"));
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(md.contains(&format!("| balance_scale | 3 | {mean:.4} ± {std:.4} | 67% |")), "{md}");
    let png = std::fs::read(dir.join("best_reward.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["steps"], 3);
    assert_eq!(config["specs"][0]["steps"], 3);
    assert_eq!(config["specs"][0]["name"], "balance_scale");
    assert_eq!(config["specs"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(config["actions"].as_array().unwrap().len(), 3);
}

#[test]
fn the_step_limit_truncates_and_a_new_episode_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let max_steps = load(&balance_scale(), 0).spec.max_steps as usize;
    let broken: Vec<&str> =
        (0..max_steps + 2).map(|i| if i % 2 == 0 { "NoSuchModel()" } else { "LogisticRegression(" }).collect();
    write_actions(&tmp.path().join("actions"), &broken);
    let k = (max_steps + 2).to_string();
    let out = etpo(
        &[
            "run",
            balance_scale().to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--steps",
            &k,
            "--seeds",
            "3",
            "--workers",
            "1",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let records = steps(&run_dir(tmp.path()));
    assert_eq!(records.len(), max_steps + 2);
    for (i, r) in records.iter().enumerate() {
        let (episode, step) = if i < max_steps { (0, i) } else { (1, i - max_steps) };
        assert_eq!(field(r, "episode").as_u64(), Some(episode), "{r}");
        assert_eq!(field(r, "step").as_u64(), Some(step as u64), "{r}");
        assert_eq!(field(r, "env_step").as_u64(), Some(i as u64 + 1));
        assert!(!flag(r, "ran") && !flag(r, "terminated"));
        assert_eq!(flag(r, "truncated"), i + 1 == max_steps, "only the episode's last step truncates: {r}");
        assert_eq!(num(r, "reward"), -1.0);
    }
    assert!(text(&records[1], "error").contains("SyntaxError"), "{}", records[1]);
    assert_eq!(text(&records[max_steps], "prompt_sha256"), text(&records[0], "prompt_sha256"));
    assert_ne!(text(&records[1], "prompt_sha256"), text(&records[0], "prompt_sha256"));
}

fn slow_actions(n: usize) -> Vec<String> {
    // Every third action fails, so episodes are in progress at arbitrary points; the others
    // sleep a little so the run lasts long enough to be interrupted.
    (0..n)
        .map(|i| {
            if i % 3 == 1 {
                format!("Missing{i}()")
            } else {
                format!("__import__('time').sleep(0.1) or LogisticRegression(C={}.5, max_iter=500)", i % 7)
            }
        })
        .collect()
}

/// The fields that must not depend on how the run was interrupted (timings may).
fn essence(r: &Value) -> String {
    let keys = [
        "spec",
        "seed",
        "episode",
        "step",
        "env_step",
        "prompt_sha256",
        "generation",
        "action",
        "reward",
        "ran",
        "terminated",
        "truncated",
        "error",
    ];
    keys.iter().map(|k| field(r, k).to_string()).collect::<Vec<_>>().join("|")
}

fn wait_for_lines(path: &Path, n: usize, child: &mut std::process::Child) {
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("etpo exited ({status}) before writing {n} steps");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress in steps.jsonl");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_run_resumes_without_repeating_or_losing_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let actions = slow_actions(18);
    write_actions(&tmp.path().join("actions"), &actions.iter().map(String::as_str).collect::<Vec<_>>());
    // Balance Scale whose reflection state lists every failure of the episode so far: the
    // resumed run's states (their sha256 is in each step's essence) must have the same history.
    let shipped = std::fs::read_to_string(balance_scale()).unwrap();
    let failure_line =
        "    # A previous classifier for the last task failed with: {{ error.strip().splitlines()[-1] }}\n";
    assert!(shipped.contains(failure_line));
    let with_history = shipped.replace(
        failure_line,
        "    {% for t in history %}\n    # Attempt {{ t.step + 1 }}, `{{ t.action }}`, failed with: {{ t.error.strip().splitlines()[-1] }}\n    {% endfor %}\n",
    );
    let spec = tmp.path().join("balance_scale.yaml");
    std::fs::write(&spec, with_history).unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "run",
            spec.to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--steps",
            "18",
            "--seeds",
            "0,1",
            "--workers",
            "2",
            "--out",
            out,
            "--no-progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // The reference: the same run, uninterrupted.
    let reference = etpo(&args("reference").iter().map(String::as_str).collect::<Vec<_>>(), tmp.path());
    ok(&reference);

    let dir = tmp.path().join("killed");
    let mut child = Command::new(ETPO)
        .args(args("killed"))
        .current_dir(tmp.path())
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_lines(&dir.join("steps.jsonl"), 9, &mut child);
    // A second process on the live run fails at once, naming the holder, and changes nothing.
    let logged = std::fs::read_to_string(dir.join("steps.jsonl")).unwrap().lines().count();
    let second = etpo(&["run", "--resume", "killed", "--no-progress"], tmp.path());
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("is in use by another etpo process (pid {})", child.id())), "{err}");
    assert!(std::fs::read_to_string(dir.join("steps.jsonl")).unwrap().lines().count() >= logged);
    child.kill().unwrap(); // SIGKILL: no chance to clean up; the kernel releases the lock
    child.wait().unwrap();
    let before = std::fs::read_to_string(dir.join("steps.jsonl")).unwrap().lines().count();
    assert!(before < 36, "the run was killed before it finished ({before} steps)");

    let out = etpo(&["run", "--resume", "killed", "--no-progress"], tmp.path());
    ok(&out);
    let want: Vec<String> = steps(&tmp.path().join("reference")).iter().map(essence).collect();
    let got: Vec<String> = steps(&dir).iter().map(essence).collect();
    assert_eq!(got.len(), 36, "2 seeds x 18 steps, none lost or repeated");
    let mut sorted_want = want.clone();
    let mut sorted_got = got.clone();
    sorted_want.sort();
    sorted_got.sort();
    assert_eq!(sorted_got, sorted_want, "the resumed run took exactly the steps of the uninterrupted one");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["resumed"].as_array().unwrap().len(), 1);
    // The summary counts every step once.
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("balance_scale,all,36,")), "{csv}");

    // A cut chosen so that seed 0's episode has just ended and seed 1's is in progress after a
    // failure (lines alternate seed 0, seed 1; action 2 of every 3 fails), plus a half-written
    // line, as a kill during a write leaves it.
    let cut = tmp.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    std::fs::copy(tmp.path().join("reference/config.json"), cut.join("config.json")).unwrap();
    let reference_text = std::fs::read_to_string(tmp.path().join("reference/steps.jsonl")).unwrap();
    let lines: Vec<&str> = reference_text.lines().collect();
    let last = steps(&tmp.path().join("reference"))[..5].to_vec();
    assert!(flag(&last[4], "terminated") && !flag(&last[3], "terminated") && !flag(&last[3], "truncated"));
    let partial = &lines[5][..lines[5].len() / 2];
    std::fs::write(cut.join("steps.jsonl"), format!("{}\n{partial}", lines[..5].join("\n"))).unwrap();
    let out = etpo(&["run", "--resume", "cut", "--no-progress"], tmp.path());
    ok(&out);
    let mut got: Vec<String> = steps(&cut).iter().map(essence).collect();
    got.sort();
    assert_eq!(got, sorted_want, "resumed from the cut, the log holds exactly the uninterrupted run's steps");
}

#[test]
fn ctrl_c_stops_after_the_current_step_and_writes_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let actions = slow_actions(30);
    write_actions(&tmp.path().join("actions"), &actions.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = tmp.path().join("run");
    let mut child = Command::new(ETPO)
        .args([
            "run",
            balance_scale().to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--steps",
            "30",
            "--seeds",
            "0",
            "--workers",
            "1",
            "--out",
            "run",
            "--no-progress",
        ])
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&dir.join("steps.jsonl"), 3, &mut child);
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let n = steps(&dir).len();
    assert!(n < 30, "stopped early");
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    assert!(
        csv.lines().any(|l| l.starts_with(&format!("balance_scale,all,{n},"))),
        "summary of the {n} steps taken: {csv}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
}

#[test]
fn resume_refuses_a_changed_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("bs.yaml");
    std::fs::copy(balance_scale(), &spec).unwrap();
    write_actions(&tmp.path().join("actions"), &["GaussianNB()"]);
    let out = etpo(
        &[
            "run",
            "bs.yaml",
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--steps",
            "1",
            "--seeds",
            "0",
            "--workers",
            "1",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    // A second run into the same folder is refused rather than mixed in.
    let again = etpo(&["run", "bs.yaml", "--policy", "scripted", "--actions", "actions", "--out", "run"], tmp.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    let text = std::fs::read_to_string(&spec).unwrap().replace("max_steps: 5", "max_steps: 4");
    std::fs::write(&spec, text).unwrap();
    let out = etpo(&["run", "--resume", "run"], tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bs.yaml") && err.contains("changed"), "{err}");
}

#[test]
fn the_budget_and_sampling_come_from_the_spec_unless_given() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(balance_scale()).unwrap();
    assert!(!text.contains("\ntraining:"), "the test adds its own training block");
    let spec = tmp.path().join("bs.yaml");
    std::fs::write(&spec, format!("{text}\ntraining:\n  steps: 2\n  temperature: 0.8\n")).unwrap();
    let model = tmp.path().join("tiny-model");
    write_tiny_model(&model);
    let out = etpo(
        &[
            "run",
            "bs.yaml",
            "--model",
            "tiny-model",
            "--seeds",
            "0",
            "--top-k",
            "0",
            "--workers",
            "1",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let dir = run_dir(tmp.path());
    assert_eq!(steps(&dir).len(), 2, "training.steps is the budget");
    assert!(!dir.join("test.csv").exists(), "no test part, no test score");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["specs"][0]["steps"], 2);
    assert_eq!(config["specs"][0]["sampling"], serde_json::json!({"temperature": 0.8, "top_k": null, "top_p": null}));
}

/// With `dataset.test_fraction`, the action of each seed's best validation reward is scored once
/// on the held-out test rows, equal to plain scikit-learn fitted on the training rows; the
/// validation rewards are those of the shrunken validation part.
#[test]
fn the_best_action_is_scored_once_on_the_held_out_test_part() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(balance_scale()).unwrap();
    let with_test = text.replacen("  test_fraction: 0.2\n", "  test_fraction: 0.25\n", 1);
    assert_ne!(with_test, text, "the shipped spec holds out a test part");
    let spec_path = tmp.path().join("bs.yaml");
    std::fs::write(&spec_path, with_test).unwrap();
    write_actions(&tmp.path().join("actions"), &["GaussianNB()", "LogisticRegression(max_iter=1000)", "Broken("]);
    let out = etpo(
        &["run", "bs.yaml", "--policy", "scripted", "--actions", "actions", "--steps", "3", "--seeds", "0,1"]
            .into_iter()
            .chain(["--workers", "1", "--out", "run", "--no-progress"])
            .collect::<Vec<_>>(),
        tmp.path(),
    );
    let stdout = ok(&out);
    let dir = run_dir(tmp.path());
    let records = steps(&dir);
    let spec = envspec::load(&spec_path).unwrap();
    let dataset = envspec::data::load_for(&spec.dataset, spec.path.parent().unwrap()).unwrap();
    let imports = "from sklearn.linear_model import LogisticRegression\nfrom sklearn.naive_bayes import GaussianNB";
    let csv = std::fs::read_to_string(dir.join("test.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    for (seed, row) in [0u64, 1].into_iter().zip(&rows) {
        let split = dataset.split_for(&spec.dataset, seed);
        assert!(!split.y_test.is_empty() && split.x_val.len() + split.x_test.len() == split.x_train.len() + 1);
        let r = records_of(&records, seed);
        // Rewards are on the validation rows only.
        let nb = sklearn_auc(&split, imports, "GaussianNB()", "ovo");
        let lr = sklearn_auc(&split, imports, "LogisticRegression(max_iter=1000)", "ovo");
        assert!((num(r[0], "reward") - nb).abs() < 1e-9 && (num(r[1], "reward") - lr).abs() < 1e-9);
        let (best, estimator) = if lr > nb { (lr, "LogisticRegression(max_iter=1000)") } else { (nb, "GaussianNB()") };
        // The test score: the same estimator, fitted on the training rows, scored on the test rows.
        let test_split =
            envspec::data::Split { x_val: split.x_test.clone(), y_val: split.y_test.clone(), ..split.clone() };
        let test = sklearn_auc(&test_split, imports, estimator, "ovo");
        assert_eq!((row[0], row[1]), ("balance_scale", seed.to_string().as_str()));
        assert_eq!(row[3], format!("{best:.4}"), "{row:?}");
        assert_eq!(row[4], format!("{test:.4}"), "{row:?}");
        assert_eq!(row[5], format!("{:.4}", best - test), "{row:?}");
    }
    assert!(stdout.contains("## Held-out test score of the best action"), "{stdout}");
}

#[test]
fn the_algorithm_comes_from_the_spec_unless_given() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(balance_scale()).unwrap();
    let pinned = |name: &str, algorithm: &str| {
        let body = text.replacen("name: balance_scale", &format!("name: {name}"), 1);
        assert_ne!(body, text, "the spec is named balance_scale");
        std::fs::write(
            tmp.path().join(format!("{name}.yaml")),
            format!("{body}\ntraining:\n  steps: 2\n  algorithm: {algorithm}\n"),
        )
        .unwrap();
    };
    pinned("a", "ppo-kl");
    pinned("b", "etpo");
    write_tiny_model(&tmp.path().join("tiny-model"));
    let run = |specs: &[&str], extra: &[&str], out: &str| {
        let mut args = vec!["run"];
        args.extend(specs);
        args.extend(["--model", "tiny-model", "--seeds", "0", "--workers", "1", "--no-progress", "--out", out]);
        args.extend(extra);
        etpo(&args, tmp.path())
    };
    let algo_of = |out: &str| -> Value {
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join(out).join("config.json")).unwrap()).unwrap();
        config["config"]["algo"].clone()
    };
    ok(&run(&["a.yaml"], &[], "pinned"));
    assert_eq!(algo_of("pinned"), "ppo-kl", "the spec's training.algorithm is used");
    assert!(
        tmp.path().join("pinned/metrics.jsonl").exists() || tmp.path().join("pinned/checkpoint.safetensors").exists(),
        "PPO-KL trained"
    );
    ok(&run(&["a.yaml", "b.yaml"], &["--algo", "reflection"], "given"));
    assert_eq!(algo_of("given"), "reflection", "--algo wins over the specs");
    let out = run(&["a.yaml", "b.yaml"], &[], "mixed");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a.yaml pins training.algorithm ppo-kl but") && err.contains("b.yaml pins etpo"), "{err}");
    assert!(!tmp.path().join("mixed").exists(), "nothing is written");
}

#[test]
fn a_tiny_model_runs_the_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny-model");
    write_tiny_model(&model);
    let out = etpo(
        &[
            "run",
            balance_scale().to_str().unwrap(),
            "--model",
            "tiny-model",
            "--steps",
            "3",
            "--seeds",
            "0,1",
            "--workers",
            "1",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let dir = run_dir(tmp.path());
    let records = steps(&dir);
    assert_eq!(records.len(), 6);
    let max_steps = load(&balance_scale(), 0).spec.max_steps;
    for seed in [0u64, 1] {
        let r = records_of(&records, seed);
        assert_eq!(r.iter().map(|r| field(r, "env_step").as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
        for rec in r {
            assert!(num(rec, "gen_s") > 0.0, "generation was timed: {rec}");
            let reward = num(rec, "reward");
            if flag(rec, "ran") {
                assert!((0.0..=1.0).contains(&reward));
            } else {
                assert_eq!(reward, -1.0);
                assert!(!text(rec, "error").is_empty());
            }
            assert!(field(rec, "step").as_u64().unwrap() < u64::from(max_steps));
        }
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let files = config["model"].as_array().unwrap();
    assert!(files
        .iter()
        .any(|f| f["path"].as_str().unwrap().ends_with("model.safetensors") && f["sha256"].is_string()));
}

#[test]
fn the_generation_weights_are_chosen_on_the_command_line_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(&tmp.path().join("tiny-model"));
    let spec = balance_scale();
    let run = |weights: &str, out: &str| {
        let args = ["run", spec.to_str().unwrap(), "--model", "tiny-model", "--steps", "1", "--seeds", "0"];
        etpo(&[&args[..], &["--generation-weights", weights, "--out", out, "--no-progress"]].concat(), tmp.path())
    };
    let out = run("f32", "exact");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("sampling with f32 weights"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("exact/config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["generation_weights"], "f32");
    let out = etpo(
        &[
            "run",
            spec.to_str().unwrap(),
            "--model",
            "tiny-model",
            "--steps",
            "1",
            "--seeds",
            "0",
            "--out",
            "default",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("sampling with quantized weights"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("default/config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["generation_weights"], "quantized", "the default is recorded too");
    let out = run("int3", "bad");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--generation-weights") && err.contains("expected f32 or quantized"), "{err}");
    assert!(!tmp.path().join("bad").exists(), "nothing is written for a bad flag");
}

/// Issue 11's check: the embedded default model, on the default Balance Scale spec, takes at
/// least one action that runs within a small budget.
#[test]
fn the_default_model_finds_a_runnable_action_on_balance_scale() {
    let model = trainer::default_model_path();
    assert!(model.is_file(), "{} is missing: run `scripts/setup.sh model` first", model.display());
    let tmp = tempfile::tempdir().unwrap();
    let out = etpo(
        &[
            "run",
            balance_scale().to_str().unwrap(),
            "--steps",
            "8",
            "--seeds",
            "0,1,2",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let records = steps(&run_dir(tmp.path()));
    assert_eq!(records.len(), 24);
    let ran: Vec<f64> = records.iter().filter(|r| flag(r, "ran")).map(|r| num(r, "reward")).collect();
    assert!(
        ran.iter().any(|&r| r >= 0.0),
        "no action of the default model ran in 24 steps; actions: {:?}",
        records.iter().map(|r| text(r, "action")).collect::<Vec<_>>()
    );
}

#[test]
fn mean_of_splits_averages_the_auc_over_the_documented_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("bs3.yaml");
    let text = std::fs::read_to_string(balance_scale()).unwrap();
    assert!(text.contains("evaluation: single_split"));
    std::fs::write(&spec, text.replace("evaluation: single_split", "evaluation: {mean_of_splits: 3}")).unwrap();
    write_actions(&tmp.path().join("actions"), &["LogisticRegression(max_iter=1000)"]);
    let out = etpo(
        &[
            "run",
            "bs3.yaml",
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--steps",
            "1",
            "--seeds",
            "4",
            "--workers",
            "2",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let records = steps(&run_dir(tmp.path()));
    assert_eq!(records.len(), 1);

    // Env::new: the seed's own split, then two split seeds drawn from SplitMix64::new(seed).
    let l = load(&spec, 4);
    let dataset = envspec::data::load_for(&l.spec.dataset, l.spec.path.parent().unwrap()).unwrap();
    let mut rng = envspec::data::SplitMix64::new(4);
    let seeds = [4, rng.next_u64(), rng.next_u64()];
    let imports = "from sklearn.linear_model import LogisticRegression";
    let aucs: Vec<f64> = seeds
        .iter()
        .map(|&s| {
            let split = dataset.split_for(&l.spec.dataset, s);
            sklearn_auc(&split, imports, "LogisticRegression(max_iter=1000)", "ovo")
        })
        .collect();
    let want = aucs.iter().sum::<f64>() / 3.0;
    assert!(aucs[0] != aucs[1] || aucs[1] != aucs[2], "three different splits");
    assert!(
        (num(&records[0], "reward") - want).abs() < 1e-9,
        "etpo {} vs sklearn {want} ({aucs:?})",
        num(&records[0], "reward")
    );
}
