//! `etpo check PATH...`: validate spec files (or the `*.yaml`/`*.yml` files directly inside
//! folders). Prints `ok: FILE` for each good file; at the first bad file prints every error in
//! it, `file:line:col: error: ...`, and exits with status 1. The game of a `kind: wasm` spec is
//! compiled and asked its name, so a module that is not a valid game fails here too.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files, or folders whose *.yaml / *.yml files are checked (not recursively).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The model whose tokens `prompt.max_tokens` counts: a GGUF file or Hugging Face folder
    /// [default: the embedded default model when it is installed, else states are measured in
    /// bytes, an upper bound for byte-level BPE tokenizers]
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
}

/// For specs with `prompt.max_tokens`: the first state (seed 0's) must fit, since no history can
/// be left out of it. Counted with the model's tokenizer and chat template when one is at hand.
struct Budget {
    counter: Option<runtime::env::TokenCounter>,
    loaded: bool,
}

impl Budget {
    fn counter(&mut self, model: Option<&std::path::Path>) -> anyhow::Result<Option<runtime::env::TokenCounter>> {
        if !self.loaded {
            self.loaded = true;
            let path = model.map_or_else(trainer::default_model_path, std::path::Path::to_path_buf);
            if model.is_some() || path.exists() {
                let sampling = etpo::experiment::SamplingConfig::default();
                let policy = etpo::experiment::LlmPolicy::load(&path, "cpu", sampling)
                    .map_err(|e| anyhow::anyhow!("loading {} to count tokens: {e}", path.display()))?;
                self.counter = Some(policy.token_counter());
            }
        }
        Ok(self.counter.clone())
    }

    /// `Err(message)` when the spec's first state is over its budget.
    fn check(
        &mut self,
        spec: &std::sync::Arc<envspec::Spec>,
        task: Option<&mut runtime::env::Task>,
        model: Option<&std::path::Path>,
    ) -> anyhow::Result<Result<(), String>> {
        let Some(budget) = spec.prompt_max_tokens else {
            return Ok(Ok(()));
        };
        let counter = self.counter(model)?;
        let seed = spec.dataset.seeds.first().copied().unwrap_or(0);
        if let Some(task) = task {
            if let Some(c) = counter {
                task.set_token_counter(c);
            }
            return Ok(task.env(seed).and_then(|mut env| env.reset()).map(|_| ()).map_err(|e| e.to_string()));
        }
        let data = envspec::data::load_for(&spec.dataset, spec.base_dir())?;
        let first = spec.render_initial(&spec.task_context(&data.split_for(&spec.dataset, seed)))?;
        let (length, unit) = match &counter {
            Some(count) => (count(&first).map_err(|e| anyhow::anyhow!(e))?, "tokens"),
            None => (first.byte_len(), "bytes (no model to count tokens: --model)"),
        };
        Ok(if length > budget {
            Err(format!("the first state (seed {seed}) is {length} {unit}, over prompt.max_tokens = {budget}"))
        } else {
            Ok(())
        })
    }
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let files = match envspec::find_specs(&args.paths) {
        Ok(files) => files,
        Err(err) => {
            eprintln!("{err}");
            return Ok(1);
        }
    };
    // Started only if a spec has a game.
    let host = runtime::env::Host::new(runtime::PoolConfig::default());
    let mut budget = Budget { counter: None, loaded: false };
    for file in files {
        match envspec::load(&file) {
            Ok(spec) if spec.kind.game().is_some() => {
                let spec = std::sync::Arc::new(spec);
                match runtime::env::Task::load(spec.clone(), &host) {
                    Ok(mut task) => {
                        if let Err(message) = budget.check(&spec, Some(&mut task), args.model.as_deref())? {
                            eprintln!("{}: error: {message}", file.display());
                            return Ok(1);
                        }
                        let game =
                            task.game().map(|g| format!(" (game {} {})", g.name(), g.version())).unwrap_or_default();
                        println!("ok: {}{game}", file.display());
                    }
                    Err(err) => {
                        eprintln!("{}: error: {err}", file.display());
                        return Ok(1);
                    }
                }
            }
            Ok(spec) => {
                if let Err(message) = budget.check(&std::sync::Arc::new(spec), None, args.model.as_deref())? {
                    eprintln!("{}: error: {message}", file.display());
                    return Ok(1);
                }
                println!("ok: {}", file.display())
            }
            Err(err) => {
                eprintln!("{err}");
                let n = err.diagnostics.len();
                eprintln!("{}: {n} error{}", file.display(), if n == 1 { "" } else { "s" });
                return Ok(1);
            }
        }
    }
    Ok(0)
}
