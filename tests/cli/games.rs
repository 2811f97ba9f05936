//! Text games (`kind: wasm`) end to end, through the `etpo` binary: the shipped games solved by
//! scripted policies with exactly the rewards their rules give, the step limit, resuming by
//! replay, hostile games (endless loop, unbounded memory, trap, malformed output) failing with
//! clear errors while the run goes on, and a game made with `etpo new-game` outside the
//! repository, built and run with nothing in etpo changed.
//!
//! The games are built by `scripts/setup.sh games`; these tests run the same cargo command (a
//! no-op when they are up to date), so they also work right after a change to a game.

use crate::common::{ok, repo, steps, ETPO};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

fn cargo() -> Command {
    let mut c = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    // The games' folders are fixed by their specs; an inherited target dir would move them.
    c.env_remove("CARGO_TARGET_DIR");
    c
}

/// Builds the games of games/ (once per test binary) and returns the folder of the .wasm files.
pub(crate) fn games() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo().join("games");
            let out = cargo()
                .args(["build", "--quiet", "--release", "--target", "wasm32-unknown-unknown", "--manifest-path"])
                .arg(root.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(root.join("target"))
                .output()
                .expect("cargo runs");
            assert!(
                out.status.success(),
                "building the games failed (run `scripts/setup.sh games`, which adds the wasm32-unknown-unknown target):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            root.join("target/wasm32-unknown-unknown/release")
        })
        .clone()
}

fn etpo(args: &[&str], cwd: &Path) -> Output {
    games();
    Command::new(ETPO).args(args).current_dir(cwd).output().expect("the etpo binary runs")
}

fn of_spec<'a>(records: &'a [Value], spec: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["spec"] == spec).collect()
}

fn write_actions(dir: &Path, actions: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, a) in actions.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:03}.txt")), a).unwrap();
    }
}

fn rewards(records: &[&Value]) -> Vec<f64> {
    records.iter().map(|r| r["reward"].as_f64().unwrap()).collect()
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
    }
}

