//! The model against its references: padding, caches, merged adapters, gradients.

use super::*;
use crate::lora::LoraConfig;
use candle_core::D;

/// A tiny random model on the CPU in f32.
pub(crate) fn tiny(seed: u64) -> Llama {
    Llama::random(LlamaConfig::tiny(300), seed, &Device::Cpu, DType::F32).unwrap()
}

/// Left-pads `rows` into ids and mask tensors.
pub(crate) fn batch(rows: &[Vec<u32>]) -> (Tensor, Tensor) {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        ids.extend(std::iter::repeat_n(7u32, t - r.len()).chain(r.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, t - r.len()).chain(std::iter::repeat_n(1, r.len())));
    }
    (
        Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (rows.len(), t), &Device::Cpu).unwrap(),
    )
}

pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn seq(n: usize, start: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (start + 37 * i) % 300).collect()
}

#[test]
fn padded_rows_match_unpadded_rows() {
    let m = tiny(1);
    let rows = vec![seq(9, 3), seq(5, 11), seq(1, 40)];
    let (ids, mask) = batch(&rows);
    let all = m.forward(&ids, Some(&mask), None).unwrap();
    let t = ids.dim(1).unwrap();
    for (i, r) in rows.iter().enumerate() {
        let (one, _) = batch(std::slice::from_ref(r));
        let alone = m.forward(&one, None, None).unwrap().squeeze(0).unwrap();
        let padded = all.get(i).unwrap().narrow(0, t - r.len(), r.len()).unwrap();
        assert!(max_abs_diff(&alone, &padded) < 1e-5, "row {i}");
    }
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let mut m = tiny(2);
    m.add_adapter_seeded("p", &LoraConfig::default(), 5).unwrap();
    randomize_b(&m, "p", 6);
    let rows = vec![seq(8, 1), seq(6, 2)];
    let (ids, mask) = batch(&rows);
    for adapter in [None, Some("p")] {
        let opts = ForwardOptions { adapter, track_grad: false, dropout_seed: None };
        let full = m.logits(&m.forward_hidden(&ids, Some(&mask), &opts).unwrap()).unwrap();
        // Prompt of 3 positions, then one token at a time, then a chunk of 2.
        let mut cache = KvCache::with_capacity(&m, 2, 2);
        let mut parts = Vec::new();
        let steps = [(0, 3), (3, 1), (4, 1), (5, 1), (6, 2)];
        for (s, n) in steps {
            let h = m
                .forward_step(&ids.narrow(1, s, n).unwrap(), Some(&mask.narrow(1, s, n).unwrap()), &mut cache, &opts)
                .unwrap();
            parts.push(m.logits(&h).unwrap());
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        assert_eq!(cache.len(), 8);
        // Only real tokens are compared; padding rows attend to themselves only.
        let d = max_abs_diff(&full.get(0).unwrap(), &inc.get(0).unwrap()).max(max_abs_diff(
            &full.get(1).unwrap().narrow(0, 2, 6).unwrap(),
            &inc.get(1).unwrap().narrow(0, 2, 6).unwrap(),
        ));
        assert!(d < 1e-4, "adapter {adapter:?}: {d}");
    }
}

#[test]
fn merged_adapter_decodes_like_the_unmerged_one() {
    let mut m = tiny(16);
    let cfg = LoraConfig { targets: vec![Projection::Q, Projection::K, Projection::Up], ..LoraConfig::default() };
    m.add_adapter_seeded("pi", &cfg, 1).unwrap();
    randomize_b(&m, "pi", 2);
    let merged = m.merge_adapter("pi").unwrap();
    let (ids, mask) = batch(&[seq(5, 1), seq(3, 2)]);
    let opts = ForwardOptions { adapter: Some("pi"), track_grad: false, dropout_seed: None };
    let mut c1 = KvCache::with_capacity(&m, 2, 8);
    let mut c2 = KvCache::with_capacity(&m, 2, 8);
    let a = m.forward_step(&ids, Some(&mask), &mut c1, &opts).unwrap();
    let b = m.forward_step_merged(&ids, Some(&mask), &mut c2, &merged).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4);
    let base = m.forward_hidden(&ids, Some(&mask), &ForwardOptions::default()).unwrap();
    assert!(max_abs_diff(&base, &b) > 1e-3, "the merge changed nothing");
    let next = Tensor::new(&[[9u32], [10]], &Device::Cpu).unwrap();
    let a = m.forward_step(&next, None, &mut c1, &opts).unwrap();
    let b = m.forward_step_merged(&next, None, &mut c2, &merged).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4);
}

