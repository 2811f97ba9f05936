//! Checks against the real default model (SmolLM2-135M-Instruct Q4_1 GGUF, fetched by
//! `scripts/setup.sh model`): logits of a known prompt match transformers' (weights dequantised
//! to f32), see shared facts and `trainer/tests/fixtures`.

use candle_core::{Device, Tensor};
use trainer::{default_model_path, LoadedModel};

/// The default model with its products in f32, whatever this machine would pick (these tests
/// compare with f32 references; bf16 products are checked in `logits_parity.rs`).
fn load_model(path: &std::path::Path, device: &Device) -> trainer::model::Result<LoadedModel> {
    let mut m = trainer::load_model(path, device)?;
    m.model.set_matmul_precision(trainer::bf16::MatmulPrecision::F32)?;
    Ok(m)
}

/// `"def build_model(x_train, y_train):\n"` tokenised by transformers from the same GGUF.
const PROMPT: [u32; 14] = [1604, 1235, 79, 3980, 24, 104, 79, 4428, 28, 329, 79, 4428, 727, 198];
/// transformers 5.24, f32: first 8 logits of the last position; argmax is 19 (`#`).
const EXPECTED: [f64; 8] = [25.431000, 12.904408, 14.701956, 9.586503, 9.100076, 10.856031, 19.816011, 10.864840];

fn model_path() -> std::path::PathBuf {
    let p = default_model_path();
    assert!(p.is_file(), "default model not found at {}; run `scripts/setup.sh model`", p.display());
    p
}

#[test]
fn last_position_logits_match_transformers() {
    let m = load_model(&model_path(), &Device::Cpu).expect("load the default model");
    let cfg = m.model.config();
    assert_eq!((cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size), (30, 576, 49152));
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 100_000.0);
    let ids = Tensor::new(&PROMPT[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = m.model.forward(&ids, None, None).unwrap();
    let last: Vec<f32> = logits.squeeze(0).unwrap().get(PROMPT.len() - 1).unwrap().to_vec1().unwrap();
    for (i, (&got, &want)) in last.iter().zip(EXPECTED.iter()).enumerate() {
        assert!((f64::from(got) - want).abs() < 1e-3, "logit {i}: {got} vs transformers {want}");
    }
    let argmax = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(argmax, 19);
}

#[test]
fn greedy_generation_is_the_same_alone_and_batched() {
    use trainer::{generate, GenerateConfig};
    let m = load_model(&model_path(), &Device::Cpu).expect("load the default model");
    let prompts = vec![
        "def build_model(x_train, y_train):\n".to_string(),
        "<|im_start|>user\nWrite a haiku about trees.<|im_end|>\n<|im_start|>assistant\n".to_string(),
    ];
    let cfg = GenerateConfig { max_new_tokens: 24, temperature: 0.0, ..GenerateConfig::default() };
    let batched = generate(&m.model, &m.tokenizer, &prompts, &cfg, None).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let alone = generate(&m.model, &m.tokenizer, std::slice::from_ref(p), &cfg, None).unwrap();
        assert_eq!(alone[0].tokens, b.tokens);
        assert_eq!(alone[0].text, b.text);
        for (x, y) in alone[0].logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-3, "log-probabilities {x} vs {y}");
        }
    }
    // The first greedy token of the code prompt is the argmax of the checked logits.
    assert_eq!(batched[0].tokens[0], 19);
}

/// The quantised generation weights (the CPU default): the projections are exact 4-bit copies
/// of the dequantised Q4_1 weights and the output projection an exact 8-bit copy of the Q8_0
/// embedding, multiplied by f32 activations, so on the parity prompts (`fixtures/logits.json`
/// and the prompts above), with and without the PEFT fixture adapter, the logits of a whole
/// prompt differ from the f32 path's by summation order only (measured: at most 1.2e-4, 3.2e-6
/// of the largest logit) and 128 greedy tokens are the same.
#[test]
fn quantized_generation_matches_f32_on_the_parity_prompts() {
    use trainer::{generate, GenerateConfig, GenerationWeights, KvCache};
    let mut m = load_model(&model_path(), &Device::Cpu).expect("load the default model");
    assert_eq!(m.model.generation_weights(), GenerationWeights::Quantized);
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    m.model.load_adapter("peft", &fixtures.join("peft_adapter")).expect("load the PEFT fixture adapter");
    let text = std::fs::read_to_string(fixtures.join("logits.json")).expect("logits.json");
    let fx: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut prompts: Vec<String> = fx["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["prompt"].as_str().expect("prompt").to_string())
        .collect();
    prompts.push("<|im_start|>user\nWrite a haiku about trees.<|im_end|>\n<|im_start|>assistant\n".to_string());
    let q = m.model.generation_quantized().expect("copies").expect("quantised copies on the CPU");
    assert_eq!(q.exact_4bit(), (210, 211), "every projection exact in 4 bits, the output projection in 8");
    for adapter in [None, Some("peft")] {
        for p in &prompts {
            let ids = m.tokenizer.encode(p).expect("encode");
            let t = ids.len();
            let x = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
            let exact = m.model.forward(&x, None, adapter).unwrap();
            let mut cache = KvCache::with_capacity(&m.model, 1, t);
            let h = m.model.forward_step_quantized(&x, None, &mut cache, adapter, q).unwrap();
            let quantized = m.model.logits_quantized(&h, q).unwrap();
            let d = (&quantized - &exact).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "{adapter:?} {p:?}: logits differ by {d}");
        }
    }
    let cfg = GenerateConfig { max_new_tokens: 128, temperature: 0.0, ..GenerateConfig::default() };
    for adapter in [None, Some("peft")] {
        m.model.set_generation_weights(GenerationWeights::Quantized);
        let quantized = generate(&m.model, &m.tokenizer, &prompts, &cfg, adapter).unwrap();
        m.model.set_generation_weights(GenerationWeights::Exact);
        let exact = generate(&m.model, &m.tokenizer, &prompts, &cfg, adapter).unwrap();
        for (p, (a, b)) in prompts.iter().zip(quantized.iter().zip(&exact)) {
            assert_eq!(a.tokens, b.tokens, "{adapter:?} {p:?}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                assert!((x - y).abs() < 1e-3, "{adapter:?} {p:?}: log-probabilities {x} vs {y}");
            }
        }
    }
}
