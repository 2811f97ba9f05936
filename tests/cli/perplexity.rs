//! End-to-end tests of `etpo perplexity` on the default model and the shipped samples.

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model() -> PathBuf {
    let path = trainer::default_model_path();
    assert!(path.is_file(), "the default model {} is missing: run `scripts/setup.sh model`", path.display());
    path
}

fn etpo(args: &[&str]) -> Output {
    Command::new(crate::common::ETPO).args(args).current_dir(repo()).output().expect("cannot run the etpo binary")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

const CODE: &str = "trainer/assets/perplexity/code.py";
const PROSE: &str = "trainer/assets/perplexity/prose.txt";

#[test]
fn scores_the_shipped_samples_and_a_zero_adapter_changes_nothing() {
    let model_path = model();
    // An untrained adapter (B = 0) leaves the model as it is: same perplexity.
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    {
        let mut loaded = trainer::load_model(&model_path, &candle_core::Device::Cpu).unwrap();
        loaded.model.add_adapter("zero", &trainer::LoraConfig::default()).unwrap();
        loaded.model.save_adapter("zero", &adapter).unwrap();
    }
    let m = model_path.to_str().unwrap();
    let out = etpo(&[
        "perplexity",
        "--model",
        m,
        "--adapter",
        adapter.to_str().unwrap(),
        "--window",
        "128",
        "--json",
        CODE,
        PROSE,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let (base, tuned) = (row["base_ppl"].as_f64().unwrap(), row["adapter_ppl"].as_f64().unwrap());
        assert!(base > 1.0 && base < 200.0, "{row}");
        assert!((tuned / base - 1.0).abs() < 1e-4, "{row}");
    }
    // The model knows Python better than this prose.
    assert!(rows[0]["base_ppl"].as_f64().unwrap() < rows[1]["base_ppl"].as_f64().unwrap(), "{rows:?}");
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let m = model();
    let out = etpo(&["perplexity", "--model", m.to_str().unwrap(), "no/such/file.txt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/file.txt"));
}
