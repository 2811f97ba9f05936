//! Template checks for the [`Decoder`]: every template is rendered against a sample context
//! (real data when it loads), and a render error is placed at the variable inside the file.

use crate::data::{self, DatasetSpec};
use crate::diag::did_you_mean;
use crate::spec::Example;
use crate::template::{
    self, GameContext, History, TaskContext, Turn, ASSEMBLE_VARIABLES, GAME_STEP_VARIABLES, GAME_VARIABLES,
    HISTORY_VARIABLES, REFLECTION_VARIABLES, TASK_VARIABLES,
};
use crate::yaml::{Node, Pos, Style, Value};

use super::{Decoder, TemplateRole, DEFAULT_SKLEARN_ASSEMBLE};

impl Decoder {
    /// Render every template against a sample context: real data when it loads, else a made-up
    /// table of the paper's Balance Scale shape.
    pub(super) fn check_templates(
        &mut self,
        description: Option<&str>,
        name: Option<&str>,
        dataset: Option<&DatasetSpec>,
        examples: Option<&[Example]>,
    ) {
        let mut ctx = TaskContext {
            name: name.unwrap_or("sample").to_string(),
            description: description.unwrap_or("sample task").to_string(),
            n_train: 62,
            n_val: 63,
            n_features: 4,
            shape: template::python_shape(62, 4),
            feature_names: (0..4).map(|i| format!("x{i}")).collect(),
            n_classes: 3,
            class_names: ["a", "b", "c"].map(String::from).to_vec(),
            examples: examples.map(<[Example]>::to_vec).unwrap_or_default(),
        };
        if let Some(ds) = dataset {
            match data::load_for(ds, &self.base_dir) {
                Ok(data) => {
                    let split = data.split_for(ds, ds.seeds[0]);
                    ctx.n_train = split.x_train.len();
                    ctx.n_val = split.x_val.len();
                    ctx.n_features = split.feature_names.len();
                    ctx.shape = template::python_shape(ctx.n_train, ctx.n_features);
                    ctx.feature_names = split.feature_names.clone();
                    ctx.n_classes = split.n_classes();
                    ctx.class_names = split.class_names.clone();
                }
                Err(e) => {
                    let pos = self.source_pos.unwrap_or(Pos { line: 1, col: 1 });
                    self.error(pos, format!("cannot load the data set: {e}"));
                }
            }
        }
        let templates = std::mem::take(&mut self.templates);
        let sample_action = "from sklearn.svm import SVC\nmodel = SVC()\nmodel.fit(x_train, y_train)\nreturn model";
        let sample_program = crate::spec::assemble(DEFAULT_SKLEARN_ASSEMBLE, sample_action).unwrap_or_default();
        let task = minijinja::Value::from_serialize(&ctx);
        let game = minijinja::Value::from_serialize(GameContext {
            name: ctx.name.clone(),
            description: ctx.description.clone(),
            examples: ctx.examples.clone(),
            observation: "You are in a small room. Exits: north.".into(),
            step: 1,
        });
        // A history of two turns, one left out before them: templates that loop over it, index
        // it or test it are exercised.
        let turns = [
            Turn {
                step: 1,
                action: "go north".into(),
                reward: 0.0,
                error: String::new(),
                observation: "A hall.".into(),
            },
            Turn {
                step: 2,
                action: sample_action.into(),
                reward: -1.0,
                error: "AttributeError: predict_proba is not available".into(),
                observation: "You are in a small room. Exits: north.".into(),
            },
        ];
        let history = History::without_oldest(&turns, 1).variables();
        let (task, game) =
            (minijinja::context! { ..history.clone(), ..task }, minijinja::context! { ..history, ..game });
        for (field, node, role) in &templates {
            let (mut known, vars): (Vec<&str>, minijinja::Value) = match role {
                TemplateRole::Initial if self.game => (GAME_VARIABLES.to_vec(), game.clone()),
                TemplateRole::Reflection if self.game => (
                    GAME_VARIABLES.iter().chain(GAME_STEP_VARIABLES.iter()).copied().collect(),
                    minijinja::context! {
                        action => "go north",
                        program => "go north",
                        reward => 0.5,
                        ..game.clone()
                    },
                ),
                TemplateRole::Initial => (TASK_VARIABLES.to_vec(), task.clone()),
                TemplateRole::Reflection => (
                    TASK_VARIABLES.iter().chain(REFLECTION_VARIABLES.iter()).copied().collect(),
                    minijinja::context! {
                        action => sample_action,
                        error => "AttributeError: predict_proba is not available when probability=False",
                        program => &sample_program,
                        ..task.clone()
                    },
                ),
                TemplateRole::Assemble => (ASSEMBLE_VARIABLES.to_vec(), minijinja::Value::UNDEFINED),
            };
            if *role != TemplateRole::Assemble {
                known.extend(HISTORY_VARIABLES);
            }
            self.check_template(field, node, &known, vars, *role);
        }
    }

