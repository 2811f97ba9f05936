//! `etpo bench model`: generation tokens/s and one LoRA training step, etpo (candle) against
//! PyTorch + transformers + peft on the same GGUF, measured in one run on this machine.
//!
//! Both sides get the same token ids: the prompt is tokenised here and handed to the Python side
//! as ids, and the training batch is a fixed formula both implement. Generation is forced to the
//! full number of new tokens on both sides (EOS ignored), so tokens/s compare like with like.
//!
//! etpo's generation is measured with the f32 weights and with block copies of the linear weights
//! (4-bit where the weights have that form, else 8-bit; what `load_model` samples with on the
//! CPU), without and with a LoRA adapter; PyTorch's in each `--reference-dtypes` (f32 and bf16 on
//! the CPU). All of them take turns run by run, PyTorch's in processes that generate on request
//! (`reference.rs`), and the quantised figures are judged against PyTorch's best: at least 3x at
//! batch 1 and 2x at batch 8 (issue 21), also round by round.

use super::{load_average, reference};
use crate::commands::model_args::ModelArgs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use candle_nn::Optimizer;
use serde::Serialize;
use trainer::bf16::MatmulPrecision;
use trainer::{GenerateConfig, GenerationWeights, LoraConfig};

#[derive(clap::Args)]
pub struct Args {
    /// The model (a GGUF file) and device (f32 on CPU, bf16 on CUDA, on both sides).
    #[command(flatten)]
    pub(super) model: ModelArgs,
    /// Timed runs per figure (after one warm-up run); the median is reported
    #[arg(long, default_value_t = 3)]
    pub(super) repeats: usize,
    /// Generation batch sizes
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    pub(super) batches: Vec<usize>,
    /// New tokens per generated row
    #[arg(long, default_value_t = 128)]
    pub(super) new_tokens: usize,
    /// Rows of the training batch
    #[arg(long, default_value_t = 4)]
    pub(super) train_batch: usize,
    /// Tokens per training row
    #[arg(long, default_value_t = 320)]
    pub(super) train_len: usize,
    /// LoRA rank (alpha = 2 x rank, all seven projections)
    #[arg(long, default_value_t = 8)]
    pub(super) rank: usize,
    /// Skip the generation rows with a LoRA adapter (rank --rank on all seven projections)
    #[arg(long)]
    no_adapter: bool,
    /// PyTorch dtypes measured; etpo is compared with the fastest [default: float32,bfloat16 on
    /// the CPU (the training step in bfloat16 only where the CPU has AVX512-BF16), bfloat16 on CUDA]
    #[arg(long, value_delimiter = ',', value_name = "DTYPES")]
    reference_dtypes: Option<Vec<String>>,
    /// Python of the reference environment [default: $ETPO_REF_PYTHON, else <repo>/.venv-ref/bin/python]
    #[arg(long, value_name = "PATH")]
    pub(super) python: Option<PathBuf>,
    /// Measure etpo only (no PyTorch reference, no ratios)
    #[arg(long)]
    no_reference: bool,
    /// Measure only generation or only the training step
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Also write every figure as JSON to this file
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// One half of the benchmark.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Part {
    Generate,
    Train,
}

/// The sampling every figure uses: the paper's temperature 0.5 and top-k 50.
pub(super) const TEMPERATURE: f64 = 0.5;
pub(super) const TOP_K: usize = 50;

/// A prompt shaped like a spec's first state (about 150 tokens).
const PROMPT: &str = "You are an expert data scientist. Write the body of `build_model` so that it returns a \
scikit-learn classifier fitted on the training data.\n\nData set: Balance Scale. 4 numeric features \
(left_weight, left_distance, right_weight, right_distance), 3 classes (L, B, R), 312 training rows.\n\n\
```python\nfrom sklearn.ensemble import RandomForestClassifier\nfrom sklearn.linear_model import \
LogisticRegression\n\ndef build_model(x_train, y_train):\n    \"\"\"Return a fitted classifier.\"\"\"\n";

