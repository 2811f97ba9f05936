//! `POST /run_code`: SandboxFusion's request and response shapes over etpo's sandbox.
//!
//! The runtime's only way to run Python is a [`Job`] through [`runtime::Pool::evaluate`], whose
//! program is executed at module level in a process forked from a warm, sandboxed worker, and
//! which then expects `build_model`. So the request goes into that program: `run_code.py` (with
//! the request embedded as base64) writes the files into the work directory, forks the user's
//! code as `python main.py` with stdin, stdout and stderr on pipes, enforces the time limit,
//! fetches the files and prints one result line, which this module finds in the job's output.
//! Everything, the runner included, runs inside the hardened sandbox (namespaces, tmpfs root,
//! seccomp, rlimits, cgroups) with the request's memory limit; the job's own wall-clock limit is
//! the request's plus [`GRACE_S`], a backstop should the runner itself hang.
//!
//! Status values follow SandboxFusion's `parse_run_status`: `Success` (exit status 0), `Failed`
//! (non-zero exit status or `TimeLimitExceeded`), `SandboxError` (the run could not be made or
//! its result not read; `run_result.status` is then `Error`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use runtime::{ActionErrorKind, Job, Limits};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, JsonBody};
use crate::State;

/// The runner program (see its header).
const RUNNER: &str = include_str!("run_code.py");
/// Seconds the sandbox job may run beyond the request's `run_timeout` (writing and fetching
/// files, reporting); only a runner that hangs ever uses them.
const GRACE_S: f64 = 5.0;
/// Output of the job beyond the result line (warnings of the runner's process), bytes.
const OUTPUT_SLACK: usize = 64 << 10;

/// Limits of `/run_code` (part of [`crate::Config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunCodeLimits {
    /// `run_timeout` when the request gives none (SandboxFusion's default: 10 s).
    pub default_timeout_s: f64,
    /// The longest `run_timeout` granted; longer requests are cut to it.
    pub max_timeout_s: f64,
    /// Memory when `memory_limit_MB` is absent or not positive, MiB.
    pub default_memory_mb: u64,
    /// The largest `memory_limit_MB` granted; larger requests are cut to it.
    pub max_memory_mb: u64,
    /// stdout and stderr are each kept up to this many bytes (SandboxFusion keeps 1 MiB); the
    /// rest is read and dropped.
    pub max_stream_bytes: usize,
    /// The files returned for `fetch_files`, bytes in all; a file that would pass it is left out
    /// (and named in `message`).
    pub max_fetch_bytes: usize,
    /// Processes and threads the program may hold at once.
    pub max_processes: u64,
}

impl Default for RunCodeLimits {
    fn default() -> Self {
        RunCodeLimits {
            default_timeout_s: 10.0,
            max_timeout_s: 60.0,
            default_memory_mb: 1024,
            max_memory_mb: 4096,
            max_stream_bytes: 1 << 20,
            max_fetch_bytes: 4 << 20,
            max_processes: 64,
        }
    }
}

impl RunCodeLimits {
    /// The job's output limit: the result line carries both streams and the files in base64.
    pub(crate) fn output_kb(&self) -> u64 {
        let raw = 2 * self.max_stream_bytes + self.max_fetch_bytes;
        ((raw.div_ceil(3) * 4 + OUTPUT_SLACK) as u64).div_ceil(1024)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let t = (self.default_timeout_s, self.max_timeout_s);
        if !(t.0.is_finite() && t.1.is_finite() && t.0 > 0.0 && t.1 >= t.0 && t.1 <= 86_400.0 - GRACE_S) {
            return Err(format!("run_code timeouts {t:?}: need 0 < default <= max < a day"));
        }
        if self.default_memory_mb == 0 || self.max_memory_mb < self.default_memory_mb {
            return Err("run_code memory: need 0 < default <= max".into());
        }
        // The sandbox's host side reads a worker's answer header up to 16 MiB.
        if self.output_kb() > 12 << 10 {
            return Err(
                "run_code output limits: stdout, stderr and the fetched files must stay under 4 MiB, 4 MiB and 4 MiB"
                    .into(),
            );
        }
        Ok(())
    }
}

