//! ETPO on a tiny random model: the start at ρ, the β limit, the Polyak rule, learning a reward
//! decided by an action's last token (and its sign-flipped twin), and exact resume from a
//! checkpoint. Rewards decided before the last token are `etpo_credit.rs`'s.

use crate::etpo_common::*;
use trainer::etpo::{AdamWConfig, EtpoConfig, EtpoTrainer, QReadout, POLICY, Q, Q_TARGET};

const POLYAK: f64 = 0.8;

/// The tiny model's configuration with `beta`: the shipped one for [`QReadout::Dueling`]; for
/// [`QReadout::Logits`] Algorithm 1 as the paper runs it (one step of each network per update,
/// no replay).
fn config(readout: QReadout, beta: f64) -> EtpoConfig {
    match readout {
        QReadout::Dueling => EtpoConfig { beta, ..tiny_etpo_config() },
        QReadout::Logits => {
            let optim = AdamWConfig { lr: 3e-2, ..Default::default() };
            EtpoConfig {
                beta,
                q_readout: readout,
                q_optim: optim,
                policy_optim: optim,
                lora_rank: 4,
                lora_alpha: 8.0,
                polyak: POLYAK,
                q_epochs: 1,
                policy_epochs: 1,
                replay_capacity: 0,
                replay_sample: 0,
                ..Default::default()
            }
        }
    }
}

