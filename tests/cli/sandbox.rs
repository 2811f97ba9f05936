//! End-to-end tests of the sandbox through `etpo exec`, the way a user debugging a spec runs it:
//! every hostile action must be contained (a clean error, exit status 0, nothing left on the
//! host), and a normal action's reward must equal plain scikit-learn's on the same split.
//!
//! They need the project's Python environment (`scripts/setup.sh python`).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::ETPO;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `scripts/setup.sh python` first (these tests run real scikit-learn programs)",
        python.display()
    );
    python
}

/// The default spec with small limits, so that the hostile actions end quickly.
fn spec() -> &'static Path {
    static SPEC: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &SPEC
        .get_or_init(|| {
            let text = std::fs::read_to_string(repo().join("envs/balance_scale.yaml")).unwrap();
            let start = text.find("\nlimits:\n").expect("the default spec has a limits section") + 1;
            let end = text[start..].find("\n\n").map_or(text.len(), |e| start + e);
            let small = "limits:\n  wall_s: 3\n  cpu_s: 3\n  memory_mb: 512\n  output_kb: 16\n  max_processes: 32";
            let text = format!("{}{}{}", &text[..start], small, &text[end..]);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("small_limits.yaml");
            std::fs::write(&path, text).unwrap();
            (dir, path)
        })
        .1
}

/// Runs `etpo exec --json` on `program`; checks the exit status is 0 and that no sandbox of that
/// process is left on the host; returns the JSON report.
fn exec(program: &str) -> Value {
    venv_python();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("action.py");
    std::fs::write(&file, program).unwrap();
    let child = Command::new(ETPO)
        .args(["exec", spec().to_str().unwrap(), file.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the etpo binary runs");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "etpo exec failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let leftovers = sandbox_cgroups_of(pid);
    assert!(leftovers.is_empty(), "sandboxes left behind: {leftovers:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The sandbox cgroups created by process `pid` that still exist (a cgroup can only be removed
/// once every process in it is gone).
fn sandbox_cgroups_of(pid: u32) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut found = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let dir = if ctrl.is_empty() {
            PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'))
        } else if ctrl == "memory" || ctrl == "pids" {
            PathBuf::from("/sys/fs/cgroup").join(ctrl).join(path.trim_start_matches('/'))
        } else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let prefix = format!("etpo-{pid}-");
        found.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))),
        );
    }
    found
}

fn failed(report: &Value) -> (String, String) {
    assert_eq!(report["ran"], false, "expected a failure: {report}");
    assert_eq!(report["reward"], -1.0, "{report}");
    (report["kind"].as_str().unwrap_or("").to_string(), report["error"].as_str().unwrap_or("").to_string())
}

const NORMAL: &str = "\
from sklearn.ensemble import RandomForestClassifier
def build_model(x_train, y_train):
    return RandomForestClassifier(n_estimators=30, random_state=0).fit(x_train, y_train)
";

