//! ETPO's credit assignment on a tiny model: the reward of an action reaches the token that
//! decided it when that token is not the last (within an action), and the step before (across
//! steps); the Q-network's soft value of the start state matches the learned policy's return.
//! PPO-KL passes the first-token task too.
//!
//! `cargo test -p etpo-trainer --test etpo_credit sweep -- --ignored --nocapture` prints
//! learning curves for the configurations in `ETPO_SWEEP_SET` (`key=value;...`, several joined
//! by `|`), with `ETPO_SWEEP_SEEDS` (`11,13`), `ETPO_SWEEP_TASK` (`first` or `two`),
//! `ETPO_SWEEP_UPDATES` (60) and `ETPO_SWEEP_DIAG` (the learned soft values of a few contexts);
//! `sweep_only_successes` (also ignored) what π and π_Q keep when only successful actions follow.

use crate::etpo_common::*;
use trainer::etpo::{AdamWConfig, EtpoConfig, EtpoTrainer, POLICY};
use trainer::ppo::{PpoConfig, PpoTrainer};

/// Transitions per update, as in the measurements.
const BATCH: usize = 16;

fn config() -> EtpoConfig {
    tiny_etpo_config()
}

/// Trains ETPO on `task` for `updates` updates; returns P(decisive token) before each update
/// and after the last, with the trainer and model.
fn train(task: Task, cfg: EtpoConfig, updates: usize, seed: u64) -> (Vec<f64>, EtpoTrainer, trainer::model::Llama) {
    let mut model = tiny_model(7);
    let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
    let mut rng = Rng(seed);
    let mut curve = vec![task.p_good(&model, POLICY)];
    for i in 0..updates {
        let b = task.batch(&model, Some(POLICY), BATCH, &mut rng);
        let m = trainer.update(&model, &b).unwrap();
        curve.push(task.p_good(&model, POLICY));
        if std::env::var("ETPO_TEST_VERBOSE").is_ok() {
            let r: f64 = b.iter().map(|t| t.reward).sum();
            eprintln!(
                "{i}: R={r} P(good)={:.3} q_loss={:.4} q_targ={:.4} q_taken={:.4} V(s)={:.4} kl={:.4}",
                curve[i + 1],
                m.q_loss,
                m.q_target_mean,
                m.q_taken_mean,
                m.start_value_mean,
                m.kl
            );
        }
    }
    (curve, trainer, model)
}

fn reached(curve: &[f64], level: f64) -> Option<usize> {
    curve.iter().position(|&p| p >= level)
}

/// Trains on `task` from each of `seeds` and asserts that P(decisive token) starts below 0.1 and
/// reaches 0.5 within 60 updates on a majority of them. Training is chaotic at this scale: the
/// sums of the AVX2 and AVX-512 kernels round differently, and one seed's run can take another
/// course on another machine kind (seed 13 of the two-step task reaches 0.5 on an AVX-512 Xeon and
/// stays at 0.19 on an AVX2 EPYC, where seeds 14-17 reach it after 31-43 updates).
fn assert_learns(task: Task, seeds: &[u64], what: &str) {
    let mut report = Vec::new();
    for &seed in seeds {
        let (curve, _, _) = train(task, config(), 60, seed);
        assert!(curve[0] < 0.1, "start {:.3}", curve[0]);
        report.push((seed, reached(&curve, 0.5), curve[60]));
    }
    let learnt = report.iter().filter(|r| r.1.is_some()).count();
    assert!(
        2 * learnt > seeds.len(),
        "{what} reached 0.5 within 60 updates on {learnt} of {} seeds (seed, update, end): {report:?}",
        seeds.len()
    );
}

#[test]
fn credit_reaches_the_first_of_two_tokens() {
    assert_learns(Task::FirstToken, &[11], "P(first = good)");
}

#[test]
fn credit_reaches_the_step_before() {
    assert_learns(Task::TwoStep, &[13, 14, 15], "step 1's P(first = good)");
}

