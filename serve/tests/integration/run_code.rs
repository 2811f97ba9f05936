//! `/run_code` in SandboxFusion's shapes, through the sandbox: output, stdin, exit statuses,
//! time-outs, memory, files, and hostile programs that must stay contained.

use serde_json::{json, Value};

use crate::common::TestServer;

fn run(s: &TestServer, request: Value) -> Value {
    let r = s.post("/run_code", &request);
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

fn python(code: &str) -> Value {
    json!({"code": code, "language": "python"})
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn stdout_of_a_program() {
    let s = TestServer::default_on_loopback();
    let r = run(&s, python("print('hello', 6 * 7)"));
    assert_eq!(r["status"], "Success", "{r}");
    assert_eq!(r["message"], "");
    assert_eq!(r["compile_result"], Value::Null);
    assert_eq!(r["files"], json!({}));
    let rr = &r["run_result"];
    assert_eq!(rr["status"], "Finished");
    assert_eq!(rr["return_code"], 0);
    assert_eq!(rr["stdout"], "hello 42\n");
    assert_eq!(rr["stderr"], "");
    let t = rr["execution_time"].as_f64().unwrap();
    assert!(t > 0.0 && t < 10.0, "{r}");
}

#[test]
fn stdin_is_the_programs_input() {
    let s = TestServer::default_on_loopback();
    let code = "import sys\nfor line in sys.stdin:\n    print(line.strip().upper())\nprint(input.__name__)";
    let r = run(&s, json!({"code": code, "language": "python", "stdin": "abc\ndef\n"}));
    assert_eq!(r["run_result"]["stdout"], "ABC\nDEF\ninput\n", "{r}");
    // Without stdin the program reads end-of-file at once.
    let r = run(&s, python("import sys\nprint(repr(sys.stdin.read()))"));
    assert_eq!(r["run_result"]["stdout"], "''\n", "{r}");
}

#[test]
fn exit_statuses() {
    let s = TestServer::default_on_loopback();
    let r = run(&s, python("import sys\nprint('out')\nprint('bye', file=sys.stderr)\nsys.exit(3)"));
    assert_eq!(r["status"], "Failed", "{r}");
    let rr = &r["run_result"];
    assert_eq!((rr["status"].as_str(), rr["return_code"].as_i64()), (Some("Finished"), Some(3)));
    assert_eq!((rr["stdout"].as_str(), rr["stderr"].as_str()), (Some("out\n"), Some("bye\n")));

    // An uncaught exception: status 1 and the interpreter's traceback, without the runner.
    let r = run(&s, python("def f():\n    return 1 / 0\nf()"));
    let rr = &r["run_result"];
    assert_eq!((r["status"].as_str(), rr["return_code"].as_i64()), (Some("Failed"), Some(1)), "{r}");
    let err = rr["stderr"].as_str().unwrap();
    assert!(err.starts_with("Traceback (most recent call last):\n  File \"main.py\", line 3"), "{err}");
    assert!(err.contains("return 1 / 0") && err.ends_with("ZeroDivisionError: division by zero\n"), "{err}");

    // A hard exit and a signal are reported as the process ended.
    let r = run(&s, python("import os\nprint('x', flush=True)\nos._exit(7)"));
    assert_eq!((r["run_result"]["return_code"].as_i64(), r["run_result"]["stdout"].as_str()), (Some(7), Some("x\n")));
    let r = run(&s, python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"));
    assert_eq!(r["run_result"]["return_code"], -9, "{r}");
    // A syntax error.
    let r = run(&s, python("def f(:\n"));
    assert_eq!(r["run_result"]["return_code"], 1);
    assert!(r["run_result"]["stderr"].as_str().unwrap().contains("SyntaxError"), "{r}");
}

#[test]
fn a_time_out_keeps_what_was_printed() {
    let s = TestServer::default_on_loopback();
    let started = std::time::Instant::now();
    let code = "import time\nprint('before', flush=True)\nwhile True:\n    time.sleep(0.01)";
    let r = run(&s, json!({"code": code, "language": "python", "run_timeout": 1}));
    // A bound on a hang only (the request may wait for a worker busy with another test).
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "took {:?}", started.elapsed());
    assert_eq!(r["status"], "Failed", "{r}");
    let rr = &r["run_result"];
    assert_eq!(rr["status"], "TimeLimitExceeded");
    assert_eq!(rr["return_code"], Value::Null);
    assert_eq!(rr["stdout"], "before\n");
    let t = rr["execution_time"].as_f64().unwrap();
    assert!((1.0..3.0).contains(&t), "{r}");
    // A busy loop is stopped the same way.
    let r = run(&s, json!({"code": "while True: pass", "language": "python", "run_timeout": 1}));
    assert_eq!(r["run_result"]["status"], "TimeLimitExceeded", "{r}");
}

#[test]
fn the_memory_limit_holds() {
    let s = TestServer::default_on_loopback();
    let code =
        "try:\n    x = bytearray(600 << 20)\n    print('allocated')\nexcept MemoryError:\n    print('MemoryError')";
    let r = run(&s, json!({"code": code, "language": "python", "memory_limit_MB": 128}));
    assert_eq!(r["run_result"]["stdout"], "MemoryError\n", "{r}");
}

#[test]
fn files_in_and_out() {
    let s = TestServer::default_on_loopback();
    let code = "data = open('data/in.txt').read()\nopen('out.txt', 'w').write(data[::-1])\nprint(len(data))";
    let r = run(
        &s,
        json!({
            "code": code, "language": "python",
            "files": {"data/in.txt": b64(b"hello files"), "skipped.txt": null},
            "fetch_files": ["out.txt", "missing.txt"],
        }),
    );
    assert_eq!(r["status"], "Success", "{r}");
    assert_eq!(r["run_result"]["stdout"], "11\n");
    assert_eq!(r["files"], json!({"out.txt": b64(b"selif olleh")}));
    // The work directory is fresh for every request.
    let r = run(&s, python("import os\nprint(sorted(os.listdir('.')))"));
    assert_eq!(r["run_result"]["stdout"], "[]\n", "{r}");
    // Paths outside the work directory are refused before anything runs.
    let r = s.post("/run_code", &json!({"code": "", "language": "python", "files": {"/etc/x": b64(b"x")}}));
    assert_eq!((r.status, r.json()["status"].as_str()), (400, Some("SandboxError")), "{}", r.text);
}

#[test]
fn other_languages_are_refused_in_sandboxfusions_shape() {
    let s = TestServer::default_on_loopback();
    let r = s.post("/run_code", &json!({"code": "int main() {}", "language": "cpp"}));
    assert_eq!(r.status, 400);
    let r = r.json();
    assert_eq!(r["status"], "SandboxError");
    assert!(r["message"].as_str().unwrap().contains("\"python\" only"), "{r}");
    assert_eq!((r["run_result"].clone(), r["files"].clone()), (Value::Null, json!({})));
}

#[test]
fn hostile_programs_stay_contained() {
    let s = TestServer::default_on_loopback();
    // Something listening on the host's loopback, and a host folder: neither may be reached.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("pwned");
    let code = format!(
        "import socket\nres = []\nfor host, port in [('127.0.0.1', {port}), ('127.0.0.1', {server}), ('1.1.1.1', 80)]:\n    try:\n        socket.create_connection((host, port), timeout=1)\n        res.append('connected')\n    except OSError as e:\n        res.append(type(e).__name__)\nfor path in [{target:?}, '/usr/pwned', '/etc/pwned']:\n    try:\n        open(path, 'w').write('x')\n        res.append('wrote')\n    except OSError as e:\n        res.append(type(e).__name__)\nprint(','.join(res))",
        server = s.addr.port(),
        target = target.display().to_string(),
    );
    let r = run(&s, python(&code));
    assert_eq!(r["status"], "Success", "{r}");
    let out = r["run_result"]["stdout"].as_str().unwrap();
    assert!(!out.contains("connected") && !out.contains("wrote"), "{out}");
    assert_eq!(out.matches("PermissionError").count(), 3, "sockets are refused by seccomp: {out}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing may have connected");
    assert!(!target.exists());
    assert!(!std::path::Path::new("/usr/pwned").exists() && !std::path::Path::new("/etc/pwned").exists());

    // A fork bomb is stopped by the process limit and the time limit; the server goes on.
    let r = run(
        &s,
        json!({"code": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "language": "python", "run_timeout": 2}),
    );
    assert!(matches!(r["status"].as_str(), Some("Failed")), "{r}");
    let r = run(&s, python("print('still here')"));
    assert_eq!(r["run_result"]["stdout"], "still here\n", "{r}");
}
