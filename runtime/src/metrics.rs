//! The reward metric, computed outside the sandbox: ROC AUC exactly as scikit-learn's
//! `roc_auc_score` computes it.
//!
//! - Two classes: `roc_auc_score(y_true, proba[:, 1])`.
//! - More classes, [`Multiclass::Ovo`]: `roc_auc_score(y_true, proba, multi_class="ovo",
//!   average="macro")`, Hand & Till's (2001) M: for every pair of classes `a < b`, over the rows
//!   of those two classes, the mean of AUC(a vs b, scored by `proba[:, a]`) and AUC(b vs a,
//!   scored by `proba[:, b]`); then the mean over pairs.
//! - More classes, [`Multiclass::Ovr`]: `multi_class="ovr", average="macro"`: the mean over
//!   classes of AUC(class vs the rest, scored by its column).
//!
//! Each binary AUC follows `roc_curve` (thresholds at the distinct scores, collinear points
//! dropped, `(0, 0)` prepended) and `auc` (the trapezoid rule), so tied scores count one half,
//! as in scikit-learn. The inputs are checked as scikit-learn checks them (both/all classes
//! present in `y_true`, finite scores, multi-class rows summing to 1 within `np.allclose`'s
//! tolerance); anything it would reject is a [`MetricError`]. A single class in `y_true` is an
//! error too ([`MetricError::SingleClass`]), where scikit-learn 1.9 returns NaN with a warning
//! (older versions raised): a reward must be a number.

/// How a multi-class ROC AUC averages binary ones (ignored for two classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Multiclass {
    /// One-vs-one macro average (Hand & Till); the paper's reference code and CAAFE use it.
    #[default]
    Ovo,
    /// One-vs-rest macro average.
    Ovr,
}

/// Why a ROC AUC cannot be computed from these labels and probabilities.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("ROC AUC needs at least 2 classes, got n_classes = {n_classes}")]
    TooFewClasses { n_classes: usize },
    #[error("ROC AUC needs at least one sample")]
    Empty,
    #[error("{labels} labels but {rows} rows of probabilities; expected one row per label")]
    LengthMismatch { labels: usize, rows: usize },
    #[error("probability row {row} has {found} columns; expected {expected} (one per class)")]
    WrongColumns { row: usize, expected: usize, found: usize },
    #[error("label {label} at row {row} is not a class index below {n_classes}")]
    LabelOutOfRange { row: usize, label: usize, n_classes: usize },
    #[error("probability at row {row}, column {column} is {value}; expected a finite number")]
    NonFinite { row: usize, column: usize, value: f64 },
    #[error("only one class ({class}) is present in the true labels; ROC AUC is not defined in that case")]
    SingleClass { class: usize },
    #[error(
        "classes {missing:?} of {n_classes} do not occur in the true labels; multi-class ROC AUC needs every class"
    )]
    MissingClasses { missing: Vec<usize>, n_classes: usize },
    #[error("probability row {row} sums to {sum}, not 1; multi-class ROC AUC needs class probabilities")]
    NotProbabilities { row: usize, sum: f64 },
}

