//! Hostile and broken actions run in the real sandbox pool: each must be contained (the right
//! error, the host untouched) and the next, normal action must still evaluate correctly.
//!
//! Needs the project venv (`scripts/setup.sh python`) at `<repo>/.venv` or `$ETPO_PYTHON`.

use runtime::{ActionErrorKind as Kind, Job, Limits, Outcome, Pool, PoolConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const LIMITS: Limits = Limits { wall_s: 3.0, cpu_s: 3.0, memory_mb: 512, output_kb: 16, max_processes: 32 };

const NORMAL: &str = "\
from sklearn.linear_model import LogisticRegression
def build_model(x_train, y_train):
    model = LogisticRegression(max_iter=500)
    model.fit(x_train, y_train)
    return model
";

fn python() -> PathBuf {
    let p = runtime::default_python();
    assert!(
        p.is_absolute() && p.exists(),
        "the project venv is missing ({}): run scripts/setup.sh python, or set ETPO_PYTHON",
        p.display()
    );
    p
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        Pool::new(PoolConfig { workers: 2, python: python(), limits: LIMITS }).expect("the sandbox pool starts")
    })
}

struct Data {
    x_train: Vec<Vec<f64>>,
    y_train: Vec<usize>,
    x_val: Vec<Vec<f64>>,
    y_val: Vec<usize>,
}

/// A small two-class problem with signal and noise (deterministic).
fn data() -> &'static Data {
    static DATA: OnceLock<Data> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut rows = Vec::new();
        for i in 0..60 {
            let y = i % 2;
            let x = vec![y as f64 + rnd() * 1.5, rnd() * 2.0 - y as f64 * 0.5, rnd()];
            rows.push((x, y));
        }
        let (train, val) = rows.split_at(40);
        Data {
            x_train: train.iter().map(|r| r.0.clone()).collect(),
            y_train: train.iter().map(|r| r.1).collect(),
            x_val: val.iter().map(|r| r.0.clone()).collect(),
            y_val: val.iter().map(|r| r.1).collect(),
        }
    })
}

fn job(program: &str, limits: Limits) -> Job {
    let d = data();
    Job {
        program: program.to_string(),
        x_train: d.x_train.clone(),
        y_train: d.y_train.clone(),
        x_val: d.x_val.clone(),
        n_classes: 2,
        limits,
    }
}

fn run(program: &str) -> Outcome {
    run_with(program, LIMITS)
}

fn run_with(program: &str, limits: Limits) -> Outcome {
    pool().evaluate(&job(program, limits)).expect("no infrastructure fault")
}

/// predict_proba of the same LogisticRegression fitted by plain scikit-learn on the host.
fn reference() -> &'static Vec<Vec<f64>> {
    static REF: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    REF.get_or_init(|| {
        let d = data();
        let input = serde_json::json!({"x_train": d.x_train, "y_train": d.y_train, "x_val": d.x_val}).to_string();
        let script = "import json, sys\nimport numpy as np\nfrom sklearn.linear_model import LogisticRegression\n\
                      d = json.load(sys.stdin)\n\
                      m = LogisticRegression(max_iter=500).fit(np.array(d['x_train']), np.array(d['y_train']))\n\
                      print(json.dumps(m.predict_proba(np.array(d['x_val'])).tolist()))\n";
        let mut child = Command::new(python())
            .args(["-c", script])
            .env("OPENBLAS_NUM_THREADS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("host python runs");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    })
}

/// The normal action gives plain scikit-learn's probabilities.
fn assert_normal() {
    let out = run(NORMAL);
    assert_reference(&out);
}

/// `out` holds the reference probabilities (to 1e-12: the reference passes through JSON).
fn assert_reference(out: &Outcome) {
    let proba = out.result.as_ref().unwrap_or_else(|e| panic!("normal action failed: {e}"));
    let want = reference();
    assert_eq!(proba.len(), want.len());
    for (got, want) in proba.iter().zip(want) {
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "probability {g} differs from scikit-learn's {w}");
        }
    }
}

fn err(out: &Outcome) -> (&Kind, &str) {
    match &out.result {
        Err(e) => (&e.kind, e.message.as_str()),
        Ok(_) => panic!("expected the action to fail, it succeeded (output: {})", out.output),
    }
}

