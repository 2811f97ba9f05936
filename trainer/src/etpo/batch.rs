//! Batching token sequences of different lengths for one forward pass, and picking out the
//! positions whose next-token distributions a loss needs.

use candle_core::{DType, Tensor};

use super::TrainError;
use crate::model::{ForwardOptions, KvCache, Llama};

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
///
/// Spans that share their prefix up to the first requested row (actions sampled from the same
/// state) run that prefix once: it goes through the model as one row per distinct prefix, its
/// key/value cache is repeated for each span, and only the action tokens run per span;
/// gradients flow back through the shared prefix (facts.md: about 7x fewer FLOPs for 300-token
/// prompts and 30-token actions). Without shared prefixes the sequences are left-padded into one
/// batch.
pub(crate) fn hidden_rows(
    model: &Llama,
    spans: &[RowSpan],
    adapter: Option<&str>,
    track_grad: bool,
    share_prefixes: bool,
) -> Result<Tensor, TrainError> {
    let mut prefixes: Vec<&[u32]> = Vec::new();
    let mut prefix_of = Vec::with_capacity(spans.len());
    for s in spans {
        let p = &s.tokens[..=s.start];
        let i = prefixes.iter().position(|q| *q == p).unwrap_or_else(|| {
            prefixes.push(p);
            prefixes.len() - 1
        });
        prefix_of.push(i);
    }
    let opts = ForwardOptions { adapter, track_grad, dropout_seed: None };
    if !share_prefixes || prefixes.len() == spans.len() {
        return padded_hidden_rows(model, spans, &opts);
    }
    let device = model.device();
    // The distinct prefixes, left-padded.
    let (ids, mask) = left_pad(&prefixes);
    let (k, tp) = (prefixes.len(), prefixes.iter().map(|p| p.len()).max().unwrap_or(0));
    let mut cache = KvCache::new(model, k);
    let ids = Tensor::from_vec(ids, (k, tp), device)?;
    let mask = Tensor::from_vec(mask, (k, tp), device)?;
    let prefix_hidden = model.forward_step(&ids, Some(&mask), &mut cache, &opts)?;
    let h = prefix_hidden.dim(2)?;
    let last_rows = prefix_hidden.narrow(1, tp - 1, 1)?.squeeze(1)?; // [k, H]
                                                                     // The rest of each span (the action tokens whose rows are needed), right-padded.
    let b = spans.len();
    let rests: Vec<&[u32]> = spans.iter().map(|s| &s.tokens[s.start + 1..s.start + s.len]).collect();
    let ta = rests.iter().map(|r| r.len()).max().unwrap_or(0);
    let rest_hidden = if ta > 0 {
        cache.select_rows(&prefix_of)?;
        let mut ids = vec![0u32; b * ta];
        let mut mask = vec![0u8; b * ta];
        for (i, r) in rests.iter().enumerate() {
            ids[i * ta..i * ta + r.len()].copy_from_slice(r);
            mask[i * ta..i * ta + r.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (b, ta), device)?;
        let mask = Tensor::from_vec(mask, (b, ta), device)?;
        Some(model.forward_step(&ids, Some(&mask), &mut cache, &opts)?.reshape((b * ta, h))?)
    } else {
        None
    };
    // Rows in span order: the prefix's last row, then the span's own rows.
    let mut pieces = Vec::with_capacity(2 * b);
    for (i, s) in spans.iter().enumerate() {
        pieces.push(last_rows.narrow(0, prefix_of[i], 1)?);
        if s.len > 1 {
            if let Some(rest) = &rest_hidden {
                pieces.push(rest.narrow(0, i * ta, s.len - 1)?);
            }
        }
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

/// Left-pads sequences to the longest: ids and mask, row-major.
fn left_pad(seqs: &[&[u32]]) -> (Vec<u32>, Vec<u8>) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; seqs.len() * t];
    let mut mask = vec![0u8; seqs.len() * t];
    for (i, s) in seqs.iter().enumerate() {
        let pad = t - s.len();
        ids[i * t + pad..(i + 1) * t].copy_from_slice(s);
        mask[i * t + pad..(i + 1) * t].fill(1);
    }
    (ids, mask)
}

/// [`hidden_rows`] without prefix sharing: whole sequences, left-padded into one batch.
fn padded_hidden_rows(model: &Llama, spans: &[RowSpan], opts: &ForwardOptions) -> Result<Tensor, TrainError> {
    let device = model.device();
    let seqs: Vec<&[u32]> = spans.iter().map(|s| s.tokens.as_slice()).collect();
    let (ids, mask) = left_pad(&seqs);
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let b = spans.len();
    let mut rows = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        let pad = t - s.tokens.len();
        rows.extend((s.start..s.start + s.len).map(|p| (i * t + pad + p) as u32));
    }
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let padded = spans.iter().any(|s| s.tokens.len() < t);
    let mask = if padded { Some(Tensor::from_vec(mask, (b, t), device)?) } else { None };
    let hidden = model.forward_hidden(&ids, mask.as_ref(), opts)?;
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
    share_prefixes: bool,
) -> Result<Tensor, TrainError> {
    let hidden = hidden_rows(model, spans, adapter, track_grad, share_prefixes)?;
    let logits = model.logits(&hidden)?;
    Ok(if track_grad { logits } else { logits.detach() })
}

