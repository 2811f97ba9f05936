//! End-to-end tests of `etpo generate`, run the way a user would. The model tests need the
//! embedded default model (`scripts/setup.sh model`).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::ETPO;

fn default_model() -> std::path::PathBuf {
    let path = trainer::default_model_path();
    assert!(path.is_file(), "{} is missing: run `scripts/setup.sh model`", path.display());
    path
}

/// Runs `etpo generate ARGS` with `stdin` as standard input.
fn generate(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(ETPO)
        .arg("generate")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the etpo binary runs");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write the prompt");
    child.wait_with_output().expect("etpo finishes")
}

fn completions(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "etpo generate failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn greedy_completions_from_stdin_are_reproducible_and_bounded() {
    let model = default_model();
    let model = model.to_str().expect("a UTF-8 path");
    let prompt = "def add(a, b):\n";
    let args =
        ["--model", model, "--prompt-file", "-", "--n", "2", "--temperature", "0", "--max-new-tokens", "6", "--json"];
    let first = completions(&generate(&args, prompt));
    assert_eq!(first.len(), 2);
    for c in &first {
        let tokens = c["tokens"].as_array().expect("tokens");
        assert!(!tokens.is_empty() && tokens.len() <= 6, "{c}");
        assert_eq!(c["logprobs"].as_array().expect("logprobs").len(), tokens.len());
        assert_eq!(c["prompt_tokens"], 8, "`def add(a, b):\\n` is 8 tokens");
    }
    // Greedy: both rows of the batch and a second run agree.
    assert_eq!(first[0]["tokens"], first[1]["tokens"]);
    let second = completions(&generate(&args, prompt));
    assert_eq!(first, second);
}

#[test]
fn chat_mode_and_plain_text_output() {
    let model = default_model();
    let dir = tempfile::tempdir().expect("a temp dir");
    let prompt = dir.path().join("prompt.txt");
    std::fs::write(&prompt, "Say hello.").expect("write the prompt");
    let out = generate(
        &[
            "--model",
            model.to_str().expect("a UTF-8 path"),
            "--prompt-file",
            prompt.to_str().expect("a UTF-8 path"),
            "--chat",
            "--max-new-tokens",
            "4",
            "--seed",
            "3",
        ],
        "",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("--- completion 1 of 1 ("), "{stdout}");
    // SmolLM2's template adds its default system turn and the ChatML markers around the message:
    // 33 tokens, as transformers' apply_chat_template + tokenizer count them.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prompt 33 tokens"), "--chat must render the chat template: {stderr}");
}

#[test]
fn missing_inputs_are_clear_errors() {
    let out = generate(&["--model", "/nonexistent/model.gguf", "--prompt-file", "-"], "x");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");

    let out = generate(&["--prompt-file", "/nonexistent/prompt.txt"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading the prompt file /nonexistent/prompt.txt"));

    let out = generate(&["--prompt-file", "-"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the prompt is empty"));
}
