//! Activation checkpointing ([`Llama::set_activation_checkpointing`]): a training pass keeps
//! each decoder block's input and output, not what the block computed in between, and runs the
//! block again in the backward pass.
//!
//! A block becomes one custom op of candle's graph whose inputs are the block's input and the
//! keys and values cached before it (a shared prompt's, which gradients reach too) and whose
//! output packs the block's output with its new keys and values, `[B·T, H + 2·kvH·D]`. The
//! forward pass computes that detached (the no-backward kernels); the op's backward builds the
//! block's graph again from its inputs, with the adapter tracked, and takes the vector-Jacobian
//! product with one `backward`. Gradients of the op's inputs go back to candle; the adapter's
//! gradients cannot (the adapter is not an input of the op), so they wait in [`Gradients`]
//! until [`Llama::backward`] adds them to the store it returns.
//!
//! The recomputed block reads the same weights, adapter, rotary tables, mask and dropout masks
//! (seeded) as the first computation, so the gradients are those of the pass without
//! checkpointing, to float rounding (the first computation runs the kernels that have no
//! backward pass, which may sum in another order).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, Var};

use super::{block, BlockWeights, ForwardOptions, KvCache, Llama, LlamaConfig, PassGeometry, Projection};
use crate::bf16::FrozenWeight;
use crate::error::{ModelError, Result};
use crate::lora::LoraAdapter;

/// Adapter gradients left by recomputed blocks, `(the variable's tensor, its gradient)`, for
/// [`Llama::backward`] to collect.
#[derive(Debug, Default)]
pub(super) struct Gradients(Mutex<Vec<(Tensor, Tensor)>>);

impl Gradients {
    /// Everything left so far, emptying the list.
    pub(super) fn take(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, var: Tensor, grad: Tensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((var, grad));
    }
}

/// What the checkpointed blocks of one pass share (owned: candle's graph keeps its ops).
struct Shared {
    cfg: LlamaConfig,
    blocks: Vec<BlockWeights>,
    /// The blocks' bf16 copies, where the model multiplies in bf16: a recomputation must use the
    /// products the first forward pass used.
    bf16: Option<Arc<super::Bf16Weights>>,
    adapter: LoraAdapter,
    geo: PassGeometry,
    bt: (usize, usize),
    dropout_seed: Option<u64>,
    dtype: candle_core::DType,
    grads: Arc<Gradients>,
}

/// One training pass with its blocks checkpointed.
pub(super) struct Pass(Arc<Shared>);

impl Pass {
    pub(super) fn new(
        model: &Llama,
        adapter: &LoraAdapter,
        geo: &PassGeometry,
        bt: (usize, usize),
        dropout_seed: Option<u64>,
    ) -> Pass {
        Pass(Arc::new(Shared {
            cfg: model.cfg.clone(),
            blocks: model.w.blocks.clone(),
            bf16: model.bf16.clone(),
            adapter: adapter.clone(),
            geo: geo.clone(),
            bt,
            dropout_seed,
            dtype: model.dtype,
            grads: model.checkpoint_grads.clone(),
        }))
    }

    /// Block `layer` on `x`, checkpointed, its new keys and values appended to `cache`. `None`
    /// when nothing it reads is tracked (the first block of a pass, whose input is the frozen
    /// embedding): the caller runs it the ordinary way, which records what its adapter needs.
    pub(super) fn block(&self, layer: usize, x: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let past = cache.layer(layer).cloned();
        let tracked = x.track_op() || past.as_ref().is_some_and(|(k, v)| k.track_op() || v.track_op());
        if !tracked {
            return Ok(None);
        }
        let op = BlockOp { pass: self.0.clone(), layer, output: Mutex::new(None) };
        let detached_past = past.as_ref().map(|(k, v)| (k.detach(), v.detach()));
        let packed = op.packed(&x.detach(), detached_past.as_ref().map(|(k, v)| (k, v)), false)?;
        *op.output.lock().unwrap_or_else(|e| e.into_inner()) = Some(packed);
        let packed = match &past {
            None => x.apply_op1(op)?,
            Some((k, v)) => x.apply_op3(k, v, op)?,
        };
        let (b, t) = self.0.bt;
        let cfg = &self.0.cfg;
        let (h, nkv, hd) = (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim);
        let kvd = nkv * hd;
        let unflat = |z: Tensor| -> Result<Tensor> { Ok(z.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?) };
        let k = unflat(packed.narrow(1, h, kvd)?)?;
        let v = unflat(packed.narrow(1, h + kvd, kvd)?)?;
        cache.append(layer, &k, &v)?;
        Ok(Some(packed.narrow(1, 0, h)?))
    }
}

