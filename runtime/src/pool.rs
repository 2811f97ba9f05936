//! The pool of warm sandboxed workers.

use crate::job::{ActionError, ActionErrorKind, Job, Limits, Outcome};
use crate::protocol::{self, HostView, ReadError, Request};
use crate::sandbox::{Launcher, Sandbox};
use crate::trace::{self, monotonic_ns, ActionTrace};
use crate::RuntimeError;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a fresh worker may take to import numpy and scikit-learn and say it is ready.
const STARTUP: Duration = Duration::from_secs(120);
/// Extra time the host grants a worker beyond the action's wall-clock limit (the worker enforces
/// the limit itself; this only catches a worker that stopped answering).
const HOST_GRACE: Duration = Duration::from_secs(10);

/// Configuration of a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Number of warm workers (default: the number of cores).
    pub workers: usize,
    /// The Python interpreter (with numpy and scikit-learn) the workers run.
    pub python: PathBuf,
    /// Limits of the sandbox as a whole (cgroups); each [`Job`] carries its own per-action limits.
    pub limits: Limits,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            python: default_python(),
            limits: Limits::default(),
        }
    }
}

/// Settings of a [`Pool`] that trade CPU time for latency. [`Pool::new`] uses the defaults;
/// [`Pool::with_tuning`] takes others (`etpo bench sandbox` compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tuning {
    /// Each child forked ahead for the next job runs a trivial action through the job's steps
    /// while it waits (skipped when the job is already there), so that the pages every action
    /// writes are copied after the fork before the job arrives instead of on its path: about 600
    /// page faults, 2 ms of a trivial action's wall time on a busy 2-core Xeon. Costs about
    /// 1.2 ms more CPU per action (the rehearsal's own work and pages the job would not have
    /// written), spent while the worker waits. Default: on.
    pub rehearse: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning { rehearse: true }
    }
}

/// The Python interpreter to use: `$ETPO_PYTHON`, else the repository's `.venv/bin/python`, else
/// `python3` (looked up in `PATH` when the pool starts).
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("ETPO_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    // The workspace root is the parent of this crate's directory.
    if let Some(root) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        let venv = root.join(".venv").join("bin").join("python");
        if venv.exists() {
            return venv;
        }
    }
    PathBuf::from("python3")
}

/// Warm sandboxed Python workers. `evaluate` may be called from many threads at once; each call
/// takes a free worker (waiting for one if all are busy).
pub struct Pool {
    launcher: Launcher,
    state: Mutex<State>,
    freed: Condvar,
    size: usize,
}

struct State {
    idle: Vec<Worker>,
    /// Workers that exist (idle or busy) or are being started.
    alive: usize,
}

struct Worker {
    sandbox: Sandbox,
    /// The sandbox memory limit currently written to its cgroup.
    memory_mb: u64,
}

impl Pool {
    /// Starts `cfg.workers` sandboxed workers and waits until each has imported its libraries.
    pub fn new(cfg: PoolConfig) -> Result<Pool, RuntimeError> {
        Pool::with_tuning(cfg, Tuning::default())
    }

    /// [`Pool::new`] with other [`Tuning`].
    pub fn with_tuning(cfg: PoolConfig, tuning: Tuning) -> Result<Pool, RuntimeError> {
        let size = cfg.workers.max(1);
        let launcher = Launcher::new(&cfg.python, cfg.limits, tuning.rehearse)?;
        // Start all, then wait for all: the imports run in parallel.
        let started: Vec<Sandbox> = (0..size).map(|_| launcher.start()).collect::<Result<_, _>>()?;
        let mut idle = Vec::with_capacity(size);
        for sandbox in started {
            idle.push(Worker::ready(sandbox, cfg.limits.memory_mb)?);
        }
        Ok(Pool { launcher, state: Mutex::new(State { idle, alive: size }), freed: Condvar::new(), size })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.size
    }

    /// Runs one action. `Ok` holds the program's result, success or [`ActionError`]; `Err` is an
    /// infrastructure fault that persisted after replacing the worker.
    ///
    /// A worker that breaks during a job (dies, stops answering, sends garbage) is replaced and
    /// the job retried once on the fresh worker. If that fresh worker breaks too, the program is
    /// to blame and the outcome is a [`ActionErrorKind::Killed`] error.
    pub fn evaluate(&self, job: &Job) -> Result<Outcome, RuntimeError> {
        self.evaluate_traced(job).map(|(outcome, _)| outcome)
    }

