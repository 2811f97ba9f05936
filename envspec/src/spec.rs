//! The validated spec and what it does: template contexts, prompts, extraction and assembly.

use crate::action::{self, Extract};
use crate::data;
use crate::template::{self, ChatMessage, GameContext, History, Prompt, RenderError, TaskContext};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A validated environment spec: one language MDP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spec {
    /// The spec file as it was named when loaded.
    pub path: PathBuf,
    /// Short identifier (used in run output paths).
    pub name: String,
    /// The task text g, shown to the model through the templates.
    pub description: String,
    /// What an action is and how it is executed.
    pub kind: Kind,
    /// Data source and evaluation protocol. Relative data paths are already resolved against the
    /// spec's folder. A `kind: wasm` spec has no data: only `seeds` is used (the games' reset
    /// seeds, written as `game.seeds`); the rest holds the defaults and is never read.
    pub dataset: data::DatasetSpec,
    /// How states are shown to the model.
    pub prompt: PromptSpec,
    /// `prompt.max_tokens`: the longest a state may be, in tokens of the model's tokenizer. A
    /// state over it drops the oldest turns of its history first; one that does not fit even
    /// without history is an error.
    pub prompt_max_tokens: Option<usize>,
    /// How an action is cut out of the generation and turned into a program.
    pub action: ActionSpec,
    /// How a program is scored.
    pub reward: RewardSpec,
    /// Steps per episode (the paper: 5).
    pub max_steps: u32,
    /// Limits for executing one program.
    pub limits: ExecLimits,
    /// Worked examples the templates can show (few-shot); empty to switch them off.
    pub examples: Vec<Example>,
    /// Algorithm hyper-parameters this spec pins (all optional).
    pub training: TrainingOverrides,
}

/// What an action is and how it runs. New kinds are added as new variants (and new names in
/// `kind:`), so existing files keep their meaning.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Kind {
    /// The assembled program is Python defining `build_model(x_train, y_train)` that returns a
    /// fitted scikit-learn estimator with `predict_proba`.
    Sklearn,
    /// A text game: a WebAssembly component implementing `etpo:game/game` (`games/wit/game.wit`).
    /// The assembled action is the text the game receives; its observations are shown through
    /// the prompt templates (variable `observation`); its rewards are the environment's.
    Wasm(GameSpec),
}

/// The `game:` section of a `kind: wasm` spec.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GameSpec {
    /// The game's `.wasm` file (a component, or a core module built by wit-bindgen), resolved
    /// against the spec's folder.
    pub module: PathBuf,
    /// Fuel for one call of the game (about one unit per WebAssembly instruction).
    pub fuel: u64,
    /// The game's memory cap, MiB.
    pub memory_mb: u64,
    /// The longest observation accepted from the game, KiB.
    pub observation_kb: u64,
}

impl GameSpec {
    /// Defaults of the optional keys (ample for text games; a runaway game costs well under a
    /// second).
    pub const DEFAULT_FUEL: u64 = 100_000_000;
    pub const DEFAULT_MEMORY_MB: u64 = 64;
    pub const DEFAULT_OBSERVATION_KB: u64 = 16;
}

impl Kind {
    /// The game section of a `kind: wasm` spec.
    pub fn game(&self) -> Option<&GameSpec> {
        match self {
            Kind::Wasm(g) => Some(g),
            Kind::Sklearn => None,
        }
    }
}

/// How states are rendered.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptSpec {
    /// Plain text continued by the model (the paper's setting; base models).
    Completion {
        /// η(g): the first state.
        template: String,
        /// η(g, a, e): the state after a failed action.
        reflection: String,
    },
    /// Chat messages rendered with the model's chat template. The first state is
    /// `[system?, user]`; a later state is `[system?, user, assistant, reflection]` where
    /// `assistant` replays the last action and `reflection` is a user message with its error
    /// (games: the game's answer), or with `turns: all` one `assistant`, `reflection` pair per
    /// step of the episode's history.
    Chat {
        /// Which steps a later state replays as turns.
        turns: ChatTurns,
        /// Optional system message.
        system: Option<String>,
        /// The user message stating the task.
        user: String,
        /// The assistant turn replaying the failed action (reflection state only).
        assistant: String,
        /// The user message after the failure.
        reflection: String,
    },
}

