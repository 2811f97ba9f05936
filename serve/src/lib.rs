//! etpo's environments and sandbox as an HTTP service (`etpo serve`).
//!
//! [`router`] builds the HTTP API over a set of loaded [`Task`]s and their [`Host`] (the sandbox
//! pool and the game engine); [`Server`] binds it and serves it. The API, all JSON:
//!
//! | endpoint | does |
//! |---|---|
//! | `GET /health` | `{"status": "ok"}` |
//! | `GET /specs` | the served specs: name, description, kind, max_steps, seeds, prompt_format, failure_reward, sha256 (of the spec file), data_sha256 (of its data file or game module) |
//! | `POST /reset {"spec", "seed"?}` | opens an episode: `{"episode_id", "observation", "messages"?, "info"}` |
//! | `POST /step {"episode_id", "action"}` | `{"observation", "messages"?, "reward", "terminated", "truncated", "info"}`, `info` as the Python binding's `EtpoEnv.step` |
//! | `POST /close {"episode_id"}` | closes an episode |
//! | `POST /score_test {"spec", "seed"?, "action"}` | the held-out test score of an action (`dataset.test_fraction`): `{"test_score", "error", "ran", ...}`; the test labels never leave the server |
//! | `POST /run_code` | runs Python in the sandbox, SandboxFusion's request and response (see `run_code.rs`) |
//! | `GET /metrics` | Prometheus text: requests by endpoint and status, latency histograms, open episodes, queue |
//!
//! Blocking work (resets, steps, sandboxed programs) runs on Tokio's blocking threads behind a
//! bounded queue ([`Config::max_queue`]; a full queue answers 503 with `Retry-After`); episodes idle
//! longer than [`Config::idle_timeout`] are closed by a background sweep. Errors answer
//! `{"error": "..."}` with 400 (bad JSON), 401 (token), 404 (unknown spec, episode or path), 409
//! (episode over, or already stepping), 413 (body over [`Config::max_body_bytes`]) or 503.
//!
//! Security: a non-loopback [`Config::listen`] needs a [`Config::token`] ([`Config::validate`]);
//! with a token every request needs `Authorization: Bearer <token>`. Requests name served specs,
//! never files.

mod api;
mod episodes;
mod metrics;
mod run_code;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use envspec::ChatTemplate;
use runtime::env::{Host, Task};

pub use run_code::RunCodeLimits;

/// How the server runs. `Default` gives the command's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where to listen (default 127.0.0.1:8765). Any non-loopback address needs `token`.
    pub listen: SocketAddr,
    /// The bearer token every request must carry; `None`: no check (loopback only).
    pub token: Option<String>,
    /// Episodes not reset, stepped or closed for this long are closed (default 600 s).
    pub idle_timeout: Duration,
    /// Blocking jobs (resets, steps, sandboxed programs) running or waiting at once; one more is
    /// answered 503 with `Retry-After` (default 64).
    pub max_queue: usize,
    /// Episodes open at once; a reset beyond is answered 503 (default 4096).
    pub max_episodes: usize,
    /// Largest request body, bytes (default 1 MiB); larger is answered 413.
    pub max_body_bytes: usize,
    /// Limits of `/run_code`.
    pub run_code: RunCodeLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8765)),
            token: None,
            idle_timeout: Duration::from_secs(600),
            max_queue: 64,
            max_episodes: 4096,
            max_body_bytes: 1 << 20,
            run_code: RunCodeLimits::default(),
        }
    }
}

