//! Rendering spec templates (prompts, reflections, program assembly) and model chat templates.
//!
//! Spec templates are Jinja (minijinja) with strict undefined variables, `trim_blocks` and
//! `lstrip_blocks` (so `{% for %}` lines leave no blank lines, as in Hugging Face chat templates)
//! and the trailing newline kept (a YAML `|` block's final newline is part of the prompt).

use crate::action;
use crate::spec::Example;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

/// The variables every prompt template (first state and reflection) can use.
pub const TASK_VARIABLES: [&str; 10] = [
    "name",
    "description",
    "n_train",
    "n_val",
    "n_features",
    "shape",
    "feature_names",
    "n_classes",
    "class_names",
    "examples",
];

/// The extra variables of reflection templates: the failed action, its error, and its program.
pub const REFLECTION_VARIABLES: [&str; 3] = ["action", "error", "program"];

/// The variables every prompt template of a game (`kind: wasm`) can use.
pub const GAME_VARIABLES: [&str; 5] = ["name", "description", "examples", "observation", "step"];

/// The extra variables of a game's reflection template (every state after the first): the
/// previous action, the text the game received for it, and the reward it earned.
pub const GAME_STEP_VARIABLES: [&str; 3] = ["action", "program", "reward"];

/// The variables of every prompt template (data tasks and games, first state and later ones):
/// `history`, the episode so far (a list of [`Turn`]s, oldest first, empty in the first state),
/// and `history_omitted`, how many older turns were left out to fit `prompt.max_tokens`.
pub const HISTORY_VARIABLES: [&str; 2] = ["history", "history_omitted"];

/// The variables of the assembly template: `action` (dedented, continuation lines indented to the
/// placeholder's line) and `raw_action` (exactly as extracted).
pub const ASSEMBLE_VARIABLES: [&str; 2] = ["action", "raw_action"];

/// The template variables describing one task instance (one data split).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskContext {
    /// The spec's `name`.
    pub name: String,
    /// The spec's `description` (the task text g).
    pub description: String,
    /// Training rows.
    pub n_train: usize,
    /// Validation rows.
    pub n_val: usize,
    /// Feature columns.
    pub n_features: usize,
    /// `x_train.shape` as Python prints it, e.g. `(62, 4)`.
    pub shape: String,
    /// Feature column names.
    pub feature_names: Vec<String>,
    /// Number of classes.
    pub n_classes: usize,
    /// Class labels.
    pub class_names: Vec<String>,
    /// The spec's worked examples (empty when the spec has none).
    pub examples: Vec<Example>,
}

/// The template variables of one game state (`kind: wasm`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GameContext {
    /// The spec's `name`.
    pub name: String,
    /// The spec's `description` (the task text g).
    pub description: String,
    /// The spec's worked examples.
    pub examples: Vec<Example>,
    /// The game's latest observation.
    pub observation: String,
    /// Steps taken in the episode before this state.
    pub step: u32,
}

/// One step of an episode, as prompt templates see it in `history`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Turn {
    /// Steps taken before this one (0 for the episode's first action).
    pub step: u32,
    /// The action cut out of the generation.
    pub action: String,
    /// The reward it earned.
    pub reward: f64,
    /// Data tasks: why the action failed (empty when it ran). Games: why the game failed, if it did.
    pub error: String,
    /// Games: what the game answered. Data tasks: empty.
    pub observation: String,
}

/// The episode so far, as a state shows it: the turns kept (oldest first) and how many turns
/// before them were left out to fit the spec's `prompt.max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct History<'a> {
    pub turns: &'a [Turn],
    pub omitted: usize,
    /// Games: the episode's first observation (what the opening message of a chat state with
    /// `turns: all` shows); empty for data tasks.
    pub first_observation: &'a str,
}

impl<'a> History<'a> {
    /// All of `turns`, none left out.
    pub fn all(turns: &'a [Turn]) -> History<'a> {
        History { turns, omitted: 0, first_observation: "" }
    }

    /// `turns` without the oldest `omitted` (at most all of them).
    pub fn without_oldest(turns: &'a [Turn], omitted: usize) -> History<'a> {
        let omitted = omitted.min(turns.len());
        History { turns: &turns[omitted..], omitted, first_observation: "" }
    }

    /// The same, for a game episode that began with `observation`.
    pub fn starting_with(self, observation: &'a str) -> History<'a> {
        History { first_observation: observation, ..self }
    }

    pub(crate) fn variables(&self) -> Value {
        minijinja::context! { history => self.turns, history_omitted => self.omitted }
    }
}

/// A prompt: plain text for completion, or chat messages for the model's chat template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Prompt {
    /// Text the model continues.
    Completion(String),
    /// Messages for the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    pub(crate) fn new(role: &str, content: String) -> ChatMessage {
        ChatMessage { role: role.to_string(), content }
    }
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    /// A template failed (only possible for data the load-time check did not cover).
    #[error("cannot render {what}: {message}")]
    Template { what: String, message: String },
    /// A chat prompt was turned into text without a chat template.
    #[error("a chat prompt needs the model's chat template, and none was given")]
    MissingChatTemplate,
}

impl Prompt {
    /// The exact text the model receives. Completion prompts are returned as they are; chat
    /// prompts go through `chat_template` with `add_generation_prompt = true`.
    pub fn to_text(&self, chat_template: Option<&ChatTemplate>) -> Result<String, RenderError> {
        match self {
            Prompt::Completion(text) => Ok(text.clone()),
            Prompt::Chat(messages) => chat_template.ok_or(RenderError::MissingChatTemplate)?.render(messages, true),
        }
    }