#[test]
fn differentiable_cache_matches_preallocated_cache() {
    let m = tiny(3);
    let (ids, _) = batch(&[seq(6, 9)]);
    let opts = ForwardOptions::default();
    let mut a = KvCache::new(&m, 1);
    let mut b = KvCache::with_capacity(&m, 1, 16);
    for s in 0..6 {
        let x = ids.narrow(1, s, 1).unwrap();
        let ha = m.forward_step(&x, None, &mut a, &opts).unwrap();
        let hb = m.forward_step(&x, None, &mut b, &opts).unwrap();
        assert!(max_abs_diff(&ha, &hb) < 1e-6);
    }
}

#[test]
fn gradients_flow_through_a_cached_prefix() {
    // Prompt once, expanded to two continuations: the gradient equals that of two full passes.
    let mut m = tiny(14);
    m.add_adapter_seeded("pi", &LoraConfig::default(), 1).unwrap();
    randomize_b(&m, "pi", 2);
    let prompt = vec![4u32, 8, 15, 16];
    let conts = [vec![23u32, 42], vec![99u32, 7]];
    let opts = ForwardOptions { adapter: Some("pi"), track_grad: true, dropout_seed: None };
    let loss_of =
        |logits: &Tensor| candle_nn::ops::log_softmax(logits, D::Minus1).unwrap().sqr().unwrap().sum_all().unwrap();

    let mut cache = KvCache::new(&m, 1);
    let (p_ids, _) = batch(std::slice::from_ref(&prompt));
    m.forward_step(&p_ids, None, &mut cache, &opts).unwrap();
    cache.select_rows(&[0, 0]).unwrap();
    let (c_ids, _) = batch(&conts);
    let h = m.forward_step(&c_ids, None, &mut cache, &opts).unwrap();
    let shared = loss_of(&m.logits(&h).unwrap()).backward().unwrap();

    let full: Vec<Vec<u32>> = conts.iter().map(|c| prompt.iter().chain(c).copied().collect()).collect();
    let (f_ids, _) = batch(&full);
    let logits = m.forward(&f_ids, None, Some("pi")).unwrap().narrow(1, 4, 2).unwrap();
    let separate = loss_of(&logits).backward().unwrap();
    for v in m.adapter_vars("pi") {
        let a = shared.get(v.as_tensor()).unwrap();
        let b = separate.get(v.as_tensor()).unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs_diff(a, b) <= 1e-4 * (1.0 + scale));
    }
}

