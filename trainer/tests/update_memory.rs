//! The peak memory of an ETPO update grows with the batch's tokens times the model's width, not
//! times its vocabulary: no `[action tokens × vocabulary]` tensor outlives its micro-batch
//! (issue 21; `EtpoTrainer::update`'s doc says what is kept and what is recomputed).
//!
//! Measured with the counting global allocator of `support/counting_alloc.rs`, which is why
//! this is a test binary of its own with a single test: nothing else may allocate beside it.

use candle_core::{DType, Device};
use trainer::etpo::{EtpoConfig, EtpoTrainer, Transition};
use trainer::model::{Llama, LlamaConfig};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

const VOCAB: usize = 4096;
const STATE_TOKENS: usize = 12;
const ACTION_TOKENS: usize = 24;

/// `n` transitions with distinct states (no prefix sharing) and distinct next states, so the
/// update also computes the next states' values.
fn batch(n: usize) -> Vec<Transition> {
    let token = |i: usize, j: usize| ((i * 131 + j * 17 + 5) % VOCAB) as u32;
    (0..n)
        .map(|i| Transition {
            state: (0..STATE_TOKENS).map(|j| token(i, j)).collect(),
            action: (0..ACTION_TOKENS).map(|j| token(i + 1000, j)).collect(),
            reward: if i % 2 == 0 { 1.0 } else { -1.0 },
            next_state: Some((0..STATE_TOKENS).map(|j| token(i + 2000, j)).collect()),
            group: None,
        })
        .collect()
}

/// Bytes allocated at the peak of one update of a fresh trainer on `n` transitions, above what
/// was allocated when it started.
fn update_peak(n: usize) -> usize {
    let mut model = Llama::random(LlamaConfig::tiny(VOCAB), 3, &Device::Cpu, DType::F32).expect("tiny model");
    // The shipped defaults, in micro-batches of 2 sequences: the trust region and the
    // conservative term are on, as in a run.
    let cfg = EtpoConfig { micro_batch: 2, ..Default::default() };
    let mut trainer = EtpoTrainer::new(&mut model, cfg).expect("trainer");
    let b = batch(n);
    counting_alloc::peak_of(|| {
        trainer.update(&model, &b).expect("update");
    })
}

#[test]
fn an_updates_peak_memory_does_not_grow_with_tokens_times_vocabulary() {
    // One warm-up so that lazily built state (thread pools, caches) is not counted.
    update_peak(2);
    let sizes = [4usize, 8, 16];
    let peaks: Vec<usize> = sizes.iter().map(|&n| update_peak(n)).collect();
    // One [rows × vocabulary] f32 tensor kept per action token costs this much per token.
    let distribution_row = VOCAB * 4;
    for i in 1..sizes.len() {
        let (n0, n, p0, peak) = (sizes[i - 1], sizes[i], peaks[i - 1], peaks[i]);
        let tokens = (n - n0) * ACTION_TOKENS;
        let per_token = (peak as f64 - p0 as f64) / tokens as f64;
        eprintln!(
            "{n0} -> {n} transitions: peak {:.2} -> {:.2} MB, {per_token:.0} bytes per added action token \
             (one distribution row: {distribution_row})",
            p0 as f64 / 1e6,
            peak as f64 / 1e6
        );
        // The update used to keep three such rows per token (ρ's and π's log-probabilities and
        // Eq. 7's target) for the whole update: 3 × 16 KB per token here.
        assert!(
            per_token < 0.25 * distribution_row as f64,
            "the peak grew by {per_token:.0} bytes per action token from {n0} to {n} transitions, \
             against {distribution_row} for one kept distribution row: something of size \
             tokens × vocabulary outlives its micro-batch (peaks {peaks:?})"
        );
    }
}
