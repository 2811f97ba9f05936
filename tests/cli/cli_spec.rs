//! End-to-end tests of `etpo check`, `etpo show` and `etpo schema`, run the way a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn etpo(dir: &Path, args: &[&str]) -> Output {
    Command::new(crate::common::ETPO).args(args).current_dir(dir).output().expect("cannot run the etpo binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn check_accepts_the_shipped_specs_and_does_not_recurse() {
    let out = etpo(&repo(), &["check", "envs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "ok: envs/balance_scale.yaml\nok: envs/breast_w.yaml\nok: envs/diabetes.yaml\nok: envs/tic_tac_toe.yaml\n"
    );
    let out = etpo(&repo(), &["check", "envs/paper"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "ok: envs/paper/balance_scale.yaml\nok: envs/paper/breast_w.yaml\nok: envs/paper/diabetes.yaml\nok: envs/paper/tic_tac_toe.yaml\n"
    );
}

const BROKEN: &str = "name: broken
description: Classification with a broken spec
dataset:
  source:
    builtin: balance_scale
  train_fraction: 1.5
prompt:
  template: |
    \"\"\"{{ description }}\"\"\"
    x_train has shape {{ shpae }}
  reflection: \"{{ error }}\"
reward:
  multiclas: ovr
";

#[test]
fn check_prints_every_error_of_the_first_bad_file_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("envs/tic_tac_toe.yaml"), dir.path().join("a_good.yaml")).unwrap();
    std::fs::write(dir.path().join("b_broken.yaml"), BROKEN).unwrap();
    std::fs::write(dir.path().join("c_also_broken.yaml"), "name: [x]\n").unwrap();
    let out = etpo(dir.path(), &["check", "a_good.yaml", "b_broken.yaml", "c_also_broken.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "ok: a_good.yaml\n");
    assert_eq!(
        stderr(&out),
        "b_broken.yaml:6:19: error: `dataset.train_fraction` must be between 0 and 1 (exclusive), found 1.5
b_broken.yaml:10:26: error: unknown template variable `shpae` in `prompt.template`
  help: did you mean `shape`?
b_broken.yaml:13:3: error: unknown key `multiclas` in `reward`; expected one of: metric, multiclass, failure_reward, evaluation
  help: did you mean `multiclass`?
b_broken.yaml: 3 errors
"
    );
}

#[test]
fn check_reports_missing_paths_and_empty_folders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let out = etpo(dir.path(), &["check", "nope.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "nope.yaml: error: no such file or folder\n");
    let out = etpo(dir.path(), &["check", "empty"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "empty: error: no *.yaml or *.yml spec files in this folder (sub-folders are not searched)\n"
    );
}

#[test]
fn show_prints_the_paper_states() {
    let out = etpo(&repo(), &["show", "envs/paper/balance_scale.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("spec paper_balance_scale (envs/paper/balance_scale.yaml): seed 0, 62 training and 63 validation rows, x_train shape (62, 4), 3 classes\n"), "{text}");
    let s0 = "===== s0 = η(g), the first state [256 characters; --tokens counts tokens] =====
\"\"\"Classification with a Balance Scale Weight & Distance Prediction Dataset\"\"\"
import numpy as np
def build_model(x_train: np.ndarray, y_train: np.ndarray):
    \"\"\"Import modules, return a scikit model trained with x_train in shape (62, 4) and y_train.\"\"\"
===== end =====
";
    assert!(text.contains(s0), "{text}");
    let reflection = "\"\"\"An error was reported while executing this function: predict_proba is not available when probability=False. Please fix it.\"\"\"
# def build_model(x_train: np.ndarray, y_train: np.ndarray):
#     \"\"\"Import modules, return a scikit model trained with x_train in shape (62, 4) and y_train.\"\"\"
#     from sklearn.svm import SVC
#     model = SVC(C=100, kernel='rbf')
#     model.fit(x_train, y_train)
#     return model
def build_model(x_train: np.ndarray, y_train: np.ndarray):
    \"\"\"Fix the error in the previous function. \"\"\"
===== end =====
";
    assert!(text.ends_with(reflection), "{text}");

    // `--only s0` prints the exact text and nothing else.
    let out = etpo(&repo(), &["show", "envs/paper/balance_scale.yaml", "--only", "s0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s0_text = s0.split_once("=====\n").unwrap().1.strip_suffix("===== end =====\n").unwrap();
    assert_eq!(stdout(&out), s0_text);
}

#[test]
fn show_uses_the_seed_and_a_given_action_and_error() {
    let dir = tempfile::tempdir().unwrap();
    let action = dir.path().join("action.txt");
    std::fs::write(&action, " KNeighborsClassifier(n_neighbors=7)\nprint('more')\n").unwrap();
    let spec = repo().join("envs/balance_scale.yaml");
    let out = etpo(
        dir.path(),
        &["show", spec.to_str().unwrap(), "--seed", "3", "--action", "action.txt", "--error", "ValueError: no"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(": seed 3, 62 training and 38 validation rows (25 more held out for the test score)"),
        "{text}"
    );
    assert!(text.contains("as extracted with `first_line` =====\n KNeighborsClassifier(n_neighbors=7)\n===== (no newline at the end) ====="), "{text}");
    assert!(
        text.contains("\n    model = KNeighborsClassifier(n_neighbors=7)\n    model.fit(x_train, y_train)\n"),
        "{text}"
    );
    assert!(text.contains("# A previous classifier for the last task failed with: ValueError: no\n"), "{text}");
    assert!(text.contains("3 classes: L, B, R\nmodel =\n===== (no newline at the end) ====="), "{text}");
}

#[test]
fn schema_is_json_with_every_section() {
    let out = etpo(&repo(), &["schema"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let schema: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let props = schema["properties"].as_object().unwrap();
    for key in envspec::keys::TOP {
        assert!(props.contains_key(*key), "schema lacks `{key}`");
    }
    assert_eq!(schema["additionalProperties"], serde_json::Value::Bool(false));
}

/// A user copies the default spec, points it at their own CSV and changes the task text: no Rust
/// changes, `check` and `show` work.
#[test]
fn a_copied_and_modified_spec_works_without_rust_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tables")).unwrap();
    let mut csv = String::from("height,weight,colour,label\n");
    for i in 0..40 {
        let colour = ["red", "green", "blue"][i % 3];
        let label = if i % 2 == 0 { "yes" } else { "no" };
        csv.push_str(&format!("{},{},{colour},{label}\n", 150 + i, 50 + (i * 7) % 30));
    }
    std::fs::write(dir.path().join("tables/people.csv"), csv).unwrap();
    let original = std::fs::read_to_string(repo().join("envs/balance_scale.yaml")).unwrap();
    let modified = original
        .replace("name: balance_scale", "name: people")
        .replace(
            "description: Classification with a Balance Scale Weight & Distance Prediction Dataset",
            "description: Classification with a People Dataset",
        )
        .replace("    builtin: balance_scale\n", "    csv: tables/people.csv\n    target: label\n")
        .replace("  max_samples: 125\n", "")
        .replace("max_steps: 5", "max_steps: 3");
    assert_ne!(original, modified);
    std::fs::create_dir(dir.path().join("specs")).unwrap();
    std::fs::write(dir.path().join("specs/people.yaml"), modified.replace("tables/people.csv", "../tables/people.csv"))
        .unwrap();

    let out = etpo(dir.path(), &["check", "specs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok: specs/people.yaml\n");

    let out = etpo(dir.path(), &["show", "specs/people.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("spec people (specs/people.yaml): seed 0, 20 training and 12 validation rows (8 more held out for the test score), x_train shape (20, 3), 2 classes\n"), "{text}");
    assert!(text.contains("# Classification with a People Dataset\n# x_train has shape (20, 3); features: height, weight, colour; 2 classes: "), "{text}");

    // A typo in the copy is caught with its position.
    let typo = modified.replace("tables/people.csv", "../tables/people.csv").replace("target: label", "target: lable");
    let line = 1 + typo.lines().position(|l| l == "    target: lable").unwrap();
    std::fs::write(dir.path().join("specs/people.yaml"), &typo).unwrap();
    let out = etpo(dir.path(), &["check", "specs/people.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("specs/people.yaml:{line}:13: error: the data file has no column `lable`; its columns are: height, weight, colour, label\n  help: did you mean `label`?\nspecs/people.yaml: 1 error\n")
    );
}

/// Ten passengers: an id, the label, a class, a name (text), a sex and an age with one gap.
const PASSENGERS: &str = "PassengerId,Survived,Pclass,Name,Sex,Age
1,0,3,\"Braund, Mr. Owen\",male,22
2,1,1,\"Cumings, Mrs. John\",female,38
3,1,3,\"Heikkinen, Miss. Laina\",female,26
4,1,1,\"Futrelle, Mrs. Jacques\",female,35
5,0,3,\"Allen, Mr. William\",male,35
6,0,3,\"Moran, Mr. James\",male,
7,0,1,\"McCarthy, Mr. Timothy\",male,54
8,0,3,\"Palsson, Master. Gosta\",male,2
9,1,3,\"Johnson, Mrs. Oscar\",female,27
10,1,2,\"Nasser, Mrs. Nicholas\",female,14
";

/// A spec on `passengers.csv` whose `dataset:` ends with `selection` (line 7).
fn passengers_spec(selection: &str) -> String {
    format!(
        "name: passengers
description: Classification with a Passenger List
dataset:
  source:
    csv: passengers.csv
    target: Survived
{selection}
prompt:
  template: \"# x_train has shape {{{{ shape }}}}; features: {{{{ feature_names | join(', ') }}}}\\nmodel =\"
  reflection: \"{{{{ error }}}}\"
"
    )
}

/// `dataset.drop` and `dataset.features`: a misspelt column fails `etpo check` at its entry, and
/// `etpo show` reports how each kept column was read and which were left out.
#[test]
fn column_selection_in_check_and_show() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("passengers.csv"), PASSENGERS).unwrap();
    std::fs::write(dir.path().join("bad.yaml"), passengers_spec("  drop: [PassengerId, Nmae]")).unwrap();
    let out = etpo(dir.path(), &["check", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        "bad.yaml:7:23: error: unknown column `Nmae` in `dataset.drop`; the columns are: PassengerId, Pclass, Name, Sex, Age
  help: did you mean `Name`?
bad.yaml: 1 error
"
    );

    std::fs::write(dir.path().join("drop.yaml"), passengers_spec("  drop: [Name, PassengerId]")).unwrap();
    let out = etpo(dir.path(), &["check", "drop.yaml"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "ok: drop.yaml\n".to_string()), "{}", stderr(&out));
    let out = etpo(dir.path(), &["show", "drop.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let report =
        "spec passengers (drop.yaml): seed 0, 5 training and 5 validation rows, x_train shape (5, 3), 2 classes
column `Pclass`: numeric
column `Sex`: categorical, 2 codes (female=0, male=1)
column `Age`: numeric, 1 missing value filled with the column median 27
dropped column `PassengerId`: listed in dataset.drop
dropped column `Name`: listed in dataset.drop
";
    assert!(text.starts_with(report), "{text}");
    assert!(text.contains("# x_train has shape (5, 3); features: Pclass, Sex, Age\nmodel ="), "{text}");

    // `features` keeps the listed columns in the listed order.
    std::fs::write(dir.path().join("features.yaml"), passengers_spec("  features: [Age, Sex]")).unwrap();
    let out = etpo(dir.path(), &["show", "features.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "x_train shape (5, 2), 2 classes
column `Age`: numeric, 1 missing value filled with the column median 27
column `Sex`: categorical, 2 codes (female=0, male=1)
dropped column `PassengerId`: not listed in dataset.features
dropped column `Pclass`: not listed in dataset.features
dropped column `Name`: not listed in dataset.features
"
        ),
        "{text}"
    );
    assert!(text.contains("features: Age, Sex\nmodel ="), "{text}");
}

/// A chat-format spec shown through a chat template file gives the exact text the model reads.
#[test]
fn show_renders_chat_specs_with_a_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("chat.yaml"),
        "name: chat
description: Classification with a Balance Scale Weight & Distance Prediction Dataset
dataset:
  source: {builtin: balance_scale}
  max_samples: 125
prompt:
  format: chat
  system: You write scikit-learn code.
  user: \"{{ description }}. Write the body of build_model(x_train, y_train); x_train has shape {{ shape }}.\"
  reflection: \"That failed with: {{ error }}. Please fix it.\"
",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chatml.jinja"),
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    )
    .unwrap();
    let out = etpo(dir.path(), &["show", "chat.yaml", "--chat-template", "chatml.jinja", "--error", "boom"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let s0 = "<|im_start|>system
You write scikit-learn code.<|im_end|>
<|im_start|>user
Classification with a Balance Scale Weight & Distance Prediction Dataset. Write the body of build_model(x_train, y_train); x_train has shape (62, 4).<|im_end|>
<|im_start|>assistant
===== end =====";
    assert!(text.contains(s0), "{text}");
    assert!(text.contains("```<|im_end|>\n<|im_start|>user\nThat failed with: boom. Please fix it.<|im_end|>\n<|im_start|>assistant\n===== end ====="), "{text}");

    // Without a template the messages are listed by role.
    let out = etpo(dir.path(), &["show", "chat.yaml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("[system]\nYou write scikit-learn code.\n[user]\n"), "{}", stdout(&out));
}

/// `--tokens` counts with the embedded default model's tokenizer (needs `scripts/setup.sh
/// model`): the facts' reference prompt is 14 tokens.
#[test]
fn show_counts_tokens_with_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "def build_model(x_train, y_train):\n";
    std::fs::write(
        dir.path().join("tok.yaml"),
        "name: tok
description: d
dataset: {source: {builtin: balance_scale}}
prompt:
  template: \"def build_model(x_train, y_train):\\n\"
  reflection: \"{{ error }}\"
",
    )
    .unwrap();
    let out = etpo(dir.path(), &["show", "tok.yaml", "--tokens"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "etpo show --tokens failed (is the default model installed? run scripts/setup.sh model):\n{}",
        stderr(&out)
    );
    let expected = format!(
        "===== s0 = η(g), the first state [{} characters, 14 tokens] =====\n{prompt}===== end =====\n",
        prompt.len()
    );
    assert!(stdout(&out).contains(&expected), "{}", stdout(&out));
}

#[test]
fn check_measures_the_first_state_against_the_token_budget() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::write_tiny_model(&dir.path().join("tiny-model"));
    let shipped = std::fs::read_to_string(repo().join("envs/balance_scale.yaml")).unwrap();
    let with_budget = |n: usize| shipped.replacen("prompt:\n", &format!("prompt:\n  max_tokens: {n}\n"), 1);
    std::fs::write(dir.path().join("small.yaml"), with_budget(100)).unwrap();
    let out = etpo(dir.path(), &["check", "small.yaml", "--model", "tiny-model"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.starts_with("small.yaml: error: the first state (seed 0) is "), "{err}");
    assert!(err.trim_end().ends_with(" tokens, over prompt.max_tokens = 100"), "{err}");
    // The tiny model's tokenizer is one token per byte: the count is the state's length.
    let tokens: usize = err.split(" is ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(tokens > 1000, "{err}");
    std::fs::write(dir.path().join("roomy.yaml"), with_budget(tokens)).unwrap();
    let out = etpo(dir.path(), &["check", "roomy.yaml", "--model", "tiny-model"]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(dir.path().join("tight.yaml"), with_budget(tokens - 1)).unwrap();
    assert!(!etpo(dir.path(), &["check", "tight.yaml", "--model", "tiny-model"]).status.success());
}
