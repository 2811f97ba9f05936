//! `runtime::metrics::roc_auc` against scikit-learn's `roc_auc_score` itself, on many random
//! cases: 2 to 5 classes, imbalanced class sizes, heavy ties, constant scores, tiny and larger
//! samples, both multi-class averages. Also checks that both refuse the same degenerate inputs (where scikit-learn returns NaN
//! with an `UndefinedMetricWarning`, the Rust side returns an error).
//!
//! Needs the project's Python environment (`scripts/setup.sh python`): the repository's
//! `.venv/bin/python` with scikit-learn. The test fails, with that instruction, when it is missing.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use runtime::metrics::{roc_auc, Multiclass};
use serde_json::{json, Value};

/// The scikit-learn reference, run once over all cases (one JSON list in, one out).
const REFERENCE: &str = r#"
import json, sys
import numpy as np
from sklearn.metrics import roc_auc_score
out = []
for case in json.load(sys.stdin):
    y = np.array(case["y"]); p = np.array(case["p"], dtype=np.float64)
    try:
        if p.shape[1] == 2:
            v = roc_auc_score(y, p[:, 1])
        else:
            v = roc_auc_score(y, p, multi_class=case["multi"], average="macro")
        # Recent scikit-learn returns NaN (with a warning) where older versions raised.
        out.append({"error": "undefined (NaN)"} if np.isnan(v) else {"auc": float(v)})
    except ValueError as e:
        out.append({"error": str(e)})
json.dump(out, sys.stdout)
"#;

fn venv_python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "the scikit-learn reference needs the project virtual environment at {}; \
         create it with `scripts/setup.sh python`",
        python.display()
    );
    python
}

fn sklearn(cases: &[Value]) -> Vec<Value> {
    let mut child = Command::new(venv_python())
        .args(["-c", REFERENCE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the venv's python");
    let input = serde_json::to_vec(cases).expect("serialise cases");
    child.stdin.take().expect("python stdin").write_all(&input).expect("write cases to python");
    let output = child.wait_with_output().expect("wait for python");
    assert!(
        output.status.success(),
        "the scikit-learn reference failed ({}); is scikit-learn installed in the venv \
         (`scripts/setup.sh python`)?\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python's JSON answer")
}

/// xorshift64*: a few lines of deterministic randomness (no dependency needed for a test).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Labels where every class occurs, with class sizes skewed by random weights.
fn labels(rng: &mut Rng, n: usize, n_classes: usize) -> Vec<usize> {
    let weights: Vec<f64> = (0..n_classes).map(|_| 0.05 + rng.unit().powi(3)).collect();
    let total: f64 = weights.iter().sum();
    let mut y: Vec<usize> = (0..n_classes).collect();
    while y.len() < n {
        let mut u = rng.unit() * total;
        let mut c = 0;
        while c + 1 < n_classes && u >= weights[c] {
            u -= weights[c];
            c += 1;
        }
        y.push(c);
    }
    for i in (1..y.len()).rev() {
        let j = rng.below(i + 1);
        y.swap(i, j);
    }
    y
}

/// Probability rows; `style` picks continuous scores, coarse ones (many ties), or a constant row.
fn probabilities(rng: &mut Rng, y: &[usize], n_classes: usize, style: usize) -> Vec<Vec<f64>> {
    y.iter()
        .map(|&label| {
            let mut w: Vec<f64> = (0..n_classes)
                .map(|c| match style {
                    // Continuous, mildly informative.
                    0 => rng.unit() + if c == label { 0.3 * rng.unit() } else { 0.0 },
                    // Integer weights 0..=3: few distinct values, ties everywhere.
                    1 => (rng.below(4) + usize::from(c == label && rng.below(2) == 0)) as f64,
                    // Scores rounded to one decimal.
                    2 => (rng.unit() * 10.0).round() / 10.0,
                    // Every row the same: every score tied.
                    _ => (c + 1) as f64,
                })
                .collect();
            let sum: f64 = w.iter().sum();
            if sum == 0.0 {
                w = vec![1.0; n_classes];
            }
            let sum: f64 = w.iter().sum();
            w.iter().map(|v| v / sum).collect()
        })
        .collect()
}

#[test]
fn matches_sklearn_on_random_cases() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for i in 0..400 {
        let n_classes = 2 + i % 4;
        let n = n_classes + rng.below(if i % 5 == 0 { 8 } else { 300 });
        let y = labels(&mut rng, n, n_classes);
        let style = [0, 0, 1, 1, 2, 2, 3][rng.below(7)];
        let p = probabilities(&mut rng, &y, n_classes, style);
        for multi in [Multiclass::Ovo, Multiclass::Ovr] {
            if n_classes == 2 && multi == Multiclass::Ovr {
                continue;
            }
            let name = if multi == Multiclass::Ovo { "ovo" } else { "ovr" };
            ours.push(roc_auc(&y, &p, n_classes, multi).expect("valid case"));
            cases.push(json!({"y": y, "p": p, "multi": name}));
        }
    }
    let reference = sklearn(&cases);
    assert_eq!(reference.len(), cases.len());
    let mut worst: f64 = 0.0;
    for (k, (got, want)) in ours.iter().zip(&reference).enumerate() {
        let want = want["auc"].as_f64().unwrap_or_else(|| panic!("sklearn refused case {k}: {want}\n{}", cases[k]));
        let diff = (got - want).abs();
        worst = worst.max(diff);
        assert!(diff < 1e-9, "case {k}: ours {got}, sklearn {want} (|diff| = {diff:e})\n{}", cases[k]);
    }
    eprintln!("{} cases, largest |diff| {worst:e}", ours.len());
}

#[test]
fn refuses_what_sklearn_refuses() {
    let cases = [
        // One class present (binary and multi-class).
        (vec![1, 1, 1], vec![vec![0.4, 0.6], vec![0.5, 0.5], vec![0.9, 0.1]], "ovo"),
        (vec![2, 2], vec![vec![0.2, 0.3, 0.5], vec![0.1, 0.1, 0.8]], "ovo"),
        // A class absent from y_true with three probability columns.
        (vec![0, 2, 0, 2], vec![vec![0.2, 0.3, 0.5]; 4], "ovr"),
        // Rows that are not probabilities.
        (vec![0, 1, 2], vec![vec![0.5, 0.5, 0.5]; 3], "ovo"),
    ];
    let json_cases: Vec<Value> = cases.iter().map(|(y, p, multi)| json!({"y": y, "p": p, "multi": multi})).collect();
    for ((y, p, multi), answer) in cases.iter().zip(sklearn(&json_cases)) {
        let multi = if *multi == "ovo" { Multiclass::Ovo } else { Multiclass::Ovr };
        assert!(answer.get("error").is_some(), "sklearn accepted {y:?} {p:?}: {answer}");
        let ours = roc_auc(y, p, p[0].len(), multi);
        assert!(ours.is_err(), "we accepted {y:?} {p:?}: {ours:?}; sklearn said {answer}");
    }
}
