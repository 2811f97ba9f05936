//! YAML tree -> [`Spec`], collecting every problem of the file with its position.

use crate::action::Extract;
use crate::data::{self, DataSource, DatasetSpec};
use crate::diag::{did_you_mean, Diagnostic, SpecError};
use crate::spec::{
    ActionSpec, Algorithm, Evaluation, Example, ExecLimits, GameSpec, Kind, Metric, Multiclass, PromptFormat,
    PromptSpec, RewardSpec, Spec, TrainingOverrides,
};
use crate::template::{
    self, GameContext, TaskContext, ASSEMBLE_VARIABLES, GAME_STEP_VARIABLES, GAME_VARIABLES, REFLECTION_VARIABLES,
    TASK_VARIABLES,
};
use crate::yaml::{self, Node, Pos, Style, Typed, Value};
use std::path::{Path, PathBuf};

/// The keys each section accepts (also the JSON Schema's properties; a test keeps them in sync).
pub mod keys {
    pub const TOP: &[&str] = &[
        "name",
        "description",
        "kind",
        "dataset",
        "game",
        "prompt",
        "examples",
        "action",
        "reward",
        "max_steps",
        "limits",
        "training",
    ];
    pub const DATASET: &[&str] = &["source", "train_fraction", "seeds", "max_samples"];
    pub const GAME: &[&str] = &["module", "seeds", "fuel", "memory_mb", "observation_kb"];
    pub const SOURCE: &[&str] = &["builtin", "csv", "arff", "target"];
    pub const PROMPT: &[&str] = &["format", "template", "reflection", "system", "user", "assistant"];
    pub const PROMPT_COMPLETION: &[&str] = &["format", "template", "reflection"];
    pub const PROMPT_CHAT: &[&str] = &["format", "system", "user", "assistant", "reflection"];
    pub const EXAMPLE: &[&str] = &["task", "action"];
    pub const ACTION: &[&str] = &["extract", "stop", "max_new_tokens", "assemble"];
    pub const REWARD: &[&str] = &["metric", "multiclass", "failure_reward", "evaluation"];
    pub const EVALUATION: &[&str] = &["mean_of_splits"];
    pub const LIMITS: &[&str] = &["wall_s", "cpu_s", "memory_mb", "output_kb", "max_processes"];
    pub const TRAINING: &[&str] = &[
        "algorithm",
        "steps",
        "batch_size",
        "lr",
        "beta",
        "gamma",
        "polyak",
        "temperature",
        "top_k",
        "top_p",
        "lora_rank",
        "lora_alpha",
        "epochs",
        "grad_clip",
        "clip_eps",
    ];
}

/// What `kind:` names (the variants of [`Kind`] without their sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindName {
    Sklearn,
    Wasm,
}

/// The names of `kind:`.
pub const KINDS: &[(&str, KindName)] = &[("sklearn", KindName::Sklearn), ("wasm", KindName::Wasm)];
/// The names of `prompt.format:`.
pub const FORMATS: &[(&str, PromptFormat)] = &[("completion", PromptFormat::Completion), ("chat", PromptFormat::Chat)];
/// The names of `reward.multiclass:`.
pub const MULTICLASS: &[(&str, Multiclass)] = &[("ovo", Multiclass::Ovo), ("ovr", Multiclass::Ovr)];
/// The names of `reward.metric:`.
pub const METRICS: &[(&str, Metric)] = &[("roc_auc", Metric::RocAuc)];
/// The names of `training.algorithm:`.
pub const ALGORITHMS: &[(&str, Algorithm)] =
    &[("etpo", Algorithm::Etpo), ("ppo-kl", Algorithm::PpoKl), ("reflection", Algorithm::Reflection)];

/// The default assembly for `kind: sklearn`: the action is the body of the paper's `build_model`.
pub const DEFAULT_SKLEARN_ASSEMBLE: &str =
    "import numpy as np\n\n\ndef build_model(x_train: np.ndarray, y_train: np.ndarray):\n    {{ action }}\n";

/// The default chat `assistant` message replaying a failed action.
pub const DEFAULT_CHAT_ASSISTANT: &str = "```python\n{{ action }}\n```";

/// The default assembly for `kind: wasm`: the game receives the action itself.
pub const DEFAULT_GAME_ASSEMBLE: &str = "{{ action }}";

/// The default number of new tokens per action.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// The default number of new tokens per action of a game (one line).
pub const DEFAULT_GAME_MAX_NEW_TOKENS: usize = 32;

/// The default `max_steps` (the paper's 5).
pub const DEFAULT_MAX_STEPS: u32 = 5;