fn contained(program: &str, check: impl FnOnce(&Outcome)) {
    let out = run(program);
    check(&out);
    assert_normal();
}

#[test]
fn normal_action_matches_plain_scikit_learn_and_its_reward() {
    assert_normal();
    let proba = run(NORMAL).result.unwrap();
    let ours = runtime::metrics::roc_auc(&data().y_val, &proba, 2, runtime::metrics::Multiclass::Ovo).unwrap();
    let theirs = runtime::metrics::roc_auc(&data().y_val, reference(), 2, runtime::metrics::Multiclass::Ovo).unwrap();
    assert!((ours - theirs).abs() < 1e-12, "{ours} vs {theirs}");
    assert!(ours > 0.6, "the toy problem has signal, got AUC {ours}");
}

#[test]
fn unfitted_estimator_is_fitted_by_the_runtime() {
    let out = run("from sklearn.linear_model import LogisticRegression\ndef build_model(x_train, y_train):\n    return LogisticRegression(max_iter=500)\n");
    assert_reference(&out);
}

#[test]
fn fork_bomb() {
    contained(
        "import os\ndef build_model(x_train, y_train):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
        |o| assert!(matches!(err(o).0, Kind::Timeout | Kind::Memory), "{:?}", o.result),
    );
}

#[test]
fn memory_bomb() {
    // A generous wall-clock limit: only the memory limit may stop it, also on a loaded machine.
    let limits = Limits { wall_s: 20.0, ..LIMITS };
    let out = run_with(
        "def build_model(x_train, y_train):\n    a = []\n    while True:\n        a.append(bytearray(100 << 20))\n",
        limits,
    );
    let (kind, msg) = err(&out);
    assert_eq!(*kind, Kind::Memory, "{msg}");
    assert!(msg.starts_with("the program exceeded the memory limit of 512 MB"), "{msg}");
    assert_normal();
}

#[test]
fn memory_bomb_across_processes() {
    contained(
        "import os, time\ndef build_model(x_train, y_train):\n    for i in range(8):\n        if os.fork() == 0:\n            b = bytearray(200 << 20)\n            for j in range(0, len(b), 4096):\n                b[j] = 1\n            time.sleep(30)\n            os._exit(0)\n    time.sleep(30)\n",
        |o| assert!(matches!(err(o).0, Kind::Memory | Kind::Timeout), "{:?}", o.result),
    );
}

#[test]
fn infinite_loop_hits_the_wall_clock_limit() {
    let t = Instant::now();
    let limits = Limits { wall_s: 2.0, cpu_s: 10.0, ..LIMITS };
    let out = run_with("def build_model(x_train, y_train):\n    while True:\n        pass\n", limits);
    assert_eq!(err(&out), (&Kind::Timeout, "the program did not finish within the wall-clock limit of 2 s"));
    assert!(t.elapsed() < Duration::from_secs(6), "took {:?}", t.elapsed());
    assert_normal();
}

#[test]
fn busy_threads_hit_the_cpu_limit() {
    let limits = Limits { wall_s: 10.0, cpu_s: 2.0, ..LIMITS };
    let out = run_with(
        "import threading\ndef spin():\n    while True:\n        pass\ndef build_model(x_train, y_train):\n    for _ in range(4):\n        threading.Thread(target=spin, daemon=True).start()\n    spin()\n",
        limits,
    );
    assert_eq!(err(&out), (&Kind::Timeout, "the program exceeded the CPU time limit of 2 s"));
    assert_normal();
}

#[test]
fn sleeping_past_the_deadline() {
    contained("import time\ndef build_model(x_train, y_train):\n    time.sleep(60)\n", |o| {
        assert_eq!(*err(o).0, Kind::Timeout);
        assert!(o.wall_s < LIMITS.wall_s + 1.0, "wall {}", o.wall_s);
    });
}

#[test]
fn ignoring_sigterm() {
    contained(
        "import signal, time\ndef build_model(x_train, y_train):\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n    time.sleep(60)\n",
        |o| assert_eq!(*err(o).0, Kind::Timeout),
    );
}

/// An action that fails if any process but the worker and itself exists in the sandbox.
const CENSUS: &str = "\
import os
from sklearn.linear_model import LogisticRegression
def build_model(x_train, y_train):
    others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]
    if others:
        raise RuntimeError('processes left over: %s' % others)
    return LogisticRegression(max_iter=500).fit(x_train, y_train)
