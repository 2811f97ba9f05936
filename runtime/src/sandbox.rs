//! Starting one sandboxed worker process.

use crate::cgroup::Cgroup;
use crate::job::Limits;
use crate::RuntimeError;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The worker program (see its header comment).
const HARNESS: &str = include_str!("harness.py");
/// Bytes of a worker's stderr kept for diagnostics.
const STDERR_TAIL: usize = 4096;

/// Environment of every worker: BLAS and friends pinned to one thread (one worker per core),
/// joblib kept in-process, no bytecode writes.
const ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", "/work"),
    ("LANG", "C.UTF-8"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("BLIS_NUM_THREADS", "1"),
    ("VECLIB_MAXIMUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
    ("JOBLIB_MULTIPROCESSING", "0"),
    ("LOKY_MAX_CPU_COUNT", "1"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONHASHSEED", "0"),
    ("MPLBACKEND", "Agg"),
];

/// Knows how to start workers: the interpreter and the sandbox plan, prepared once.
pub(crate) struct Launcher {
    python: PathBuf,
    limits: Limits,
}

impl Launcher {
    pub(crate) fn new(python: &Path, limits: Limits) -> Result<Launcher, RuntimeError> {
        Ok(Launcher { python: python.to_path_buf(), limits })
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Starts one worker (it then imports its libraries; see `Worker::ready`).
    pub(crate) fn start(&self) -> Result<Sandbox, RuntimeError> {
        let cgroup = Cgroup::create(self.limits.memory_mb, self.limits.max_processes).ok();
        let mut cmd = Command::new(&self.python);
        cmd.arg("-I").arg("-c").arg(HARNESS).env_clear().envs(ENV.iter().copied());
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| RuntimeError::Python {
            python: self.python.clone(),
            reason: e.to_string(),
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RuntimeError::Sandbox("worker pipes missing".into()));
        };
        let tail = Arc::new(Mutex::new(Vec::new()));
        drain(stderr, tail.clone());
        Ok(Sandbox { child, stdin, stdout, tail, cgroup, python: self.python.clone() })
    }
}

/// Keeps the last bytes of a worker's stderr, reading until it closes (so it never blocks).
fn drain(mut from: impl Read + Send + 'static, tail: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            t.extend_from_slice(&buf[..n]);
            if t.len() > STDERR_TAIL {
                let cut = t.len() - STDERR_TAIL;
                t.drain(..cut);
            }
        }
    });
}

/// One running worker and everything that must go when it goes.
pub(crate) struct Sandbox {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    tail: Arc<Mutex<Vec<u8>>>,
    cgroup: Option<Cgroup>,
    python: PathBuf,
}

impl Sandbox {
    pub(crate) fn to_worker(&mut self) -> &mut ChildStdin {
        &mut self.stdin
    }

    pub(crate) fn from_worker(&self) -> &ChildStdout {
        &self.stdout
    }

    pub(crate) fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    pub(crate) fn python(&self) -> &Path {
        &self.python
    }

    /// The end of what the worker wrote to stderr (its own failures, not the program's output).
    pub(crate) fn stderr_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t).into_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
