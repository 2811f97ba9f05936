//! `etpo bench train`: the cost of one ETPO update, split into its phases (generation of the
//! batch, soft Bellman targets, the Q-network's and the policy's forward + backward passes),
//! with and without running shared state prompts once, side by side in one run, plus peak
//! memory; and the update's matrix-product work against the rate this machine reaches on one
//! of the model's own products, which bounds how fast an update can be.

use crate::commands::model_args::ModelArgs;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::DType;
use trainer::bf16::{Bf16Matrix, FrozenWeight, MatmulPrecision};
use trainer::etpo::{EtpoConfig, EtpoTrainer, Transition, UpdateMetrics, POLICY, Q, Q_TARGET};
use trainer::model::{Llama, LlamaConfig};
use trainer::GenerateConfig;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Instead of a model file, random weights of this shape: `codellama-7b` (for GPUs without
    /// a checkpoint at hand)
    #[arg(long, value_name = "SHAPE", conflicts_with = "model")]
    random: Option<String>,
    /// Actions in the batch
    #[arg(long, default_value_t = 16)]
    actions: usize,
    /// Tokens per action
    #[arg(long, default_value_t = 256)]
    action_tokens: usize,
    /// Tokens per state prompt
    #[arg(long, default_value_t = 300)]
    prompt_tokens: usize,
    /// Distinct states the actions are sampled from (actions / states per state)
    #[arg(long, default_value_t = 4)]
    states: usize,
    /// Sequences per forward pass
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Skip the comparison run without prefix sharing (it takes the longest)
    #[arg(long)]
    no_compare: bool,
    /// Updates on the same batch with prefix sharing (per-update losses, KL and entropy are
    /// printed; the timing table shows the first)
    #[arg(long, default_value_t = 1)]
    updates: usize,
    /// Set an ETPO hyper-parameter, e.g. `--set q_readout=logits --set q_optim.lr=1e-3`
    /// (repeatable; keys as in a spec's training block and `EtpoConfig`)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Peak resident memory of this process since the last reset, in MiB (Linux; `None` elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak-RSS counter (Linux ≥ 4.0); returns whether it worked.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn codellama_7b() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32016,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 32,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        head_dim: 128,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 16384,
        tie_word_embeddings: false,
    }
}