";

#[test]
fn child_left_running_is_killed() {
    let out = run(
        "import os, time\nfrom sklearn.linear_model import LogisticRegression\ndef build_model(x_train, y_train):\n    if os.fork() == 0:\n        time.sleep(1000)\n        os._exit(0)\n    return LogisticRegression(max_iter=500).fit(x_train, y_train)\n",
    );
    assert_reference(&out);
    assert!(out.wall_s < 2.0, "the job must end when build_model returns, took {}", out.wall_s);
    for _ in 0..4 {
        assert_reference(&run(CENSUS));
    }
}

/// A process a job leaves behind that kills every new process it sees: the child forked for the
/// next job must never exist beside it while it can still run (the worker forks that child only
/// after SIGKILL has reached every process of the job), so the next actions are normal.
#[test]
fn leftovers_cannot_touch_the_next_jobs_child() {
    let program = "import os, signal\nfrom sklearn.linear_model import LogisticRegression\ndef build_model(x_train, y_train):\n    parent = os.getpid()\n    if os.fork() == 0:\n        os.setsid()\n        while True:\n            for p in os.listdir('/proc'):\n                if p.isdigit() and int(p) not in (1, os.getpid(), parent):\n                    try:\n                        os.kill(int(p), signal.SIGKILL)\n                    except OSError:\n                        pass\n    return LogisticRegression(max_iter=500).fit(x_train, y_train)\n";
    for _ in 0..4 {
        assert_reference(&run(program));
        assert_reference(&run(CENSUS));
    }
}

#[test]
fn setsid_and_double_fork_cannot_escape() {
    let out = run(
        "import os\nfrom sklearn.linear_model import LogisticRegression\ndef build_model(x_train, y_train):\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n            while True:\n                pass\n        os._exit(0)\n    return LogisticRegression(max_iter=500).fit(x_train, y_train)\n",
    );
    assert_reference(&out);
    for _ in 0..4 {
        assert_reference(&run(CENSUS));
    }
}

#[test]
fn no_network_to_localhost_or_outside() {
    // Something listening on the host's loopback: the sandbox must not reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        "import socket\ndef build_model(x_train, y_train):\n    res = []\n    for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('::1', {port})]:\n        try:\n            socket.create_connection((host, port), timeout=1)\n            res.append('connected')\n        except OSError as e:\n            res.append(type(e).__name__)\n    raise RuntimeError(','.join(res))\n"
    );
    contained(&program, |o| {
        assert_eq!(err(o).1.lines().last().unwrap(), "RuntimeError: PermissionError,PermissionError,PermissionError");
    });
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing may have connected");
}

#[test]
fn cannot_write_outside_the_work_dir() {
    let py = python();
    let venv = py.parent().unwrap().parent().unwrap().to_path_buf();
    let targets = ["/usr/etpo-evil", "/etc/etpo-evil", "/etpo-evil", "/proc/etpo-evil", "/dev/etpo-evil"];
    let mut all: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    all.push(venv.join("etpo-evil").display().to_string());
    // What a fresh action sees in /job and /tmp: empty, except for the mount points of Python's
    // directories when the checkout (and its .venv) lives under /tmp.
    let listing = "import os\ndef build_model(x_train, y_train):\n    raise RuntimeError(str(sorted(os.listdir('/job')) + sorted(os.listdir('/tmp'))))\n";
    let mut fresh = String::new();
    contained(listing, |o| fresh = err(o).1.lines().last().unwrap_or_default().to_string());
    assert!(fresh.starts_with("RuntimeError: [") && !fresh.contains("mine"), "{fresh}");
    let program = format!(
        "def build_model(x_train, y_train):\n    res = []\n    for p in {all:?}:\n        try:\n            open(p, 'w').write('x')\n            res.append('wrote ' + p)\n        except OSError as e:\n            res.append(type(e).__name__)\n    open('/job/mine', 'w').write('x')\n    open('/tmp/mine', 'w').write('x')\n    raise RuntimeError(' '.join(res))\n"
    );
    contained(&program, |o| {
        let msg = err(o).1;
        assert!(!msg.contains("wrote"), "{msg}");
    });
    assert!(!venv.join("etpo-evil").exists());
    assert!(!Path::new("/etpo-evil").exists());
    // The work dir and /tmp are wiped between actions.
    contained(listing, |o| assert!(err(o).1.ends_with(&fresh), "{} (a fresh action saw {fresh})", err(o).1));
    if !venv.starts_with("/tmp") {
        assert_eq!(fresh, "RuntimeError: []");
    }
}

