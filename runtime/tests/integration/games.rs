//! `Env` over text games, through the library: episodes, replay, what does not apply to games,
//! and recovery after a game fails. Builds the games of games/ first (a no-op when they are up to
//! date; `scripts/setup.sh games` adds the wasm32 target).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use envspec::Prompt;
use runtime::env::{EnvError, Host, Task};

fn games() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../games");
            let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
                .env_remove("CARGO_TARGET_DIR")
                .args(["build", "--quiet", "--release", "--target", "wasm32-unknown-unknown", "--manifest-path"])
                .arg(root.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(root.join("target"))
                .output()
                .expect("cargo runs");
            assert!(
                out.status.success(),
                "building the games failed (run `scripts/setup.sh games`):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            root.join("target/wasm32-unknown-unknown/release")
        })
        .clone()
}

/// A task for `game` with plain templates: the state is the observation (after a step, the
/// action and the observation).
fn task(dir: &Path, game: &str, extra: &str) -> Task {
    let path = dir.join(format!("{game}.yaml"));
    let module = games().join(format!("{game}.wasm"));
    std::fs::write(
        &path,
        format!(
            "name: {game}\ndescription: t\nkind: wasm\ngame:\n  module: {}\n{extra}prompt:\n  template: \"{{{{ observation }}}}\"\n  reflection: \"{{{{ action }}}}|{{{{ observation }}}}\"\n",
            module.display()
        ),
    )
    .unwrap();
    let spec = envspec::load(&path).unwrap_or_else(|e| panic!("{e}"));
    Task::load(Arc::new(spec), &Host::new(runtime::PoolConfig::default())).unwrap()
}

fn text(p: &Prompt) -> &str {
    match p {
        Prompt::Completion(t) => t,
        Prompt::Chat(_) => panic!("completion expected"),
    }
}

#[test]
fn an_episode_and_its_replay_give_the_same_states() {
    let dir = tempfile::tempdir().unwrap();
    let task = task(dir.path(), "guess", "max_steps: 10\n");
    assert_eq!(task.game().map(|g| (g.name(), g.version())), Some(("guess", "0.1.0")));
    let mut env = task.env(0).unwrap();
    let s0 = env.reset().unwrap();
    assert_eq!(text(&s0.prompt), "I am thinking of a whole number from 1 to 100. You have 10 guesses. Your guess:");
    let a = env.step(" 50\nmore text").unwrap();
    assert_eq!(a.info.action, " 50");
    assert_eq!(
        text(&a.observation.prompt),
        " 50|50 is too high: the number is lower, from 1 to 49. 9 guesses left. Your guess:"
    );
    let b = env.step("25").unwrap();
    assert_eq!((b.observation.step, b.terminated, b.truncated), (2, false, false));
    assert!(b.info.ran && b.info.error.is_empty() && b.info.peak_rss_mb > 0.0);

    // Another environment of the same seed, put back into the episode by replaying the actions.
    let mut other = task.env(0).unwrap();
    let replayed = other.replay(&[" 50", "25"]).unwrap();
    assert_eq!(replayed, b.observation);
    let (x, y) = (env.step("36").unwrap(), other.step("36").unwrap());
    assert_eq!((x.reward, x.terminated), (1.0, true));
    assert_eq!((x.reward, &x.observation), (y.reward, &y.observation));
    assert!(matches!(env.step("36"), Err(EnvError::EpisodeOver)));

    // The game ended inside the replay: the log does not match this game.
    let e = other.replay(&["36", "50"]).unwrap_err().to_string();
    assert_eq!(e, "guess: replaying the recorded actions: the game ended at action 1 of 2; was the game changed since they were recorded?");
}

#[test]
fn what_only_data_tasks_have_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let task = task(dir.path(), "guess", "");
    let mut env = task.env(0).unwrap();
    assert!(matches!(env.step("1"), Err(EnvError::NotReset)));
    env.reset().unwrap();
    assert_eq!(env.n_splits(), 0);
    assert!(matches!(env.score_program("50"), Err(EnvError::WrongKind { .. })));
    let turn =
        envspec::Turn { step: 0, action: "50".into(), reward: 0.0, error: String::new(), observation: String::new() };
    let e = env.restore(&[turn]).unwrap_err().to_string();
    assert!(e.starts_with("guess: a game's state cannot be restored from the last action alone"), "{e}");
}

#[test]
fn after_a_game_fails_the_next_episode_starts_on_a_fresh_instance() {
    let dir = tempfile::tempdir().unwrap();
    let task = task(dir.path(), "hostile", "  fuel: 1000000\nreward:\n  failure_reward: -2\n");
    let mut env = task.env(0).unwrap();
    env.reset().unwrap();
    let r = env.step("trap").unwrap();
    assert_eq!((r.reward, r.terminated, r.truncated, r.info.ran), (-2.0, false, true, false));
    assert!(r.info.error.starts_with("game `hostile` ("), "{}", r.info.error);
    assert!(r.info.error.contains("): step() trapped: "), "{}", r.info.error);
    // The failed episode is over; a reset brings a working game back.
    assert!(matches!(env.step("hello"), Err(EnvError::EpisodeOver)));
    env.reset().unwrap();
    let r = env.step("hello").unwrap();
    assert_eq!((r.reward, text(&r.observation.prompt)), (0.5, "hello|You said: hello"));

    // A reset that fails is an error of the environment, naming the spec and the game.
    let mut looping = task.env(13).unwrap();
    let e = looping.reset().unwrap_err().to_string();
    assert!(
        e.starts_with("hostile: game `hostile` (") && e.contains("): reset() ran out of fuel (1000000 units)"),
        "{e}"
    );
}
