//! The `etpo` library part: the experiment loop behind `etpo run` (see [`experiment`]). The
//! environment DSL, the sandboxed runtime and the model core are the `envspec`, `runtime` and
//! `trainer` crates.

pub mod experiment;
