//! Counting the floating-point work of the matrix products a model runs, so that a benchmark
//! can say what fraction of the machine's matrix-product peak an update reaches.
//!
//! Only the products are counted (a multiply and an add are two operations): the seven
//! projections of every layer, attention's two products over the keys each query sees, and the
//! output layer. Element-wise work (norms, rotary, softmax) and LoRA's rank-r products (under
//! 2% of a pass at rank 8 on SmolLM2-135M) are left out. Padded positions count: they are
//! computed.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{LlamaConfig, Projection};

/// Operations of the forward and backward passes run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flops {
    pub forward: f64,
    pub backward: f64,
}

impl Flops {
    /// Both directions together.
    pub fn total(&self) -> f64 {
        self.forward + self.backward
    }
}

impl std::ops::Sub for Flops {
    type Output = Flops;
    fn sub(self, rhs: Flops) -> Flops {
        Flops { forward: self.forward - rhs.forward, backward: self.backward - rhs.backward }
    }
}

/// The products of one pass through the decoder blocks, split by kind because their backward
/// passes cost differently (see [`PassFlops::backward`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassFlops {
    /// The seven projections of every layer.
    pub projections: f64,
    /// Scores `q·kᵀ` and the weighted sum of values.
    pub attention: f64,
}

impl PassFlops {
    /// The forward pass's operations.
    pub fn forward(&self) -> f64 {
        self.projections + self.attention
    }

    /// The backward pass's, with the base weights frozen: a projection multiplies its output's
    /// gradient by the weight once (the input's gradient; no weight gradient), and attention
    /// recomputes its scores and runs four products (gradients of the probabilities, values,
    /// queries and keys), 2.5 times its forward work.
    pub fn backward(&self) -> f64 {
        self.projections + 2.5 * self.attention
    }
}

impl LlamaConfig {
    /// The products of running `new` tokens in each of `rows` sequences after `cached` tokens
    /// each (causal: the i-th new token sees `cached + i + 1` keys).
    pub fn pass_flops(&self, rows: usize, new: usize, cached: usize) -> PassFlops {
        let weights: usize = Projection::ALL
            .iter()
            .map(|p| {
                let (i, o) = p.dims(self);
                i * o
            })
            .sum();
        let tokens = (rows * new) as f64;
        let layers = self.num_hidden_layers as f64;
        let keys = rows as f64 * (new as f64 * cached as f64 + (new * (new + 1)) as f64 / 2.0);
        PassFlops {
            projections: 2.0 * tokens * weights as f64 * layers,
            attention: 4.0 * keys * (self.num_attention_heads * self.head_dim) as f64 * layers,
        }
    }

    /// The output layer's product for `rows` hidden states.
    pub fn head_flops(&self, rows: usize) -> f64 {
        2.0 * rows as f64 * (self.hidden_size * self.vocab_size) as f64
    }
}

/// A running count, shared by the threads that use one model. Stored as whole operations in
/// `u64` (2^64 operations is centuries of a CPU's work).
#[derive(Debug, Default)]
pub(crate) struct FlopCounter {
    forward: AtomicU64,
    backward: AtomicU64,
}

impl FlopCounter {
    /// Adds a pass's forward work, and its backward work when the pass tracks gradients (the
    /// backward pass is then counted before it runs: training loops run it for every pass that
    /// tracks).
    pub(crate) fn add(&self, forward: f64, backward: Option<f64>) {
        self.forward.fetch_add(forward as u64, Ordering::Relaxed);
        if let Some(b) = backward {
            self.backward.fetch_add(b as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn get(&self) -> Flops {
        Flops {
            forward: self.forward.load(Ordering::Relaxed) as f64,
            backward: self.backward.load(Ordering::Relaxed) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_counts_every_projection_weight_twice_per_token_and_causal_keys() {
        // tiny: per layer q 64·64, k and v 64·32, o 64·64, gate and up 64·128, down 128·64
        // = 36,864 weights; 2 layers. Attention: 4 heads of 16.
        let c = LlamaConfig::tiny(100);
        let p = c.pass_flops(2, 3, 5);
        // 2 rows × 3 tokens × 2 × 36,864 × 2 layers.
        assert_eq!(p.projections, 884_736.0);
        // Keys per row: 3·5 + (1 + 2 + 3) = 21; 2 rows; 4 operations × 64 × 2 layers per key.
        assert_eq!(p.attention, 21_504.0);
        assert_eq!(p.forward(), 906_240.0);
        assert_eq!(p.backward(), 884_736.0 + 53_760.0);
        // Output layer: 2 × 6 rows × 64 × 100.
        assert_eq!(c.head_flops(6), 76_800.0);
    }

    #[test]
    fn the_counter_adds_backward_work_only_for_tracked_passes() {
        let c = FlopCounter::default();
        c.add(10.0, None);
        c.add(5.0, Some(7.0));
        let before = Flops { forward: 10.0, backward: 0.0 };
        assert_eq!(c.get(), Flops { forward: 15.0, backward: 7.0 });
        assert_eq!((c.get() - before).total(), 12.0);
    }
}
