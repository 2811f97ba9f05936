//! `etpo serve PATH... [--listen ADDR] [--workers N] [--token T] [--idle-timeout-s S]
//! [--max-queue N]`: serves every spec found under PATH, and the sandbox, over HTTP (the API is
//! the `serve` crate's; see its docs and the README's "Serving environments" section).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct Args {
    /// Spec files, or folders whose *.yaml / *.yml files are all served.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Address to listen on. Anything but a loopback address needs --token.
    #[arg(long, default_value = "127.0.0.1:8765")]
    pub listen: SocketAddr,
    /// Sandbox workers (default: the number of cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Bearer token every request must carry (`Authorization: Bearer T`); default:
    /// $ETPO_SERVE_TOKEN, which keeps it out of the process list.
    #[arg(long)]
    pub token: Option<String>,
    /// Close episodes not used for this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub idle_timeout_s: f64,
    /// Resets, steps and programs running or waiting at once; more are answered 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Episodes open at once; more resets are answered 503.
    #[arg(long, default_value_t = 4096)]
    pub max_episodes: usize,
    /// The Python interpreter of the sandbox (default: $ETPO_PYTHON, else the repository's .venv).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    if !(args.idle_timeout_s.is_finite() && args.idle_timeout_s > 0.0) {
        bail!("--idle-timeout-s must be a positive number of seconds, got {}", args.idle_timeout_s);
    }
    let token = args.token.clone().or_else(|| std::env::var("ETPO_SERVE_TOKEN").ok().filter(|t| !t.is_empty()));
    let config = serve::Config {
        listen: args.listen,
        token,
        idle_timeout: Duration::from_secs_f64(args.idle_timeout_s),
        max_queue: args.max_queue,
        max_episodes: args.max_episodes,
        ..serve::Config::default()
    };
    // Refused before anything is loaded: an exposed server without a token never starts.
    config.validate()?;

    let found = envspec::find_specs(&args.paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    if found.is_empty() {
        bail!("no spec files (*.yaml, *.yml) found in {}", join_paths(&args.paths));
    }
    let host = Arc::new(runtime::env::Host::new(runtime::PoolConfig {
        workers: args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1),
        python: args.python.clone().unwrap_or_else(runtime::default_python),
        limits: runtime::Limits::default(),
    }));
    let mut tasks = Vec::new();
    for path in &found {
        let spec = envspec::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let task = runtime::env::Task::load(Arc::new(spec), &host)
            .with_context(|| format!("{}: preparing the environment", path.display()))?;
        eprintln!("serving {} ({})", task.spec().name, path.display());
        tasks.push(Arc::new(task));
    }

    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let server = serve::Server::bind(config, host.clone(), tasks).await?;
        // /run_code needs the sandbox pool: start it now rather than on the first request.
        let warm = host.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = warm.pool() {
                eprintln!("warning: the sandbox pool did not start ({e}); /run_code and data specs will fail");
            }
        });
        eprintln!("etpo serve: listening on http://{} (Ctrl-C or SIGTERM stops)", server.local_addr());
        server
            .run(async {
                stop_signal().await;
                eprintln!("etpo serve: stopping");
            })
            .await?;
        anyhow::Ok(())
    })?;
    Ok(0)
}

/// Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