/// Training-batch token ids; `train_ids` in trainer/benches/torch_reference.py is the same formula.
fn train_ids(batch: usize, len: usize, vocab: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(batch * len);
    for b in 0..batch {
        for t in 0..len {
            ids.push(((b * 7919 + t * 104_729 + 13) % vocab) as u32);
        }
    }
    ids
}

/// Issue 21's targets for quantised generation: etpo's tokens/s over PyTorch's best, by batch.
const TARGETS: [(usize, f64); 2] = [(1, 3.0), (8, 2.0)];
/// Issue 21's training target: etpo's LoRA step at least this much faster than PyTorch's fastest
/// dtype on the same machine.
const TRAIN_TARGET: f64 = 1.3;

#[derive(Debug, Serialize)]
pub(super) struct GenFigure {
    pub(super) batch: usize,
    /// etpo: `f32` or `quantized`; PyTorch: its dtype.
    pub(super) weights: String,
    /// Generated with a LoRA adapter (etpo only).
    pub(super) adapter: bool,
    pub(super) tokens_per_s: f64,
    /// The timed runs, in the order of the rounds (both sides' runs take turns round by round).
    pub(super) seconds: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct Figures {
    pub(super) load_s: f64,
    pub(super) generate: Vec<GenFigure>,
    pub(super) train_step_s: Option<f64>,
    pub(super) train_seconds: Vec<f64>,
    pub(super) peak_rss_mb: Option<f64>,
    /// etpo: peak RSS once f32 generation has run, before the quantised copies exist.
    pub(super) peak_rss_f32_generate_mb: Option<f64>,
    /// etpo: peak RSS once quantised generation (without adapter) has run too.
    pub(super) peak_rss_quantized_generate_mb: Option<f64>,
    /// etpo: bytes of the quantised copies, in MB.
    pub(super) quantized_copies_mb: Option<f64>,
    /// etpo: what the quantised copies are.
    pub(super) quantized_layout: Option<String>,
    /// etpo: the precision of the training step's frozen-weight products (`train_step_s`).
    pub(super) train_precision: Option<String>,
    /// etpo: the training step in the other precision, where bf16 products are available.
    pub(super) train_other: Option<(String, f64)>,
    /// etpo: ‖g_bf16 − g_f32‖ / ‖g_f32‖ over all the adapter's gradients of the first step, where
    /// both precisions ran.
    pub(super) train_grad_rel_err: Option<f64>,
}

impl Figures {
    fn gen(&self, batch: usize, weights: &str, adapter: bool) -> Option<f64> {
        self.generate
            .iter()
            .find(|g| g.batch == batch && g.weights == weights && g.adapter == adapter)
            .map(|g| g.tokens_per_s)
    }
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.repeats == 0 || args.batches.is_empty() || args.batches.contains(&0) || args.train_len < 2 {
        bail!("--repeats, --batches and --train-batch must be positive and --train-len at least 2");
    }
    let model_path = args.model.path();
    if !model_path.is_file() {
        bail!("{} is not a GGUF file (the default model is fetched by `scripts/setup.sh model`)", model_path.display());
    }
    let device = trainer::parse_device(&args.model.device)?;
    let ref_dtypes = args.reference_dtypes.clone().unwrap_or_else(|| {
        if device.is_cuda() {
            vec!["bfloat16".into()]
        } else {
            vec!["float32".into(), "bfloat16".into()]
        }
    });
    if ref_dtypes.is_empty() || ref_dtypes.iter().any(|d| d != "float32" && d != "bfloat16") {
        bail!("--reference-dtypes: expected float32 and/or bfloat16");
    }
    let python = reference::python(&args);
    if !args.no_reference && !python.is_file() {
        bail!(
            "the PyTorch reference environment is missing ({} not found): create it with \
             `scripts/setup.sh ref` (about 4.5 GB), point --python or $ETPO_REF_PYTHON at one with \
             torch, transformers, gguf and peft, or pass --no-reference",
            python.display()
        );
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "etpo bench model: {} on {} ({}), {threads} threads of {}; median of {} runs after a warm-up",
        model_path.file_name().map_or_else(|| model_path.display().to_string(), |n| n.to_string_lossy().into_owned()),
        args.model.device,
        if device.is_cuda() { "bf16" } else { "f32" },
        super::cpu_model(),
        args.repeats,
    );

