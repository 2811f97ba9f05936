//! The server's guards: the token, the body limit, the bounded queue.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{config, TestServer};

#[test]
fn a_public_address_needs_a_token() {
    let public = serve::Config { listen: "0.0.0.0:0".parse().unwrap(), ..config() };
    let err = public.validate().unwrap_err();
    assert!(matches!(err, serve::ServeError::TokenRequired(_)), "{err}");
    assert!(err.to_string().contains("--token"), "{err}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let bound = rt.block_on(serve::Server::bind(
        public.clone(),
        std::sync::Arc::new(runtime::env::Host::new(Default::default())),
        vec![],
    ));
    assert!(matches!(bound, Err(serve::ServeError::TokenRequired(_))));
    assert!(serve::Config { token: Some("t".into()), ..public }.validate().is_ok());
}

#[test]
fn with_a_token_every_request_needs_the_bearer() {
    let s = TestServer::start(serve::Config { token: Some("s3cret-token".into()), ..config() });
    assert_eq!(s.get_with("/health", None).status, 401);
    let wrong = s.get_with("/health", Some("Bearer s3cret-tokem"));
    assert_eq!(wrong.status, 401);
    assert!(wrong.json()["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(s.get_with("/health", Some("s3cret-token")).status, 401);
    assert_eq!(s.post_with("/reset", &json!({"spec": "guess"}), None).status, 401);
    assert_eq!(s.get_with("/metrics", None).status, 401);
    assert_eq!(s.get_with("/health", Some("Bearer s3cret-token")).status, 200);
    let r = s.post_with("/reset", &json!({"spec": "guess"}), Some("Bearer s3cret-token"));
    assert_eq!(r.status, 200, "{}", r.text);
}

#[test]
fn an_oversize_body_is_413() {
    let s = TestServer::default_on_loopback();
    let code = format!("# {}\nprint(1)", "x".repeat(1 << 20));
    let r = s.post("/run_code", &json!({"code": code, "language": "python"}));
    assert_eq!(r.status, 413, "{}", &r.text[..r.text.len().min(300)]);
    assert!(r.json()["error"].as_str().unwrap().contains("1048576 bytes"), "{}", r.text);
    // Just under the limit is fine.
    let code = format!("# {}\nprint(1)", "x".repeat(1000));
    assert_eq!(s.post("/run_code", &json!({"code": code, "language": "python"})).status, 200);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = std::sync::Arc::new(TestServer::start(serve::Config { max_queue: 1, ..config() }));
    let slow = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.post("/run_code", &json!({"code": "import time\ntime.sleep(3)\nprint('done')", "language": "python"}))
        })
    };
    // Wait until the slow program holds the only place in the queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.get("/metrics").text.contains("etpo_serve_queue_depth 1\n") {
        assert!(Instant::now() < deadline, "the slow request never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = s.post("/reset", &json!({"spec": "guess"}));
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert!(r.json()["error"].as_str().unwrap().contains("retry later"));
    let r = s.post("/run_code", &json!({"code": "print(1)", "language": "python"}));
    assert_eq!(r.status, 503);
    // Requests that need no blocking work still answer.
    assert_eq!(s.get("/health").status, 200);
    let done = slow.join().unwrap();
    assert_eq!(done.json()["run_result"]["stdout"], "done\n", "{}", done.text);
    assert_eq!(s.post("/reset", &json!({"spec": "guess"})).status, 200);
}
