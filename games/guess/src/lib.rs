//! Guess the number: the game picks a whole number from 1 to 100 (from the seed) and answers each
//! guess with "higher" or "lower". A win is worth 1. Before that, a guess earns
//! `PROGRESS × (fraction of the still-possible numbers it rules out)`, so the reward is real
//! progress only: repeating a guess, or guessing a number already ruled out, earns nothing, and
//! the progress rewards of one episode sum to less than `PROGRESS`. The game is lost (terminated,
//! no reward) after `MAX_GUESSES` guesses.

/// The range of the secret number.
pub const LOW: u32 = 1;
pub const HIGH: u32 = 100;
/// Guesses per game (binary search needs at most 7).
pub const MAX_GUESSES: u32 = 10;
/// The most the progress rewards of one game add up to.
pub const PROGRESS: f64 = 0.1;

/// One game in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Guess {
    secret: u32,
    /// The numbers still possible given the feedback so far.
    lo: u32,
    hi: u32,
    guesses: u32,
    over: bool,
}

/// What a step produced (the WIT record, in plain Rust for the tests).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub observation: String,
    pub reward: f64,
    pub terminated: bool,
}

impl Guess {
    /// A game whose secret is drawn from `seed`.
    pub fn new(seed: u64) -> Guess {
        let secret = LOW + (splitmix64(seed) % u64::from(HIGH - LOW + 1)) as u32;
        Guess::with_secret(secret)
    }

    /// A game with a known secret (tests).
    pub fn with_secret(secret: u32) -> Guess {
        Guess { secret, lo: LOW, hi: HIGH, guesses: 0, over: false }
    }

    /// The number to find.
    pub fn secret(&self) -> u32 {
        self.secret
    }

    /// The first observation.
    pub fn intro(&self) -> String {
        format!("I am thinking of a whole number from {LOW} to {HIGH}. You have {MAX_GUESSES} guesses. Your guess:")
    }

    /// Plays one guess, written as text; the first whole number in it counts.
    pub fn play(&mut self, action: &str) -> Outcome {
        if self.over {
            return Outcome { observation: "The game is over.".into(), reward: 0.0, terminated: true };
        }
        let Some(n) = first_number(action) else {
            return Outcome {
                observation: format!("Write a whole number from {LOW} to {HIGH}. Your guess:"),
                reward: 0.0,
                terminated: false,
            };
        };
        if !(LOW..=HIGH).contains(&n) {
            return Outcome {
                observation: format!("{n} is not from {LOW} to {HIGH}. Your guess:"),
                reward: 0.0,
                terminated: false,
            };
        }
        self.guesses += 1;
        let left = MAX_GUESSES - self.guesses;
        if n == self.secret {
            self.over = true;
            return Outcome {
                observation: format!("{n} is right! You found it in {} guesses.", self.guesses),
                reward: 1.0,
                terminated: true,
            };
        }
        let before = self.hi - self.lo + 1;
        let hint = if n < self.secret {
            self.lo = self.lo.max(n + 1);
            "higher"
        } else {
            self.hi = self.hi.min(n - 1);
            "lower"
        };
        let after = self.hi - self.lo + 1;
        let reward = PROGRESS * f64::from(before - after) / f64::from(HIGH - LOW + 1);
        if left == 0 {
            self.over = true;
            return Outcome {
                observation: format!("{n} is wrong, and that was your last guess. The number was {}.", self.secret),
                reward,
                terminated: true,
            };
        }
        Outcome {
            observation: format!(
                "{n} is too {}: the number is {hint}, from {} to {}. {left} guesses left. Your guess:",
                if hint == "higher" { "low" } else { "high" },
                self.lo,
                self.hi
            ),
            reward,
            terminated: false,
        }
    }
}

/// The first run of ASCII digits in `text` (a leading `-` makes it out of range).
fn first_number(text: &str) -> Option<u32> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..].chars().take_while(char::is_ascii_digit).take(9).collect();
    let n: u32 = digits.parse().ok()?;
    let negative = text[..start].ends_with('-');
    Some(if negative { 0 } else { n })
}

