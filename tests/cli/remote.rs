//! `etpo run --remote`: the run loop's environments on `etpo serve` servers, end to end through
//! the binary. A remote run logs exactly the steps of the same run made locally (every field
//! but the timings, compared as the JSON text), also when a server is killed mid-run (its
//! episodes move to the other server by replay) and across a resume after every server died.
//!
//! They need the project's Python environment (`scripts/setup.sh python`) and the games (built
//! here, as in `games.rs`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use serde_json::Value;

use crate::common::{balance_scale, ok, repo, venv_python, ETPO};

fn etpo(args: &[String], cwd: &Path) -> Output {
    Command::new(ETPO).args(args).current_dir(cwd).output().expect("the etpo binary runs")
}

fn guess() -> PathBuf {
    repo().join("envs/games/guess.yaml")
}

fn adventure() -> PathBuf {
    repo().join("envs/games/adventure.yaml")
}

/// An `etpo serve` process; killed (SIGKILL) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Serves `specs` on `listen` (`127.0.0.1:0`: a free port) with one sandbox worker.
    fn start(specs: &[PathBuf], listen: &str) -> Server {
        crate::games::games();
        let mut child = Command::new(ETPO)
            .arg("serve")
            .args(specs)
            .args(["--listen", listen, "--workers", "1", "--python"])
            .arg(venv_python())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etpo serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads stderr to its end, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(Ok(rest.split_whitespace().next().unwrap_or_default().to_string()));
                }
                lines.push(line);
            }
            let _ = tx.send(Err(lines.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(url)) => {
                assert!(url.starts_with("http://127.0.0.1:"), "{url}");
                Server { child, url }
            }
            Ok(Err(stderr)) => panic!("etpo serve exited before listening:\n{stderr}"),
            Err(_) => panic!("etpo serve did not say where it listens within 2 minutes"),
        }
    }

    /// `host:port`.
    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL: the server gets no chance to answer anything
        self.child.wait().unwrap();
    }

    fn get(&self, path: &str) -> String {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
        agent.get(format!("{}{path}", self.url)).call().unwrap().body_mut().read_to_string().unwrap()
    }

    /// A Prometheus value of the server's `/metrics`: the line that starts with `series `.
    fn metric(&self, series: &str) -> u64 {
        let text = self.get("/metrics");
        let line = text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or("0 0");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_actions(dir: &Path, actions: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, a) in actions.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:03}.txt")), a).unwrap();
    }
}

/// The arguments of an `etpo run` of `specs` with the scripted actions of `actions/`, two seeds,
/// `steps` steps, into `out`, on `remote` servers if any.
fn run_args(specs: &[PathBuf], steps: u32, out: &str, remote: &[&Server]) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(specs.iter().map(|p| p.display().to_string()));
    let steps = steps.to_string();
    let rest = ["--policy", "scripted", "--actions", "actions", "--steps", &steps, "--seeds", "0,1"];
    args.extend(rest.iter().map(|s| s.to_string()));
    args.extend(["--workers", "1", "--out", out, "--no-progress"].iter().map(|s| s.to_string()));
    if !remote.is_empty() {
        args.push("--remote".into());
        args.push(remote.iter().map(|s| s.url.clone()).collect::<Vec<_>>().join(","));
    }
    args
}

/// The fields of a step record that do not measure time, as their JSON text (so that a reward
/// one unit in the last place off differs), in the order `essence` in run.rs lists them.
fn essence(line: &str) -> String {
    let record: BTreeMap<String, Box<RawValue>> = serde_json::from_str(line).unwrap();
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
    keys.iter()
        .map(|k| record.get(*k).unwrap_or_else(|| panic!("no {k} in {line}")).get())
        .collect::<Vec<_>>()
        .join("|")
}

fn essences(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("steps.jsonl")).unwrap().lines().map(essence).collect()
}