/// SandboxFusion's `RunCodeRequest` (fields it has that etpo does not use, such as
/// `compile_timeout` and `args`, are accepted and ignored).
#[derive(Deserialize)]
pub(crate) struct RunCodeRequest {
    code: String,
    language: String,
    #[serde(default)]
    run_timeout: Option<f64>,
    #[serde(default, rename = "memory_limit_MB")]
    memory_limit_mb: Option<i64>,
    #[serde(default)]
    stdin: Option<String>,
    /// Path → base64 content; SandboxFusion skips `null` contents.
    #[serde(default)]
    files: BTreeMap<String, Option<String>>,
    #[serde(default)]
    fetch_files: Vec<String>,
}

/// SandboxFusion's `RunCodeResponse`.
#[derive(Serialize, Debug)]
pub(crate) struct RunCodeResponse {
    status: &'static str,
    message: String,
    compile_result: Option<CommandRunResult>,
    run_result: Option<CommandRunResult>,
    files: BTreeMap<String, String>,
}

/// SandboxFusion's `CommandRunResult`.
#[derive(Serialize, Debug)]
struct CommandRunResult {
    status: &'static str,
    execution_time: Option<f64>,
    return_code: Option<i32>,
    stdout: Option<String>,
    stderr: Option<String>,
}

/// The runner's result line.
#[derive(Deserialize)]
struct Envelope {
    status: String,
    return_code: Option<i32>,
    execution_time: f64,
    stdout: String,
    stderr: String,
    #[serde(default)]
    stdout_truncated: bool,
    #[serde(default)]
    stderr_truncated: bool,
    #[serde(default)]
    files: BTreeMap<String, String>,
    #[serde(default)]
    notes: Vec<String>,
    #[serde(default)]
    error: Option<String>,
}

impl RunCodeResponse {
    fn sandbox_error(message: String) -> RunCodeResponse {
        RunCodeResponse {
            status: "SandboxError",
            run_result: Some(CommandRunResult {
                status: "Error",
                execution_time: None,
                return_code: None,
                stdout: None,
                stderr: Some(message.clone()),
            }),
            message,
            compile_result: None,
            files: BTreeMap::new(),
        }
    }

