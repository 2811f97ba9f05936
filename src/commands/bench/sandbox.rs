//! `etpo bench sandbox`: the warm sandbox pool against a cold interpreter per action, and the
//! pool's throughput with 1 and N workers, measured side by side in one run.
//!
//! - Per-action overhead: the time from `Pool::evaluate` to its result for a trivial estimator
//!   (`DummyClassifier`, whose own work is well under a millisecond), on a warm worker, against
//!   the same action on a cold start: a fresh one-worker pool, i.e. a new sandbox and a new
//!   `python3` that imports numpy and scikit-learn, runs the same harness once and exits.
//! - CPU per action: the CPU time of every sandbox process (worker, children, launcher), read
//!   from `getrusage(RUSAGE_CHILDREN)` once the pools are gone; a pool that served the warm
//!   actions minus an identical pool that served none, per action. Unlike wall-clock times this
//!   barely depends on what else the machine is doing.
//! - Throughput: actions per second for a CPU-bound estimator with 1 worker and with N workers
//!   (N callers at once).
//!
//! Targets (issue 4): warm overhead under 15 ms and at least 20x below the cold start; 2 workers
//! at least 1.8x the throughput of 1 on a 2-core machine.

use runtime::{Job, Limits, Pool, PoolConfig};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Warm actions timed for the overhead median.
    #[arg(long, default_value_t = 60)]
    pub actions: usize,
    /// Cold starts timed (each costs about a second or two).
    #[arg(long, default_value_t = 5)]
    pub cold: usize,
    /// Workers of the parallel throughput run (default: the number of cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// CPU-bound actions per throughput run.
    #[arg(long, default_value_t = 24)]
    pub jobs: usize,
    /// The Python interpreter (default: $ETPO_PYTHON, else the repository's .venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

const TRIVIAL: &str = "\
from sklearn.dummy import DummyClassifier
def build_model(x_train, y_train):
    return DummyClassifier(strategy='prior').fit(x_train, y_train)
";

const CPU_BOUND: &str = "\
from sklearn.ensemble import RandomForestClassifier
def build_model(x_train, y_train):
    return RandomForestClassifier(n_estimators=60, random_state=0).fit(x_train, y_train)
";

const LIMITS: Limits = Limits { wall_s: 60.0, cpu_s: 60.0, memory_mb: 1024, output_kb: 64, max_processes: 32 };

/// A Balance-Scale-sized problem: 62 training rows, 63 validation rows, 4 features, 3 classes.
fn job(program: &str) -> Job {
    let row =
        |i: usize| vec![(i % 5 + 1) as f64, (i / 5 % 5 + 1) as f64, (i / 25 % 5 + 1) as f64, (i * 7 % 5 + 1) as f64];
    let label = |r: &[f64]| match (r[0] * r[1]).partial_cmp(&(r[2] * r[3])) {
        Some(std::cmp::Ordering::Greater) => 0,
        Some(std::cmp::Ordering::Less) => 2,
        _ => 1,
    };
    let x: Vec<Vec<f64>> = (0..125).map(row).collect();
    let y: Vec<usize> = x.iter().map(|r| label(r)).collect();
    Job {
        program: program.to_string(),
        x_train: x[..62].to_vec(),
        y_train: y[..62].to_vec(),
        x_val: x[62..].to_vec(),
        n_classes: 3,
        limits: LIMITS,
    }
}