/// Deterministic pseudo-random token ids (SplitMix64), avoiding ids below 3 (special tokens).
fn pseudo_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            3 + ((z ^ (z >> 31)) % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// The model's own matrix product at its feed-forward shape, `[1024, hidden] · [hidden,
/// intermediate]` through the frozen linear layer every projection uses: the best rate of 5, in
/// operations per second. This is the ceiling an update's products run against.
fn matmul_rate(model: &Llama) -> anyhow::Result<f64> {
    let c = model.config();
    let (rows, h, i) = (1024, c.hidden_size, c.intermediate_size);
    let x = candle_core::Tensor::randn(0f32, 1.0, (rows, h), model.device())?.to_dtype(model.dtype())?;
    let w = candle_core::Tensor::randn(0f32, 0.02, (i, h), model.device())?.to_dtype(model.dtype())?;
    // In the precision the model's own products use.
    let w16 = match model.matmul_precision() {
        MatmulPrecision::Bf16 => Some(std::sync::Arc::new(Bf16Matrix::from_tensor(&w)?)),
        MatmulPrecision::F32 => None,
    };
    let frozen = FrozenWeight { tensor: &w, bf16: w16.as_ref() };
    let work = 2.0 * (rows * h * i) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        let y = trainer::model::frozen_linear(&x, frozen)?;
        y.device().synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(work / best)
}

/// The update's products against the machine's rate: how long they would take at that rate,
/// and the fraction of it the update reached.
fn print_work(work: trainer::model::Flops, seconds: f64, rate: f64) {
    println!(
        "matrix-product work of the update: {:.1} GFLOP (forward {:.1}, backward {:.1}); at {:.1} GFLOP/s \
         (this machine, the model's own product) that is {:.1} s: the update ran at {:.0}% of it",
        work.total() / 1e9,
        work.forward / 1e9,
        work.backward / 1e9,
        rate / 1e9,
        work.total() / rate,
        100.0 * work.total() / rate / seconds
    );
}

fn print_row(label: &str, m: &UpdateMetrics, total: f64, peak: Option<f64>) {
    let t = &m.times;
    let peak = peak.map_or("n/a".to_string(), |p| format!("{p:.0}"));
    println!(
        "{label:<24} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {peak:>10}",
        t.targets_s, t.q_step_s, t.policy_step_s, t.polyak_s, total
    );
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.actions == 0 || args.states == 0 || args.action_tokens == 0 || args.prompt_tokens == 0 {
        bail!("--actions, --states, --action-tokens and --prompt-tokens must be positive");
    }
    if !args.actions.is_multiple_of(args.states) {
        bail!("--actions ({}) must be a multiple of --states ({})", args.actions, args.states);
    }
    let device = trainer::parse_device(&args.model.device)?;
    let started = Instant::now();
    let (mut model, label) = match &args.random {
        Some(shape) if shape == "codellama-7b" => {
            let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
            (Llama::random(codellama_7b(), 0, &device, dtype)?, format!("random {shape} ({dtype:?})"))
        }
        Some(other) => bail!("--random: unknown shape `{other}` (known: codellama-7b)"),
        None => {
            let path = args.model.path();
            let loaded =
                trainer::load_model(&path, &device).with_context(|| format!("loading the model {}", path.display()))?;
            (loaded.model, path.display().to_string())
        }
    };
    model.set_activation_checkpointing(args.model.activation_checkpointing);
    if args.random.is_some() && device.is_cpu() {
        // A loaded model has its precision from the loader already.
        model.set_matmul_precision(MatmulPrecision::for_this_machine()?)?;
    }
    let vocab = model.config().vocab_size;
    println!(
        "model: {label}, loaded in {:.1} s; device {}; CPU {}; activation checkpointing {}; {}",
        started.elapsed().as_secs_f64(),
        args.model.device,
        super::cpu_model(),
        if args.model.activation_checkpointing { "on" } else { "off" },
        super::matmul_line(&model)
    );
    println!(
        "batch: {} actions of {} tokens from {} states of {} tokens, micro-batch {}",
        args.actions, args.action_tokens, args.states, args.prompt_tokens, args.micro_batch
    );

    let mut cfg = EtpoConfig { micro_batch: args.micro_batch, ..EtpoConfig::default() };
    for kv in &args.set {
        let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        cfg.set(k, v).map_err(|e| anyhow::anyhow!("--set {kv}: {e}"))?;
    }
    if args.updates == 0 {
        bail!("--updates must be at least 1");
    }
    let mut trainer = EtpoTrainer::new(&mut model, cfg.clone())?;

    // Generation: every state's actions sampled together, exactly `action_tokens` each.
    let states: Vec<Vec<u32>> = (0..args.states).map(|i| pseudo_tokens(args.prompt_tokens, vocab, i as u64)).collect();
    let per_state = args.actions / args.states;
    let prompts: Vec<Vec<u32>> = states.iter().flat_map(|s| std::iter::repeat_n(s.clone(), per_state)).collect();
    let gen_cfg = GenerateConfig {
        max_new_tokens: args.action_tokens,
        temperature: 0.5,
        top_k: Some(50),
        top_p: None,
        stop: Vec::new(),
        seed: 0,
    };
    reset_peak_rss();
    let t0 = Instant::now();
    let completions =
        trainer::generate::generate_with(&model, &prompts, &gen_cfg, Some(POLICY), None, 0, &|_| Ok(String::new()))?;
    let gen_s = t0.elapsed().as_secs_f64();
    let gen_peak = peak_rss_mib();
    let generated: usize = completions.iter().map(|c| c.tokens.len()).sum();
    println!(
        "generation: {gen_s:.2} s for {generated} tokens ({:.1} tokens/s), peak RSS {} MiB",
        generated as f64 / gen_s,
        gen_peak.map_or("n/a".into(), |p| format!("{p:.0}"))
    );

    // Transitions: alternate rewards; half bootstrap from another state.
    let batch: Vec<Transition> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| Transition {
            state: prompts[i].clone(),
            action: c.tokens.clone(),
            reward: if i % 2 == 0 { 0.5 } else { -1.0 },
            next_state: (i % 2 == 1).then(|| states[(i / per_state + 1) % args.states].clone()),
            group: None,
        })
        .collect();

    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "ETPO update (s)", "targets", "Q f+b", "pi f+b", "polyak", "total", "peak MiB"
    );
    reset_peak_rss();
    let flops_before = model.flops();
    let t0 = Instant::now();
    let shared = trainer.update(&model, &batch)?;
    let shared_total = t0.elapsed().as_secs_f64();
    let shared_work = model.flops() - flops_before;
    print_row("shared state prefixes", &shared, shared_total, peak_rss_mib());
    if let (Some(checks), Some(scale)) = (shared.policy_step_checks, shared.policy_step_scale) {
        // Each check is a forward pass of π over the batch, inside "pi f+b".
        println!("trust region: {checks} KL check(s), {:.3} of the policy step kept", scale);
    }
    if args.updates > 1 {
        println!();
        println!(
            "{:>6} {:>10} {:>12} {:>10} {:>10} {:>8}",
            "update", "Q loss", "policy loss", "KL(pi|rho)", "entropy", "time s"
        );
        let line = |i: usize, m: &UpdateMetrics, s: f64| {
            println!("{i:>6} {:>10.4} {:>12.4} {:>10.4} {:>10.4} {s:>8.1}", m.q_loss, m.policy_loss, m.kl, m.entropy)
        };
        line(1, &shared, shared_total);
        for i in 2..=args.updates {
            let t0 = Instant::now();
            let m = trainer.update(&model, &batch)?;
            line(i, &m, t0.elapsed().as_secs_f64());
        }
    }

    if !args.no_compare {
        drop(trainer);
        for name in [POLICY, Q, Q_TARGET] {
            model.remove_adapter(name)?;
        }
        let mut plain = EtpoTrainer::new(&mut model, EtpoConfig { share_prefixes: false, ..cfg })?;
        reset_peak_rss();
        let t0 = Instant::now();
        let whole = plain.update(&model, &batch)?;
        let whole_total = t0.elapsed().as_secs_f64();
        print_row("whole sequences", &whole, whole_total, peak_rss_mib());
        println!();
        println!("speed-up of prefix sharing: {:.2}x per update", whole_total / shared_total);
        println!("update / generation time: {:.2}", shared_total / gen_s);
    }
    println!();
    print_work(shared_work, shared_total, matmul_rate(&model)?);
    Ok(0)
}
