//! `etpo new-game NAME [--dir DIR]`: write the skeleton of a new text game in Rust — a crate
//! that builds into a WebAssembly component for `kind: wasm` specs, with a copy of the game
//! interface (WIT), a sample game with a unit test, a README and a sample spec. Nothing in etpo
//! changes: build the game, then `etpo check` / `etpo run` its spec.

use anyhow::{bail, Context};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The game's name: lowercase letters, digits, `_` and `-`, starting with a letter (the crate
    /// and spec name).
    pub name: String,
    /// The folder to create [default: ./NAME]; it must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The interface every game implements, as etpo's host speaks it.
const WIT: &str = include_str!("../../games/wit/game.wit");

/// The wit-bindgen release the shipped games are built with (games/Cargo.toml).
const WIT_BINDGEN: &str = "0.61";

pub fn run(args: Args) -> anyhow::Result<i32> {
    let name = args.name.as_str();
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        bail!("`{name}` is not a valid game name: use lowercase letters, digits, `_` and `-`, starting with a letter");
    }
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty; give another --dir", dir.display());
    }
    for (path, text) in files(name) {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let lib = name.replace('-', "_");
    println!("created the game `{name}` in {}", dir.display());
    println!("next:");
    println!("  cd {}", dir.display());
    println!("  cargo test                                                   # the rules, on this machine");
    println!("  cargo build --target wasm32-unknown-unknown --release        # -> target/wasm32-unknown-unknown/release/{lib}.wasm");
    println!("  etpo check {name}.yaml && etpo show {name}.yaml");
    println!(
        "  etpo run {name}.yaml --policy scripted --actions DIR          # or with the model: etpo run {name}.yaml"
    );
    Ok(0)
}

/// The skeleton's files: (path relative to the game folder, contents).
fn files(name: &str) -> Vec<(String, String)> {
    let lib = name.replace('-', "_");
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{lib}}", &lib).replace("{{wit_bindgen}}", WIT_BINDGEN);
    vec![
        ("Cargo.toml".into(), fill(CARGO_TOML)),
        ("src/lib.rs".into(), fill(LIB_RS)),
        ("wit/game.wit".into(), WIT.to_string()),
        ("README.md".into(), fill(README)),
        (".gitignore".into(), "target/\n".to_string()),
        // Named after the game, so that specs of several games can sit in one folder.
        (format!("{name}.yaml"), fill(SPEC)),
    ]
}

const CARGO_TOML: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2021"
publish = false

# Its own workspace, so the game builds wherever its folder is.
[workspace]

[lib]
# cdylib: the WebAssembly module etpo loads; rlib: the rules' unit tests on this machine.
crate-type = ["cdylib", "rlib"]

# The component glue exists only in the WebAssembly build.
[target.'cfg(target_arch = "wasm32")'.dependencies]
wit-bindgen = { version = "{{wit_bindgen}}", default-features = false, features = ["macros", "realloc", "std"] }

[profile.release]
opt-level = "s"
panic = "abort"
codegen-units = 1
debug = false
strip = true
"#;

const LIB_RS: &str = r#"//! {{name}}: an etpo text game. The sample rules: the game picks a number from 1 to 3 from the
//! seed; the player guesses it. Replace `Game` with your own rules; keep the `component` module.
//!
//! Rules of the interface (wit/game.wit): every random choice comes from the seed given to
//! `reset` (the game has no clock and no other randomness), a reward must be finite, and reward
//! should be given for real progress only (not for repeating an action).

/// One game in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Game {
    secret: u32,
    over: bool,
}

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub observation: String,
    pub reward: f64,
    pub terminated: bool,
}

impl Game {
    /// A game whose secret comes from `seed`.
    pub fn new(seed: u64) -> Game {
        Game { secret: 1 + (seed % 3) as u32, over: false }
    }

    /// The first observation.
    pub fn intro(&self) -> String {
        "I am thinking of a number from 1 to 3. Your guess:".to_string()
    }

    /// Plays one action (the text the model wrote, after the spec's extraction).
    pub fn play(&mut self, action: &str) -> Outcome {
        if self.over {
            return Outcome { observation: "The game is over.".into(), reward: 0.0, terminated: true };
        }
        match action.trim().parse::<u32>() {
            Ok(n) if n == self.secret => {
                self.over = true;
                Outcome { observation: format!("Yes, it was {n}!"), reward: 1.0, terminated: true }
            }
            Ok(n) => Outcome { observation: format!("No, not {n}. Your guess:"), reward: 0.0, terminated: false },
            Err(_) => Outcome { observation: "Write a number from 1 to 3. Your guess:".into(), reward: 0.0, terminated: false },
        }
    }
}

/// The WebAssembly component: the exports of wit/game.wit, over `Game`. Built for wasm32 only
/// (the export names are not valid symbols of a native library; `cargo test` needs only `Game`).
#[cfg(target_arch = "wasm32")]
mod component {
    use super::Game;
    use std::cell::RefCell;