/// Gives every B of an adapter random values (a fresh adapter has B = 0).
pub(crate) fn randomize_b(m: &Llama, name: &str, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for v in m.adapter_vars(name).iter().skip(1).step_by(2) {
        let r: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        v.set(&Tensor::from_vec(r, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
}

#[test]
fn zero_initialised_adapter_leaves_logits_unchanged() {
    let mut m = tiny(4);
    m.add_adapter("q", &LoraConfig::default()).unwrap();
    let (ids, mask) = batch(&[seq(7, 5), seq(4, 8)]);
    let base = m.forward(&ids, Some(&mask), None).unwrap();
    // Tracked for gradients: the differentiable RMSNorm/softmax/rotary path.
    let adapted = m.forward(&ids, Some(&mask), Some("q")).unwrap();
    assert!(adapted.track_op());
    assert!(max_abs_diff(&base, &adapted) < 1e-5);
    // A nonzero update changes the logits, identically in the fused and differentiable paths.
    randomize_b(&m, "q", 1);
    let tracked = m.forward(&ids, Some(&mask), Some("q")).unwrap();
    let opts = ForwardOptions { adapter: Some("q"), track_grad: false, dropout_seed: None };
    let fused = m.logits(&m.forward_hidden(&ids, Some(&mask), &opts).unwrap()).unwrap();
    assert!(!fused.track_op());
    assert!(max_abs_diff(&base, &tracked) > 1e-3);
    assert!(max_abs_diff(&fused, &tracked) < 1e-4);
}

#[test]
fn gradients_reach_only_the_selected_adapter() {
    let mut m = tiny(5);
    let cfg = LoraConfig { targets: vec![Projection::Q, Projection::V, Projection::Down], ..LoraConfig::default() };
    m.add_adapter_seeded("pi", &cfg, 1).unwrap();
    m.add_adapter_seeded("q", &cfg, 2).unwrap();
    randomize_b(&m, "pi", 3);
    let (ids, mask) = batch(&[seq(5, 2), seq(3, 4)]);
    let logits = m.forward(&ids, Some(&mask), Some("pi")).unwrap();
    let loss = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let pi = m.adapter_vars("pi");
    assert_eq!(pi.len(), 2 * 3 * 2);
    for v in &pi {
        let g = grads.get(v.as_tensor()).expect("every var of the selected adapter has a gradient");
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "zero gradient");
    }
    for v in m.adapter_vars("q") {
        assert!(grads.get(v.as_tensor()).is_none(), "gradient reached another adapter");
    }
    let w = m.weights();
    let base = [&w.embed, &w.norm, &w.blocks[0].proj[0], &w.blocks[1].attn_norm];
    for t in base {
        assert!(grads.get(t).is_none(), "gradient reached a base weight");
    }
    // With B = 0 (fresh adapter) A's gradient is exactly zero and B's is not.
    let logits = m.forward(&ids, Some(&mask), Some("q")).unwrap();
    let grads = logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let q = m.adapter_vars("q");
    let norm = |v: &candle_core::Var| {
        grads.get(v.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(norm(&q[0]), 0.0);
    assert!(norm(&q[1]) > 0.0);
}

#[test]
fn gradient_matches_finite_difference() {
    // The differentiable RMSNorm / softmax / rotary composition gives the true gradient.
    let mut m = tiny(6);
    let cfg = LoraConfig { targets: vec![Projection::K], rank: 2, ..LoraConfig::default() };
    m.add_adapter_seeded("a", &cfg, 1).unwrap();
    randomize_b(&m, "a", 2);
    let (ids, mask) = batch(&[seq(6, 1), seq(4, 3)]);
    let loss_of = |m: &Llama| -> Tensor {
        let l = m.forward(&ids, Some(&mask), Some("a")).unwrap();
        candle_nn::ops::log_softmax(&l, D::Minus1).unwrap().narrow(2, 5, 1).unwrap().sum_all().unwrap()
    };
    let grads = loss_of(&m).backward().unwrap();
    let var = &m.adapter_vars("a")[0]; // layer 0, A of k_proj
    let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let orig = var.as_detached_tensor().copy().unwrap();
    let flat = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eps = 1e-2f32;
    for idx in [0usize, 17, 40] {
        let mut plus = flat.clone();
        plus[idx] += eps;
        var.set(&Tensor::from_vec(plus, orig.shape(), &Device::Cpu).unwrap()).unwrap();
        let lp = loss_of(&m).to_scalar::<f32>().unwrap();
        let mut minus = flat.clone();
        minus[idx] -= eps;
        var.set(&Tensor::from_vec(minus, orig.shape(), &Device::Cpu).unwrap()).unwrap();
        let lm = loss_of(&m).to_scalar::<f32>().unwrap();
        var.set(&orig).unwrap();
        let fd = (lp - lm) / (2.0 * eps);
        assert!((fd - g[idx]).abs() < 2e-3 + 2e-2 * fd.abs(), "index {idx}: analytic {} vs numeric {fd}", g[idx]);
    }
}

#[test]
fn polyak_update_follows_the_rule_exactly() {
    let mut m = tiny(7);
    m.add_adapter_seeded("q", &LoraConfig::default(), 1).unwrap();
    m.add_adapter_seeded("t", &LoraConfig::default(), 2).unwrap();
    randomize_b(&m, "q", 1);
    let before_t: Vec<Vec<f32>> =
        m.adapter_vars("t").iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
    let src: Vec<Vec<f32>> = m.adapter_vars("q").iter().map(|v| v.flatten_all().unwrap().to_vec1().unwrap()).collect();
    let lambda = 0.995;
    m.polyak_update("t", "q", lambda).unwrap();
    for ((v, t0), s) in m.adapter_vars("t").iter().zip(&before_t).zip(&src) {
        let got: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        for ((g, a), b) in got.iter().zip(t0).zip(s) {
            let want = a * lambda as f32 + b * (1.0 - lambda) as f32;
            assert!((g - want).abs() <= 1e-7 * (1.0 + want.abs()), "{g} vs {want}");
        }
    }
    // lambda = 0 copies the source; the source is untouched.
    m.polyak_update("t", "q", 0.0).unwrap();
    for (v, s) in m.adapter_vars("t").iter().zip(&src) {
        assert_eq!(&v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), s);
    }
    assert!(m.polyak_update("t", "q", 1.5).is_err());
    assert!(matches!(m.polyak_update("t", "nope", 0.5), Err(ModelError::UnknownAdapter(_))));
}

#[test]
fn copied_adapter_is_independent() {
    let mut m = tiny(8);
    m.add_adapter_seeded("q", &LoraConfig::default(), 1).unwrap();
    randomize_b(&m, "q", 1);
    m.copy_adapter("q", "target").unwrap();
    let (ids, _) = batch(&[seq(4, 1)]);
    let a = m.forward(&ids, None, Some("q")).unwrap();
    let b = m.forward(&ids, None, Some("target")).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Changing the source leaves the copy alone.
    randomize_b(&m, "q", 2);
    let b2 = m.forward(&ids, None, Some("target")).unwrap();
    assert_eq!(max_abs_diff(&b, &b2), 0.0);
    // Copying onto an existing adapter overwrites it in place (same Vars).
    let vars = m.adapter_vars("target");
    m.copy_adapter("q", "target").unwrap();
    let q_b = m.adapter_vars("q")[1].as_detached_tensor();
    assert_eq!(max_abs_diff(vars[1].as_tensor(), &q_b), 0.0, "the old handle sees the copy");
    let c = m.forward(&ids, None, Some("q")).unwrap();
    let d = m.forward(&ids, None, Some("target")).unwrap();
    assert_eq!(max_abs_diff(&c, &d), 0.0);
    m.remove_adapter("q").unwrap();
    assert_eq!(m.adapter_names(), vec!["target".to_string()]);
    assert!(m.forward(&ids, None, Some("q")).is_err());
    assert!(m.adapter_vars("q").is_empty());
    assert!(matches!(m.add_adapter("target", &LoraConfig::default()), Err(ModelError::AdapterExists(_))));
}

#[test]
fn grouped_query_attention_equals_repeated_heads() {
    // A model with kv heads = query heads whose K/V weights repeat the GQA model's must give
    // the same logits.
    let gqa = tiny(9);
    let mut cfg = gqa.config().clone();
    cfg.num_key_value_heads = cfg.num_attention_heads;
    let mut w = gqa.weights().clone();
    let hd = cfg.head_dim;
    for b in w.blocks.iter_mut() {
        for p in [Projection::K, Projection::V] {
            let t = &b.proj[p as usize];
            let heads: Vec<Tensor> = (0..4).map(|h| t.narrow(0, (h / 2) * hd, hd).unwrap()).collect();
            b.proj[p as usize] = Tensor::cat(&heads, 0).unwrap();
        }
    }
    let mha = Llama::new(cfg, w).unwrap();
    let (ids, mask) = batch(&[seq(5, 1), seq(3, 2)]);
    let a = gqa.forward(&ids, Some(&mask), None).unwrap();
    let b = mha.forward(&ids, Some(&mask), None).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn rotary_frequencies_follow_the_formula() {
    let mut cfg = LlamaConfig::tiny(10);
    cfg.rope_theta = 100.0;
    cfg.head_dim = 4;
    cfg.hidden_size = 16;
    // 1 / 100^(0/4), 1 / 100^(2/4)
    assert_eq!(cfg.inv_freq(), vec![1.0, 0.1]);
    cfg.rope_scaling = Some(Llama3RopeScaling {
        factor: 8.0,
        high_freq_factor: 4.0,
        low_freq_factor: 1.0,
        original_max_position_embeddings: 64,
    });
    // wavelengths 2π (< 64/4: kept) and 20π ≈ 62.8 (between 16 and 64: smoothed)
    let inv = cfg.inv_freq();
    assert_eq!(inv[0], 1.0);
    let wl = 2.0 * std::f32::consts::PI / 0.1;
    let smooth = (64.0 / wl - 1.0) / 3.0;
    let want = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
    assert!((inv[1] - want).abs() < 1e-7);
}

#[test]
fn bf16_base_with_f32_adapters_trains() {
    // The CUDA configuration (bf16 base, f32 master adapters), exercised on the CPU.
    let m32 = tiny(15);
    let w = m32.weights();
    let to16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let w16 = LlamaWeights {
        embed: to16(&w.embed),
        blocks: w
            .blocks
            .iter()
            .map(|b| BlockWeights {
                attn_norm: to16(&b.attn_norm),
                proj: b.proj.clone().map(|p| to16(&p)),
                mlp_norm: to16(&b.mlp_norm),
            })
            .collect(),
        norm: to16(&w.norm),
        lm_head: w.lm_head.as_ref().map(to16),
    };
    let mut m16 = Llama::new(m32.config().clone(), w16).unwrap();
    assert_eq!(m16.dtype(), DType::BF16);
    m16.add_adapter_seeded("pi", &LoraConfig::default(), 1).unwrap();
    randomize_b(&m16, "pi", 2);
    let (ids, mask) = batch(&[seq(6, 1), seq(3, 2)]);
    let logits = m16.forward(&ids, Some(&mask), Some("pi")).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let grads = logits.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    for v in m16.adapter_vars("pi") {
        assert_eq!(v.dtype(), DType::F32);
        assert_eq!(grads.get(v.as_tensor()).unwrap().dtype(), DType::F32);
    }
    let base16 = m16.forward(&ids, Some(&mask), None).unwrap();
    let base32 = m32.forward(&ids, Some(&mask), None).unwrap();
    assert!(max_abs_diff(&base16, &base32) < 0.05);
    let opts = ForwardOptions { adapter: Some("pi"), track_grad: false, dropout_seed: None };
    let mut cache = KvCache::with_capacity(&m16, 2, 8);
    m16.forward_step(&ids, Some(&mask), &mut cache, &opts).unwrap();
    let next = Tensor::new(&[[3u32], [4]], &Device::Cpu).unwrap();
    assert_eq!(m16.forward_step(&next, None, &mut cache, &opts).unwrap().dims(), [2, 1, 64]);
}

#[test]
fn inconsistent_weights_are_rejected() {
    let m = tiny(10);
    let mut w = m.weights().clone();
    w.blocks[1].proj[Projection::Up as usize] = Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap();
    let err = Llama::new(m.config().clone(), w).unwrap_err().to_string();
    assert!(err.contains("layer 1 up_proj"), "{err}");
    let mut cfg = LlamaConfig::tiny(10);
    cfg.num_key_value_heads = 3;
    assert!(cfg.validate().is_err());
}

#[test]
fn the_model_counts_the_work_of_each_pass_and_of_the_backward_passes_it_tracks() {
    let mut m = tiny(3);
    let c = m.config().clone();
    let (b, t) = (2, 5);
    let ids = Tensor::from_vec([seq(t, 1), seq(t, 9)].concat(), (b, t), &Device::Cpu).unwrap();
    let pass = c.pass_flops(b, t, 0);
    let head = c.head_flops(b * t);

    // The frozen base: nothing to differentiate, no backward work.
    let before = m.flops();
    m.forward(&ids, None, None).unwrap();
    assert_eq!(m.flops() - before, Flops { forward: pass.forward() + head, backward: 0.0 });

    // An adapter tracked for training: its backward pass is counted too, the head's included.
    m.add_adapter_seeded("pi", &LoraConfig::default(), 1).unwrap();
    let before = m.flops();
    m.forward(&ids, None, Some("pi")).unwrap();
    let want = Flops { forward: pass.forward() + head, backward: pass.backward() + head };
    assert_eq!(m.flops() - before, want);

    // A cached step: three new tokens after the five, one row.
    let mut cache = KvCache::new(&m, 1);
    let opts = ForwardOptions::default();
    let first = Tensor::from_vec(seq(t, 1), (1, t), &Device::Cpu).unwrap();
    m.forward_step(&first, None, &mut cache, &opts).unwrap();
    let before = m.flops();
    let next = Tensor::from_vec(seq(3, 20), (1, 3), &Device::Cpu).unwrap();
    m.forward_step(&next, None, &mut cache, &opts).unwrap();
    assert_eq!(m.flops() - before, Flops { forward: c.pass_flops(1, 3, t).forward(), backward: 0.0 });
}

/// The adapter's gradients of a loss that weighs every row and position differently, over a
/// padded batch, in `adapter_vars` order; and the pass's logits.
fn weighted_loss_grads(m: &Llama) -> (Tensor, Vec<Tensor>) {
    let (ids, mask) = batch(&[(1..9).collect(), (20..25).collect()]);
    let opts = ForwardOptions { adapter: Some("a"), track_grad: true, dropout_seed: None };
    let logits = m.logits(&m.forward_hidden(&ids, Some(&mask), &opts).unwrap()).unwrap();
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let w = Tensor::arange(0f32, lp.elem_count() as f32, &Device::Cpu).unwrap().reshape(lp.shape()).unwrap();
    let loss = (lp * (w * 1e-3).unwrap().sin().unwrap()).unwrap().sum_all().unwrap();
    let g = m.backward(&loss).unwrap();
    let grads = m.adapter_vars("a").iter().map(|v| g.get(v.as_tensor()).expect("a gradient").clone()).collect();
    (logits, grads)
}

/// ‖a − b‖ / ‖b‖.
fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let n = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    n(&(a - b).unwrap()) / n(b)
}

/// bf16 products (crate::bf16) against f32 on the same model: every adapter gradient within 3%
/// (relative L2; measured 0.4-0.8% in the last layers, 1.7-1.8% in the first, whose gradients
/// come back through every layer's bf16 products), the logits within 0.05, and not equal (the bf16
/// products ran); activation checkpointing recomputes in bf16 too (same gradients as without);
/// back to f32 gives the f32 results exactly.
#[test]
fn bf16_products_keep_gradients_within_three_percent_of_f32() {
    let cfg = LlamaConfig { num_hidden_layers: 4, ..LlamaConfig::tiny(300) };
    let mut m = Llama::random(cfg, 8, &Device::Cpu, DType::F32).unwrap();
    m.add_adapter_seeded("a", &LoraConfig::default(), 2).unwrap();
    randomize_b(&m, "a", 3);
    let (logits32, grads32) = weighted_loss_grads(&m);
    m.set_matmul_precision(crate::bf16::MatmulPrecision::Bf16).expect(crate::bf16::NO_BF16_BLAS);
    let (logits16, grads16) = weighted_loss_grads(&m);
    let d = max_abs_diff(&logits16, &logits32);
    assert!(d > 0.0 && d < 0.05, "logits differ by {d}");
    for (i, (g16, g32)) in grads16.iter().zip(&grads32).enumerate() {
        let e = rel_l2(g16, g32);
        assert!(e > 0.0 && e < 0.03, "factor {i}: relative error {e}");
    }
    m.set_activation_checkpointing(true);
    let (_, checkpointed) = weighted_loss_grads(&m);
    for (i, (c, g16)) in checkpointed.iter().zip(&grads16).enumerate() {
        assert!(rel_l2(c, g16) < 1e-5, "factor {i}: the recomputation used other products");
    }
    m.set_activation_checkpointing(false);
    m.set_matmul_precision(crate::bf16::MatmulPrecision::F32).unwrap();
    let (logits, _) = weighted_loss_grads(&m);
    assert_eq!(max_abs_diff(&logits, &logits32), 0.0);
}
