//! Text games: WebAssembly components that implement the `etpo:game/game` interface of
//! `games/wit/game.wit`, run by wasmtime.
//!
//! A game is untrusted code, like the model's programs, and is contained by construction:
//! - it imports nothing: the host links no functions at all (no WASI), so it has no files, no
//!   network and no clock; a component that imports anything is refused at load time;
//! - its memory is capped ([`GameLimits::memory_bytes`]) by a resource limiter on its store;
//! - each call (`reset`, `step`, `info`) runs on a fuel budget ([`GameLimits::fuel`], about one
//!   unit per WebAssembly instruction), so an endless loop ends in a trap, not a stalled run;
//! - what it returns is checked: a reward must be finite, an observation at most
//!   [`GameLimits::max_observation_bytes`] long.
//!
//! Every failure is a [`GameError`] naming the game and its file; none panics, and a trapped
//! instance is dropped (the next episode gets a fresh one).
//!
//! [`GameEngine::load`] accepts a component, or a core module built by wit-bindgen for
//! `wasm32-unknown-unknown` (it carries the component type in a custom section), which is turned
//! into a component here with `wit-component`, so a plain `cargo build` is all a game needs.

use std::path::{Path, PathBuf};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};

mod bindings {
    wasmtime::component::bindgen!({ path: "../games/wit/game.wit", world: "text-game" });
}

use bindings::exports::etpo::game::game::StepResult as WitStep;
use bindings::{TextGame, TextGamePre};

/// The interface version this host speaks (the WIT package version).
pub const INTERFACE: &str = "etpo:game/game@0.1.0";

/// The budgets of one game.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GameLimits {
    /// Fuel for one call (about one unit per WebAssembly instruction).
    pub fuel: u64,
    /// The most linear memory the game may have, in bytes.
    pub memory_bytes: u64,
    /// The longest observation accepted, in bytes.
    pub max_observation_bytes: usize,
}

impl Default for GameLimits {
    /// Ample for text games (a step of the shipped games takes well under 100,000 units), small
    /// enough that a runaway game costs a fraction of a second.
    fn default() -> Self {
        GameLimits { fuel: 100_000_000, memory_bytes: 64 << 20, max_observation_bytes: 16 << 10 }
    }
}

/// Which export was running when a game failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Info,
    Reset,
    Step,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Call::Info => "info()",
            Call::Reset => "reset()",
            Call::Step => "step()",
        })
    }
}

/// A game that could not be loaded or misbehaved. `game` is the game's name (its `info()` name
/// once known, else its file name) and `module` its file.
#[derive(Debug, thiserror::Error)]
pub enum GameError {
    /// The engine itself could not be set up (not the game's fault).
    #[error("cannot start the WebAssembly engine: {0}")]
    Engine(String),
    #[error("game `{game}` ({}): cannot load it: {message}", module.display())]
    Load { game: String, module: PathBuf, message: String },
    #[error("game `{game}` ({}): {call} ran out of fuel ({fuel} units); it may loop forever (raise `game.fuel` if it is just slow)", module.display())]
    Fuel { game: String, module: PathBuf, call: Call, fuel: u64 },
    #[error("game `{game}` ({}): {call} went over its memory cap of {limit_mb} MiB", module.display())]
    Memory { game: String, module: PathBuf, call: Call, limit_mb: u64 },
    #[error("game `{game}` ({}): {call} trapped: {message}", module.display())]
    Trap { game: String, module: PathBuf, call: Call, message: String },
    #[error("game `{game}` ({}): {call} returned malformed output: {message}", module.display())]
    Malformed { game: String, module: PathBuf, call: Call, message: String },
}

/// What the host keeps per store: the memory limiter.
struct Limiter {
    memory_bytes: u64,
    /// The game asked for more memory than it may have.
    denied: bool,
    /// The largest linear memory granted, bytes.
    peak_bytes: u64,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired as u64 <= self.memory_bytes && maximum.is_none_or(|m| desired <= m);
        self.denied |= !ok;
        if ok {
            self.peak_bytes = self.peak_bytes.max(desired as u64);
        }
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; a text game needs few.
        let ok = desired <= 100_000 && maximum.is_none_or(|m| desired <= m);
        self.denied |= !ok;
        Ok(ok)
    }

    fn instances(&self) -> usize {
        // A component made from one core module has a handful of core instances.
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        4
    }
}

/// The wasmtime engine games run on: one per process (it owns the compiler and its caches).
#[derive(Clone)]
pub struct GameEngine {
    engine: Engine,
}

impl GameEngine {
    /// An engine with fuel metering on and nothing else beyond the defaults.
    pub fn new() -> Result<GameEngine, GameError> {
        let mut config = Config::new();
        config.consume_fuel(true);
        // Deterministic NaNs: a game's floating-point results do not depend on the CPU.
        config.cranelift_nan_canonicalization(true);
        // Reserve address space for what a game may use, not wasmtime's default of 4 GiB plus
        // guard per memory: a run holds one instance per environment, and a machine with a
        // virtual memory limit must not run out of address space. Growth beyond the
        // reservation moves the memory; bounds are checked explicitly (a game step is
        // microseconds either way).
        config.memory_reservation(64 << 20);
        config.memory_guard_size(64 << 10);
        config.memory_reservation_for_growth(16 << 20);
        let engine = Engine::new(&config).map_err(|e| GameError::Engine(format!("{e:#}")))?;
        Ok(GameEngine { engine })
    }