/// Which steps a chat state replays (`prompt.turns:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTurns {
    /// The last step only: `[system?, user, assistant, reflection]`.
    #[default]
    Last,
    /// Every step of the history (within `prompt.max_tokens`), one `assistant`, `reflection`
    /// pair each, oldest first: the model sees the episode as a conversation.
    All,
}

impl ChatTurns {
    /// The names of `prompt.turns:`.
    pub const NAMES: &'static [(&'static str, ChatTurns)] = &[("last", ChatTurns::Last), ("all", ChatTurns::All)];
}

/// The prompt formats' spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    Completion,
    Chat,
}

impl PromptFormat {
    /// The names of `prompt.format:`.
    pub const NAMES: &'static [(&'static str, PromptFormat)] =
        &[("completion", PromptFormat::Completion), ("chat", PromptFormat::Chat)];
}

impl PromptSpec {
    /// Which format this is.
    pub fn format(&self) -> PromptFormat {
        match self {
            PromptSpec::Completion { .. } => PromptFormat::Completion,
            PromptSpec::Chat { .. } => PromptFormat::Chat,
        }
    }
}

/// How an action is taken from the model's text and made into a program.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionSpec {
    /// Extraction mode.
    pub extract: Extract,
    /// Stop sequences: generation stops at them, extraction cuts at them.
    pub stop: Vec<String>,
    /// Generation budget for one action.
    pub max_new_tokens: usize,
    /// Template turning the action into the program (uses `{{ action }}`).
    pub assemble: String,
}

/// How runnable programs are scored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardSpec {
    /// The score of a runnable program.
    pub metric: Metric,
    /// Multi-class averaging of ROC AUC.
    pub multiclass: Multiclass,
    /// Reward of an action whose program fails (the paper: -1.0).
    pub failure_reward: f64,
    /// Which splits one evaluation scores.
    pub evaluation: Evaluation,
}

/// The score of a runnable program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Area under the ROC curve on the validation rows.
    RocAuc,
}

impl Metric {
    /// The names of `reward.metric:`.
    pub const NAMES: &'static [(&'static str, Metric)] = &[("roc_auc", Metric::RocAuc)];
}

/// Multi-class ROC AUC averaging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Multiclass {
    /// Macro average over all class pairs (Hand & Till; the paper's reference code and CAAFE).
    Ovo,
    /// Macro average of one-vs-rest AUCs.
    Ovr,
}

impl Multiclass {
    /// The names of `reward.multiclass:`.
    pub const NAMES: &'static [(&'static str, Multiclass)] = &[("ovo", Multiclass::Ovo), ("ovr", Multiclass::Ovr)];
}

/// What one evaluation of a program scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evaluation {
    /// The seed's own train/validation split (the paper's text).
    SingleSplit,
    /// The mean over this many random splits (the paper's reference code uses 5).
    MeanOfSplits(u32),
}

/// Limits for one program execution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecLimits {
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// CPU seconds.
    pub cpu_s: f64,
    /// Memory, MiB.
    pub memory_mb: u64,
    /// Captured standard output and error, KiB.
    pub output_kb: u64,
    /// Processes and threads.
    pub max_processes: u64,
}

impl Default for ExecLimits {
    /// Enough for scikit-learn on small tables, small enough that a runaway program is cheap.
    fn default() -> Self {
        ExecLimits { wall_s: 30.0, cpu_s: 30.0, memory_mb: 2048, output_kb: 64, max_processes: 32 }
    }
}

/// A worked example: a task text and an action that solves it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    /// The example's task text.
    pub task: String,
    /// An action that solves it, in the form the model should write.
    pub action: String,
}