/// ROC AUC of class probabilities `proba` (one row per sample, one column per class) against
/// the true class indices `y_true`, as scikit-learn's `roc_auc_score` computes it (see the
/// module documentation). `multiclass` only matters for `n_classes > 2`.
pub fn roc_auc(
    y_true: &[usize],
    proba: &[Vec<f64>],
    n_classes: usize,
    multiclass: Multiclass,
) -> Result<f64, MetricError> {
    check(y_true, proba, n_classes)?;
    let column = |c: usize| -> Vec<f64> { proba.iter().map(|row| row[c]).collect() };
    if n_classes == 2 {
        let positive: Vec<bool> = y_true.iter().map(|&y| y == 1).collect();
        return Ok(binary_auc(&positive, &column(1)));
    }
    let scores = match multiclass {
        Multiclass::Ovr => (0..n_classes)
            .map(|c| {
                let positive: Vec<bool> = y_true.iter().map(|&y| y == c).collect();
                binary_auc(&positive, &column(c))
            })
            .collect::<Vec<f64>>(),
        Multiclass::Ovo => {
            let mut scores = Vec::with_capacity(n_classes * (n_classes - 1) / 2);
            for a in 0..n_classes {
                for b in a + 1..n_classes {
                    let rows: Vec<usize> = (0..y_true.len()).filter(|&i| y_true[i] == a || y_true[i] == b).collect();
                    let is_a: Vec<bool> = rows.iter().map(|&i| y_true[i] == a).collect();
                    let is_b: Vec<bool> = is_a.iter().map(|&x| !x).collect();
                    let score_a: Vec<f64> = rows.iter().map(|&i| proba[i][a]).collect();
                    let score_b: Vec<f64> = rows.iter().map(|&i| proba[i][b]).collect();
                    scores.push((binary_auc(&is_a, &score_a) + binary_auc(&is_b, &score_b)) / 2.0);
                }
            }
            scores
        }
    };
    Ok(scores.iter().sum::<f64>() / scores.len() as f64)
}

/// The checks scikit-learn makes before scoring (plus shape checks its arrays make implicitly).
fn check(y_true: &[usize], proba: &[Vec<f64>], n_classes: usize) -> Result<(), MetricError> {
    if n_classes < 2 {
        return Err(MetricError::TooFewClasses { n_classes });
    }
    if y_true.len() != proba.len() {
        return Err(MetricError::LengthMismatch { labels: y_true.len(), rows: proba.len() });
    }
    if y_true.is_empty() {
        return Err(MetricError::Empty);
    }
    for (row, (p, &label)) in proba.iter().zip(y_true).enumerate() {
        if p.len() != n_classes {
            return Err(MetricError::WrongColumns { row, expected: n_classes, found: p.len() });
        }
        if label >= n_classes {
            return Err(MetricError::LabelOutOfRange { row, label, n_classes });
        }
        if let Some(column) = p.iter().position(|v| !v.is_finite()) {
            return Err(MetricError::NonFinite { row, column, value: p[column] });
        }
    }
    let mut present = vec![false; n_classes];
    for &label in y_true {
        present[label] = true;
    }
    let missing: Vec<usize> = (0..n_classes).filter(|&c| !present[c]).collect();
    if missing.len() == n_classes - 1 {
        return Err(MetricError::SingleClass { class: y_true[0] });
    }
    if !missing.is_empty() {
        return Err(MetricError::MissingClasses { missing, n_classes });
    }
    if n_classes > 2 {
        // np.allclose(1, sums): |1 - sum| <= atol + rtol * |sum| with atol 1e-8, rtol 1e-5.
        for (row, p) in proba.iter().enumerate() {
            let sum: f64 = p.iter().sum();
            if (1.0 - sum).abs() > 1e-8 + 1e-5 * sum.abs() {
                return Err(MetricError::NotProbabilities { row, sum });
            }
        }
    }
    Ok(())
}