    wit_bindgen::generate!({ path: "wit", world: "text-game" });

    use exports::etpo::game::game::{GameInfo, Guest, StepResult};

    thread_local! {
        // The host makes a fresh instance per episode; this holds that episode's game.
        static GAME: RefCell<Option<Game>> = const { RefCell::new(None) };
    }

    struct Component;

    impl Guest for Component {
        fn info() -> GameInfo {
            GameInfo { name: "{{name}}".into(), version: env!("CARGO_PKG_VERSION").into() }
        }

        fn reset(seed: u64) -> String {
            let game = Game::new(seed);
            let intro = game.intro();
            GAME.with(|g| *g.borrow_mut() = Some(game));
            intro
        }

        fn step(action: String) -> StepResult {
            GAME.with(|g| match g.borrow_mut().as_mut() {
                Some(game) => {
                    let o = game.play(&action);
                    StepResult { observation: o.observation, reward: o.reward, terminated: o.terminated, truncated: false }
                }
                None => StepResult { observation: "Call reset first.".into(), reward: 0.0, terminated: true, truncated: false },
            })
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guessing_the_secret_wins_once() {
        let mut g = Game::new(4); // secret 2
        assert_eq!(g.play("1").reward, 0.0);
        let o = g.play(" 2 ");
        assert_eq!((o.reward, o.terminated), (1.0, true));
        assert_eq!(g.play("2").reward, 0.0);
    }

    #[test]
    fn words_are_not_guesses() {
        let mut g = Game::new(0);
        assert_eq!(g.play("one").observation, "Write a number from 1 to 3. Your guess:");
    }
}
"#;

const README: &str = r#"# {{name}}: an etpo text game

A WebAssembly component implementing `etpo:game/game@0.1.0` (see `wit/game.wit`): `reset(seed)`
gives the first observation, `step(action)` the next one with a reward and whether the game is
over. etpo runs it in wasmtime with no imports at all (no files, network or clock), a memory cap
and a fuel budget per call; see `kind: wasm` in etpo's envspec/FORMAT.md.

    cargo test                                                # the rules, on this machine
    rustup target add wasm32-unknown-unknown                  # once
    cargo build --target wasm32-unknown-unknown --release     # -> target/wasm32-unknown-unknown/release/{{lib}}.wasm
    etpo check {{name}}.yaml                                  # compiles the game, checks its interface
    etpo show {{name}}.yaml                                   # the first state and one sample step
    etpo run {{name}}.yaml --policy scripted --actions DIR    # replay action files (one per step)
    etpo run {{name}}.yaml --algo etpo                        # train the default model on it

`{{name}}.yaml` points at the built module (`game.module`, relative to the spec's folder) and
wraps the game's observations in its prompt templates (`{{ observation }}`).
"#;

const SPEC: &str = r#"# {{name}}: a text game (kind: wasm). Build it first:
#   cargo build --target wasm32-unknown-unknown --release
name: {{name}}
description: Guess the number the game is thinking of.
kind: wasm

game:
  module: target/wasm32-unknown-unknown/release/{{lib}}.wasm
  seeds: [0, 1, 2]

max_steps: 3

prompt:
  format: completion
  template: |-
    # {{ description }}
    {{ observation }}
  reflection: |-
    # {{ description }}
    You said: {{ action }}
    {{ observation }}

action:
  extract: first_line
  stop: ["\n"]
  max_new_tokens: 8
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skeleton_is_filled_in() {
        let files = files("my-game");
        let get = |p: &str| files.iter().find(|(f, _)| f == p).map(|(_, t)| t.clone()).unwrap();
        assert!(get("Cargo.toml").starts_with("[package]\nname = \"my-game\"\n"));
        assert!(get("my-game.yaml").contains("module: target/wasm32-unknown-unknown/release/my_game.wasm\n"));
        // The spec's own template variables survive the filling.
        assert!(get("my-game.yaml").contains("{{ observation }}"));
        assert_eq!(get("wit/game.wit"), WIT);
        assert!(get("src/lib.rs").contains("GameInfo { name: \"my-game\".into()"));
        assert!(!files.iter().any(|(_, t)| t.contains("{{name}}") || t.contains("{{lib}}")));
    }

    #[test]
    fn names_are_checked_and_folders_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "1game", "My", "a b", "a/b"] {
            let args = Args { name: bad.into(), dir: Some(dir.path().join("x")) };
            assert!(run(args).is_err(), "{bad:?}");
        }
        std::fs::write(dir.path().join("f"), "").unwrap();
        let args = Args { name: "ok".into(), dir: Some(dir.path().to_path_buf()) };
        assert!(run(args).unwrap_err().to_string().contains("already exists and is not empty"));
    }
}
