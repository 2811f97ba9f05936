//! The honest score: the action that reached a seed's best validation reward, scored once on
//! the spec's held-out test part (`dataset.test_fraction`), which neither the model nor the
//! rewards ever saw. The paper's "best reward within k" selects the action on the split that
//! scores it, so it is optimistic; the gap between the two says by how much.

use std::fmt::Write as _;

use super::record::StepRecord;
use super::runner::SpecRun;
use super::ExperimentError;

/// One seed's best validation reward and the test score of the action that reached it.
#[derive(Debug, Clone, PartialEq)]
pub struct TestScore {
    pub spec: String,
    pub seed: u64,
    /// The best validation reward (a ROC AUC) and the step that reached it (from 1).
    pub best_val: f64,
    pub env_step: u32,
    /// The same action's ROC AUC on the test part, or why it could not be scored there.
    pub test: Result<f64, String>,
}

impl TestScore {
    /// `best_val − test`: how optimistic the selected score is (`None` when the test failed).
    pub fn gap(&self) -> Option<f64> {
        self.test.as_ref().ok().map(|t| self.best_val - t)
    }
}

/// For every spec with a test part and every seed with an action that ran: the action of the
/// best validation reward (the first step that reached it), assembled as in the run and scored
/// on the test part of the seed's split.
pub fn score_best_on_test(tasks: &[SpecRun], records: &[StepRecord]) -> Result<Vec<TestScore>, ExperimentError> {
    let mut out = Vec::new();
    for task in tasks {
        if !task.spec.holds_out_a_test_part() {
            continue;
        }
        for &seed in &task.seeds {
            let mut best: Option<&StepRecord> = None;
            for r in records.iter().filter(|r| r.spec == task.spec.name && r.seed == seed && r.ran) {
                if best.is_none_or(|b| r.reward > b.reward) {
                    best = Some(r);
                }
            }
            let Some(best) = best else { continue };
            let Some(score) = task.envs.score_action_on_test(seed, &best.action)? else { continue };
            out.push(TestScore {
                spec: task.spec.name.clone(),
                seed,
                best_val: best.reward,
                env_step: best.env_step,
                test: score.result,
            });
        }
    }
    Ok(out)
}

/// `test.csv`: one row per seed.
pub fn to_csv(scores: &[TestScore]) -> String {
    let mut out = String::from("spec,seed,env_step,best_val,test_of_best,gap,test_error\n");
    for s in scores {
        let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
        let err = s.test.as_ref().err().map_or(String::new(), |e| format!("\"{}\"", e.replace('"', "\"\"")));
        let _ = writeln!(
            out,
            "{},{},{},{:.4},{},{},{}",
            s.spec,
            s.seed,
            s.env_step,
            s.best_val,
            f(s.test.as_ref().ok().copied()),
            f(s.gap()),
            err
        );
    }
    out
}

/// The section of `summary.md` (empty without scores).
pub fn to_markdown(scores: &[TestScore]) -> String {
    if scores.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Held-out test score of the best action\n\nThe action that reached each seed's best \
         validation reward, scored once on the test part (`dataset.test_fraction`), which the model \
         and the rewards never saw; the gap is how optimistic the best validation reward is.\n\n\
         | Spec | Seed | Step | Best validation | Test of best | Gap |\n|---|---|---|---|---|---|\n",
    );
    for s in scores {
        let (test, gap) = match &s.test {
            Ok(t) => (format!("{t:.4}"), format!("{:+.4}", s.best_val - t)),
            Err(e) => (format!("failed: {}", e.lines().next().unwrap_or("")), "–".into()),
        };
        let _ = writeln!(out, "| {} | {} | {} | {:.4} | {test} | {gap} |", s.spec, s.seed, s.env_step, s.best_val);
    }
    out
}