/// The algorithms of `etpo run --algo`, which a spec can pin with `training.algorithm`.
/// Names (CLI, spec, run folders): `etpo`, `ppo-kl`, `reflection` ([`Algorithm::NAMES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Entropy-regularized token-level policy optimization (the paper).
    Etpo,
    /// Action-level PPO with a KL penalty in the reward (the paper's baseline).
    PpoKl,
    /// No training: sampling with reflection states only (the paper's baseline).
    Reflection,
    /// Group-relative policy optimisation (DeepSeekMath), the usual LLM-RL baseline.
    Grpo,
}

impl Algorithm {
    /// The names of `--algo` and `training.algorithm:`.
    pub const NAMES: &'static [(&'static str, Algorithm)] = &[
        ("etpo", Algorithm::Etpo),
        ("ppo-kl", Algorithm::PpoKl),
        ("grpo", Algorithm::Grpo),
        ("reflection", Algorithm::Reflection),
    ];

    /// The algorithm `--algo` and `training.algorithm` call `name`.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::NAMES.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }

    /// Its name, as `--algo` and `training.algorithm` spell it.
    pub fn name(self) -> &'static str {
        Algorithm::NAMES.iter().find(|(_, a)| *a == self).map_or("reflection", |(n, _)| n)
    }

    /// Whether it trains the model (ETPO, PPO-KL) or only samples from it (Reflection).
    pub fn trains(self) -> bool {
        matches!(self, Algorithm::Etpo | Algorithm::PpoKl | Algorithm::Grpo)
    }
}

/// Optional hyper-parameters; `None` leaves the trainer's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrainingOverrides {
    /// The algorithm `etpo run` uses for this spec when `--algo` is not given.
    pub algorithm: Option<Algorithm>,
    /// Environment steps (actions) in total per seed, k in the paper.
    pub steps: Option<u64>,
    /// Actions per update.
    pub batch_size: Option<usize>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Entropy (KL) regularization weight β.
    pub beta: Option<f64>,
    /// Discount γ, in [0, 1].
    pub gamma: Option<f64>,
    /// Target network averaging weight, in [0, 1].
    pub polyak: Option<f64>,
    /// Sampling temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens.
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f64>,
    /// LoRA rank.
    pub lora_rank: Option<usize>,
    /// LoRA scaling numerator (the update is scaled by alpha / rank).
    pub lora_alpha: Option<f64>,
    /// Gradient passes over each batch.
    pub epochs: Option<usize>,
    /// Gradient norm clip.
    pub grad_clip: Option<f64>,
    /// PPO ratio clip ε.
    pub clip_eps: Option<f64>,
}

impl TrainingOverrides {
    /// Each key of `self`, else `fallback`'s: how a command line's values go over a spec's
    /// (`etpo run` resolves the trainer's hyper-parameters this way, in one place).
    pub fn or(&self, fallback: &TrainingOverrides) -> TrainingOverrides {
        TrainingOverrides {
            algorithm: self.algorithm.or(fallback.algorithm),
            steps: self.steps.or(fallback.steps),
            batch_size: self.batch_size.or(fallback.batch_size),
            lr: self.lr.or(fallback.lr),
            beta: self.beta.or(fallback.beta),
            gamma: self.gamma.or(fallback.gamma),
            polyak: self.polyak.or(fallback.polyak),
            temperature: self.temperature.or(fallback.temperature),
            top_k: self.top_k.or(fallback.top_k),
            top_p: self.top_p.or(fallback.top_p),
            lora_rank: self.lora_rank.or(fallback.lora_rank),
            lora_alpha: self.lora_alpha.or(fallback.lora_alpha),
            epochs: self.epochs.or(fallback.epochs),
            grad_clip: self.grad_clip.or(fallback.grad_clip),
            clip_eps: self.clip_eps.or(fallback.clip_eps),
        }
    }
}

