//! The per-seed train/validation split; the procedure is documented on [`Dataset::split`].

use super::{Dataset, Split, SplitMix64};

pub(super) fn split(
    data: &Dataset,
    seed: u64,
    max_samples: Option<usize>,
    train_fraction: f64,
    test_fraction: f64,
) -> Split {
    let total = data.y.len();
    let mut order: Vec<usize> = (0..total).collect();
    SplitMix64::new(seed).shuffle(&mut order);

    let n = max_samples.map_or(total, |m| m.min(total));
    let n_train = train_size(n, train_fraction);
    // The test part comes off the end, leaving at least one validation row.
    let n_test = ((n as f64 * test_fraction).floor().max(0.0) as usize).min(n.saturating_sub(n_train + 1));
    let val_end = n - n_test;
    repair(&mut order, &data.y, data.n_classes(), &[(0, n_train), (n_train, val_end), (val_end, n)], n);

    let rows = |range: &[usize]| -> (Vec<Vec<f64>>, Vec<usize>) {
        range.iter().map(|&i| (data.x[i].clone(), data.y[i])).unzip()
    };
    let (x_train, y_train) = rows(&order[..n_train]);
    let (x_val, y_val) = rows(&order[n_train..val_end]);
    let (x_test, y_test) = rows(&order[val_end..n]);
    Split {
        x_train,
        y_train,
        x_val,
        y_val,
        x_test,
        y_test,
        feature_names: data.feature_names.clone(),
        class_names: data.class_names.clone(),
    }
}

/// `floor(n * fraction)`, clamped to `1..=n-1` when `n >= 2` (a NaN fraction counts as 0.5).
fn train_size(n: usize, fraction: f64) -> usize {
    let fraction = if fraction.is_nan() { 0.5 } else { fraction };
    let raw = (n as f64 * fraction).floor().max(0.0) as usize;
    if n >= 2 {
        raw.clamp(1, n - 1)
    } else {
        raw.min(n)
    }
}

