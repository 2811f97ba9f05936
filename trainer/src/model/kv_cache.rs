//! The key/value cache of incremental decoding.

use candle_core::Tensor;

use super::Llama;
use crate::error::{ModelError, Result};

/// Per-layer key/value cache for incremental decoding, with the attention mask and positions
/// of everything cached so far.
///
/// Two storage modes: [`KvCache::new`] concatenates (differentiable: gradients flow through a
/// cached prefix into the adapter that computed it), [`KvCache::with_capacity`] writes into a
/// pre-allocated buffer (fast generation, no gradients).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    capacity: Option<usize>,
    pub(super) len: usize,
    /// `mask[b][t]`: 1 when cached position `t` of row `b` is a real token.
    pub(super) mask: Vec<Vec<u8>>,
    /// Number of real tokens cached per row (the next position id).
    pub(super) next_pos: Vec<usize>,
}

impl KvCache {
    /// An empty, growing, differentiable cache for `batch` rows.
    pub fn new(model: &Llama, batch: usize) -> KvCache {
        KvCache {
            layers: vec![None; model.cfg.num_hidden_layers],
            capacity: None,
            len: 0,
            mask: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// An empty cache pre-allocated for `max_len` positions (grows by `max_len` when exceeded).
    /// Writes copy into the buffer, so no gradient flows through it.
    pub fn with_capacity(model: &Llama, batch: usize, max_len: usize) -> KvCache {
        let mut c = KvCache::new(model, batch);
        c.capacity = Some(max_len.max(1));
        c
    }

    /// Number of cached positions (including padding).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether appending concatenates (differentiable) rather than writing into a buffer.
    pub(super) fn grows(&self) -> bool {
        self.capacity.is_none()
    }

    /// One layer's keys and values so far, `[B, kvH, len, D]` each (`None` before the first pass).
    pub(super) fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers[layer].as_ref()
    }

    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.mask.len()
    }

    /// Keeps the given rows, in that order: drops finished sequences, or, with repeated indices,
    /// expands a shared prefix into several continuations (differentiable for a growing cache).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.iter().any(|&r| r >= self.batch()) {
            return Err(ModelError::Invalid("select_rows: row out of range".into()));
        }
        if rows.is_empty() {
            return Err(ModelError::Invalid("select_rows: no rows kept".into()));
        }
        let dev = self.layers.iter().flatten().next().map(|(k, _)| k.device().clone());
        if let Some(dev) = dev {
            let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
            for l in self.layers.iter_mut().flatten() {
                let k = l.0.index_select(&idx, 0)?;
                let v = l.1.index_select(&idx, 0)?;
                *l = (k, v);
            }
        }
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }

    /// Appends one layer's new keys/values `[B, kvH, T, D]`; returns all of them.
    pub(super) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t_new = k.dim(2)?;
        let old = self.len;
        let (k_all, v_all) = match (self.capacity, self.layers[layer].take()) {
            (None, None) => (k.clone(), v.clone()),
            (None, Some((pk, pv))) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
            (Some(cap), prev) => {
                let (mut kb, mut vb) = match prev {
                    Some(p) => p,
                    None => {
                        let (b, h, _, d) = k.dims4()?;
                        let size = cap.max(t_new);
                        (
                            Tensor::zeros((b, h, size, d), k.dtype(), k.device())?,
                            Tensor::zeros((b, h, size, d), v.dtype(), v.device())?,
                        )
                    }
                };
                while old + t_new > kb.dim(2)? {
                    let grow = kb.dim(2)?.max(t_new);
                    let (b, h, _, d) = kb.dims4()?;
                    let zk = Tensor::zeros((b, h, grow, d), kb.dtype(), kb.device())?;
                    let zv = Tensor::zeros((b, h, grow, d), vb.dtype(), vb.device())?;
                    kb = Tensor::cat(&[&kb, &zk], 2)?;
                    vb = Tensor::cat(&[&vb, &zv], 2)?;
                }
                kb.slice_set(&k.contiguous()?, 2, old)?;
                vb.slice_set(&v.contiguous()?, 2, old)?;
                let ka = kb.narrow(2, 0, old + t_new)?;
                let va = vb.narrow(2, 0, old + t_new)?;
                self.layers[layer] = Some((kb, vb));
                return Ok((ka, va));
            }
        };
        self.layers[layer] = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }
}