/// Area under the ROC curve of one binary problem (both classes present, scores finite),
/// following scikit-learn's `roc_curve(drop_intermediate=True)` and `auc` step by step.
fn binary_auc(positive: &[bool], score: &[f64]) -> f64 {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));

    // Cumulative true and false positives at each distinct threshold, highest first.
    let mut tps: Vec<f64> = Vec::new();
    let mut fps: Vec<f64> = Vec::new();
    let (mut tp, mut fp) = (0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        if positive[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_threshold = order.get(k + 1).is_none_or(|&next| score[next] != score[i]);
        if last_of_threshold {
            tps.push(tp);
            fps.push(fp);
        }
    }

    // Drop points on a straight line between their neighbours (sklearn's drop_intermediate);
    // this does not change the area but keeps the summation identical to sklearn's.
    if fps.len() > 2 {
        let keep: Vec<usize> = (0..fps.len())
            .filter(|&k| {
                k == 0
                    || k == fps.len() - 1
                    || fps[k + 1] - 2.0 * fps[k] + fps[k - 1] != 0.0
                    || tps[k + 1] - 2.0 * tps[k] + tps[k - 1] != 0.0
            })
            .collect();
        fps = keep.iter().map(|&k| fps[k]).collect();
        tps = keep.iter().map(|&k| tps[k]).collect();
    }
    fps.insert(0, 0.0);
    tps.insert(0, 0.0);

    let (fp_total, tp_total) = (fps[fps.len() - 1], tps[tps.len() - 1]);
    let fpr: Vec<f64> = fps.iter().map(|f| f / fp_total).collect();
    let tpr: Vec<f64> = tps.iter().map(|t| t / tp_total).collect();
    fpr.windows(2).zip(tpr.windows(2)).map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) / 2.0).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(y: &[usize], p1: &[f64]) -> Result<f64, MetricError> {
        let proba: Vec<Vec<f64>> = p1.iter().map(|&p| vec![1.0 - p, p]).collect();
        roc_auc(y, &proba, 2, Multiclass::Ovo)
    }

    #[test]
    fn binary_values() {
        assert_eq!(binary(&[0, 0, 1, 1], &[0.1, 0.2, 0.8, 0.9]), Ok(1.0));
        assert_eq!(binary(&[1, 1, 0, 0], &[0.1, 0.2, 0.8, 0.9]), Ok(0.0));
        // sklearn's documentation example: 3 of the 4 (positive, negative) pairs are ordered.
        assert_eq!(binary(&[0, 0, 1, 1], &[0.1, 0.4, 0.35, 0.8]), Ok(0.75));
        // Ties count one half: pairs (0.5, 0.2)=1, (0.5, 0.5)=1/2, (0.9, *)=1+1 -> 3.5 / 4.
        assert_eq!(binary(&[0, 0, 1, 1], &[0.2, 0.5, 0.5, 0.9]), Ok(0.875));
        assert_eq!(binary(&[0, 1, 0, 1, 1], &[0.5; 5]), Ok(0.5));
    }

    #[test]
    fn binary_uses_only_the_positive_column() {
        // Rows need not sum to 1 for two classes (sklearn only sees proba[:, 1]).
        let proba = vec![vec![7.0, 0.1], vec![-3.0, 0.4], vec![0.0, 0.35], vec![0.0, 0.8]];
        assert_eq!(roc_auc(&[0, 0, 1, 1], &proba, 2, Multiclass::Ovr), Ok(0.75));
    }

    /// Three classes, imbalanced (3, 2, 2 rows), with ties.
    fn three_class() -> (Vec<usize>, Vec<Vec<f64>>) {
        let y = vec![0, 0, 0, 1, 1, 2, 2];
        let proba = vec![
            vec![0.6, 0.3, 0.1],
            vec![0.4, 0.4, 0.2],
            vec![0.2, 0.2, 0.6],
            vec![0.3, 0.5, 0.2],
            vec![0.5, 0.2, 0.3],
            vec![0.2, 0.2, 0.6],
            vec![0.3, 0.6, 0.1],
        ];
        (y, proba)
    }

    #[test]
    fn one_vs_one_macro_by_hand() {
        // Pair (0,1): col 0, {.6,.4,.2} over {.3,.5}: 1+1+1+0+0+0 = 3/6; col 1, {.5,.2} over
        //   {.3,.4,.2}: 1+1+1 + 0+0+.5 = 3.5/6; pair = 6.5/12.
        // Pair (0,2): col 0, {.6,.4,.2} over {.2,.3}: 2+2+(.5+0) = 4.5/6; col 2, {.6,.1} over
        //   {.1,.2,.6}: (1+1+.5) + (.5+0+0) = 3/6; pair = 7.5/12.
        // Pair (1,2): col 1, {.5,.2} over {.2,.6}: (1+0) + (.5+0) = 1.5/4; col 2, {.6,.1} over
        //   {.2,.3}: 2 + 0 = 2/4; pair = 3.5/8.
        let expected = (6.5 / 12.0 + 7.5 / 12.0 + 3.5 / 8.0) / 3.0;
        let (y, p) = three_class();
        let got = roc_auc(&y, &p, 3, Multiclass::Ovo).unwrap();
        assert!((got - expected).abs() < 1e-15, "{got} vs {expected}");
    }

    #[test]
    fn one_vs_rest_macro_by_hand() {
        // Class 0, col 0: {.6,.4,.2} over {.3,.5,.2,.3}: 4 + 3 + .5 = 7.5/12.
        // Class 1, col 1: {.5,.2} over {.3,.4,.2,.2,.6}: 4 + 1 = 5/10.
        // Class 2, col 2: {.6,.1} over {.1,.2,.6,.2,.3}: 4.5 + .5 = 5/10.
        let expected = (7.5 / 12.0 + 0.5 + 0.5) / 3.0;
        let (y, p) = three_class();
        let got = roc_auc(&y, &p, 3, Multiclass::Ovr).unwrap();
        assert!((got - expected).abs() < 1e-15, "{got} vs {expected}");
    }

    #[test]
    fn errors() {
        let two = |rows: &[[f64; 2]]| rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            roc_auc(&[1, 1], &two(&[[0.5, 0.5], [0.2, 0.8]]), 2, Multiclass::Ovo),
            Err(MetricError::SingleClass { class: 1 })
        );
        assert_eq!(
            roc_auc(&[0, 1], &two(&[[0.5, 0.5]]), 2, Multiclass::Ovo),
            Err(MetricError::LengthMismatch { labels: 2, rows: 1 })
        );
        assert_eq!(roc_auc(&[], &[], 2, Multiclass::Ovo), Err(MetricError::Empty));
        assert_eq!(
            roc_auc(&[0, 1], &[vec![0.5, 0.5], vec![1.0]], 2, Multiclass::Ovo),
            Err(MetricError::WrongColumns { row: 1, expected: 2, found: 1 })
        );
        assert_eq!(
            roc_auc(&[0, 2], &two(&[[0.5, 0.5], [0.2, 0.8]]), 2, Multiclass::Ovo),
            Err(MetricError::LabelOutOfRange { row: 1, label: 2, n_classes: 2 })
        );
        let nan = roc_auc(&[0, 1], &two(&[[0.5, 0.5], [f64::NAN, 0.8]]), 2, Multiclass::Ovo);
        assert!(matches!(nan, Err(MetricError::NonFinite { row: 1, column: 0, value }) if value.is_nan()));
        assert_eq!(
            roc_auc(&[0, 1], &two(&[[0.5, f64::INFINITY], [0.2, 0.8]]), 2, Multiclass::Ovo),
            Err(MetricError::NonFinite { row: 0, column: 1, value: f64::INFINITY })
        );
        assert_eq!(roc_auc(&[0], &[vec![1.0]], 1, Multiclass::Ovo), Err(MetricError::TooFewClasses { n_classes: 1 }));
        let p3 = vec![vec![0.2, 0.3, 0.5]; 3];
        assert_eq!(
            roc_auc(&[0, 2, 0], &p3, 3, Multiclass::Ovo),
            Err(MetricError::MissingClasses { missing: vec![1], n_classes: 3 })
        );
        let mut bad = p3.clone();
        bad[1] = vec![0.2, 0.3, 0.6];
        assert_eq!(
            roc_auc(&[0, 1, 2], &bad, 3, Multiclass::Ovr),
            Err(MetricError::NotProbabilities { row: 1, sum: 1.1 })
        );
        // Within np.allclose's tolerance is fine.
        let mut close = p3;
        close[1] = vec![0.2, 0.3, 0.500001];
        assert!(roc_auc(&[0, 1, 2], &close, 3, Multiclass::Ovo).is_ok());
    }

    #[test]
    fn error_messages_read_well() {
        assert_eq!(
            MetricError::SingleClass { class: 0 }.to_string(),
            "only one class (0) is present in the true labels; ROC AUC is not defined in that case"
        );
        assert_eq!(
            MetricError::NotProbabilities { row: 3, sum: 1.5 }.to_string(),
            "probability row 3 sums to 1.5, not 1; multi-class ROC AUC needs class probabilities"
        );
    }
}