/// SplitMix64's output for `seed` (one step), to spread nearby seeds.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl text_game::TextGame for Guess {
    const NAME: &'static str = "guess";

    fn start(seed: u64) -> Self {
        Guess::new(seed)
    }

    fn intro(&self) -> String {
        Guess::intro(self)
    }

    fn step(&mut self, action: &str) -> text_game::Step {
        let o = self.play(action);
        text_game::Step { observation: o.observation, reward: o.reward, terminated: o.terminated, truncated: false }
    }
}

text_game::export_game!(Guess);

#[cfg(test)]
mod tests {
    use super::*;

    const SEED0_SECRET: u32 = 36;

    #[test]
    fn feedback_and_win() {
        let mut g = Guess::with_secret(37);
        let o = g.play("50");
        assert_eq!(o.observation, "50 is too high: the number is lower, from 1 to 49. 9 guesses left. Your guess:");
        assert!(!o.terminated);
        // 50 rules out 50..=100: 51 of 100 numbers.
        assert!((o.reward - 0.1 * 51.0 / 100.0).abs() < 1e-12);
        let o = g.play("My guess is 25.");
        assert_eq!(o.observation, "25 is too low: the number is higher, from 26 to 49. 8 guesses left. Your guess:");
        // 25 rules out 1..=25 of the 49 left.
        assert!((o.reward - 0.1 * 25.0 / 100.0).abs() < 1e-12);
        let o = g.play("37");
        assert_eq!((o.reward, o.terminated), (1.0, true));
        assert_eq!(o.observation, "37 is right! You found it in 3 guesses.");
    }

    #[test]
    fn no_reward_for_repeats_or_ruled_out_numbers() {
        let mut g = Guess::with_secret(37);
        assert!(g.play("50").reward > 0.0);
        assert_eq!(g.play("50").reward, 0.0);
        assert_eq!(g.play("90").reward, 0.0);
        assert_eq!(g.play("no idea").reward, 0.0);
        assert_eq!(g.play("150").reward, 0.0);
        assert_eq!(g.play("-3").reward, 0.0);
    }

    #[test]
    fn invalid_guesses_do_not_count() {
        let mut g = Guess::with_secret(5);
        let o = g.play("abc");
        assert_eq!(o.observation, "Write a whole number from 1 to 100. Your guess:");
        assert_eq!(g.play("0").observation, "0 is not from 1 to 100. Your guess:");
        assert!(g.play("6").observation.contains("9 guesses left"));
    }

    #[test]
    fn losing_after_the_last_guess() {
        let mut g = Guess::with_secret(100);
        let mut total = 0.0;
        for i in 1..MAX_GUESSES {
            let o = g.play(&i.to_string());
            assert!(!o.terminated);
            total += o.reward;
        }
        let o = g.play("10");
        assert!(o.terminated);
        assert_eq!(o.observation, "10 is wrong, and that was your last guess. The number was 100.");
        total += o.reward;
        // Ten numbers ruled out in all.
        assert!((total - 0.1 * 10.0 / 100.0).abs() < 1e-12);
        assert_eq!(g.play("100").reward, 0.0);
    }

    #[test]
    fn binary_search_always_wins_and_progress_stays_below_the_cap() {
        for seed in 0..200 {
            let mut g = Guess::new(seed);
            let (mut lo, mut hi, mut total) = (LOW, HIGH, 0.0);
            let mut won = false;
            for _ in 0..7 {
                let mid = (lo + hi) / 2;
                let o = g.play(&mid.to_string());
                total += o.reward;
                if o.terminated {
                    won = o.reward == 1.0;
                    break;
                }
                if o.observation.contains("higher") {
                    lo = mid + 1
                } else {
                    hi = mid - 1
                }
            }
            assert!(won, "seed {seed}");
            assert!(total - 1.0 < PROGRESS);
        }
    }

    #[test]
    fn secrets_depend_on_the_seed_only() {
        // Pinned: etpo's tests play seed 0 with scripted guesses.
        assert_eq!(Guess::new(0).secret(), SEED0_SECRET);
        assert_eq!(Guess::new(3).secret(), Guess::new(3).secret());
        let secrets: std::collections::HashSet<u32> = (0..50).map(|s| Guess::new(s).secret()).collect();
        assert!(secrets.len() > 30);
        assert!(secrets.iter().all(|s| (LOW..=HIGH).contains(s)));
    }
}