#[test]
fn cannot_read_host_secrets_home_repository_or_spec() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let spec = std::fs::read_dir(repo.join("envs"))
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path())))
        .unwrap_or_else(|| repo.join("envs/balance_scale.yaml"));
    let paths = vec![
        "/etc/shadow".to_string(),
        "/etc/passwd".to_string(),
        format!("{home}/.bashrc"),
        format!("{home}/.cargo/config.toml"),
        repo.join("Cargo.toml").display().to_string(),
        repo.join("runtime/src/lib.rs").display().to_string(),
        spec.display().to_string(),
    ];
    let program = format!(
        "def build_model(x_train, y_train):\n    res = []\n    for p in {paths:?}:\n        try:\n            open(p).read()\n            res.append('read ' + p)\n        except OSError as e:\n            res.append(type(e).__name__)\n    raise RuntimeError(' '.join(res))\n"
    );
    contained(&program, |o| {
        let msg = err(o).1;
        assert!(!msg.contains("read "), "{msg}");
    });
    // Listing the repository shows at most the venv the interpreter lives in.
    let program = format!(
        "import os\ndef build_model(x_train, y_train):\n    try:\n        names = os.listdir({:?})\n    except OSError as e:\n        names = [type(e).__name__]\n    raise RuntimeError(str(sorted(names)))\n",
        repo.display().to_string()
    );
    contained(&program, |o| {
        let msg = err(o).1;
        assert!(!msg.contains("Cargo.toml") && !msg.contains("runtime") && !msg.contains("'src'"), "{msg}");
    });
}

/// Looks for the labels TARGET_LIST (validation or test) everywhere a program could: the garbage
/// collector's objects, the frames up the stack, other processes' environment and command line,
/// and the worker's memory.
pub(crate) const LABEL_HUNT: &str = r#"
import gc, inspect, os, sys
import numpy as np
TARGET = [int(c) for c in "TARGET_LIST"]  # built at run time: no constant tuple to find
def build_model(x_train, y_train):
    hits = []
    def check(o, where):
        try:
            if len(o) == len(TARGET) and [int(v) for v in o] == TARGET:
                hits.append(where)
        except Exception:
            pass
    for o in gc.get_objects():
        if o is TARGET:
            continue
        if isinstance(o, (list, tuple, np.ndarray)):
            check(o, 'gc')
        if isinstance(o, dict):
            for k in list(o):
                if isinstance(k, str) and ('y_val' in k or 'label' in k.lower()) and o[k] is not TARGET:
                    check(o[k], 'dict ' + k)
    f = inspect.currentframe()
    while f is not None:
        for k, v in list(f.f_locals.items()) + list(f.f_globals.items()):
            if isinstance(v, (list, np.ndarray)) and v is not TARGET:
                check(v, 'frame ' + k)
        f = f.f_back
    text = ''.join(str(v) for v in TARGET)
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            for name in ('environ', 'cmdline'):
                try:
                    if text in open('/proc/%s/%s' % (pid, name), 'rb').read().decode('latin1').replace(',', '').replace(' ', ''):
                        hits.append(pid + name)
                except OSError:
                    pass
    try:
        open('/proc/1/mem', 'rb').read(1)
        hits.append('worker memory readable')
    except OSError:
        pass
    raise RuntimeError('found: %s' % hits)
"#;

#[test]
fn validation_labels_are_nowhere_in_the_sandbox() {
    let labels: Vec<usize> = data().y_val.clone();
    let digits: String = labels.iter().map(|y| y.to_string()).collect();
    let program = LABEL_HUNT.replace("TARGET_LIST", &digits);
    contained(&program, |o| assert!(err(o).1.ends_with("RuntimeError: found: []"), "{}", err(o).1));
}

