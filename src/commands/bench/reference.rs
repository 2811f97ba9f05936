//! The PyTorch side of `etpo bench model`: `trainer/benches/torch_reference.py`, run by the
//! reference environment's Python.
//!
//! The training step runs in a process of its own ([`measure_train_step`]), before etpo's: each
//! side's peak memory stays mapped after its step, and the two together would not fit a small
//! machine. Generation runs in long-lived processes, one per dtype ([`Server`], the script's
//! `--serve` mode), that generate on request, so that etpo's runs and PyTorch's take turns run by
//! run: a change in the machine's speed (other work, a noisy neighbour) then falls on both sides
//! alike, and the ratios of one round compare like with like.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use super::model::{Args, Figures, GenFigure, TEMPERATURE, TOP_K};

/// The script, inside the binary, so that a binary copied to another machine (a GPU one)
/// benchmarks without the source tree.
const TORCH_REFERENCE: &str = include_str!("../../../trainer/benches/torch_reference.py");

/// How long a side waits after the other side's run before its own: PyTorch's OpenMP threads
/// spin for a while after their last parallel region, and would take cores from etpo's run.
pub const SETTLE: Duration = Duration::from_millis(200);

/// The Python of the reference environment: `--python`, else `$ETPO_REF_PYTHON`, else
/// `<repo>/.venv-ref/bin/python`.
pub fn python(args: &Args) -> PathBuf {
    if let Some(p) = &args.python {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("ETPO_REF_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-ref/bin/python")
}

/// The script and the prompt's ids in temporary files, and the command that runs the script
/// with the arguments both modes share; removed when dropped.
struct Invocation {
    command: Command,
    _script: tempfile::TempPath,
    _ids: tempfile::NamedTempFile,
}

impl Invocation {
    fn new(args: &Args, python: &Path, model_path: &Path, prompt_ids: &[u32], dtype: &str) -> anyhow::Result<Self> {
        let mut script = tempfile::Builder::new().suffix(".py").tempfile().context("creating a temporary file")?;
        script.write_all(TORCH_REFERENCE.as_bytes())?;
        script.flush()?;
        let script = script.into_temp_path();
        let mut ids = tempfile::NamedTempFile::new().context("creating a temporary file")?;
        serde_json::to_writer(&mut ids, prompt_ids)?;
        ids.flush()?;
        let mut command = Command::new(python);
        command
            .arg(&script)
            .arg("--gguf")
            .arg(model_path)
            .arg("--prompt-ids")
            .arg(ids.path())
            .args(["--device", &args.model.device])
            .args(["--dtype", dtype])
            .args(["--new-tokens", &args.new_tokens.to_string()])
            .args(["--temperature", &TEMPERATURE.to_string()])
            .args(["--top-k", &TOP_K.to_string()])
            .args(["--train-batch", &args.train_batch.to_string()])
            .args(["--train-len", &args.train_len.to_string()])
            .args(["--rank", &args.rank.to_string()])
            .args(["--repeats", &args.repeats.to_string()])
            .stderr(Stdio::inherit());
        // If etpo is killed (a signal Drop never sees), the reference goes with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(Invocation { command, _script: script, _ids: ids })
    }
}

/// PyTorch's LoRA training step in `dtype`, in a process of its own: a [`Figures`] with the
/// step's times, its load time and peak memory, and no generation.
pub fn measure_train_step(
    args: &Args,
    python: &Path,
    model_path: &Path,
    prompt_ids: &[u32],
    dtype: &str,
) -> anyhow::Result<Figures> {
    let mut run = Invocation::new(args, python, model_path, prompt_ids, dtype)?;
    let output = run
        .command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running the PyTorch reference with {}", python.display()))?;
    if !output.status.success() {
        bail!("the PyTorch reference's training step ({dtype}) failed with {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: Value = serde_json::from_str(last)
        .with_context(|| format!("the PyTorch reference printed no JSON result; its output was:\n{stdout}"))?;
    let seconds = f64s(&v["train"]["seconds"]);
    Ok(Figures {
        load_s: v["load_s"].as_f64().unwrap_or(f64::NAN),
        train_step_s: v["train"]["step_s"].as_f64(),
        train_seconds: seconds,
        peak_rss_mb: v["peak_rss_mb"].as_f64(),
        ..Figures::default()
    })
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

/// A PyTorch process in one dtype that generates on request (the script's `--serve` mode).
pub struct Server {
    dtype: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    load_s: f64,
    /// The timed runs: (batch, seconds), in the order they ran.
    runs: Vec<(usize, f64)>,
    peak_rss_mb: Option<f64>,
    _files: Invocation,
}

impl Server {
    /// Starts the process and waits until the model is loaded.
    pub fn start(
        args: &Args,
        python: &Path,
        model_path: &Path,
        prompt_ids: &[u32],
        dtype: &str,
    ) -> anyhow::Result<Server> {
        let mut files = Invocation::new(args, python, model_path, prompt_ids, dtype)?;
        let mut child = files
            .command
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the PyTorch reference with {}", python.display()))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let stdout = BufReader::new(stdout.context("the PyTorch reference's standard output")?);
        let mut server = Server {
            dtype: dtype.to_string(),
            child,
            stdin,
            stdout,
            load_s: f64::NAN,
            runs: Vec::new(),
            peak_rss_mb: None,
            _files: files,
        };
        let ready = server.reply()?;
        if ready["ready"] != Value::Bool(true) {
            bail!("the PyTorch reference ({dtype}) did not report ready: {ready}");
        }
        server.load_s = ready["load_s"].as_f64().unwrap_or(f64::NAN);
        Ok(server)
    }

    /// The dtype it generates in (`float32`, `bfloat16`).
    pub fn dtype(&self) -> &str {
        &self.dtype
    }

    /// One generation of `batch` rows; its seconds. `timed` runs are kept for [`Server::figures`].
    pub fn generate(&mut self, batch: usize, seed: u64, timed: bool) -> anyhow::Result<f64> {
        let request = serde_json::json!({"batch": batch, "seed": seed});
        let stdin = self.stdin.as_mut().context("the PyTorch reference was already finished")?;
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("sending a request to the PyTorch reference ({})", self.dtype))?;
        let reply = self.reply()?;
        let seconds = reply["seconds"]
            .as_f64()
            .with_context(|| format!("the PyTorch reference ({}) answered {reply}", self.dtype))?;
        if timed {
            self.runs.push((batch, seconds));
        }
        Ok(seconds)
    }

    /// Ends the process (it reports its peak memory as it goes).
    pub fn finish(&mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let last = self.reply()?;
        self.peak_rss_mb = last["peak_rss_mb"].as_f64();
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the PyTorch reference ({}) ended with {status}", self.dtype);
        }
        Ok(())
    }

    /// Its figures: tokens/s per batch (median of the timed runs, which keep their order), load
    /// time and peak memory.
    pub fn figures(&self, new_tokens: usize) -> Figures {
        let mut batches: Vec<usize> = self.runs.iter().map(|r| r.0).collect();
        batches.dedup();
        let generate = batches
            .into_iter()
            .map(|batch| {
                let seconds: Vec<f64> = self.runs.iter().filter(|r| r.0 == batch).map(|r| r.1).collect();
                GenFigure {
                    batch,
                    weights: self.dtype.clone(),
                    adapter: false,
                    tokens_per_s: (batch * new_tokens) as f64 / super::model::median(&seconds),
                    seconds,
                }
            })
            .collect();
        Figures { load_s: self.load_s, generate, peak_rss_mb: self.peak_rss_mb, ..Figures::default() }
    }

    /// The next line of output as JSON; an error naming the exit status if the process ended.
    fn reply(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .stdout
                .read_line(&mut line)
                .with_context(|| format!("reading the PyTorch reference's answer ({})", self.dtype))?;
            if n == 0 {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                bail!(
                    "the PyTorch reference ({}) ended without answering ({status}); its messages are above",
                    self.dtype
                );
            }
            // Anything a library prints to standard output is not an answer.
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                if v.is_object() {
                    return Ok(v);
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // After an error on either side: no reference process outlives the benchmark.
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Takes the generation figures of the servers and the training steps' figures (one per dtype
/// measured) together, by dtype: the servers' order, then dtypes measured for training only.
pub fn combine(servers: &[Server], train: Vec<(String, Figures)>, new_tokens: usize) -> Vec<(String, Figures)> {
    let mut out: Vec<(String, Figures)> = servers.iter().map(|s| (s.dtype.clone(), s.figures(new_tokens))).collect();
    for (dtype, t) in train {
        match out.iter_mut().find(|(d, _)| *d == dtype) {
            Some((_, f)) => {
                f.train_step_s = t.train_step_s;
                f.train_seconds = t.train_seconds;
                f.peak_rss_mb = match (f.peak_rss_mb, t.peak_rss_mb) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
            None => out.push((dtype, t)),
        }
    }
    out
}