/// CPU seconds (user + system) of every terminated and reaped descendant of this process.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    let python = args.python.clone().unwrap_or_else(runtime::default_python);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(cores).max(1);
    let config = |workers| PoolConfig { workers, python: python.clone(), limits: LIMITS };
    let trivial = job(TRIVIAL);
    let heavy = job(CPU_BOUND);

    println!("etpo bench sandbox: python {}, {cores} cores", python.display());

    // Warm: one worker, sequential actions (a few untimed first).
    let cpu_start = children_cpu();
    let pool = Pool::new(config(1))?;
    for _ in 0..3 {
        pool.evaluate(&trivial)?.result.map_err(|e| anyhow::anyhow!("the trivial action failed: {e}"))?;
    }
    let mut warm = Vec::with_capacity(args.actions);
    let mut inside = Vec::with_capacity(args.actions);
    let n_warm = args.actions.max(1);
    for _ in 0..n_warm {
        let t = Instant::now();
        let out = pool.evaluate(&trivial)?;
        warm.push(t.elapsed());
        inside.push(Duration::from_secs_f64(out.wall_s));
        out.result.map_err(|e| anyhow::anyhow!("the trivial action failed: {e}"))?;
    }
    drop(pool);
    let cpu_warm_pool = children_cpu() - cpu_start;
    // The same pool life without the timed actions: its CPU is the baseline to subtract.
    let cpu_start = children_cpu();
    let pool = Pool::new(config(1))?;
    for _ in 0..3 {
        pool.evaluate(&trivial)?.result.map_err(|e| anyhow::anyhow!("the trivial action failed: {e}"))?;
    }
    drop(pool);
    let cpu_idle_pool = children_cpu() - cpu_start;
    let warm_cpu = (cpu_warm_pool - cpu_idle_pool).max(0.0) / n_warm as f64;

    // Cold: a new sandbox and interpreter per action, same harness and action.
    let mut cold = Vec::with_capacity(args.cold);
    let n_cold = args.cold.max(1);
    let cpu_start = children_cpu();
    for _ in 0..n_cold {
        let t = Instant::now();
        let pool = Pool::new(config(1))?;
        pool.evaluate(&trivial)?.result.map_err(|e| anyhow::anyhow!("the trivial action failed: {e}"))?;
        cold.push(t.elapsed());
        drop(pool);
    }
    let cold_cpu = (children_cpu() - cpu_start) / n_cold as f64;

    // Throughput: the same CPU-bound actions with 1 worker and with `workers` workers.
    let throughput = |n: usize| -> anyhow::Result<(f64, Duration)> {
        let pool = Pool::new(config(n))?;
        // Warm every worker once.
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n).map(|_| s.spawn(|| pool.evaluate(&trivial))).collect();
            hs.into_iter().try_for_each(|h| h.join().expect("bench thread panicked").map(drop))
        })?;
        let t = Instant::now();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut latencies = std::thread::scope(|s| -> anyhow::Result<Vec<Duration>> {
            let hs: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<Vec<Duration>> {
                        let mut l = Vec::new();
                        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < args.jobs {
                            let t = Instant::now();
                            pool.evaluate(&heavy)?
                                .result
                                .map_err(|e| anyhow::anyhow!("the CPU-bound action failed: {e}"))?;
                            l.push(t.elapsed());
                        }
                        Ok(l)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in hs {
                all.extend(h.join().expect("bench thread panicked")?);
            }
            Ok(all)
        })?;
        let rate = args.jobs as f64 / t.elapsed().as_secs_f64();
        latencies.sort();
        Ok((rate, median(latencies)))
    };
    let (rate1, lat1) = throughput(1)?;
    let (rate_n, lat_n) = throughput(workers)?;

    let warm_med = median(warm);
    let inside_med = median(inside);
    let cold_med = median(cold);
    let ratio = cold_med.as_secs_f64() / warm_med.as_secs_f64();
    let scale = rate_n / rate1;
    println!();
    println!("per-action time, trivial estimator (median)");
    println!(
        "  warm pool (fork from a warm worker)    {:9.2} ms   ({:.2} ms of it inside the worker, fork to result)",
        ms(warm_med),
        ms(inside_med)
    );
    println!("  cold start (new sandbox + python3)     {:9.2} ms", ms(cold_med));
    println!("  cold / warm                            {:9.1} x", ratio);
    println!();
    println!("CPU per action, all sandbox processes (load-independent)");
    println!("  warm pool                              {:9.2} ms", warm_cpu * 1e3);
    println!("  cold start                             {:9.2} ms", cold_cpu * 1e3);
    println!("  cold / warm                            {:9.1} x", cold_cpu / warm_cpu.max(1e-9));
    println!();
    println!("throughput, RandomForestClassifier(60 trees), {} actions", args.jobs);
    println!("  1 worker                               {:9.2} actions/s   (median latency {:.1} ms)", rate1, ms(lat1));
    println!("  {workers} workers{:31}{:9.2} actions/s   (median latency {:.1} ms)", "", rate_n, ms(lat_n));
    println!("  {workers} workers / 1 worker{:20}{:9.2} x", "", scale);
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("targets");
    println!("  warm overhead < 15 ms (wall)           {}", verdict(ms(warm_med) < 15.0));
    println!("  cold / warm >= 20                      {}", verdict(ratio >= 20.0));
    if workers == 2 {
        println!("  2 workers >= 1.8 x 1 worker            {}", verdict(scale >= 1.8));
    }
    Ok(0)
}