/// Parse and validate a spec's text; `path` names the file in diagnostics and its folder
/// anchors relative paths.
pub fn load_str(source: &str, path: &Path) -> Result<Spec, SpecError> {
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut d = Decoder { diags: Vec::new(), base_dir, templates: Vec::new(), source_pos: None, game: false };
    let spec = match yaml::parse(source) {
        Err(e) => {
            d.diags.push(Diagnostic::at(e.pos, e.message));
            None
        }
        Ok((root, duplicates)) => {
            for e in duplicates {
                d.diags.push(Diagnostic::at(e.pos, e.message));
            }
            match root {
                None => {
                    d.error(Pos { line: 1, col: 1 }, "the spec file is empty; expected a mapping with at least `name`, `description`, `dataset` and `prompt`");
                    None
                }
                Some(root) => d.spec(&root, path),
            }
        }
    };
    match spec {
        Some(spec) if d.diags.is_empty() => Ok(spec),
        _ => {
            d.diags.sort_by_key(|x| x.pos);
            Err(SpecError { file: path.to_path_buf(), diagnostics: d.diags })
        }
    }
}

/// What a template renders to, which decides its variables.
#[derive(Clone, Copy, PartialEq)]
enum TemplateRole {
    Initial,
    Reflection,
    Assemble,
}

struct Decoder {
    diags: Vec<Diagnostic>,
    base_dir: PathBuf,
    /// Templates to check once the sample context is known: (path, node, role).
    templates: Vec<(String, Node, TemplateRole)>,
    /// Where `dataset.source` is written, for data loading errors.
    source_pos: Option<Pos>,
    /// The spec is `kind: wasm` (decides defaults and template variables).
    game: bool,
}

/// A mapping section: its pairs and where it was introduced.
struct Section<'n> {
    path: String,
    pos: Pos,
    pairs: &'n [(Node, Node)],
}

impl<'n> Section<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.pairs.iter().find(|(k, _)| key_text(k) == Some(key)).map(|(_, v)| v)
    }

    /// The value, unless missing or null (`key:` with nothing, `~`).
    fn opt(&self, key: &str) -> Option<&'n Node> {
        self.get(key).filter(|v| !v.is_null())
    }

    fn key_pos(&self, key: &str) -> Option<Pos> {
        self.pairs.iter().find(|(k, _)| key_text(k) == Some(key)).map(|(k, _)| k.pos)
    }

    fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

fn key_text(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, .. } => text.clone(),
        _ => node.describe().to_string(),
    }
}