/// Trains on the last-token task; returns the expected reward before and after.
fn learn(readout: QReadout, beta: f64, sign: f64, updates: usize) -> (f64, f64) {
    let mut model = tiny_model(7);
    let mut trainer = EtpoTrainer::new(&mut model, config(readout, beta)).unwrap();
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
fn the_policy_target_starts_at_rho_and_sharpens_as_q_learns() {
    // With the Q-values read before the first Q step, Eq. 7's target is ρ·exp(0) = ρ = π: the
    // two entropies agree, and ρ's at the same positions with them (π starts as ρ). Under Eq. 7
    // the target is π_Q's. After training on the last-token task the target is sharper than ρ.
    let cfg = EtpoConfig { policy_uses_pre_step_q: true, q_epochs: 1, ..config(QReadout::Dueling, 0.1) };
    let mut model = tiny_model(7);
    let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
    let mut rng = Rng(11);
    let mut first = None;
    let mut last = None;
    for _ in 0..20 {
        let b = batch(&model, Some(POLICY), 16, 1.0, &mut rng);
        let m = trainer.update(&model, &b).unwrap();
        first.get_or_insert((m.entropy, m.target_entropy.unwrap(), m.reference_entropy.unwrap()));
        assert_eq!(m.q_entropy, m.target_entropy);
        last = m.target_entropy;
    }
    let (entropy, target, reference) = first.unwrap();
    assert!((entropy - target).abs() < 1e-4, "π's entropy {entropy}, the target's {target}");
    assert!((entropy - reference).abs() < 1e-4, "π's entropy {entropy}, ρ's {reference}");
    let last = last.unwrap();
    assert!(last < entropy - 0.05, "the target's entropy went {target} -> {last}");
}

#[test]
fn each_update_runs_with_the_scheduled_beta() {
    let cfg = EtpoConfig { beta_end: Some(0.025), planned_updates: Some(3), ..config(QReadout::Dueling, 0.1) };
    let mut model = tiny_model(7);
    let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
    let mut rng = Rng(11);
    let mut betas = Vec::new();
    for _ in 0..4 {
        let b = batch(&model, Some(POLICY), 8, 1.0, &mut rng);
        betas.push(trainer.update(&model, &b).unwrap().beta.unwrap());
    }
    for (got, want) in betas.iter().zip([0.1, 0.05, 0.025, 0.025]) {
        assert!((got - want).abs() < 1e-12, "{betas:?}");
    }
}

#[test]
fn learns_to_raise_the_reward_with_both_readouts() {
    for (readout, beta) in [(QReadout::Dueling, 0.1), (QReadout::Logits, 0.01)] {
        let (before, after) = learn(readout, beta, 1.0, 30);
        assert!(after > before + 0.4, "{readout}: expected reward {before:.3} -> {after:.3}");
    }
}

#[test]
fn learns_to_lower_a_negative_reward_with_both_readouts() {
    for (readout, beta) in [(QReadout::Dueling, 0.1), (QReadout::Logits, 0.01)] {
        let (before, after) = learn(readout, beta, -1.0, 30);
        assert!(before < -0.05 && after > before / 3.0, "{readout}: expected reward {before:.3} -> {after:.3}");
    }
}

/// Largest |π(w|c) − ρ(w|c)| over the first two decision points of the task.
fn policy_distance_from_reference(model: &trainer::model::Llama) -> f32 {
    let mut worst = 0f32;
    for ctx in [PROMPT.to_vec(), [PROMPT.as_slice(), &[GOOD]].concat(), [PROMPT.as_slice(), &[2]].concat()] {
        let p = next_probs(model, &ctx, Some(POLICY));
        let r = next_probs(model, &ctx, None);
        worst = p.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    worst
}

#[test]
fn networks_start_at_the_reference_model() {
    let mut model = tiny_model(3);
    let _trainer = EtpoTrainer::new(&mut model, config(QReadout::Dueling, 0.01)).unwrap();
    assert!(policy_distance_from_reference(&model) < 1e-6);
    let ctx = PROMPT.to_vec();
    let (q, r) = (next_probs(&model, &ctx, Some(Q)), next_probs(&model, &ctx, None));
    assert!(q.iter().zip(&r).all(|(a, b)| (a - b).abs() < 1e-6), "{q:?} vs {r:?}");
    assert_eq!(adapter_values(&model, Q), adapter_values(&model, Q_TARGET));
}

#[test]
fn a_very_large_beta_keeps_the_policy_at_the_reference() {
    let run = |beta: f64, lr: f64| {
        let mut model = tiny_model(7);
        let optim = AdamWConfig { lr, ..Default::default() };
        // No trust region: what is measured is where Eq. 7's target puts π.
        let cfg = EtpoConfig {
            q_optim: optim,
            policy_optim: optim,
            policy_max_kl: None,
            // Eq. 6 and Eq. 7 as written: one-step targets, the squared error alone.
            trace_lambda: 0.0,
            conservative: 0.0,
            ..config(QReadout::Dueling, beta)
        };
        let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
        let mut rng = Rng(5);
        for _ in 0..10 {
            let b = batch(&model, Some(POLICY), 16, 1.0, &mut rng);
            trainer.update(&model, &b).unwrap();
        }
        policy_distance_from_reference(&model)
    };
    // With β = 1e4 the policy target ρ·exp(Q/β) is ρ up to the Q-network's optimisation noise
    // (Adam moves the log-ratio by about lr per step whatever β is).
    let (small, huge) = (run(0.01, 3e-3), run(1e4, 3e-3));
    assert!(huge < 0.03, "β = 1e4 moved π by {huge}");
    assert!(small > 0.3, "β = 0.01 should move π (moved {small})");
}

/// KL(p‖q) of two distributions.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    p.iter().zip(q).map(|(&a, &b)| if a > 0.0 { a as f64 * (a as f64 / b as f64).ln() } else { 0.0 }).sum()
}

/// The mean over the batch's action rows of KL(π_before‖π_after), read with the model's own
/// forward pass (not the trainer's batched one).
fn step_kl(model: &trainer::model::Llama, batch: &[trainer::etpo::Transition], before: &[Vec<f32>]) -> f64 {
    let rows = action_contexts(batch);
    rows.iter().zip(before).map(|(ctx, b)| kl(b, &next_probs(model, ctx, Some(POLICY)))).sum::<f64>()
        / rows.len() as f64
}

fn action_contexts(batch: &[trainer::etpo::Transition]) -> Vec<Vec<u32>> {
    batch.iter().flat_map(|t| (0..t.action.len()).map(|i| [t.state.as_slice(), &t.action[..i]].concat())).collect()
}

#[test]
fn the_policy_step_stays_inside_its_trust_region() {
    const MAX_KL: f64 = 0.002;
    let optim = AdamWConfig { lr: 3e-2, ..Default::default() };
    // (trust region, planned updates): constant, shrinking to an eighth over the 4 updates, none.
    let cases = [(Some(MAX_KL), None), (Some(MAX_KL), Some(4)), (None, None)];
    let (mut scaled, mut widest_free, mut last_shrunk) = (0, 0f64, 0f64);
    for (max_kl, planned_updates) in cases {
        let cfg = EtpoConfig {
            policy_optim: optim,
            policy_max_kl: max_kl,
            policy_max_kl_end: Some(MAX_KL / 8.0),
            planned_updates,
            replay_capacity: 0,
            replay_sample: 0,
            ..tiny_etpo_config()
        };
        let mut model = tiny_model(7);
        let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
        let mut rng = Rng(3);
        for update in 0..4 {
            let b = Task::FirstToken.batch(&model, Some(POLICY), 16, &mut rng);
            let before: Vec<Vec<f32>> =
                action_contexts(&b).iter().map(|c| next_probs(&model, c, Some(POLICY))).collect();
            let m = trainer.update(&model, &b).unwrap();
            let measured = step_kl(&model, &b, &before);
            match max_kl {
                Some(_) => {
                    let limit = trainer.config().policy_max_kl_at(update).unwrap();
                    assert_eq!(m.policy_step_max_kl, Some(limit));
                    let (kl, scale) = (m.policy_step_kl.unwrap(), m.policy_step_scale.unwrap());
                    assert!((kl - measured).abs() <= 1e-4 + 0.02 * measured, "reported {kl}, measured {measured}");
                    assert!(measured <= limit * 1.05, "step KL {measured} > {limit} (scale {scale})");
                    // One KL check when the whole step fits, more (at most 7) when it was shrunk.
                    let checks = m.policy_step_checks.unwrap();
                    assert!(
                        (1..=7).contains(&checks) && (checks == 1) == (scale == 1.0),
                        "{checks} checks, scale {scale}"
                    );
                    scaled += usize::from(scale < 1.0);
                    if planned_updates.is_some() && update == 3 {
                        last_shrunk = measured;
                    }
                }
                None => {
                    assert_eq!(m.policy_step_kl, None);
                    assert_eq!(m.policy_step_checks, None);
                    widest_free = widest_free.max(measured);
                }
            }
        }
    }
    assert!(widest_free > 3.0 * MAX_KL, "without a trust region the steps are wider ({widest_free})");
    assert!(scaled >= 4, "the trust region cut {scaled} of 8 steps");
    assert!(last_shrunk <= MAX_KL / 8.0 * 1.05, "the last planned update moved by {last_shrunk}");
}

#[test]
fn the_target_moves_by_exactly_the_polyak_rule() {
    let mut model = tiny_model(3);
    let cfg = EtpoConfig { polyak: POLYAK, ..config(QReadout::Dueling, 0.1) };
    let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
    let mut rng = Rng(9);
    for _ in 0..3 {
        let target_before = adapter_values(&model, Q_TARGET);
        let b = batch(&model, Some(POLICY), 8, 1.0, &mut rng);
        trainer.update(&model, &b).unwrap();
        let q = adapter_values(&model, Q);
        let expected: Vec<Vec<f32>> = target_before
            .iter()
            .zip(&q)
            .map(|(t, q)| {
                t.iter().zip(q).map(|(t, q)| (POLYAK * *t as f64 + (1.0 - POLYAK) * *q as f64) as f32).collect()
            })
            .collect();
        let diff = max_diff(&adapter_values(&model, Q_TARGET), &expected);
        assert!(diff < 1e-7, "target off the Polyak rule by {diff}");
    }
    // Both trained networks moved away from ρ.
    assert!(adapter_values(&model, POLICY).iter().flatten().any(|&x| x != 0.0));
}

#[test]
fn resume_from_a_checkpoint_gives_the_same_adapters() {
    let updates = 4;
    let batches: Vec<_> = {
        // Fixed batches (sampled once from ρ) so both runs see the same data.
        let model = tiny_model(1);
        let mut rng = Rng(2);
        (0..updates).map(|_| batch(&model, None, 8, 1.0, &mut rng)).collect()
    };
    let cfg = config(QReadout::Dueling, 0.01);

    let mut straight = tiny_model(1);
    let mut t = EtpoTrainer::new(&mut straight, cfg.clone()).unwrap();
    for b in &batches {
        t.update(&straight, b).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt").join("etpo.safetensors");
    let mut first = tiny_model(1);
    let mut t1 = EtpoTrainer::new(&mut first, cfg.clone()).unwrap();
    for b in &batches[..updates / 2] {
        t1.update(&first, b).unwrap();
    }
    let extra = serde_json::json!({"rng": 12345u64, "env_steps": 16});
    t1.save_checkpoint(&first, &path, &extra).unwrap();
    drop((t1, first));

    let mut second = tiny_model(1);
    let mut t2 = EtpoTrainer::new(&mut second, EtpoConfig { seed: 99, ..cfg }).unwrap();
    assert_eq!(t2.load_checkpoint(&second, &path).unwrap(), extra);
    assert_eq!(t2.updates(), (updates / 2) as u64);
    for b in &batches[updates / 2..] {
        t2.update(&second, b).unwrap();
    }
    for name in [POLICY, Q, Q_TARGET] {
        let d = max_diff(&adapter_values(&straight, name), &adapter_values(&second, name));
        assert!(d <= 1e-7, "{name}: resumed run differs by {d}");
    }
    // No temporary files are left beside the checkpoint.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn the_data_buffer_is_replayed_and_bounded() {
    let mut model = tiny_model(3);
    let cfg = EtpoConfig {
        replay_capacity: 20,
        replay_sample: 12,
        q_epochs: 1,
        policy_epochs: 1,
        ..config(QReadout::Dueling, 0.1)
    };
    let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
    let mut rng = Rng(4);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let b = batch(&model, Some(POLICY), 8, 1.0, &mut rng);
        let m = trainer.update(&model, &b).unwrap();
        assert_eq!((m.transitions, m.action_tokens), (8, 16), "the metrics describe the new batch");
        seen.push((m.replayed, trainer.replay_len()));
    }
    assert_eq!(seen, vec![(0, 8), (8, 16), (12, 20), (12, 20)]);
    let cfg = EtpoConfig { replay_capacity: 0, ..config(QReadout::Dueling, 0.1) };
    let mut model = tiny_model(3);
    let mut trainer = EtpoTrainer::new(&mut model, cfg).unwrap();
    let b = batch(&model, Some(POLICY), 8, 1.0, &mut rng);
    trainer.update(&model, &b).unwrap();
    assert_eq!((trainer.update(&model, &b).unwrap().replayed, trainer.replay_len()), (0, 0));
}

#[test]
fn a_bad_checkpoint_is_an_error_with_the_path() {
    let mut model = tiny_model(1);
    let mut t = EtpoTrainer::new(&mut model, config(QReadout::Dueling, 0.01)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let err = t.load_checkpoint(&model, &path).unwrap_err().to_string();
    assert!(err.contains("broken.safetensors"), "{err}");
}

/// Appendix A, Eq. 13, on the tiny model after some training (π ≠ ρ, Q ≠ 0): the token-level
/// value `E_{w1~π}[Q(s,w1)] − β KL(w1|s)`, with `Q(s,w1)` from the inside-action case of Eq. 6,
/// equals the action-level `E_{a~π}[Q(s,a)] − β KL(a|s)` over all 16² two-token actions.
#[test]
fn eq13_holds_on_the_tiny_model() {
    use candle_core::{Device, Tensor};
    use trainer::etpo::math;
    let beta = 0.05;
    let mut model = tiny_model(7);
    let mut trainer = EtpoTrainer::new(&mut model, config(QReadout::Dueling, beta)).unwrap();
    let mut rng = Rng(21);
    for _ in 0..5 {
        let b = batch(&model, Some(POLICY), 16, 1.0, &mut rng);
        trainer.update(&model, &b).unwrap();
    }
    let v = 16usize;
    // Last-position logits of `contexts` under `adapter`: [N, V].
    let rows = |contexts: &[Vec<u32>], adapter: Option<&str>| -> Tensor {
        let flat: Vec<u32> = contexts.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (contexts.len(), contexts[0].len()), &Device::Cpu).unwrap();
        let logits = model.forward(&ids, None, adapter).unwrap().detach();
        let t = contexts[0].len();
        logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap()
    };
    let root = vec![PROMPT.to_vec()];
    let inner: Vec<Vec<u32>> = (0..v as u32).map(|w| [PROMPT.as_slice(), &[w]].concat()).collect();
    let (pi0, rho0) =
        (math::log_softmax(&rows(&root, Some(POLICY))).unwrap(), math::log_softmax(&rows(&root, None)).unwrap());
    let (pi1, rho1) =
        (math::log_softmax(&rows(&inner, Some(POLICY))).unwrap(), math::log_softmax(&rows(&inner, None)).unwrap());
    // Q(s, w1, w2) of every action: the Q-network's read-out at the contexts (s, w1).
    // (Any Q will do for the identity: the log-ratio part of the dueling read-out, value 0.)
    let zeros = Tensor::zeros(v, candle_core::DType::F32, &Device::Cpu).unwrap();
    let q_last = math::q_values(&rows(&inner, Some(Q)), Some(&zeros), &rho1, QReadout::Dueling, beta).unwrap();
    // Token level: Q(s, w1) = V(s, w1), then the value of s.
    let q_first = math::soft_values(&pi1, &q_last, &rho1, beta).unwrap().unsqueeze(0).unwrap();
    let token_level = math::soft_values(&pi0, &q_first, &rho0, beta).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    // Action level, by enumeration.
    let (p0, r0) = (pi0.to_vec2::<f32>().unwrap(), rho0.to_vec2::<f32>().unwrap());
    let (p1, r1, q) = (pi1.to_vec2::<f32>().unwrap(), rho1.to_vec2::<f32>().unwrap(), q_last.to_vec2::<f32>().unwrap());
    let (mut eq, mut kl) = (0.0f64, 0.0f64);
    for a in 0..v {
        for b in 0..v {
            let lp = p0[0][a] as f64 + p1[a][b] as f64;
            let lr = r0[0][a] as f64 + r1[a][b] as f64;
            eq += lp.exp() * q[a][b] as f64;
            kl += lp.exp() * (lp - lr);
        }
    }
    let action_level = eq - beta * kl;
    assert!(kl > 1e-4, "the policy should have moved from ρ (KL {kl})");
    assert!((token_level - action_level).abs() < 1e-5, "token level {token_level} vs action level {action_level}");
}

/// Eq. 6 through the trainer, by hand: with the paper's read-out at the start (π = ρ, Q̄ = ρ's
/// logits z) the soft value of a context is `V(c) = Σ_w ρ(w|c) z(w|c)` (KL = 0). A 2-step
/// episode (bootstrapping from a next state that is in the batch, then terminal with a one-token
/// action) and a transition whose next state is not in the batch.
#[test]
fn eq6_targets_of_a_two_step_episode_by_hand() {
    use candle_core::{Device, Tensor};
    use trainer::etpo::Transition;
    let gamma = 0.9;
    let model = tiny_model(5);
    let value = |model: &trainer::model::Llama, ctx: &[u32]| -> f64 {
        let ids = Tensor::new(ctx, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let z: Vec<f32> =
            model.forward(&ids, None, None).unwrap().squeeze(0).unwrap().get(ctx.len() - 1).unwrap().to_vec1().unwrap();
        let p = next_probs(model, ctx, None);
        p.iter().zip(&z).map(|(p, z)| *p as f64 * *z as f64).sum()
    };
    let (s0, s1, s2) = (vec![1u32, 9, 3], vec![1u32, 9, 3, 4, 7, 2, 11], vec![2u32, 2, 2]);
    let batch = vec![
        Transition { state: s0.clone(), action: vec![4, 7, 2], reward: 0.5, next_state: Some(s1.clone()), group: None },
        Transition { state: s1.clone(), action: vec![6], reward: 1.0, next_state: None, group: None },
        Transition { state: s0.clone(), action: vec![5, 8], reward: -1.0, next_state: Some(s2.clone()), group: None },
    ];
    let v = |ctx: &[u32]| value(&model, ctx);
    let cat = |a: &[u32], b: &[u32]| [a, b].concat();
    let plain = vec![
        vec![v(&cat(&s0, &[4])), v(&cat(&s0, &[4, 7])), 0.5 + gamma * v(&s1)],
        vec![1.0],
        vec![v(&cat(&s0, &[5])), -1.0 + gamma * v(&s2)],
    ];
    for discount_inside in [false, true] {
        let cfg = EtpoConfig {
            gamma,
            discount_inside_actions: discount_inside,
            trace_lambda: 0.0,
            ..config(QReadout::Logits, 0.01)
        };
        let mut m = tiny_model(5);
        let trainer = EtpoTrainer::new(&mut m, cfg).unwrap();
        let got = trainer.targets(&m, &batch).unwrap();
        for (i, (g, want)) in got.iter().zip(&plain).enumerate() {
            assert_eq!(g.len(), want.len());
            for (j, (g, w)) in g.iter().zip(want).enumerate() {
                let last = j + 1 == want.len();
                let w = if discount_inside && !last { gamma * w } else { *w };
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "transition {i} token {j} (disc. {discount_inside}): {g} vs {w}"
                );
            }
        }
    }

    // Tree-backup traces (trace_lambda = 1): each target inside an action adds π's probability
    // of the next token taken times (that token's target − Q̄ of it), back from the last token.
    // At the start Q̄ = z and π = ρ.
    let logit = |ctx: &[u32], w: u32| -> f64 {
        let ids = Tensor::new(ctx, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let z: Vec<f32> =
            model.forward(&ids, None, None).unwrap().squeeze(0).unwrap().get(ctx.len() - 1).unwrap().to_vec1().unwrap();
        z[w as usize] as f64
    };
    let prob = |ctx: &[u32], w: u32| next_probs(&model, ctx, None)[w as usize] as f64;
    let (c1, c2) = (cat(&s0, &[4]), cat(&s0, &[4, 7]));
    let y2 = plain[0][2];
    let y1 = v(&c2) + prob(&c2, 2) * (y2 - logit(&c2, 2));
    let y0 = v(&c1) + prob(&c1, 7) * (y1 - logit(&c1, 7));
    let cfg = EtpoConfig { gamma, trace_lambda: 1.0, ..config(QReadout::Logits, 0.01) };
    let mut m = tiny_model(5);
    let trainer = EtpoTrainer::new(&mut m, cfg).unwrap();
    let got = trainer.targets(&m, &batch).unwrap();
    for (g, w) in got[0].iter().zip([y0, y1, y2]) {
        assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "with traces: {:?} vs {:?}", got[0], [y0, y1, y2]);
    }
    assert_eq!(got[1], vec![1.0]);
}