/// Step 4 of [`Dataset::split`]: `sides` are the train, validation and test ranges of `order`
/// (an empty one is skipped), `order[n..]` is not kept.
fn repair(order: &mut [usize], y: &[usize], n_classes: usize, sides: &[(usize, usize)], n: usize) {
    let count = |order: &[usize], (start, end): (usize, usize), class: usize| {
        order[start..end].iter().filter(|&&i| y[i] == class).count()
    };
    for class in 0..n_classes {
        for (s, &side) in sides.iter().enumerate() {
            if side.0 == side.1 || count(order, side, class) > 0 {
                continue;
            }
            // A donor side holds the class at least twice; else the rows not kept.
            let other =
                sides.iter().enumerate().find(|&(o, &r)| o != s && count(order, r, class) >= 2).map(|(_, &r)| r);
            let donor_range = other.unwrap_or((n, order.len()));
            let donor = (donor_range.0..donor_range.1).find(|&p| y[order[p]] == class);
            let victim = (side.0..side.1).rev().find(|&p| count(order, side, y[order[p]]) >= 2);
            if let (Some(donor), Some(victim)) = (donor, victim) {
                order.swap(donor, victim);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(y: Vec<usize>, n_classes: usize) -> Dataset {
        Dataset {
            name: "t".into(),
            feature_names: vec!["i".into()],
            class_names: (0..n_classes).map(|c| c.to_string()).collect(),
            x: (0..y.len()).map(|i| vec![i as f64]).collect(),
            y,
            notes: vec![],
            columns: vec![crate::data::ColumnReport::numeric("i")],
            dropped: vec![],
        }
    }

    #[test]
    fn train_size_is_floor_and_clamped() {
        assert_eq!(train_size(125, 0.5), 62);
        assert_eq!(train_size(69, 0.5), 34);
        assert_eq!(train_size(10, 0.0), 1);
        assert_eq!(train_size(10, 1.0), 9);
        assert_eq!(train_size(1, 0.5), 0);
        assert_eq!(train_size(0, 0.5), 0);
    }

    #[test]
    fn repair_moves_a_missing_class_into_train() {
        // Rows 0..6; class 1 only at positions 4 and 5 (validation). Train = positions 0..3.
        let y = vec![0, 0, 0, 0, 1, 1, 0, 0];
        let mut order: Vec<usize> = (0..8).collect();
        repair(&mut order, &y, 2, &[(0, 3), (3, 6)], 6);
        // Class 1's first row on the other side (position 4) swaps with train's last row.
        assert_eq!(order, vec![0, 1, 4, 3, 2, 5, 6, 7]);
    }

    #[test]
    fn repair_takes_from_the_unkept_rows_when_the_other_side_has_one() {
        // Class 1 once in validation (position 3) and once beyond the kept rows (position 5).
        let y = vec![0, 0, 0, 1, 0, 1];
        let mut order: Vec<usize> = (0..6).collect();
        repair(&mut order, &y, 2, &[(0, 2), (2, 5)], 5);
        assert_eq!(order, vec![0, 5, 2, 3, 4, 1]);
    }

    #[test]
    fn repair_leaves_a_single_row_class_alone() {
        let y = vec![0, 0, 0, 1];
        let mut order: Vec<usize> = (0..4).collect();
        repair(&mut order, &y, 2, &[(0, 2), (2, 4)], 4);
        assert_eq!(order, vec![0, 1, 2, 3]);
    }

    #[test]
    fn split_is_deterministic_disjoint_and_sized() {
        let d = dataset((0..100).map(|i| i % 3).collect(), 3);
        let a = d.split(4, Some(40), 0.5);
        let b = d.split(4, Some(40), 0.5);
        assert_eq!(a, b);
        assert_ne!(a, d.split(5, Some(40), 0.5));
        assert_eq!((a.x_train.len(), a.x_val.len()), (20, 20));
        let mut ids: Vec<usize> = a.x_train.iter().chain(&a.x_val).map(|r| r[0] as usize).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 40);
        for (row, &label) in a.x_train.iter().zip(&a.y_train) {
            assert_eq!(row[0] as usize % 3, label);
        }
    }

    #[test]
    fn a_test_part_comes_off_the_end_and_leaves_train_alone() {
        let d = dataset((0..100).map(|i| i % 3).collect(), 3);
        let plain = d.split(4, Some(40), 0.5);
        let s = d.split_with_test(4, Some(40), 0.5, 0.25);
        // 40 rows: 20 train (as without a test part), 10 validate, the last 10 test.
        assert_eq!((s.x_train.len(), s.x_val.len(), s.x_test.len()), (20, 10, 10));
        assert_eq!((&s.x_train, &s.y_train), (&plain.x_train, &plain.y_train));
        assert_eq!((&s.x_val[..], &s.x_test[..]), (&plain.x_val[..10], &plain.x_val[10..]));
        assert_eq!(d.split_with_test(4, Some(40), 0.5, 0.0), plain);
        // The repair gives each side every class when the rows allow it.
        let rare: Vec<usize> = (0..40).map(|i| usize::from(i % 10 == 0)).collect();
        let s = dataset(rare, 2).split_with_test(1, None, 0.5, 0.25);
        for side in [&s.y_train, &s.y_val, &s.y_test] {
            assert!(side.contains(&1) && side.contains(&0), "{side:?}");
        }
    }

    #[test]
    fn without_max_samples_every_row_is_used() {
        let d = dataset((0..11).map(|i| i % 2).collect(), 2);
        let s = d.split(0, None, 0.5);
        assert_eq!((s.x_train.len(), s.x_val.len()), (5, 6));
        let s = d.split(0, Some(1000), 0.5);
        assert_eq!((s.x_train.len(), s.x_val.len()), (5, 6));
    }

    #[test]
    fn rare_classes_appear_on_both_sides() {
        // 2 rows of class 1 among 200: a plain cut of 20 rows rarely holds both.
        let mut y = vec![0; 200];
        y[17] = 1;
        y[150] = 1;
        let d = dataset(y, 2);
        for seed in 0..50 {
            let s = d.split(seed, Some(20), 0.5);
            assert!(s.y_train.contains(&1) && s.y_val.contains(&1), "seed {seed}");
            assert!(s.y_train.contains(&0) && s.y_val.contains(&0), "seed {seed}");
        }
    }
}
