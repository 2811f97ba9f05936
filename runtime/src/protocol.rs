//! The wire format between the host and a worker (`harness.py`), and the host-side checks of
//! what a worker sends back.
//!
//! A frame is a u32 little-endian header length, a JSON header and a binary payload whose length
//! is the header's `payload` field. Requests carry x_train (f64), y_train (i64) and x_val (f64),
//! row-major; responses carry the probability matrix (f64), row-major. Binary arrays rather than
//! JSON numbers: exact and cheap to decode with `numpy.frombuffer`.

use crate::job::{ActionError, ActionErrorKind as Kind, Job, Limits, Outcome};
use crate::RuntimeError;
use serde::Deserialize;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

/// Longest wall-clock or CPU limit accepted for one action (a day).
const MAX_SECONDS: f64 = 86_400.0;
/// Largest response payload accepted (64 MiB of probabilities).
const MAX_PAYLOAD: usize = 64 << 20;

/// A job encoded once, to be written to whichever worker takes it (also on a retry).
pub(crate) struct Request {
    pub bytes: Vec<u8>,
    pub n_val: usize,
    pub n_classes: usize,
    pub limits: Limits,
}

/// Checks the job's shapes and labels and encodes it.
pub(crate) fn encode(job: &Job) -> Result<Request, RuntimeError> {
    let n_features = job.x_train.first().or(job.x_val.first()).map_or(0, Vec::len);
    if job.x_train.is_empty() || job.x_val.is_empty() {
        return Err(RuntimeError::InvalidJob("x_train and x_val must both have rows".into()));
    }
    if job.y_train.len() != job.x_train.len() {
        return Err(RuntimeError::InvalidJob(format!(
            "x_train has {} rows but y_train has {} labels",
            job.x_train.len(),
            job.y_train.len()
        )));
    }
    if let Some(r) = job.x_train.iter().chain(&job.x_val).position(|r| r.len() != n_features) {
        return Err(RuntimeError::InvalidJob(format!(
            "feature row {r} (x_train then x_val) does not have {n_features} values"
        )));
    }
    let l = &job.limits;
    for (name, v) in [("wall_s", l.wall_s), ("cpu_s", l.cpu_s)] {
        if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
            return Err(RuntimeError::InvalidJob(format!(
                "limit {name} is {v}; expected seconds in (0, {MAX_SECONDS}]"
            )));
        }
    }
    if job.n_classes < 2 {
        return Err(RuntimeError::InvalidJob(format!("n_classes is {}, need at least 2", job.n_classes)));
    }
    if let Some(&y) = job.y_train.iter().find(|&&y| y >= job.n_classes) {
        return Err(RuntimeError::InvalidJob(format!("label {y} is not below n_classes {}", job.n_classes)));
    }
    let header = serde_json::json!({
        "program": job.program,
        "n_train": job.x_train.len(),
        "n_features": n_features,
        "n_val": job.x_val.len(),
        "n_classes": job.n_classes,
        "limits": job.limits,
    });
    let mut payload = Vec::with_capacity((job.x_train.len() * (n_features + 1) + job.x_val.len() * n_features) * 8);
    for row in &job.x_train {
        row.iter().for_each(|v| payload.extend_from_slice(&v.to_le_bytes()));
    }
    job.y_train.iter().for_each(|&y| payload.extend_from_slice(&(y as i64).to_le_bytes()));
    for row in &job.x_val {
        row.iter().for_each(|v| payload.extend_from_slice(&v.to_le_bytes()));
    }
    let mut bytes = frame_header(header, payload.len());
    bytes.extend_from_slice(&payload);
    Ok(Request { bytes, n_val: job.x_val.len(), n_classes: job.n_classes, limits: job.limits })
}

fn frame_header(mut header: serde_json::Value, payload: usize) -> Vec<u8> {
    header["payload"] = payload.into();
    let head = header.to_string().into_bytes();
    let mut bytes = Vec::with_capacity(4 + head.len() + payload);
    bytes.extend_from_slice(&(head.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&head);
    bytes
}

/// Writes a whole request before `deadline`; an error means the worker is gone or stuck. The
/// descriptor must be non-blocking (see `Launcher::start`), so that a stuck worker cannot hang
/// the caller on a full pipe.
pub(crate) fn write_request(to: &impl AsRawFd, req: &Request, deadline: Instant) -> Result<(), ReadError> {
    let fd = to.as_raw_fd();
    let mut done = 0;
    while done < req.bytes.len() {
        if !ready(fd, libc::POLLOUT, deadline)? {
            continue;
        }
        let rest = &req.bytes[done..];
        // SAFETY: reads at most rest.len() bytes from a live slice.
        let k = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if k < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) {
                continue;
            }
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe { ReadError::Closed } else { ReadError::Io(e) });
        }
        done += k as usize;
    }
    Ok(())
}

