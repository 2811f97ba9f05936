//! Every spec error class, with its exact message and position.

use super::templates::{find_variable, line_col};
use super::*;
use crate::action::Extract;
use crate::data::DataSource;
use crate::spec::{Algorithm, Evaluation, Example, ExecLimits, Kind, Multiclass, TrainingOverrides};

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncé{{", 6), (2, 3));
    assert_eq!(line_col("x", 0), (1, 1));
}

#[test]
fn find_variable_only_inside_tags() {
    assert_eq!(find_variable("shape {{ shape }}", "shape"), Some((1, 10)));
    assert_eq!(find_variable("a\n{% for x in shapes %}{{ shape }}", "shape"), Some((2, 25)));
    assert_eq!(find_variable("{{ x.shape }}", "shape"), None);
}

/// A valid spec of 8 lines; tests append to it (their lines start at 9) or edit it.
const BASE: &str = "name: t
description: a task
dataset:
  source:
    builtin: balance_scale
prompt:
  template: \"{{ description }} {{ shape }}\"
  reflection: \"{{ error }}\"
";

fn errors(src: &str) -> String {
    match load_str(src, Path::new("spec.yaml")) {
        Ok(_) => panic!("expected errors for:\n{src}"),
        Err(e) => e.to_string(),
    }
}

fn spec(src: &str) -> Spec {
    load_str(src, Path::new("spec.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_base_spec_is_valid_and_has_the_defaults() {
    let s = spec(BASE);
    assert_eq!(s.name, "t");
    assert_eq!(s.kind, Kind::Sklearn);
    assert_eq!(s.dataset.source, DataSource::Builtin("balance_scale".into()));
    assert_eq!(s.dataset.train_fraction, 0.5);
    assert_eq!(s.dataset.seeds, vec![0, 1, 2, 3, 4]);
    assert_eq!(s.dataset.max_samples, None);
    assert_eq!(s.max_steps, 5);
    assert_eq!(s.reward.failure_reward, -1.0);
    assert_eq!(s.reward.multiclass, Multiclass::Ovo);
    assert_eq!(s.reward.evaluation, Evaluation::SingleSplit);
    assert_eq!(s.action.extract, Extract::UntilUnindented);
    assert_eq!(s.action.assemble, DEFAULT_SKLEARN_ASSEMBLE);
    assert_eq!(s.action.max_new_tokens, 256);
    assert_eq!(s.limits, ExecLimits::default());
    assert_eq!(s.training, TrainingOverrides::default());
    assert!(s.examples.is_empty());
}

#[test]
fn every_field_parses() {
    let s = spec(&format!(
        "{BASE}kind: sklearn
examples:
  - {{task: iris, action: SVC()}}
action:
  extract: first_line
  stop: [\"\\n\"]
  max_new_tokens: 32
  assemble: \"m = {{{{ action }}}}\"
reward: {{metric: roc_auc, multiclass: ovr, failure_reward: -0.5, evaluation: {{mean_of_splits: 5}}}}
max_steps: 3
limits: {{wall_s: 1.5, cpu_s: 2, memory_mb: 512, output_kb: 8, max_processes: 4}}
training: {{algorithm: etpo, steps: 100, batch_size: 4, lr: 1e-4, beta: 0.1, gamma: 1, polyak: 0.9,
  temperature: 0.5, top_k: 50, top_p: 0.95, lora_rank: 8, lora_alpha: 16, epochs: 1, grad_clip: 1.0, clip_eps: 0.2}}
"
    ));
    assert_eq!(s.examples, vec![Example { task: "iris".into(), action: "SVC()".into() }]);
    assert_eq!(s.action.extract, Extract::FirstLine);
    assert_eq!(s.action.stop, vec!["\n".to_string()]);
    assert_eq!(s.action.max_new_tokens, 32);
    assert_eq!(s.reward.multiclass, Multiclass::Ovr);
    assert_eq!(s.reward.failure_reward, -0.5);
    assert_eq!(s.reward.evaluation, Evaluation::MeanOfSplits(5));
    assert_eq!(s.max_steps, 3);
    assert_eq!(s.limits, ExecLimits { wall_s: 1.5, cpu_s: 2.0, memory_mb: 512, output_kb: 8, max_processes: 4 });
    assert_eq!(s.training.algorithm, Some(Algorithm::Etpo));
    assert_eq!(s.training.steps, Some(100));
    assert_eq!(s.training.lr, Some(1e-4));
    assert_eq!(s.training.gamma, Some(1.0));
    assert_eq!(s.training.top_k, Some(50));
    assert_eq!(s.training.clip_eps, Some(0.2));
    assert_eq!(s.assemble_program("SVC()").unwrap(), "m = SVC()");
}

#[test]
fn yaml_syntax_error() {
    assert_eq!(
        errors("name: t\ndescription: [a, b\n"),
        "spec.yaml:3:1: error: invalid YAML: while parsing a flow sequence, expected ',' or ']'"
    );
}

#[test]
fn empty_file_and_wrong_top_level() {
    assert_eq!(
        errors("# nothing\n"),
        "spec.yaml:1:1: error: the spec file is empty; expected a mapping with at least `name`, `description`, `dataset` and `prompt`"
    );
    assert_eq!(
        errors("- a\n- b\n"),
        "spec.yaml:1:1: error: the spec must be a mapping (keys: name, description, kind, dataset, game, prompt, examples, action, reward, max_steps, limits, training), found a list"
    );
}

#[test]
fn unknown_keys_with_suggestions() {
    assert_eq!(
        errors(&format!("{BASE}max_step: 3\n")),
        "spec.yaml:9:1: error: unknown key `max_step` at the top level; expected one of: name, description, kind, dataset, game, prompt, examples, action, reward, max_steps, limits, training\n  help: did you mean `max_steps`?"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  seed: [1]\n  source:")),
        "spec.yaml:4:3: error: unknown key `seed` in `dataset`; expected one of: source, train_fraction, test_fraction, seeds, max_samples, drop, features\n  help: did you mean `seeds`?"
    );
    assert_eq!(
        errors(&format!("{BASE}training: {{zzz: 1}}\n")),
        "spec.yaml:9:12: error: unknown key `zzz` in `training`; expected one of: algorithm, steps, batch_size, lr, beta, gamma, polyak, temperature, top_k, top_p, lora_rank, lora_alpha, epochs, grad_clip, clip_eps"
    );
}

#[test]
fn duplicate_keys() {
    assert_eq!(
        errors(&format!("{BASE}name: u\n")),
        "spec.yaml:9:1: error: duplicate key `name` (first given at line 1, column 1)"
    );
}

#[test]
fn missing_required_keys() {
    assert_eq!(
        errors("name: t\nprompt:\n  template: x\n  reflection: y\n"),
        "spec.yaml:1:1: error: the spec is missing the required key `description` (the task text g shown to the model)\nspec.yaml:1:1: error: the spec is missing the required key `dataset` (where the data come from)"
    );
    assert_eq!(
        errors(&BASE.replace("  reflection: \"{{ error }}\"\n", "")),
        "spec.yaml:6:1: error: `prompt` is missing the required key `reflection` (the state η(g, a, e) after a failed action)"
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        errors(&BASE.replace("name: t", "name: [t]")),
        "spec.yaml:1:7: error: `name` must be a string, found a list"
    );
    assert_eq!(
        errors(&format!("{BASE}limits:\n  wall_s: ten\n")),
        "spec.yaml:10:11: error: `limits.wall_s` must be a number, found a string `ten`"
    );
    assert_eq!(
        errors(&format!("{BASE}max_steps: 2.5\n")),
        "spec.yaml:9:12: error: `max_steps` must be an integer, found a number `2.5`"
    );
    assert_eq!(
        errors(&format!("{BASE}limits: \"30\"\n")),
        "spec.yaml:9:9: error: `limits` must be a mapping (keys: wall_s, cpu_s, memory_mb, output_kb, max_processes), found a string"
    );
    // A quoted number is a string, not a number.
    assert_eq!(
        errors(&format!("{BASE}reward: {{failure_reward: '-1'}}\n")),
        "spec.yaml:9:26: error: `reward.failure_reward` must be a number, found a string `-1`"
    );
}

#[test]
fn bad_values() {
    assert_eq!(
        errors(&format!("{BASE}limits: {{wall_s: -1, memory_mb: 0}}\n")),
        "spec.yaml:9:18: error: `limits.wall_s` must be a positive number of seconds, found -1\nspec.yaml:9:33: error: `limits.memory_mb` must be a positive number of MiB (an integer >= 1), found 0"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  train_fraction: 1.0\n  source:")),
        "spec.yaml:4:19: error: `dataset.train_fraction` must be between 0 and 1 (exclusive), found 1.0"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  test_fraction: 0.5\n  source:")),
        "spec.yaml:4:18: error: `dataset.test_fraction` must be in [0, 0.5), found 0.5"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  train_fraction: 0.7\n  test_fraction: 0.3\n  source:")),
        "spec.yaml:5:3: error: dataset.train_fraction (0.7) and dataset.test_fraction (0.3) leave no rows to validate on; their sum must be below 1"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  max_samples: 1\n  source:")),
        "spec.yaml:4:16: error: `dataset.max_samples` must be the number of rows kept after the shuffle (an integer >= 2), found 1"
    );
    assert_eq!(
        errors(&format!("{BASE}max_steps: 0\n")),
        "spec.yaml:9:12: error: `max_steps` must be the number of steps per episode (an integer >= 1), found 0"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  seeds: [1, 2, 1]\n  source:")),
        "spec.yaml:4:17: error: seed 1 is listed twice in `dataset.seeds`"
    );
    assert_eq!(
        errors(&BASE.replace("  source:", "  seeds: []\n  source:")),
        "spec.yaml:4:10: error: `dataset.seeds` must list at least one seed"
    );
    assert_eq!(
        errors(&format!("{BASE}training:\n  gamma: 1.5\n  top_p: 0\n")),
        "spec.yaml:10:10: error: `training.gamma` must be between 0 and 1, found 1.5\nspec.yaml:11:10: error: `training.top_p` must be in (0, 1], found 0"
    );
    assert_eq!(
        errors(&format!("{BASE}reward: {{evaluation: {{mean_of_splits: 0}}}}\n")),
        "spec.yaml:9:39: error: `reward.evaluation.mean_of_splits` must be a number of splits (an integer >= 1), found 0"
    );
}

#[test]
fn unknown_choices() {
    assert_eq!(
        errors(&format!("{BASE}reward:\n  multiclass: ovx\n")),
        "spec.yaml:10:15: error: unknown value `ovx` for `reward.multiclass`; expected one of: ovo, ovr\n  help: did you mean `ovo`?"
    );
    assert_eq!(
        errors(&format!("{BASE}kind: wasn\n")),
        "spec.yaml:9:7: error: unknown value `wasn` for `kind`; expected one of: sklearn, wasm\n  help: did you mean `wasm`?"
    );
    assert_eq!(
        errors(&format!("{BASE}action:\n  extract: fenc\n")),
        "spec.yaml:10:12: error: unknown value `fenc` for `action.extract`; expected one of: raw, stop, first_line, until_unindented, fenced\n  help: did you mean `fenced`?"
    );
    assert_eq!(
        errors(&format!("{BASE}reward:\n  evaluation: mean_of_split\n")),
        "spec.yaml:10:15: error: unknown value `mean_of_split` for `reward.evaluation`; expected `single_split` or `{mean_of_splits: N}`\n  help: did you mean `mean_of_splits`?"
    );
}

#[test]
fn data_sources() {
    assert_eq!(
        errors(&BASE.replace("builtin: balance_scale", "builtin: balance_scales")),
        "spec.yaml:5:14: error: unknown builtin data set `balance_scales`; expected one of: balance_scale, tic_tac_toe\n  help: did you mean `balance_scale`?"
    );
    assert_eq!(
        errors(&BASE.replace("builtin: balance_scale", "csv: missing.csv\n    target: y")),
        "spec.yaml:5:10: error: data file `./missing.csv` does not exist\n  help: relative paths resolve against the spec's folder `.`"
    );
    assert_eq!(
        errors(&BASE.replace("builtin: balance_scale", "csv: missing.csv")),
        "spec.yaml:4:3: error: `dataset.source` is missing the required key `target` (the class column of the csv file)\nspec.yaml:5:10: error: data file `./missing.csv` does not exist\n  help: relative paths resolve against the spec's folder `.`"
    );
    assert_eq!(
        errors(&BASE.replace("builtin: balance_scale", "builtin: balance_scale\n    arff: x.arff")),
        "spec.yaml:4:3: error: `dataset.source` needs exactly one of `builtin`, `csv` or `arff`, found builtin and arff"
    );
}

#[test]
fn data_files_resolve_against_the_spec_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/t.csv"), "a,b,label\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n").unwrap();
    let src = BASE.replace("builtin: balance_scale", "csv: data/t.csv\n    target: label");
    let path = dir.path().join("spec.yaml");
    let s = load_str(&src, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.dataset.source, DataSource::Csv { path: dir.path().join("data/t.csv"), target: "label".into() });
    // A wrong target column is reported at `target:`, with a suggestion.
    let bad = BASE.replace("builtin: balance_scale", "csv: data/t.csv\n    target: lable");
    assert_eq!(
        load_str(&bad, &path).unwrap_err().to_string(),
        format!(
            "{}:6:13: error: the data file has no column `lable`; its columns are: a, b, label\n  help: did you mean `label`?",
            path.display()
        )
    );
    // Other problems of the data file are reported at the source, with the data loader's message.
    std::fs::write(dir.path().join("data/t.csv"), "a,b,label\n1,2,x\n3,y\n").unwrap();
    let err = load_str(&src, &path).unwrap_err();
    assert_eq!(err.diagnostics.len(), 1);
    assert_eq!(err.diagnostics[0].pos, Some(Pos { line: 5, col: 5 }));
    assert!(err.diagnostics[0].message.starts_with("cannot load the data set: "), "{}", err.diagnostics[0].message);
}

/// A small passenger list: an id, the label, a class, a name, an age with a gap.
const PASSENGERS: &str = "PassengerId,Survived,Pclass,Name,Age
1,0,3,\"Braund, Mr. Owen\",22
2,1,1,\"Cumings, Mrs. John\",38
3,1,3,\"Heikkinen, Miss. Laina\",
4,0,1,\"Futrelle, Mr. Jacques\",35
5,0,3,\"Allen, Mr. William\",35
6,1,2,\"Moran, Mr. James\",27
";

/// BASE on `p.csv` (target `Survived`) with `selection` added to `dataset:` from line 7 on.
fn passengers_spec(dir: &Path, selection: &str) -> (String, PathBuf) {
    std::fs::write(dir.join("p.csv"), PASSENGERS).unwrap();
    let src = BASE.replace("builtin: balance_scale", &format!("csv: p.csv\n    target: Survived\n{selection}"));
    (src, dir.join("spec.yaml"))
}

#[test]
fn drop_and_features_select_the_columns_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (src, path) = passengers_spec(dir.path(), "  drop: [Name, PassengerId]");
    let s = load_str(&src, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.dataset.columns, crate::data::ColumnSelection::Drop(vec!["Name".into(), "PassengerId".into()]));
    let d = crate::data::load_for(&s.dataset, dir.path()).unwrap();
    // `drop` keeps the file's order.
    assert_eq!(d.feature_names, vec!["Pclass", "Age"]);
    let split = d.split_for(&s.dataset, 0);
    let ctx = s.task_context(&split);
    assert_eq!((ctx.feature_names.clone(), ctx.n_features), (vec!["Pclass".to_string(), "Age".to_string()], 2));
    assert_eq!(ctx.shape, "(3, 2)");
    assert!(split.x_train.iter().chain(&split.x_val).all(|row| row.len() == 2));

    // `features` keeps its own order, in block style too.
    let (src, path) = passengers_spec(dir.path(), "  features:\n    - Age\n    - Name\n    - Pclass");
    let s = load_str(&src, &path).unwrap_or_else(|e| panic!("{e}"));
    let d = crate::data::load_for(&s.dataset, dir.path()).unwrap();
    assert_eq!(d.feature_names, vec!["Age", "Name", "Pclass"]);
    assert_eq!(
        d.dropped,
        vec![crate::data::DroppedColumn { name: "PassengerId".into(), reason: crate::data::DropReason::NotSelected }]
    );
    let split = d.split_for(&s.dataset, 1);
    assert_eq!(s.task_context(&split).feature_names, vec!["Age", "Name", "Pclass"]);

    // A builtin's features.
    let s = spec(
        &BASE.replace("builtin: balance_scale", "builtin: balance_scale\n  features: [right-weight, left-weight]"),
    );
    let d = crate::data::load_for(&s.dataset, Path::new(".")).unwrap();
    assert_eq!(d.feature_names, vec!["right-weight", "left-weight"]);
}

#[test]
fn column_selection_errors_point_at_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let errs = |selection: &str| {
        let (src, path) = passengers_spec(dir.path(), selection);
        match load_str(&src, &path) {
            Ok(_) => panic!("expected errors for:\n{src}"),
            Err(e) => e.to_string().replace(&format!("{}:", path.display()), "spec.yaml:"),
        }
    };
    assert_eq!(
        errs("  drop: [PassengerId, Nmae]"),
        "spec.yaml:7:23: error: unknown column `Nmae` in `dataset.drop`; the columns are: PassengerId, Pclass, Name, Age\n  help: did you mean `Name`?"
    );
    assert_eq!(
        errs("  features:\n    - Age\n    - Survived\n    - Age"),
        "spec.yaml:9:7: error: `Survived` in `dataset.features` is the target column; it cannot be a feature (it is what the model predicts)\nspec.yaml:10:7: error: column `Age` is listed twice in `dataset.features`"
    );
    assert_eq!(
        errs("  drop: [Survived]"),
        "spec.yaml:7:10: error: `Survived` in `dataset.drop` is the target column; it cannot be dropped (it is what the model predicts)"
    );
    assert_eq!(
        errs("  drop: [PassengerId, Pclass, Name, Age]"),
        "spec.yaml:7:3: error: `dataset.drop` drops every feature column (PassengerId, Pclass, Name, Age); keep at least one"
    );
    assert_eq!(
        errs("  features: []"),
        "spec.yaml:7:3: error: `dataset.features` must list at least one column; the columns are: PassengerId, Pclass, Name, Age"
    );
    assert_eq!(
        errs("  drop: [Name]\n  features: [Age]"),
        "spec.yaml:8:3: error: `dataset.drop` and `dataset.features` cannot both be given\n  help: list the columns to leave out in `drop`, or the columns to keep in `features`"
    );
    assert_eq!(errs("  drop: Name"), "spec.yaml:7:9: error: `dataset.drop` must be a list of strings, found a string");
    assert_eq!(
        errors(&BASE.replace("builtin: balance_scale", "builtin: balance_scale\n  features: [left-wieght]")),
        "spec.yaml:6:14: error: unknown column `left-wieght` in `dataset.features`; the columns are: left-weight, left-distance, right-weight, right-distance\n  help: did you mean `left-weight`?"
    );
}

#[test]
fn format_specific_prompt_keys() {
    assert_eq!(
        errors(&BASE.replace("prompt:\n", "prompt:\n  user: hi\n")),
        "spec.yaml:7:3: error: `prompt.user` belongs to format `chat`; format `completion` uses: format, template, reflection, max_tokens"
    );
    let chat = BASE.replace("prompt:\n", "prompt:\n  format: chat\n");
    assert_eq!(
        errors(&chat),
        "spec.yaml:6:1: error: `prompt` is missing the required key `user` (the user message stating the task)\nspec.yaml:8:3: error: `prompt.template` belongs to format `completion`; format `chat` uses: format, system, user, assistant, reflection, turns, max_tokens"
    );
}

#[test]
fn template_syntax_error_points_into_the_block() {
    let src = BASE.replace(
        "  template: \"{{ description }} {{ shape }}\"\n",
        "  template: |\n    line one\n    {% for x in feature_names %}{{ x }\n",
    );
    assert_eq!(
        errors(&src),
        "spec.yaml:9:38: error: template syntax error in `prompt.template`: syntax error: unexpected `}`, expected end of variable block"
    );
}

#[test]
fn unknown_template_variables() {
    let src = BASE.replace("{{ description }} {{ shape }}", "{{ description }} {{ shap }}");
    assert_eq!(
        errors(&src),
        "spec.yaml:7:35: error: unknown template variable `shap` in `prompt.template`\n  help: did you mean `shape`?"
    );
    // `action` is a reflection variable, not a first-state one.
    let src = BASE.replace("{{ description }} {{ shape }}", "{{ action }}");
    assert_eq!(
        errors(&src),
        "spec.yaml:7:17: error: unknown template variable `action` in `prompt.template`\n  help: available variables: name, description, n_train, n_val, n_features, shape, feature_names, n_classes, class_names, examples, history, history_omitted"
    );
}

#[test]
fn template_that_fails_to_render() {
    let src = BASE.replace("{{ error }}", "{{ feature_names[7] }}");
    assert_eq!(
        errors(&src),
        "spec.yaml:8:19: error: `prompt.reflection` fails to render against a sample task: undefined value"
    );
}

#[test]
fn assembly_must_use_the_action() {
    assert_eq!(
        errors(&format!("{BASE}action:\n  assemble: |\n    def build_model(x_train, y_train):\n        return None\n")),
        "spec.yaml:11:5: error: `action.assemble` never uses `{{ action }}`, so the model's action would never run\n  help: put `{{ action }}` where the action goes, e.g. the body of `def build_model(x_train, y_train):`"
    );
}

#[test]
fn stop_sequences_and_extraction() {
    assert_eq!(
        errors(&format!("{BASE}action:\n  extract: stop\n")),
        "spec.yaml:10:12: error: `action.extract: stop` needs at least one stop sequence in `action.stop`"
    );
    assert_eq!(
        errors(&format!("{BASE}action:\n  extract: fenced\n  stop: [\"<|im_end|>\", \"```\"]\n")),
        "spec.yaml:11:24: error: a stop sequence containing ``` would cut a fenced answer at its opening fence; remove it for `extract: fenced`"
    );
    assert_eq!(
        errors(&format!("{BASE}action:\n  stop: [\"\"]\n")),
        "spec.yaml:10:10: error: `action.stop` entries must not be empty"
    );
}

#[test]
fn all_errors_of_a_file_are_reported_in_order() {
    let src = "name: bad name\ndescriptin: x\ndataset:\n  source: {builtin: nope}\n  train_fraction: 2\nprompt:\n  template: \"{{ nme }}\"\n  reflection: ok\nmax_steps: -1\n";
    let err = load_str(src, Path::new("spec.yaml")).unwrap_err();
    let lines: Vec<(usize, usize)> = err.diagnostics.iter().map(|d| d.pos.map(|p| (p.line, p.col)).unwrap()).collect();
    assert_eq!(lines, vec![(1, 1), (1, 7), (2, 1), (4, 21), (5, 19), (7, 17), (9, 12)]);
}

#[test]
fn chat_prompts_render_messages() {
    let src = BASE.replace(
        "prompt:\n  template: \"{{ description }} {{ shape }}\"\n  reflection: \"{{ error }}\"\n",
        "prompt:\n  format: chat\n  system: You write scikit-learn code.\n  user: \"{{ description }}, x_train {{ shape }}\"\n  reflection: \"It failed: {{ error }}. Fix it.\"\n",
    );
    let s = spec(&src);
    assert_eq!(s.action.extract, Extract::Fenced);
    let ctx = crate::TaskContext {
        name: "t".into(),
        description: "a task".into(),
        n_train: 62,
        n_val: 63,
        n_features: 4,
        shape: "(62, 4)".into(),
        feature_names: vec![],
        n_classes: 3,
        class_names: vec![],
        examples: vec![],
    };
    let msg = |role: &str, content: &str| crate::ChatMessage { role: role.into(), content: content.into() };
    assert_eq!(
        s.render_initial(&ctx).unwrap(),
        crate::Prompt::Chat(vec![
            msg("system", "You write scikit-learn code."),
            msg("user", "a task, x_train (62, 4)")
        ])
    );
    assert_eq!(
        s.render_reflection(&ctx, "return SVC()", "boom", Default::default()).unwrap(),
        crate::Prompt::Chat(vec![
            msg("system", "You write scikit-learn code."),
            msg("user", "a task, x_train (62, 4)"),
            msg("assistant", "```python\nreturn SVC()\n```"),
            msg("user", "It failed: boom. Fix it."),
        ])
    );
}

#[test]
fn the_format_documentation_example_is_a_valid_spec() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("FORMAT.md")).unwrap();
    let yaml = doc.split("```yaml\n").nth(1).and_then(|rest| rest.split("```\n").next()).unwrap();
    let s = spec(yaml);
    assert_eq!(s.training.algorithm, Some(Algorithm::Etpo));
    assert_eq!(s.training.lr, Some(3.0e-4));
    assert_eq!(s.dataset.max_samples, Some(125));
}