    /// A request etpo cannot run at all (answered 400, in SandboxFusion's shape).
    fn refused(message: String) -> Response {
        let body = RunCodeResponse {
            status: "SandboxError",
            message,
            compile_result: None,
            run_result: None,
            files: BTreeMap::new(),
        };
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

/// `POST /run_code`.
pub(crate) async fn run_code(
    AxumState(state): AxumState<Arc<State>>,
    JsonBody(req): JsonBody<RunCodeRequest>,
) -> Result<Response, ApiError> {
    let limits = &state.config.run_code;
    if req.language != "python" {
        return Ok(RunCodeResponse::refused(format!(
            "language {:?} is not supported: etpo serve runs \"python\" only",
            req.language
        )));
    }
    let timeout = req.run_timeout.unwrap_or(limits.default_timeout_s);
    if !(timeout.is_finite() && timeout > 0.0) {
        return Ok(RunCodeResponse::refused(format!(
            "run_timeout must be a positive number of seconds, got {timeout}"
        )));
    }
    let timeout = timeout.min(limits.max_timeout_s);
    let memory_mb = match req.memory_limit_mb {
        Some(m) if m > 0 => (m as u64).min(limits.max_memory_mb),
        _ => limits.default_memory_mb,
    };
    for name in req.files.keys().chain(&req.fetch_files) {
        if let Err(why) = check_path(name) {
            return Ok(RunCodeResponse::refused(format!("file name {name:?}: {why}")));
        }
    }
    let files: BTreeMap<String, String> = req.files.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
    let marker = format!("ETPO_RUN_CODE_RESULT_{:032x}:", rand::random::<u128>());
    let spec = serde_json::json!({
        "code": req.code,
        "stdin": req.stdin,
        "files": files,
        "fetch_files": req.fetch_files,
        "timeout_s": timeout,
        "max_stream_bytes": limits.max_stream_bytes,
        "max_fetch_bytes": limits.max_fetch_bytes,
        "marker": marker,
    });
    let encoded = base64::engine::general_purpose::STANDARD.encode(spec.to_string());
    let job = Job {
        program: format!("_ETPO_REQUEST = \"{encoded}\"\n{RUNNER}"),
        // The job format wants a classification problem; the runner ignores it.
        x_train: vec![vec![0.0], vec![1.0]],
        y_train: vec![0, 1],
        x_val: vec![vec![0.0]],
        n_classes: 2,
        limits: Limits {
            wall_s: timeout + GRACE_S,
            cpu_s: timeout + GRACE_S,
            memory_mb,
            output_kb: limits.output_kb(),
            max_processes: limits.max_processes,
        },
    };
    let host = state.host.clone();
    let response = state
        .blocking(move || {
            let pool = match host.pool() {
                Ok(pool) => pool,
                Err(e) => return Ok(RunCodeResponse::sandbox_error(format!("the sandbox pool did not start: {e}"))),
            };
            Ok(match pool.evaluate(&job) {
                Ok(outcome) => interpret(&outcome, &marker, timeout),
                Err(e) => RunCodeResponse::sandbox_error(format!("the sandbox failed: {e}")),
            })
        })
        .await?;
    Ok(Json(response).into_response())
}

/// A path in the work directory: relative, without `..`, not empty.
fn check_path(name: &str) -> Result<(), &'static str> {
    let path = std::path::Path::new(name);
    if name.is_empty() || name.contains('\0') {
        return Err("empty, or holds a NUL byte");
    }
    if path.is_absolute() {
        return Err("must be relative to the sandbox's working directory");
    }
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err("must not contain `..`");
    }
    Ok(())
}

