//! GRPO on the tiny model: it learns a reward decided by an action's first token (not the last
//! thing it writes), avoids that token when the reward is negative, and resumes exactly from a
//! checkpoint.

use crate::etpo_common::*;
use trainer::etpo::{AdamWConfig, POLICY};
use trainer::grpo::{GrpoConfig, GrpoTrainer};

fn config() -> GrpoConfig {
    GrpoConfig {
        policy_optim: AdamWConfig { lr: 3e-2, ..Default::default() },
        lora_rank: 4,
        lora_alpha: 8.0,
        ..Default::default()
    }
}

/// P(first token = GOOD) before each of `updates` updates of 16 transitions and after the last;
/// the reward of a transition is multiplied by `sign`.
fn curve(sign: f64, updates: usize) -> Vec<f64> {
    let mut model = tiny_model(7);
    let mut trainer = GrpoTrainer::new(&mut model, config()).unwrap();
    let mut rng = Rng(11);
    let mut curve = vec![Task::FirstToken.p_good(&model, POLICY)];
    for _ in 0..updates {
        let mut b = Task::FirstToken.batch(&model, Some(POLICY), 16, &mut rng);
        b.iter_mut().for_each(|t| t.reward *= sign);
        let m = trainer.update(&model, &b).unwrap();
        assert_eq!(m.q_taken_mean, 1.0, "every transition answers the one prompt: one group");
        curve.push(Task::FirstToken.p_good(&model, POLICY));
    }
    curve
}

#[test]
fn grpo_learns_the_first_token_task() {
    let c = curve(1.0, 60);
    assert!(c[0] < 0.1, "start {:.3}", c[0]);
    assert!(c.iter().any(|&p| p >= 0.5), "GRPO: P(first = good) {:.3} -> {:.3}", c[0], c[60]);
}

#[test]
fn grpo_avoids_the_first_token_when_it_costs() {
    let c = curve(-1.0, 30);
    assert!(c[30] < c[0] / 3.0, "GRPO, sign-flipped: P(first = good) {:.4} -> {:.4}", c[0], c[30]);
}

#[test]
fn grpo_resumes_exactly_from_a_checkpoint() {
    let updates = 4;
    let batches: Vec<_> = {
        let model = tiny_model(1);
        let mut rng = Rng(2);
        // Rewards that differ within the group (the task's own are almost all 0 under ρ).
        let varied = |mut b: Vec<trainer::etpo::Transition>| {
            b.iter_mut().for_each(|t| t.reward = f64::from(t.action[0] % 3));
            b
        };
        (0..updates).map(|_| varied(Task::FirstToken.batch(&model, None, 8, &mut rng))).collect()
    };
    let mut straight = tiny_model(1);
    let mut t = GrpoTrainer::new(&mut straight, config()).unwrap();
    for b in &batches {
        t.update(&straight, b).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grpo.safetensors");
    let mut first = tiny_model(1);
    let mut t1 = GrpoTrainer::new(&mut first, config()).unwrap();
    for b in &batches[..updates / 2] {
        t1.update(&first, b).unwrap();
    }
    t1.save_checkpoint(&first, &path, &serde_json::json!({"k": 1})).unwrap();
    let mut second = tiny_model(1);
    let mut t2 = GrpoTrainer::new(&mut second, config()).unwrap();
    assert_eq!(t2.load_checkpoint(&second, &path).unwrap(), serde_json::json!({"k": 1}));
    assert_eq!(t2.updates(), 2);
    for b in &batches[updates / 2..] {
        t2.update(&second, b).unwrap();
    }
    let d = max_diff(&adapter_values(&straight, POLICY), &adapter_values(&second, POLICY));
    assert!(d <= 1e-7, "resumed run differs by {d}");
    assert!(max_diff(&adapter_values(&straight, POLICY), &adapter_values(&tiny_model_with_policy(), POLICY)) > 1e-4);
}

/// A fresh model with an untrained policy adapter, to show the runs above moved.
fn tiny_model_with_policy() -> trainer::model::Llama {
    let mut m = tiny_model(1);
    GrpoTrainer::new(&mut m, config()).unwrap();
    m
}
