//! End-to-end tests of the `etpo` binary, run the way a user runs it: one test binary, one
//! module per command family. Most need the project's Python environment
//! (`scripts/setup.sh python`); those that load the default model need `scripts/setup.sh model`.

mod common;

mod bench;
mod cli_spec;
mod experiment;
mod games;
mod generate;
mod perplexity;
mod remote;
mod run;
mod sandbox;
mod train;
