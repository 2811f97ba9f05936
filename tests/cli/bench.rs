//! `etpo bench serve` end to end, on a tiny budget: the shape of its output (the CPU line, both
//! scenarios, per client count a row each for HTTP and in-process and one of their ratios),
//! never its timings. `etpo bench model` against a stand-in for the PyTorch reference: its
//! protocol, its rows and verdicts, the precisions of etpo's training step.
//!
//! It needs the games (built here, as `tests/cli/games.rs` does) and the project's Python
//! environment (`scripts/setup.sh python`).

use crate::common::{ok, repo, venv_python, ETPO};

use std::process::Command;

/// The fields of a table row as numbers (a ratio's trailing `x` dropped).
fn numbers(fields: &[&str]) -> Vec<f64> {
    fields.iter().map(|v| v.trim_end_matches('x').parse::<f64>().unwrap_or_else(|e| panic!("{v:?}: {e}"))).collect()
}

#[test]
fn bench_serve_prints_http_and_in_process_figures_and_their_ratios() {
    crate::games::games();
    let out = Command::new(ETPO)
        .args(["bench", "serve", "--clients", "1,2", "--requests", "5", "--python"])
        .arg(venv_python())
        .current_dir(repo())
        .output()
        .expect("the etpo binary runs");
    let stdout = ok(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("etpo bench serve: ") && lines[0].contains("cores"), "{stdout}");
    let judged = stdout.contains("NOT met") || lines.iter().any(|l| l.trim_end().ends_with(" met"));
    assert!(!judged, "no target is judged:\n{stdout}");

    for title in ["game steps: guess", "sandboxed actions: balance_scale"] {
        let at = lines.iter().position(|l| l.starts_with(title)).unwrap_or_else(|| panic!("no {title:?}:\n{stdout}"));
        let header = lines[at + 1];
        assert!(header.trim_start().starts_with("clients"), "{stdout}");
        for column in ["steps", "p50", "p99", "steps/s", "CPU"] {
            assert!(header.contains(column), "no {column:?} column:\n{stdout}");
        }
        // Per client count: the HTTP row, the in-process row, their ratios.
        for (rows, clients) in lines[at + 2..at + 8].chunks(3).zip([1usize, 2]) {
            for (row, side) in rows[..2].iter().zip(["HTTP", "in-process"]) {
                let fields: Vec<&str> = row.split_whitespace().collect();
                assert_eq!(fields[..2], [clients.to_string().as_str(), side], "{row}");
                let v = numbers(&fields[2..]);
                assert_eq!(v.len(), 5, "steps, p50, p99, steps/s, CPU per step: {row}");
                // Bounded by --requests per client.
                assert!(v[0] >= 1.0 && v[0] <= (5 * clients) as f64, "{row}");
                assert!(v[1] > 0.0 && v[2] >= v[1] && v[3] > 0.0 && v[4] >= 0.0, "{row}");
            }
            let fields: Vec<&str> = rows[2].split_whitespace().collect();
            assert_eq!(fields[..4], [clients.to_string().as_str(), "HTTP", "/", "in-process"], "{}", rows[2]);
            assert!(fields[4..].iter().all(|f| f.ends_with('x')), "{}", rows[2]);
            let ratios = numbers(&fields[4..]);
            assert_eq!(ratios.len(), 4, "p50, p99, steps/s and CPU ratios: {}", rows[2]);
            assert!(ratios.iter().all(|r| r.is_finite() && *r >= 0.0), "{}", rows[2]);
        }
    }
}

/// A stand-in for the reference environment's Python that speaks `torch_reference.py`'s protocol
/// without PyTorch: it answers every generation request at once with `seconds` (and reports a
/// training step of 2 s); with `die_after`, it exits instead of answering request `die_after + 1`.
fn fake_reference(dir: &std::path::Path, seconds: f64, die_after: Option<usize>) -> std::path::PathBuf {
    let path = dir.join("python");
    let die = die_after.map_or(String::new(), |n| format!("[ $n -ge {n} ] && exit 3\n    "));
    let script = format!(
        r#"#!/bin/sh
case " $* " in
  *" --serve "*) ;;
  *) echo '{{"load_s": 0.5, "train": {{"seconds": [2.0, 2.0], "step_s": 2.0}}, "peak_rss_mb": 10}}'; exit 0 ;;
esac
echo 'a line a library printed'
echo '{{"ready": true, "load_s": 0.25}}'
n=0
while read -r request; do
    {die}echo '{{"seconds": {seconds}}}'
    n=$((n + 1))
done
echo '{{"peak_rss_mb": 123}}'
"#
    );
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn bench_model(python: &std::path::Path) -> std::process::Output {
    let model = trainer::default_model_path();
    assert!(model.is_file(), "{} is missing: run `scripts/setup.sh model`", model.display());
    Command::new(ETPO)
        .args(["bench", "model", "--only", "generate", "--batches", "1", "--new-tokens", "4", "--repeats", "3"])
        .args(["--no-adapter", "--python"])
        .arg(python)
        .output()
        .expect("the etpo binary runs")
}

