//! A test fixture, not a game: it misbehaves on command, so that etpo's tests can check that the
//! host contains every kind of bad game and names it in a clear error. The first word of the
//! action chooses:
//! - `loop`: never returns (the host's fuel budget must stop it);
//! - `alloc`: allocates without bound (the host's memory cap must stop it);
//! - `trap`: executes `unreachable`;
//! - `nan`: returns a NaN reward;
//! - `long`: returns a 1 MiB observation;
//! - anything else: a normal step (reward 0.5; `win` ends the game with reward 1).
//!
//! `reset` with seed 13 loops forever.

/// What an action asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Loop,
    Alloc,
    Trap,
    Nan,
    Long,
    Win,
    Normal,
}

/// The behaviour the first word of `action` asks for.
pub fn behaviour(action: &str) -> Behaviour {
    match action.split_whitespace().next().unwrap_or("") {
        "loop" => Behaviour::Loop,
        "alloc" => Behaviour::Alloc,
        "trap" => Behaviour::Trap,
        "nan" => Behaviour::Nan,
        "long" => Behaviour::Long,
        "win" => Behaviour::Win,
        _ => Behaviour::Normal,
    }
}

/// The seed whose reset loops forever.
pub const LOOPING_SEED: u64 = 13;

#[cfg(target_arch = "wasm32")]
mod component {
    use super::{behaviour, Behaviour, LOOPING_SEED};

    wit_bindgen::generate!({ path: "../wit", world: "text-game" });

    use exports::etpo::game::game::{GameInfo, Guest, StepResult};

    fn spin() -> ! {
        let mut n = 0u64;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }

    struct Component;

    impl Guest for Component {
        fn info() -> GameInfo {
            GameInfo { name: "hostile".into(), version: env!("CARGO_PKG_VERSION").into() }
        }

        fn reset(seed: u64) -> String {
            if seed == LOOPING_SEED {
                spin();
            }
            "Say loop, alloc, trap, nan, long, win or anything else.".into()
        }

        fn step(action: String) -> StepResult {
            let normal = |observation: String, reward: f64, terminated: bool| StepResult {
                observation,
                reward,
                terminated,
                truncated: false,
            };
            match behaviour(&action) {
                Behaviour::Loop => spin(),
                Behaviour::Alloc => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        // Reserved, not filled: the memory grows at the game's full speed.
                        let mut block = Vec::<u8>::with_capacity(1 << 20);
                        block.push(1);
                        hoard.push(std::hint::black_box(block));
                    }
                }
                Behaviour::Trap => core::arch::wasm32::unreachable(),
                Behaviour::Nan => normal("not a number".into(), f64::NAN, false),
                Behaviour::Long => normal("x".repeat(1 << 20), 0.0, false),
                Behaviour::Win => normal("You win.".into(), 1.0, true),
                Behaviour::Normal => normal(format!("You said: {action}"), 0.5, false),
            }
        }
    }

    export!(Component);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_word_chooses() {
        assert_eq!(behaviour("loop forever"), Behaviour::Loop);
        assert_eq!(behaviour(" alloc"), Behaviour::Alloc);
        assert_eq!(behaviour("trap"), Behaviour::Trap);
        assert_eq!(behaviour("nan"), Behaviour::Nan);
        assert_eq!(behaviour("long"), Behaviour::Long);
        assert_eq!(behaviour("win"), Behaviour::Win);
        assert_eq!(behaviour("looping"), Behaviour::Normal);
        assert_eq!(behaviour(""), Behaviour::Normal);
    }
}