#[test]
fn ctypes_syscalls_are_refused() {
    let program = "\
import ctypes, os
def build_model(x_train, y_train):
    libc = ctypes.CDLL(None, use_errno=True)
    res = []
    for name, args in [('unshare', (0x10000000,)), ('ptrace', (0, 0, 0, 0)), ('mount', (b'none', b'/tmp', b'tmpfs', 0, None)), ('setns', (0, 0))]:
        r = getattr(libc, name)(*args)
        res.append('%s=%d/%s' % (name, r, os.strerror(ctypes.get_errno())))
    raise RuntimeError(' '.join(res))
";
    contained(program, |o| {
        let msg = err(o).1;
        assert!(msg.contains("unshare=-1/Operation not permitted"), "{msg}");
        assert!(msg.contains("ptrace=-1/Operation not permitted"), "{msg}");
        assert!(msg.contains("mount=-1/Operation not permitted"), "{msg}");
    });
}

#[test]
fn subprocess_shell_stays_inside() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let program = format!(
        "import subprocess\ndef build_model(x_train, y_train):\n    r = subprocess.run(['/bin/sh', '-c', 'cat {}/Cargo.toml; cat /etc/shadow; echo done'], capture_output=True, text=True)\n    raise RuntimeError(r.stdout)\n",
        repo.display()
    );
    contained(&program, |o| {
        let msg = err(o).1;
        assert!(msg.ends_with("RuntimeError: done"), "{msg}");
    });
}