/// ROC AUC (one-vs-one macro) of `NORMAL`'s estimator fitted by plain scikit-learn on the spec's
/// seed-0 split, computed by scikit-learn itself on the host.
fn sklearn_reward() -> f64 {
    let spec = envspec::load(spec()).unwrap();
    let data = envspec::data::load_for(&spec.dataset, spec.path.parent().unwrap()).unwrap();
    let split = data.split_for(&spec.dataset, 0);
    let input = serde_json::json!({"x_train": split.x_train, "y_train": split.y_train, "x_val": split.x_val, "y_val": split.y_val});
    let script = "import json, sys\nimport numpy as np\nfrom sklearn.ensemble import RandomForestClassifier\n\
                  from sklearn.metrics import roc_auc_score\nd = json.load(sys.stdin)\n\
                  m = RandomForestClassifier(n_estimators=30, random_state=0).fit(np.array(d['x_train']), np.array(d['y_train']))\n\
                  p = m.predict_proba(np.array(d['x_val']))\n\
                  print(repr(float(roc_auc_score(d['y_val'], p, multi_class='ovo', labels=list(range(p.shape[1]))))))\n";
    let mut child = Command::new(venv_python())
        .args(["-c", script])
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn normal_action_reward_equals_plain_scikit_learn() {
    let report = exec(NORMAL);
    assert_eq!(report["ran"], true, "{report}");
    assert!(report["error"].is_null());
    let reward = report["reward"].as_f64().unwrap();
    let want = sklearn_reward();
    assert!((reward - want).abs() < 1e-9, "etpo {reward} vs scikit-learn {want}");
    for key in ["wall_s", "cpu_s", "peak_rss_mb"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
}

#[test]
fn generated_text_is_assembled_as_in_training() {
    let report = exec("RandomForestClassifier(n_estimators=30, random_state=0)\nthe model rambles on here");
    assert_eq!(report["assembled"], true);
    assert_eq!(report["ran"], true, "{report}");
    assert!((report["reward"].as_f64().unwrap() - sklearn_reward()).abs() < 1e-9);
    let report = exec("TreeClassifier()");
    let (kind, error) = failed(&report);
    assert_eq!(kind, "Exception");
    assert!(error.ends_with("NameError: name 'TreeClassifier' is not defined"), "{error}");
}

#[test]
fn resource_bombs_are_contained() {
    let fork_bomb = "import os\ndef build_model(x_train, y_train):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n";
    assert!(["Timeout", "Memory"].contains(&failed(&exec(fork_bomb)).0.as_str()));
    let memory_bomb =
        "def build_model(x_train, y_train):\n    a = []\n    while True:\n        a.append(bytearray(100 << 20))\n";
    let (kind, error) = failed(&exec(memory_bomb));
    assert!(
        kind == "Memory" && error.starts_with("the program exceeded the memory limit of 512 MB"),
        "{kind}: {error}"
    );
    let (kind, error) = failed(&exec("def build_model(x_train, y_train):\n    while True:\n        pass\n"));
    assert_eq!(kind, "Timeout");
    assert!(error.contains("limit of 3 s"), "{error}");
    let threads = "import threading\ndef spin():\n    while True:\n        pass\ndef build_model(x_train, y_train):\n    for _ in range(4):\n        threading.Thread(target=spin, daemon=True).start()\n    spin()\n";
    assert_eq!(failed(&exec(threads)).0, "Timeout");
}

#[test]
fn waiting_and_ignoring_signals_hit_the_deadline() {
    let (kind, error) =
        failed(&exec("import time\ndef build_model(x_train, y_train):\n    print('waiting')\n    time.sleep(60)\n"));
    assert_eq!(
        (kind.as_str(), error.as_str()),
        ("Timeout", "the program did not finish within the wall-clock limit of 3 s")
    );
    let sigterm = "import signal, time\ndef build_model(x_train, y_train):\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(60)\n";
    assert_eq!(failed(&exec(sigterm)).0, "Timeout");
}

#[test]
fn processes_left_behind_are_killed() {
    let left = "import os, time\nfrom sklearn.ensemble import RandomForestClassifier\ndef build_model(x_train, y_train):\n    if os.fork() == 0:\n        time.sleep(1000)\n        os._exit(0)\n    return RandomForestClassifier(n_estimators=30, random_state=0).fit(x_train, y_train)\n";
    let report = exec(left);
    assert_eq!(report["ran"], true, "{report}");
    assert!(report["wall_s"].as_f64().unwrap() < 2.5, "{report}");
    let escape = "import os\nfrom sklearn.ensemble import RandomForestClassifier\ndef build_model(x_train, y_train):\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n            while True:\n                pass\n        os._exit(0)\n    return RandomForestClassifier(n_estimators=30, random_state=0).fit(x_train, y_train)\n";
    let report = exec(escape);
    assert_eq!(report["ran"], true, "{report}");
    let kill_parent = "import os, signal\ndef build_model(x_train, y_train):\n    for pid in (os.getppid(), 1, -1):\n        try:\n            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    raise RuntimeError('still here')\n";
    assert!(failed(&exec(kill_parent)).1.ends_with("RuntimeError: still here"));
}

#[test]
fn network_files_and_syscalls_are_refused() {
    let tcp = "import socket\ndef build_model(x_train, y_train):\n    res = []\n    for host in ('127.0.0.1', '1.1.1.1'):\n        try:\n            socket.create_connection((host, 80), timeout=1)\n            res.append('connected')\n        except OSError as e:\n            res.append(type(e).__name__)\n    raise RuntimeError(','.join(res))\n";
    assert!(failed(&exec(tcp)).1.ends_with("RuntimeError: PermissionError,PermissionError"));

    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let targets = [
        "/etc/shadow".to_string(),
        format!("{home}/.bashrc"),
        repo().join("Cargo.toml").display().to_string(),
        repo().join("envs/balance_scale.yaml").display().to_string(),
        spec().display().to_string(),
    ];
    let read = format!(
        "def build_model(x_train, y_train):\n    res = []\n    for p in {targets:?}:\n        try:\n            open(p).read()\n            res.append('read ' + p)\n        except OSError as e:\n            res.append(type(e).__name__)\n    raise RuntimeError(' '.join(res))\n"
    );
    let error = failed(&exec(&read)).1;
    assert!(!error.contains("read "), "{error}");

    let evil = repo().join("etpo-sandbox-evil");
    let write = format!(
        "def build_model(x_train, y_train):\n    res = []\n    for p in ['/etpo-evil', '/usr/etpo-evil', {:?}]:\n        try:\n            open(p, 'w').write('x')\n            res.append('wrote')\n        except OSError as e:\n            res.append(type(e).__name__)\n    raise RuntimeError(' '.join(res))\n",
        evil.display().to_string()
    );
    let error = failed(&exec(&write)).1;
    assert!(!error.contains("wrote"), "{error}");
    assert!(!evil.exists() && !Path::new("/etpo-evil").exists());

    let ctypes = "import ctypes, os\ndef build_model(x_train, y_train):\n    libc = ctypes.CDLL(None, use_errno=True)\n    r = libc.unshare(0x10000000)\n    raise RuntimeError('%d %s' % (r, os.strerror(ctypes.get_errno())))\n";
    assert!(failed(&exec(ctypes)).1.ends_with("RuntimeError: -1 Operation not permitted"));

    let shell = format!(
        "import subprocess\ndef build_model(x_train, y_train):\n    r = subprocess.run(['/bin/sh', '-c', 'cat {}/Cargo.toml /etc/shadow; echo done'], capture_output=True, text=True)\n    raise RuntimeError(r.stdout)\n",
        repo().display()
    );
    assert!(failed(&exec(&shell)).1.ends_with("RuntimeError: done"));
}

#[test]
fn labels_cannot_be_found() {
    let hunt = "\
import gc, inspect, os
def build_model(x_train, y_train):
    hits = [k for o in gc.get_objects() if isinstance(o, dict) for k in list(o) if isinstance(k, str) and 'y_val' in k]
    f = inspect.currentframe()
    while f is not None:
        hits += [k for k in f.f_locals if 'val' in k and k != 'x_val']
        f = f.f_back
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                if b'y_val' in open('/proc/%s/environ' % pid, 'rb').read():
                    hits.append(pid)
            except OSError:
                pass
    raise RuntimeError('found %s' % hits)
";
    assert!(failed(&exec(hunt)).1.ends_with("RuntimeError: found []"));
}

#[test]
fn a_gigabyte_of_stdout_is_capped() {
    let flood = "import sys\ndef build_model(x_train, y_train):\n    s = 'x' * (1 << 20)\n    for _ in range(1024):\n        sys.stdout.write(s)\n    raise RuntimeError('printed')\n";
    let report = exec(flood);
    assert!(failed(&report).1.ends_with("RuntimeError: printed"));
    let output = report["output"].as_str().unwrap();
    assert!(
        output.len() <= 16 * 1024 + 64 && output.ends_with("[output truncated at 16 KB]"),
        "{} bytes",
        output.len()
    );
}

#[test]
fn broken_predict_proba_is_explained() {
    let model = |body: &str| {
        format!("import numpy as np, time\nclass M:\n    classes_ = np.array([0, 1, 2])\n    def predict_proba(self, x):\n        {body}\ndef build_model(x_train, y_train):\n    return M()\n")
    };
    let (kind, error) = failed(&exec(&model("raise ValueError('nope')")));
    assert_eq!(
        (kind.as_str(), error.as_str()),
        ("BadPredictions", "line 5: raise ValueError('nope')\npredict_proba(x_val) raised ValueError: nope")
    );
    assert_eq!(failed(&exec(&model("time.sleep(60)"))).0, "Timeout");
    assert!(failed(&exec(&model("return np.full((len(x), 3), np.nan)"))).1.contains("NaN"));
    assert!(failed(&exec(&model("return np.zeros(len(x))"))).1.contains("returned an array of shape"));
    assert!(failed(&exec(&model("return np.full((len(x), 2), 0.5)")))
        .1
        .contains("2 columns but the model has 3 classes"));
    let (kind, error) = failed(&exec("def build_model(x_train, y_train)\n    return 1\n"));
    assert_eq!(kind, "Syntax");
    assert!(error.starts_with("line 1: def build_model(x_train, y_train)\nSyntaxError"), "{error}");
}

#[test]
fn broken_spec_is_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: [unclosed\n").unwrap();
    let action = dir.path().join("a.py");
    std::fs::write(&action, NORMAL).unwrap();
    let out = Command::new(ETPO).args(["exec", bad.to_str().unwrap(), action.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml"));
}
