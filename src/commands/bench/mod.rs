//! `etpo bench ...`: `sandbox` and `model` measure etpo against a baseline side by side in one
//! run and print the ratios; `serve` prints the ratios of `etpo serve` over HTTP to the same work
//! in-process; `train` and `games` print absolute costs. Each prints the CPU it ran on
//! ([`cpu_model`]).

use clap::Subcommand;

pub mod games;
pub mod model;
mod reference;
pub mod sandbox;
pub mod serve;
pub mod train;

#[derive(Subcommand)]
pub enum Bench {
    /// Warm sandbox pool against a cold python3 per action; throughput with 1 and N workers.
    Sandbox(self::sandbox::Args),
    /// Generation tokens/s and one LoRA training step, etpo against PyTorch on the same model.
    Model(self::model::Args),
    /// Time per ETPO update, split into its phases, and peak memory.
    Train(self::train::Args),
    /// Steps per second of the shipped text games through the host, and instantiation cost per
    /// episode.
    Games(self::games::Args),
    /// `etpo serve` over loopback HTTP with 1, 16 and 64 concurrent clients against the same game
    /// steps and sandboxed actions in-process: p50/p99 latency and throughput, as ratios.
    Serve(self::serve::Args),
}

/// How a model multiplies by its frozen weights, for the benchmarks' headers: e.g. "frozen-weight
/// products in bf16 (/…/.venv/lib/libmkl_rt.so.3)" or "frozen-weight products in f32".
pub(crate) fn matmul_line(model: &trainer::Llama) -> String {
    let precision = model.matmul_precision();
    match (precision, trainer::bf16::library()) {
        (trainer::bf16::MatmulPrecision::Bf16, Some(lib)) => format!("frozen-weight products in bf16 ({lib})"),
        _ => format!("frozen-weight products in {}", precision.name()),
    }
}

/// The CPU's model name and the vector extensions that matter for our kernels, e.g.
/// "Intel(R) Xeon(R) Processor (avx2 avx512f amx)", from /proc/cpuinfo.
pub(crate) fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let ext: Vec<&str> = [("avx2", "avx2"), ("avx512f", "avx512f"), ("avx512_bf16", "avx512bf16"), ("amx_tile", "amx")]
        .into_iter()
        .filter(|(flag, _)| has(flag))
        .map(|(_, label)| label)
        .collect();
    if ext.is_empty() {
        name
    } else {
        format!("{name} ({})", ext.join(" "))
    }
}

/// The machine's 1-minute load average (other work competing for the cores).
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

pub fn run(bench: Bench) -> anyhow::Result<i32> {
    match bench {
        Bench::Sandbox(args) => self::sandbox::run(args),
        Bench::Model(args) => self::model::run(args),
        Bench::Train(args) => self::train::run(args),
        Bench::Games(args) => self::games::run(args),
        Bench::Serve(args) => self::serve::run(args),
    }
}