/// A spec in `dir` for a game module given by absolute path.
fn write_spec(dir: &Path, name: &str, module: &Path, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\ndescription: test\nkind: wasm\ngame:\n  module: {}\n{extra}prompt:\n  template: \"{{{{ observation }}}}\"\n  reflection: \"{{{{ action }}}} -> {{{{ observation }}}}\"\n",
        module.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The walkthroughs for seed 0 (the games' unit tests pin what seed 0 picks: the number 36, the
/// word "truck", the key in the library), with a repeated action in each to show that
/// repetition earns nothing.
#[test]
fn shipped_games_are_solved_by_scripted_policies_with_progress_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let actions = tmp.path().join("actions");
    write_actions(&actions.join("guess"), &[" 50", "50", "25 is my guess", "36"]);
    write_actions(&actions.join("wordle"), &["crane", "CRANE", "truck"]);
    write_actions(
        &actions.join("adventure"),
        &["look", "go north", "take lamp", "take lamp", "take key", "south", "east", "down", "open chest"],
    );
    let envs = repo().join("envs/games");
    let out = etpo(
        &[
            "run",
            envs.to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            actions.to_str().unwrap(),
            "--seeds",
            "0",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let records = steps(&tmp.path().join("run"));

    let guess = of_spec(&records, "guess");
    // 50 rules out 51 of 100 numbers (0.1 × 0.51), again nothing, 25 rules out 25 more, 36 wins.
    assert_close(&rewards(&guess), &[0.051, 0.0, 0.025, 1.0]);
    assert_eq!(guess[2]["action"], "25 is my guess", "first_line keeps the line; the game reads the number");
    let wordle = of_spec(&records, "wordle");
    // CRANE against TRUCK: R in place (one new letter, 0.05), C elsewhere; the repeat earns 0.
    assert_close(&rewards(&wordle), &[0.05, 0.0, 1.0]);
    let adventure = of_spec(&records, "adventure");
    assert_close(&rewards(&adventure), &[0.0, 0.0, 0.2, 0.0, 0.2, 0.0, 0.0, 0.2, 1.0]);
    for game in [&guess, &wordle, &adventure] {
        let last = game.last().unwrap();
        assert_eq!(last["terminated"], true);
        assert!(game[..game.len() - 1].iter().all(|r| r["terminated"] == false && r["truncated"] == false));
        assert!(game.iter().all(|r| r["ran"] == true && r["error"] == "" && r["episode"] == 0));
    }
    let summary = std::fs::read_to_string(tmp.path().join("run/summary.csv")).unwrap();
    for game in ["guess", "wordle", "adventure"] {
        assert!(summary.lines().any(|l| l.starts_with(&format!("{game},all,")) && l.contains(",1.0")), "{summary}");
    }
}

#[test]
fn show_renders_the_games_first_observation_and_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let guess = repo().join("envs/games/guess.yaml");
    let s0 = ok(&etpo(&["show", guess.to_str().unwrap(), "--only", "s0"], tmp.path()));
    assert_eq!(
        s0,
        "# Guess the secret whole number from 1 to 100. After each guess you are told whether it is higher or lower.\nI am thinking of a whole number from 1 to 100. You have 10 guesses. Your guess:"
    );
    let next = ok(&etpo(&["show", guess.to_str().unwrap(), "--only", "reflection"], tmp.path()));
    assert!(
        next.ends_with(
            "You guessed 50. 50 is too high: the number is lower, from 1 to 49. 9 guesses left. Your guess:"
        ),
        "{next}"
    );
    let full = ok(&etpo(&["show", repo().join("envs/games/adventure.yaml").to_str().unwrap()], tmp.path()));
    assert!(full.contains("game adventure 0.1.0"), "{full}");
    assert!(
        full.contains(
            "You are in the library. Dusty shelves full of old books. A lamp lies here. A key lies here. Exits: south."
        ),
        "{full}"
    );
    let checked = ok(&etpo(&["check", repo().join("envs/games").to_str().unwrap()], tmp.path()));
    assert!(checked.contains("envs/games/wordle.yaml (game wordle 0.1.0)"), "{checked}");
    let schema: Value = serde_json::from_str(&ok(&etpo(&["schema"], tmp.path()))).unwrap();
    assert_eq!(schema["properties"]["kind"]["enum"], serde_json::json!(["sklearn", "wasm"]));
    assert_eq!(schema["properties"]["game"]["required"], serde_json::json!(["module"]));
    // `etpo exec` runs programs; a game has none.
    let out = etpo(&["exec", guess.to_str().unwrap(), guess.to_str().unwrap()], tmp.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a text game (kind: wasm) has no program to run"));
}

#[test]
fn the_step_limit_truncates_game_episodes_and_new_ones_start_fresh() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(tmp.path(), "short", &games().join("guess.wasm"), "  seeds: [0]\nmax_steps: 2\n");
    write_actions(&tmp.path().join("actions"), &["50", "50", "50"]);
    ok(&etpo(
        &[
            "run",
            spec.to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    ));
    let r = steps(&tmp.path().join("run"));
    let ends: Vec<(u64, u64, bool)> = r
        .iter()
        .map(|s| (s["episode"].as_u64().unwrap(), s["step"].as_u64().unwrap(), s["truncated"] == true))
        .collect();
    assert_eq!(ends, [(0, 0, false), (0, 1, true), (1, 0, false)]);
    // A new episode is a new game: its first 50 earns the progress reward again.
    assert_close(&rewards(&r.iter().collect::<Vec<_>>()), &[0.051, 0.0, 0.051]);
    assert_eq!(r[0]["prompt_sha256"], r[2]["prompt_sha256"], "every episode starts from the same state");
}

#[test]
fn hostile_games_fail_with_clear_errors_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let hostile = write_spec(
        tmp.path(),
        "hostile",
        &games().join("hostile.wasm"),
        "  seeds: [0]\n  fuel: 2000000\n  memory_mb: 16\n  observation_kb: 64\nmax_steps: 3\n",
    );
    let guess = write_spec(tmp.path(), "guess", &games().join("guess.wasm"), "  seeds: [0]\n");
    let actions = tmp.path().join("actions");
    write_actions(&actions.join("hostile"), &["loop", "alloc", "trap", "nan", "long", "hello", "win"]);
    write_actions(&actions.join("guess"), &["36"]);
    let out = etpo(
        &[
            "run",
            hostile.to_str().unwrap(),
            guess.to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--out",
            "run",
            "--no-progress",
        ],
        tmp.path(),
    );
    ok(&out);
    let records = steps(&tmp.path().join("run"));
    let h = of_spec(&records, "hostile");
    let module = games().join("hostile.wasm").canonicalize().unwrap();
    let errors: Vec<&str> = h.iter().map(|r| r["error"].as_str().unwrap()).collect();
    let prefix = format!("game `hostile` ({}): step() ", module.display());
    assert_eq!(
        errors[0],
        format!("{prefix}ran out of fuel (2000000 units); it may loop forever (raise `game.fuel` if it is just slow)")
    );
    assert_eq!(errors[1], format!("{prefix}went over its memory cap of 16 MiB"));
    assert!(errors[2].starts_with(&format!("{prefix}trapped: ")) && errors[2].contains("unreachable"), "{}", errors[2]);
    assert_eq!(errors[3], format!("{prefix}returned malformed output: the reward is NaN, not a finite number"));
    assert_eq!(
        errors[4],
        format!("{prefix}returned malformed output: the observation is 1048576 bytes long; the limit is 65536")
    );
    // Each failure ended its episode with the failure reward; the next episode got a fresh
    // instance, which plays normally.
    for r in &h[..5] {
        assert_eq!(
            (r["ran"].as_bool(), r["truncated"].as_bool(), r["terminated"].as_bool()),
            (Some(false), Some(true), Some(false))
        );
        assert_eq!(r["reward"], -1.0);
        assert_eq!(r["step"], 0);
    }
    assert_close(&rewards(&h[5..]), &[0.5, 1.0]);
    assert_eq!(h[6]["terminated"], true);
    assert_eq!(h[6]["episode"], 5);
    // The other spec of the run was not disturbed.
    assert_close(&rewards(&of_spec(&records, "guess")), &[1.0]);

    // A game that fails where no reward can stand for it (reset) stops the run with an error
    // naming the spec and the game.
    let out = etpo(
        &[
            "run",
            hostile.to_str().unwrap(),
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--seeds",
            "13",
            "--out",
            "run13",
            "--no-progress",
        ],
        tmp.path(),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "hostile: game `hostile` ({}): reset() ran out of fuel (2000000 units)",
            module.display()
        )),
        "{stderr}"
    );

    // Files that are not games are refused at load time, by `etpo check` too.
    let junk = tmp.path().join("junk.wasm");
    std::fs::write(&junk, "not wasm").unwrap();
    let spec = write_spec(tmp.path(), "junk", &junk, "");
    let out = etpo(&["check", spec.to_str().unwrap()], tmp.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("junk: game `junk`") && stderr.contains("cannot load it: not a WebAssembly file"),
        "{stderr}"
    );
}