impl Spec {
    /// The folder relative paths of this spec resolve against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The template variables for one split of the data.
    pub fn task_context(&self, split: &data::Split) -> TaskContext {
        let n_features = split.feature_names.len();
        TaskContext {
            name: self.name.clone(),
            description: self.description.clone(),
            n_train: split.x_train.len(),
            n_val: split.x_val.len(),
            n_features,
            shape: template::python_shape(split.x_train.len(), n_features),
            feature_names: split.feature_names.clone(),
            n_classes: split.n_classes(),
            class_names: split.class_names.clone(),
            examples: self.examples.clone(),
        }
    }

    /// The first state η(g).
    pub fn render_initial(&self, ctx: &TaskContext) -> Result<Prompt, RenderError> {
        self.render_first(
            minijinja::context! { ..History::default().variables(), ..minijinja::Value::from_serialize(ctx) },
        )
    }

    /// The state η(g, a, e) after the action `action` failed with `error`; `history` is the
    /// episode so far (its last turn is this action), shown by templates that use `history`
    /// and, with chat `turns: all`, as one turn per step.
    pub fn render_reflection(
        &self,
        ctx: &TaskContext,
        action: &str,
        error: &str,
        history: History<'_>,
    ) -> Result<Prompt, RenderError> {
        let task = minijinja::context! { ..history.variables(), ..minijinja::Value::from_serialize(ctx) };
        let turn_vars = |action: &str, error: &str| {
            // A failed assembly cannot happen for a checked spec; show the raw action then.
            let program = self.assemble_program(action).unwrap_or_else(|_| action.to_string());
            minijinja::context! { action => action, error => error, program => program, ..task.clone() }
        };
        let turns = history.turns.iter().map(|t| turn_vars(&t.action, &t.error)).collect();
        self.render_next(turn_vars(action, error), turns, task.clone())
    }

    /// The template variables of a game state (`kind: wasm`): the game's latest `observation`
    /// and the number of steps taken.
    pub fn game_context(&self, observation: &str, step: u32) -> GameContext {
        GameContext {
            name: self.name.clone(),
            description: self.description.clone(),
            examples: self.examples.clone(),
            observation: observation.to_string(),
            step,
        }
    }

    /// A game state: the prompt template for the first state (`last` is `None`), else the
    /// reflection template with the previous `action`, the text the game received (`program`)
    /// and its `reward`, so one game state after another is rendered like η(g, a, e).
    ///
    /// `history` is the episode so far (its last turn is `last`); with chat `turns: all` each of
    /// its turns is rendered with the observation and step it had.
    pub fn render_game(
        &self,
        ctx: &GameContext,
        last: Option<(&str, f64)>,
        history: History<'_>,
    ) -> Result<Prompt, RenderError> {
        let game_vars =
            |ctx: &GameContext| minijinja::context! { ..history.variables(), ..minijinja::Value::from_serialize(ctx) };
        let Some((action, reward)) = last else {
            return self.render_first(game_vars(ctx));
        };
        let turn_vars = |ctx: &GameContext, action: &str, reward: f64| {
            let program = self.assemble_program(action).unwrap_or_else(|_| action.to_string());
            minijinja::context! { action => action, program => program, reward => reward, ..game_vars(ctx) }
        };
        let turns = history
            .turns
            .iter()
            .map(|t| {
                let at = GameContext { observation: t.observation.clone(), step: t.step + 1, ..ctx.clone() };
                turn_vars(&at, &t.action, t.reward)
            })
            .collect();
        let first = GameContext { step: 0, observation: history.first_observation.to_string(), ..ctx.clone() };
        self.render_next(turn_vars(ctx, action, reward), turns, game_vars(&first))
    }

    fn render_first(&self, vars: minijinja::Value) -> Result<Prompt, RenderError> {
        match &self.prompt {
            PromptSpec::Completion { template, .. } => {
                Ok(Prompt::Completion(template::render("prompt.template", template, vars)?))
            }
            PromptSpec::Chat { system, user, .. } => {
                let mut messages = Vec::with_capacity(2);
                if let Some(system) = system {
                    messages.push(ChatMessage::new("system", template::render("prompt.system", system, vars.clone())?));
                }
                messages.push(ChatMessage::new("user", template::render("prompt.user", user, vars)?));
                Ok(Prompt::Chat(messages))
            }
        }
    }