/// One checkpointed block: the op of candle's graph.
struct BlockOp {
    pass: Arc<Shared>,
    layer: usize,
    /// The packed output computed before the op was applied; its forward hands it over once.
    output: Mutex<Option<Tensor>>,
}

impl BlockOp {
    /// The block's output and its new keys and values, packed `[B·T, H + 2·kvH·D]`; the
    /// adapter's gradients tracked when `track`.
    fn packed(&self, x: &Tensor, past: Option<(&Tensor, &Tensor)>, track: bool) -> Result<Tensor> {
        let p = &self.pass;
        let opts = ForwardOptions { adapter: None, track_grad: track, dropout_seed: p.dropout_seed };
        let w = &p.blocks[self.layer];
        let lin = |x: &Tensor, pr: Projection| {
            let frozen = FrozenWeight {
                tensor: &w.proj[pr as usize],
                bf16: p.bf16.as_ref().map(|b| &b.proj[self.layer][pr as usize]),
            };
            p.adapter.linear(self.layer, pr, x, frozen, &opts, p.dtype)
        };
        let mut new_kv = None;
        let y = block(&p.cfg, w, &p.geo, p.bt, x, &lin, &mut |k, v| {
            new_kv = Some((k.clone(), v.clone()));
            Ok(match past {
                None => (k.clone(), v.clone()),
                Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            })
        })?;
        let (k, v) = new_kv.ok_or_else(|| ModelError::Invalid("checkpointed block: no keys/values".into()))?;
        let rows = p.bt.0 * p.bt.1;
        let flat = |z: &Tensor| -> Result<Tensor> { Ok(z.transpose(1, 2)?.reshape((rows, ()))?) };
        Ok(Tensor::cat(&[&y, &flat(&k)?, &flat(&v)?], 1)?)
    }

    /// The packed output computed ahead (see [`Pass::block`]), taken once.
    fn output(&self) -> candle_core::Result<Tensor> {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed block: forward run twice".into()))
    }

    /// The backward pass: the block again with the adapter tracked, from copies of its inputs
    /// (variables, for the inputs whose gradients candle asks for), and the vector-Jacobian
    /// product with `grad`. The adapter's gradients go to [`Gradients`].
    fn backward(
        &self,
        x: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let leaf = |t: &Tensor| -> candle_core::Result<(Tensor, Option<Var>)> {
            if t.track_op() {
                let v = Var::from_tensor(&t.detach())?;
                Ok((v.as_tensor().clone(), Some(v)))
            } else {
                Ok((t.detach(), None))
            }
        };
        let (xt, xv) = leaf(x)?;
        let (past_t, past_v) = match past {
            None => (None, (None, None)),
            Some((k, v)) => {
                let (kt, kv) = leaf(k)?;
                let (vt, vv) = leaf(v)?;
                (Some((kt, vt)), (kv, vv))
            }
        };
        let packed = self
            .packed(&xt, past_t.as_ref().map(|(k, v)| (k, v)), true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let grads = (packed * grad.detach())?.sum_all()?.backward()?;
        for pr in Projection::ALL {
            if let Some(pair) = self.pass.adapter.pair(self.layer, pr) {
                for var in [&pair.a, &pair.b] {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        self.pass.grads.push(var.as_tensor().clone(), g.clone());
                    }
                }
            }
        }
        let of = |v: Option<Var>| v.and_then(|v| grads.get(v.as_tensor()).cloned());
        Ok([of(xv), of(past_v.0), of(past_v.1)])
    }
}