    /// Compiles the game at `module` (a component, or a core module carrying its component
    /// type), checks that it imports nothing and exports [`INTERFACE`], and asks it its name.
    pub fn load(&self, module: &Path, limits: GameLimits) -> Result<Game, GameError> {
        let file_name = module.file_stem().map_or_else(|| "game".to_string(), |s| s.to_string_lossy().into_owned());
        let load_err =
            |message: String| GameError::Load { game: file_name.clone(), module: module.to_path_buf(), message };
        let bytes = std::fs::read(module).map_err(|e| load_err(format!("cannot read the file: {e}")))?;
        let component_bytes = to_component(&bytes).map_err(load_err)?;
        let component = Component::from_binary(&self.engine, &component_bytes)
            .map_err(|e| load_err(format!("not a valid WebAssembly component: {e:#}")))?;
        let imports: Vec<String> =
            component.component_type().imports(&self.engine).map(|(name, _)| name.to_string()).collect();
        if !imports.is_empty() {
            return Err(load_err(format!(
                "it imports {}; a game must import nothing (no WASI): build it for wasm32-unknown-unknown",
                imports.join(", ")
            )));
        }
        let linker: Linker<Limiter> = Linker::new(&self.engine);
        let pre = linker
            .instantiate_pre(&component)
            .and_then(TextGamePre::new)
            .map_err(|e| load_err(format!("it does not implement {INTERFACE}: {e:#}")))?;
        let mut game = Game {
            engine: self.engine.clone(),
            pre,
            name: file_name,
            version: String::new(),
            module: module.to_path_buf(),
            limits,
        };
        let mut instance = game.instantiate()?;
        let info = instance.call(Call::Info, |g, s| g.etpo_game_game().call_info(s))?;
        check_text(&game, Call::Info, "name", &info.name, 64)?;
        check_text(&game, Call::Info, "version", &info.version, 64)?;
        game.name = info.name;
        game.version = info.version;
        Ok(game)
    }
}

/// A compiled game, ready to be instantiated once per episode. Cheap to share (`Clone`).
#[derive(Clone)]
pub struct Game {
    engine: Engine,
    pre: TextGamePre<Limiter>,
    name: String,
    version: String,
    module: PathBuf,
    limits: GameLimits,
}

impl Game {
    /// The name the game gives itself.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version the game gives itself.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The file it was loaded from.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Its budgets.
    pub fn limits(&self) -> GameLimits {
        self.limits
    }

    /// A fresh instance with its own memory: nothing carries over between instances.
    pub fn instantiate(&self) -> Result<GameInstance, GameError> {
        let limiter = Limiter { memory_bytes: self.limits.memory_bytes, denied: false, peak_bytes: 0 };
        let mut store = Store::new(&self.engine, limiter);
        store.limiter(|l| l);
        store.set_fuel(self.limits.fuel).map_err(|e| self.load_err(format!("cannot set its fuel: {e:#}")))?;
        let bindings = self.pre.instantiate(&mut store).map_err(|e| self.classify(Call::Reset, &store, e))?;
        Ok(GameInstance { game: self.clone(), store, bindings, broken: false })
    }

    fn load_err(&self, message: String) -> GameError {
        GameError::Load { game: self.name.clone(), module: self.module.clone(), message }
    }

    /// Names what went wrong in a failed call.
    fn classify(&self, call: Call, store: &Store<Limiter>, e: wasmtime::Error) -> GameError {
        let (game, module) = (self.name.clone(), self.module.clone());
        if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            return GameError::Fuel { game, module, call, fuel: self.limits.fuel };
        }
        if store.data().denied {
            return GameError::Memory { game, module, call, limit_mb: self.limits.memory_bytes >> 20 };
        }
        GameError::Trap { game, module, call, message: format!("{e:#}").replace('\n', " ") }
    }
}

/// One episode's instance of a game.
pub struct GameInstance {
    game: Game,
    store: Store<Limiter>,
    bindings: TextGame,
    /// A call failed: the instance may be in any state and is not entered again.
    broken: bool,
}

/// One step's result, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct GameStep {
    pub observation: String,
    pub reward: f64,
    pub terminated: bool,
    pub truncated: bool,
}

impl GameInstance {
    /// The game this is an instance of.
    pub fn game(&self) -> &Game {
        &self.game
    }

    /// Starts the episode: the first observation.
    pub fn reset(&mut self, seed: u64) -> Result<String, GameError> {
        let observation = self.call(Call::Reset, |g, s| g.etpo_game_game().call_reset(s, seed))?;
        check_text(&self.game, Call::Reset, "the observation", &observation, self.game.limits.max_observation_bytes)?;
        Ok(observation)
    }

