//! The held-out test part (`dataset.test_fraction`) of the shipped Balance Scale spec: scoring on
//! it gives the sandbox the test features and never a label, of the test part or the validation
//! part.

use std::sync::Arc;

use runtime::env::{Host, Task};
use runtime::PoolConfig;

fn shipped_balance_scale() -> (Task, envspec::data::Split) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envs/balance_scale.yaml");
    let spec = envspec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(spec.dataset.test_fraction > 0.0, "the shipped spec holds out a test part");
    let data = envspec::data::load_for(&spec.dataset, spec.base_dir()).unwrap();
    let split = data.split_for(&spec.dataset, 0);
    let python = runtime::default_python();
    let task = Task::load(Arc::new(spec), &Host::new(PoolConfig { workers: 1, python, ..PoolConfig::default() }));
    (task.unwrap(), split)
}

/// A model whose predict_proba fails with the number of rows it was asked about.
const COUNT_ROWS: &str = "\
import numpy as np
class Counter:
    classes_ = np.array([0, 1, 2])
    def predict_proba(self, x):
        raise RuntimeError('rows: %d' % len(x))
def build_model(x_train, y_train):
    return Counter()
";

#[test]
fn the_test_part_gets_its_features_and_no_label() {
    let (task, split) = shipped_balance_scale();
    assert!(!split.y_test.is_empty() && split.y_test.len() != split.y_val.len());
    let env = task.env(0).unwrap();
    let error = |score: runtime::env::Score| score.result.expect_err("the program fails on purpose");
    let on_test = error(env.score_on_test(COUNT_ROWS).unwrap().expect("a test part"));
    assert!(on_test.ends_with(&format!("RuntimeError: rows: {}", split.y_test.len())), "{on_test}");
    let on_val = error(env.score_program(COUNT_ROWS).unwrap());
    assert!(on_val.ends_with(&format!("RuntimeError: rows: {}", split.y_val.len())), "{on_val}");

    // While it scores on the test part, neither label list is anywhere the program can look;
    // the training labels, which it is given, are found (so the hunt can find what is there).
    let hunt = |labels: &[usize]| {
        let digits: String = labels.iter().map(|y| y.to_string()).collect();
        let program = crate::containment::LABEL_HUNT.replace("TARGET_LIST", &digits);
        error(env.score_on_test(&program).unwrap().expect("a test part"))
    };
    for labels in [&split.y_test, &split.y_val] {
        let found = hunt(labels);
        assert!(found.ends_with("RuntimeError: found: []"), "{found}");
    }
    let found = hunt(&split.y_train);
    assert!(found.contains("RuntimeError: found: [") && !found.ends_with("found: []"), "{found}");
}