/// The soft value the Q-network assigns to the start state (the Eq. 6 bracket with Q_θ) against
/// the learned policy's exact entropy-regularised return `Σ_a π(a)·(r(a) − β·log(π(a)/ρ(a)))`,
/// enumerated over all 16² actions.
#[test]
fn the_soft_value_of_the_start_state_matches_the_learned_policys_return() {
    let cfg = config();
    let beta = cfg.beta;
    let (curve, trainer, model) = train(Task::FirstToken, cfg, 60, 17);
    let first_pi = next_probs(&model, &PROMPT, Some(POLICY));
    let first_rho = next_probs(&model, &PROMPT, None);
    let (mut expected_reward, mut soft_return) = (0.0f64, 0.0f64);
    for w1 in 0..16u32 {
        let ctx = [PROMPT.as_slice(), &[w1]].concat();
        let (pi2, rho2) = (next_probs(&model, &ctx, Some(POLICY)), next_probs(&model, &ctx, None));
        for w2 in 0..16usize {
            let p = first_pi[w1 as usize] as f64 * pi2[w2] as f64;
            let log_ratio = (first_pi[w1 as usize] as f64 / first_rho[w1 as usize] as f64).ln()
                + (pi2[w2] as f64 / rho2[w2] as f64).ln();
            let r = if w1 == GOOD { 1.0 } else { 0.0 };
            expected_reward += p * r;
            soft_return += p * (r - beta * log_ratio);
        }
    }
    let v = trainer.state_values(&model, &[PROMPT.to_vec()]).unwrap()[0];
    eprintln!(
        "P(good) {:.3} -> {:.3}; E[r] {expected_reward:.4}, soft return {soft_return:.4}, V(s0) {v:.4}",
        curve[0], curve[60]
    );
    assert!(expected_reward > 0.5, "the policy should have learned the task first: E[r] = {expected_reward:.3}");
    assert!(
        (v - soft_return).abs() <= 0.2 * soft_return.abs(),
        "V(s0) = {v:.4} vs the policy's soft return {soft_return:.4}"
    );
}

/// P(first = good) after learning the first-token task for 30 updates, then 30 updates in which
/// every action pays the same: what a policy keeps once everything it writes succeeds.
fn kept_after_every_action_pays(reference_weight: f64) -> (f64, f64) {
    let cfg = EtpoConfig { reference_weight, replay_capacity: 0, ..config() };
    let (curve, mut trainer, model) = train(Task::FirstToken, cfg, 30, 11);
    let mut rng = Rng(23);
    for _ in 0..30 {
        let mut b = Task::FirstToken.batch(&model, Some(POLICY), BATCH, &mut rng);
        b.iter_mut().for_each(|t| t.reward = 1.0);
        trainer.update(&model, &b).unwrap();
    }
    (curve[30], Task::FirstToken.p_good(&model, POLICY))
}

/// With Eq. 7's prior ρ the target is ρ wherever the Q-network sees no difference between
/// tokens, so once every action pays the same the policy goes back to ρ; with the previous
/// policy as the prior (τ = 0) it keeps what it learnt. (On Balance Scale this prior alone did not
/// help: it multiplies the policy by the Q-network's noise, README, "ETPO".)
#[test]
fn the_previous_policy_prior_keeps_a_learnt_policy_where_rewards_stop_differing() {
    let (learnt, eq7) = kept_after_every_action_pays(1.0);
    let (learnt_md, md) = kept_after_every_action_pays(0.0);
    eprintln!("Eq. 7: {learnt:.3} -> {eq7:.3}; previous-policy prior: {learnt_md:.3} -> {md:.3}");
    assert!(learnt > 0.5 && learnt_md > 0.5, "the task is learnt first: {learnt:.3}, {learnt_md:.3}");
    assert!(eq7 < 0.5 * learnt, "Eq. 7's target returns towards rho: {learnt:.3} -> {eq7:.3}");
    assert!(md > 0.9 * learnt_md, "the previous-policy prior keeps the policy: {learnt_md:.3} -> {md:.3}");
}

#[test]
fn ppo_kl_learns_the_first_token_task() {
    let optim = AdamWConfig { lr: 3e-2, ..Default::default() };
    let cfg = PpoConfig { policy_optim: optim, lora_rank: 4, lora_alpha: 8.0, ..Default::default() };
    let mut model = tiny_model(7);
    let mut trainer = PpoTrainer::new(&mut model, cfg).unwrap();
    let mut rng = Rng(11);
    let mut curve = vec![Task::FirstToken.p_good(&model, POLICY)];
    for _ in 0..60 {
        let b = Task::FirstToken.batch(&model, Some(POLICY), BATCH, &mut rng);
        trainer.update(&model, &b).unwrap();
        curve.push(Task::FirstToken.p_good(&model, POLICY));
    }
    assert!(reached(&curve, 0.5).is_some(), "PPO-KL: P(first = good) {:.3} -> {:.3}", curve[0], curve[60]);
}

