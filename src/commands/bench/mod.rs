//! `etpo bench ...`: `sandbox` and `model` measure etpo against a baseline side by side in one
//! run and print the ratios; `train` and `games` print absolute costs (with the CPU model).

use clap::Subcommand;

pub mod games;
pub mod model;
pub mod sandbox;
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
}

pub fn run(bench: Bench) -> anyhow::Result<i32> {
    match bench {
        Bench::Sandbox(args) => self::sandbox::run(args),
        Bench::Model(args) => self::model::run(args),
        Bench::Train(args) => self::train::run(args),
        Bench::Games(args) => self::games::run(args),
    }
}
