//! PPO-KL on a tiny random model: learning a one-token reward (and its sign-flipped twin),
//! the KL-shaped reward, and exact resume from a checkpoint.

use crate::etpo_common::*;
use trainer::etpo::{AdamWConfig, POLICY};
use trainer::ppo::{PpoConfig, PpoTrainer};

fn config(beta: f64) -> PpoConfig {
    let optim = AdamWConfig { lr: 3e-2, ..Default::default() };
    PpoConfig { beta, policy_optim: optim, lora_rank: 4, lora_alpha: 8.0, ..Default::default() }
}

fn learn(sign: f64, updates: usize) -> (f64, f64) {
    let mut model = tiny_model(7);
    let mut trainer = PpoTrainer::new(&mut model, config(0.01)).unwrap();
    let mut rng = Rng(11);
    let before = expected_reward(&model, POLICY, sign);
    for i in 0..updates {
        let b = batch(&model, Some(POLICY), 16, sign, &mut rng);
        let m = trainer.update(&model, &b).unwrap();
        if std::env::var("ETPO_TEST_VERBOSE").is_ok() {
            eprintln!("{i}: E[r]={:.3} {:?}", expected_reward(&model, POLICY, sign), m);
        }
    }
    (before, expected_reward(&model, POLICY, sign))
}

#[test]
fn learns_to_raise_the_reward() {
    let (before, after) = learn(1.0, 30);
    assert!(after > before + 0.4, "expected reward {before:.3} -> {after:.3}");
}

#[test]
fn learns_to_lower_a_negative_reward() {
    let (before, after) = learn(-1.0, 30);
    assert!(before < -0.05 && after > before / 3.0, "expected reward {before:.3} -> {after:.3}");
}

#[test]
fn the_reward_is_shaped_by_the_action_log_ratio() {
    let beta = 0.5;
    let mut model = tiny_model(7);
    let mut trainer = PpoTrainer::new(&mut model, config(beta)).unwrap();
    let mut rng = Rng(3);
    for _ in 0..3 {
        let b = batch(&model, Some(POLICY), 8, 1.0, &mut rng);
        trainer.update(&model, &b).unwrap();
    }
    let b = batch(&model, Some(POLICY), 8, 1.0, &mut rng);
    // By hand: r − β Σ_j (log π(w^j|…) − log ρ(w^j|…)).
    let mut want = 0.0;
    for t in &b {
        let mut ctx = t.state.clone();
        let mut log_ratio = 0.0;
        for &w in &t.action {
            let p = next_probs(&model, &ctx, Some(POLICY))[w as usize] as f64;
            let r = next_probs(&model, &ctx, None)[w as usize] as f64;
            log_ratio += p.ln() - r.ln();
            ctx.push(w);
        }
        want += t.reward - beta * log_ratio;
    }
    want /= b.len() as f64;
    let m = trainer.update(&model, &b).unwrap();
    assert!((m.q_target_mean - want).abs() < 1e-4, "shaped reward {} vs hand {want}", m.q_target_mean);
    assert!(m.kl > 0.0 && m.clip_fraction.is_some());
}

#[test]
fn resume_from_a_checkpoint_gives_the_same_adapter() {
    let updates = 4;
    let batches: Vec<_> = {
        let model = tiny_model(1);
        let mut rng = Rng(2);
        (0..updates).map(|_| batch(&model, None, 8, 1.0, &mut rng)).collect()
    };
    let mut straight = tiny_model(1);
    let mut t = PpoTrainer::new(&mut straight, config(0.01)).unwrap();
    for b in &batches {
        t.update(&straight, b).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ppo.safetensors");
    let mut first = tiny_model(1);
    let mut t1 = PpoTrainer::new(&mut first, config(0.01)).unwrap();
    for b in &batches[..updates / 2] {
        t1.update(&first, b).unwrap();
    }
    t1.save_checkpoint(&first, &path, &serde_json::json!(null)).unwrap();
    let mut second = tiny_model(1);
    let mut t2 = PpoTrainer::new(&mut second, config(0.01)).unwrap();
    t2.load_checkpoint(&second, &path).unwrap();
    for b in &batches[updates / 2..] {
        t2.update(&second, b).unwrap();
    }
    let d = max_diff(&adapter_values(&straight, POLICY), &adapter_values(&second, POLICY));
    assert!(d <= 1e-7, "resumed run differs by {d}");
    // An ETPO checkpoint is not a PPO-KL one.
    let err = {
        let mut m = tiny_model(1);
        let e = trainer::etpo::EtpoTrainer::new(&mut m, Default::default()).unwrap();
        let p = dir.path().join("etpo.safetensors");
        e.save_checkpoint(&m, &p, &serde_json::json!(null)).unwrap();
        t2.load_checkpoint(&second, &p).unwrap_err().to_string()
    };
    assert!(err.contains("PPO-KL"), "{err}");
}
