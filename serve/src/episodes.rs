//! The environment endpoints: `GET /specs`, `POST /reset`, `POST /step`, `POST /close`,
//! `POST /score_test`, and the idle sweep. An episode is one [`Env`] of a served
//! [`runtime::env::Task`] behind a random id; its answers carry the same keys as the Python
//! binding's `EtpoEnv.reset` / `EtpoEnv.step`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::extract::State as AxumState;
use axum::Json;
use envspec::{ChatMessage, Prompt, Spec};
use runtime::env::{Env, EnvError, Observation, StepResult};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{ApiError, JsonBody};
use crate::State;

/// One open episode.
pub(crate) struct Episode {
    seed: u64,
    /// Locked for a whole step; a second concurrent step of the same episode is refused (409).
    env: Mutex<Env>,
    /// Set when a step ended the episode: `terminated` or `truncated`.
    over: Mutex<Option<&'static str>>,
    last_used: Mutex<Instant>,
}

impl Episode {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last_used.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The open episodes by id.
#[derive(Default)]
pub(crate) struct Episodes {
    map: Mutex<HashMap<String, Arc<Episode>>>,
}

impl Episodes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Episode>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn get(&self, id: &str) -> Result<Arc<Episode>, ApiError> {
        self.lock().get(id).cloned().ok_or_else(|| ApiError::UnknownEpisode(id.to_string()))
    }

    /// Closes the episodes idle for longer than `idle` whose environment is not in use; returns
    /// how many.
    fn sweep(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, e| e.idle_for(now) <= idle || e.env.try_lock().is_err());
        before - map.len()
    }
}