/// Only what can be compared across runs: everything but the timings.
fn essence(r: &Value) -> String {
    let mut r = r.clone();
    for k in ["wall_s", "cpu_s", "gen_s"] {
        r.as_object_mut().unwrap().remove(k);
    }
    r.to_string()
}

#[test]
fn a_game_run_resumes_by_replaying_the_episode() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = repo().join("envs/games/adventure.yaml");
    write_actions(&tmp.path().join("actions"), &["n", "take lamp", "take key", "s", "e", "d", "open chest"]);
    let args = [
        "run",
        spec.to_str().unwrap(),
        "--policy",
        "scripted",
        "--actions",
        "actions",
        "--seeds",
        "0",
        "--no-progress",
        "--out",
    ];
    ok(&etpo(&[&args[..], &["reference"]].concat(), tmp.path()));
    let want: Vec<String> = steps(&tmp.path().join("reference")).iter().map(essence).collect();
    assert_eq!(want.len(), 7);

    // Cut after four steps: the episode is in progress (the lamp and the key taken, in the hall).
    let cut = tmp.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    std::fs::copy(tmp.path().join("reference/config.json"), cut.join("config.json")).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("reference/steps.jsonl")).unwrap();
    std::fs::write(cut.join("steps.jsonl"), text.lines().take(4).map(|l| format!("{l}\n")).collect::<String>())
        .unwrap();
    ok(&etpo(&["run", "--resume", "cut", "--no-progress"], tmp.path()));
    let got: Vec<String> = steps(&cut).iter().map(essence).collect();
    // The same states (prompt hashes) and rewards: the replayed game is where it was.
    assert_eq!(got, want);
}