/// Why reading a frame failed: the worker is unusable either way.
#[derive(Debug)]
pub(crate) enum ReadError {
    Deadline,
    Closed,
    Garbage(String),
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Deadline => f.write_str("no answer before the host-side deadline"),
            ReadError::Closed => f.write_str("the worker closed its channel (it died)"),
            ReadError::Garbage(m) => write!(f, "unreadable answer: {m}"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one frame from `fd`, giving up at `deadline`.
pub(crate) fn read_frame(fd: &impl AsRawFd, deadline: Instant) -> Result<(serde_json::Value, Vec<u8>), ReadError> {
    let fd = fd.as_raw_fd();
    let mut len = [0u8; 4];
    read_exact(fd, &mut len, deadline)?;
    let n = u32::from_le_bytes(len) as usize;
    if n > (16 << 20) {
        return Err(ReadError::Garbage(format!("header of {n} bytes")));
    }
    let mut head = vec![0u8; n];
    read_exact(fd, &mut head, deadline)?;
    let header: serde_json::Value =
        serde_json::from_slice(&head).map_err(|e| ReadError::Garbage(format!("header: {e}")))?;
    let size = header.get("payload").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if size > MAX_PAYLOAD {
        return Err(ReadError::Garbage(format!("payload of {size} bytes")));
    }
    let mut payload = vec![0u8; size];
    read_exact(fd, &mut payload, deadline)?;
    Ok((header, payload))
}

/// Waits until `fd` is ready for `events` (`POLLIN` or `POLLOUT`) or `deadline` passes:
/// `Ok(true)` when ready, `Ok(false)` when the wait was cut short (a signal) and should be
/// tried again, `Err(Deadline)` once the deadline has passed.
fn ready(fd: RawFd, events: libc::c_short, deadline: Instant) -> Result<bool, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Deadline);
    }
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(ReadError::Io(e)) };
    }
    Ok(r > 0)
}

fn read_exact(fd: RawFd, buf: &mut [u8], deadline: Instant) -> Result<(), ReadError> {
    let mut got = 0;
    while got < buf.len() {
        if !ready(fd, libc::POLLIN, deadline)? {
            continue;
        }
        // SAFETY: writes at most buf.len() - got bytes into the unfilled tail of buf.
        let k = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if k < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ReadError::Io(e));
        }
        if k == 0 {
            return Err(ReadError::Closed);
        }
        got += k as usize;
    }
    Ok(())
}

/// The worker's answer to one job (see `serve_one` in harness.py).
#[derive(Debug, Deserialize)]
pub(crate) struct Response {
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub rows: Option<usize>,
    #[serde(default)]
    pub cols: Option<usize>,
    #[serde(default)]
    pub classes: Option<Vec<i64>>,
    #[serde(default)]
    pub wall_s: f64,
    #[serde(default)]
    pub cpu_s: f64,
    #[serde(default)]
    pub peak_rss_mb: f64,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
}

/// Facts the host knows about a job's run beyond what the worker reported.
pub(crate) struct HostView {
    /// The sandbox's memory cgroup recorded an out-of-memory kill during the job.
    pub oom_killed: bool,
}

/// Turns a worker's answer into an [`Outcome`], checking everything the (untrusted) child sent.
pub(crate) fn decode(
    req: &Request,
    header: serde_json::Value,
    payload: &[u8],
    host: HostView,
) -> Result<Outcome, String> {
    let r: Response = serde_json::from_value(header).map_err(|e| format!("bad response header: {e}"))?;
    let limits = &req.limits;
    let result = if r.ok {
        probabilities(&r, payload, req.n_val, req.n_classes)
    } else {
        Err(failure(&r, limits, host.oom_killed))
    };
    let mut output = r.output;
    if r.output_truncated {
        output.push_str(&format!("\n[output truncated at {} KB]", limits.output_kb));
    }
    Ok(Outcome { result, wall_s: r.wall_s, cpu_s: r.cpu_s, peak_rss_mb: r.peak_rss_mb, output })
}