impl Decoder {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic::at(pos, message));
    }

    fn error_help(&mut self, pos: Pos, message: impl Into<String>, help: Option<String>) {
        self.diags.push(Diagnostic::at(pos, message).with_help(help));
    }

    /// Check that `node` is a mapping with only `allowed` keys.
    fn section<'n>(&mut self, node: &'n Node, path: &str, pos: Pos, allowed: &[&str]) -> Option<Section<'n>> {
        let Value::Map(pairs) = &node.value else {
            let what = if path.is_empty() { "the spec".to_string() } else { format!("`{path}`") };
            self.error(
                node.pos,
                format!("{what} must be a mapping (keys: {}), found {}", allowed.join(", "), node.describe()),
            );
            return None;
        };
        for (key, _) in pairs {
            match key_text(key) {
                Some(k) if allowed.contains(&k) => {}
                Some(k) => {
                    let place = if path.is_empty() { "at the top level".to_string() } else { format!("in `{path}`") };
                    self.error_help(
                        key.pos,
                        format!("unknown key `{k}` {place}; expected one of: {}", allowed.join(", ")),
                        did_you_mean(k, allowed.iter().copied()),
                    );
                }
                None => self.error(key.pos, format!("keys must be plain names, found {}", key.describe())),
            }
        }
        Some(Section { path: path.to_string(), pos, pairs })
    }

    fn required<'n>(&mut self, sec: &Section<'n>, key: &str, what: &str) -> Option<&'n Node> {
        let node = sec.get(key);
        if node.is_none() {
            let place = if sec.path.is_empty() { "the spec".to_string() } else { format!("`{}`", sec.path) };
            self.error(sec.pos, format!("{place} is missing the required key `{key}` ({what})"));
        }
        node
    }

    fn string(&mut self, node: &Node, field: &str) -> Option<String> {
        match node.typed() {
            Some(Typed::Null) | None => {
                self.error(node.pos, format!("`{field}` must be a string, found {}", node.describe()));
                None
            }
            Some(_) => Some(scalar_text(node)),
        }
    }

    fn number(&mut self, node: &Node, field: &str) -> Option<f64> {
        match node.typed() {
            Some(Typed::Int(v)) => Some(v as f64),
            Some(Typed::Float(v)) if v.is_finite() => Some(v),
            _ => {
                let found = if matches!(node.value, Value::Scalar { .. }) {
                    format!("{} `{}`", node.describe(), scalar_text(node))
                } else {
                    node.describe().to_string()
                };
                self.error(node.pos, format!("`{field}` must be a number, found {found}"));
                None
            }
        }
    }

    fn integer(&mut self, node: &Node, field: &str) -> Option<i128> {
        match node.typed() {
            Some(Typed::Int(v)) => Some(v),
            _ => {
                let found = if matches!(node.value, Value::Scalar { .. }) {
                    format!("{} `{}`", node.describe(), scalar_text(node))
                } else {
                    node.describe().to_string()
                };
                self.error(node.pos, format!("`{field}` must be an integer, found {found}"));
                None
            }
        }
    }

    /// An integer `>= min` that fits in u64.
    fn int_at_least(&mut self, node: &Node, field: &str, min: u64, meaning: &str) -> Option<u64> {
        let v = self.integer(node, field)?;
        if v < min as i128 || v > u64::MAX as i128 {
            self.error(node.pos, format!("`{field}` must be {meaning} (an integer >= {min}), found {v}"));
            return None;
        }
        Some(v as u64)
    }

    /// A number satisfying `ok`, described by `meaning` when it does not.
    fn float_where(&mut self, node: &Node, field: &str, ok: fn(f64) -> bool, meaning: &str) -> Option<f64> {
        let v = self.number(node, field)?;
        if !ok(v) {
            self.error(node.pos, format!("`{field}` must be {meaning}, found {}", scalar_text(node)));
            return None;
        }
        Some(v)
    }

    fn choice<T: Clone>(&mut self, node: &Node, field: &str, options: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, field)?;
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == text) {
            return Some(v.clone());
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.error_help(
            node.pos,
            format!("unknown value `{text}` for `{field}`; expected one of: {}", names.join(", ")),
            did_you_mean(&text, names.iter().copied()),
        );
        None
    }

    fn spec(&mut self, root: &Node, path: &Path) -> Option<Spec> {
        let top = self.section(root, "", Pos { line: 1, col: 1 }, keys::TOP)?;
        let name =
            self.required(&top, "name", "a short identifier for this environment").and_then(|n| self.string(n, "name"));
        if let (Some(name), Some(node)) = (&name, top.get("name")) {
            let ok =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !ok {
                self.error(node.pos, format!("`name` must be a non-empty identifier of letters, digits, `_`, `-` or `.` (it names output folders), found `{name}`"));
            }
        }
        let description = self
            .required(&top, "description", "the task text g shown to the model")
            .and_then(|n| self.string(n, "description"));
        let kind_name = match top.opt("kind") {
            None => Some(KindName::Sklearn),
            Some(node) => self.choice(node, "kind", KINDS),
        };
        self.game = kind_name == Some(KindName::Wasm);
        let (kind, dataset) = if self.game {
            self.not_for_games(&top);
            let game = self
                .required(&top, "game", "the game: `module: FILE.wasm`")
                .and_then(|n| self.game_section(n, top.key_pos("game")));
            match game {
                Some((game, seeds)) => (Some(Kind::Wasm(game)), Some(DatasetSpec { seeds, ..DatasetSpec::default() })),
                None => (None, None),
            }
        } else {
            if let Some(pos) = top.key_pos("game") {
                self.error(pos, "`game` applies to `kind: wasm` specs; add `kind: wasm` or remove this section");
            }
            let dataset = self
                .required(&top, "dataset", "where the data come from")
                .and_then(|n| self.dataset(n, top.key_pos("dataset")));
            (kind_name.map(|_| Kind::Sklearn), dataset)
        };
        let examples = match top.opt("examples") {
            None => Some(Vec::new()),
            Some(node) => self.examples(node),
        };
        let format = self.prompt_format(&top);
        let action = self.action(&top, format);
        let prompt = self
            .required(&top, "prompt", "the templates of the states")
            .and_then(|n| self.prompt(n, top.key_pos("prompt"), format));
        let reward = self.reward(&top);
        let max_steps = match top.opt("max_steps") {
            None => Some(DEFAULT_MAX_STEPS),
            Some(node) => self.int_at_least(node, "max_steps", 1, "the number of steps per episode").and_then(|v| {
                match u32::try_from(v) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.error(node.pos, format!("`max_steps` must be at most {}, found {v}", u32::MAX));
                        None
                    }
                }
            }),
        };
        let limits = self.limits(&top);
        let training = self.training(&top);

        self.check_templates(
            description.as_deref(),
            name.as_deref(),
            if self.game { None } else { dataset.as_ref() },
            examples.as_deref(),
        );

        Some(Spec {
            path: path.to_path_buf(),
            name: name?,
            description: description?,
            kind: kind?,
            dataset: dataset?,
            prompt: prompt?,
            action: action?,
            reward: reward?,
            max_steps: max_steps?,
            limits: limits?,
            examples: examples?,
            training: training?,
        })
    }

    fn dataset(&mut self, node: &Node, pos: Option<Pos>) -> Option<DatasetSpec> {
        let sec = self.section(node, "dataset", pos.unwrap_or(node.pos), keys::DATASET)?;
        let defaults = DatasetSpec::default();
        let source =
            self.required(&sec, "source", "`builtin: NAME`, or `csv: PATH` / `arff: PATH` with `target: COLUMN`");
        let source = source.and_then(|n| self.source(n, sec.key_pos("source")));
        let train_fraction = match sec.opt("train_fraction") {
            None => Some(defaults.train_fraction),
            Some(n) => {
                self.float_where(n, "dataset.train_fraction", |v| v > 0.0 && v < 1.0, "between 0 and 1 (exclusive)")
            }
        };
        let seeds = match sec.opt("seeds") {
            None => Some(defaults.seeds.clone()),
            Some(n) => self.seeds(n),
        };
        let max_samples = match sec.opt("max_samples") {
            None => Some(None),
            Some(n) => self
                .int_at_least(n, "dataset.max_samples", 2, "the number of rows kept after the shuffle")
                .map(|v| Some(v as usize)),
        };
        Some(DatasetSpec { source: source?, train_fraction: train_fraction?, seeds: seeds?, max_samples: max_samples? })
    }

    fn seeds(&mut self, node: &Node) -> Option<Vec<u64>> {
        self.seeds_at(node, "dataset.seeds")
    }

    fn seeds_at(&mut self, node: &Node, field: &str) -> Option<Vec<u64>> {
        let Value::Seq(items) = &node.value else {
            self.error(node.pos, format!("`{field}` must be a list of integers, found {}", node.describe()));
            return None;
        };
        if items.is_empty() {
            self.error(node.pos, format!("`{field}` must list at least one seed"));
            return None;
        }
        let mut seeds = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match self.int_at_least(item, field, 0, "a seed") {
                Some(s) if seeds.contains(&s) => {
                    self.error(item.pos, format!("seed {s} is listed twice in `{field}`"));
                    ok = false;
                }
                Some(s) => seeds.push(s),
                None => ok = false,
            }
        }
        ok.then_some(seeds)
    }

    /// The `game:` section and its seeds.
    fn game_section(&mut self, node: &Node, pos: Option<Pos>) -> Option<(GameSpec, Vec<u64>)> {
        let sec = self.section(node, "game", pos.unwrap_or(node.pos), keys::GAME)?;
        let module = self
            .required(&sec, "module", "the game's .wasm file, relative to the spec's folder")
            .and_then(|n| self.string(n, "game.module").map(|m| (m, n.pos)))
            .and_then(|(file, pos)| {
                let resolved = self.base_dir.join(&file);
                if resolved.is_file() {
                    // Stored absolute (and without `..`), so that the spec works from any folder.
                    return Some(std::fs::canonicalize(&resolved).unwrap_or(resolved));
                }
                self.error_help(
                    pos,
                    format!("game module `{}` does not exist", resolved.display()),
                    Some(format!(
                        "relative paths resolve against the spec's folder `{}`; the shipped games are built by `scripts/setup.sh games`, a new one by `cargo build --target wasm32-unknown-unknown --release` in its folder",
                        self.base_dir.display()
                    )),
                );
                None
            });
        let seeds = match sec.opt("seeds") {
            None => Some(DatasetSpec::default().seeds),
            Some(n) => self.seeds_at(n, "game.seeds"),
        };
        let positive = |d: &mut Self, key: &str, default: u64, meaning: &str| match sec.opt(key) {
            None => Some(default),
            Some(n) => d.int_at_least(n, &format!("game.{key}"), 1, meaning),
        };
        let fuel = positive(self, "fuel", GameSpec::DEFAULT_FUEL, "units of fuel per call");
        let memory_mb = positive(self, "memory_mb", GameSpec::DEFAULT_MEMORY_MB, "MiB of memory");
        let observation_kb = positive(self, "observation_kb", GameSpec::DEFAULT_OBSERVATION_KB, "KiB of text");
        if let (Some(m), Some(n)) = (memory_mb, sec.opt("memory_mb")) {
            // wasm32 memories end at 4 GiB.
            if m > 4096 {
                self.error(
                    n.pos,
                    format!("`game.memory_mb` must be at most 4096 (a 32-bit WebAssembly memory), found {m}"),
                );
            }
        }
        Some((
            GameSpec { module: module?, fuel: fuel?, memory_mb: memory_mb?, observation_kb: observation_kb? },
            seeds?,
        ))
    }

    /// Sections and keys that only mean something for data tasks.
    fn not_for_games(&mut self, top: &Section<'_>) {
        if let Some(pos) = top.key_pos("dataset") {
            self.error(
                pos,
                "`dataset` does not apply to `kind: wasm` (a game has no data); the reset seeds go in `game.seeds`",
            );
        }
        if let Some(pos) = top.key_pos("limits") {
            self.error(
                pos,
                "`limits` applies to `kind: sklearn` programs; a game's budgets are `game.fuel` and `game.memory_mb`",
            );
        }
        if let Some(Value::Map(pairs)) = top.get("reward").map(|n| &n.value) {
            for (key, _) in pairs {
                if let Some(k @ ("metric" | "multiclass" | "evaluation")) = key_text(key) {
                    self.error(key.pos, format!("`reward.{k}` applies to `kind: sklearn`; a game's rewards come from the game (only `reward.failure_reward`, the reward of a step the game fails on, applies)"));
                }
            }
        }
    }

    fn source(&mut self, node: &Node, pos: Option<Pos>) -> Option<DataSource> {
        self.source_pos = Some(node.pos);
        let sec = self.section(node, "dataset.source", pos.unwrap_or(node.pos), keys::SOURCE)?;
        let present: Vec<&str> = ["builtin", "csv", "arff"].into_iter().filter(|k| sec.get(k).is_some()).collect();
        if present.len() != 1 {
            let msg = if present.is_empty() {
                "`dataset.source` needs one of `builtin: NAME`, `csv: PATH` or `arff: PATH`".to_string()
            } else {
                format!(
                    "`dataset.source` needs exactly one of `builtin`, `csv` or `arff`, found {}",
                    present.join(" and ")
                )
            };
            self.error(sec.pos, msg);
            return None;
        }
        let target = sec.get("target");
        if present[0] == "builtin" {
            if let Some(t) = target {
                self.error(
                    t.pos,
                    "`dataset.source.target` applies to `csv` and `arff` sources; a builtin data set knows its target",
                );
            }
            let node = sec.get("builtin")?;
            let name = self.string(node, "dataset.source.builtin")?;
            if !data::BUILTINS.contains(&name.as_str()) {
                self.error_help(
                    node.pos,
                    format!("unknown builtin data set `{name}`; expected one of: {}", data::BUILTINS.join(", ")),
                    did_you_mean(&name, data::BUILTINS.iter().copied()),
                );
                return None;
            }
            return Some(DataSource::Builtin(name));
        }
        let field = format!("dataset.source.{}", present[0]);
        let file_node = sec.get(present[0])?;
        let file = self.string(file_node, &field);
        let target = match target {
            None => {
                self.error(
                    sec.pos,
                    format!(
                        "`dataset.source` is missing the required key `target` (the class column of the {} file)",
                        present[0]
                    ),
                );
                None
            }
            Some(t) => self.string(t, "dataset.source.target"),
        };
        let file = file?;
        let resolved = self.base_dir.join(&file);
        if !resolved.is_file() {
            self.error_help(
                file_node.pos,
                format!("data file `{}` does not exist", resolved.display()),
                Some(format!("relative paths resolve against the spec's folder `{}`", self.base_dir.display())),
            );
            return None;
        }
        let target = target?;
        if present[0] == "csv" && !self.check_csv_target(&resolved, &target, sec.get("target")?) {
            return None;
        }
        // Stored absolute, so that `data::load(source, any_dir)` finds the file.
        let resolved = std::path::absolute(&resolved).unwrap_or(resolved);
        Some(if present[0] == "csv" {
            DataSource::Csv { path: resolved, target }
        } else {
            DataSource::Arff { path: resolved, target }
        })
    }

    /// A target column missing from a CSV header is reported at `target:`, with a suggestion.
    /// (Everything else about the file is checked when the data are loaded.)
    fn check_csv_target(&mut self, path: &Path, target: &str, node: &Node) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else {
            return true;
        };
        let header = text.lines().next().unwrap_or("").trim_start_matches('\u{feff}');
        let columns: Vec<&str> = header.split(',').map(|c| c.trim().trim_matches('"')).collect();
        if !columns.contains(&target) {
            self.error_help(
                node.pos,
                format!("the data file has no column `{target}`; its columns are: {}", columns.join(", ")),
                did_you_mean(target, columns.iter().copied()),
            );
            return false;
        }
        true
    }

    fn examples(&mut self, node: &Node) -> Option<Vec<Example>> {
        let Value::Seq(items) = &node.value else {
            self.error(
                node.pos,
                format!("`examples` must be a list of `{{task, action}}` mappings, found {}", node.describe()),
            );
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("examples[{i}]");
            let Some(sec) = self.section(item, &path, item.pos, keys::EXAMPLE) else {
                ok = false;
                continue;
            };
            let task =
                self.required(&sec, "task", "the example's task text").and_then(|n| self.string(n, &sec.field("task")));
            let action = self
                .required(&sec, "action", "the action that solves it")
                .and_then(|n| self.string(n, &sec.field("action")));
            match (task, action) {
                (Some(task), Some(action)) => out.push(Example { task, action }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// The prompt format, read first because other defaults depend on it.
    fn prompt_format(&mut self, top: &Section<'_>) -> Option<PromptFormat> {
        let Some(prompt) = top.get("prompt") else {
            return Some(PromptFormat::Completion);
        };
        let Value::Map(pairs) = &prompt.value else {
            return Some(PromptFormat::Completion);
        };
        match pairs.iter().find(|(k, _)| key_text(k) == Some("format")) {
            Some((_, node)) if !node.is_null() => self.choice(node, "prompt.format", FORMATS),
            _ => Some(PromptFormat::Completion),
        }
    }

    fn prompt(&mut self, node: &Node, pos: Option<Pos>, format: Option<PromptFormat>) -> Option<PromptSpec> {
        let sec = self.section(node, "prompt", pos.unwrap_or(node.pos), keys::PROMPT)?;
        let format = format?;
        let (allowed, name, other) = match format {
            PromptFormat::Chat => (keys::PROMPT_CHAT, "chat", "completion"),
            PromptFormat::Completion => (keys::PROMPT_COMPLETION, "completion", "chat"),
        };
        for (key, _) in sec.pairs {
            if let Some(k) = key_text(key) {
                if keys::PROMPT.contains(&k) && !allowed.contains(&k) {
                    self.error(
                        key.pos,
                        format!(
                            "`prompt.{k}` belongs to format `{other}`; format `{name}` uses: {}",
                            allowed.join(", ")
                        ),
                    );
                }
            }
        }
        let template =
            |d: &mut Self, key: &str, what: &str, role: TemplateRole, required: bool| -> Option<Option<String>> {
                let node = if required {
                    d.required(&sec, key, what)?
                } else {
                    match sec.opt(key) {
                        Some(n) => n,
                        None => return Some(None),
                    }
                };
                let field = sec.field(key);
                let text = d.string(node, &field)?;
                d.templates.push((field, node.clone(), role));
                Some(Some(text))
            };
        if format == PromptFormat::Chat {
            let system = template(self, "system", "", TemplateRole::Initial, false);
            let user = template(self, "user", "the user message stating the task", TemplateRole::Initial, true);
            let assistant = template(self, "assistant", "", TemplateRole::Reflection, false);
            let reflection = template(
                self,
                "reflection",
                "the user message after a failed action (variables `error`, `action`)",
                TemplateRole::Reflection,
                true,
            );
            Some(PromptSpec::Chat {
                system: system?,
                user: user??,
                assistant: assistant?.unwrap_or_else(|| DEFAULT_CHAT_ASSISTANT.to_string()),
                reflection: reflection??,
            })
        } else {
            let initial = template(self, "template", "the first state η(g)", TemplateRole::Initial, true);
            let reflection = template(
                self,
                "reflection",
                "the state η(g, a, e) after a failed action",
                TemplateRole::Reflection,
                true,
            );
            Some(PromptSpec::Completion { template: initial??, reflection: reflection?? })
        }
    }

    fn action(&mut self, top: &Section<'_>, format: Option<PromptFormat>) -> Option<ActionSpec> {
        // A game's action is one line of text; a program is a block of code.
        let default_extract = if self.game {
            Extract::FirstLine
        } else if format == Some(PromptFormat::Chat) {
            Extract::Fenced
        } else {
            Extract::UntilUnindented
        };
        let default_assemble = if self.game { DEFAULT_GAME_ASSEMBLE } else { DEFAULT_SKLEARN_ASSEMBLE };
        let default_tokens = if self.game { DEFAULT_GAME_MAX_NEW_TOKENS } else { DEFAULT_MAX_NEW_TOKENS };
        let Some(node) = top.opt("action") else {
            self.templates.push(("action.assemble".into(), synthetic(default_assemble), TemplateRole::Assemble));
            return Some(ActionSpec {
                extract: default_extract,
                stop: Vec::new(),
                max_new_tokens: default_tokens,
                assemble: default_assemble.to_string(),
            });
        };
        let sec = self.section(node, "action", top.key_pos("action").unwrap_or(node.pos), keys::ACTION)?;
        let extract = match sec.opt("extract") {
            None => Some(default_extract),
            Some(n) => self.choice(n, "action.extract", &Extract::NAMES),
        };
        let stop = match sec.opt("stop") {
            None => Some(Vec::new()),
            Some(n) => self.string_list(n, "action.stop"),
        };
        if let (Some(extract), Some(stop)) = (extract, &stop) {
            if extract == Extract::Stop && stop.is_empty() {
                let pos = sec.opt("extract").map_or(sec.pos, |n| n.pos);
                self.error(pos, "`action.extract: stop` needs at least one stop sequence in `action.stop`");
            }
            if extract == Extract::Fenced {
                if let Some(Value::Seq(items)) = sec.opt("stop").map(|n| &n.value) {
                    for (item, s) in items.iter().zip(stop) {
                        if s.contains("```") {
                            self.error(item.pos, "a stop sequence containing ``` would cut a fenced answer at its opening fence; remove it for `extract: fenced`");
                        }
                    }
                }
            }
        }
        let max_new_tokens = match sec.opt("max_new_tokens") {
            None => Some(default_tokens),
            Some(n) => self.int_at_least(n, "action.max_new_tokens", 1, "a number of tokens").map(|v| v as usize),
        };
        let assemble = match sec.opt("assemble") {
            None => {
                self.templates.push(("action.assemble".into(), synthetic(default_assemble), TemplateRole::Assemble));
                Some(default_assemble.to_string())
            }
            Some(n) => {
                let text = self.string(n, "action.assemble");
                if text.is_some() {
                    self.templates.push(("action.assemble".into(), n.clone(), TemplateRole::Assemble));
                }
                text
            }
        };
        Some(ActionSpec { extract: extract?, stop: stop?, max_new_tokens: max_new_tokens?, assemble: assemble? })
    }

    fn string_list(&mut self, node: &Node, field: &str) -> Option<Vec<String>> {
        let Value::Seq(items) = &node.value else {
            self.error(node.pos, format!("`{field}` must be a list of strings, found {}", node.describe()));
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match self.string(item, field) {
                Some(s) if s.is_empty() => {
                    self.error(item.pos, format!("`{field}` entries must not be empty"));
                    ok = false;
                }
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn reward(&mut self, top: &Section<'_>) -> Option<RewardSpec> {
        let mut reward = RewardSpec {
            metric: Metric::RocAuc,
            multiclass: Multiclass::Ovo,
            failure_reward: -1.0,
            evaluation: Evaluation::SingleSplit,
        };
        let Some(node) = top.opt("reward") else {
            return Some(reward);
        };
        let sec = self.section(node, "reward", top.key_pos("reward").unwrap_or(node.pos), keys::REWARD)?;
        let mut ok = true;
        if let Some(n) = sec.opt("metric") {
            match self.choice(n, "reward.metric", METRICS) {
                Some(m) => reward.metric = m,
                None => ok = false,
            }
        }
        if let Some(n) = sec.opt("multiclass") {
            match self.choice(n, "reward.multiclass", MULTICLASS) {
                Some(m) => reward.multiclass = m,
                None => ok = false,
            }
        }
        if let Some(n) = sec.opt("failure_reward") {
            match self.number(n, "reward.failure_reward") {
                Some(v) => reward.failure_reward = v,
                None => ok = false,
            }
        }
        if let Some(n) = sec.opt("evaluation") {
            match self.evaluation(n) {
                Some(e) => reward.evaluation = e,
                None => ok = false,
            }
        }
        ok.then_some(reward)
    }

    fn evaluation(&mut self, node: &Node) -> Option<Evaluation> {
        const EXPECTED: &str = "`single_split` or `{mean_of_splits: N}`";
        match &node.value {
            Value::Scalar { text, .. } if text == "single_split" => Some(Evaluation::SingleSplit),
            Value::Scalar { text, .. } => {
                self.error_help(
                    node.pos,
                    format!("unknown value `{text}` for `reward.evaluation`; expected {EXPECTED}"),
                    did_you_mean(text, ["single_split", "mean_of_splits"]),
                );
                None
            }
            Value::Map(_) => {
                let sec = self.section(node, "reward.evaluation", node.pos, keys::EVALUATION)?;
                let n = self.required(&sec, "mean_of_splits", "the number of random splits to average")?;
                let v = self.int_at_least(n, "reward.evaluation.mean_of_splits", 1, "a number of splits")?;
                match u32::try_from(v) {
                    Ok(v) => Some(Evaluation::MeanOfSplits(v)),
                    Err(_) => {
                        self.error(n.pos, format!("`reward.evaluation.mean_of_splits` is too large: {v}"));
                        None
                    }
                }
            }
            Value::Seq(_) => {
                self.error(node.pos, format!("`reward.evaluation` must be {EXPECTED}, found a list"));
                None
            }
        }
    }

    fn limits(&mut self, top: &Section<'_>) -> Option<ExecLimits> {
        let mut limits = ExecLimits::default();
        let Some(node) = top.opt("limits") else {
            return Some(limits);
        };
        let sec = self.section(node, "limits", top.key_pos("limits").unwrap_or(node.pos), keys::LIMITS)?;
        let mut ok = true;
        let positive = |v: f64| v > 0.0;
        for (key, slot) in [("wall_s", &mut limits.wall_s), ("cpu_s", &mut limits.cpu_s)] {
            if let Some(n) = sec.opt(key) {
                match self.float_where(n, &sec.field(key), positive, "a positive number of seconds") {
                    Some(v) => *slot = v,
                    None => ok = false,
                }
            }
        }
        for (key, slot, unit) in [
            ("memory_mb", &mut limits.memory_mb, "a positive number of MiB"),
            ("output_kb", &mut limits.output_kb, "a positive number of KiB"),
            ("max_processes", &mut limits.max_processes, "a positive number of processes"),
        ] {
            if let Some(n) = sec.opt(key) {
                match self.int_at_least(n, &sec.field(key), 1, unit) {
                    Some(v) => *slot = v,
                    None => ok = false,
                }
            }
        }
        ok.then_some(limits)
    }

    fn training(&mut self, top: &Section<'_>) -> Option<TrainingOverrides> {
        let mut t = TrainingOverrides::default();
        let Some(node) = top.opt("training") else {
            return Some(t);
        };
        let sec = self.section(node, "training", top.key_pos("training").unwrap_or(node.pos), keys::TRAINING)?;
        let before = self.diags.len();
        if let Some(n) = sec.opt("algorithm") {
            t.algorithm = self.choice(n, "training.algorithm", ALGORITHMS);
        }
        let count = |d: &mut Self, key: &str, meaning: &str| -> Option<u64> {
            sec.opt(key).and_then(|n| d.int_at_least(n, &sec.field(key), 1, meaning))
        };
        t.steps = count(self, "steps", "a number of environment steps");
        t.batch_size = count(self, "batch_size", "a number of actions").map(|v| v as usize);
        t.top_k = count(self, "top_k", "a number of tokens").map(|v| v as usize);
        t.lora_rank = count(self, "lora_rank", "a rank").map(|v| v as usize);
        t.epochs = count(self, "epochs", "a number of passes").map(|v| v as usize);
        let float = |d: &mut Self, key: &str, ok: fn(f64) -> bool, meaning: &str| -> Option<f64> {
            sec.opt(key).and_then(|n| d.float_where(n, &sec.field(key), ok, meaning))
        };
        t.lr = float(self, "lr", |v| v > 0.0, "a positive number");
        t.beta = float(self, "beta", |v| v >= 0.0, "a number >= 0");
        t.gamma = float(self, "gamma", |v| (0.0..=1.0).contains(&v), "between 0 and 1");
        t.polyak = float(self, "polyak", |v| (0.0..=1.0).contains(&v), "between 0 and 1");
        t.temperature = float(self, "temperature", |v| v >= 0.0, "a number >= 0 (0 is greedy)");
        t.top_p = float(self, "top_p", |v| v > 0.0 && v <= 1.0, "in (0, 1]");
        t.lora_alpha = float(self, "lora_alpha", |v| v > 0.0, "a positive number");
        t.grad_clip = float(self, "grad_clip", |v| v > 0.0, "a positive number");
        t.clip_eps = float(self, "clip_eps", |v| v > 0.0, "a positive number");
        (self.diags.len() == before).then_some(t)
    }

    /// Render every template against a sample context: real data when it loads, else a made-up
    /// table of the paper's Balance Scale shape.
    fn check_templates(
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
            match data::load(&ds.source, &self.base_dir) {
                Ok(data) => {
                    let split = data.split(ds.seeds[0], ds.max_samples, ds.train_fraction);
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
        for (field, node, role) in &templates {
            let (known, vars): (Vec<&str>, minijinja::Value) = match role {
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
            self.check_template(field, node, &known, vars, *role);
        }
    }

    fn check_template(&mut self, field: &str, node: &Node, known: &[&str], vars: minijinja::Value, role: TemplateRole) {
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

    fn error_pos(&self, node: &Node, source: &str, e: &minijinja::Error) -> Pos {
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
    fn file_pos(&self, node: &Node, line: usize, col: usize) -> Pos {
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
fn synthetic(text: &str) -> Node {
    Node { pos: Pos { line: 1, col: 1 }, value: Value::Scalar { text: text.to_string(), style: Style::Quoted } }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where `name` is first used as a variable inside a `{{ }}` or `{% %}` tag.
fn find_variable(source: &str, name: &str) -> Option<(usize, usize)> {
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

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