/// Log-probabilities (detached) from final hidden states `[rows, hidden]`: the output layer and
/// a log-softmax. Kept hidden states are how the ETPO update reads a distribution again without
/// keeping `[rows × vocabulary]` tensors (the output layer is frozen, so they determine it).
pub(crate) fn logp_from_hidden(model: &Llama, hidden: &Tensor) -> Result<Tensor, TrainError> {
    Ok(super::math::log_softmax(&model.logits(&hidden.detach())?)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use candle_core::{DType, Device};

    fn tiny() -> Llama {
        let cfg = LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny(12) };
        let mut m = Llama::random(cfg, 5, &Device::Cpu, DType::F32).unwrap();
        m.add_adapter_seeded("a", &crate::lora::LoraConfig::default(), 1).unwrap();
        // Non-zero B so that the adapter matters.
        for v in m.adapter_vars("a") {
            let r = Tensor::rand(-0.1f32, 0.1, v.shape(), &Device::Cpu).unwrap();
            v.set(&(v.as_tensor() + r).unwrap()).unwrap();
        }
        m
    }

    /// Each span alone, unpadded.
    fn one_by_one(model: &Llama, spans: &[RowSpan], adapter: Option<&str>) -> Tensor {
        let opts = ForwardOptions { adapter, track_grad: false, dropout_seed: None };
        let rows: Vec<Tensor> =
            spans.iter().map(|s| padded_hidden_rows(model, std::slice::from_ref(s), &opts).unwrap()).collect();
        Tensor::cat(&rows, 0).unwrap()
    }

    #[test]
    fn shared_prefixes_give_the_same_rows_and_gradients_as_separate_sequences() {
        let model = tiny();
        let spans = vec![
            RowSpan::action(&[1, 2, 3], &[4, 5, 6]),
            RowSpan::action(&[7, 8], &[9]),
            RowSpan::action(&[1, 2, 3], &[10]),
            RowSpan::state(&[7, 8]),
            RowSpan::action(&[1, 2, 3], &[4, 11]),
        ];
        for adapter in [None, Some("a")] {
            let shared = hidden_rows(&model, &spans, adapter, false, true).unwrap();
            let alone = one_by_one(&model, &spans, adapter);
            assert_eq!(shared.dims(), &[8, model.config().hidden_size]);
            let d = (shared - alone).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "{adapter:?}: {d}");
        }
        // Gradients through the shared prefix equal those of the padded batch.
        let vars = model.adapter_vars("a");
        let grad_of = |h: Tensor| {
            let g = h.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            g.get(vars[0].as_tensor()).unwrap().flatten_all().unwrap()
        };
        let opts = ForwardOptions { adapter: Some("a"), track_grad: true, dropout_seed: None };
        let g1 = grad_of(hidden_rows(&model, &spans, Some("a"), true, true).unwrap());
        let g2 = grad_of(padded_hidden_rows(&model, &spans, &opts).unwrap());
        let d = (&g1 - &g2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = g2.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.0 && d < 1e-4 * scale.max(1.0), "{d} vs {scale}");
    }
}
