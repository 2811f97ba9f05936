//! Language-model quality checks: token log-likelihood of a text, for the perplexity
//! comparison of the paper's Table 3 (does training leave the language model intact?).

use candle_core::Tensor;

use super::batch::{logit_rows, RowSpan};
use super::{math, TrainError};
use crate::model::Llama;

/// Summed negative log-likelihood of a token sequence and the number of predicted tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nll {
    /// `−Σ log p(t_i | t_<i)` in nats.
    pub sum: f64,
    /// Tokens predicted (every token after the first of each window).
    pub tokens: usize,
}

impl Nll {
    /// `exp(mean NLL)`; `NaN` when nothing was predicted.
    pub fn perplexity(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            (self.sum / self.tokens as f64).exp()
        }
    }
}

/// NLL of `tokens` under `model` with `adapter`, in consecutive windows of at most `window`
/// tokens (each window starts without context, the usual non-overlapping evaluation), `batch`
/// windows per forward pass.
pub fn negative_log_likelihood(
    model: &Llama,
    tokens: &[u32],
    adapter: Option<&str>,
    window: usize,
    batch: usize,
) -> Result<Nll, TrainError> {
    if window < 2 {
        return Err(TrainError::Config(format!("window must be at least 2 tokens, got {window}")));
    }
    let spans: Vec<RowSpan> = tokens
        .chunks(window)
        .filter(|w| w.len() >= 2)
        .map(|w| RowSpan { tokens: w.to_vec(), start: 0, len: w.len() - 1 })
        .collect();
    let mut out = Nll::default();
    for chunk in spans.chunks(batch.max(1)) {
        let targets: Vec<u32> = chunk.iter().flat_map(|s| s.tokens[1..].iter().copied()).collect();
        let n = targets.len();
        let targets = Tensor::from_vec(targets, n, model.device())?;
        let logp = math::log_softmax(&logit_rows(model, chunk, adapter, false, false)?)?;
        out.sum -=
            math::taken_values(&logp, &targets)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        out.tokens += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;
    use candle_core::{DType, Device};

    #[test]
    fn nll_matches_a_direct_computation() {
        let cfg = LlamaConfig { num_hidden_layers: 1, tie_word_embeddings: true, ..LlamaConfig::tiny(10) };
        let model = Llama::random(cfg, 1, &Device::Cpu, DType::F32).unwrap();
        let tokens = [1u32, 4, 2, 9, 0, 3, 3];
        // Windows of 3: [1 4 2] [9 0 3] [3] -> 2 + 2 predicted tokens, the last window none.
        let got = negative_log_likelihood(&model, &tokens, None, 3, 2).unwrap();
        assert_eq!(got.tokens, 4);
        let mut want = 0.0;
        for w in [[1u32, 4, 2], [9, 0, 3]] {
            let ids = Tensor::new(&w, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let lp = math::log_softmax(&model.forward(&ids, None, None).unwrap().squeeze(0).unwrap()).unwrap();
            let lp = lp.to_vec2::<f32>().unwrap();
            want -= lp[0][w[1] as usize] as f64 + lp[1][w[2] as usize] as f64;
        }
        assert!((got.sum - want).abs() < 1e-4, "{} vs {want}", got.sum);
        // A random model over 10 tokens is close to uniform: perplexity near 10.
        assert!((got.perplexity() - 10.0).abs() < 1.0, "{}", got.perplexity());
        assert!(negative_log_likelihood(&model, &tokens, None, 1, 2).is_err());
    }
}