/// Hands over a CUDA tensor's storage as a custom op's result.
#[cfg(feature = "cuda")]
fn cuda_storage(t: Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
        _ => candle_core::bail!("checkpointed block: a CUDA input but a result elsewhere"),
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ops::into_cpu_storage(self.output()?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(self.output()?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [gx, _, _] = self.backward(x, None, grad)?;
        Ok(gx)
    }
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ops::into_cpu_storage(self.output()?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_storage(self.output()?)
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gx, gk, gv] = self.backward(x, Some((k, v)), grad)?;
        Ok((gx, gk, gv))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, D};

    use super::super::tests::{batch, max_abs_diff, randomize_b};
    use super::*;
    use crate::lora::LoraConfig;

    /// A 4-layer random model with the adapter "a" (B non-zero, so every factor gets a gradient).
    fn model(lora: LoraConfig) -> Llama {
        let cfg = LlamaConfig { num_hidden_layers: 4, ..LlamaConfig::tiny(300) };
        let mut m = Llama::random(cfg, 8, &Device::Cpu, DType::F32).unwrap();
        m.add_adapter_seeded("a", &lora, 2).unwrap();
        randomize_b(&m, "a", 3);
        m
    }

    /// A loss that weighs every row and position differently.
    fn loss(logits: &Tensor) -> Tensor {
        let lp = candle_nn::ops::log_softmax(logits, D::Minus1).unwrap();
        let w = Tensor::arange(0f32, lp.elem_count() as f32, &Device::Cpu).unwrap().reshape(lp.shape()).unwrap();
        let w = (w * 1e-3).unwrap().sin().unwrap();
        (lp * w).unwrap().sum_all().unwrap()
    }

    /// The adapter's gradients, in `adapter_vars` order; every one present.
    fn grads_of(m: &Llama, loss: &Tensor) -> Vec<Tensor> {
        let g = m.backward(loss).unwrap();
        m.adapter_vars("a").iter().map(|v| g.get(v.as_tensor()).expect("a gradient for every factor").clone()).collect()
    }

    fn assert_close(a: &[Tensor], b: &[Tensor]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let scale = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = max_abs_diff(x, y);
            assert!(scale > 0.0 && d <= 1e-4 * scale.max(1.0), "factor {i}: differs by {d} (largest {scale})");
        }
    }

    /// Logits of a padded batch, one pass, with the seeded LoRA dropout.
    fn padded_pass(m: &Llama) -> Tensor {
        let (ids, mask) = batch(&[(1..9).collect(), (20..25).collect()]);
        let opts = ForwardOptions { adapter: Some("a"), track_grad: true, dropout_seed: Some(4) };
        m.logits(&m.forward_hidden(&ids, Some(&mask), &opts).unwrap()).unwrap()
    }

    /// A shared prompt once, then two continuations of it through the growing cache: gradients
    /// reach the adapter through the prompt's keys and values too.
    fn prefix_pass(m: &Llama) -> Tensor {
        let opts = ForwardOptions { adapter: Some("a"), track_grad: true, dropout_seed: None };
        let mut cache = KvCache::new(m, 1);
        let prompt = Tensor::new(&[[3u32, 9, 27, 81, 5, 15]], &Device::Cpu).unwrap();
        let first = m.forward_step(&prompt, None, &mut cache, &opts).unwrap();
        cache.select_rows(&[0, 0]).unwrap();
        let rest = Tensor::new(&[[7u32, 8, 9], [10, 11, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &Device::Cpu).unwrap();
        let second = m.forward_step(&rest, Some(&mask), &mut cache, &opts).unwrap();
        let first = m.logits(&first.narrow(1, 5, 1).unwrap()).unwrap();
        (loss(&first) + loss(&m.logits(&second).unwrap())).unwrap()
    }

    #[test]
    fn checkpointed_passes_give_the_same_outputs_and_gradients() {
        let lora = LoraConfig { dropout: 0.1, ..LoraConfig::default() };
        let mut m = model(lora);
        let plain_logits = padded_pass(&m);
        let plain = grads_of(&m, &loss(&plain_logits));
        let plain_prefix = grads_of(&m, &prefix_pass(&m));
        m.set_activation_checkpointing(true);
        let logits = padded_pass(&m);
        assert!(max_abs_diff(&logits, &plain_logits) < 1e-5);
        assert_close(&grads_of(&m, &loss(&logits)), &plain);
        assert_close(&grads_of(&m, &prefix_pass(&m)), &plain_prefix);
        // Every block but the first (its input, the embedding, is not tracked) ran again: the
        // backward work counts three of the four blocks' forward work once more.
        let before = m.flops();
        let _ = padded_pass(&m);
        let counted = m.flops() - before;
        let pass = m.config().pass_flops(2, 8, 0);
        let want = pass.backward() + 0.75 * pass.forward() + m.config().head_flops(16);
        assert!((counted.backward - want).abs() < 4.0, "{} against {want}", counted.backward);
    }

    #[test]
    fn an_adapter_on_later_layers_only_still_gets_its_gradients() {
        // The first blocks have nothing tracked: they run the ordinary way, and checkpointing
        // starts at the first adapted one.
        let lora = LoraConfig { layers: Some(vec![2, 3]), ..LoraConfig::default() };
        let mut m = model(lora);
        let plain = grads_of(&m, &loss(&padded_pass(&m)));
        m.set_activation_checkpointing(true);
        assert_close(&grads_of(&m, &loss(&padded_pass(&m))), &plain);
    }

    #[test]
    fn gradients_left_by_a_plain_backward_are_not_counted_twice() {
        let mut m = model(LoraConfig::default());
        let plain = grads_of(&m, &loss(&padded_pass(&m)));
        m.set_activation_checkpointing(true);
        // `Tensor::backward` on a checkpointed pass leaves the adapter's gradients behind...
        let _ = loss(&padded_pass(&m)).backward().unwrap();
        // ...which the next `Llama::backward` drops before it runs.
        assert_close(&grads_of(&m, &loss(&padded_pass(&m))), &plain);
    }
}
