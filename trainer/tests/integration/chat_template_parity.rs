//! envspec's chat-template renderer (minijinja) writes exactly what transformers'
//! `apply_chat_template` wrote for SmolLM2's ChatML template (fixtures/chat_template.json, made by
//! fixtures/make_fixtures.py). Needs no model: the template source is in the fixture.

use std::path::Path;

use envspec::{ChatMessage, ChatTemplate};
use serde_json::Value;

#[test]
fn smollm2_chat_template_renders_like_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_template.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fx: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let str_of = |v: &Value| v.as_str().expect("a string").to_string();

    let template = ChatTemplate::new(&str_of(&fx["template"]), &str_of(&fx["bos_token"]), &str_of(&fx["eos_token"]))
        .expect("the template compiles");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 4);
    for case in cases {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage { role: str_of(&m["role"]), content: str_of(&m["content"]) })
            .collect();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("a bool");
        let got = template.render(&messages, add_generation_prompt).expect("renders");
        assert_eq!(got, str_of(&case["expected"]), "case {}", case["name"]);
    }
}