/// Asserts that two runs logged the same steps, showing the first that differs.
fn assert_same_steps(got: &[String], want: &[String], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: {} steps against {} locally; the first difference, line {}:\n  got:  {:?}\n  want: {:?}",
            got.len(),
            want.len(),
            i + 1,
            got.get(i),
            want.get(i)
        );
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wait_for_lines(path: &Path, n: usize, child: &mut Child) -> usize {
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
        if lines >= n {
            return lines;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("etpo exited ({status}) before writing {n} steps");
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no progress in steps.jsonl");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Balance Scale episodes of three steps (two failures, then an action that runs after a
/// sleep, so that a run lasts long enough to be cut), and guesses that do not win at once.
fn slow_actions(tmp: &Path, steps: usize) {
    let bs: Vec<String> = (0..steps)
        .map(|i| match i % 3 {
            2 => format!("__import__('time').sleep(0.3) or LogisticRegression(C={}.5, max_iter=500)", i % 5),
            _ => format!("Missing{i}()"),
        })
        .collect();
    write_actions(&tmp.join("actions/balance_scale"), &bs);
    let guesses: Vec<String> = (0..steps).map(|i| format!("{}", 3 + 7 * i)).collect();
    write_actions(&tmp.join("actions/guess"), &guesses);
}

#[test]
fn a_remote_run_logs_the_steps_of_the_local_run_and_refuses_another_spec_version() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let specs = vec![balance_scale(), guess(), adventure()];
    let bs = ["UndefinedClassifier()", "LogisticRegression(max_iter=1000)", "Nope(", "bad syntax (", "GaussianNB()"];
    write_actions(&t.join("actions/balance_scale"), &bs.map(String::from));
    write_actions(&t.join("actions/guess"), &["50", "25 is my guess", "36", "10", "90"].map(String::from));
    write_actions(&t.join("actions/adventure"), &["look", "go north", "take lamp", "xyzzy", "south"].map(String::from));
    let a = Server::start(&specs, "127.0.0.1:0");
    let b = Server::start(&specs, "127.0.0.1:0");

    ok(&etpo(&run_args(&specs, 5, "local", &[]), t));
    let out = etpo(&run_args(&specs, 5, "remote", &[&a, &b]), t);
    ok(&out);
    let want = essences(&t.join("local"));
    assert_eq!(want.len(), 3 * 2 * 5);
    assert_same_steps(&essences(&t.join("remote")), &want, "the same steps, in the same order, byte for byte");
    // Both servers stepped episodes (6 slots, round-robin), and every episode was closed.
    for s in [&a, &b] {
        assert!(s.metric("etpo_serve_requests_total{endpoint=\"/step\",status=\"200\"}") > 0, "{}", s.url);
        assert_eq!(s.metric("etpo_serve_episodes_open"), 0, "{}", s.url);
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(t.join("remote/config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["remote"], serde_json::json!([a.url, b.url]));
    let local: Value = serde_json::from_str(&std::fs::read_to_string(t.join("local/config.json")).unwrap()).unwrap();
    assert!(local["config"].get("remote").is_none(), "a local run records no servers");
    // The shipped Balance Scale holds out a test part: the servers score each seed's best action
    // on it (`POST /score_test`), exactly as the local sandbox does.
    let test_csv = |run: &str| std::fs::read_to_string(t.join(run).join("test.csv")).unwrap();
    assert_eq!(test_csv("remote"), test_csv("local"));
    assert_eq!(test_csv("local").lines().count(), 3, "a header and one row per seed:\n{}", test_csv("local"));
    let asked: u64 =
        [&a, &b].iter().map(|s| s.metric("etpo_serve_requests_total{endpoint=\"/score_test\",status=\"200\"}")).sum();
    assert_eq!(asked, 2, "one test score per seed");

    // A server with another version of a spec (one comment changed) is refused before anything
    // is written; so is one that does not serve a spec of the run.
    let changed = t.join("guess.yaml");
    let text = std::fs::read_to_string(guess()).unwrap().replace(
        "../../games/target/wasm32-unknown-unknown/release/guess.wasm",
        &crate::games::games().join("guess.wasm").display().to_string(),
    );
    std::fs::write(&changed, format!("# changed\n{text}")).unwrap();
    let other = Server::start(&[changed, balance_scale()], "127.0.0.1:0");
    let out = etpo(&run_args(&[balance_scale(), guess()], 2, "refused", &[&a, &other]), t);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("etpo server {}: serves another version of spec \"guess\": the sha256", other.url)),
        "{err}"
    );
    let out = etpo(&run_args(&[adventure()], 2, "refused", &[&other]), t);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not serve spec \"adventure\" (it serves: balance_scale, guess)"),
        "{}",
        stderr(&out)
    );
    assert!(!t.join("refused").exists(), "nothing is written for a refused run");
}

