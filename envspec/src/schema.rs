//! The JSON Schema of the spec format, for editors' YAML validation.
//!
//! Hand-written, so that it can say what the loader says (descriptions, defaults, ranges); a test
//! keeps its property names identical to the keys the loader accepts, and validates the shipped
//! specs against it.

use serde_json::{json, Value};

fn template(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

/// The JSON Schema (draft 2020-12) of an etpo spec file.
pub fn schema() -> Value {
    let task_vars = crate::template::TASK_VARIABLES
        .iter()
        .chain(&crate::template::HISTORY_VARIABLES)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let refl_vars = crate::template::REFLECTION_VARIABLES.join(", ");
    let game_vars = crate::template::GAME_VARIABLES.join(", ");
    let game_step_vars = crate::template::GAME_STEP_VARIABLES.join(", ");
    let seq_int =
        |min: i64, description: &str| json!({ "type": "integer", "minimum": min, "description": description });
    let positive = |description: &str| json!({ "type": "number", "exclusiveMinimum": 0, "description": description });
    let builtins: Vec<&str> = crate::data::BUILTINS.to_vec();
    let extract: Vec<&str> = crate::action::Extract::NAMES.iter().map(|(n, _)| *n).collect();
    let game = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["module"],
        "description": format!("kind: wasm only. The game; its observations reach the templates as `observation`. Prompt variables: {game_vars}; reflection (every later state) adds {game_step_vars}."),
        "properties": {
            "module": { "type": "string", "description": "The game's .wasm file (a component exporting etpo:game/game@0.1.0, or a core module built by wit-bindgen), relative to the spec's folder." },
            "seeds": { "type": "array", "items": { "type": "integer", "minimum": 0 }, "minItems": 1, "uniqueItems": true, "default": [0, 1, 2, 3, 4], "description": "The reset seeds, one environment each." },
            "fuel": { "type": "integer", "minimum": 1, "default": crate::GameSpec::DEFAULT_FUEL, "description": "Fuel per call of the game (about one unit per WebAssembly instruction)." },
            "memory_mb": { "type": "integer", "minimum": 1, "maximum": 4096, "default": crate::GameSpec::DEFAULT_MEMORY_MB, "description": "The game's memory cap, MiB." },
            "observation_kb": { "type": "integer", "minimum": 1, "default": crate::GameSpec::DEFAULT_OBSERVATION_KB, "description": "The longest observation accepted, KiB." }
        }
    });
    let game_kind = json!({
        "required": ["game"],
        "not": { "anyOf": [{ "required": ["dataset"] }, { "required": ["limits"] }] },
        "properties": { "reward": { "not": { "anyOf": [{ "required": ["metric"] }, { "required": ["multiclass"] }, { "required": ["evaluation"] }] } } }
    });
    let mut schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "etpo environment spec",
        "description": "One language MDP: task text, data, prompt templates (Jinja, strict undefined), how an action becomes a program, reward and limits.",
        "type": "object",
        "additionalProperties": false,
        "required": ["name", "description", "prompt"],
        "properties": {
            "name": { "type": "string", "pattern": "^[A-Za-z0-9_.-]+$", "description": "Short identifier; names output folders." },
            "description": { "type": "string", "description": "The task text g (template variable `description`)." },
            "kind": { "enum": ["sklearn", "wasm"], "default": "sklearn", "description": "What an action is: `sklearn` programs define build_model(x_train, y_train) returning a fitted estimator; `wasm` actions are moves of a text game (a WebAssembly component, see `game`)." },
            "game": game,
            "dataset": {
                "type": "object",
                "additionalProperties": false,
                "required": ["source"],
                "properties": {
                    "source": {
                        "type": "object",
                        "additionalProperties": false,
                        "description": "`builtin: NAME`, or `csv: PATH` / `arff: PATH` with `target: COLUMN`; paths are relative to the spec's folder.",
                        "properties": {
                            "builtin": { "enum": builtins },
                            "csv": { "type": "string" },
                            "arff": { "type": "string" },
                            "target": { "type": "string", "description": "The class column." }
                        },
                        "oneOf": [
                            { "required": ["builtin"], "not": { "anyOf": [{ "required": ["csv"] }, { "required": ["arff"] }, { "required": ["target"] }] } },
                            { "required": ["csv", "target"], "not": { "anyOf": [{ "required": ["builtin"] }, { "required": ["arff"] }] } },
                            { "required": ["arff", "target"], "not": { "anyOf": [{ "required": ["builtin"] }, { "required": ["csv"] }] } }
                        ]
                    },
                    "train_fraction": { "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.5 },
                    "test_fraction": { "type": "number", "minimum": 0, "exclusiveMaximum": 0.5, "default": 0 },
                    "seeds": { "type": "array", "items": { "type": "integer", "minimum": 0 }, "minItems": 1, "uniqueItems": true, "default": [0, 1, 2, 3, 4] },
                    "max_samples": seq_int(2, "Rows kept after the shuffle (CAAFE's subsampling)."),
                    "drop": { "type": "array", "items": { "type": "string", "minLength": 1 }, "uniqueItems": true, "description": "Columns of the data file that are not features (ids, names); the others stay, in file order. Not the target; not with `features`." },
                    "features": { "type": "array", "items": { "type": "string", "minLength": 1 }, "minItems": 1, "uniqueItems": true, "description": "The only columns that are features, in this order (x_train's columns, `feature_names`). Not the target; not with `drop`." }
                },
                "not": { "required": ["drop", "features"] }
            },
            "examples": {
                "type": "array",
                "description": "Worked examples (template variable `examples`); leave out or [] to switch them off.",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["task", "action"],
                    "properties": { "task": { "type": "string" }, "action": { "type": "string" } }
                }
            },
            "prompt": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "format": { "enum": ["completion", "chat"], "default": "completion" },
                    "template": template(&format!("completion: the first state η(g). Variables: {task_vars}.")),
                    "reflection": template(&format!("The state after a failed action (completion: the whole text; chat: the last user message). Variables: {task_vars}, {refl_vars}.")),
                    "system": template("chat: optional system message."),
                    "user": template("chat: the user message stating the task."),
                    "assistant": template("chat: the assistant turn replaying the failed action in the reflection state; default a ```python fenced block of {{ action }}."),
                    "turns": { "enum": ["last", "all"], "default": "last", "description": "chat: a later state replays the last step (`last`) or every step of the episode's history, one assistant and one user message each (`all`)." },
                    "max_tokens": { "type": "integer", "minimum": 1, "description": "The longest a state may be, in tokens of the model: the oldest turns of `history` are left out first (`history_omitted` counts them); a state that does not fit without history is an error." }
                },
                "if": { "properties": { "format": { "const": "chat" } }, "required": ["format"] },
                "then": { "required": ["user", "reflection"], "not": { "required": ["template"] } },
                "else": { "required": ["template", "reflection"], "not": { "anyOf": [{ "required": ["system"] }, { "required": ["user"] }, { "required": ["assistant"] }, { "required": ["turns"] }] } }
            },
            "action": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "extract": { "enum": extract, "description": "How the action is cut from the generation; default until_unindented (completion) or fenced (chat)." },
                    "stop": { "type": "array", "items": { "type": "string", "minLength": 1 } },
                    "max_new_tokens": { "type": "integer", "minimum": 1, "default": 256 },
                    "assemble": template("The program, using {{ action }} (dedented, continuation lines indented like its line) or {{ raw_action }}.")
                }
            },
            "reward": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "metric": { "enum": ["roc_auc"], "default": "roc_auc" },
                    "multiclass": { "enum": ["ovo", "ovr"], "default": "ovo" },
                    "failure_reward": { "type": "number", "default": -1.0 },
                    "evaluation": {
                        "default": "single_split",
                        "oneOf": [
                            { "const": "single_split" },
                            {
                                "type": "object",
                                "additionalProperties": false,
                                "required": ["mean_of_splits"],
                                "properties": { "mean_of_splits": { "type": "integer", "minimum": 1 } }
                            }
                        ]
                    }
                }
            },
            "max_steps": { "type": "integer", "minimum": 1, "default": 5 },
            "limits": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "wall_s": positive("Wall-clock seconds per program."),
                    "cpu_s": positive("CPU seconds per program."),
                    "memory_mb": seq_int(1, "Memory per program, MiB."),
                    "output_kb": seq_int(1, "Captured output per program, KiB."),
                    "max_processes": seq_int(1, "Processes/threads per program.")
                }
            },
            "training": {
                "type": "object",
                "additionalProperties": false,
                "description": "Optional hyper-parameters; anything left out keeps the trainer's default.",
                "properties": {
                    "algorithm": { "enum": ["etpo", "ppo-kl", "grpo", "reflection"] },
                    "steps": seq_int(1, "Environment steps per seed (k)."),
                    "batch_size": seq_int(1, "Actions per update."),
                    "lr": positive("Learning rate."),
                    "beta": { "type": "number", "minimum": 0, "description": "Entropy (KL) weight β." },
                    "gamma": { "type": "number", "minimum": 0, "maximum": 1, "description": "Discount γ." },
                    "polyak": { "type": "number", "minimum": 0, "maximum": 1, "description": "Target-network averaging weight." },
                    "temperature": { "type": "number", "minimum": 0 },
                    "top_k": seq_int(1, "Top-k sampling."),
                    "top_p": { "type": "number", "exclusiveMinimum": 0, "maximum": 1 },
                    "lora_rank": seq_int(1, "LoRA rank."),
                    "lora_alpha": positive("LoRA alpha."),
                    "epochs": seq_int(1, "Gradient passes per batch."),
                    "grad_clip": positive("Gradient norm clip."),
                    "clip_eps": positive("PPO ratio clip ε.")
                }
            }
        }
    });
    // `kind: wasm` specs have a `game` instead of a `dataset` (outside the macro: its recursion
    // limit).
    schema["if"] = json!({ "properties": { "kind": { "const": "wasm" } }, "required": ["kind"] });
    schema["then"] = game_kind;
    schema["else"] = json!({ "required": ["dataset"], "not": { "required": ["game"] } });
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::keys;
    use crate::yaml::{self, Node, Typed, Value as Y};

    fn props<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a str> {
        let mut node = v;
        for p in path {
            node = &node["properties"][p];
        }
        let mut names: Vec<&str> = node["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn sorted(keys: &[&'static str]) -> Vec<&'static str> {
        let mut k = keys.to_vec();
        k.sort_unstable();
        k
    }

    #[test]
    fn schema_properties_are_the_loader_keys() {
        let s = schema();
        assert_eq!(props(&s, &[]), sorted(keys::TOP));
        assert_eq!(props(&s, &["dataset"]), sorted(keys::DATASET));
        assert_eq!(props(&s, &["game"]), sorted(keys::GAME));
        assert_eq!(props(&s, &["dataset", "source"]), sorted(keys::SOURCE));
        assert_eq!(props(&s, &["prompt"]), sorted(keys::PROMPT));
        assert_eq!(props(&s, &["action"]), sorted(keys::ACTION));
        assert_eq!(props(&s, &["reward"]), sorted(keys::REWARD));
        assert_eq!(props(&s, &["limits"]), sorted(keys::LIMITS));
        assert_eq!(props(&s, &["training"]), sorted(keys::TRAINING));
        let mut ex: Vec<&str> = s["properties"]["examples"]["items"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        ex.sort_unstable();
        assert_eq!(ex, sorted(keys::EXAMPLE));
    }

    /// YAML (core schema) to JSON, for validating specs against the schema.
    fn to_json(node: &Node) -> Value {
        match &node.value {
            Y::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
            Y::Map(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| match &k.value {
                        Y::Scalar { text, .. } => (text.clone(), to_json(v)),
                        _ => panic!("non-scalar key"),
                    })
                    .collect(),
            ),
            Y::Scalar { .. } => match node.typed().unwrap() {
                Typed::Null => Value::Null,
                Typed::Bool(b) => json!(b),
                Typed::Int(i) => json!(i as i64),
                Typed::Float(f) => json!(f),
                Typed::Str(s) => json!(s),
            },
        }
    }

    /// A small JSON Schema validator covering the keywords `schema()` uses.
    fn validate(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
        let obj = schema.as_object().unwrap();
        if let Some(t) = obj.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                _ => panic!("type {t}"),
            };
            if !ok {
                errors.push(format!("{path}: expected {t}, found {v}"));
                return;
            }
        }
        if let Some(e) = obj.get("enum").and_then(Value::as_array) {
            if !e.contains(v) {
                errors.push(format!("{path}: {v} not in {e:?}"));
            }
        }
        if let Some(c) = obj.get("const") {
            if c != v {
                errors.push(format!("{path}: {v} != {c}"));
            }
        }
        if let Some(n) = v.as_f64() {
            let bound = |k: &str| obj.get(k).and_then(Value::as_f64);
            if bound("minimum").is_some_and(|m| n < m)
                || bound("maximum").is_some_and(|m| n > m)
                || bound("exclusiveMinimum").is_some_and(|m| n <= m)
                || bound("exclusiveMaximum").is_some_and(|m| n >= m)
            {
                errors.push(format!("{path}: {n} out of range"));
            }
        }
        if let (Some(props), Some(map)) = (obj.get("properties").and_then(Value::as_object), v.as_object()) {
            for (k, val) in map {
                match props.get(k) {
                    Some(s) => validate(s, val, &format!("{path}.{k}"), errors),
                    None if obj.get("additionalProperties") == Some(&json!(false)) => {
                        errors.push(format!("{path}: unexpected key {k}"))
                    }
                    None => {}
                }
            }
        }
        if let (Some(req), Some(map)) = (obj.get("required").and_then(Value::as_array), v.as_object()) {
            for r in req {
                if !map.contains_key(r.as_str().unwrap()) {
                    errors.push(format!("{path}: missing {r}"));
                }
            }
        }
        if let (Some(items), Some(arr)) = (obj.get("items"), v.as_array()) {
            for (i, x) in arr.iter().enumerate() {
                validate(items, x, &format!("{path}[{i}]"), errors);
            }
        }
        let passes = |s: &Value| {
            let mut e = Vec::new();
            validate(s, v, path, &mut e);
            e.is_empty()
        };
        if let Some(one) = obj.get("oneOf").and_then(Value::as_array) {
            if one.iter().filter(|s| passes(s)).count() != 1 {
                errors.push(format!("{path}: not exactly one of oneOf"));
            }
        }
        if let Some(any) = obj.get("anyOf").and_then(Value::as_array) {
            if !any.iter().any(passes) {
                errors.push(format!("{path}: none of anyOf"));
            }
        }
        if let Some(not) = obj.get("not") {
            if passes(not) {
                errors.push(format!("{path}: matches `not`"));
            }
        }
        if let Some(cond) = obj.get("if") {
            let branch = if passes(cond) { obj.get("then") } else { obj.get("else") };
            if let Some(b) = branch {
                validate(b, v, path, errors);
            }
        }
    }

    fn check(src: &str) -> Vec<String> {
        let root = yaml::parse(src).unwrap().0.unwrap();
        let mut errors = Vec::new();
        validate(&schema(), &to_json(&root), "$", &mut errors);
        errors
    }

    #[test]
    fn shipped_specs_validate_against_the_schema() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envs");
        let mut n = 0;
        for dir in [root.clone(), root.join("paper"), root.join("games")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|x| x == "yaml") {
                    let errors = check(&std::fs::read_to_string(&path).unwrap());
                    assert!(errors.is_empty(), "{}: {errors:?}", path.display());
                    n += 1;
                }
            }
        }
        assert!(n >= 8, "found only {n} shipped specs");
    }

    #[test]
    fn the_validator_rejects_what_the_loader_rejects() {
        let base = "name: x\ndescription: d\ndataset: {source: {builtin: balance_scale}}\n";
        assert!(check(&format!("{base}prompt: {{template: a, reflection: b}}\n")).is_empty());
        assert!(!check(&format!("{base}prompt: {{template: a, reflection: b}}\nmax_step: 3\n")).is_empty());
        assert!(!check(&format!("{base}prompt: {{format: chat, template: a, reflection: b}}\n")).is_empty());
        assert!(
            !check(&format!("{base}prompt: {{template: a, reflection: b}}\nreward: {{multiclass: ovx}}\n")).is_empty()
        );
        assert!(!check(&format!("{base}prompt: {{template: a, reflection: b}}\nlimits: {{wall_s: -1}}\n")).is_empty());
        assert!(!check(
            "name: x\ndescription: d\ndataset: {source: {csv: a.csv}}\nprompt: {template: a, reflection: b}\n"
        )
        .is_empty());
        let both = "name: x\ndescription: d\ndataset: {source: {builtin: balance_scale}, drop: [a], features: [b]}\nprompt: {template: a, reflection: b}\n";
        assert!(!check(both).is_empty(), "`drop` and `features` exclude each other");
        assert!(check(&both.replace(", features: [b]", "")).is_empty());
        assert!(check(&both.replace("drop: [a], ", "")).is_empty());
        let game = "name: x\ndescription: d\nkind: wasm\nprompt: {template: a, reflection: b}\n";
        assert!(check(&format!("{game}game: {{module: g.wasm}}\n")).is_empty());
        assert!(!check(game).is_empty(), "a game spec needs `game`");
        assert!(!check(&format!("{game}game: {{module: g.wasm}}\ndataset: {{source: {{builtin: balance_scale}}}}\n"))
            .is_empty());
        assert!(!check(&format!("{game}game: {{module: g.wasm}}\nreward: {{metric: roc_auc}}\n")).is_empty());
        assert!(check(&format!("{game}game: {{module: g.wasm}}\nreward: {{failure_reward: 0}}\n")).is_empty());
        assert!(!check(&format!("{base}prompt: {{template: a, reflection: b}}\ngame: {{module: g.wasm}}\n")).is_empty());
    }
}
