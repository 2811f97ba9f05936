//! `etpo show SPEC`: print exactly what the model sees — the first state s0 = η(g) for one seed's
//! split, a sample failed action with the program it assembles to, and the reflection state
//! η(g, a, e) after it — so a spec author can read the prompts before running anything.
//! Before the states it reports how the data were read: each feature column numeric or
//! categorical (with its codes) and the missing values filled, and the columns left out.
//!
//! For a text game (`kind: wasm`) it runs the game: the first state is the game's first
//! observation for the seed in the prompt template, then a sample action is played and the next
//! state shown with the game's reward.

use anyhow::Context;
use envspec::{ChatTemplate, Prompt, Spec};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The spec file.
    pub spec: PathBuf,
    /// The data split to show (default: the spec's first seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The model's chat template, for `format: chat` specs: a Jinja file, or a Hugging Face
    /// `tokenizer_config.json` (its `chat_template`, `bos_token` and `eos_token`).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// A file holding the failed action to show in the reflection state, in the raw form the
    /// model would generate it (default: the spec's first worked example, or the paper's
    /// Figure 7 body).
    #[arg(long, value_name = "FILE")]
    pub action: Option<PathBuf>,
    /// The error message shown in the reflection state.
    #[arg(long, default_value = "predict_proba is not available when probability=False")]
    pub error: String,
    /// Count the tokens of each state with the model's tokenizer (loads the model; for chat
    /// specs without --chat-template, the model's own chat template is used too).
    #[arg(long)]
    pub tokens: bool,
    /// The model for --tokens: a GGUF file or Hugging Face folder [default: the embedded
    /// SmolLM2-135M-Instruct GGUF].
    #[arg(long, value_name = "PATH", requires = "tokens")]
    pub model: Option<PathBuf>,
    /// Print only this state's exact text, nothing else (for piping into
    /// `etpo generate --prompt-file -`). Chat specs need --chat-template.
    #[arg(long, value_enum, value_name = "STATE")]
    pub only: Option<Only>,
}

/// The states `--only` can print.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The first state η(g).
    S0,
    /// The reflection state η(g, a, e) after the sample action failed.
    Reflection,
}

/// The paper's Figure 6/7 action: the body of `build_model`, as the model writes it.
const FIGURE_7_BODY: &str = "    from sklearn.svm import SVC\n    model = SVC(C=100, kernel='rbf')\n    model.fit(x_train, y_train)\n    return model\n";

pub fn run(args: Args) -> anyhow::Result<i32> {
    let spec = match envspec::load(&args.spec) {
        Ok(spec) => spec,
        Err(err) => {
            eprintln!("{err}");
            return Ok(1);
        }
    };
    let mut chat_template = args.chat_template.as_deref().map(read_chat_template).transpose()?;
    let tokenizer = match args.tokens {
        true => Some(load_tokenizer(args.model.as_deref(), &mut chat_template)?),
        false => None,
    };
    let seed = args.seed.unwrap_or(spec.dataset.seeds[0]);
    if spec.kind.game().is_some() {
        return show_game(&args, spec, seed, chat_template.as_ref(), tokenizer.as_ref());
    }
    let data = envspec::data::load_for(&spec.dataset, spec.base_dir())
        .with_context(|| format!("loading the data of {}", args.spec.display()))?;
    let split = data.split_for(&spec.dataset, seed);
    let ctx = spec.task_context(&split);

    if let Some(only) = args.only {
        let prompt = match only {
            Only::S0 => spec.render_initial(&ctx)?,
            Only::Reflection => {
                let (raw, _) = failed_action(&spec, args.action.as_deref())?;
                let action = spec.extract_action(&raw);
                let turn = failed_turn(&spec, &action, &args.error);
                spec.render_reflection(&ctx, &action, &args.error, envspec::History::all(&turn))?
            }
        };
        print!("{}", prompt.to_text(chat_template.as_ref())?);
        return Ok(0);
    }

    let test_rows = match split.y_test.len() {
        0 => String::new(),
        n => format!(" ({n} more held out for the test score)"),
    };
    println!(
        "spec {} ({}): seed {seed}, {} training and {} validation rows{test_rows}, x_train shape {}, {} classes",
        spec.name,
        args.spec.display(),
        ctx.n_train,
        ctx.n_val,
        ctx.shape,
        ctx.n_classes
    );
    print_columns(&data);

    let s0 = spec.render_initial(&ctx)?;
    let chat = chat_template.as_ref();
    let tok = tokenizer.as_ref();
    print_state("s0 = η(g), the first state", &s0, chat, tok)?;

    let (raw_action, origin) = failed_action(&spec, args.action.as_deref())?;
    let action = spec.extract_action(&raw_action);
    section(&format!("a sample action ({origin}), as extracted with `{}`", spec.action.extract.name()), &action, None);
    section("the program it assembles to", &spec.assemble_program(&action)?, None);
    let turn = failed_turn(&spec, &action, &args.error);
    let s1 = spec.render_reflection(&ctx, &action, &args.error, envspec::History::all(&turn))?;
    print_state(&format!("η(g, a, e), the state after that action failed with: {}", args.error), &s1, chat, tok)?;
    Ok(0)
}

