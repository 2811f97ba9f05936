//! `etpo bench serve`: what going through `etpo serve` over loopback HTTP costs, against the same
//! work in-process, measured side by side in one run and printed as ratios.
//!
//! The server runs in this process (`serve::Server` on 127.0.0.1, any free port) over the shipped
//! `guess` game (`envs/games/guess.yaml`) and `balance_scale` (`envs/balance_scale.yaml`), on one
//! [`Host`] (sandbox pool and game engine). For each number of concurrent clients, two scenarios:
//!
//! - game steps: each client opens a `guess` episode (`POST /reset`), steps it with the spec's
//!   worked example (`"50"`, as `etpo bench games` plays) until the episode ends (`POST /step`),
//!   closes it (`POST /close`), and starts the next;
//! - sandboxed actions: each client opens a `balance_scale` episode, steps it once with
//!   `LogisticRegression(max_iter=500)` (a program assembled, run in the sandbox and scored: the
//!   episode ends), closes it, and starts the next.
//!
//! Each client is a thread with its own blocking HTTP client (ureq, one kept-alive connection).
//! The in-process figure runs the same clients as threads calling the same [`Task`]s directly:
//! `Task::env` + `Env::reset` per episode (what the server does on `/reset`), then `Env::step`,
//! as `etpo bench games` and the run loop step an environment; same pool, same game.
//!
//! Per scenario and side: the steps timed, the p50 and p99 latency of one step (HTTP: from
//! sending `/step` to its answer parsed; in-process: one `Env::step`), and the throughput: steps
//! per second of wall clock over the whole scenario (resets and closes included, on both sides),
//! and the CPU time of this process per step (clients, server and game host; not the sandbox's
//! processes, which do the same work on both sides), which depends less on what else the machine
//! is running than the wall-clock figures.
//! Each side of a scenario is bounded by `--requests` steps per client and `--seconds` of wall
//! clock (a client stops starting steps at the limit; a step in flight finishes). The server and
//! its clients share this machine's cores.
//!
//! No target is set for serving (issue 20): the ratios are printed, not judged.

use super::{cpu_model, load_average};
use anyhow::{bail, Context};
use runtime::env::{Host, Task};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Numbers of concurrent clients, one scenario each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    pub clients: Vec<usize>,
    /// Wall-clock limit of each side of a scenario, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Steps timed per client, at most, in each side of a scenario.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Sandbox workers (default: the number of cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// The Python interpreter of the sandbox (default: $ETPO_PYTHON, else the repository's .venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// Clients per scenario, at most: each is a thread (and, over HTTP, a connection and an episode).
const MAX_CLIENTS: usize = 1024;

const GAME_SPEC: &str = "envs/games/guess.yaml";
const DATA_SPEC: &str = "envs/balance_scale.yaml";
/// The sandboxed action: the README's example of a remote step.
const DATA_ACTION: &str = " LogisticRegression(max_iter=500)";