    /// Plays `action`.
    pub fn step(&mut self, action: &str) -> Result<GameStep, GameError> {
        let r: WitStep = self.call(Call::Step, |g, s| g.etpo_game_game().call_step(s, action))?;
        check_text(&self.game, Call::Step, "the observation", &r.observation, self.game.limits.max_observation_bytes)?;
        if !r.reward.is_finite() {
            return Err(GameError::Malformed {
                game: self.game.name.clone(),
                module: self.game.module.clone(),
                call: Call::Step,
                message: format!("the reward is {}, not a finite number", r.reward),
            });
        }
        Ok(GameStep { observation: r.observation, reward: r.reward, terminated: r.terminated, truncated: r.truncated })
    }

    /// The game's linear memory at its largest, bytes.
    pub fn peak_memory_bytes(&self) -> u64 {
        self.store.data().peak_bytes
    }

    /// Fuel left from the last call's budget (for benchmarks).
    pub fn fuel_left(&self) -> u64 {
        self.store.get_fuel().unwrap_or(0)
    }

    /// Runs one export with a full fuel budget, turning every failure into a [`GameError`].
    fn call<T>(
        &mut self,
        call: Call,
        f: impl FnOnce(&TextGame, &mut Store<Limiter>) -> wasmtime::Result<T>,
    ) -> Result<T, GameError> {
        if self.broken {
            return Err(GameError::Trap {
                game: self.game.name.clone(),
                module: self.game.module.clone(),
                call,
                message: "a previous call of this instance failed; start a new episode".into(),
            });
        }
        self.store
            .set_fuel(self.game.limits.fuel)
            .map_err(|e| self.game.load_err(format!("cannot set its fuel: {e:#}")))?;
        match f(&self.bindings, &mut self.store) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.broken = true;
                Err(self.game.classify(call, &self.store, e))
            }
        }
    }
}

/// Rejects text the game should not have returned.
fn check_text(game: &Game, call: Call, what: &str, text: &str, max_bytes: usize) -> Result<(), GameError> {
    if text.len() > max_bytes {
        return Err(GameError::Malformed {
            game: game.name.clone(),
            module: game.module.clone(),
            call,
            message: format!("{what} is {} bytes long; the limit is {max_bytes}", text.len()),
        });
    }
    Ok(())
}

/// The component in `bytes`: as it is if it is one, else a core module encoded into a component
/// from its `component-type` custom section (what wit-bindgen embeds).
fn to_component(bytes: &[u8]) -> Result<Vec<u8>, String> {
    // The preamble: "\0asm", then the version and layer: 1, 0 (core module) or 0xd, 1 (component).
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', _, _, 1, 0]) => Ok(bytes.to_vec()),
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => wit_component::ComponentEncoder::default()
            .validate(true)
            .module(bytes)
            .and_then(|mut e| e.encode())
            .map_err(|e| {
                format!("this core module cannot be made into a component (was it built with wit-bindgen against {INTERFACE}?): {e:#}")
            }),
        _ => Err("not a WebAssembly file (no \\0asm header); expected a .wasm component or core module".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_that_are_not_wasm() {
        assert!(to_component(b"hello world").unwrap_err().contains("not a WebAssembly file"));
        // A component preamble is passed through untouched.
        let comp = [0, b'a', b's', b'm', 0x0d, 0, 1, 0];
        assert_eq!(to_component(&comp).unwrap(), comp);
        // A core module that is not valid WebAssembly cannot be encoded.
        let broken = [0, b'a', b's', b'm', 1, 0, 0, 0, 0xff];
        assert!(to_component(&broken).unwrap_err().contains("cannot be made into a component"));
    }

    #[test]
    fn a_module_without_the_game_interface_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.wasm");
        // The smallest valid core module: it becomes a component that exports nothing.
        std::fs::write(&path, [0, b'a', b's', b'm', 1, 0, 0, 0]).unwrap();
        let engine = GameEngine::new().unwrap();
        let Err(e) = engine.load(&path, GameLimits::default()) else { panic!("an empty module loaded as a game") };
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "game `empty` ({}): cannot load it: it does not implement {INTERFACE}: ",
                path.display()
            )),
            "{text}"
        );
    }

    #[test]
    fn errors_name_the_game_and_the_file() {
        let e = GameError::Fuel { game: "loop".into(), module: "g/loop.wasm".into(), call: Call::Step, fuel: 5 };
        assert_eq!(
            e.to_string(),
            "game `loop` (g/loop.wasm): step() ran out of fuel (5 units); it may loop forever (raise `game.fuel` if it is just slow)"
        );
    }

    #[test]
    fn limiter_denies_and_remembers() {
        let mut l = Limiter { memory_bytes: 1 << 20, denied: false, peak_bytes: 0 };
        assert!(l.memory_growing(0, 1 << 20, None).unwrap());
        assert!(!l.denied);
        assert!(!l.memory_growing(1 << 20, 2 << 20, None).unwrap());
        assert!(l.denied);
        assert_eq!(l.peak_bytes, 1 << 20);
    }
}
