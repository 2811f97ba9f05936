//! Checks against the real default model (SmolLM2-135M-Instruct Q4_1 GGUF, fetched by
//! `scripts/setup.sh model`): logits of a known prompt match transformers' (weights dequantised
//! to f32), see shared facts and `trainer/tests/fixtures`.

use candle_core::{Device, Tensor};
use trainer::{default_model_path, load_model};

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
