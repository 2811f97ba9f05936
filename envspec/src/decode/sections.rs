//! One [`Decoder`] method per section of the spec format (see `envspec/FORMAT.md`).

use crate::action::Extract;
use crate::data::{self, DataSource, DatasetSpec};
use crate::diag::did_you_mean;
use crate::spec::{
    ActionSpec, Algorithm, ChatTurns, Evaluation, Example, ExecLimits, GameSpec, Kind, Metric, Multiclass,
    PromptFormat, PromptSpec, RewardSpec, Spec, TrainingOverrides,
};
use crate::yaml::{Node, Pos, Value};
use std::path::Path;

use super::readers::{key_text, Section};
use super::templates::synthetic;
use super::{keys, Decoder, KindName, TemplateRole};
use super::{
    DEFAULT_CHAT_ASSISTANT, DEFAULT_GAME_ASSEMBLE, DEFAULT_GAME_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_STEPS, DEFAULT_SKLEARN_ASSEMBLE,
};

impl Decoder {
    pub(super) fn spec(&mut self, root: &Node, path: &Path) -> Option<Spec> {
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
            Some(node) => self.choice(node, "kind", KindName::NAMES),
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
        let (prompt, prompt_max_tokens) = match prompt {
            Some((p, m)) => (Some(p), Some(m)),
            None => (None, None),
        };
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
            prompt_max_tokens: prompt_max_tokens?,
            action: action?,
            reward: reward?,
            max_steps: max_steps?,
            limits: limits?,
            examples: examples?,
            training: training?,
        })
    }

    pub(super) fn dataset(&mut self, node: &Node, pos: Option<Pos>) -> Option<DatasetSpec> {
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
        let test_fraction = match sec.opt("test_fraction") {
            None => Some(defaults.test_fraction),
            Some(n) => self.float_where(n, "dataset.test_fraction", |v| (0.0..0.5).contains(&v), "in [0, 0.5)"),
        };
        if let (Some(train), Some(test)) = (train_fraction, test_fraction) {
            if train + test >= 1.0 {
                let pos = sec.key_pos("test_fraction").unwrap_or(sec.pos);
                self.error(pos, format!("dataset.train_fraction ({train}) and dataset.test_fraction ({test}) leave no rows to validate on; their sum must be below 1"));
            }
        }
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
        let columns = self.column_selection(&sec, source.as_ref());
        Some(DatasetSpec {
            source: source?,
            train_fraction: train_fraction?,
            test_fraction: test_fraction?,
            seeds: seeds?,
            max_samples: max_samples?,
            columns: columns?,
        })
    }

    /// `dataset.drop` or `dataset.features` (at most one of them). Each entry is checked against
    /// the source's columns (a file's header, a builtin's features) and a problem is reported at
    /// the entry, with a suggestion for a misspelt name.
    pub(super) fn column_selection(
        &mut self,
        sec: &Section<'_>,
        source: Option<&DataSource>,
    ) -> Option<data::ColumnSelection> {
        let (key, node) = match (sec.opt("drop"), sec.opt("features")) {
            (None, None) => return Some(data::ColumnSelection::All),
            (Some(_), Some(_)) => {
                let pos = sec.key_pos("drop").max(sec.key_pos("features")).unwrap_or(sec.pos);
                self.error_help(
                    pos,
                    "`dataset.drop` and `dataset.features` cannot both be given",
                    Some("list the columns to leave out in `drop`, or the columns to keep in `features`".into()),
                );
                return None;
            }
            (Some(n), None) => ("drop", n),
            (None, Some(n)) => ("features", n),
        };
        let entries = self.string_list(node, &sec.field(key))?;
        let selection = match key {
            "drop" => data::ColumnSelection::Drop(entries),
            _ => data::ColumnSelection::Features(entries),
        };
        // A source that is wrong, or a file that cannot be read, is reported elsewhere.
        let Some(source) = source else {
            return Some(selection);
        };
        let Ok(columns) = data::column_names(source, &self.base_dir) else {
            return Some(selection);
        };
        let target = match source {
            DataSource::Builtin(_) => None,
            DataSource::Csv { target, .. } | DataSource::Arff { target, .. } => Some(target.as_str()),
        };
        let problems = data::check_selection(&selection, &columns, target);
        if problems.is_empty() {
            return Some(selection);
        }
        let items: &[Node] = match &node.value {
            Value::Seq(items) => items,
            _ => &[],
        };
        let key_pos = sec.key_pos(key).unwrap_or(node.pos);
        for problem in problems {
            let pos = problem.entry.and_then(|i| items.get(i)).map_or(key_pos, |item| item.pos);
            self.error_help(pos, problem.message, problem.help);
        }
        None
    }

    pub(super) fn seeds(&mut self, node: &Node) -> Option<Vec<u64>> {
        self.seeds_at(node, "dataset.seeds")
    }

    pub(super) fn seeds_at(&mut self, node: &Node, field: &str) -> Option<Vec<u64>> {
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
    pub(super) fn game_section(&mut self, node: &Node, pos: Option<Pos>) -> Option<(GameSpec, Vec<u64>)> {
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
    pub(super) fn not_for_games(&mut self, top: &Section<'_>) {
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

    pub(super) fn source(&mut self, node: &Node, pos: Option<Pos>) -> Option<DataSource> {
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
    pub(super) fn check_csv_target(&mut self, path: &Path, target: &str, node: &Node) -> bool {
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

    pub(super) fn examples(&mut self, node: &Node) -> Option<Vec<Example>> {
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
    pub(super) fn prompt_format(&mut self, top: &Section<'_>) -> Option<PromptFormat> {
        let Some(prompt) = top.get("prompt") else {
            return Some(PromptFormat::Completion);
        };
        let Value::Map(pairs) = &prompt.value else {
            return Some(PromptFormat::Completion);
        };
        match pairs.iter().find(|(k, _)| key_text(k) == Some("format")) {
            Some((_, node)) if !node.is_null() => self.choice(node, "prompt.format", PromptFormat::NAMES),
            _ => Some(PromptFormat::Completion),
        }
    }

    /// The `prompt:` section and its `max_tokens`.
    pub(super) fn prompt(
        &mut self,
        node: &Node,
        pos: Option<Pos>,
        format: Option<PromptFormat>,
    ) -> Option<(PromptSpec, Option<usize>)> {
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
        let max_tokens = match sec.opt("max_tokens") {
            None => Some(None),
            Some(node) if node.is_null() => Some(None),
            Some(node) => self
                .int_at_least(node, "prompt.max_tokens", 1, "the longest a state may be, in tokens")
                .map(|v| Some(usize::try_from(v).unwrap_or(usize::MAX))),
        };
        let turns = match sec.opt("turns") {
            None => Some(ChatTurns::default()),
            Some(node) => self.choice(node, "prompt.turns", ChatTurns::NAMES),
        };
        let spec = if format == PromptFormat::Chat {
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
                turns: turns?,
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
        }?;
        let max_tokens = max_tokens?;
        if max_tokens.is_some() {
            self.check_history_is_counted(&sec, &spec);
        }
        Some((spec, max_tokens))
    }

    /// With `prompt.max_tokens`, the oldest turns of a state's history may be left out; a state
    /// that shows the history must then say how many were (`history_omitted`), or the model
    /// would take a cut episode for a whole one.
    fn check_history_is_counted(&mut self, sec: &Section<'_>, spec: &PromptSpec) {
        let (shows_history, sources): (bool, Vec<&str>) = match spec {
            PromptSpec::Completion { template, reflection } => {
                let sources = vec![template.as_str(), reflection.as_str()];
                (sources.iter().any(|s| uses_variable(s, "history")), sources)
            }
            PromptSpec::Chat { turns, system, user, assistant, reflection } => {
                let mut sources = vec![user.as_str(), assistant.as_str(), reflection.as_str()];
                sources.extend(system.as_deref());
                let shows = *turns == ChatTurns::All || sources.iter().any(|s| uses_variable(s, "history"));
                (shows, sources)
            }
        };
        if shows_history && !sources.iter().any(|s| uses_variable(s, "history_omitted")) {
            let pos = sec.key_pos("max_tokens").unwrap_or(sec.pos);
            self.error_help(
                pos,
                "with `prompt.max_tokens`, old turns of the history can be left out, and no template says how many",
                Some("show `history_omitted` in a template, e.g. `{% if history_omitted %}({{ history_omitted }} earlier turns left out){% endif %}`".into()),
            );
        }
    }

    pub(super) fn action(&mut self, top: &Section<'_>, format: Option<PromptFormat>) -> Option<ActionSpec> {
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

    pub(super) fn string_list(&mut self, node: &Node, field: &str) -> Option<Vec<String>> {
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

    pub(super) fn reward(&mut self, top: &Section<'_>) -> Option<RewardSpec> {
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
            match self.choice(n, "reward.metric", Metric::NAMES) {
                Some(m) => reward.metric = m,
                None => ok = false,
            }
        }
        if let Some(n) = sec.opt("multiclass") {
            match self.choice(n, "reward.multiclass", Multiclass::NAMES) {
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

    pub(super) fn evaluation(&mut self, node: &Node) -> Option<Evaluation> {
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

    pub(super) fn limits(&mut self, top: &Section<'_>) -> Option<ExecLimits> {
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

    pub(super) fn training(&mut self, top: &Section<'_>) -> Option<TrainingOverrides> {
        let mut t = TrainingOverrides::default();
        let Some(node) = top.opt("training") else {
            return Some(t);
        };
        let sec = self.section(node, "training", top.key_pos("training").unwrap_or(node.pos), keys::TRAINING)?;
        let before = self.diags.len();
        if let Some(n) = sec.opt("algorithm") {
            t.algorithm = self.choice(n, "training.algorithm", Algorithm::NAMES);
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
}

/// Whether the template `source` reads `var` (false when it does not compile: that is
/// reported where the template is checked).
fn uses_variable(source: &str, var: &str) -> bool {
    let env = crate::template::environment();
    env.template_from_str(source).is_ok_and(|t| t.undeclared_variables(false).contains(var))
}