fn failure(r: &Response, limits: &Limits, oom_killed: bool) -> ActionError {
    let message = r.message.clone().unwrap_or_default();
    let mem = || format!("the program exceeded the memory limit of {} MB", limits.memory_mb);
    let cpu = || format!("the program exceeded the CPU time limit of {} s", fmt_secs(limits.cpu_s));
    let signal = r.signal.unwrap_or(0);
    if oom_killed {
        return ActionError::new(Kind::Memory, mem());
    }
    match r.kind.as_deref() {
        Some("Syntax") => ActionError::new(Kind::Syntax, message),
        Some("Timeout") => ActionError::new(
            Kind::Timeout,
            format!("the program did not finish within the wall-clock limit of {} s", fmt_secs(limits.wall_s)),
        ),
        Some("Memory") => {
            let m = if message.is_empty() { mem() } else { format!("{} ({message})", mem()) };
            ActionError::new(Kind::Memory, m)
        }
        Some("BadPredictions") => ActionError::new(Kind::BadPredictions, message),
        _ if signal == libc::SIGXCPU || (signal == libc::SIGKILL && r.cpu_s + 0.05 >= limits.cpu_s) => {
            ActionError::new(Kind::Timeout, cpu())
        }
        _ if signal == libc::SIGXFSZ => {
            ActionError::new(Kind::Output, "the program wrote a file larger than the sandbox allows".to_string())
        }
        _ if signal != 0 => ActionError::new(
            Kind::Killed,
            format!("the program's process was killed by signal {} ({})", signal, signal_name(signal)),
        ),
        _ => ActionError::new(Kind::Exception, if message.is_empty() { "the program failed".into() } else { message }),
    }
}

fn probabilities(r: &Response, payload: &[u8], n_val: usize, n_classes: usize) -> Result<Vec<Vec<f64>>, ActionError> {
    let bad = |m: String| Err(ActionError::new(Kind::BadPredictions, m));
    let (rows, cols) = (r.rows.unwrap_or(0), r.cols.unwrap_or(0));
    if rows.checked_mul(cols).and_then(|n| n.checked_mul(8)) != Some(payload.len()) {
        return bad("predict_proba(x_val) returned data that does not form a matrix".into());
    }
    if rows != n_val {
        return bad(format!(
            "predict_proba(x_val) returned {rows} rows for the {n_val} rows of x_val; it must return one row per sample"
        ));
    }
    // Column c of the estimator's output is class `columns[c]`.
    let columns: Vec<usize> = match &r.classes {
        Some(classes) => {
            if classes.len() != cols {
                return bad(format!(
                    "predict_proba(x_val) returned {cols} columns but the model has {} classes (classes_); \
                     it must return one column per class",
                    classes.len()
                ));
            }
            let mut seen = vec![false; n_classes];
            let mut columns = Vec::with_capacity(cols);
            for &c in classes {
                if c < 0 || c as usize >= n_classes || seen[c as usize] {
                    return bad(format!(
                        "the model's classes_ are {classes:?}; expected distinct labels among 0..{} as in y_train",
                        n_classes - 1
                    ));
                }
                seen[c as usize] = true;
                columns.push(c as usize);
            }
            columns
        }
        None if cols == n_classes => (0..n_classes).collect(),
        None => {
            return bad(format!("predict_proba(x_val) returned {cols} columns; expected {n_classes}, one per class"))
        }
    };
    let mut out = vec![vec![0.0; n_classes]; rows];
    for (i, row) in out.iter_mut().enumerate() {
        for (c, &class) in columns.iter().enumerate() {
            let at = (i * cols + c) * 8;
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[at..at + 8]);
            let v = f64::from_le_bytes(b);
            if !v.is_finite() {
                return bad(format!(
                    "predict_proba(x_val) returned {v} in row {i}; probabilities must be finite numbers"
                ));
            }
            row[class] = v;
        }
    }
    Ok(out)
}