/// A valid game spec of 8 lines (the module is a file that exists; its contents are checked
/// when the game is loaded, not by the spec loader).
fn game_base(dir: &Path) -> String {
    std::fs::write(dir.join("g.wasm"), b"\0asm").unwrap();
    "name: g
description: a game
kind: wasm
game:
  module: g.wasm
prompt:
  template: \"{{ description }}: {{ observation }}\"
  reflection: \"{{ action }} -> {{ observation }} ({{ reward }}, step {{ step }})\"
"
    .to_string()
}

fn game_errors(dir: &Path, src: &str) -> String {
    match load_str(src, &dir.join("spec.yaml")) {
        Ok(_) => panic!("expected errors for:\n{src}"),
        Err(e) => e.to_string().replace(&format!("{}/", dir.display()), ""),
    }
}

#[test]
fn a_game_spec_has_game_defaults_and_renders_observations() {
    let dir = tempfile::tempdir().unwrap();
    let src = game_base(dir.path());
    let s = load_str(&src, &dir.path().join("spec.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let Kind::Wasm(g) = &s.kind else { panic!("{:?}", s.kind) };
    assert_eq!(g.module, std::fs::canonicalize(dir.path().join("g.wasm")).unwrap());
    assert_eq!((g.fuel, g.memory_mb, g.observation_kb), (100_000_000, 64, 16));
    assert_eq!(s.dataset.seeds, vec![0, 1, 2, 3, 4]);
    assert_eq!(s.action.extract, Extract::FirstLine);
    assert_eq!(s.action.assemble, "{{ action }}");
    assert_eq!(s.action.max_new_tokens, 32);
    // The action a game receives is the first line, trimmed.
    assert_eq!(s.assemble_program(&s.extract_action("  go north \nand more")).unwrap(), "go north");
    let ctx = s.game_context("A room.", 0);
    assert_eq!(
        s.render_game(&ctx, None, Default::default()).unwrap(),
        crate::Prompt::Completion("a game: A room.".into())
    );
    let ctx = s.game_context("A hall.", 1);
    assert_eq!(
        s.render_game(&ctx, Some(("go north", 0.5)), Default::default()).unwrap(),
        crate::Prompt::Completion("go north -> A hall. (0.5, step 1)".into())
    );
    let with_keys = src.replace(
        "  module: g.wasm\n",
        "  module: g.wasm\n  seeds: [7, 9]\n  fuel: 1000\n  memory_mb: 2\n  observation_kb: 1\n",
    );
    let s = load_str(&with_keys, &dir.path().join("spec.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.dataset.seeds, vec![7, 9]);
    assert_eq!(s.kind.game().map(|g| (g.fuel, g.memory_mb, g.observation_kb)), Some((1000, 2, 1)));
}

#[test]
fn game_spec_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = game_base(d);
    assert_eq!(
        game_errors(d, &base.replace("g.wasm", "missing.wasm")),
        format!("spec.yaml:5:11: error: game module `{}/missing.wasm` does not exist\n  help: relative paths resolve against the spec's folder `{}`; the shipped games are built by `scripts/setup.sh games`, a new one by `cargo build --target wasm32-unknown-unknown --release` in its folder", d.display(), d.display()).replace(&format!("{}/", d.display()), "")
    );
    assert_eq!(
        game_errors(d, &format!("{base}dataset:\n  seeds: [1]\nlimits:\n  wall_s: 1\nreward:\n  metric: roc_auc\n  failure_reward: 0\n")),
        "spec.yaml:9:1: error: `dataset` does not apply to `kind: wasm` (a game has no data); the reset seeds go in `game.seeds`
spec.yaml:11:1: error: `limits` applies to `kind: sklearn` programs; a game's budgets are `game.fuel` and `game.memory_mb`
spec.yaml:14:3: error: `reward.metric` applies to `kind: sklearn`; a game's rewards come from the game (only `reward.failure_reward`, the reward of a step the game fails on, applies)"
    );
    assert_eq!(
        game_errors(d, &base.replace("game:\n  module: g.wasm\n", "")),
        "spec.yaml:1:1: error: the spec is missing the required key `game` (the game: `module: FILE.wasm`)"
    );
    assert_eq!(
        game_errors(
            d,
            &base.replace("  module: g.wasm\n", "  module: g.wasm\n  fuel: 0\n  seeds: [1, 1]\n  modul: x\n")
        ),
        "spec.yaml:6:9: error: `game.fuel` must be units of fuel per call (an integer >= 1), found 0
spec.yaml:7:14: error: seed 1 is listed twice in `game.seeds`
spec.yaml:8:3: error: unknown key `modul` in `game`; expected one of: module, seeds, fuel, memory_mb, observation_kb
  help: did you mean `module`?"
    );
    // Data-task variables do not exist in a game's templates, and vice versa.
    assert_eq!(
        game_errors(d, &base.replace("{{ observation }}\"\n  reflection", "{{ shape }}\"\n  reflection")),
        "spec.yaml:7:36: error: unknown template variable `shape` in `prompt.template`\n  help: available variables: name, description, examples, observation, step, history, history_omitted"
    );
    assert_eq!(
        errors(&format!("{BASE}game:\n  module: g.wasm\n")),
        "spec.yaml:9:1: error: `game` applies to `kind: wasm` specs; add `kind: wasm` or remove this section"
    );
}

fn turn(step: u32, action: &str, reward: f64, error: &str, observation: &str) -> crate::Turn {
    crate::Turn { step, action: action.into(), reward, error: error.into(), observation: observation.into() }
}

#[test]
fn completion_states_show_the_history_and_what_was_left_out() {
    let src = "name: t
description: a task
dataset:
  source:
    builtin: balance_scale
prompt:
  max_tokens: 100
  template: \"{{ description }}\"
  reflection: \"{% if history_omitted %}({{ history_omitted }} left out) {% endif %}{% for t in history %}[{{ t.step }} {{ t.action }} {{ t.reward }} {{ t.error }}]{% endfor %} now: {{ error }}\"
";
    let s = spec(src);
    assert_eq!(s.prompt_max_tokens, Some(100));
    let ctx = crate::TaskContext {
        name: "t".into(),
        description: "d".into(),
        n_train: 1,
        n_val: 1,
        n_features: 1,
        shape: "(1, 1)".into(),
        feature_names: vec!["x".into()],
        n_classes: 2,
        class_names: vec!["a".into(), "b".into()],
        examples: vec![],
    };
    let turns = [turn(0, "A()", -1.0, "E1", ""), turn(1, "B()", -1.0, "E2", "")];
    let all = s.render_reflection(&ctx, "B()", "E2", crate::History::all(&turns)).unwrap();
    assert_eq!(all, crate::Prompt::Completion("[0 A() -1.0 E1][1 B() -1.0 E2] now: E2".into()));
    let cut = s.render_reflection(&ctx, "B()", "E2", crate::History::without_oldest(&turns, 1)).unwrap();
    assert_eq!(cut, crate::Prompt::Completion("(1 left out) [1 B() -1.0 E2] now: E2".into()));
    // The first state has an empty history.
    assert_eq!(s.render_initial(&ctx).unwrap(), crate::Prompt::Completion("d".into()));
}

#[test]
fn chat_turns_all_replays_every_step_with_its_own_observation() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("g.wasm"), b"\0asm").unwrap();
    let src = "name: g
description: a game
kind: wasm
game:
  module: g.wasm
prompt:
  format: chat
  turns: all
  max_tokens: 50
  system: play
  user: \"{{ description }}{% if history_omitted %} ({{ history_omitted }} earlier turns left out){% endif %}: {{ observation }}\"
  assistant: \"{{ action }}\"
  reflection: \"{{ observation }} ({{ reward }}, step {{ step }})\"
";
    let s = load_str(src, &dir.path().join("spec.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let turns = [turn(0, "go north", 0.0, "", "A hall."), turn(1, "take lamp", 0.2, "", "Taken.")];
    let ctx = s.game_context("Taken.", 2);
    let history = crate::History::all(&turns).starting_with("The hall.");
    let crate::Prompt::Chat(m) = s.render_game(&ctx, Some(("take lamp", 0.2)), history).unwrap() else {
        panic!("not chat")
    };
    let got: Vec<(&str, &str)> = m.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    assert_eq!(
        got,
        vec![
            ("system", "play"),
            ("user", "a game: The hall."),
            ("assistant", "go north"),
            ("user", "A hall. (0.0, step 1)"),
            ("assistant", "take lamp"),
            ("user", "Taken. (0.2, step 2)"),
        ]
    );
    let cut = s.render_game(&ctx, Some(("take lamp", 0.2)), crate::History::without_oldest(&turns, 1)).unwrap();
    let crate::Prompt::Chat(m) = cut else { panic!("not chat") };
    assert_eq!(m.len(), 4);
    assert_eq!(m[1].content, "a game (1 earlier turns left out): ");
    assert_eq!(m[2].content, "take lamp");
    // `turns: last` (the default) keeps the four-message layout.
    let last = load_str(&src.replace("  turns: all\n", ""), &dir.path().join("spec.yaml")).unwrap();
    let crate::Prompt::Chat(m) = last.render_game(&ctx, Some(("take lamp", 0.2)), crate::History::all(&turns)).unwrap()
    else {
        panic!("not chat")
    };
    assert_eq!(
        m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
        ["play", "a game: Taken.", "take lamp", "Taken. (0.2, step 2)"]
    );
}

#[test]
fn history_and_budget_errors() {
    // A budget with a template that shows the history but not how much of it was left out.
    let src = BASE.replace("  reflection: \"{{ error }}\"\n", "  reflection: \"{{ history }}\"\n  max_tokens: 10\n");
    assert_eq!(
        errors(&src),
        "spec.yaml:9:3: error: with `prompt.max_tokens`, old turns of the history can be left out, and no template says how many\n  help: show `history_omitted` in a template, e.g. `{% if history_omitted %}({{ history_omitted }} earlier turns left out){% endif %}`"
    );
    // Without the history in the state, a budget only bounds the length.
    assert_eq!(spec(&format!("{BASE}  max_tokens: 10\n")).prompt_max_tokens, Some(10));
    assert_eq!(
        errors(&format!("{BASE}  max_tokens: 0\n")),
        "spec.yaml:9:15: error: `prompt.max_tokens` must be the longest a state may be, in tokens (an integer >= 1), found 0"
    );
    assert_eq!(
        errors(&format!("{BASE}  turns: all\n")),
        "spec.yaml:9:3: error: `prompt.turns` belongs to format `chat`; format `completion` uses: format, template, reflection, max_tokens"
    );
}
