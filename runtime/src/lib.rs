//! etpo's hardened runtime: runs untrusted generated Python (scikit-learn) programs in warm,
//! resource-limited sandboxes and returns their class probabilities, so that the reward can be
//! computed outside the sandbox (see [`metrics`]).
//!
//! The entry point is [`Pool`]: [`Pool::new`] starts one sandboxed Python worker per core with
//! numpy and scikit-learn imported; [`Pool::evaluate`] runs one [`Job`] in a child forked from a
//! warm worker and returns an [`Outcome`]. A program that fails (syntax error, exception, time-out,
//! memory limit, unusable predictions) is an [`ActionError`] inside the outcome, phrased for the
//! model to fix; `Err(RuntimeError)` is kept for faults of the infrastructure.
//!
//! Isolation (Linux): every worker lives in new user, PID, network, mount, IPC and UTS namespaces,
//! sees a read-only view of only the Python installation, has a private tmpfs work directory and
//! /tmp, no capabilities, `PR_SET_NO_NEW_PRIVS`, rlimits, a seccomp filter and (as root) its own
//! memory and pids cgroups. See `sandbox.rs` for the details.
//!
//! Text games (`kind: wasm` specs) run in-process instead, as WebAssembly components under
//! wasmtime with no imports, a memory cap and fuel per call: see [`wasm`]. [`env`](mod@env) gives both
//! kinds of task the same Gymnasium-style environment.

mod cgroup;
pub mod env;
mod error;
mod job;
pub mod metrics;
mod pool;
mod protocol;
mod sandbox;
mod seccomp;
mod trace;
pub mod wasm;

pub use error::RuntimeError;
pub use job::{ActionError, ActionErrorKind, Job, Limits, Outcome};
pub use pool::{default_python, Pool, PoolConfig, Tuning};
pub use trace::{monotonic_ns, ActionTrace};
