//! `etpo run --remote URL[,URL...]`: environments that run on `etpo serve` servers instead of
//! this process's sandbox pool and game engine.
//!
//! [`Servers`] is the set of servers and a small blocking HTTP client of the serve protocol
//! (plain HTTP; `GET /specs`, `POST /reset`, `/step`, `/close`; the bearer token, if any, from
//! `$ETPO_SERVE_TOKEN`). [`RemoteSpec`] makes one [`RemoteEnv`] per seed, each assigned to a
//! server round-robin (in the loop's order of specs × seeds). A [`RemoteEnv`] keeps its running
//! episode's steps: the raw generations, rewards and states. When its server fails during a reset
//! or a step (it answers 5xx, or the connection fails and `GET /health` does not answer either),
//! the server is marked dead for the rest of the run, the episode is re-created on the next live
//! server by a reset and the generations so far replayed with `/step`, each of which must give
//! the reward and state it gave before (for a data task, the replay runs the episode's failed
//! actions again; an environment that does not repeat itself stops the run with an error), and
//! the step is retried there. An episode the server forgot (it expired after the server's idle
//! timeout) is re-created the same way on the same server. The loop logs a step once, when it
//! returns, so nothing is logged twice or lost. When every server is dead the step fails with
//! [`RemoteError::AllDown`]; the run stops after logging the round's other steps and can be
//! resumed.
//!
//! The states are a local environment's, byte for byte: a completion spec's state is the
//! server's `observation` text, a chat spec's is its `messages` (the policy renders them with
//! its model's chat template, as for a local environment); a reward is parsed from its JSON text
//! exactly (`RawValue`, then Rust's correctly rounded `f64` parser), so it is the server's `f64`.
//!
//! The held-out test score (`dataset.test_fraction`) of a seed's best action is asked of a live
//! server (`POST /score_test`), so that the test labels never leave it. What the protocol cannot
//! give is refused before a run starts ([`unsupported`]): `prompt.max_tokens` counted in a
//! model's tokens (a server measures states in bytes), and `--one-step` (it changes
//! `max_steps`, which the servers' specs fix).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envspec::{ChatMessage, Prompt, PromptFormat, Spec};
use runtime::env::{Observation, Score, StepInfo, StepResult, TokenCounter};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::environment::{Environment, Environments};
use super::policy::prompt_sha256;
use super::record::StepRecord;
use super::ExperimentError;

/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take in all (a step waits for the server's sandbox queue and the
/// program's own limits; a server that takes longer is treated as failed).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// 503 answers (the server's queue is full) waited out per request, each for its `Retry-After`.
const BUSY_RETRIES: u32 = 600;
/// Failures in a row of a server that still answers `GET /health` (connections that fail, an
/// episode it forgets), in one reset or step, before it is treated as dead.
const STRIKES: u32 = 3;
/// The largest answer read.
const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// Errors of remote environments.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("--remote {url:?}: {message}")]
    BadUrl { url: String, message: String },
    /// Every server failed: each with why.
    #[error("every etpo server is down: {}", .0.join("; "))]
    AllDown(Vec<String>),
    /// A server refused a request, or answered something that is not the serve protocol.
    #[error("etpo server {url}: {message}")]
    Refused { url: String, message: String },
    /// A server's spec, or an environment's replayed outcome, differs from what this run has.
    #[error("etpo server {url}: {message}")]
    Mismatch { url: String, message: String },
    /// A feature remote environments do not provide.
    #[error("{0}")]
    Unsupported(String),
}

/// Why `spec` cannot run on `etpo serve` servers in this run, if it cannot: `counts_tokens` is
/// whether the policy measures states in a model's tokens (a model policy), `one_step` whether
/// `--one-step` changes the spec's `max_steps`.
pub fn unsupported(spec: &Spec, counts_tokens: bool, one_step: bool) -> Option<String> {
    let name = &spec.name;
    if counts_tokens {
        if let Some(max) = spec.prompt_max_tokens {
            return Some(format!(
                "{name}: prompt.max_tokens ({max}) is counted in the model's tokens, but an etpo server measures states \
                 in bytes; run this spec without --remote, or drop prompt.max_tokens"
            ));
        }
    }
    if one_step && spec.max_steps != 1 {
        return Some(format!(
            "{name}: --one-step changes max_steps, which the servers' copy of the spec fixes; run it without --remote"
        ));
    }
    None
}