/// Runs the idle sweep until the server's state is dropped.
pub(crate) fn spawn_sweeper(runtime: &tokio::runtime::Handle, state: Weak<State>, idle: Duration) {
    let period = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let closed = state.episodes.sweep(idle);
            state.metrics.expired.fetch_add(closed as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
}

/// `GET /specs`: the served specs.
pub(crate) async fn specs(AxumState(state): AxumState<Arc<State>>) -> Json<Value> {
    let describe = |t: &Arc<runtime::env::Task>| {
        let digests = state.digests.get(&t.spec().name).cloned().unwrap_or_default();
        describe(t.spec(), &digests)
    };
    Json(Value::Array(state.tasks.values().map(describe).collect()))
}

/// The sha256 (hex) of a served spec's file and of the file it reads (its data file or its game
/// module; `None` for a built-in data set or a file that cannot be read), so that a client can
/// tell whether the server runs the same version of a spec as its own copy.
#[derive(Clone, Default)]
pub(crate) struct SpecDigests {
    spec: Option<String>,
    data: Option<String>,
}

impl SpecDigests {
    /// Hashes the files of `spec` as they are now (called once, when the server is built).
    pub(crate) fn of(spec: &Spec) -> SpecDigests {
        let data = match spec.kind.game() {
            Some(game) => Some(game.module.clone()),
            None => spec.dataset.source.path().map(|p| spec.base_dir().join(p)),
        };
        SpecDigests { spec: file_sha256(&spec.path), data: data.and_then(|p| file_sha256(&p)) }
    }
}

fn file_sha256(path: &std::path::Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).ok()?;
    Some(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// What a client needs to know about a spec (no file paths).
fn describe(spec: &Spec, digests: &SpecDigests) -> Value {
    json!({
        "name": spec.name,
        "description": spec.description,
        "kind": spelling(&spec.kind),
        "max_steps": spec.max_steps,
        "seeds": spec.dataset.seeds,
        "prompt_format": spelling(&spec.prompt.format()),
        "failure_reward": spec.reward.failure_reward,
        "sha256": digests.spec,
        "data_sha256": digests.data,
    })
}

/// The spec-file spelling of an enum value (its serde name; for a variant with data, its key).
fn spelling(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(Value::Object(map)) if map.len() == 1 => map.keys().next().cloned().unwrap_or_default(),
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResetRequest {
    spec: String,
    #[serde(default)]
    seed: Option<u64>,
}

/// `POST /reset {"spec", "seed"?}` → `{"episode_id", "observation", "messages"?, "info"}`.
pub(crate) async fn reset(
    AxumState(state): AxumState<Arc<State>>,
    JsonBody(req): JsonBody<ResetRequest>,
) -> Result<Json<Value>, ApiError> {
    let task = state.task(&req.spec)?.clone();
    let max = state.config.max_episodes;
    if state.episodes.len() >= max {
        return Err(ApiError::Busy(format!("{max} episodes are open, the most allowed; close some")));
    }
    let seed = req.seed.or_else(|| task.spec().dataset.seeds.first().copied()).unwrap_or(0);
    let (env, obs) = state
        .blocking(move || {
            let mut env = task.env(seed).map_err(env_error)?;
            let obs = env.reset().map_err(env_error)?;
            Ok((env, obs))
        })
        .await?;
    let mut out = state.observation(&obs)?;
    out["info"]["split_seed"] = json!(seed);
    let id = format!("{:032x}", rand::random::<u128>());
    let episode = Episode { seed, env: Mutex::new(env), over: Mutex::new(None), last_used: Mutex::new(Instant::now()) };
    {
        let mut map = state.episodes.lock();
        if map.len() >= max {
            return Err(ApiError::Busy(format!("{max} episodes are open, the most allowed; close some")));
        }
        map.insert(id.clone(), Arc::new(episode));
    }
    out["episode_id"] = json!(id);
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StepRequest {
    episode_id: String,
    action: String,
}

/// `POST /step {"episode_id", "action"}` → `{"observation", "messages"?, "reward", "terminated",
/// "truncated", "info"}`. The action is the policy's raw generation, cut by the spec's extraction.
pub(crate) async fn step(
    AxumState(state): AxumState<Arc<State>>,
    JsonBody(req): JsonBody<StepRequest>,
) -> Result<Json<Value>, ApiError> {
    let StepRequest { episode_id: id, action } = req;
    let episode = state.episodes.get(&id)?;
    if let Some(how) = *episode.over.lock().unwrap_or_else(|e| e.into_inner()) {
        return Err(ApiError::EpisodeOver { id, how });
    }
    episode.touch();
    let ep = episode.clone();
    let result: StepResult = state
        .blocking(move || {
            let Ok(mut env) = ep.env.try_lock() else { return Err(ApiError::EpisodeBusy(id)) };
            let mut over = ep.over.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(how) = *over {
                return Err(ApiError::EpisodeOver { id, how });
            }
            let result = match env.step(&action) {
                Err(EnvError::EpisodeOver) => return Err(ApiError::EpisodeOver { id, how: "over" }),
                r => r.map_err(env_error)?,
            };
            if result.terminated || result.truncated {
                *over = Some(if result.terminated { "terminated" } else { "truncated" });
            }
            Ok(result)
        })
        .await?;
    episode.touch();
    let mut out = state.observation(&result.observation)?;
    let info = &result.info;
    out["reward"] = json!(result.reward);
    out["terminated"] = json!(result.terminated);
    out["truncated"] = json!(result.truncated);
    let extra = json!({
        "split_seed": episode.seed,
        "action": info.action,
        "error": info.error,
        "ran": info.ran,
        "wall_s": info.wall_s,
        "cpu_s": info.cpu_s,
        "peak_rss_mb": info.peak_rss_mb,
    });
    if let (Some(dst), Value::Object(src)) = (out["info"].as_object_mut(), extra) {
        dst.extend(src);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CloseRequest {
    episode_id: String,
}

/// `POST /close {"episode_id"}` → `{"episode_id", "closed": true}`; 404 if it is not open.
pub(crate) async fn close(
    AxumState(state): AxumState<Arc<State>>,
    JsonBody(req): JsonBody<CloseRequest>,
) -> Result<Json<Value>, ApiError> {
    match state.episodes.lock().remove(&req.episode_id) {
        Some(_) => Ok(Json(json!({ "episode_id": req.episode_id, "closed": true }))),
        None => Err(ApiError::UnknownEpisode(req.episode_id)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScoreTestRequest {
    spec: String,
    #[serde(default)]
    seed: Option<u64>,
    action: String,
}

/// `POST /score_test {"spec", "seed"?, "action"}` → `{"spec", "split_seed", "test_score",
/// "error", "ran", "wall_s", "cpu_s", "peak_rss_mb"}`: the held-out score of an action
/// (`dataset.test_fraction`). The action is one a step's `info.action` gave (already cut by the
/// spec's extraction); it is assembled with the spec's program and scored on the test part of
/// the seed's split, as a local run scores the action of its best validation reward. The test
/// labels stay here: the sandbox gets the test features, the answer only the score
/// (`test_score` null and `error` set when the program failed). 400 for a game or a spec without
/// a test part.
pub(crate) async fn score_test(
    AxumState(state): AxumState<Arc<State>>,
    JsonBody(req): JsonBody<ScoreTestRequest>,
) -> Result<Json<Value>, ApiError> {
    let task = state.task(&req.spec)?.clone();
    let spec = task.spec();
    if !spec.holds_out_a_test_part() {
        return Err(ApiError::BadRequest(format!(
            "spec {:?} holds out no test part (it is a game, or its dataset.test_fraction is 0)",
            spec.name
        )));
    }
    let seed = req.seed.or_else(|| spec.dataset.seeds.first().copied()).unwrap_or(0);
    let action = req.action;
    let score = state
        .blocking(move || {
            let env = task.env(seed).map_err(env_error)?;
            env.score_action_on_test(&action)
                .map_err(env_error)?
                .ok_or_else(|| ApiError::Internal(format!("split seed {seed} has no test rows")))
        })
        .await?;
    let (test_score, error) = match &score.result {
        Ok(auc) => (Some(*auc), String::new()),
        Err(e) => (None, e.clone()),
    };
    Ok(Json(json!({
        "spec": req.spec,
        "split_seed": seed,
        "test_score": test_score,
        "error": error,
        "ran": test_score.is_some(),
        "wall_s": score.wall_s,
        "cpu_s": score.cpu_s,
        "peak_rss_mb": score.peak_rss_mb,
    })))
}

/// An environment failure is the server's (500): actions never fail this way.
fn env_error(e: EnvError) -> ApiError {
    ApiError::Internal(format!("the environment failed: {e}"))
}

impl State {
    /// The served task named `name`, or 404 with the served names.
    fn task(&self, name: &str) -> Result<&Arc<runtime::env::Task>, ApiError> {
        self.tasks.get(name).ok_or_else(|| ApiError::UnknownSpec {
            name: name.to_string(),
            served: self.tasks.keys().cloned().collect(),
        })
    }

    pub(crate) fn open_episodes(&self) -> usize {
        self.episodes.len()
    }

    /// `{"observation", "messages"?, "info": {"step", "messages"?}}` for a state: the text the
    /// model continues (chat prompts rendered with ChatML, as the Python binding does by default)
    /// and, for chat prompts, the messages.
    fn observation(&self, obs: &Observation) -> Result<Value, ApiError> {
        let (text, messages) = match &obs.prompt {
            Prompt::Completion(text) => (text.clone(), None),
            Prompt::Chat(messages) => {
                let text = self
                    .chatml
                    .render(messages, true)
                    .map_err(|e| ApiError::Internal(format!("rendering the chat observation failed: {e}")))?;
                (text, Some(messages_json(messages)))
            }
        };
        let mut out = json!({ "observation": text, "info": { "step": obs.step } });
        if let Some(m) = messages {
            out["messages"] = m.clone();
            out["info"]["messages"] = m;
        }
        Ok(out)
    }
}

fn messages_json(messages: &[ChatMessage]) -> Value {
    Value::Array(messages.iter().map(|m| json!({ "role": m.role, "content": m.content })).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_are_the_spec_file_names() {
        assert_eq!(spelling(&envspec::PromptFormat::Chat), "chat");
        assert_eq!(spelling(&envspec::Kind::Sklearn), "sklearn");
    }
}
