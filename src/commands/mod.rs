//! One file per subcommand (the benchmarks: one folder, `bench/`). Each exposes `Args` (clap) and `run(Args) -> anyhow::Result<i32>`,
//! the `i32` being the process exit status.

pub mod bench;
pub mod check;
pub mod compare;
pub mod exec;
pub mod experiment;
pub mod generate;
pub mod model_args;
pub mod new_game;
pub mod perplexity;
pub mod run;
pub mod schema;
pub mod serve;
pub mod show;
