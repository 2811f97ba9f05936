//! `etpo bench serve` end to end, on a tiny budget: the shape of its output (the CPU line, both
//! scenarios, per client count a row each for HTTP and in-process and one of their ratios),
//! never its timings.
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
