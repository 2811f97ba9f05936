//! What every endpoint shares: the JSON error answer ([`ApiError`]), the JSON body extractor
//! ([`JsonBody`]: 400 for bad JSON, 413 over the body limit), the bearer-token check and the
//! admission of blocking work ([`State::admit`]: 503 with `Retry-After` when the queue is full).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State as AxumState};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::State;

/// Seconds a client is told to wait (`Retry-After`) when the server is at capacity.
const RETRY_AFTER_S: u32 = 1;

/// Why a request was refused or failed. Every variant answers `{"error": "..."}` with its status
/// code (`UnknownSpec` adds `"specs"`, the served names).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// The body is not the JSON the endpoint takes, or a value in it is out of range.
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown spec {name:?}; this server serves: {}", served.join(", "))]
    UnknownSpec { name: String, served: Vec<String> },
    #[error("no open episode {0:?}: it was closed, expired after the idle timeout, or never existed")]
    UnknownEpisode(String),
    #[error("episode {id} is over ({how}); close it and reset a new one")]
    EpisodeOver { id: String, how: &'static str },
    #[error("a step of episode {0} is still running; step an episode from one caller at a time")]
    EpisodeBusy(String),
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the server is at capacity ({0}); retry later")]
    Busy(String),
    #[error("a valid `Authorization: Bearer <token>` header is required")]
    Unauthorized,
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    #[error("method {0} is not allowed here")]
    Method(String),
    /// A fault of the server or of the environment itself (never of an action).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownSpec { .. } | ApiError::UnknownEpisode(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::EpisodeOver { .. } | ApiError::EpisodeBusy(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let ApiError::UnknownSpec { served, .. } = &self {
            body["specs"] = serde_json::json!(served);
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON request body, whatever its content type (so that `curl -d` works as it is): 413 over
/// the body limit, 400 with serde's reason when it is not the expected JSON.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<State>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<State>) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(state.config.max_body_bytes)
            } else {
                ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
    }
}

/// With a token configured, every request must carry `Authorization: Bearer <token>`.
pub(crate) async fn require_token(AxumState(state): AxumState<Arc<State>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.config.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Equality whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers unknown paths with a JSON 404.
pub(crate) async fn no_route(req: Request) -> ApiError {
    ApiError::NoRoute(format!("{} {}", req.method(), req.uri().path()))
}

/// Answers a known path with the wrong method with a JSON 405.
pub(crate) async fn wrong_method(req: Request) -> ApiError {
    ApiError::Method(req.method().to_string())
}

/// One admitted unit of blocking work; dropping it frees its place in the queue.
pub(crate) struct Admitted(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl State {
    /// A place in the bounded queue of blocking work (environment steps and resets, sandboxed
    /// code), or 503 when `max_queue` jobs are already running or waiting.
    pub(crate) fn admit(&self) -> Result<Admitted, ApiError> {
        self.jobs.clone().try_acquire_owned().map(Admitted).map_err(|_| {
            ApiError::Busy(format!("{} jobs running or waiting, the most --max-queue allows", self.config.max_queue))
        })
    }

    /// Runs blocking work (an environment step, a sandbox job) on Tokio's blocking threads,
    /// holding its place in the queue until it is done.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let admitted = self.admit()?;
        let out = tokio::task::spawn_blocking(move || {
            let out = work();
            drop(admitted);
            out
        })
        .await;
        out.map_err(|e| ApiError::Internal(format!("the worker thread failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn statuses() {
        assert_eq!(ApiError::TooLarge(1).status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::EpisodeBusy("e".into()).status(), StatusCode::CONFLICT);
        let r = ApiError::Busy("x".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