impl Config {
    /// Refuses a configuration that would expose the service without a token, or whose limits
    /// make no sense.
    pub fn validate(&self) -> Result<(), ServeError> {
        if let Some(token) = &self.token {
            if token.trim().is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ServeError::Config(
                    "the token must be non-empty, without spaces or control characters".into(),
                ));
            }
        } else if !self.listen.ip().is_loopback() {
            return Err(ServeError::TokenRequired(self.listen));
        }
        if self.idle_timeout.is_zero() {
            return Err(ServeError::Config("the idle timeout must be positive".into()));
        }
        if self.max_episodes == 0 {
            return Err(ServeError::Config("max_episodes must be at least 1".into()));
        }
        self.run_code.validate().map_err(ServeError::Config)
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "listening on {0} (not a loopback address) needs a token: pass --token (or set ETPO_SERVE_TOKEN), or listen on 127.0.0.1"
    )]
    TokenRequired(SocketAddr),
    #[error("two served specs are named {0:?}; spec names must be unique")]
    DuplicateSpec(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What every handler shares.
pub(crate) struct State {
    pub(crate) config: Config,
    /// The served tasks by spec name.
    pub(crate) tasks: BTreeMap<String, Arc<Task>>,
    pub(crate) host: Arc<Host>,
    pub(crate) episodes: episodes::Episodes,
    /// Places in the queue of blocking work.
    pub(crate) jobs: Arc<tokio::sync::Semaphore>,
    pub(crate) metrics: metrics::Metrics,
    /// Renders chat observations as text (ChatML, the Python binding's default).
    pub(crate) chatml: ChatTemplate,
    /// The sha256 of each served spec's files, by spec name (for `GET /specs`).
    pub(crate) digests: BTreeMap<String, episodes::SpecDigests>,
}

impl State {
    /// Blocking jobs admitted and not finished.
    pub(crate) fn queue_depth(&self) -> usize {
        self.config.max_queue.saturating_sub(self.jobs.available_permits())
    }
}

/// ChatML, as in the Python binding (python/src/lib.rs).
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The HTTP API over `tasks` (each spec name once; loaded with `host`), running on `host`. Validates `config`
/// ([`Config::validate`]). Must be called inside a Tokio runtime: it starts the idle sweep, which
/// ends when the router is dropped.
pub fn router(config: &Config, host: Arc<Host>, tasks: Vec<Arc<Task>>) -> Result<Router, ServeError> {
    config.validate()?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| ServeError::Config("router() must be called inside a Tokio runtime".into()))?;
    let mut by_name = BTreeMap::new();
    for task in tasks {
        let name = task.spec().name.clone();
        if by_name.insert(name.clone(), task).is_some() {
            return Err(ServeError::DuplicateSpec(name));
        }
    }
    let chatml = ChatTemplate::new(CHATML, "", "").map_err(|e| ServeError::Config(format!("ChatML: {e}")))?;
    let digests = by_name.iter().map(|(name, t)| (name.clone(), episodes::SpecDigests::of(t.spec()))).collect();
    let state = Arc::new(State {
        config: config.clone(),
        tasks: by_name,
        host,
        episodes: episodes::Episodes::default(),
        jobs: Arc::new(tokio::sync::Semaphore::new(config.max_queue)),
        metrics: metrics::Metrics::default(),
        chatml,
        digests,
    });
    episodes::spawn_sweeper(&runtime, Arc::downgrade(&state), config.idle_timeout);
    Ok(Router::new()
        .route("/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/specs", get(episodes::specs))
        .route("/reset", post(episodes::reset))
        .route("/step", post(episodes::step))
        .route("/close", post(episodes::close))
        .route("/score_test", post(episodes::score_test))
        .route("/run_code", post(run_code::run_code))
        .route("/metrics", get(metrics::metrics))
        .fallback(api::no_route)
        .method_not_allowed_fallback(api::wrong_method)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), api::require_token))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::observe))
        .with_state(state))
}

/// A bound server: [`Server::bind`], then [`Server::run`].
pub struct Server {
    listener: tokio::net::TcpListener,
    router: Router,
    addr: SocketAddr,
}

impl Server {
    /// Validates `config`, builds the [`router`] and binds `config.listen` (port 0: any free port,
    /// see [`Server::local_addr`]).
    pub async fn bind(config: Config, host: Arc<Host>, tasks: Vec<Arc<Task>>) -> Result<Server, ServeError> {
        let router = router(&config, host, tasks)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr()?;
        Ok(Server { listener, router, addr })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then lets the requests in progress finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_address_needs_a_token() {
        let public = Config { listen: "0.0.0.0:8765".parse().unwrap(), ..Config::default() };
        assert!(matches!(public.validate(), Err(ServeError::TokenRequired(_))));
        let with_token = Config { token: Some("s3cret".into()), ..public.clone() };
        assert!(with_token.validate().is_ok());
        assert!(Config { token: Some(" ".into()), ..public }.validate().is_err());
        assert!(Config { listen: "[::1]:1".parse().unwrap(), ..Config::default() }.validate().is_ok());
    }
}
