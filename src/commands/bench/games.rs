//! `etpo bench games`: what a text game costs through the host, per shipped game
//! (`envs/games/*.yaml` by default):
//! - compile: loading the spec's game once (compile the component, check its interface);
//! - instantiate: a fresh instance and its `reset` — the cost per episode;
//! - game step: one `step` call on the instance (fuel-metered WebAssembly, output checked);
//! - env step: one `Env::step`, i.e. the game step plus action extraction, assembly and the
//!   rendering of the next state through the spec's templates — what the run loop pays;
//! - steps/s through `Env::step`, and the fuel a step uses.
//!
//! Medians over many calls; each game plays the same action (the spec's first worked example)
//! until its episodes end, then starts new ones. The target (issue 8): a game step's overhead
//! is microseconds, far below a model's generation (tens of milliseconds per token on CPU).

use anyhow::Context;
use runtime::env::{Host, Task};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Game specs, or folders of them [default: envs/games].
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Episodes timed for the instantiation median.
    #[arg(long, default_value_t = 200)]
    pub episodes: usize,
    /// Steps timed per game.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// The seed the episodes are reset with.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let paths = if args.paths.is_empty() { vec![PathBuf::from("envs/games")] } else { args.paths.clone() };
    let files = envspec::find_specs(&paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    let host = Host::new(runtime::PoolConfig::default());
    println!(
        "etpo bench games: {} episodes and {} steps per game, seed {}; {}",
        args.episodes,
        args.steps,
        args.seed,
        super::cpu_model()
    );
    println!(
        "{:<12} {:>11} {:>14} {:>13} {:>12} {:>10} {:>11}",
        "game", "compile ms", "instantiate µs", "game step µs", "env step µs", "steps/s", "fuel/step"
    );
    let mut measured = 0;
    for file in files {
        let spec = envspec::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
        if spec.kind.game().is_none() {
            eprintln!("skipping {}: not a game (kind: wasm) spec", file.display());
            continue;
        }
        let action = spec.examples.first().map_or_else(|| "look".to_string(), |e| e.action.clone());
        let spec = Arc::new(spec);
        let started = Instant::now();
        let task = Task::load(spec.clone(), &host)?;
        let compile = started.elapsed().as_secs_f64();
        let game = task.game().context("a game spec's task has a game")?;

        // Instantiation + reset, per episode.
        let mut instantiate = Vec::with_capacity(args.episodes);
        for _ in 0..args.episodes {
            let t = Instant::now();
            let mut instance = game.instantiate()?;
            instance.reset(args.seed)?;
            instantiate.push(t.elapsed().as_secs_f64());
        }

        // The game's own step, on instances reset outside the timing.
        let text = spec.assemble_program(&spec.extract_action(&action))?;
        let (mut game_steps, mut fuel) = (Vec::with_capacity(args.steps), Vec::with_capacity(args.steps));
        let mut instance = game.instantiate()?;
        instance.reset(args.seed)?;
        while game_steps.len() < args.steps {
            let t = Instant::now();
            let r = instance.step(&text)?;
            game_steps.push(t.elapsed().as_secs_f64());
            fuel.push(game.limits().fuel - instance.fuel_left());
            if r.terminated || r.truncated {
                instance = game.instantiate()?;
                instance.reset(args.seed)?;
            }
        }

        // Through the environment, as the run loop steps it.
        let mut env = task.env(args.seed)?;
        env.reset()?;
        let mut env_steps = Vec::with_capacity(args.steps);
        let all = Instant::now();
        let mut reset_s = 0.0;
        while env_steps.len() < args.steps {
            let t = Instant::now();
            let r = env.step(&action)?;
            env_steps.push(t.elapsed().as_secs_f64());
            if !r.info.error.is_empty() {
                anyhow::bail!("{}: the game failed during the benchmark: {}", file.display(), r.info.error);
            }
            if r.terminated || r.truncated {
                let t = Instant::now();
                env.reset()?;
                reset_s += t.elapsed().as_secs_f64();
            }
        }
        let steps_per_s = args.steps as f64 / (all.elapsed().as_secs_f64() - reset_s);
        println!(
            "{:<12} {:>11.1} {:>14.1} {:>13.2} {:>12.2} {:>10.0} {:>11.0}",
            spec.name,
            compile * 1e3,
            median(&mut instantiate) * 1e6,
            median(&mut game_steps) * 1e6,
            median(&mut env_steps) * 1e6,
            steps_per_s,
            median_u64(&mut fuel),
        );
        measured += 1;
    }
    if measured == 0 {
        anyhow::bail!(
            "no game specs (kind: wasm) in {}",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    println!("(steps/s excludes the resets between episodes; instantiate includes reset)");
    Ok(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_u64(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}