/// One kind of work the clients do.
struct Scenario {
    title: String,
    task: Arc<Task>,
    action: String,
    /// Latencies are printed in this unit: (name, seconds per unit).
    unit: (&'static str, f64),
}

/// An episode at a time, through HTTP or in-process.
trait Client {
    /// Opens a new episode.
    fn reset(&mut self) -> anyhow::Result<()>;
    /// One step; whether the episode ended.
    fn step(&mut self, action: &str) -> anyhow::Result<bool>;
    /// Lets the episode go (HTTP: `/close`).
    fn close(&mut self) -> anyhow::Result<()>;
}

/// A client of the server: its own agent (one kept-alive connection) and episode.
struct HttpClient {
    agent: ureq::Agent,
    base: String,
    spec: String,
    seed: u64,
    episode: Option<String>,
}

impl HttpClient {
    fn new(addr: SocketAddr, spec: &str, seed: u64) -> anyhow::Result<HttpClient> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let client = HttpClient { agent, base: format!("http://{addr}"), spec: spec.to_string(), seed, episode: None };
        // Opens the connection before the timing starts.
        let mut health = client.agent.get(format!("{}/health", client.base)).call().context("GET /health")?;
        health.body_mut().read_to_string().context("GET /health")?;
        Ok(client)
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body.to_string())
            .with_context(|| format!("POST {path}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().with_context(|| format!("reading the answer of {path}"))?;
        if !(200..300).contains(&status) {
            bail!("POST {path} answered {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("POST {path} answered no JSON: {text}"))
    }
}

impl Client for HttpClient {
    fn reset(&mut self) -> anyhow::Result<()> {
        let out = self.post("/reset", &json!({ "spec": self.spec, "seed": self.seed }))?;
        let id = out["episode_id"].as_str().context("/reset answered no episode_id")?;
        self.episode = Some(id.to_string());
        Ok(())
    }

    fn step(&mut self, action: &str) -> anyhow::Result<bool> {
        let id = self.episode.as_deref().context("step before reset")?;
        let out = self.post("/step", &json!({ "episode_id": id, "action": action }))?;
        let error = out["info"]["error"].as_str().unwrap_or_default();
        if !error.is_empty() {
            bail!("the benchmark's action failed on the server: {error}");
        }
        Ok(out["terminated"].as_bool() == Some(true) || out["truncated"].as_bool() == Some(true))
    }

    fn close(&mut self) -> anyhow::Result<()> {
        if let Some(id) = self.episode.take() {
            self.post("/close", &json!({ "episode_id": id }))?;
        }
        Ok(())
    }
}

/// The same work without the server: the task's environments, called directly.
struct LocalClient {
    task: Arc<Task>,
    seed: u64,
    env: Option<runtime::env::Env>,
}

impl Client for LocalClient {
    fn reset(&mut self) -> anyhow::Result<()> {
        // As the server's /reset: a new environment per episode, then its reset.
        let mut env = self.task.env(self.seed)?;
        env.reset()?;
        self.env = Some(env);
        Ok(())
    }

    fn step(&mut self, action: &str) -> anyhow::Result<bool> {
        let env = self.env.as_mut().context("step before reset")?;
        let r = env.step(action)?;
        if !r.info.error.is_empty() {
            bail!("the benchmark's action failed in-process: {}", r.info.error);
        }
        Ok(r.terminated || r.truncated)
    }

    fn close(&mut self) -> anyhow::Result<()> {
        self.env = None;
        Ok(())
    }
}

/// What one side of a scenario measured.
struct Measured {
    /// Each step's latency, sorted.
    latencies: Vec<Duration>,
    /// From the start of the clients to the end of the last.
    elapsed: Duration,
    /// CPU seconds of this process over the same span (clients, server, game host; not the
    /// sandbox's processes).
    cpu_s: f64,
}

impl Measured {
    /// The `p`-th percentile (nearest rank) of the step latencies, in seconds.
    fn percentile(&self, p: f64) -> f64 {
        let n = self.latencies.len();
        let rank = ((p / 100.0 * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1].as_secs_f64()
    }

    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_per_step(&self) -> f64 {
        self.cpu_s / self.latencies.len() as f64
    }
}

/// CPU seconds (user + system) of every thread of this process so far.
fn process_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Runs `clients` threads, each with the client `make(i)` gives, doing episodes of `action` until
/// it has timed `requests` steps or `seconds` have passed.
fn drive<C: Client>(
    clients: usize,
    requests: usize,
    seconds: f64,
    action: &str,
    make: impl Fn(usize) -> anyhow::Result<C> + Sync,
) -> anyhow::Result<Measured> {
    let barrier = Barrier::new(clients + 1);
    let limit = Duration::from_secs_f64(seconds);
    let (mut latencies, elapsed, cpu_s) = std::thread::scope(|s| -> anyhow::Result<(Vec<Duration>, Duration, f64)> {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let (barrier, make) = (&barrier, &make);
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    // Every thread reaches the barrier, even one whose client failed.
                    let client = make(i);
                    barrier.wait();
                    let mut client = client?;
                    let deadline = Instant::now() + limit;
                    let mut timed = Vec::with_capacity(requests.min(4096));
                    while timed.len() < requests && Instant::now() < deadline {
                        client.reset()?;
                        loop {
                            let t = Instant::now();
                            let done = client.step(action)?;
                            timed.push(t.elapsed());
                            if done || timed.len() >= requests || Instant::now() >= deadline {
                                break;
                            }
                        }
                        client.close()?;
                    }
                    Ok(timed)
                })
            })
            .collect();
        barrier.wait();
        let (start, cpu_start) = (Instant::now(), process_cpu());
        let mut all = Vec::new();
        let mut first_error = None;
        for h in handles {
            match h.join().expect("a bench client thread panicked") {
                Ok(timed) => all.extend(timed),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let (elapsed, cpu_s) = (start.elapsed(), process_cpu() - cpu_start);
        match first_error {
            Some(e) => Err(e),
            None => Ok((all, elapsed, cpu_s)),
        }
    })?;
    if latencies.is_empty() {
        bail!("no step was timed (--requests and --seconds must be positive)");
    }
    latencies.sort();
    Ok(Measured { latencies, elapsed, cpu_s })
}

fn load_task(path: &Path, host: &Host, hint: &str) -> anyhow::Result<Arc<Task>> {
    let spec = envspec::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let task = Task::load(Arc::new(spec), host)
        .with_context(|| format!("{}: preparing the environment ({hint})", path.display()))?;
    Ok(Arc::new(task))
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if args.clients.is_empty() || args.clients.iter().any(|&c| c == 0 || c > MAX_CLIENTS) {
        bail!("--clients must list numbers of clients from 1 to {MAX_CLIENTS}, e.g. 1,16,64");
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) || args.requests == 0 {
        bail!("--seconds and --requests must be positive");
    }
    let python = args.python.clone().unwrap_or_else(runtime::default_python);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(cores).max(1);
    let max_clients = args.clients.iter().copied().max().unwrap_or(1);

    println!(
        "etpo bench serve: {cores} cores, {}; {workers} sandbox workers, python {}",
        cpu_model(),
        python.display()
    );
    println!(
        "each side of a scenario: at most {} steps per client and {} s; clients {}",
        args.requests,
        args.seconds,
        args.clients.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
    );
    let load_before = load_average();

    let host = Arc::new(Host::new(runtime::PoolConfig { workers, python, limits: runtime::Limits::default() }));
    let game = load_task(Path::new(GAME_SPEC), &host, "build the games first: scripts/setup.sh games")?;
    let data = load_task(Path::new(DATA_SPEC), &host, "the sandbox needs the project venv: scripts/setup.sh python")?;
    let game_action = game.spec().examples.first().map_or_else(|| "50".to_string(), |e| e.action.clone());
    let scenarios = [
        Scenario {
            title: format!(
                "game steps: guess, action {game_action:?} (each client: reset, steps to the episode's end, close)"
            ),
            task: game.clone(),
            action: game_action,
            unit: ("µs", 1e-6),
        },
        Scenario {
            title: "sandboxed actions: balance_scale, one LogisticRegression(max_iter=500) per episode \
                    (each client: reset, step, close)"
                .to_string(),
            task: data.clone(),
            action: DATA_ACTION.to_string(),
            unit: ("ms", 1e-3),
        },
    ];

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    let config = ::serve::Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        // One request in flight per client: never a 503 for a full queue.
        max_queue: ::serve::Config::default().max_queue.max(2 * max_clients),
        ..::serve::Config::default()
    };
    let server = runtime.block_on(::serve::Server::bind(config, host.clone(), vec![game.clone(), data.clone()]))?;
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(server.run(async {
        let _ = stopped.await;
    }));
    println!("server: http://{addr} (in this process; server and clients share the cores)");

    let measured = (|| -> anyhow::Result<Vec<Vec<(usize, Measured, Measured)>>> {
        // Warm-up, untimed: the pool's workers, the game, both paths.
        for s in &scenarios {
            drive(workers, 3, 60.0, &s.action, |i| HttpClient::new(addr, &s.task.spec().name, i as u64))?;
            drive(workers, 3, 60.0, &s.action, |i| {
                Ok(LocalClient { task: s.task.clone(), seed: i as u64, env: None })
            })?;
        }
        let mut all = Vec::new();
        for s in &scenarios {
            let mut rows = Vec::new();
            for &clients in &args.clients {
                // Seeds 0-4 (the shipped specs' seeds), spread over the clients.
                let local = drive(clients, args.requests, args.seconds, &s.action, |i| {
                    Ok(LocalClient { task: s.task.clone(), seed: (i % 5) as u64, env: None })
                })?;
                let http = drive(clients, args.requests, args.seconds, &s.action, |i| {
                    HttpClient::new(addr, &s.task.spec().name, (i % 5) as u64)
                })?;
                rows.push((clients, http, local));
            }
            all.push(rows);
        }
        Ok(all)
    })();
    let _ = stop.send(());
    let served = runtime.block_on(serving);
    let measured = measured?;
    served.context("the server's task failed")??;

    for (s, rows) in scenarios.iter().zip(&measured) {
        let (unit, per) = s.unit;
        println!();
        println!("{}", s.title);
        println!(
            "{:>7}  {:<17} {:>6} {:>10} {:>10} {:>9} {:>12}",
            "clients",
            "",
            "steps",
            format!("p50 {unit}"),
            format!("p99 {unit}"),
            "steps/s",
            format!("CPU {unit}/step")
        );
        for (clients, http, local) in rows {
            for (side, m) in [("HTTP", http), ("in-process", local)] {
                println!(
                    "{:>7}  {:<17} {:>6} {:>10.2} {:>10.2} {:>9.1} {:>12.2}",
                    clients,
                    side,
                    m.latencies.len(),
                    m.percentile(50.0) / per,
                    m.percentile(99.0) / per,
                    m.throughput(),
                    m.cpu_per_step() / per,
                );
            }
            println!(
                "{:>7}  {:<17} {:>6} {:>9.2}x {:>9.2}x {:>8.2}x {:>11.2}x",
                clients,
                "HTTP / in-process",
                "",
                http.percentile(50.0) / local.percentile(50.0),
                http.percentile(99.0) / local.percentile(99.0),
                http.throughput() / local.throughput(),
                http.cpu_per_step() / local.cpu_per_step().max(1e-12),
            );
        }
    }
    println!();
    println!("latency: one step, HTTP from sending /step to its answer parsed, in-process one Env::step;");
    println!("steps/s: over the whole scenario, resets and closes included;");
    println!("CPU: of this process (clients, server, game host; not the sandbox's processes) per step;");
    println!("no target is set for serving: the ratios are not judged.");
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        println!("1-minute load average: {before:.1} at the start, {after:.1} at the end ({cores} cores)");
        if before.max(after) > cores as f64 * 0.75 {
            println!("warning: other processes were busy; the figures are inflated, compare the ratios of one run");
        }
    }
    Ok(0)
}
