//! Activation checkpointing (`Llama::set_activation_checkpointing`) keeps the memory of a
//! training step from growing with everything each decoder block computes: per added block, an
//! ETPO update's peak grows by a fraction of what it grows by without it (issue 21: the 7B model
//! on a 24 GB GPU).
//!
//! Measured with the counting global allocator of `support/counting_alloc.rs`, in a test binary
//! of its own with a single test.

use candle_core::{DType, Device};
use trainer::etpo::{EtpoConfig, EtpoTrainer, Transition};
use trainer::model::{Llama, LlamaConfig};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

const VOCAB: usize = 512;

/// Eight actions of 48 tokens from two states of 32: the prompts run once per state.
fn batch() -> Vec<Transition> {
    let token = |i: usize, j: usize| ((i * 131 + j * 17 + 5) % VOCAB) as u32;
    (0..8)
        .map(|i| Transition {
            state: (0..32).map(|j| token(i % 2, j)).collect(),
            action: (0..48).map(|j| token(i + 100, j)).collect(),
            reward: if i % 2 == 0 { 1.0 } else { -1.0 },
            next_state: None,
            group: None,
        })
        .collect()
}

/// Bytes allocated at the peak of one ETPO update on a fresh model of `layers` blocks, above
/// what was allocated when it started.
fn update_peak(layers: usize, checkpointing: bool) -> usize {
    let cfg = LlamaConfig {
        hidden_size: 128,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        num_hidden_layers: layers,
        ..LlamaConfig::tiny(VOCAB)
    };
    let mut model = Llama::random(cfg, 3, &Device::Cpu, DType::F32).expect("model");
    model.set_activation_checkpointing(checkpointing);
    let mut trainer =
        EtpoTrainer::new(&mut model, EtpoConfig { micro_batch: 4, ..Default::default() }).expect("trainer");
    let b = batch();
    counting_alloc::peak_of(|| {
        trainer.update(&model, &b).expect("update");
    })
}

#[test]
fn checkpointing_cuts_what_each_block_adds_to_an_updates_peak() {
    update_peak(1, false); // warm-up: thread pools and caches built lazily are not counted
    let (few, many) = (2usize, 8usize);
    let per_block = |on: bool| {
        let (p0, p1) = (update_peak(few, on), update_peak(many, on));
        let per = (p1 as f64 - p0 as f64) / (many - few) as f64;
        eprintln!(
            "activation checkpointing {}: peak {:.2} MB with {few} blocks, {:.2} MB with {many}: {:.0} KB per block",
            if on { "on" } else { "off" },
            p0 as f64 / 1e6,
            p1 as f64 / 1e6,
            per / 1e3
        );
        per
    };
    let (off, on) = (per_block(false), per_block(true));
    // What a checkpointed block keeps per token of a micro-batch: its output and new keys and
    // values (128 + 2 × 64 floats), the cache's copies of those keys and values, and its input
    // during its own backward pass; without checkpointing, every norm, projection, rotary and
    // feed-forward intermediate.
    assert!(on > 0.0 && on < 0.4 * off, "{on:.0} against {off:.0} bytes per block");
}