/// The history of the state after one failed action: that action.
fn failed_turn(spec: &envspec::Spec, action: &str, error: &str) -> [envspec::Turn; 1] {
    let reward = spec.reward.failure_reward;
    [envspec::Turn { step: 0, action: action.into(), reward, error: error.into(), observation: String::new() }]
}

/// `etpo show` for a game: reset it with `seed`, play one sample action, show both states.
fn show_game(
    args: &Args,
    spec: Spec,
    seed: u64,
    chat: Option<&ChatTemplate>,
    tok: Option<&trainer::Tokenizer>,
) -> anyhow::Result<i32> {
    let spec = std::sync::Arc::new(spec);
    let host = runtime::env::Host::new(runtime::PoolConfig::default());
    let task = runtime::env::Task::load(spec.clone(), &host)?;
    let mut env = task.env(seed)?;
    let s0 = env.reset()?;
    let (raw, origin) = match (&args.action, spec.examples.first()) {
        (Some(path), _) => (
            std::fs::read_to_string(path).with_context(|| format!("reading the action file {}", path.display()))?,
            format!("from {}", path.display()),
        ),
        (None, Some(example)) => (example.action.clone(), "the first worked example's action".to_string()),
        (None, None) => ("look".to_string(), "a sample; pass --action FILE for another".to_string()),
    };
    let step = |env: &mut runtime::env::Env| env.step(&raw);
    if let Some(only) = args.only {
        let prompt = match only {
            Only::S0 => s0.prompt,
            Only::Reflection => step(&mut env)?.observation.prompt,
        };
        print!("{}", prompt.to_text(chat)?);
        return Ok(0);
    }
    let game = task.game().context("a wasm spec's task has a game")?;
    println!(
        "spec {} ({}): game {} {} ({}), seed {seed}",
        spec.name,
        args.spec.display(),
        game.name(),
        game.version(),
        game.module().display()
    );
    print_state("s0 = η(g), the first state (the game's first observation)", &s0.prompt, chat, tok)?;
    let r = step(&mut env)?;
    section(
        &format!("a sample action ({origin}), as extracted with `{}`", spec.action.extract.name()),
        &r.info.action,
        None,
    );
    section("the text the game receives", &spec.assemble_program(&r.info.action)?, None);
    let end = match (r.terminated, r.truncated, r.info.error.is_empty()) {
        (_, _, false) => format!("the game failed: {}", r.info.error),
        (true, _, _) => "the game ended".to_string(),
        (_, true, _) => "the episode was truncated".to_string(),
        _ => "the episode goes on".to_string(),
    };
    print_state(
        &format!("the next state, after the game answered (reward {}; {end})", r.reward),
        &r.observation.prompt,
        chat,
        tok,
    )?;
    Ok(0)
}

/// How each column was read, one line each: `column `age`: numeric, 2 missing values filled with
/// the column median 30`, `dropped column `Name`: listed in dataset.drop`, then the data set's
/// notes (rows dropped, how a builtin is generated).
fn print_columns(data: &envspec::data::Dataset) {
    for column in &data.columns {
        println!("column {column}");
    }
    for dropped in &data.dropped {
        println!("dropped column `{}`: {}", dropped.name, dropped.reason.describe());
    }
    for note in &data.notes {
        println!("data note: {note}");
    }
}