/// The configurations of `ETPO_SWEEP_SET` (`key=value;...`, several joined by `|`), each with
/// its text, applied to the tests' configuration.
fn sweep_configs() -> Vec<(String, EtpoConfig)> {
    let sets = std::env::var("ETPO_SWEEP_SET").unwrap_or_default();
    sets.split('|')
        .map(|set| {
            let mut cfg = config();
            for kv in set.split(';').filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once('=').expect("key=value");
                cfg.set(k, v).unwrap();
            }
            (set.to_string(), cfg)
        })
        .collect()
}

/// `ETPO_SWEEP_UPDATES`, or `default`.
fn sweep_updates(default: usize) -> usize {
    std::env::var("ETPO_SWEEP_UPDATES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Learning curves for a hyper-parameter sweep (not a check).
#[test]
#[ignore]
fn sweep() {
    let updates = sweep_updates(60);
    for (set, cfg) in sweep_configs() {
        let tasks = match std::env::var("ETPO_SWEEP_TASK").as_deref() {
            Ok("first") => vec![Task::FirstToken],
            Ok("two") => vec![Task::TwoStep],
            _ => vec![Task::FirstToken, Task::TwoStep],
        };
        for &task in &tasks {
            let seeds: Vec<u64> = std::env::var("ETPO_SWEEP_SEEDS")
                .map(|s| s.split(',').map(|x| x.parse().unwrap()).collect())
                .unwrap_or(vec![11, 13]);
            for seed in seeds {
                let t0 = std::time::Instant::now();
                let (curve, trainer, model) = train(task, cfg.clone(), updates, seed);
                let pts: Vec<String> = curve.iter().step_by(10).map(|p| format!("{p:.2}")).collect();
                eprintln!(
                    "[{set}] {task:?} seed {seed}: {} | reach0.5 {:?} ({:.1}s)",
                    pts.join(" "),
                    reached(&curve, 0.5),
                    t0.elapsed().as_secs_f64()
                );
                if std::env::var("ETPO_SWEEP_DIAG").is_ok() {
                    let ctx = |w: u32| [PROMPT.as_slice(), &[w]].concat();
                    let v1 = trainer.state_values(&model, &[ctx(GOOD), ctx(2), ctx(7)]).unwrap();
                    let s1 = |w: u32| task.second_state(&[w, 3]);
                    let v2 = trainer.state_values(&model, &[s1(GOOD), s1(2), s1(7), PROMPT.to_vec()]).unwrap();
                    eprintln!(
                        "   V(s0,w1): good {:.3} bad {:.3} {:.3} | V(s1): good {:.3} bad {:.3} {:.3} | V(s0) {:.3}",
                        v1[0], v1[1], v1[2], v2[0], v2[1], v2[2], v2[3]
                    );
                }
            }
        }
    }
}

/// What a learnt policy and the Q-network keep when only successes are seen (not a check): 30
/// updates of the first-token task, then `ETPO_SWEEP_UPDATES` (30) updates whose batches keep
/// only the actions that chose the good token, as when every action a good policy writes runs.
/// Nothing in the data then says the other tokens are worse; prints P(good) under π and under
/// the Q-network's own distribution π_Q, for the configurations in `ETPO_SWEEP_SET`.
#[test]
#[ignore]
fn sweep_only_successes() {
    let updates = sweep_updates(30);
    for (set, cfg) in sweep_configs() {
        for seed in [11u64, 13] {
            let (curve, mut trainer, model) = train(Task::FirstToken, cfg.clone(), 30, seed);
            let mut rng = Rng(seed + 100);
            let mut trace = vec![(curve[30], Task::FirstToken.p_good(&model, trainer::etpo::Q))];
            for i in 0..updates {
                let mut b = Task::FirstToken.batch(&model, Some(POLICY), BATCH, &mut rng);
                b.retain(|t| t.action[0] == GOOD);
                if !b.is_empty() {
                    trainer.update(&model, &b).unwrap();
                }
                if (i + 1) % 10 == 0 {
                    trace.push((
                        Task::FirstToken.p_good(&model, POLICY),
                        Task::FirstToken.p_good(&model, trainer::etpo::Q),
                    ));
                }
            }
            let pts: Vec<String> = trace.iter().map(|(p, q)| format!("{p:.2}/{q:.2}")).collect();
            eprintln!("[{set}] seed {seed}: P(good) π/π_Q every 10 updates: {}", pts.join(" "));
        }
    }
}