    /// A state after the first: `last` holds the variables of the latest step; with chat
    /// `turns: all`, `turns` holds those of every step kept in the history (oldest first) and
    /// `first` those the opening user message is rendered with.
    fn render_next(
        &self,
        last: minijinja::Value,
        turns: Vec<minijinja::Value>,
        first: minijinja::Value,
    ) -> Result<Prompt, RenderError> {
        match &self.prompt {
            PromptSpec::Completion { reflection, .. } => {
                Ok(Prompt::Completion(template::render("prompt.reflection", reflection, last)?))
            }
            PromptSpec::Chat { turns: mode, system, user, assistant, reflection } => {
                let (opening, replayed) = match mode {
                    ChatTurns::Last => (last.clone(), vec![last]),
                    ChatTurns::All => (first, turns),
                };
                let mut messages = Vec::with_capacity(2 + 2 * replayed.len());
                if let Some(system) = system {
                    messages
                        .push(ChatMessage::new("system", template::render("prompt.system", system, opening.clone())?));
                }
                messages.push(ChatMessage::new("user", template::render("prompt.user", user, opening)?));
                for vars in replayed {
                    let said = template::render("prompt.assistant", assistant, vars.clone())?;
                    messages.push(ChatMessage::new("assistant", said));
                    messages.push(ChatMessage::new("user", template::render("prompt.reflection", reflection, vars)?));
                }
                Ok(Prompt::Chat(messages))
            }
        }
    }

    /// Cut the action out of the model's raw text (see [`Extract`]).
    pub fn extract_action(&self, generation: &str) -> String {
        action::extract(generation, self.action.extract, &self.action.stop)
    }

    /// Whether the spec holds out a test part (`dataset.test_fraction` above 0) on which a
    /// run's best action gets its honest score; a game has none.
    pub fn holds_out_a_test_part(&self) -> bool {
        self.kind.game().is_none() && self.dataset.test_fraction > 0.0
    }

    /// The program to execute for `action`: the assembly template with `{{ action }}` dedented and
    /// its continuation lines indented like the placeholder's line (so a function body lands in
    /// the function), and `{{ raw_action }}` exactly as given.
    pub fn assemble_program(&self, action: &str) -> Result<String, RenderError> {
        assemble(&self.action.assemble, action)
    }
}

