//! The serve crate's integration tests, in one binary: servers started in-process on
//! 127.0.0.1:0 over the shipped `guess` and `adventure` games and the `balance_scale` data spec,
//! driven over HTTP. They need the project's Python environment (`scripts/setup.sh python`) and
//! the wasm32 target (`scripts/setup.sh games`): the games are built first.

mod common;
mod episodes;
mod run_code;
mod security;
