//! `etpo generate`: sample completions of a model for one prompt, to see what a model writes for a
//! spec (`etpo show` prints the exact prompt text; pipe it in with `--prompt-file -`).

use crate::commands::model_args::{AdapterArg, ModelArgs};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use trainer::{FinishReason, GenerateConfig};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// File with the prompt text, sent as is (`-` reads standard input)
    #[arg(long, value_name = "FILE")]
    prompt_file: PathBuf,
    /// Wrap the prompt as one user message in the model's chat template (with the assistant
    /// turn opened) instead of sending it as plain text
    #[arg(long)]
    chat: bool,
    /// Number of completions, sampled together in one batch
    #[arg(long, short = 'n', default_value_t = 1)]
    n: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.5)]
    temperature: f64,
    /// Sample only among the k most likely tokens (0: no limit)
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probability adds up to p
    #[arg(long)]
    top_p: Option<f64>,
    /// Upper bound on generated tokens per completion
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Stop a completion at this text (repeatable); the text is cut before it
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Seed of the sampling streams: the same seed gives the same completions
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    adapter: AdapterArg,
    /// One JSON object per completion (text, tokens, logprobs, finish) instead of text
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let prompt = read_prompt(&args.prompt_file)?;
    let model_path = args.model.path();

    let started = Instant::now();
    let mut loaded = args.model.load()?;
    let adapter = args.adapter.apply(&mut loaded.model, "generate")?;
    eprintln!("loaded {} in {:.1} s", model_path.display(), started.elapsed().as_secs_f64());

    let text = if args.chat {
        let source = loaded.chat_template.as_deref().with_context(|| {
            format!("--chat: {} has no chat template (tokenizer.chat_template)", model_path.display())
        })?;
        let tok = &loaded.tokenizer;
        let template =
            envspec::ChatTemplate::new(source, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or(""))?;
        template.render(&[envspec::ChatMessage { role: "user".into(), content: prompt }], true)?
    } else {
        prompt
    };

    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: args.top_p,
        stop: args.stop.clone(),
        seed: args.seed,
    };
    let prompts = vec![text; args.n];
    let started = Instant::now();
    let completions = trainer::generate(&loaded.model, &loaded.tokenizer, &prompts, &cfg, adapter)?;
    let seconds = started.elapsed().as_secs_f64();
    let generated: usize = completions.iter().map(|c| c.tokens.len()).sum();
    eprintln!(
        "prompt {} tokens; generated {generated} tokens in {seconds:.1} s ({:.1} tokens/s)",
        completions.first().map_or(0, |c| c.prompt_tokens),
        generated as f64 / seconds.max(1e-9)
    );

    let mut out = std::io::stdout().lock();
    for (i, c) in completions.iter().enumerate() {
        if args.json {
            serde_json::to_writer(&mut out, c)?;
            writeln!(out)?;
        } else {
            let mean_logprob = if c.logprobs.is_empty() {
                0.0
            } else {
                c.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / c.logprobs.len() as f64
            };
            writeln!(
                out,
                "--- completion {} of {} ({} tokens, ended by {}, mean logprob {mean_logprob:.3}) ---",
                i + 1,
                completions.len(),
                c.tokens.len(),
                match c.finish {
                    FinishReason::Eos => "end of sequence",
                    FinishReason::Stop => "stop text",
                    FinishReason::Length => "max new tokens",
                },
            )?;
            writeln!(out, "{}", c.text)?;
        }
    }
    Ok(0)
}

fn read_prompt(path: &PathBuf) -> anyhow::Result<String> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading the prompt from standard input")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading the prompt file {}", path.display()))?
    };
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(text)
}
