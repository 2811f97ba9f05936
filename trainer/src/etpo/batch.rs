//! Batching token sequences of different lengths for one forward pass, and picking out the
//! positions whose next-token distributions a loss needs.

use candle_core::{DType, Tensor};

use super::TrainError;
use crate::model::{ForwardOptions, Llama};

/// A token sequence and the run `start .. start + len` of positions whose rows are needed
/// (the row at position `p` is the distribution over the token at `p + 1`).
#[derive(Debug, Clone)]
pub(crate) struct RowSpan {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub len: usize,
}

impl RowSpan {
    /// The rows of an action after its state: the distributions over each action token,
    /// `(s), (s, w1), ..., (s, w1..w_{n-1})`.
    pub fn action(state: &[u32], action: &[u32]) -> RowSpan {
        let mut tokens = Vec::with_capacity(state.len() + action.len());
        tokens.extend_from_slice(state);
        tokens.extend_from_slice(action);
        RowSpan { tokens, start: state.len() - 1, len: action.len() }
    }

    /// The one row of a state: the distribution over the first token of the next action.
    pub fn state(state: &[u32]) -> RowSpan {
        RowSpan { tokens: state.to_vec(), start: state.len() - 1, len: 1 }
    }
}

/// Final hidden states at the requested rows of `spans`, concatenated in order: `[Σ len, H]`.
/// Sequences are left-padded into one batch.
pub(crate) fn hidden_rows(
    model: &Llama,
    spans: &[RowSpan],
    adapter: Option<&str>,
    track_grad: bool,
) -> Result<Tensor, TrainError> {
    let device = model.device();
    let t = spans.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    let b = spans.len();
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u8; b * t];
    let mut rows = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        let pad = t - s.tokens.len();
        ids[i * t + pad..(i + 1) * t].copy_from_slice(&s.tokens);
        mask[i * t + pad..(i + 1) * t].fill(1);
        rows.extend((s.start..s.start + s.len).map(|p| (i * t + pad + p) as u32));
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let padded = spans.iter().any(|s| s.tokens.len() < t);
    let mask = if padded { Some(Tensor::from_vec(mask, (b, t), device)?) } else { None };
    let opts = ForwardOptions { adapter, track_grad, dropout_seed: None };
    let hidden = model.forward_hidden(&ids, mask.as_ref(), &opts)?;
    let h = hidden.dim(2)?;
    let rows = Tensor::from_vec(rows, spans.iter().map(|s| s.len).sum::<usize>(), device)?;
    Ok(hidden.reshape((b * t, h))?.index_select(&rows, 0)?)
}

/// Logits (f32) at the requested rows of `spans`: `[Σ len, V]`.
pub(crate) fn logit_rows(
    model: &Llama,
    spans: &[RowSpan],
    adapter: Option<&str>,
    track_grad: bool,
) -> Result<Tensor, TrainError> {
    let hidden = hidden_rows(model, spans, adapter, track_grad)?;
    let logits = model.logits(&hidden)?;
    Ok(if track_grad { logits } else { logits.detach() })
}

/// Token ids as a `[N]` u32 tensor on the model's device.
pub(crate) fn token_tensor(model: &Llama, tokens: Vec<u32>) -> Result<Tensor, TrainError> {
    let n = tokens.len();
    Ok(Tensor::from_vec(tokens, n, model.device())?)
}

/// Accumulates gradients of `vars` from one backward pass into `acc`.
pub(crate) fn accumulate_grads(
    acc: &mut [Option<Tensor>],
    vars: &[candle_core::Var],
    grads: &candle_core::backprop::GradStore,
) -> Result<(), TrainError> {
    for (slot, v) in acc.iter_mut().zip(vars) {
        if let Some(g) = grads.get(v.as_tensor()) {
            let g = g.to_dtype(DType::F32)?;
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
        }
    }
    Ok(())
}