/// The failed action to show and where it came from: the `--action` file, else the first worked
/// example's action, else the paper's Figure 7 body.
fn failed_action(spec: &Spec, file: Option<&std::path::Path>) -> anyhow::Result<(String, String)> {
    Ok(match (file, spec.examples.first()) {
        (Some(path), _) => (
            std::fs::read_to_string(path).with_context(|| format!("reading the action file {}", path.display()))?,
            format!("from {}", path.display()),
        ),
        (None, Some(example)) => (example.action.clone(), "the first worked example's action".to_string()),
        (None, None) => (FIGURE_7_BODY.to_string(), "the paper's Figure 7 body".to_string()),
    })
}

/// Load the model's tokenizer for --tokens; its chat template fills in a missing one.
fn load_tokenizer(
    model: Option<&std::path::Path>,
    chat_template: &mut Option<ChatTemplate>,
) -> anyhow::Result<trainer::Tokenizer> {
    let path = model.map_or_else(trainer::default_model_path, std::path::Path::to_path_buf);
    let loaded = trainer::load_model(&path, &trainer::parse_device("cpu")?)
        .with_context(|| format!("loading the model {} for --tokens", path.display()))?;
    if let (None, Some(source)) = (&chat_template, &loaded.chat_template) {
        let tok = &loaded.tokenizer;
        let (bos, eos) = (tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or(""));
        *chat_template = Some(
            ChatTemplate::new(source, bos, eos)
                .with_context(|| format!("compiling the chat template of {}", path.display()))?,
        );
    }
    Ok(loaded.tokenizer)
}

fn print_state(
    title: &str,
    prompt: &Prompt,
    chat_template: Option<&ChatTemplate>,
    tokenizer: Option<&trainer::Tokenizer>,
) -> anyhow::Result<()> {
    match (prompt, chat_template) {
        (Prompt::Chat(messages), None) => {
            let mut text = String::new();
            for m in messages {
                text.push_str(&format!("[{}]\n{}\n", m.role, m.content));
            }
            section(&format!("{title} — chat messages (pass --chat-template FILE to see the exact text)"), &text, None);
        }
        _ => {
            let text = prompt.to_text(chat_template)?;
            let tokens = match tokenizer {
                Some(tok) => Some(tok.encode(&text).context("tokenizing the state")?.len()),
                None => None,
            };
            section(title, &text, Some(Size { chars: text.chars().count(), tokens }));
        }
    }
    Ok(())
}

/// The size of a state the model receives.
struct Size {
    chars: usize,
    /// With --tokens: the model tokenizer's count.
    tokens: Option<usize>,
}

/// Print a titled block with the text verbatim, and the size of what the model receives.
fn section(title: &str, text: &str, size: Option<Size>) {
    let size = match size {
        Some(Size { chars, tokens: Some(n) }) => format!(" [{chars} characters, {n} tokens]"),
        Some(Size { chars, tokens: None }) => {
            format!(" [{chars} characters; --tokens counts tokens]")
        }
        None => String::new(),
    };
    println!("\n===== {title}{size} =====");
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
        println!("===== (no newline at the end) =====");
    } else {
        println!("===== end =====");
    }
}

fn read_chat_template(path: &std::path::Path) -> anyhow::Result<ChatTemplate> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_json = path.extension().is_some_and(|x| x == "json");
    let (source, bos, eos) = if is_json {
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let token = |key: &str| -> String {
            match &config[key] {
                serde_json::Value::String(s) => s.clone(),
                // Older configs write {"content": "<s>", ...}.
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
                _ => String::new(),
            }
        };
        let source = config["chat_template"]
            .as_str()
            .with_context(|| format!("{} has no string `chat_template`", path.display()))?
            .to_string();
        (source, token("bos_token"), token("eos_token"))
    } else {
        (text, String::new(), String::new())
    };
    ChatTemplate::new(&source, &bos, &eos).with_context(|| format!("compiling the chat template {}", path.display()))
}
