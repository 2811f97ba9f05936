//! `GET /metrics`: request counts by endpoint and status, latency histograms by endpoint, open
//! episodes, episodes expired, and the queue of blocking work, in Prometheus' text format
//! (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State as AxumState};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::State;

/// Upper bounds of the latency buckets, seconds: a game step takes well under a millisecond of
/// work, a sandboxed program tens of milliseconds to its time limit.
const BUCKETS: [f64; 15] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The server's counters.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Episodes closed by the idle sweep.
    pub(crate) expired: AtomicU64,
}

#[derive(Default, Clone)]
struct Histogram {
    /// Cumulative counts per bucket of `BUCKETS`.
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Metrics {
    fn record(&self, endpoint: &str, status: u16, seconds: f64) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((endpoint.to_string(), status)).or_insert(0) +=
            1;
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = latency.entry(endpoint.to_string()).or_default();
        for (count, bound) in h.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    fn render(&self, state: &State) -> String {
        let mut out = String::new();
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let latency = self.latency.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP etpo_serve_requests_total Requests answered, by endpoint and HTTP status.");
        let _ = writeln!(out, "# TYPE etpo_serve_requests_total counter");
        for ((endpoint, status), n) in &requests {
            let _ = writeln!(out, "etpo_serve_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP etpo_serve_request_duration_seconds Time from request to response, by endpoint.");
        let _ = writeln!(out, "# TYPE etpo_serve_request_duration_seconds histogram");
        for (endpoint, h) in &latency {
            for (bound, count) in BUCKETS.iter().zip(h.buckets) {
                let _ = writeln!(
                    out,
                    "etpo_serve_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "etpo_serve_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "etpo_serve_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {}", h.sum);
            let _ = writeln!(out, "etpo_serve_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {}", h.count);
        }
        let gauges = [
            (
                "etpo_serve_episodes_open",
                "gauge",
                "Episodes open (reset and not yet closed or expired).",
                state.open_episodes() as u64,
            ),
            (
                "etpo_serve_episodes_expired_total",
                "counter",
                "Episodes closed by the idle sweep.",
                self.expired.load(Ordering::Relaxed),
            ),
            (
                "etpo_serve_queue_depth",
                "gauge",
                "Blocking jobs (resets, steps, sandboxed programs) running or waiting for a sandbox worker.",
                state.queue_depth() as u64,
            ),
            (
                "etpo_serve_queue_capacity",
                "gauge",
                "The most blocking jobs admitted at once (--max-queue); more are answered 503.",
                state.config.max_queue as u64,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// Middleware (outermost): counts and times every request, labelled by its route (`other` for
/// paths that match none, so that the label set stays bounded).
pub(crate) async fn observe(AxumState(state): AxumState<Arc<State>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    state.metrics.record(&endpoint, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`.
pub(crate) async fn metrics(AxumState(state): AxumState<Arc<State>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.record("/step", 200, 0.003);
        m.record("/step", 200, 20.0);
        m.record("/step", 404, 0.0001);
        let latency = m.latency.lock().unwrap();
        let h = &latency["/step"];
        assert_eq!(h.count, 3);
        assert_eq!(h.buckets[0], 1); // 0.5 ms
        assert_eq!(h.buckets[3], 2); // 5 ms
        assert_eq!(h.buckets[BUCKETS.len() - 1], 3); // 30 s
        assert_eq!(m.requests.lock().unwrap()[&("/step".to_string(), 200)], 2);
    }
}