    let load_before = load_average();
    // The prompt's ids come from etpo's tokenizer, and both sides run on them.
    let prompt_ids = gguf_tokenizer(&model_path)?.encode(PROMPT)?;
    // PyTorch's training steps first, each dtype in a process of its own (see `reference.rs`);
    // its generation in one process per dtype that takes turns with etpo's runs.
    let (mut train_refs, mut servers) = (Vec::new(), Vec::new());
    if !args.no_reference {
        if args.only != Some(Part::Generate) {
            for dtype in train_dtypes(&args, &ref_dtypes, &device) {
                let step = reference::measure_train_step(&args, &python, &model_path, &prompt_ids, &dtype)?;
                train_refs.push((dtype.clone(), step));
            }
        }
        if args.only != Some(Part::Train) {
            for dtype in &ref_dtypes {
                servers.push(reference::Server::start(&args, &python, &model_path, &prompt_ids, dtype)?);
            }
        }
    }
    let ours = measure_etpo(&args, &model_path, &device, &prompt_ids, &mut servers)?;
    let theirs = reference::combine(&servers, train_refs, args.new_tokens);
    print_table(&args, &ours, &theirs, prompt_ids.len());
    let load_after = load_average();
    if let (Some(before), Some(after)) = (load_before, load_after) {
        println!("1-minute load average: {before:.1} at the start, {after:.1} at the end ({threads} cores)");
        if before.max(after) > threads as f64 + 0.5 {
            println!("warning: other processes were busy; both sides slow down, PyTorch's threads the most");
        }
    }

    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "model": model_path, "device": args.model.device, "threads": threads, "repeats": args.repeats,
            "new_tokens": args.new_tokens, "temperature": TEMPERATURE, "top_k": TOP_K,
            "train_batch": args.train_batch, "train_len": args.train_len, "rank": args.rank,
            "prompt_tokens": prompt_ids.len(), "etpo": ours,
            "torch": theirs.iter().map(|(d, f)| serde_json::json!({"dtype": d, "figures": f})).collect::<Vec<_>>(),
            "load_average_start": load_before, "load_average_end": load_after,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}

/// The PyTorch dtypes whose training step is measured: those asked for, else the generation
/// dtypes less bf16 on a CPU without bf16 instructions, where PyTorch's bf16 step is no one's
/// best configuration and takes minutes (on the 2-core EPYC, warm-up and 3 steps at 4 × 320
/// tokens had not finished after 20 minutes, against 12.3 s per step in f32).
fn train_dtypes(args: &Args, ref_dtypes: &[String], device: &Device) -> Vec<String> {
    if args.reference_dtypes.is_some() || device.is_cuda() || trainer::bf16::cpu_multiplies_bf16() {
        return ref_dtypes.to_vec();
    }
    let f32_only: Vec<String> = ref_dtypes.iter().filter(|d| *d != "bfloat16").cloned().collect();
    if f32_only.is_empty() {
        ref_dtypes.to_vec()
    } else {
        f32_only
    }
}

pub(super) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `f` once to warm up, then `repeats` times; returns the timed durations in seconds.
fn timed(repeats: usize, device: &Device, mut f: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(repeats);
    for rep in 0..=repeats {
        let t0 = Instant::now();
        f(rep)?;
        device.synchronize()?;
        if rep > 0 {
            out.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

fn gguf_tokenizer(path: &Path) -> anyhow::Result<trainer::Tokenizer> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
    Ok(trainer::Tokenizer::from_gguf(&content)?)
}

/// etpo's figures. Its generation runs take turns with `servers`' (PyTorch's), which are
/// finished once generation is measured, before the training step.
fn measure_etpo(
    args: &Args,
    model_path: &Path,
    device: &Device,
    prompt_ids: &[u32],
    servers: &mut [reference::Server],
) -> anyhow::Result<Figures> {
    let t0 = Instant::now();
    let loaded =
        trainer::load_model(model_path, device).with_context(|| format!("loading {}", model_path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut model = loaded.model;
    // The training step's passes recompute their blocks in the backward pass when asked.
    model.set_activation_checkpointing(args.model.activation_checkpointing);
    let tok = loaded.tokenizer;
    let pad = tok.pad_token_id().or(tok.eos_token_id()).unwrap_or(0);
    let lora = LoraConfig { rank: args.rank, alpha: 2.0 * args.rank as f64, ..LoraConfig::default() };

    // The variants taking turns: f32 and the quantised copies (CPU f32 models only), each without
    // and with an adapter (B = 0 costs the same products as a trained one).
    let weights: Vec<GenerationWeights> = if model.can_quantize() {
        vec![GenerationWeights::Exact, GenerationWeights::Quantized]
    } else {
        eprintln!(
            "note: quantised generation weights need an f32 model on the CPU; measuring the model's weights only"
        );
        vec![GenerationWeights::Exact]
    };
    let adapters: &[Option<&str>] = if args.no_adapter { &[None] } else { &[None, Some("gen")] };
    if !args.no_adapter {
        model.add_adapter("gen", &lora)?;
    }
    let variants: Vec<(GenerationWeights, Option<&str>)> =
        adapters.iter().flat_map(|&a| weights.iter().map(move |&w| (w, a))).collect();

    let mut generate = Vec::new();
    let (mut peak_f32, mut peak_quantized, mut copies_mb, mut layout) = (None, None, None, None);
    let batches: &[usize] = if args.only == Some(Part::Train) { &[] } else { &args.batches };
    let one_run = |model: &mut trainer::Llama,
                   batch: usize,
                   (w, adapter): (GenerationWeights, Option<&str>),
                   seed: u64|
     -> anyhow::Result<f64> {
        model.set_generation_weights(w);
        let prompts = vec![prompt_ids.to_vec(); batch];
        let cfg = GenerateConfig {
            max_new_tokens: args.new_tokens,
            temperature: TEMPERATURE,
            top_k: Some(TOP_K),
            top_p: None,
            stop: Vec::new(),
            seed,
        };
        let decode = |ids: &[u32]| tok.decode(ids).map_err(|e| trainer::ModelError::Tokenizer(e.to_string()));
        device.synchronize()?;
        let t0 = Instant::now();
        // No EOS: every row generates exactly `new_tokens`, as on the PyTorch side.
        let out = trainer::generate::generate_with(model, &prompts, &cfg, adapter, None, pad, &decode)?;
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        let n: usize = out.iter().map(|c| c.tokens.len()).sum();
        if n != batch * args.new_tokens {
            bail!("generated {n} tokens, expected {}", batch * args.new_tokens);
        }
        Ok(dt)
    };
    // Warm-ups, in an order that separates the memory each path needs: f32 first (its peak is
    // read before any quantised copy exists), then the quantised copies are made, then the
    // adapter variants (f32 merges the adapter into a copy of the weights it adapts).
    for &v in &variants {
        for &batch in batches {
            one_run(&mut model, batch, v, 0)?;
        }
        if v.0 == GenerationWeights::Exact && v.1.is_none() {
            peak_f32 = peak_rss_mb();
        } else if v.0 != GenerationWeights::Exact && v.1.is_none() {
            peak_quantized = peak_rss_mb();
            let q = model.generation_quantized()?;
            copies_mb = q.map(|q| q.size_in_bytes() as f64 / 1e6);
            layout = q.map(|q| q.describe());
        }
    }
    for server in servers.iter_mut() {
        for &batch in batches {
            server.generate(batch, 0, false)?;
        }
    }
    // Timed runs: the variants, then PyTorch's dtypes, take turns run by run, so a change in the
    // machine's speed falls on all of them alike.
    for &batch in batches {
        let mut seconds = vec![Vec::with_capacity(args.repeats); variants.len()];
        for rep in 1..=args.repeats {
            if !servers.is_empty() {
                std::thread::sleep(reference::SETTLE);
            }
            for (i, &v) in variants.iter().enumerate() {
                seconds[i].push(one_run(&mut model, batch, v, rep as u64)?);
            }
            for server in servers.iter_mut() {
                std::thread::sleep(reference::SETTLE);
                let s = server.generate(batch, rep as u64, true)?;
                eprintln!(
                    "PyTorch {} batch {batch}, run {rep}: {:.1} tokens/s",
                    server.dtype(),
                    (batch * args.new_tokens) as f64 / s
                );
            }
        }
        for (&(w, adapter), seconds) in variants.iter().zip(seconds) {
            let tokens_per_s = (batch * args.new_tokens) as f64 / median(&seconds);
            let with = if adapter.is_some() { " with a LoRA adapter" } else { "" };
            eprintln!("etpo generate batch {batch}, {} weights{with}: {tokens_per_s:.1} tokens/s", w.name());
            generate.push(GenFigure {
                batch,
                weights: w.name().into(),
                adapter: adapter.is_some(),
                tokens_per_s,
                seconds,
            });
        }
    }
    for server in servers.iter_mut() {
        server.finish()?;
    }
    model.set_generation_weights(GenerationWeights::Exact);
    model.drop_quantized();

    if args.only == Some(Part::Generate) {
        return Ok(Figures {
            load_s,
            generate,
            train_step_s: None,
            train_seconds: Vec::new(),
            peak_rss_mb: peak_rss_mb(),
            peak_rss_f32_generate_mb: peak_f32,
            peak_rss_quantized_generate_mb: peak_quantized,
            quantized_copies_mb: copies_mb,
            quantized_layout: layout,
            ..Figures::default()
        });
    }
    model.add_adapter("bench", &lora)?;
    let mut opt = candle_nn::AdamW::new_lr(model.adapter_vars("bench"), 1e-4)?;
    let vocab = model.config().vocab_size;
    let (b, t) = (args.train_batch, args.train_len);
    let ids = train_ids(b, t, vocab);
    let x = Tensor::from_vec(ids.clone(), (b, t), device)?;
    let targets: Vec<u32> = ids.chunks(t).flat_map(|row| row[1..].to_vec()).collect();
    let opts = trainer::ForwardOptions { adapter: Some("bench"), track_grad: true, dropout_seed: None };
    // Logits only of the rows that predict a token, then the mean negative log-likelihood of the
    // next token, as torch's cross_entropy computes it.
    let gradients = |model: &trainer::Llama| -> anyhow::Result<candle_core::backprop::GradStore> {
        let hidden = model.forward_hidden(&x, None, &opts)?;
        let rows = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), ()))?;
        let loss = trainer::ops::cross_entropy(&model.logits(&rows)?, &targets)?;
        Ok(model.backward(&loss)?)
    };
    // The model's own precision, and the other one too where bf16 products are available: the
    // first step's gradients of both (same adapter), then each one's timed steps.
    let own = model.matmul_precision();
    let other = match own {
        MatmulPrecision::F32 => MatmulPrecision::Bf16,
        MatmulPrecision::Bf16 => MatmulPrecision::F32,
    };
    let both = device.is_cpu() && trainer::bf16::library().is_some();
    let mut grad_rel_err = None;
    if both {
        let flat = |model: &trainer::Llama| -> anyhow::Result<Vec<f32>> {
            let g = gradients(model)?;
            let mut all = Vec::new();
            for v in model.adapter_vars("bench") {
                if let Some(t) = g.get(v.as_tensor()) {
                    all.extend(t.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            Ok(all)
        };
        model.set_matmul_precision(MatmulPrecision::F32)?;
        let g32 = flat(&model)?;
        model.set_matmul_precision(MatmulPrecision::Bf16)?;
        let g16 = flat(&model)?;
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let diff = norm(&mut g16.iter().zip(&g32).map(|(a, b)| (a - b) as f64));
        grad_rel_err = Some(diff / norm(&mut g32.iter().map(|&x| x as f64)));
    }
    let mut step_in = |model: &mut trainer::Llama, precision: MatmulPrecision| -> anyhow::Result<Vec<f64>> {
        model.set_matmul_precision(precision)?;
        let seconds = timed(args.repeats, device, |_| {
            opt.step(&gradients(model)?)?;
            Ok(())
        })?;
        let how = if model.activation_checkpointing() { ", activation checkpointing" } else { "" };
        eprintln!("etpo LoRA step ({} products{how}): {:.2} s", precision.name(), median(&seconds));
        Ok(seconds)
    };
    let train_seconds = step_in(&mut model, own)?;
    let train_other = if both { Some((other.name().to_string(), median(&step_in(&mut model, other)?))) } else { None };
    model.set_matmul_precision(own)?;
    let train_step_s = median(&train_seconds);
    Ok(Figures {
        train_precision: Some(own.name().to_string()),
        train_other,
        train_grad_rel_err: grad_rel_err,
        load_s,
        generate,
        train_step_s: Some(train_step_s),
        train_seconds,
        peak_rss_mb: peak_rss_mb(),
        peak_rss_f32_generate_mb: peak_f32,
        peak_rss_quantized_generate_mb: peak_quantized,
        quantized_copies_mb: copies_mb,
        quantized_layout: layout,
    })
}

/// This process's peak resident memory (VmHWM), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn print_table(args: &Args, ours: &Figures, theirs: &[(String, Figures)], prompt_tokens: usize) {
    println!(
        "generation: {prompt_tokens}-token prompt, {} new tokens per row, temperature {TEMPERATURE}, top-k {TOP_K}; \
         training: LoRA rank {} on all 7 projections, batch {} x {} tokens, forward + backward + AdamW",
        args.new_tokens, args.rank, args.train_batch, args.train_len
    );
    let cell = |x: Option<f64>, prec: usize| x.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let q = GenerationWeights::Quantized.name();
    let has_q = ours.generate.iter().any(|g| g.weights == q);
    let batches: Vec<usize> = {
        let mut b: Vec<usize> = ours.generate.iter().map(|g| g.batch).collect();
        b.dedup();
        b
    };
    if !batches.is_empty() {
        // Generation: etpo's weights side by side, PyTorch's dtypes, and the ratios to PyTorch's best.
        let mut head = format!("{:<30} {:>9}", "generation (tokens/s)", "etpo f32");
        if has_q {
            head += &format!(" {:>9}", format!("etpo {q}"));
        }
        for (d, _) in theirs {
            head += &format!(" {:>13}", format!("PyTorch {}", short_dtype(d)));
        }
        if !theirs.is_empty() {
            head += &format!(" {:>9}", "f32/best");
            if has_q {
                head += &format!(" {:>9} {:>16}", format!("{q}/best"), "target");
            }
        }
        println!("{head}");
        for &batch in &batches {
            for adapter in [false, true] {
                let f32_speed = ours.gen(batch, "f32", adapter);
                if f32_speed.is_none() {
                    continue;
                }
                let q_speed = ours.gen(batch, q, adapter);
                let label = if adapter {
                    format!("batch {batch}, LoRA r{} adapter", args.rank)
                } else {
                    format!("batch {batch}")
                };
                let mut line = format!("{label:<30} {:>9}", cell(f32_speed, 1));
                if has_q {
                    line += &format!(" {:>9}", cell(q_speed, 1));
                }
                let torch = |f: &Figures| f.generate.iter().find(|g| g.batch == batch).map(|g| g.tokens_per_s);
                let best = theirs.iter().filter_map(|(_, f)| torch(f)).reduce(f64::max);
                for (_, f) in theirs {
                    line += &format!(" {:>13}", cell(if adapter { None } else { torch(f) }, 1));
                }
                if !theirs.is_empty() {
                    line += &format!(" {:>9}", ratio(f32_speed, best));
                    if has_q {
                        line += &format!(" {:>9}", ratio(q_speed, best));
                        let target = TARGETS.iter().find(|(b, _)| *b == batch).map(|&(_, t)| t);
                        if let (Some(t), Some(qs), Some(best), false) = (target, q_speed, best, adapter) {
                            let met = if qs / best >= t { "met" } else { "NOT met" };
                            line += &format!(" {:>16}", format!(">= {t:.0}x: {met}"));
                        }
                    }
                }
                println!("{line}");
            }
        }
        if !theirs.is_empty() {
            println!("best = PyTorch's fastest dtype at that batch; PyTorch generates without an adapter");
            for &batch in &batches {
                let per_round = round_ratios(ours, theirs, batch, q);
                if let (Some(lo), Some(hi)) = (per_round.first(), per_round.last()) {
                    println!(
                        "batch {batch}, {q}/best round by round ({} rounds; in each, etpo's runs, then PyTorch's): \
                         median {:.2}x, range {lo:.2}x to {hi:.2}x",
                        per_round.len(),
                        median(&per_round)
                    );
                }
            }
        }
        if has_q {
            println!(
                "etpo {q}: copies of the linear weights in blocks ({}), activations and LoRA adapters in f32; \
                 the prompt pass and training use the f32 weights",
                ours.quantized_layout.as_deref().unwrap_or("-")
            );
        }
    }

    // Training: etpo in its own precision (and the other one, where both ran) against PyTorch's
    // fastest dtype.
    let train_ref = theirs
        .iter()
        .filter(|(_, t)| t.train_step_s.is_some())
        .min_by(|a, b| a.1.train_step_s.unwrap_or(f64::INFINITY).total_cmp(&b.1.train_step_s.unwrap_or(f64::INFINITY)));
    let best_step = train_ref.and_then(|(_, t)| t.train_step_s);
    if ours.train_step_s.is_some() || best_step.is_some() {
        let mut head = format!("{:<30} {:>9}", "", format!("etpo {}", ours.train_precision.as_deref().unwrap_or("")));
        if let Some((p, _)) = &ours.train_other {
            head += &format!(" {:>9}", format!("etpo {p}"));
        }
        for (d, _) in theirs.iter().filter(|(_, t)| t.train_step_s.is_some()) {
            head += &format!(" {:>13}", format!("PyTorch {}", short_dtype(d)));
        }
        println!("{head} {:>9} {:>16}", "etpo/best", "target");
        let mut line = format!(
            "{:<30} {:>9}",
            format!("LoRA step {}x{} (s)", args.train_batch, args.train_len),
            cell(ours.train_step_s, 2)
        );
        if let Some((_, s)) = &ours.train_other {
            line += &format!(" {:>9}", cell(Some(*s), 2));
        }
        for (_, t) in theirs.iter().filter(|(_, t)| t.train_step_s.is_some()) {
            line += &format!(" {:>13}", cell(t.train_step_s, 2));
        }
        // A speed ratio: the reference's time over etpo's.
        line += &format!(" {:>9}", ratio(best_step, ours.train_step_s));
        if let (Some(ours), Some(best)) = (ours.train_step_s, best_step) {
            let met = if best / ours >= TRAIN_TARGET { "met" } else { "NOT met" };
            line += &format!(" {:>16}", format!(">= {TRAIN_TARGET:.1}x: {met}"));
        }
        println!("{line}");
        if !theirs.is_empty() {
            println!("best = PyTorch's fastest dtype for the step; etpo/best = its time over etpo's (above 1: etpo is faster)");
        }
        if let (Some(e), Some((p, _))) = (ours.train_grad_rel_err, &ours.train_other) {
            println!(
                "etpo bf16 against f32 products, the first step's adapter gradients: relative difference {e:.4} \
                 (|g_bf16 - g_f32| / |g_f32|); etpo {} is what etpo picks here, etpo {p} the other",
                ours.train_precision.as_deref().unwrap_or("-")
            );
        }
    }
    println!(
        "{:<30} {:>9} {:>13}",
        "peak RSS of the process (MB)",
        cell(ours.peak_rss_mb, 0),
        cell(theirs.iter().filter_map(|(_, t)| t.peak_rss_mb).reduce(f64::max), 0)
    );
    if let (Some(a), Some(b)) = (ours.peak_rss_f32_generate_mb, ours.peak_rss_quantized_generate_mb) {
        println!(
            "peak RSS after f32 generation {a:.0} MB, after {q} generation too {b:.0} MB ({:+.0} MB; the {q} copies hold {} MB)",
            b - a,
            cell(ours.quantized_copies_mb, 0)
        );
    }
    println!(
        "{:<30} {:>9} {:>13}",
        "model load (s)",
        cell(Some(ours.load_s), 1),
        cell(train_ref.map(|(_, t)| t.load_s), 1)
    );
    println!("etpo speed = etpo throughput / PyTorch throughput (above 1: etpo is faster)");
}

/// etpo's tokens/s with `weights` (no adapter) over PyTorch's fastest dtype, round by round
/// (run `r` of each side ran in the same round), sorted; empty when a side has no runs.
fn round_ratios(ours: &Figures, theirs: &[(String, Figures)], batch: usize, weights: &str) -> Vec<f64> {
    let runs = |f: &Figures, w: Option<&str>| -> Vec<f64> {
        f.generate
            .iter()
            .find(|g| g.batch == batch && !g.adapter && w.is_none_or(|w| g.weights == w))
            .map(|g| g.seconds.clone())
            .unwrap_or_default()
    };
    let ours = runs(ours, Some(weights));
    let theirs: Vec<Vec<f64>> = theirs.iter().map(|(_, f)| runs(f, None)).filter(|s| s.len() == ours.len()).collect();
    if ours.is_empty() || theirs.is_empty() {
        return Vec::new();
    }
    let mut ratios: Vec<f64> = (0..ours.len())
        .map(|r| {
            // Same tokens on both sides: the ratio of speeds is the inverse ratio of times.
            let best = theirs.iter().map(|s| s[r]).fold(f64::INFINITY, f64::min);
            best / ours[r]
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios
}

/// `float32` -> `f32`, `bfloat16` -> `bf16`.
fn short_dtype(d: &str) -> &str {
    match d {
        "float32" => "f32",
        "bfloat16" => "bf16",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    fn gen(batch: usize, weights: &str, seconds: &[f64]) -> GenFigure {
        GenFigure { batch, weights: weights.into(), adapter: false, tokens_per_s: 0.0, seconds: seconds.to_vec() }
    }

    #[test]
    fn round_ratios_compare_each_round_with_its_fastest_reference() {
        let ours = Figures {
            generate: vec![gen(1, "f32", &[9.0, 9.0, 9.0]), gen(1, "quantized", &[1.0, 2.0, 0.5])],
            ..Figures::default()
        };
        let theirs = vec![
            (
                "float32".to_string(),
                Figures { generate: vec![gen(1, "float32", &[3.0, 4.0, 2.0])], ..Figures::default() },
            ),
            (
                "bfloat16".to_string(),
                Figures { generate: vec![gen(1, "bfloat16", &[4.0, 3.0, 1.0])], ..Figures::default() },
            ),
            // A training-step-only figure has no runs and takes no part.
            ("float32".to_string(), Figures::default()),
        ];
        // Round by round, the faster reference over ours: 3/1, 3/2, 1/0.5; sorted.
        assert_eq!(round_ratios(&ours, &theirs, 1, "quantized"), vec![1.5, 2.0, 3.0]);
        assert!(round_ratios(&ours, &theirs, 8, "quantized").is_empty());
        assert!(round_ratios(&ours, &theirs[2..], 1, "quantized").is_empty());
    }

    #[test]
    fn train_ids_follow_the_shared_formula() {
        // (b * 7919 + t * 104729 + 13) % vocab, also in torch_reference.py.
        let ids = train_ids(2, 2, 1000);
        assert_eq!(ids, vec![13, 742, 932, 661]);
    }
}