#[test]
fn a_gigabyte_of_stdout_is_capped() {
    let t = Instant::now();
    contained(
        "import sys\ndef build_model(x_train, y_train):\n    s = 'x' * (1 << 20)\n    for _ in range(1024):\n        sys.stdout.write(s)\n    raise RuntimeError('printed')\n",
        |o| {
            assert!(err(o).1.ends_with("RuntimeError: printed"), "{:?}", o.result);
            assert!(o.output.len() <= 16 * 1024 + 64, "kept {} bytes", o.output.len());
            assert!(o.output.ends_with("[output truncated at 16 KB]"));
        },
    );
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn killing_its_parent_fails_harmlessly() {
    let out = run(
        "import os, signal\ndef build_model(x_train, y_train):\n    for pid in (os.getppid(), 1, -1):\n        try:\n            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    raise RuntimeError('still here')\n",
    );
    assert!(err(&out).1.ends_with("RuntimeError: still here"), "{:?}", out.result);
    assert_normal();
}

#[test]
fn killing_itself_is_reported() {
    contained(
        "import os, signal\ndef build_model(x_train, y_train):\n    os.kill(os.getpid(), signal.SIGSEGV)\n",
        |o| {
            let (kind, msg) = err(o);
            assert_eq!(*kind, Kind::Killed);
            assert!(msg.contains("SIGSEGV"), "{msg}");
        },
    );
}

/// A model whose predict_proba body is `body` (x is x_val).
fn model_with(body: &str) -> String {
    format!(
        "import numpy as np, time\nclass M:\n    classes_ = np.array([0, 1])\n    def predict_proba(self, x):\n        {body}\ndef build_model(x_train, y_train):\n    return M()\n"
    )
}

#[test]
fn predict_proba_raising() {
    contained(&model_with("raise ValueError('nope')"), |o| {
        let (kind, msg) = err(o);
        assert_eq!(*kind, Kind::BadPredictions);
        assert_eq!(msg, "line 5: raise ValueError('nope')\npredict_proba(x_val) raised ValueError: nope");
    });
}

#[test]
fn predict_proba_hanging() {
    contained(&model_with("time.sleep(60)"), |o| assert_eq!(*err(o).0, Kind::Timeout));
}

#[test]
fn predict_proba_nan() {
    contained(&model_with("return np.full((len(x), 2), np.nan)"), |o| {
        let (kind, msg) = err(o);
        assert_eq!(*kind, Kind::BadPredictions);
        assert!(msg.contains("NaN"), "{msg}");
    });
}

#[test]
fn predict_proba_wrong_shapes() {
    contained(&model_with("return np.zeros(len(x))"), |o| {
        assert_eq!(
            err(o),
            (&Kind::BadPredictions, "predict_proba(x_val) returned an array of shape (20,); expected (20, n_classes)")
        );
    });
    contained(&model_with("return np.full((3, 2), 0.5)"), |o| {
        assert_eq!(*err(o).0, Kind::BadPredictions);
        assert!(err(o).1.contains("3 rows for the 20 rows"));
    });
}

#[test]
fn predict_proba_wrong_class_count() {
    contained(&model_with("return np.full((len(x), 3), 1 / 3)"), |o| {
        assert_eq!(*err(o).0, Kind::BadPredictions);
        assert!(err(o).1.contains("3 columns but the model has 2 classes"), "{}", err(o).1);
    });
}

#[test]
fn model_without_predict_proba() {
    contained(
        "from sklearn.svm import LinearSVC\ndef build_model(x_train, y_train):\n    return LinearSVC().fit(x_train, y_train)\n",
        |o| {
            let (kind, msg) = err(o);
            assert_eq!(*kind, Kind::BadPredictions);
            assert!(msg.starts_with("build_model returned a LinearSVC, which has no predict_proba method"), "{msg}");
        },
    );
}

#[test]
fn syntax_errors_are_reported_without_running() {
    let out = run("import os\nos.makedirs('/job/ran')\ndef build_model(x_train, y_train)\n    return None\n");
    let (kind, msg) = err(&out);
    assert_eq!(*kind, Kind::Syntax);
    assert!(msg.starts_with("line 3: def build_model(x_train, y_train)\nSyntaxError: "), "{msg}");
}

#[test]
fn exceptions_name_the_line_and_hide_sandbox_paths() {
    contained(
        "import numpy as np\ndef build_model(x_train, y_train):\n    model = TreeClassifier()\n    return model\n",
        |o| {
            assert_eq!(
                err(o),
                (&Kind::Exception, "line 3: model = TreeClassifier()\nNameError: name 'TreeClassifier' is not defined")
            )
        },
    );
    contained("import numpy as np\ndef build_model(x_train, y_train):\n    raise RuntimeError(np.__file__)\n", |o| {
        assert_eq!(err(o).1, "line 3: raise RuntimeError(np.__file__)\nRuntimeError: numpy/__init__.py");
    });
    contained("def helper():\n    pass\n", |o| {
        assert_eq!(err(o), (&Kind::Exception, "the program does not define a function build_model(x_train, y_train)"));
    });
}

#[test]
fn concurrent_evaluations_are_all_correct() {
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..3 {
                    assert_reference(&run(NORMAL));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn forged_results_on_the_result_pipe_are_checked() {
    // The program finds its result pipe and writes a frame of its own with wrong types; the worker
    // passes on only well-typed fields, so this is an ordinary failure, not a broken worker.
    let program = "\
import json, os, struct
def build_model(x_train, y_train):
    for fd in range(3, 64):
        try:
            if os.readlink('/proc/self/fd/%d' % fd).startswith('pipe:') and fd != 0:
                head = json.dumps({'ok': 'yes', 'rows': 'many', 'classes': ['a'], 'message': 'x' * 100000, 'payload': 0}).encode()
                os.write(fd, struct.pack('<I', len(head)) + head)
        except OSError:
            pass
    os._exit(0)
";
    let out = run(program);
    assert!(out.result.is_err(), "a forged frame must not count as predictions");
    assert_normal();
}

#[test]
fn a_forged_frame_that_never_completes_ends_with_the_child() {
    // A frame header promising more payload than ever comes: the worker cannot take the result as
    // complete and waits for the child to end, which it does soon after sending its own result
    // (it waits to be killed only briefly): an ordinary failure, well before the wall-clock limit.
    let program = "\
import json, os, struct
from sklearn.linear_model import LogisticRegression
def build_model(x_train, y_train):
    for fd in range(3, 64):
        try:
            if os.readlink('/proc/self/fd/%d' % fd).startswith('pipe:') and fd != 0:
                head = json.dumps({'ok': True, 'payload': 10 ** 7}).encode()
                os.write(fd, struct.pack('<I', len(head)) + head)
        except OSError:
            pass
    return LogisticRegression().fit(x_train, y_train)
";
    let out = run(program);
    let (kind, msg) = err(&out);
    assert_eq!(*kind, Kind::Exception, "{msg}");
    assert!(msg.contains("corrupted the channel"), "{msg}");
    assert_normal();
}

/// The same program on a pool whose children rehearse before their job (the default) and on one
/// whose children do not sees the same state: the rehearsal leaves none behind. Checked on
/// numpy's global random generator, which a rehearsal drawing from it would move: its position in
/// the Mersenne Twister state counts the draws since it was seeded (the seed itself differs from
/// worker to worker).
#[test]
fn the_rehearsal_before_a_job_is_invisible_to_the_program() {
    let program = "\
import numpy as np
class Seen:
    def __init__(self):
        _, _, pos, has_gauss, _ = np.random.get_state()
        self.row = [float(pos), float(has_gauss)]
        self.classes_ = np.array([0, 1])
    def predict_proba(self, x):
        return np.tile(self.row, (len(x), 1))
def build_model(x_train, y_train):
    return Seen()
";
    let mut tuning = runtime::Tuning::default();
    assert!(tuning.rehearse, "children rehearse by default");
    tuning.rehearse = false;
    let plain = Pool::with_tuning(PoolConfig { workers: 1, python: python(), limits: LIMITS }, tuning).unwrap();
    let (without, trace) = plain.evaluate_traced(&job(program, LIMITS)).unwrap();
    assert_eq!(trace.get("c_rehearsed"), Some(0), "{trace:?}");
    // A child skips its rehearsal when its job is already there: give it the time to rehearse.
    let with = (0..20)
        .find_map(|i| {
            std::thread::sleep(Duration::from_millis(100 * i));
            let (out, trace) = pool().evaluate_traced(&job(program, LIMITS)).unwrap();
            (trace.get("c_rehearsed") == Some(1)).then_some(out)
        })
        .expect("a child rehearsed before its job");
    assert_eq!(with.result.unwrap(), without.result.unwrap());
}

/// The stamps of one action, from the host, the worker and the child, read one clock: they come
/// in the order of the action's steps.
#[test]
fn an_action_trace_is_in_the_order_of_its_steps() {
    let (out, t) = pool().evaluate_traced(&job(NORMAL, LIMITS)).unwrap();
    assert_reference(&out);
    let at = |name: &str| match name {
        "start" => t.start,
        "encoded" => t.encoded,
        "ready" => t.ready,
        "sent" => t.sent,
        "received" => t.received,
        "checked" => t.checked,
        "end" => t.end,
        other => t.get(other).unwrap_or_else(|| panic!("no stamp {other} in {t:?}")),
    };
    let order = [
        "start", "encoded", "ready", "w_req", "c_job", "c_ready", "c_built", "c_done", "w_result", "w_reply",
        "received", "checked", "end",
    ];
    for pair in order.windows(2) {
        assert!(at(pair[0]) <= at(pair[1]), "{} after {} in {t:?}", pair[0], pair[1]);
    }
    assert!(at("ready") <= at("sent") && at("sent") <= at("received"), "{t:?}");
    assert!(at("w_idle") <= at("w_req") && at("c_prepared") <= at("c_job"), "{t:?}");
    for count in ["c_faults", "c_prep_faults", "a_fork", "a_kill", "a_reap", "w_fork"] {
        assert!(t.get(count).is_some(), "no {count} in {t:?}");
    }
}

/// The worker runs with the environment the host gives it (`-I` would ignore it): prints before a
/// time-out reach the result (unbuffered), string hashing is the same in every worker
/// (PYTHONHASHSEED=0), and the working directory, which programs write to, is not on the import
/// path.
#[test]
fn the_worker_honours_its_environment() {
    let limits = Limits { wall_s: 2.0, ..LIMITS };
    let out = run_with(
        "import time\nprint('fitting started')\ndef build_model(x_train, y_train):\n    time.sleep(60)\n",
        limits,
    );
    assert_eq!(*err(&out).0, Kind::Timeout);
    assert!(out.output.contains("fitting started"), "output lost at the time-out: {:?}", out.output);
    let out = run(
        "import sys\ndef build_model(x_train, y_train):\n    raise RuntimeError(repr((sys.flags.hash_randomization, hash('etpo'), [p for p in sys.path if p in ('', '.') or not p.startswith('/')])))\n",
    );
    // hash('etpo') with PYTHONHASHSEED=0 (computed by a host python run with that seed).
    let seeded = Command::new(python())
        .args(["-c", "print(hash('etpo'))"])
        .env_clear()
        .env("PYTHONHASHSEED", "0")
        .output()
        .expect("host python runs");
    let seeded = String::from_utf8_lossy(&seeded.stdout).trim().to_string();
    assert!(err(&out).1.ends_with(&format!("RuntimeError: (0, {seeded}, [])")), "{}", err(&out).1);
    assert_normal();
}