    /// [`Pool::evaluate`], also returning where the time went (for `etpo bench sandbox`). The
    /// trace is of the last attempt when the job had to be retried.
    pub fn evaluate_traced(&self, job: &Job) -> Result<(Outcome, ActionTrace), RuntimeError> {
        let mut trace = ActionTrace { start: monotonic_ns(), ..ActionTrace::default() };
        let req = protocol::encode(job)?;
        trace.encoded = monotonic_ns();
        let mut worker = self.checkout()?;
        let mut fresh = false;
        loop {
            let fault = match worker.run(&req, &mut trace) {
                Ok(outcome) => {
                    self.checkin(worker);
                    trace.end = monotonic_ns();
                    return Ok((outcome, trace));
                }
                Err(fault) => fault,
            };
            drop(worker);
            let replacement = self.replace();
            if fresh {
                match replacement {
                    Ok(w) => self.checkin(w),
                    Err(_) => self.forget_worker(),
                }
                trace.end = monotonic_ns();
                let outcome = Outcome {
                    result: Err(ActionError::new(
                        ActionErrorKind::Killed,
                        "the program brought down the sandbox it ran in",
                    )),
                    wall_s: 0.0,
                    cpu_s: 0.0,
                    peak_rss_mb: 0.0,
                    output: String::new(),
                };
                return Ok((outcome, trace));
            }
            worker = match replacement {
                Ok(w) => w,
                Err(e) => {
                    self.forget_worker();
                    return Err(RuntimeError::Worker(format!("{fault}; restarting it failed: {e}")));
                }
            };
            fresh = true;
        }
    }

    fn replace(&self) -> Result<Worker, RuntimeError> {
        let sandbox = self.launcher.start()?;
        Worker::ready(sandbox, self.launcher.limits().memory_mb)
    }

    /// A worker is gone for good; a later `checkout` will try to start one in its place.
    fn forget_worker(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).alive -= 1;
        self.freed.notify_one();
    }

    fn checkout(&self) -> Result<Worker, RuntimeError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(w) = st.idle.pop() {
                return Ok(w);
            }
            if st.alive < self.size {
                st.alive += 1;
                drop(st);
                return self.replace().inspect_err(|_| self.forget_worker());
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn checkin(&self, w: Worker) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).idle.push(w);
        self.freed.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Tell every worker to exit first, so that they all wind down at the same time.
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for w in &mut st.idle {
            w.sandbox.shut_down();
        }
    }
}

impl Worker {
    /// Waits for the worker's "ready" frame.
    fn ready(sandbox: Sandbox, memory_mb: u64) -> Result<Worker, RuntimeError> {
        match protocol::read_frame(sandbox.worker_output(), Instant::now() + STARTUP) {
            Ok((header, _)) if header.get("ready").and_then(|v| v.as_bool()) == Some(true) => {
                Ok(Worker { sandbox, memory_mb })
            }
            Ok((header, _)) => Err(RuntimeError::Worker(format!("unexpected first message {header}"))),
            Err(e) => {
                let log = sandbox.stderr_tail();
                Err(RuntimeError::Python {
                    python: sandbox.python().to_path_buf(),
                    reason: format!("{e}; its stderr ends with:\n{log}"),
                })
            }
        }
    }

    /// Runs one job, filling in the trace's stamps from `ready` on; `Err` means the worker is
    /// broken (and must be dropped).
    fn run(&mut self, req: &Request, trace: &mut ActionTrace) -> Result<Outcome, String> {
        let limits = &req.limits;
        if let Some(cg) = self.sandbox.cgroup() {
            let memory_mb = limits.memory_mb;
            if memory_mb != self.memory_mb {
                cg.set_memory_mb(memory_mb).map_err(|e| e.to_string())?;
                self.memory_mb = memory_mb;
            }
        }
        let ooms_before = self.sandbox.cgroup().map_or(0, |cg| cg.oom_kills());
        let deadline = Instant::now() + Duration::from_secs_f64(limits.wall_s.max(0.0)) + HOST_GRACE;
        let input = self.sandbox.worker_input().ok_or("the worker is shutting down")?;
        trace.ready = monotonic_ns();
        protocol::write_request(input, req, deadline).map_err(|e| format!("sending the job: {e}"))?;
        trace.sent = monotonic_ns();
        let (header, payload) = protocol::read_frame(self.sandbox.worker_output(), deadline).map_err(|e| match e {
            ReadError::Closed => format!("{e}; stderr: {}", self.sandbox.stderr_tail()),
            e => e.to_string(),
        })?;
        trace.received = monotonic_ns();
        let oom_killed = self.sandbox.cgroup().is_some_and(|cg| cg.oom_kills() > ooms_before);
        trace.checked = monotonic_ns();
        trace.worker = trace::from_header(&header);
        protocol::decode(req, header, &payload, HostView { oom_killed })
    }
}