/// Turns the job's outcome into SandboxFusion's answer.
fn interpret(outcome: &runtime::Outcome, marker: &str, timeout: f64) -> RunCodeResponse {
    let line = outcome
        .output
        .rfind(marker)
        .map(|at| &outcome.output[at + marker.len()..])
        .map(|rest| rest.split('\n').next().unwrap_or(rest));
    let Some(line) = line else {
        // The runner never reported: the sandbox stopped the whole job.
        return match &outcome.result {
            Err(e) if e.kind == ActionErrorKind::Timeout => RunCodeResponse {
                status: "Failed",
                message: String::new(),
                compile_result: None,
                run_result: Some(CommandRunResult {
                    status: "TimeLimitExceeded",
                    execution_time: Some(outcome.wall_s.max(timeout)),
                    return_code: None,
                    stdout: Some(String::new()),
                    stderr: Some(String::new()),
                }),
                files: BTreeMap::new(),
            },
            Err(e) => RunCodeResponse::sandbox_error(format!("the program's runner was stopped: {e}")),
            Ok(_) => RunCodeResponse::sandbox_error("the program's runner reported no result".into()),
        };
    };
    let envelope: Envelope = match serde_json::from_str(line) {
        Ok(e) => e,
        Err(e) => return RunCodeResponse::sandbox_error(format!("the runner's result is unreadable: {e}")),
    };
    if envelope.status == "Error" {
        return RunCodeResponse::sandbox_error(envelope.error.unwrap_or_else(|| "the run failed".into()));
    }
    let decode = |b64: &str, truncated: bool, what: &str| -> Result<String, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("the runner's {what} is not base64: {e}"))?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if truncated {
            text.push_str("\n[output truncated]");
        }
        Ok(text)
    };
    let streams = decode(&envelope.stdout, envelope.stdout_truncated, "stdout")
        .and_then(|o| Ok((o, decode(&envelope.stderr, envelope.stderr_truncated, "stderr")?)));
    let (stdout, stderr) = match streams {
        Ok(s) => s,
        Err(e) => return RunCodeResponse::sandbox_error(e),
    };
    let (run_status, status) = match (envelope.status.as_str(), envelope.return_code) {
        ("TimeLimitExceeded", _) => ("TimeLimitExceeded", "Failed"),
        ("Finished", Some(0)) => ("Finished", "Success"),
        ("Finished", Some(_)) => ("Finished", "Failed"),
        (other, _) => {
            return RunCodeResponse::sandbox_error(format!("the runner reported an unknown status {other:?}"))
        }
    };
    let mut notes = envelope.notes;
    if envelope.stdout_truncated || envelope.stderr_truncated {
        notes.push("output beyond the server's limit per stream was dropped".into());
    }
    RunCodeResponse {
        status,
        message: notes.join("; "),
        compile_result: None,
        run_result: Some(CommandRunResult {
            status: run_status,
            execution_time: Some(envelope.execution_time),
            return_code: envelope.return_code,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }),
        files: envelope.files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(output: String, result: Result<Vec<Vec<f64>>, runtime::ActionError>) -> runtime::Outcome {
        runtime::Outcome { result, wall_s: 0.1, cpu_s: 0.1, peak_rss_mb: 1.0, output }
    }

    #[test]
    fn paths_stay_in_the_work_directory() {
        assert!(check_path("data/in.txt").is_ok());
        assert!(check_path("/etc/passwd").is_err());
        assert!(check_path("../x").is_err());
        assert!(check_path("a/../../x").is_err());
        assert!(check_path("").is_err());
    }

    #[test]
    fn the_last_result_line_counts() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let line = |rc: i32, out: &str| {
            format!(
                "M:{{\"status\":\"Finished\",\"return_code\":{rc},\"execution_time\":0.5,\"stdout\":\"{}\",\"stderr\":\"\"}}",
                b64(out)
            )
        };
        let text = format!("warning\n{}\n{}\n", line(3, "forged"), line(0, "hi\n"));
        let r = interpret(&outcome(text, Ok(vec![vec![0.5, 0.5]])), "M:", 1.0);
        assert_eq!(r.status, "Success");
        let run = r.run_result.unwrap();
        assert_eq!((run.status, run.return_code, run.stdout.as_deref()), ("Finished", Some(0), Some("hi\n")));
    }

    #[test]
    fn no_result_line() {
        let r = interpret(&outcome("junk".into(), Ok(vec![])), "M:", 1.0);
        assert_eq!((r.status, r.run_result.unwrap().status), ("SandboxError", "Error"));
    }

    #[test]
    fn a_runner_stopped_by_the_sandbox_deadline_is_a_time_out() {
        let stopped = runtime::ActionError { kind: ActionErrorKind::Timeout, message: "wall".into() };
        let r = interpret(&outcome(String::new(), Err(stopped)), "M:", 2.0);
        let run = r.run_result.unwrap();
        assert_eq!((r.status, run.status, run.return_code), ("Failed", "TimeLimitExceeded", None));
        let killed = runtime::ActionError { kind: ActionErrorKind::Killed, message: "signal 9".into() };
        let r = interpret(&outcome(String::new(), Err(killed)), "M:", 2.0);
        assert_eq!(r.status, "SandboxError");
        assert!(r.message.contains("signal 9"), "{}", r.message);
    }

    #[test]
    fn output_limit_fits_the_result_line() {
        let l = RunCodeLimits::default();
        assert!(l.validate().is_ok());
        assert!(l.output_kb() * 1024 >= ((2 * l.max_stream_bytes + l.max_fetch_bytes) * 4 / 3) as u64);
        let big = RunCodeLimits { max_fetch_bytes: 64 << 20, ..RunCodeLimits::default() };
        assert!(big.validate().is_err());
    }
}
