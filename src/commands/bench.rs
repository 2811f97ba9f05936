//! `etpo bench ...`: `sandbox` and `model` measure etpo against a baseline side by side in one
//! run and print the ratios; `train` and `games` print absolute costs (with the CPU model).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// Warm sandbox pool against a cold python3 per action; throughput with 1 and N workers.
    Sandbox(crate::commands::bench_sandbox::Args),
    /// Generation tokens/s and one LoRA training step, etpo against PyTorch on the same model.
    Model(crate::commands::bench_model::Args),
    /// Time per ETPO update, split into its phases, and peak memory.
    Train(crate::commands::bench_train::Args),
    /// Steps per second of the shipped text games through the host, and instantiation cost per
    /// episode.
    Games(crate::commands::bench_games::Args),
}

pub fn run(bench: Bench) -> anyhow::Result<i32> {
    match bench {
        Bench::Sandbox(args) => crate::commands::bench_sandbox::run(args),
        Bench::Model(args) => crate::commands::bench_model::run(args),
        Bench::Train(args) => crate::commands::bench_train::run(args),
        Bench::Games(args) => crate::commands::bench_games::run(args),
    }
}