fn fmt_secs(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV, a crash",
        libc::SIGBUS => "SIGBUS, a crash",
        libc::SIGABRT => "SIGABRT, an abort",
        libc::SIGILL => "SIGILL, a crash",
        libc::SIGFPE => "SIGFPE, an arithmetic fault",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS, a forbidden system call",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(n_val: usize, n_classes: usize) -> Request {
        Request { bytes: vec![], n_val, n_classes, limits: Limits::default() }
    }

    fn f64s(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn ok_header(rows: usize, cols: usize, classes: Option<Vec<i64>>) -> serde_json::Value {
        serde_json::json!({"ok": true, "rows": rows, "cols": cols, "classes": classes, "wall_s": 0.1})
    }

    #[test]
    fn columns_follow_classes_and_missing_classes_are_zero() {
        let payload = f64s(&[0.25, 0.75, 0.5, 0.5]);
        let out = decode(&req(2, 3), ok_header(2, 2, Some(vec![2, 0])), &payload, HostView { oom_killed: false })
            .unwrap()
            .result
            .unwrap();
        assert_eq!(out, vec![vec![0.75, 0.0, 0.25], vec![0.5, 0.0, 0.5]]);
    }

    #[test]
    fn nan_wrong_rows_and_wrong_columns_are_bad_predictions() {
        let host = || HostView { oom_killed: false };
        let nan = decode(&req(1, 2), ok_header(1, 2, None), &f64s(&[f64::NAN, 1.0]), host()).unwrap();
        assert_eq!(nan.result.unwrap_err().kind, Kind::BadPredictions);
        let rows = decode(&req(2, 2), ok_header(1, 2, None), &f64s(&[0.5, 0.5]), host()).unwrap();
        assert!(rows.result.unwrap_err().message.contains("1 rows for the 2 rows"));
        let cols = decode(&req(1, 2), ok_header(1, 3, Some(vec![0, 1])), &f64s(&[0.2, 0.3, 0.5]), host()).unwrap();
        assert!(cols.result.unwrap_err().message.contains("3 columns but the model has 2 classes"));
        let short = decode(&req(1, 2), ok_header(1, 2, None), &f64s(&[0.5]), host()).unwrap();
        assert_eq!(short.result.unwrap_err().kind, Kind::BadPredictions);
        let label = decode(&req(1, 2), ok_header(1, 2, Some(vec![0, 5])), &f64s(&[0.5, 0.5]), host()).unwrap();
        assert!(label.result.unwrap_err().message.contains("classes_ are [0, 5]"));
    }

    #[test]
    fn limits_are_named_in_plain_sentences() {
        let limits = Limits { wall_s: 3.0, cpu_s: 2.0, memory_mb: 256, ..Limits::default() };
        let r = Request { bytes: vec![], n_val: 1, n_classes: 2, limits };
        let timeout =
            decode(&r, serde_json::json!({"ok": false, "kind": "Timeout"}), &[], HostView { oom_killed: false });
        assert_eq!(
            timeout.unwrap().result.unwrap_err().message,
            "the program did not finish within the wall-clock limit of 3 s"
        );
        let oom = decode(
            &r,
            serde_json::json!({"ok": false, "kind": "Killed", "signal": 9}),
            &[],
            HostView { oom_killed: true },
        );
        assert_eq!(oom.unwrap().result.unwrap_err().message, "the program exceeded the memory limit of 256 MB");
        let cpu = decode(
            &r,
            serde_json::json!({"ok": false, "kind": "Killed", "signal": 24, "cpu_s": 2.0}),
            &[],
            HostView { oom_killed: false },
        );
        assert_eq!(cpu.unwrap().result.unwrap_err().message, "the program exceeded the CPU time limit of 2 s");
    }

    #[test]
    fn encode_rejects_inconsistent_jobs() {
        let job = Job {
            program: String::new(),
            x_train: vec![vec![1.0, 2.0], vec![3.0]],
            y_train: vec![0, 1],
            x_val: vec![vec![1.0, 2.0]],
            n_classes: 2,
            limits: Limits::default(),
        };
        assert!(matches!(encode(&job), Err(RuntimeError::InvalidJob(_))));
        let job = Job { x_train: vec![vec![1.0, 2.0], vec![3.0, 4.0]], y_train: vec![0, 2], ..job };
        assert!(matches!(encode(&job), Err(RuntimeError::InvalidJob(_))));
        let job = Job { y_train: vec![0, 1], ..job };
        let nan = Job { limits: Limits { wall_s: f64::NAN, ..Limits::default() }, ..job.clone() };
        assert!(matches!(encode(&nan), Err(RuntimeError::InvalidJob(_))));
        let r = encode(&job).unwrap();
        let head_len = u32::from_le_bytes(r.bytes[..4].try_into().unwrap()) as usize;
        // 2x2 x_train + 2 labels + 1x2 x_val, 8 bytes each
        assert_eq!(r.bytes.len(), 4 + head_len + 8 * 8);
    }
}
