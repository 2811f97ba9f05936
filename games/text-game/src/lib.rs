//! The glue between a text game's rules and the `etpo:game` WebAssembly component
//! (`games/wit/game.wit`), written once for the shipped games.
//!
//! A game implements [`TextGame`] and calls [`export_game!`]; its crate depends on `wit-bindgen`
//! for `wasm32` (the macro expands to `wit_bindgen::generate!` over `../wit`) and is built as a
//! `cdylib`. The rules stay plain Rust, unit-tested on the host, where the macro expands to nothing.

/// What one step produced: the WIT record `step-result`.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The text the agent reads next.
    pub observation: String,
    /// The step's reward.
    pub reward: f64,
    /// The game reached an end state.
    pub terminated: bool,
    /// The game stopped without reaching an end state (a move budget ran out).
    pub truncated: bool,
}

/// A text game's rules, as the component glue needs them.
pub trait TextGame: Sized + 'static {
    /// The name `info` reports.
    const NAME: &'static str;
    /// A fresh game, deterministic in `seed`.
    fn start(seed: u64) -> Self;
    /// The first observation.
    fn intro(&self) -> String;
    /// Plays one action.
    fn step(&mut self, action: &str) -> Step;
}

/// Exports `$game` (a [`TextGame`] in the calling module) as the component's `game` interface:
/// `reset` starts a new game (kept in a thread-local, the one instance a component has), `step`
/// plays on it, and a `step` before any `reset` ends the episode with a message. Only in the
/// WebAssembly build: export names are not valid symbols of a native library.
#[macro_export]
macro_rules! export_game {
    ($game:ident) => {
        #[cfg(target_arch = "wasm32")]
        mod component {
            use super::$game;
            use std::cell::RefCell;
            use $crate::TextGame;

            wit_bindgen::generate!({ path: "../wit", world: "text-game" });

            use exports::etpo::game::game::{GameInfo, Guest, StepResult};

            thread_local! {
                static GAME: RefCell<Option<$game>> = const { RefCell::new(None) };
            }

            struct Component;

            impl Guest for Component {
                fn info() -> GameInfo {
                    GameInfo { name: <$game as TextGame>::NAME.into(), version: env!("CARGO_PKG_VERSION").into() }
                }

                fn reset(seed: u64) -> String {
                    let game = <$game as TextGame>::start(seed);
                    let intro = game.intro();
                    GAME.with(|g| *g.borrow_mut() = Some(game));
                    intro
                }

                fn step(action: String) -> StepResult {
                    GAME.with(|g| match g.borrow_mut().as_mut() {
                        Some(game) => {
                            let s = TextGame::step(game, &action);
                            StepResult { observation: s.observation, reward: s.reward, terminated: s.terminated, truncated: s.truncated }
                        }
                        None => StepResult { observation: "Call reset first.".into(), reward: 0.0, terminated: true, truncated: false },
                    })
                }
            }

            export!(Component);
        }
    };
}
