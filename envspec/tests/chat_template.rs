//! `ChatTemplate` renders exactly like Hugging Face transformers (`apply_chat_template`'s
//! renderer) for SmolLM2's ChatML template and a template using Jinja's whitespace control,
//! `.strip()`, `namespace` and loop controls. The fixture is made by
//! `tests/fixtures/make_chat_fixture.py`.

use envspec::{ChatMessage, ChatTemplate, Prompt};
use serde_json::Value;

fn fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

#[test]
fn renders_identically_to_transformers() {
    let fixture = fixture();
    let templates = fixture["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 2);
    for t in templates {
        let template = ChatTemplate::new(
            t["source"].as_str().unwrap(),
            t["bos_token"].as_str().unwrap(),
            t["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        for case in t["cases"].as_array().unwrap() {
            let rendered = template.render(&messages(case), case["add_generation_prompt"].as_bool().unwrap()).unwrap();
            assert_eq!(rendered, case["text"].as_str().unwrap(), "template {}", t["name"]);
        }
    }
}

#[test]
fn chat_prompts_use_the_generation_prompt() {
    let fixture = fixture();
    let smollm2 = &fixture["templates"][0];
    let template = ChatTemplate::new(smollm2["source"].as_str().unwrap(), "<|im_start|>", "<|im_end|>").unwrap();
    let case = &smollm2["cases"][0];
    assert_eq!(case["add_generation_prompt"], Value::Bool(true));
    let prompt = Prompt::Chat(messages(case));
    assert_eq!(prompt.to_text(Some(&template)).unwrap(), case["text"].as_str().unwrap());
    assert!(prompt.to_text(Some(&template)).unwrap().ends_with("<|im_start|>assistant\n"));
}

#[test]
fn template_errors_are_reported() {
    let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    assert!(err.to_string().starts_with("cannot render the chat template: syntax error"), "{err}");
    let raising = ChatTemplate::new("{{ raise_exception('only user and assistant roles') }}", "", "").unwrap();
    let err = raising.render(&[], true).unwrap_err();
    assert_eq!(err.to_string(), "cannot render the chat template: invalid operation: only user and assistant roles");
}