/// What a run expects of a served spec: the local spec and the sha256 of its file and of the
/// file it reads (its data or game module), as `config.json` records them.
pub struct ExpectedSpec<'a> {
    pub spec: &'a Spec,
    pub sha256: Option<&'a str>,
    pub data_sha256: Option<&'a str>,
}

/// The `etpo serve` servers of a run, which of them are dead, and the HTTP client.
pub struct Servers {
    /// `http://host:port`, without a trailing slash.
    urls: Vec<String>,
    agent: ureq::Agent,
    /// For `GET /health` after a failed connection: never a pooled connection.
    probe: ureq::Agent,
    token: Option<String>,
    /// Why each server is dead; `None` while it is live.
    dead: Mutex<Vec<Option<String>>>,
    /// The next server to assign (round-robin).
    next: AtomicUsize,
}

/// How a request failed.
#[derive(Debug)]
enum CallError {
    /// No answer: the connection failed or broke.
    Transport(String),
    /// A 5xx answer: the server is broken.
    Failed(String),
    /// `/step` answered 404: the server does not know the episode (closed or expired).
    Gone(String),
    /// Any other answer but success: a fault of this client or of the run's configuration.
    Refused(String),
}

impl Servers {
    /// The servers at `urls` (`http://host:port`; TLS is not supported). Contacts none of them.
    pub fn new(urls: &[String]) -> Result<Arc<Servers>, RemoteError> {
        if urls.is_empty() {
            return Err(RemoteError::BadUrl { url: String::new(), message: "no server given".into() });
        }
        let mut clean: Vec<String> = Vec::new();
        for url in urls {
            let bad = |message: &str| RemoteError::BadUrl { url: url.clone(), message: message.to_string() };
            let u = url.trim().trim_end_matches('/');
            if u.starts_with("https://") {
                return Err(bad("etpo's client speaks plain HTTP only: give http://HOST:PORT (for a server elsewhere, put it behind a TLS tunnel or proxy and give the local end)"));
            }
            let Some(rest) = u.strip_prefix("http://") else {
                return Err(bad("expected http://HOST:PORT, as `etpo serve` prints it"));
            };
            if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
                return Err(bad("expected http://HOST:PORT, with no path"));
            }
            if clean.iter().any(|c| c == u) {
                return Err(bad("given twice"));
            }
            clean.push(u.to_string());
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let probe = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CONNECT_TIMEOUT))
            .max_idle_connections(0)
            .build()
            .into();
        let token = std::env::var("ETPO_SERVE_TOKEN").ok().filter(|t| !t.is_empty());
        let dead = Mutex::new(vec![None; clean.len()]);
        Ok(Arc::new(Servers { urls: clean, agent, probe, token, dead, next: AtomicUsize::new(0) }))
    }

    /// The servers' URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    fn dead(&self) -> std::sync::MutexGuard<'_, Vec<Option<String>>> {
        self.dead.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks server `i` dead for the rest of the run (once, with a warning).
    fn mark_dead(&self, i: usize, why: &str) {
        let mut dead = self.dead();
        if dead[i].is_none() {
            dead[i] = Some(why.to_string());
            let left = dead.iter().filter(|d| d.is_none()).count();
            eprintln!(
                "warning: etpo server {} is down ({why}); {left} of {} servers left, its episodes move to them",
                self.urls[i],
                self.urls.len()
            );
        }
    }

    /// Server `from` if it is live, else the next live one after it.
    fn live_from(&self, from: usize) -> Result<usize, RemoteError> {
        let dead = self.dead();
        let n = self.urls.len();
        (0..n).map(|k| (from + k) % n).find(|&i| dead[i].is_none()).ok_or_else(|| {
            RemoteError::AllDown(
                self.urls
                    .iter()
                    .zip(dead.iter())
                    .map(|(u, why)| format!("{u} ({})", why.as_deref().unwrap_or("?")))
                    .collect(),
            )
        })
    }

    /// The server of the next environment (round-robin).
    fn assign(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()
    }

    /// Whether server `i` answers `GET /health` on a new connection (two tries).
    fn answers(&self, i: usize) -> bool {
        (0..2).any(|_| {
            let mut req = self.probe.get(format!("{}/health", self.urls[i]));
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            req.call().is_ok_and(|r| r.status().is_success())
        })
    }

    /// One request to server `i`: `body` is POSTed as JSON, or without one a GET. Waits out
    /// 503 (a full queue) as the server's `Retry-After` says.
    fn request(&self, i: usize, path: &str, body: Option<&Value>) -> Result<String, CallError> {
        let url = format!("{}{path}", self.urls[i]);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut waits = 0;
        loop {
            let sent = match body {
                Some(body) => {
                    let mut req = self.agent.post(&url).header("content-type", "application/json");
                    if let Some(a) = &auth {
                        req = req.header("authorization", a);
                    }
                    req.send(body.to_string())
                }
                None => {
                    let mut req = self.agent.get(&url);
                    if let Some(a) = &auth {
                        req = req.header("authorization", a);
                    }
                    req.call()
                }
            };
            let mut response = sent.map_err(|e| CallError::Transport(e.to_string()))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let text = response
                .body_mut()
                .with_config()
                .limit(MAX_ANSWER_BYTES)
                .read_to_string()
                .map_err(|e| CallError::Transport(format!("reading the answer of {path}: {e}")))?;
            match status {
                200..=299 => return Ok(text),
                503 if waits < BUSY_RETRIES => {
                    waits += 1;
                    std::thread::sleep(Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 60)));
                }
                500..=599 => return Err(CallError::Failed(format!("{path} answered {status}: {}", error_of(&text)))),
                404 if path == "/step" => return Err(CallError::Gone(error_of(&text))),
                401 => {
                    let hint = if self.token.is_some() { "a wrong" } else { "no" };
                    return Err(CallError::Refused(format!(
                        "{path} answered 401: {} ($ETPO_SERVE_TOKEN gives {hint} token)",
                        error_of(&text)
                    )));
                }
                _ => return Err(CallError::Refused(format!("{path} answered {status}: {}", error_of(&text)))),
            }
        }
    }

    /// Checks that every live server serves every spec of the run, in the same version; a server
    /// that does not answer is marked dead (with a warning). Fails if one serves another
    /// version of a spec (or not at all), or if none answers.
    pub fn check_specs(&self, expected: &[ExpectedSpec<'_>]) -> Result<(), RemoteError> {
        for i in 0..self.urls.len() {
            let url = &self.urls[i];
            let text = match self.request(i, "/specs", None) {
                Ok(text) => text,
                Err(CallError::Transport(why) | CallError::Failed(why)) => {
                    self.mark_dead(i, &why);
                    continue;
                }
                Err(CallError::Gone(message) | CallError::Refused(message)) => {
                    return Err(RemoteError::Refused { url: url.clone(), message });
                }
            };
            let served: Vec<Value> = serde_json::from_str(&text).map_err(|e| RemoteError::Refused {
                url: url.clone(),
                message: format!("GET /specs did not answer a list of specs ({e}); is this an etpo server?"),
            })?;
            for want in expected {
                check_served(url, &served, want)?;
            }
        }
        self.live_from(0).map(|_| ())
    }

    /// Closes an episode, ignoring failures (it expires on the server anyway).
    fn close(&self, i: usize, id: &str) {
        if self.dead()[i].is_none() {
            let _ = self.request(i, "/close", Some(&json!({ "episode_id": id })));
        }
    }

    /// The held-out test score of `action` (as a step's `info.action` gave it) on `seed`'s split
    /// of `spec`, from the next live server. A server that fails is marked dead (or, while it
    /// still answers `GET /health`, given a strike, dead after [`STRIKES`]) and the next is asked.
    fn score_test(&self, spec: &str, seed: u64, action: &str) -> Result<Score, RemoteError> {
        let body = json!({ "spec": spec, "seed": seed, "action": action });
        let mut strikes = 0;
        loop {
            let i = self.live_from(self.assign())?;
            let text = match self.request(i, "/score_test", Some(&body)) {
                Ok(text) => text,
                Err(CallError::Transport(why)) if self.answers(i) && strikes + 1 < STRIKES => {
                    strikes += 1;
                    eprintln!("warning: etpo server {}: /score_test failed ({why}); asking again", self.urls[i]);
                    continue;
                }
                Err(CallError::Transport(why) | CallError::Failed(why)) => {
                    self.mark_dead(i, &why);
                    continue;
                }
                Err(CallError::Gone(message) | CallError::Refused(message)) => {
                    let hint = if message.contains("no such endpoint") {
                        " (this server predates /score_test: run the same etpo version as this client)"
                    } else {
                        ""
                    };
                    return Err(RemoteError::Refused {
                        url: self.urls[i].clone(),
                        message: format!("{message}{hint}"),
                    });
                }
            };
            let refused = |message: String| RemoteError::Refused { url: self.urls[i].clone(), message };
            let reply: ScoreTestReply = serde_json::from_str(&text)
                .map_err(|e| refused(format!("/score_test answered something unexpected ({e})")))?;
            let result = match reply.test_score {
                Some(raw) => Ok(raw.get().trim().parse::<f64>().map_err(|_| {
                    refused(format!("/score_test answered the score {}, which is not a number", raw.get()))
                })?),
                None => Err(reply.error),
            };
            return Ok(Score {
                result,
                error_kind: None,
                wall_s: reply.wall_s,
                cpu_s: reply.cpu_s,
                peak_rss_mb: reply.peak_rss_mb,
                output: String::new(),
            });
        }
    }
}