pub(crate) fn assemble(template_source: &str, action: &str) -> Result<String, RenderError> {
    let indent = action::placeholder_indent(template_source);
    let body = action::dedent(action);
    let body = action::indent_continuation(body.trim_end(), &indent);
    let vars = minijinja::context! { action => body, raw_action => action };
    template::render("action.assemble", template_source, vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "import numpy as np\ndef build_model(x_train, y_train):\n    {{ action }}\n";

    #[test]
    fn assemble_body_action_dedents_and_indents() {
        let action = "    from sklearn.svm import SVC\n\n    model = SVC(probability=True)\n    model.fit(x_train, y_train)\n    return model\n\n";
        assert_eq!(
            assemble(BODY, action).unwrap(),
            "import numpy as np\ndef build_model(x_train, y_train):\n    from sklearn.svm import SVC\n\n    model = SVC(probability=True)\n    model.fit(x_train, y_train)\n    return model\n"
        );
        // The same body written without indentation lands in the same place.
        let flat =
            "from sklearn.svm import SVC\n\nmodel = SVC(probability=True)\nmodel.fit(x_train, y_train)\nreturn model";
        assert_eq!(assemble(BODY, flat).unwrap(), assemble(BODY, action).unwrap());
    }

    #[test]
    fn assemble_expression_action() {
        let t = "from sklearn.ensemble import *\n\ndef build_model(x_train, y_train):\n    model = {{ action }}\n    model.fit(x_train, y_train)\n    return model\n";
        assert_eq!(
            assemble(t, " RandomForestClassifier(n_estimators=50)").unwrap(),
            "from sklearn.ensemble import *\n\ndef build_model(x_train, y_train):\n    model = RandomForestClassifier(n_estimators=50)\n    model.fit(x_train, y_train)\n    return model\n"
        );
        // A multi-line expression keeps its relative indentation inside the brackets.
        assert_eq!(
            assemble(t, "make_pipeline(\n    StandardScaler(),\n    SVC())").unwrap(),
            "from sklearn.ensemble import *\n\ndef build_model(x_train, y_train):\n    model = make_pipeline(\n        StandardScaler(),\n        SVC())\n    model.fit(x_train, y_train)\n    return model\n"
        );
    }

    #[test]
    fn assemble_module_action() {
        let module = "  import numpy as np\n  def build_model(x_train, y_train):\n      return None\n";
        assert_eq!(
            assemble("{{ action }}\n", module).unwrap(),
            "import numpy as np\ndef build_model(x_train, y_train):\n    return None\n"
        );
    }

    #[test]
    fn assemble_raw_action_is_untouched() {
        assert_eq!(assemble("{{ raw_action }}|{{ action }}", "  a\n  b").unwrap(), "  a\n  b|a\nb");
    }

    #[test]
    fn assemble_statement_from_a_fenced_chat_answer() {
        let t = "import numpy as np\n\ndef build_model(x_train, y_train):\n    {{ action }}\n";
        let answer = "Sure:\n```python\nfrom sklearn.tree import DecisionTreeClassifier\nreturn DecisionTreeClassifier().fit(x_train, y_train)\n```\nDone.";
        let action = action::extract(answer, Extract::Fenced, &[]);
        assert_eq!(
            assemble(t, &action).unwrap(),
            "import numpy as np\n\ndef build_model(x_train, y_train):\n    from sklearn.tree import DecisionTreeClassifier\n    return DecisionTreeClassifier().fit(x_train, y_train)\n"
        );
    }

    fn shipped(name: &str) -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../envs").join(name);
        crate::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_shipped_data_specs_hold_out_a_test_part_and_the_papers_and_games_do_not() {
        for name in ["balance_scale.yaml", "breast_w.yaml", "diabetes.yaml", "tic_tac_toe.yaml"] {
            assert!(shipped(name).holds_out_a_test_part(), "{name}");
        }
        assert!(!shipped("paper/balance_scale.yaml").holds_out_a_test_part());
        let mut game = shipped("games/guess.yaml");
        game.dataset.test_fraction = 0.2;
        assert!(!game.holds_out_a_test_part(), "a game has no rows to hold out");
    }

    fn first_split(spec: &Spec) -> data::Split {
        let ds = &spec.dataset;
        let data = data::load(&ds.source, spec.base_dir()).unwrap();
        data.split(ds.seeds[0], ds.max_samples, ds.train_fraction)
    }

    /// The paper's Figure 8 prompt (Balance Scale, x_train (62, 4)), Figure 6's layout.
    #[test]
    fn paper_first_state_is_figure_8() {
        let spec = shipped("paper/balance_scale.yaml");
        let ctx = spec.task_context(&first_split(&spec));
        assert_eq!(ctx.shape, "(62, 4)");
        let expected = concat!(
            "\"\"\"Classification with a Balance Scale Weight & Distance Prediction Dataset\"\"\"\n",
            "import numpy as np\n",
            "def build_model(x_train: np.ndarray, y_train: np.ndarray):\n",
            "    \"\"\"Import modules, return a scikit model trained with x_train in shape (62, 4) and y_train.\"\"\"\n",
        );
        assert_eq!(spec.render_initial(&ctx).unwrap(), Prompt::Completion(expected.to_string()));
    }

    /// The paper's Figure 7 layout: the error, the failed function commented out, a fresh header.
    #[test]
    fn paper_reflection_is_figure_7() {
        let spec = shipped("paper/balance_scale.yaml");
        let ctx = spec.task_context(&first_split(&spec));
        let generation = "    from sklearn.svm import SVC\n    model = SVC(C=100, kernel='rbf')\n    model.fit(x_train, y_train)\n    return model\n\ndef main():\n";
        let action = spec.extract_action(generation);
        let error = "predict_proba is not available when probability=False";
        let expected = concat!(
            "\"\"\"Classification with a Balance Scale Weight & Distance Prediction Dataset\"\"\"\n",
            "import numpy as np\n",
            "\"\"\"An error was reported while executing this function: predict_proba is not available when probability=False. Please fix it.\"\"\"\n",
            "# def build_model(x_train: np.ndarray, y_train: np.ndarray):\n",
            "#     \"\"\"Import modules, return a scikit model trained with x_train in shape (62, 4) and y_train.\"\"\"\n",
            "#     from sklearn.svm import SVC\n",
            "#     model = SVC(C=100, kernel='rbf')\n",
            "#     model.fit(x_train, y_train)\n",
            "#     return model\n",
            "def build_model(x_train: np.ndarray, y_train: np.ndarray):\n",
            "    \"\"\"Fix the error in the previous function. \"\"\"\n",
        );
        assert_eq!(
            spec.render_reflection(&ctx, &action, error, Default::default()).unwrap(),
            Prompt::Completion(expected.to_string())
        );
        // The program that ran is the header with the body.
        assert_eq!(
            spec.assemble_program(&action).unwrap(),
            "import numpy as np\ndef build_model(x_train: np.ndarray, y_train: np.ndarray):\n    from sklearn.svm import SVC\n    model = SVC(C=100, kernel='rbf')\n    model.fit(x_train, y_train)\n    return model\n"
        );
    }

    #[test]
    fn shaped_default_spec_ends_at_model_and_assembles_an_expression() {
        let spec = shipped("balance_scale.yaml");
        let ctx = spec.task_context(&first_split(&spec));
        let Prompt::Completion(text) = spec.render_initial(&ctx).unwrap() else { panic!("not completion") };
        assert!(text.ends_with("\n# x_train has shape (62, 4); features: left-weight, left-distance, right-weight, right-distance; 3 classes: L, B, R\nmodel ="), "{text}");
        assert!(text.contains("model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))\n"));
        let action = spec.extract_action(" RandomForestClassifier(n_estimators=200)\n\n# Classification with");
        assert_eq!(action, " RandomForestClassifier(n_estimators=200)");
        let program = spec.assemble_program(&action).unwrap();
        assert!(
            program
                .contains("\n    model = RandomForestClassifier(n_estimators=200)\n    model.fit(x_train, y_train)\n"),
            "{program}"
        );
        let Prompt::Completion(refl) =
            spec.render_reflection(&ctx, &action, "ValueError: bad\nmore", Default::default()).unwrap()
        else {
            panic!()
        };
        // The error's last line comes first; the state then ends exactly like the first one.
        assert!(
            refl.contains("make_pipeline.\n# A previous classifier for the last task failed with: more\n"),
            "{refl}"
        );
        assert!(refl.ends_with("\n# x_train has shape (62, 4); features: left-weight, left-distance, right-weight, right-distance; 3 classes: L, B, R\nmodel ="), "{refl}");
        assert!(!refl.contains("RandomForestClassifier(n_estimators=200)"), "the failed line is not shown: {refl}");
    }

    #[test]
    fn the_first_block_wins_key_by_key() {
        let cli = TrainingOverrides { lr: Some(1e-3), beta: Some(0.2), ..Default::default() };
        let spec = TrainingOverrides {
            lr: Some(3e-4),
            gamma: Some(0.9),
            algorithm: Some(Algorithm::Etpo),
            ..Default::default()
        };
        let t = cli.or(&spec);
        assert_eq!(
            (t.lr, t.beta, t.gamma, t.algorithm, t.polyak),
            (Some(1e-3), Some(0.2), Some(0.9), Some(Algorithm::Etpo), None)
        );
    }
}