#[test]
fn a_new_game_builds_outside_the_workspace_and_runs_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-game");
    let out = ok(&etpo(&["new-game", "my-game", "--dir", dir.to_str().unwrap()], tmp.path()));
    assert!(out.contains("created the game `my-game`"), "{out}");
    // The same dependency versions as the shipped games (already downloaded by their build).
    std::fs::copy(repo().join("games/Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    let test = cargo().arg("test").arg("--quiet").current_dir(&dir).output().unwrap();
    assert!(test.status.success(), "cargo test of the skeleton:\n{}", String::from_utf8_lossy(&test.stderr));
    // The user's command, with the shipped games' target folder so that wit-bindgen, already
    // compiled there with the same profile, is not compiled again; the module is then put where
    // the user's own build would have put it (and where the generated spec points).
    let shared = repo().join("games/target");
    let build = cargo()
        .args(["build", "--quiet", "--target", "wasm32-unknown-unknown", "--release", "--target-dir"])
        .arg(&shared)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(build.status.success(), "building the skeleton:\n{}", String::from_utf8_lossy(&build.stderr));
    let release = dir.join("target/wasm32-unknown-unknown/release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(shared.join("wasm32-unknown-unknown/release/my_game.wasm"), release.join("my_game.wasm")).unwrap();

    let checked = ok(&etpo(&["check", "my-game.yaml"], &dir));
    assert!(checked.contains("ok: my-game.yaml (game my-game 0.1.0)"), "{checked}");
    // Seed 0's number is 1 (the skeleton's rule: 1 + seed % 3): found at once; seed 1's (2) at
    // the second guess.
    write_actions(&dir.join("actions"), &["1", "2", "3"]);
    ok(&etpo(
        &[
            "run",
            "my-game.yaml",
            "--policy",
            "scripted",
            "--actions",
            "actions",
            "--seeds",
            "0,1",
            "--out",
            "run",
            "--no-progress",
        ],
        &dir,
    ));
    let records = steps(&dir.join("run"));
    let seed =
        |s: u64| records.iter().filter(|r| r["seed"] == s).map(|r| r["reward"].as_f64().unwrap()).collect::<Vec<_>>();
    // Seed 0: 1 wins; then new episodes: 2 is wrong, 3 is wrong (the step limit is 3).
    assert_close(&seed(0), &[1.0, 0.0, 0.0]);
    assert_close(&seed(1), &[0.0, 1.0, 0.0]);
}

/// The training algorithms run on game states unchanged: a tiny random model (noise actions)
/// trained with ETPO on a completion game and a chat game, and with PPO-KL and GRPO.
#[test]
fn etpo_ppo_kl_and_grpo_train_on_games() {
    let tmp = tempfile::tempdir().unwrap();
    crate::common::write_tiny_model(&tmp.path().join("tiny-model"));
    let guess = repo().join("envs/games/guess.yaml");
    let adventure = repo().join("envs/games/adventure.yaml");
    for (algo, specs) in [("etpo", vec![&guess, &adventure]), ("ppo-kl", vec![&guess]), ("grpo", vec![&guess])] {
        let mut args: Vec<&str> = vec!["run"];
        args.extend(specs.iter().map(|p| p.to_str().unwrap()));
        args.extend([
            "--algo",
            algo,
            "--model",
            "tiny-model",
            "--steps",
            "4",
            "--seeds",
            "0",
            "--update-every",
            "2",
            "--out",
            algo,
            "--no-progress",
        ]);
        ok(&etpo(&args, tmp.path()));
        let dir = tmp.path().join(algo);
        assert_eq!(steps(&dir).len(), 4 * specs.len(), "{algo}");
        let metrics: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(!metrics.is_empty(), "{algo}: no update was made");
        for m in &metrics {
            for key in ["policy_loss", "kl", "batch_reward"] {
                assert!(m[key].as_f64().is_some_and(f64::is_finite), "{algo}: {key} in {m}");
            }
        }
        assert!(dir.join("adapter/adapter_model.safetensors").is_file(), "{algo}: the trained adapter is saved");
    }
}
