//! The `etpo` command-line program: a thin layer over the `envspec`, `runtime` and `trainer`
//! crates. Each subcommand lives in its own file under `src/commands/`.

use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(name = "etpo", version, about = "Language-MDP environments from YAML specs, and ETPO training on them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: a large variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Validate spec files or folders; prints every error of the first bad file.
    Check(commands::check::Args),
    /// Print the exact first state (and a sample reflection state) the model sees for a spec.
    Show(commands::show::Args),
    /// Print a JSON Schema of the spec format (for editors' YAML validation).
    Schema(commands::schema::Args),
    /// Execute one action file against a spec's data and print the outcome.
    Exec(commands::exec::Args),
    /// Run (and train on) every spec found in the given files and folders.
    Run(commands::run::Args),
    /// The paper's protocol in one command: every spec × algorithm × seed with one budget, then
    /// Table 2 and Figures 3 and 4 in one results folder; resumable.
    Experiment(commands::experiment::Args),
    /// Print completions of a model for a prompt.
    Generate(commands::generate::Args),
    /// Perplexity of a model (optionally with an adapter) on text files.
    Perplexity(commands::perplexity::Args),
    /// Draw the batch reward of several training runs in one figure (ETPO against PPO-KL).
    Compare(commands::compare::Args),
    /// Serve specs' environments and the sandbox over HTTP (Gymnasium-style episodes, and
    /// SandboxFusion's /run_code).
    Serve(commands::serve::Args),
    /// Write the skeleton of a new text game (a Rust crate that builds into a WebAssembly
    /// component for `kind: wasm` specs).
    NewGame(commands::new_game::Args),
    /// Benchmarks: ratios against a baseline measured side by side in one run (sandbox, model),
    /// absolute costs (train, games).
    #[command(subcommand)]
    Bench(commands::bench::Bench),
}

fn main() {
    keep_freed_memory();
    fix_thread_count();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => commands::check::run(args),
        Command::Show(args) => commands::show::run(args),
        Command::Schema(args) => commands::schema::run(args),
        Command::Exec(args) => commands::exec::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Experiment(args) => commands::experiment::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Perplexity(args) => commands::perplexity::run(args),
        Command::Compare(args) => commands::compare::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::NewGame(args) => commands::new_game::run(args),
        Command::Bench(bench) => commands::bench::run(bench),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    }
}

/// candle asks for its thread count on every matrix product, and without `RAYON_NUM_THREADS` it
/// counts the physical cores by parsing /proc/cpuinfo each time (milliseconds per decoding step).
/// Setting the variable to that same count, once, keeps the count and skips the parsing.
fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY (set_var): called first thing in main, before any other thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Training allocates and frees tensors of tens to hundreds of megabytes many times per step.
/// By default glibc maps each block above 32 MB fresh and unmaps it when freed, and gives the
/// heap's free top back to the system, so a step can fault its memory in again (the kernel
/// zeroing pages took a sixth of a LoRA step in a profile). Serving every block from the heap
/// (no mmap; the threshold itself cannot be raised above 32 MB) and never trimming it keeps
/// freed memory for the next step: the process stays at its peak size, as PyTorch's caching
/// allocators do.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator settings; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1: never trim (documented in mallopt(3)).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}
