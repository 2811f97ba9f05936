//! The tokenizer built from the default GGUF gives the same ids as the Hugging Face reference
//! (fixtures/tokenizer_ids.json, made by fixtures/make_fixtures.py) and decodes them back.
//! Needs the default model: `scripts/setup.sh model`.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use serde_json::Value;
use sha2::{Digest, Sha256};
use trainer::Tokenizer;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The default GGUF, checked against the file the fixtures were made from.
fn default_gguf(expected_sha256: &str) -> PathBuf {
    let path = trainer::default_model_path();
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("the default model {} is needed ({e}): run scripts/setup.sh model", path.display()));
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, expected_sha256, "{} is not the GGUF the fixtures were made from", path.display());
    path
}

fn gguf_tokenizer(path: &Path) -> Tokenizer {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&content).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("an array of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

#[test]
fn gguf_tokenizer_matches_hugging_face_on_code_snippets() {
    let fx = fixture("tokenizer_ids.json");
    let tok = gguf_tokenizer(&default_gguf(fx["gguf_sha256"].as_str().expect("gguf_sha256")));

    assert_eq!(tok.bos_token(), fx["bos_token"].as_str());
    assert_eq!(tok.eos_token(), fx["eos_token"].as_str());
    assert_eq!(tok.eos_token_id(), fx["eos_token_id"].as_u64().map(|x| x as u32));
    assert_eq!(tok.bos_token_id(), fx["bos_token_id"].as_u64().map(|x| x as u32));
    assert!(!tok.add_bos(), "SmolLM2's GGUF says add_bos_token = false");

    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 15, "the fixture should hold the full snippet set");
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let expected = ids(&case["ids"]);
        let got = tok.encode(text).expect("encode");
        if got != expected {
            failures.push(format!("{text:?}\n  expected {expected:?}\n  got      {got:?}"));
            continue;
        }
        let decoded = tok.decode(&got).expect("decode");
        if decoded != text {
            failures.push(format!("{text:?} decodes back as {decoded:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} snippets differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn gguf_tokenizer_matches_hugging_face_on_chat_renderings() {
    let fx = fixture("chat_template.json");
    let tok = gguf_tokenizer(&default_gguf(fx["gguf_sha256"].as_str().expect("gguf_sha256")));
    assert_eq!(tok.chat_template(), fx["template"].as_str(), "chat template from the GGUF metadata");
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["expected"].as_str().expect("expected");
        assert_eq!(tok.encode(text).expect("encode"), ids(&case["expected_ids"]), "{}", case["name"]);
    }
    // The ChatML markers are single special tokens, hidden by decode_skip_special.
    let im_start = tok.encode("<|im_start|>").expect("encode");
    assert_eq!(im_start, vec![1]);
    assert!(tok.is_special(1));
    let text = "<|im_start|>user\nhi<|im_end|>\n";
    assert_eq!(tok.decode_skip_special(&tok.encode(text).expect("encode")).expect("decode"), "user\nhi\n");
}

#[test]
fn tokenizer_json_loads_like_the_gguf_tokenizer() {
    // Save the GGUF-built tokenizer as a Hugging Face folder and load it back with from_file:
    // same ids, special tokens from tokenizer_config.json, no BOS (its post-processor adds none).
    let fx = fixture("tokenizer_ids.json");
    let gguf = gguf_tokenizer(&default_gguf(fx["gguf_sha256"].as_str().expect("gguf_sha256")));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tokenizer-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temp folder");
    let json = dir.join("tokenizer.json");
    gguf.inner().save(&json, false).expect("save tokenizer.json");
    let config = serde_json::json!({
        "bos_token": gguf.bos_token(),
        // tokenizer_config.json may spell a token as an AddedToken object.
        "eos_token": {"content": gguf.eos_token(), "special": true},
        "pad_token": gguf.eos_token(),
        "chat_template": gguf.chat_template(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write tokenizer_config.json");

    let tok = Tokenizer::from_file(&json).expect("load tokenizer.json");
    // A config may also list named templates; `default` is the chat template.
    let listed = serde_json::json!({
        "eos_token": gguf.eos_token(),
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ y }}"}],
    });
    std::fs::write(dir.join("tokenizer_config.json"), listed.to_string()).expect("write tokenizer_config.json");
    let listed = Tokenizer::from_file(&json).expect("load tokenizer.json");
    assert_eq!(listed.chat_template(), Some("{{ y }}"));
    assert_eq!(listed.bos_token_id(), None, "no bos_token in this config");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!((tok.bos_token_id(), tok.eos_token_id(), tok.pad_token_id()), (Some(1), Some(2), Some(2)));
    assert_eq!(tok.chat_template(), gguf.chat_template());
    assert!(!tok.add_bos());
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(tok.encode(text).expect("encode"), ids(&case["ids"]), "{text:?}");
    }

    let missing = Tokenizer::from_file(&dir.join("nothing/tokenizer.json")).expect_err("no such file");
    assert!(missing.to_string().contains("nothing/tokenizer.json"), "{missing}");
}

#[test]
fn sentencepiece_gguf_tokenizer_matches_hugging_face() {
    // A synthetic SentencePiece (`llama`) vocabulary; no model weights needed.
    let fx = fixture("sentencepiece_ids.json");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_sentencepiece.gguf");
    let tok = gguf_tokenizer(&path);
    assert!(tok.add_bos(), "SentencePiece GGUFs add BOS unless they say otherwise");
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<s>"), Some("</s>")));
    for case in fx["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let got = tok.encode(text).expect("encode");
        assert_eq!(got, ids(&case["ids"]), "{text:?} (expected tokens {})", case["tokens"]);
        assert_eq!(tok.decode(&got).expect("decode"), case["decoded"].as_str().expect("decoded"), "{text:?}");
    }
}