/// The answer of `POST /score_test`.
#[derive(Deserialize)]
struct ScoreTestReply {
    /// Kept as its JSON text, parsed exactly; null when the program failed.
    test_score: Option<Box<RawValue>>,
    error: String,
    wall_s: f64,
    cpu_s: f64,
    peak_rss_mb: f64,
}

/// The `error` of an error answer, else its text.
fn error_of(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v["error"].is_string() => v["error"].as_str().unwrap_or_default().to_string(),
        _ => text.chars().take(500).collect(),
    }
}

/// The spec-file spelling of an enum value, as `GET /specs` gives it (its serde name; for a
/// variant with data, its key).
fn spelling(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(Value::Object(map)) if map.len() == 1 => map.keys().next().cloned().unwrap_or_default(),
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// Checks one expected spec against a server's `GET /specs`.
fn check_served(url: &str, served: &[Value], want: &ExpectedSpec<'_>) -> Result<(), RemoteError> {
    let spec = want.spec;
    let mismatch = |message: String| RemoteError::Mismatch { url: url.to_string(), message };
    let Some(got) = served.iter().find(|s| s["name"] == spec.name.as_str()) else {
        let names: Vec<&str> = served.iter().filter_map(|s| s["name"].as_str()).collect();
        return Err(mismatch(format!(
            "does not serve spec {:?} (it serves: {}); start it with the run's spec files",
            spec.name,
            names.join(", ")
        )));
    };
    let different = |what: &str, here: String, there: &Value| {
        mismatch(format!(
            "serves another version of spec {:?}: {what} {there} there, {here} here ({}); serve the same file",
            spec.name,
            spec.path.display()
        ))
    };
    let fields = [
        ("kind", json!(spelling(&spec.kind))),
        ("max_steps", json!(spec.max_steps)),
        ("seeds", json!(spec.dataset.seeds)),
        ("prompt_format", json!(spelling(&spec.prompt.format()))),
    ];
    for (key, here) in fields {
        if got[key] != here {
            return Err(different(key, here.to_string(), &got[key]));
        }
    }
    for (key, here) in [("sha256", want.sha256), ("data_sha256", want.data_sha256)] {
        if let (Some(here), Some(there)) = (here, got[key].as_str()) {
            if here != there {
                return Err(different(&format!("the {key} of its file is"), here.to_string(), &got[key]));
            }
        }
    }
    Ok(())
}

/// The environments of one spec on `etpo serve` servers.
pub struct RemoteSpec {
    spec: Arc<Spec>,
    servers: Arc<Servers>,
}

impl RemoteSpec {
    /// `spec`'s environments on `servers` (which [`Servers::check_specs`] has checked).
    pub fn new(spec: Arc<Spec>, servers: Arc<Servers>) -> RemoteSpec {
        RemoteSpec { spec, servers }
    }
}

impl Environments for RemoteSpec {
    fn env(&self, seed: u64) -> Result<Box<dyn Environment>, ExperimentError> {
        Ok(Box::new(RemoteEnv {
            spec: self.spec.clone(),
            servers: self.servers.clone(),
            seed,
            server: self.servers.assign(),
            episode: None,
            first: None,
            played: Vec::new(),
            over: false,
        }))
    }

    fn set_token_counter(&mut self, _counter: TokenCounter) -> Result<(), ExperimentError> {
        match unsupported(&self.spec, true, false) {
            Some(why) => Err(RemoteError::Unsupported(why).into()),
            None => Ok(()),
        }
    }

    /// Asked of the next live server (`POST /score_test`), which holds the test labels; one
    /// that fails is handled as during a step (dead, or a strike), and the next one is asked.
    fn score_action_on_test(&self, seed: u64, action: &str) -> Result<Option<Score>, ExperimentError> {
        if !self.spec.holds_out_a_test_part() {
            return Ok(None);
        }
        Ok(Some(self.servers.score_test(&self.spec.name, seed, action)?))
    }
}

/// One step of the running episode, as played.
struct Played {
    generation: String,
    reward: f64,
    next: Prompt,
}

/// One environment (a spec and a seed) whose episodes run on an `etpo serve` server.
pub struct RemoteEnv {
    spec: Arc<Spec>,
    servers: Arc<Servers>,
    seed: u64,
    /// The server its episodes run on.
    server: usize,
    /// The running episode's id on `server`; `None` when it has none there (before the first
    /// reset, after the episode ended, or after the server failed).
    episode: Option<String>,
    /// The running episode's first state (`None` before the first reset) and its steps so far.
    first: Option<Prompt>,
    played: Vec<Played>,
    /// The running episode ended.
    over: bool,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct StateInfo {
    step: u32,
}

#[derive(Deserialize)]
struct ResetReply {
    episode_id: String,
    observation: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    info: StateInfo,
}

#[derive(Deserialize)]
struct StepReply {
    observation: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    /// Kept as its JSON text, parsed exactly.
    reward: Box<RawValue>,
    terminated: bool,
    truncated: bool,
    info: StepReplyInfo,
}

#[derive(Deserialize)]
struct StepReplyInfo {
    step: u32,
    action: String,
    error: String,
    ran: bool,
    wall_s: f64,
    cpu_s: f64,
    peak_rss_mb: f64,
}

impl RemoteEnv {
    fn url(&self) -> &str {
        &self.servers.urls[self.server]
    }

    fn refused(&self, message: String) -> RemoteError {
        RemoteError::Refused { url: self.url().to_string(), message }
    }

    /// A state from an answer: the text of a completion spec, the messages of a chat spec.
    fn state(&self, text: String, messages: Option<Vec<Message>>, step: u32) -> Result<Observation, RemoteError> {
        let prompt = match self.spec.prompt.format() {
            PromptFormat::Completion => Prompt::Completion(text),
            PromptFormat::Chat => {
                let messages = messages.ok_or_else(|| {
                    self.refused(format!("a state of the chat spec {:?} came without its messages", self.spec.name))
                })?;
                Prompt::Chat(messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect())
            }
        };
        Ok(Observation { prompt, step })
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, path: &str, text: &str) -> Result<T, RemoteError> {
        serde_json::from_str(text).map_err(|e| self.refused(format!("{path} answered something unexpected ({e})")))
    }

    fn step_result(&self, text: &str) -> Result<StepResult, RemoteError> {
        let reply: StepReply = self.parse("/step", text)?;
        let reward: f64 = reply.reward.get().trim().parse().map_err(|_| {
            self.refused(format!("/step answered the reward {}, which is not a number", reply.reward.get()))
        })?;
        let info = reply.info;
        Ok(StepResult {
            observation: self.state(reply.observation, reply.messages, info.step)?,
            reward,
            terminated: reply.terminated,
            truncated: reply.truncated,
            info: StepInfo {
                action: info.action,
                error: info.error,
                ran: info.ran,
                wall_s: info.wall_s,
                cpu_s: info.cpu_s,
                peak_rss_mb: info.peak_rss_mb,
            },
        })
    }

    /// After a failed request: the episode there is lost (or in an unknown state). A server
    /// that answered 5xx is dead; one whose connection failed is dead unless it still answers
    /// `GET /health`; one that keeps failing is dead after [`STRIKES`]. A refusal is an error.
    fn fault(&mut self, e: CallError, strikes: &mut u32) -> Result<(), RemoteError> {
        let lost = self.episode.take();
        match e {
            CallError::Failed(why) => self.servers.mark_dead(self.server, &why),
            CallError::Transport(why) if !self.servers.answers(self.server) => {
                self.servers.mark_dead(self.server, &why)
            }
            CallError::Transport(why) | CallError::Gone(why) => {
                *strikes += 1;
                if *strikes >= STRIKES {
                    self.servers.mark_dead(self.server, &format!("{why}; {STRIKES} times in a row"));
                } else if let Some(id) = lost {
                    self.servers.close(self.server, &id);
                }
            }
            CallError::Refused(message) => return Err(self.refused(message)),
        }
        Ok(())
    }

    /// Opens an episode at its first state on this environment's server, or on the next live
    /// one when it fails.
    fn open(&mut self, strikes: &mut u32) -> Result<Observation, RemoteError> {
        loop {
            self.server = self.servers.live_from(self.server)?;
            let body = json!({ "spec": self.spec.name, "seed": self.seed });
            match self.servers.request(self.server, "/reset", Some(&body)) {
                Ok(text) => {
                    let reply: ResetReply = self.parse("/reset", &text)?;
                    self.episode = Some(reply.episode_id);
                    return self.state(reply.observation, reply.messages, reply.info.step);
                }
                Err(e) => self.fault(e, strikes)?,
            }
        }
    }

    /// Re-creates the running episode on a live server: a reset, then the generations played so
    /// far, each of which must give the reward and the state it gave before.
    fn recreate(&mut self, strikes: &mut u32) -> Result<(), RemoteError> {
        'server: loop {
            let first = self.open(strikes)?;
            if Some(&first.prompt) != self.first.as_ref() {
                return Err(self.not_repeated("its first state differs".into()));
            }
            for i in 0..self.played.len() {
                let id = self.episode.clone().expect("open() opened an episode");
                let body = json!({ "episode_id": id, "action": self.played[i].generation });
                let text = match self.servers.request(self.server, "/step", Some(&body)) {
                    Ok(text) => text,
                    Err(e) => {
                        self.fault(e, strikes)?;
                        continue 'server;
                    }
                };
                let r = self.step_result(&text)?;
                let p = &self.played[i];
                if r.reward != p.reward || r.terminated || r.truncated || r.observation.prompt != p.next {
                    let what = if r.reward != p.reward {
                        format!("step {} gave the reward {}, {} before", i + 1, r.reward, p.reward)
                    } else if r.terminated || r.truncated {
                        format!("the episode ended at step {} (error: {:?})", i + 1, r.info.error)
                    } else {
                        format!("the state after step {} differs (error: {:?})", i + 1, r.info.error)
                    };
                    return Err(self.not_repeated(what));
                }
            }
            return Ok(());
        }
    }

    fn not_repeated(&self, what: String) -> RemoteError {
        RemoteError::Mismatch {
            url: self.url().to_string(),
            message: format!(
                "spec {:?} seed {}: moving the running episode here by replaying its {} steps failed: {what}; the \
                 environment did not repeat itself, so the episode cannot move to another server",
                self.spec.name,
                self.seed,
                self.played.len()
            ),
        }
    }

    /// Closes the open episode on its server, if any.
    fn close(&mut self) {
        if let Some(id) = self.episode.take() {
            self.servers.close(self.server, &id);
        }
    }
}

impl Environment for RemoteEnv {
    fn reset(&mut self) -> Result<Observation, ExperimentError> {
        self.close();
        self.first = None;
        self.played.clear();
        self.over = false;
        let obs = self.open(&mut 0)?;
        self.first = Some(obs.prompt.clone());
        Ok(obs)
    }

    fn step(&mut self, generation: &str) -> Result<StepResult, ExperimentError> {
        if self.first.is_none() || self.over {
            return Err(ExperimentError::Internal(format!(
                "spec {:?} seed {}: step() {}",
                self.spec.name,
                self.seed,
                if self.over { "after the episode ended" } else { "before reset()" }
            )));
        }
        let mut strikes = 0;
        loop {
            if self.episode.is_none() {
                self.recreate(&mut strikes)?;
            }
            let id = self.episode.clone().expect("recreate() opened an episode");
            let body = json!({ "episode_id": id, "action": generation });
            match self.servers.request(self.server, "/step", Some(&body)) {
                Ok(text) => {
                    let result = self.step_result(&text)?;
                    let next = result.observation.prompt.clone();
                    self.played.push(Played { generation: generation.to_string(), reward: result.reward, next });
                    if result.terminated || result.truncated {
                        self.over = true;
                        self.close();
                    }
                    return Ok(result);
                }
                Err(e) => self.fault(e, &mut strikes)?,
            }
        }
    }

    /// Replays the logged generations (the serve protocol has no restore), checking each
    /// outcome against the log: the action, reward, error and end, and the next state's sha256.
    fn resume(&mut self, steps: &[&StepRecord]) -> Result<Observation, ExperimentError> {
        if self.first.is_none() || self.over || !self.played.is_empty() {
            Environment::reset(self)?;
        }
        let mut state = None;
        for (i, logged) in steps.iter().enumerate() {
            let r = Environment::step(self, &logged.generation)?;
            let next_sha = steps.get(i + 1).map(|n| n.prompt_sha256.as_str());
            let what = if r.info.action != logged.action || !same_reward(r.reward, logged.reward) {
                Some(format!(
                    "the action {:?} got the reward {}, the log has {:?} and {}",
                    r.info.action, r.reward, logged.action, logged.reward
                ))
            } else if r.info.error != logged.error {
                Some(format!("its error is now {:?}, the log has {:?}", r.info.error, logged.error))
            } else if r.terminated || r.truncated {
                Some("the episode ended, which it did not in the log".to_string())
            } else if next_sha.is_some_and(|sha| sha != prompt_sha256(&r.observation.prompt)) {
                Some("the next state differs from the logged one".to_string())
            } else {
                None
            };
            if let Some(what) = what {
                return Err(RemoteError::Mismatch {
                    url: self.url().to_string(),
                    message: format!(
                        "resuming spec {:?} seed {} episode {}: replaying logged step {} of {}: {what}; the environment \
                         did not repeat itself",
                        self.spec.name,
                        self.seed,
                        logged.episode,
                        i + 1,
                        steps.len()
                    ),
                }
                .into());
            }
            state = Some(r.observation);
        }
        state.ok_or_else(|| ExperimentError::Internal("resume() without steps".into()))
    }
}

/// Rewards as logged (`steps.jsonl` is read back with serde_json's float parser, which may be one
/// unit in the last place off) against the server's.
fn same_reward(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
}

impl Drop for RemoteEnv {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_without_a_path() {
        let s = Servers::new(&["http://127.0.0.1:8765/".into(), " http://h:1".into()]).unwrap();
        assert_eq!(s.urls(), ["http://127.0.0.1:8765", "http://h:1"]);
        for (bad, says) in [
            ("https://h:1", "plain HTTP"),
            ("h:1", "expected http://"),
            ("http://h:1/api", "no path"),
            ("http://", "expected http://"),
            ("http://h:1 x", "no path"),
        ] {
            let e = Servers::new(&[bad.into()]).err().unwrap().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(Servers::new(&["http://h:1".into(), "http://h:1/".into()]).is_err(), "twice");
        assert!(Servers::new(&[]).is_err());
    }

    #[test]
    fn dead_servers_are_skipped_round_robin_and_all_dead_names_them() {
        let s = Servers::new(&["http://a:1".into(), "http://b:2".into(), "http://c:3".into()]).unwrap();
        assert_eq!((s.assign(), s.assign(), s.assign(), s.assign()), (0, 1, 2, 0));
        s.mark_dead(1, "refused");
        assert_eq!(s.live_from(1).unwrap(), 2);
        assert_eq!(s.live_from(0).unwrap(), 0);
        s.mark_dead(2, "reset");
        s.mark_dead(0, "HTTP 500");
        let e = s.live_from(0).unwrap_err().to_string();
        assert_eq!(e, "every etpo server is down: http://a:1 (HTTP 500); http://b:2 (refused); http://c:3 (reset)");
    }

    #[test]
    fn rewards_parse_exactly_from_their_json_text() {
        // serde_json writes the shortest text that reads back as the same f64; Rust's parser is
        // correctly rounded, so the value survives the trip bit for bit.
        for x in [0.1 + 0.2, 0.8734567890123457, 1.0 / 3.0, -1.0, 0.051, 2.0f64.powi(-30) * 3.0] {
            let text = json!({ "reward": x }).to_string();
            #[derive(Deserialize)]
            struct R {
                reward: Box<RawValue>,
            }
            let r: R = serde_json::from_str(&text).unwrap();
            assert_eq!(r.reward.get().parse::<f64>().unwrap().to_bits(), x.to_bits(), "{text}");
        }
    }
}
