//! Episodes over HTTP: the specs, a guess game played to its end with the game's rewards, a data
//! spec's step in the sandbox and its held-out score, a chat spec's messages, and the episode's
//! life cycle (over, closed, expired).

use std::time::Duration;

use serde_json::json;

use crate::common::{self, config, TestServer};

#[test]
fn health_and_specs() {
    let s = TestServer::default_on_loopback();
    let h = s.get("/health");
    assert_eq!((h.status, h.json()), (200, json!({"status": "ok"})));
    let specs = s.get("/specs");
    assert_eq!(specs.status, 200);
    let specs = specs.json();
    let by_name = |name: &str| specs.as_array().unwrap().iter().find(|s| s["name"] == name).cloned().unwrap();
    let guess = by_name("guess");
    assert_eq!(guess["kind"], "wasm");
    assert_eq!(guess["max_steps"], 10);
    assert_eq!(guess["seeds"], json!([0, 1, 2, 3, 4]));
    assert_eq!(guess["prompt_format"], "completion");
    assert_eq!(by_name("adventure")["prompt_format"], "chat");
    let data = by_name("balance_scale");
    assert_eq!(data["kind"], "sklearn");
    assert!(specs.to_string().find("/envs/").is_none(), "no file paths in /specs: {specs}");
    // The files' sha256, for clients to check that they run the same version of a spec.
    let sha = |path: std::path::PathBuf| -> String {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(guess["sha256"], sha(crate::common::root().join("envs/games/guess.yaml")));
    let module = crate::common::root().join("games/target/wasm32-unknown-unknown/release/guess.wasm");
    assert_eq!(guess["data_sha256"], sha(module));
    assert_eq!(data["sha256"], sha(crate::common::root().join("envs/balance_scale.yaml")));
    assert_eq!(data["data_sha256"], json!(null), "a built-in data set has no file");
}

/// The range "from LO to HI" the guess game states in an observation.
fn range(observation: &str) -> Option<(u32, u32)> {
    let at = observation.rfind("from ")?;
    let mut words = observation[at + 5..].split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty());
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

#[test]
fn a_guess_episode_to_the_end_with_the_games_rewards() {
    let s = TestServer::default_on_loopback();
    let r = s.post("/reset", &json!({"spec": "guess", "seed": 3}));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = r.json();
    let id = r["episode_id"].as_str().unwrap().to_string();
    let first = r["observation"].as_str().unwrap();
    assert!(first.contains("I am thinking of a whole number from 1 to 100. You have 10 guesses."), "{first}");
    assert_eq!(r["info"], json!({"step": 0, "split_seed": 3}));
    assert!(r.get("messages").is_none());

    // Binary search; each wrong guess earns 0.1 x the share of the 100 numbers it rules out.
    let (mut lo, mut hi) = (1u32, 100u32);
    let mut steps = 0;
    loop {
        let guess = (lo + hi) / 2;
        let out = s.post("/step", &json!({"episode_id": id, "action": format!("{guess}\nignored")}));
        assert_eq!(out.status, 200, "{}", out.text);
        let out = out.json();
        steps += 1;
        let info = &out["info"];
        assert_eq!(info["action"], guess.to_string());
        assert_eq!(info["step"], steps);
        assert_eq!(info["split_seed"], 3);
        assert_eq!((info["ran"].as_bool(), info["error"].as_str()), (Some(true), Some("")));
        for key in ["wall_s", "cpu_s", "peak_rss_mb"] {
            assert!(info[key].as_f64().unwrap() >= 0.0, "{key}: {info}");
        }
        let obs = out["observation"].as_str().unwrap();
        let reward = out["reward"].as_f64().unwrap();
        if out["terminated"] == true {
            assert!(obs.contains("is right!"), "{obs}");
            assert_eq!(reward, 1.0);
            break;
        }
        assert_eq!(out["truncated"], false);
        let (new_lo, new_hi) = range(obs).unwrap_or_else(|| panic!("no range in {obs:?}"));
        let expected = 0.1 * f64::from((hi - lo + 1) - (new_hi - new_lo + 1)) / 100.0;
        assert!((reward - expected).abs() < 1e-12, "step {steps}: reward {reward}, expected {expected}");
        (lo, hi) = (new_lo, new_hi);
        assert!(steps < 8, "binary search takes at most 7 guesses");
    }

    // Over: stepping again is a conflict; the episode stays until closed.
    let again = s.post("/step", &json!({"episode_id": id, "action": "50"}));
    assert_eq!(again.status, 409, "{}", again.text);
    assert!(again.json()["error"].as_str().unwrap().contains("over (terminated)"), "{}", again.text);
    let closed = s.post("/close", &json!({"episode_id": id}));
    assert_eq!((closed.status, closed.json()["closed"].as_bool()), (200, Some(true)));
    let gone = s.post("/step", &json!({"episode_id": id, "action": "50"}));
    assert_eq!(gone.status, 404, "{}", gone.text);
    assert!(gone.json()["error"].as_str().unwrap().contains("no open episode"));
    assert_eq!(s.post("/close", &json!({"episode_id": id})).status, 404);
}

#[test]
fn the_seed_defaults_to_the_specs_first() {
    let s = TestServer::default_on_loopback();
    let r = s.post("/reset", &json!({"spec": "guess_late"})).json();
    assert_eq!(r["info"]["split_seed"], 7, "{r}");
    // The same game as an explicit seed 7, not seed 0.
    let play = |body: serde_json::Value| {
        let id = s.post("/reset", &body).json()["episode_id"].clone();
        s.post("/step", &json!({"episode_id": id, "action": "50"})).json()["observation"].clone()
    };
    let default = play(json!({"spec": "guess_late"}));
    assert_eq!(default, play(json!({"spec": "guess_late", "seed": 7})));
    assert_ne!(play(json!({"spec": "guess", "seed": 0})), play(json!({"spec": "guess", "seed": 7})));
}

/// Plays a guess episode by binary search; returns the number of guesses.
fn play_guess(s: &TestServer, seed: u64) -> u32 {
    let r = s.post("/reset", &json!({"spec": "guess", "seed": seed}));
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.json()["episode_id"].clone();
    let (mut lo, mut hi, mut steps) = (1u32, 100u32, 0);
    loop {
        let out = s.post("/step", &json!({"episode_id": id, "action": ((lo + hi) / 2).to_string()}));
        assert_eq!(out.status, 200, "{}", out.text);
        let out = out.json();
        steps += 1;
        if out["terminated"] == true {
            assert_eq!(out["reward"], 1.0, "{out}");
            assert_eq!(s.post("/close", &json!({"episode_id": id})).status, 200);
            return steps;
        }
        (lo, hi) = range(out["observation"].as_str().unwrap()).unwrap();
    }
}

#[test]
fn concurrent_episodes_share_one_pool() {
    let s = std::sync::Arc::new(TestServer::default_on_loopback());
    let games: Vec<_> = (0..6u64)
        .map(|seed| {
            let s = s.clone();
            std::thread::spawn(move || play_guess(&s, seed))
        })
        .collect();
    let programs: Vec<_> = (0..3u64)
        .map(|seed| {
            let s = s.clone();
            std::thread::spawn(move || {
                let id = s.post("/reset", &json!({"spec": "balance_scale", "seed": seed})).json()["episode_id"].clone();
                let out = s.post("/step", &json!({"episode_id": id, "action": " GaussianNB()"})).json();
                assert_eq!(out["terminated"], true, "{out}");
                out["reward"].as_f64().unwrap()
            })
        })
        .collect();
    for g in games {
        assert!((1..=7).contains(&g.join().unwrap()));
    }
    for p in programs {
        assert!(p.join().unwrap() > 0.5);
    }
    let metrics = s.get("/metrics").text;
    assert!(metrics.contains("etpo_serve_episodes_open 3\n"), "{metrics}");
}

#[test]
fn a_data_spec_steps_in_the_sandbox() {
    let s = TestServer::default_on_loopback();
    let r = s.post("/reset", &json!({"spec": "balance_scale", "seed": 1}));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = r.json();
    let id = r["episode_id"].as_str().unwrap();
    assert!(r["observation"].as_str().unwrap().trim_end().ends_with("model ="));

    // A failing action: the failure reward, the reflection state, the episode goes on.
    let bad = s.post("/step", &json!({"episode_id": id, "action": " NoSuchClassifier()\n"})).json();
    assert_eq!(bad["reward"], -1.0, "{bad}");
    assert_eq!((bad["terminated"].as_bool(), bad["truncated"].as_bool()), (Some(false), Some(false)));
    assert_eq!(bad["info"]["ran"], false);
    assert!(bad["info"]["error"].as_str().unwrap().contains("NoSuchClassifier"), "{bad}");
    assert!(bad["observation"].as_str().unwrap().contains("failed with"), "{bad}");

    let good =
        s.post("/step", &json!({"episode_id": id, "action": " LogisticRegression(max_iter=500)\n# more"})).json();
    assert_eq!(good["terminated"], true, "{good}");
    let auc = good["reward"].as_f64().unwrap();
    assert!(auc > 0.5 && auc <= 1.0, "{good}");
    let info = &good["info"];
    assert_eq!(info["action"], " LogisticRegression(max_iter=500)");
    assert_eq!((info["ran"].as_bool(), info["step"].as_u64()), (Some(true), Some(2)));
    assert!(info["wall_s"].as_f64().unwrap() > 0.0 && info["cpu_s"].as_f64().unwrap() > 0.0, "{info}");
}

/// `/score_test` scores an action on the held-out rows of the shipped Balance Scale
/// (`test_fraction: 0.2`) exactly as the local environment does; a failing action answers its
/// error; a spec without a test part and a wrong body are refused.
#[test]
fn the_held_out_score_is_the_local_one() {
    let s = TestServer::default_on_loopback();
    let action = " LogisticRegression(C=0.5, max_iter=500)";
    let r = s.post("/score_test", &json!({"spec": "balance_scale", "seed": 1, "action": action}));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = r.json();
    let task = common::task("balance_scale");
    let program = task.spec().assemble_program(action).unwrap();
    let local = task.env(1).unwrap().score_on_test(&program).unwrap().expect("a test part");
    assert_eq!(r["test_score"].as_f64(), Some(*local.result.as_ref().unwrap()), "{r}");
    assert_eq!((r["ran"].as_bool(), r["split_seed"].as_u64(), r["error"].as_str()), (Some(true), Some(1), Some("")));

    let bad = s.post("/score_test", &json!({"spec": "balance_scale", "seed": 1, "action": "NoSuchModel()"})).json();
    assert_eq!((bad["test_score"].is_null(), bad["ran"].as_bool()), (true, Some(false)), "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("NoSuchModel"), "{bad}");

    let game = s.post("/score_test", &json!({"spec": "guess", "action": "50"}));
    assert_eq!(game.status, 400, "{}", game.text);
    assert!(game.json()["error"].as_str().unwrap().contains("holds out no test part"), "{}", game.text);
    assert_eq!(s.post("/score_test", &json!({"spec": "nope", "action": "x"})).status, 404);
    assert_eq!(s.post("/score_test", &json!({"spec": "balance_scale", "program": "x"})).status, 400);
}

#[test]
fn a_chat_spec_answers_messages_and_their_chatml_text() {
    let s = TestServer::default_on_loopback();
    let r = s.post("/reset", &json!({"spec": "adventure", "seed": 0})).json();
    let messages = r["messages"].as_array().unwrap();
    assert!(!messages.is_empty() && messages.iter().all(|m| m["role"].is_string() && m["content"].is_string()));
    assert_eq!(r["info"]["messages"], r["messages"]);
    let text = r["observation"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>") && text.ends_with("<|im_start|>assistant\n"), "{text}");
    let out = s.post("/step", &json!({"episode_id": r["episode_id"], "action": "look"})).json();
    assert!(out["messages"].as_array().unwrap().len() > messages.len(), "{out}");
}

#[test]
fn unknown_spec_and_episode_are_404() {
    let s = TestServer::default_on_loopback();
    let r = s.post("/reset", &json!({"spec": "../envs/balance_scale.yaml"}));
    assert_eq!(r.status, 404);
    let body = r.json();
    assert_eq!(body["specs"], json!(["adventure", "balance_scale", "guess", "guess_late"]));
    assert!(body["error"].as_str().unwrap().contains("serves: adventure, balance_scale, guess, guess_late"), "{body}");
    let r = s.post("/step", &json!({"episode_id": "0123", "action": "50"}));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].is_string());
    let r = s.get("/nowhere");
    assert_eq!((r.status, r.json()["error"].is_string()), (404, true));
}

#[test]
fn bad_json_is_400() {
    let s = TestServer::default_on_loopback();
    for (path, body) in [
        ("/step", "{not json"),
        ("/step", r#"{"episode_id": 5, "action": "1"}"#),
        ("/reset", r#"{"seed": 1}"#),
        ("/reset", r#"{"spec": "guess", "seed": -1}"#),
        ("/reset", r#"{"spec": "guess", "path": "/etc/passwd"}"#),
        ("/run_code", r#"{"language": "python"}"#),
    ] {
        let r = s.post_raw(path, body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text);
        assert!(r.json()["error"].as_str().unwrap().starts_with("bad JSON body"), "{}", r.text);
    }
}

#[test]
fn idle_episodes_expire() {
    let s = TestServer::start(serve::Config { idle_timeout: Duration::from_secs(1), ..config() });
    let id = s.post("/reset", &json!({"spec": "guess"})).json()["episode_id"].clone();
    assert_eq!(s.post("/step", &json!({"episode_id": id, "action": "50"})).status, 200);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(s.post("/step", &json!({"episode_id": id, "action": "25"})).status, 404);
    let metrics = s.get("/metrics").text;
    assert!(metrics.contains("etpo_serve_episodes_expired_total 1\n"), "{metrics}");
    assert!(metrics.contains("etpo_serve_episodes_open 0\n"), "{metrics}");
}

#[test]
fn metrics_count_requests_by_endpoint_and_status() {
    let s = TestServer::default_on_loopback();
    s.get("/health");
    s.get("/health");
    s.post("/step", &json!({"episode_id": "x", "action": "1"}));
    let id = s.post("/reset", &json!({"spec": "guess"})).json()["episode_id"].clone();
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    let text = m.text;
    for line in [
        "etpo_serve_requests_total{endpoint=\"/health\",status=\"200\"} 2\n",
        "etpo_serve_requests_total{endpoint=\"/step\",status=\"404\"} 1\n",
        "etpo_serve_requests_total{endpoint=\"/reset\",status=\"200\"} 1\n",
        "etpo_serve_request_duration_seconds_count{endpoint=\"/health\"} 2\n",
        "etpo_serve_request_duration_seconds_bucket{endpoint=\"/health\",le=\"+Inf\"} 2\n",
        "etpo_serve_episodes_open 1\n",
        "etpo_serve_queue_depth 0\n",
        "etpo_serve_queue_capacity 64\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(id.is_string());
}
