//! An adapter written by PEFT loads into etpo and gives the logits transformers + PEFT give
//! (fixtures/peft_adapter and fixtures/peft_logits.json, made by fixtures/make_peft_fixture.py);
//! etpo writes it back under the same names. Needs the default model: `scripts/setup.sh model`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("an array").iter().map(|x| x.as_f64().expect("a number") as f32).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn peft_adapter_gives_the_logits_of_transformers_and_peft() {
    let text = std::fs::read_to_string(fixtures().join("peft_logits.json")).expect("peft_logits.json");
    let fx: Value = serde_json::from_str(&text).expect("valid JSON");
    let tol = fx["tolerance"].as_f64().expect("tolerance") as f32;
    let model_path = trainer::default_model_path();
    assert!(model_path.is_file(), "the default model {} is needed: run scripts/setup.sh model", model_path.display());
    let mut loaded = trainer::load_model(&model_path, &Device::Cpu).expect("load the default model");
    // An f32 reference: f32 products, whatever this machine would pick.
    loaded.model.set_matmul_precision(trainer::bf16::MatmulPrecision::F32).unwrap();
    loaded.model.load_adapter("peft", &fixtures().join("peft_adapter")).expect("load the PEFT adapter");
    let cfg = loaded.model.adapter("peft").unwrap().config().clone();
    assert_eq!((cfg.rank, cfg.alpha, cfg.layers.clone()), (2, 8.0, Some(vec![0, 29])));
    assert_eq!(cfg.targets.len(), 7);

    for case in fx["cases"].as_array().expect("cases") {
        let ids: Vec<u32> = case["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let t = ids.len();
        let x = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let row = |adapter: Option<&str>| -> Vec<f32> {
            let logits = loaded.model.forward(&x, None, adapter).unwrap();
            logits.squeeze(0).unwrap().get(t - 1).unwrap().to_vec1().unwrap()
        };
        let base = row(None);
        let adapted = row(Some("peft"));
        let n = floats(&case["adapted_first"]).len();
        let d_base = max_abs_diff(&base[..n], &floats(&case["base_first"]));
        assert!(d_base <= tol, "base logits differ by {d_base}");
        let d = max_abs_diff(&adapted[..n], &floats(&case["adapted_first"]));
        assert!(d <= tol, "{:?}: adapted logits differ by {d}", case["prompt"]);
        let strided: Vec<f32> = adapted.iter().step_by(512).copied().collect();
        let d = max_abs_diff(&strided, &floats(&case["adapted_strided_512"]));
        assert!(d <= tol, "{:?}: adapted logits (every 512th) differ by {d}", case["prompt"]);
        let argmax = adapted.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(argmax as u64, case["adapted_argmax"].as_u64().unwrap());
        // The adapter matters: the check above is not passed by the base model.
        assert!(case["max_abs_change"].as_f64().unwrap() > 0.5);
    }

    // Saved again by etpo: the same tensor names and values, a config PEFT reads the same way.
    let out = std::env::temp_dir().join(format!("etpo-peft-parity-{}", std::process::id()));
    loaded.model.save_adapter("peft", &out).unwrap();
    let theirs =
        candle_core::safetensors::load(fixtures().join("peft_adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(theirs.keys().collect::<BTreeSet<_>>(), ours.keys().collect::<BTreeSet<_>>());
    for (k, v) in &theirs {
        let d =
            (v - &ours[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(2), Some(8.0)));
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([0, 29]));
    std::fs::remove_dir_all(&out).unwrap();
}