/// PyTorch's generation runs take turns with etpo's, in processes that answer requests: its
/// figures are the medians of what it reported, and each round's ratio is printed.
#[test]
fn bench_model_takes_turns_with_the_reference_and_prints_round_by_round_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench_model(&fake_reference(dir.path(), 0.5, None));
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Three timed runs per dtype (after a warm-up), each between etpo's runs of its round.
    for dtype in ["float32", "bfloat16"] {
        for run in 1..=3 {
            let line = format!("PyTorch {dtype} batch 1, run {run}: 8.0 tokens/s");
            assert!(stderr.contains(&line), "no {line:?}:\n{stderr}");
        }
    }
    let row = stdout.lines().find(|l| l.starts_with("batch 1 ")).unwrap_or_else(|| panic!("no batch row:\n{stdout}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    // batch 1 | etpo f32 | etpo quantized | PyTorch f32 | PyTorch bf16 | f32/best | quantized/best | target
    assert_eq!(&fields[4..6], ["8.0", "8.0"], "{row}");
    let quantized: f64 = fields[3].parse().unwrap();
    let ratio: f64 = fields[7].trim_end_matches('x').parse().unwrap();
    assert!((ratio - quantized / 8.0).abs() < 0.01, "{row}");
    let rounds = stdout
        .lines()
        .find(|l| l.starts_with("batch 1, quantized/best round by round (3 rounds"))
        .unwrap_or_else(|| panic!("no round-by-round line:\n{stdout}"));
    assert!(rounds.contains("median") && rounds.contains("range"), "{rounds}");
    // The reference's peak memory, as it reported it when it ended.
    let peak = stdout.lines().find(|l| l.starts_with("peak RSS of the process")).unwrap();
    assert!(peak.trim_end().ends_with(" 123"), "{peak}");
}

/// A reference that dies mid-way: a clear error naming it, and no process left behind.
#[test]
fn bench_model_reports_a_reference_that_dies() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench_model(&fake_reference(dir.path(), 0.5, Some(2)));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the PyTorch reference (float32) ended without answering"), "{stderr}");
    // The other dtype's process was killed with the benchmark.
    let dir_name = dir.path().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir_name))
        .collect();
    assert!(left.is_empty(), "reference processes left: {left:?}");
}

fn bench_train_step(python: &std::path::Path, matmul: Option<&str>, bf16_blas: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(ETPO);
    cmd.args(["bench", "model", "--only", "train", "--train-batch", "2", "--train-len", "24", "--repeats", "1"])
        .args(["--reference-dtypes", "float32,bfloat16"])
        .arg("--python")
        .arg(python)
        .env_remove("ETPO_MATMUL")
        .env_remove("ETPO_BF16_BLAS");
    if let Some(m) = matmul {
        cmd.env("ETPO_MATMUL", m);
    }
    if let Some(b) = bf16_blas {
        cmd.env("ETPO_BF16_BLAS", b);
    }
    cmd.output().expect("the etpo binary runs")
}

/// The training step: PyTorch in both dtypes (the stand-in reports 2 s for each), etpo in the
/// precision it picks and, with bf16 products installed (`make test` installs them), in the other
/// one too, with the gradients' difference and the verdict against the fastest reference.
/// `ETPO_MATMUL` picks the precision; a bad value or bf16 without a bf16 BLAS is a clear error.
#[test]
fn bench_model_times_the_training_step_in_both_precisions_against_both_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let python = fake_reference(dir.path(), 0.5, None);
    let out = bench_train_step(&python, Some("bf16"), None);
    let stdout = ok(&out);
    let head = stdout.lines().find(|l| l.contains("etpo/best")).unwrap_or_else(|| panic!("no header:\n{stdout}"));
    let cols: Vec<&str> = head.split_whitespace().collect();
    assert_eq!(cols, ["etpo", "bf16", "etpo", "f32", "PyTorch", "f32", "PyTorch", "bf16", "etpo/best", "target"]);
    let row = stdout.lines().find(|l| l.starts_with("LoRA step 2x24 (s)")).unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    let v = numbers(&fields[4..9]);
    assert_eq!(&v[2..4], [2.0, 2.0], "{row}");
    assert!((v[4] - 2.0 / v[0]).abs() < 0.02 * v[4], "{row}");
    let verdict = if 2.0 / v[0] >= 1.3 { "met" } else { "NOT met" };
    assert!(row.trim_end().ends_with(&format!(">= 1.3x: {verdict}")), "{row}");
    let diff = stdout.lines().find(|l| l.starts_with("etpo bf16 against f32 products")).unwrap();
    let e: f64 = diff.split("relative difference ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(e > 0.0 && e < 0.1, "{diff}");

    let out = bench_train_step(&python, Some("f32"), None);
    let stdout = ok(&out);
    assert!(stdout.lines().any(|l| l.split_whitespace().take(4).eq(["etpo", "f32", "etpo", "bf16"])), "{stdout}");

    let out = bench_train_step(&python, Some("bf16"), Some("off"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ETPO_MATMUL=bf16: no BLAS with bf16 products") && stderr.contains("setup.sh bf16"),
        "{stderr}"
    );
    let out = bench_train_step(&python, Some("fp8"), None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ETPO_MATMUL=\"fp8\": expected f32, bf16 or auto"), "{stderr}");
}