#[test]
fn a_server_killed_mid_run_hands_its_episodes_to_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let specs = vec![balance_scale(), guess()];
    let steps = 12;
    slow_actions(t, steps);
    let mut a = Server::start(&specs, "127.0.0.1:0");
    let b = Server::start(&specs, "127.0.0.1:0");
    ok(&etpo(&run_args(&specs, steps as u32, "local", &[]), t));

    let mut child = Command::new(ETPO)
        .args(run_args(&specs, steps as u32, "remote", &[&a, &b]))
        .current_dir(t)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let total = 2 * 2 * steps;
    // Slots alternate a, b: a has balance_scale seed 0 and guess seed 0.
    let at_kill = wait_for_lines(&t.join("remote/steps.jsonl"), 9, &mut child);
    a.kill();
    let out = child.wait_with_output().unwrap();
    ok(&out);
    assert!(at_kill < total, "the server was killed before the run ended ({at_kill} of {total} steps)");
    let err = stderr(&out);
    assert!(err.contains(&format!("warning: etpo server {} is down", a.url)), "{err}");
    assert_same_steps(&essences(&t.join("remote")), &essences(&t.join("local")), "nothing lost, repeated or changed");
    assert_eq!(b.metric("etpo_serve_episodes_open"), 0);
}

#[test]
fn when_every_server_dies_the_run_stops_and_resumes_on_its_servers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let specs = vec![balance_scale(), guess()];
    let steps = 12;
    slow_actions(t, steps);
    let mut a = Server::start(&specs, "127.0.0.1:0");
    let mut b = Server::start(&specs, "127.0.0.1:0");
    ok(&etpo(&run_args(&specs, steps as u32, "local", &[]), t));

    let mut child = Command::new(ETPO)
        .args(run_args(&specs, steps as u32, "remote", &[&a, &b]))
        .current_dir(t)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let at_kill = wait_for_lines(&t.join("remote/steps.jsonl"), 9, &mut child);
    a.kill();
    b.kill();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error: every etpo server is down: "), "{err}");
    assert!(err.contains(&format!("{} (", a.url)) && err.contains(&format!("{} (", b.url)), "{err}");
    assert!(err.contains("continue with `etpo run --resume remote`"), "{err}");
    let logged = std::fs::read_to_string(t.join("remote/steps.jsonl")).unwrap().lines().count();
    assert!(at_kill <= logged && logged < 2 * 2 * steps, "{logged} steps");
    assert!(t.join("remote/summary.csv").exists(), "the summaries are written from the log");

    // One server comes back at its address: the resumed run finds it among the recorded servers
    // (the other is still down) and finishes there, replaying the episodes that were running.
    let back = Server::start(&specs, a.addr());
    assert_eq!(back.url, a.url);
    let out = etpo(&["run", "--resume", "remote", "--no-progress"].map(String::from), t);
    ok(&out);
    let err = stderr(&out);
    assert!(err.contains(&format!("warning: etpo server {} is down", b.url)), "{err}");
    let mut got = essences(&t.join("remote"));
    let mut want = essences(&t.join("local"));
    // The round cut by the failure was logged in part, so the order differs; the steps do not.
    got.sort();
    want.sort();
    assert_same_steps(&got, &want, "the stopped and resumed run took exactly the local run's steps");
}
