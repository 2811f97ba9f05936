//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

/// The `etpo` binary under test.
pub const ETPO: &str = env!("CARGO_BIN_EXE_etpo");

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped Balance Scale spec.
pub fn balance_scale() -> PathBuf {
    repo().join("envs/balance_scale.yaml")
}

/// The project's Python, which the sandbox runs; these tests evaluate real scikit-learn programs.
pub fn venv_python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `scripts/setup.sh python` first (these tests evaluate real scikit-learn programs)",
        python.display()
    );
    python
}

/// Asserts that `etpo` succeeded (showing its output if not) and returns its stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "etpo failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every line of a JSON-lines file.
pub fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// The step records of a run folder.
pub fn steps(dir: &Path) -> Vec<Value> {
    jsonl(&dir.join("steps.jsonl"))
}

/// Writes a tiny random Llama model as a Hugging Face folder: `config.json`, `model.safetensors`
/// (written by hand: an 8-byte header length, the JSON header, the f32 data), a byte-level BPE
/// `tokenizer.json` with no merges (every byte is a token) and a `tokenizer_config.json` with a
/// ChatML chat template. Its samples are noise, which is all a test of the loop needs.
pub fn write_tiny_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (hidden, layers, heads, kv_heads, inter) = (16usize, 2usize, 2usize, 1usize, 32usize);
    let vocab = 258usize; // 256 bytes + <|im_start|> + <|im_end|>
    let head_dim = hidden / heads;
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": true,
        "hidden_act": "silu", "bos_token_id": 256, "eos_token_id": 257,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let mut tensors: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    tensors.push(("model.norm.weight".into(), vec![hidden]));
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![heads * head_dim, hidden]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_heads * head_dim, hidden]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_heads * head_dim, hidden]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![hidden, heads * head_dim]));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
    }
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            let v = if name.ends_with("norm.weight") {
                1.0f32
            } else {
                // xorshift64*, uniform in [-0.5, 0.5)
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            };
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();

    // GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n.
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut vocab_map = serde_json::Map::new();
    for (b, c) in printable.iter().zip(&chars) {
        vocab_map.insert(char::from_u32(*c).unwrap().to_string(), serde_json::json!(b));
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab_map, "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "add_bos_token": false, "chat_template": chatml,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
}
