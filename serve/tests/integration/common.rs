//! Starting a test server and talking to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use runtime::env::{Host, Task};
use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds games/ (a no-op when up to date), as runtime/tests/integration/games.rs does.
fn build_games() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let games = root().join("games");
        let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .env_remove("CARGO_TARGET_DIR")
            .args(["build", "--quiet", "--release", "--target", "wasm32-unknown-unknown", "--manifest-path"])
            .arg(games.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(games.join("target"))
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building the games failed (run `scripts/setup.sh games`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// One host (sandbox pool and game engine) and one set of loaded tasks for every test server:
/// the shipped `guess`, `adventure` (chat) and `balance_scale` specs, and `guess_late`, the guess
/// game with seeds [7, 3] (its first seed is not 0).
fn shared() -> &'static (Arc<Host>, Vec<Arc<Task>>) {
    static SHARED: OnceLock<(Arc<Host>, Vec<Arc<Task>>)> = OnceLock::new();
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    SHARED.get_or_init(|| {
        build_games();
        let python = runtime::default_python();
        assert!(
            python.is_absolute() && python.exists(),
            "the project venv is missing ({}): run scripts/setup.sh python, or set ETPO_PYTHON",
            python.display()
        );
        let host = Arc::new(Host::new(runtime::PoolConfig { workers: 2, python, limits: runtime::Limits::default() }));
        let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
        let late = dir.path().join("guess_late.yaml");
        let shipped = std::fs::read_to_string(root().join("envs/games/guess.yaml")).unwrap();
        let module = root().join("games/target/wasm32-unknown-unknown/release/guess.wasm");
        let text = shipped
            .replace("name: guess\n", "name: guess_late\n")
            .replace("seeds: [0, 1, 2, 3, 4]", "seeds: [7, 3]")
            .replace("../../games/target/wasm32-unknown-unknown/release/guess.wasm", &module.display().to_string());
        std::fs::write(&late, text).unwrap();
        let paths = [
            root().join("envs/games/guess.yaml"),
            root().join("envs/games/adventure.yaml"),
            root().join("envs/balance_scale.yaml"),
            late,
        ];
        let tasks = paths
            .iter()
            .map(|p| {
                let spec = envspec::load(p).unwrap_or_else(|e| panic!("{e}"));
                Arc::new(Task::load(Arc::new(spec), &host).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            })
            .collect();
        (host, tasks)
    })
}

/// The shared loaded task of spec `name` (the one the test servers serve).
pub fn task(name: &str) -> Arc<Task> {
    shared().1.iter().find(|t| t.spec().name == name).cloned().unwrap_or_else(|| panic!("no test task {name}"))
}

/// A server running on its own thread and runtime; stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(config: serve::Config) -> TestServer {
        let (host, tasks) = shared().clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let server = serve::Server::bind(config, host, tasks).await.expect("the server binds");
                addr_tx.send(server.local_addr()).unwrap();
                server
                    .run(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("the server runs");
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).expect("the server starts");
        TestServer { addr, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// A server with the default configuration on a free loopback port.
    pub fn default_on_loopback() -> TestServer {
        TestServer::start(config())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn get(&self, path: &str) -> Reply {
        reply(agent().get(&self.url(path)).call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, &body.to_string())
    }

    pub fn post_raw(&self, path: &str, body: &str) -> Reply {
        reply(agent().post(&self.url(path)).header("content-type", "application/json").send(body))
    }

    pub fn post_with(&self, path: &str, body: &Value, auth: Option<&str>) -> Reply {
        let mut req = agent().post(&self.url(path)).header("content-type", "application/json");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        reply(req.send(body.to_string()))
    }

    pub fn get_with(&self, path: &str, auth: Option<&str>) -> Reply {
        let mut req = agent().get(&self.url(path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        reply(req.call())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The default configuration on a free loopback port.
pub fn config() -> serve::Config {
    serve::Config { listen: "127.0.0.1:0".parse().unwrap(), ..serve::Config::default() }
}

/// An HTTP answer: status, headers of interest, the body as JSON (or text).
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("the request gets an answer");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(String::from);
    let text = r.body_mut().with_config().limit(64 << 20).read_to_string().expect("a readable body");
    Reply { status, retry_after, text }
}
