//! `etpo perplexity`: perplexity of a model, and of the model with a trained adapter, on text
//! files (the paper's Table 3 check that RL training left the language model intact).

use crate::commands::model_args::{AdapterArg, ModelArgs};
use std::path::PathBuf;

use anyhow::{bail, Context};
use trainer::etpo::eval::{negative_log_likelihood, Nll};

#[derive(clap::Args)]
pub struct Args {
    /// Text files to score
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// With `--adapter`, the adapter's perplexity is reported beside the base model's.
    #[command(flatten)]
    adapter: AdapterArg,
    /// Tokens per evaluation window (windows do not overlap; each starts without context)
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Windows per forward pass
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// One JSON object per file instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.window < 2 {
        bail!("--window must be at least 2 tokens");
    }
    let mut loaded = args.model.load()?;
    let adapter = args.adapter.apply(&mut loaded.model, "perplexity")?;
    if !args.json {
        match adapter {
            Some(_) => {
                println!("{:<40} {:>8} {:>10} {:>12} {:>8}", "file", "tokens", "base ppl", "adapter ppl", "ratio")
            }
            None => println!("{:<40} {:>8} {:>10}", "file", "tokens", "ppl"),
        }
    }
    for file in &args.files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let tokens = loaded.tokenizer.encode(&text).with_context(|| format!("tokenising {}", file.display()))?;
        if tokens.len() < 2 {
            bail!("{}: fewer than 2 tokens, nothing to score", file.display());
        }
        let score = |a: Option<&str>| -> anyhow::Result<Nll> {
            negative_log_likelihood(&loaded.model, &tokens, a, args.window, args.batch)
                .with_context(|| format!("scoring {}", file.display()))
        };
        let base = score(None)?;
        let tuned = adapter.map(|a| score(Some(a))).transpose()?;
        let name = file.display().to_string();
        if args.json {
            let mut obj = serde_json::json!({
                "file": name, "tokens": base.tokens, "base_nll": base.sum, "base_ppl": base.perplexity(),
            });
            if let Some(t) = tuned {
                obj["adapter_nll"] = t.sum.into();
                obj["adapter_ppl"] = t.perplexity().into();
            }
            println!("{obj}");
        } else if let Some(t) = tuned {
            let (b, a) = (base.perplexity(), t.perplexity());
            println!("{name:<40} {:>8} {b:>10.3} {a:>12.3} {:>8.4}", base.tokens, a / b);
        } else {
            println!("{name:<40} {:>8} {:>10.3}", base.tokens, base.perplexity());
        }
    }
    Ok(0)
}