    /// Bytes of the prompt's text (chat: of the messages' contents, plus 16 per message for
    /// the chat template's markup). Byte-level BPE tokenizers (Llama 3, SmolLM2, GPT-2) make at
    /// most one token per byte, so for completion prompts this bounds the token count from
    /// above; it is what a state's length is measured in when no tokenizer is at hand.
    pub fn byte_len(&self) -> usize {
        match self {
            Prompt::Completion(text) => text.len(),
            Prompt::Chat(messages) => messages.iter().map(|m| m.content.len() + 16).sum(),
        }
    }
}

/// A model's chat template (Hugging Face Jinja), rendered the way `transformers`'
/// `apply_chat_template` does: `trim_blocks`, `lstrip_blocks`, loop controls, Python string
/// methods, `raise_exception`, and the variables `messages`, `add_generation_prompt`,
/// `bos_token` and `eos_token`.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const CHAT: &str = "chat_template";

impl ChatTemplate {
    /// Compile a chat template; fails on a Jinja syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, RenderError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(CHAT, source.to_string()).map_err(|e| render_error("the chat template", &e))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's answer
    /// begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, RenderError> {
        let template = self.env.get_template(CHAT).map_err(|e| render_error("the chat template", &e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| render_error("the chat template", &e))
    }
}

/// The environment spec templates render in.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("commented", |s: String| action::commented(&s));
    env.add_filter("dedent", |s: String| action::dedent(&s));
    env
}

/// Render one spec template against a context.
pub(crate) fn render(what: &str, source: &str, ctx: Value) -> Result<String, RenderError> {
    environment().render_str(source, ctx).map_err(|e| render_error(what, &e))
}

pub(crate) fn render_error(what: &str, e: &minijinja::Error) -> RenderError {
    RenderError::Template { what: what.to_string(), message: describe(e) }
}

/// A minijinja error as one line: the kind, then the detail.
pub(crate) fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// Python's repr of a 2-d shape.
pub(crate) fn python_shape(rows: usize, cols: usize) -> String {
    format!("({rows}, {cols})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_variables_match_the_context_fields() {
        let ctx = TaskContext {
            name: String::new(),
            description: String::new(),
            n_train: 0,
            n_val: 0,
            n_features: 0,
            shape: String::new(),
            feature_names: vec![],
            n_classes: 0,
            class_names: vec![],
            examples: vec![],
        };
        let json = serde_json::to_value(&ctx).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = TASK_VARIABLES.to_vec();
        expected.sort_unstable();
        assert_eq!(keys, expected);
    }

    #[test]
    fn strict_undefined_and_kept_trailing_newline() {
        let ctx = minijinja::context! { a => 1 };
        assert_eq!(render("t", "x={{ a }}\n", ctx.clone()).unwrap(), "x=1\n");
        let err = render("the prompt", "{{ b }}", ctx).unwrap_err();
        assert_eq!(err.to_string(), "cannot render the prompt: undefined value");
    }

    #[test]
    fn blocks_leave_no_blank_lines() {
        let ctx = minijinja::context! { xs => vec![1, 2] };
        assert_eq!(render("t", "{% for x in xs %}\n  {{ x }}\n{% endfor %}\nend\n", ctx).unwrap(), "  1\n  2\nend\n");
    }

    #[test]
    fn python_methods_and_filters() {
        let ctx = minijinja::context! { s => "  hi  ", code => "a\nb" };
        assert_eq!(render("t", "{{ s.strip() }}|{{ code | commented }}", ctx).unwrap(), "hi|# a\n# b");
    }

    #[test]
    fn python_shape_repr() {
        assert_eq!(python_shape(62, 4), "(62, 4)");
    }

    #[test]
    fn completion_prompt_text_is_itself() {
        assert_eq!(Prompt::Completion("abc".into()).to_text(None).unwrap(), "abc");
        assert_eq!(Prompt::Chat(vec![]).to_text(None).unwrap_err(), RenderError::MissingChatTemplate);
    }
}
