//! Where the time of one action goes: timestamps recorded by the host, the worker and the forked
//! child, for `etpo bench sandbox`'s breakdown ([`Pool::evaluate_traced`](crate::Pool::evaluate_traced)).
//!
//! Every timestamp is `CLOCK_MONOTONIC` in nanoseconds. The sandbox has no time namespace, so the
//! host (`clock_gettime`) and the Python side (`time.monotonic_ns`) read the same clock and their
//! stamps can be subtracted. What the worker and the child report is diagnostics only: the child
//! runs untrusted code and may send anything (the worker passes on only non-negative integers
//! under known names), and nothing the runtime decides depends on it.

use std::collections::BTreeMap;

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Timestamps of one [`Pool::evaluate_traced`](crate::Pool::evaluate_traced) call.
///
/// Host stamps, in order: `start` (called), `encoded` (request serialised), `ready` (a worker
/// taken and its cgroup's limit and out-of-memory counter read), `sent` (the request written to
/// the worker's pipe), `received` (the reply read), `checked` (the cgroup's out-of-memory counter
/// read again), `end` (the reply decoded and checked).
///
/// `worker` holds what the worker reported (see `serve_one` in harness.py), by name:
/// - worker stamps: `w_idle` (it began waiting for this request: the previous action's
///   clean-up and the fork of this action's child were done), `w_req` (the whole request read),
///   `w_job` (the job handed to the child forked ahead), `w_result` (the child's result complete),
///   `w_reply` (the reply about to be written);
/// - child stamps: `c_prepared` (the child forked ahead is ready for a job), `c_job` (job
///   received and decoded), `c_ready` (limits set, arrays built), `c_built` (`build_model`
///   returned a fitted model), `c_done` (`predict_proba` done, result encoded);
/// - counts: `c_prep_faults` (minor page faults of the child before its job), `c_faults` (minor
///   page faults while running it: copy-on-write after the fork shows here), `c_rehearsed` (1 if
///   the child rehearsed a trivial action before its job, see `Tuning::rehearse`);
/// - the worker's work after its previous reply, which delays a request sent right after that
///   reply, in order: `a_kill` (SIGKILL to every process of the previous job, their pipes
///   closed), `a_fork` (forking this action's child, while those processes exit; stamped
///   `w_fork` when it began), `a_reap` (waiting, after the fork, for the previous job's processes
///   to be gone), `a_wipe` (emptying the scratch directories); durations in ns. Without a sandbox
///   PID namespace, or when the fork first fails, the fork comes after the wipe.
///
/// A stamp is missing when that point was never reached (a failed or killed program).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionTrace {
    pub start: u64,
    pub encoded: u64,
    pub ready: u64,
    pub sent: u64,
    pub received: u64,
    pub checked: u64,
    pub end: u64,
    /// Reported by the worker and the child; untrusted.
    pub worker: BTreeMap<String, u64>,
}

impl ActionTrace {
    /// A worker or child stamp or count by name.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.worker.get(name).copied()
    }

    /// Nanoseconds from stamp `from` to stamp `to` (host stamps by their field names); `None`
    /// if either is missing or `to` is earlier.
    pub fn span(&self, from: &str, to: &str) -> Option<u64> {
        let at = |name: &str| match name {
            "start" => Some(self.start),
            "encoded" => Some(self.encoded),
            "ready" => Some(self.ready),
            "sent" => Some(self.sent),
            "received" => Some(self.received),
            "checked" => Some(self.checked),
            "end" => Some(self.end),
            other => self.get(other),
        };
        at(to)?.checked_sub(at(from)?)
    }
}

/// The trace object of a worker's reply header: non-negative integers by name, anything else
/// dropped.
pub(crate) fn from_header(header: &serde_json::Value) -> BTreeMap<String, u64> {
    header
        .get("trace")
        .and_then(|t| t.as_object())
        .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_negative_integers_are_taken_from_the_reply() {
        let header =
            serde_json::json!({"trace": {"w_req": 5, "c_job": -1, "c_ready": 2.5, "c_built": "7", "c_done": 9}});
        let got = from_header(&header);
        assert_eq!(got, BTreeMap::from([("w_req".to_string(), 5), ("c_done".to_string(), 9)]));
        assert!(from_header(&serde_json::json!({"trace": [1, 2]})).is_empty());
        assert!(from_header(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn spans_need_both_stamps_in_order() {
        let t = ActionTrace {
            start: 10,
            end: 50,
            worker: BTreeMap::from([("w_req".to_string(), 20), ("w_result".to_string(), 15)]),
            ..ActionTrace::default()
        };
        assert_eq!(t.span("start", "end"), Some(40));
        assert_eq!(t.span("start", "w_req"), Some(10));
        assert_eq!(t.span("w_req", "w_result"), None, "reversed");
        assert_eq!(t.span("start", "c_job"), None, "missing");
        assert!(monotonic_ns() > 0);
    }
}