    pub(super) fn check_template(
        &mut self,
        field: &str,
        node: &Node,
        known: &[&str],
        vars: minijinja::Value,
        role: TemplateRole,
    ) {
        let Value::Scalar { text: source, .. } = &node.value else {
            return;
        };
        let env = template::environment();
        let globals: Vec<String> = env.globals().map(|(k, _)| k.to_string()).collect();
        let compiled = match env.template_from_str(source) {
            Ok(t) => t,
            Err(e) => {
                let pos = self.error_pos(node, source, &e);
                self.error(pos, format!("template syntax error in `{field}`: {}", template::describe(&e)));
                return;
            }
        };
        let used = compiled.undeclared_variables(false);
        let mut unknown: Vec<&String> =
            used.iter().filter(|v| !known.contains(&v.as_str()) && !globals.contains(v)).collect();
        unknown.sort();
        for var in &unknown {
            let pos = find_variable(source, var).map_or(node.pos, |(l, c)| self.file_pos(node, l, c));
            let help = did_you_mean(var, known.iter().copied())
                .unwrap_or_else(|| format!("available variables: {}", known.join(", ")));
            self.error_help(pos, format!("unknown template variable `{var}` in `{field}`"), Some(help));
        }
        if role == TemplateRole::Assemble && !used.contains("action") && !used.contains("raw_action") {
            self.error_help(
                node.pos,
                "`action.assemble` never uses `{{ action }}`, so the model's action would never run",
                Some(
                    "put `{{ action }}` where the action goes, e.g. the body of `def build_model(x_train, y_train):`"
                        .into(),
                ),
            );
        }
        if !unknown.is_empty() {
            return;
        }
        let vars = if role == TemplateRole::Assemble {
            minijinja::context! { action => "RandomForestClassifier()", raw_action => "RandomForestClassifier()" }
        } else {
            vars
        };
        if let Err(e) = compiled.render(vars) {
            let pos = self.error_pos(node, source, &e);
            self.error(pos, format!("`{field}` fails to render against a sample task: {}", template::describe(&e)));
        }
    }

    pub(super) fn error_pos(&self, node: &Node, source: &str, e: &minijinja::Error) -> Pos {
        if let Some(range) = e.range() {
            let (l, c) = line_col(source, range.start);
            return self.file_pos(node, l, c);
        }
        match e.line() {
            Some(l) => self.file_pos(node, l, 1),
            None => node.pos,
        }
    }

    /// Map a 1-based (line, column) inside a template to the spec file.
    pub(super) fn file_pos(&self, node: &Node, line: usize, col: usize) -> Pos {
        match &node.value {
            Value::Scalar { text, style: Style::Block } => {
                // The parser places a block scalar at its first non-blank content line, at the
                // block's indentation; leading blank lines are part of the text.
                let leading_blank = text.len() - text.trim_start_matches('\n').len();
                let first = node.pos.line.saturating_sub(leading_blank).max(1);
                Pos { line: first + line - 1, col: node.pos.col - 1 + col }
            }
            Value::Scalar { style, .. } if line == 1 => {
                let quote = usize::from(*style == Style::Quoted);
                Pos { line: node.pos.line, col: node.pos.col + quote + col - 1 }
            }
            _ => node.pos,
        }
    }
}

/// A node for a built-in template (no position in the file: diagnostics point at 1:1).
pub(super) fn synthetic(text: &str) -> Node {
    Node { pos: Pos { line: 1, col: 1 }, value: Value::Scalar { text: text.to_string(), style: Style::Quoted } }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where `name` is first used as a variable inside a `{{ }}` or `{% %}` tag.
pub(super) fn find_variable(source: &str, name: &str) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(open) = source[i..].find('{').map(|o| o + i) {
        let kind = source[open + 1..].chars().next();
        let close = match kind {
            Some('{') => "}}",
            Some('%') => "%}",
            _ => {
                i = open + 1;
                continue;
            }
        };
        let end = source[open + 2..].find(close).map_or(source.len(), |e| open + 2 + e);
        let tag = &source[open + 2..end];
        let mut from = 0;
        while let Some(at) = tag[from..].find(name).map(|a| a + from) {
            let before = tag[..at].chars().next_back();
            let after = tag[at + name.len()..].chars().next();
            let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
            if !ident(before) && !after.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                return Some(line_col(source, open + 2 + at));
            }
            from = at + name.len();
        }
        i = end;
    }
    None
}
