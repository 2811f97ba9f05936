//! The model's non-linear pieces and frozen linear layers, each with a fast path.
//!
//! candle's fused RMSNorm, softmax and rotary kernels have no backward pass, and its composed
//! (differentiable) versions keep several full-size temporaries per op for the backward pass. On
//! the CPU in f32, the ops here run as custom ops: a fused forward kernel and a closed-form
//! backward that needs only the op's input or output, which is what makes a training step fast
//! and lean. Elsewhere (CUDA, half precision) they fall back to candle's fused kernels when no
//! gradient is needed and to the composition when one is.
//!
//! Frozen linear layers (`x · Wᵀ` with a weight that is never trained) go through BLAS when one
//! is loaded ([`crate::blas`]), in bf16 where the weight comes with a bf16 copy
//! ([`crate::bf16`]), and their backward computes only the input's gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D};
use rayon::prelude::*;

use std::sync::Arc;

use crate::bf16::{Bf16Matrix, FrozenWeight};
use crate::blas::{Blas, Product};
use crate::kernels;
use crate::model::{ModelError, Result};

/// `x @ w.t()` for a frozen weight `w` (`x`: `[N, in]`, `w`: `[out, in]`), in bf16 where `w` has
/// a bf16 copy and `x` is f32 on the CPU (see [`crate::bf16`]).
///
/// candle's matmul backward always computes both operands' gradients, and keeps them until the
/// backward pass ends; for a frozen weight that is a wasted product as costly as the forward one
/// and a weight-sized buffer per projection (on a 7B model, a second copy of the model). When `x`
/// is tracked (on the CPU or a CUDA device) this runs as a custom op whose backward computes only
/// `grad @ w`.
pub fn frozen_linear(x: &Tensor, w: FrozenWeight<'_>) -> Result<Tensor> {
    if x.track_op() && (x.device().is_cpu() || x.device().is_cuda()) {
        let op = FrozenLinear { w: w.tensor.clone(), w16: w.bf16.cloned() };
        Ok(x.contiguous()?.apply_op1(op)?)
    } else {
        matmul_cpu_blas(x, w.tensor, w.bf16.map(|w| &**w), true)
    }
}

/// `x · wᵀ` (`w_transposed`) or `x · w` for 2-D `x`, through BLAS when one is loaded and both are
/// f32 on the CPU (see [`crate::blas`]), by `w16` in bf16 when given; candle's matmul otherwise.
/// Not differentiable.
fn matmul_cpu_blas(x: &Tensor, w: &Tensor, w16: Option<&Bf16Matrix>, w_transposed: bool) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2 {
        let x = x.contiguous()?;
        let (m, k) = x.dims2()?;
        let (xs, xl) = x.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(xv)), Some((x0, x1))) = (&*xs, xl.contiguous_offsets()) {
            let c = match w16 {
                Some(w16) => Some(bf16_times(&xv[x0..x1], m, k, w16, w_transposed)?),
                None => blas_times(&xv[x0..x1], m, k, w, w_transposed)?,
            };
            if let Some(c) = c {
                let n = c.len() / m.max(1);
                return Ok(Tensor::from_vec(c, (m, n), &Device::Cpu)?);
            }
        }
    }
    Ok(if w_transposed { x.matmul(&w.t()?)? } else { x.matmul(w)? })
}

/// The row-major `[m, k]` matrix `x` rounded to bf16, times `w16ᵀ` (or `w16`), accumulated in
/// f32 by the bf16 BLAS.
///
/// # Errors
/// No bf16 BLAS is loaded (a model gets bf16 copies only when one is), or the shapes do not fit.
fn bf16_times(x: &[f32], m: usize, k: usize, w16: &Bf16Matrix, w_transposed: bool) -> Result<Vec<f32>> {
    let blas = crate::blas::bf16_blas()
        .ok_or_else(|| ModelError::Invalid(format!("bf16 product: {}", crate::bf16::NO_BF16_BLAS)))?;
    let (rows, cols) = w16.dims();
    let (n, kw) = if w_transposed { (rows, cols) } else { (cols, rows) };
    if k != kw {
        return Err(ModelError::Invalid(format!("bf16 product: x [{m}, {k}] against a weight [{rows}, {cols}]")));
    }
    let p = Product::new(m, n, k);
    let p = if w_transposed { p.b_t() } else { p };
    Ok(blas.gemm_new(&p, &crate::bf16::round_all(x), w16.bits()))
}

/// The row-major `[m, k]` matrix `x` times `wᵀ` (or `w`) through BLAS; `None` when no BLAS is
/// loaded or `w` is not f32 on the CPU with a matching inner dimension (the caller falls back to
/// candle, which reports shape errors).
fn blas_times(x: &[f32], m: usize, k: usize, w: &Tensor, w_transposed: bool) -> Result<Option<Vec<f32>>> {
    let Some(blas) = crate::blas::blas() else { return Ok(None) };
    if !w.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 {
        return Ok(None);
    }
    let (n, kw) = if w_transposed {
        w.dims2()?
    } else {
        let (r, c) = w.dims2()?;
        (c, r)
    };
    if k != kw {
        return Ok(None);
    }
    let w = w.contiguous()?;
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(wv)), Some((w0, w1))) = (&*ws, wl.contiguous_offsets()) else {
        return Ok(None);
    };
    let p = Product::new(m, n, k);
    let p = if w_transposed { p.b_t() } else { p };
    Ok(Some(blas.gemm_new(&p, x, &wv[w0..w1])))
}

struct FrozenLinear {
    w: Tensor,
    /// `w`'s bf16 copy, when products by it run in bf16.
    w16: Option<Arc<Bf16Matrix>>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, self.name())?;
        let shape = layout.shape();
        if let (CpuStorage::F32(v), [m, k]) = (storage, shape.dims()) {
            let x = &v[start..end];
            let y = match &self.w16 {
                Some(w16) => Some(bf16_times(x, *m, *k, w16, true).map_err(candle_err)?),
                None => blas_times(x, *m, *k, &self.w, true).map_err(candle_err)?,
            };
            if let Some(y) = y {
                let n = y.len() / (*m).max(1);
                return Ok((CpuStorage::F32(y), (*m, n).into()));
            }
        }
        let x = cpu_tensor(storage, start, end, shape)?;
        into_cpu_storage(x.matmul(&self.w.t()?)?)
    }

    /// `x · wᵀ` through cuBLAS, as `Tensor::matmul` would do it (`w` read through a transposed
    /// layout, no copy).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = layout.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            return Err(candle_core::Error::Msg(format!("frozen-linear: input [{m}, {k}] against weight [{n}, {kw}]")));
        }
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            return Err(candle_core::Error::Msg(
                "frozen-linear: the input is on a CUDA device, the weight is not".into(),
            ));
        };
        let y = storage.matmul(ws, (1, m, n, k), layout, &wl.transpose(0, 1)?)?;
        Ok((y, (m, n).into()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(matmul_cpu_blas(grad_res, &self.w, self.w16.as_deref(), false).map_err(candle_err)?))
    }
}

/// RMSNorm over the last dimension with a frozen scale `alpha`: `x / rms(x) · alpha`.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(rows) = RowOp::applicable(x) {
        let alpha = alpha.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if alpha.len() == rows {
            return Ok(x.contiguous()?.apply_op1(RowOp::RmsNorm { alpha, eps: eps as f32 })?);
        }
    }
    if x.track_op() {
        Ok(candle_nn::ops::rms_norm_slow(x, alpha, eps as f32)?)
    } else {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, alpha, eps as f32)?)
    }
}

/// Softmax over the last dimension, in f32 for half-precision inputs.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if RowOp::applicable(x).is_some() {
        return Ok(x.contiguous()?.apply_op1(RowOp::Softmax)?);
    }
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let p =
        if x.track_op() { candle_nn::ops::softmax(&xf, D::Minus1)? } else { candle_nn::ops::softmax_last_dim(&xf)? };
    Ok(p.to_dtype(dt)?)
}

/// `softmax(scores + mask)` over the last dimension: `scores` `[B, H, T, Tk]`, the additive mask
/// `[B, T, Tk]` shared by the heads. Fused on the CPU in f32 (the masked scores are never stored).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, tk) = scores.dims4()?;
    if RowOp::applicable(scores).is_some() && mask.dtype() == DType::F32 && mask.dims() == [b, t, tk] {
        let mask = mask.flatten_all()?.to_vec1::<f32>()?;
        return Ok(scores.contiguous()?.apply_op1(RowOp::MaskedSoftmax { mask, heads: h, t, tk })?);
    }
    softmax_last_dim(&scores.broadcast_add(&mask.unsqueeze(1)?)?)
}

/// Numerically stable log-softmax over the last dimension: `x − max − log Σ exp(x − max)`.
///
/// Computed in one pass, never as `log(softmax(x))`, which underflows to `−inf` for unlikely
/// tokens.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    if RowOp::applicable(x).is_some() {
        return Ok(x.contiguous()?.apply_op1(RowOp::LogSoftmax)?);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_z)?)
}

/// Mean negative log-likelihood of `targets` (one per row) under the logits `[N, V]`, a scalar:
/// what PyTorch's `cross_entropy` computes. The mean of [`taken_log_softmax`], negated: fused on
/// the CPU in f32, so no `[N, V]` tensor is kept and the gradient, `(softmax − one-hot) / N`, is
/// written in one go.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n || n == 0 {
        return Err(ModelError::Invalid(format!("cross_entropy: {n} rows of logits, {} targets", targets.len())));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(ModelError::Invalid(format!("cross_entropy: target {bad} outside a vocabulary of {v}")));
    }
    Ok(taken_log_softmax(logits, targets)?.mean_all()?.neg()?)
}

/// `log softmax(logits)[i, tokens[i]]` for each row `i` of `logits` `[N, V]`: `[N]`, the
/// log-probability of one token per row. Fused on the CPU in f32: the forward pass keeps no
/// `[N, V]` tensor and the backward pass writes `g_i·(one-hot − softmax)` in one go (the
/// composition keeps the log-softmax and builds a scattered gradient besides). Elsewhere,
/// log-softmax and a gather.
pub fn taken_log_softmax(logits: &Tensor, tokens: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if tokens.len() != n {
        return Err(ModelError::Invalid(format!("taken_log_softmax: {n} rows of logits, {} tokens", tokens.len())));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
        return Err(ModelError::Invalid(format!("taken_log_softmax: token {bad} outside a vocabulary of {v}")));
    }
    if RowOp::applicable(logits).is_some() {
        return Ok(logits.contiguous()?.apply_op1(TakenLogSoftmax { tokens: tokens.to_vec() })?);
    }
    let idx = Tensor::from_slice(tokens, (n, 1), logits.device())?;
    Ok(log_softmax(logits)?.gather(&idx, 1)?.squeeze(1)?)
}

/// [`taken_log_softmax`]'s fused CPU op.
struct TakenLogSoftmax {
    tokens: Vec<u32>,
}

impl CustomOp1 for TakenLogSoftmax {
    fn name(&self) -> &'static str {
        "taken-log-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, self.name())?;
        let CpuStorage::F32(x) = storage else { candle_core::bail!("taken-log-softmax: f32 logits expected") };
        let (n, v) = layout.shape().dims2()?;
        let y: Vec<f32> = x[start..end]
            .par_chunks(v)
            .zip(self.tokens.par_iter())
            .map(|(row, &t)| row[t as usize] - kernels::log_sum_exp(row))
            .collect();
        Ok((CpuStorage::F32(y), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let grad = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut g = vec![0f32; n * v];
        with_f32(&[arg], |x| {
            let rows = g.par_chunks_mut(v).zip(x[0].par_chunks(v)).zip(self.tokens.par_iter().zip(grad.par_iter()));
            rows.for_each(|((g, row), (&t, &gi))| {
                kernels::exp_shift(row, kernels::log_sum_exp(row), -gi, g);
                g[t as usize] += gi;
            })
        })?;
        Ok(Some(Tensor::from_vec(g, (n, v), arg.device())?))
    }
}

/// `KL(softmax(logits_i) ‖ exp(target_logp_i))` for each row `i`: `[N]` from logits and a
/// constant target's log-probabilities, both `[N, V]`. Fused on the CPU in f32: the forward pass
/// keeps no `[N, V]` tensor (the composition keeps the log-softmax, its exponential, the
/// difference and the product) and the backward pass writes `g_i·p ⊙ (log p − target − KL_i)` in
/// one go. Elsewhere, the composition. The target gets no gradient.
pub fn kl_from_logits(logits: &Tensor, target_logp: &Tensor) -> Result<Tensor> {
    if logits.dims() != target_logp.dims() || logits.rank() != 2 {
        return Err(ModelError::Invalid(format!(
            "kl_from_logits: logits {:?} and target {:?}, expected two equal [N, V] shapes",
            logits.dims(),
            target_logp.dims()
        )));
    }
    let target = target_logp.detach();
    if RowOp::applicable(logits).is_some() && target.dtype() == DType::F32 && target.device().is_cpu() {
        return Ok(logits.contiguous()?.apply_op1(KlFromLogits { target: target.contiguous()? })?);
    }
    let logp = log_softmax(logits)?;
    Ok((logp.exp()? * (logp - target)?)?.sum(D::Minus1)?)
}

/// [`kl_from_logits`]'s fused CPU op.
struct KlFromLogits {
    target: Tensor,
}

impl CustomOp1 for KlFromLogits {
    fn name(&self) -> &'static str {
        "kl-from-logits"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, self.name())?;
        let CpuStorage::F32(x) = storage else { candle_core::bail!("kl-from-logits: f32 logits expected") };
        let (n, v) = layout.shape().dims2()?;
        let kl = with_f32(&[&self.target], |t| {
            x[start..end]
                .par_chunks(v)
                .zip(t[0].par_chunks(v))
                .map_init(
                    || vec![0f32; v],
                    |p, (row, target)| {
                        let log_z = kernels::log_sum_exp(row);
                        kernels::exp_shift(row, log_z, 1.0, p);
                        p.iter().zip(row).zip(target).map(|((p, x), t)| p * (x - log_z - t)).sum::<f32>()
                    },
                )
                .collect::<Vec<f32>>()
        })?;
        Ok((CpuStorage::F32(kl), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let grad = grad.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let kl = res.to_vec1::<f32>()?;
        let mut g = vec![0f32; n * v];
        with_f32(&[arg, &self.target], |t| {
            let rows = g.par_chunks_mut(v).zip(t[0].par_chunks(v).zip(t[1].par_chunks(v)));
            rows.zip(grad.par_iter().zip(kl.par_iter())).for_each(|((g, (row, target)), (&gi, &kl))| {
                let log_z = kernels::log_sum_exp(row);
                kernels::exp_shift(row, log_z, gi, g);
                for ((g, x), t) in g.iter_mut().zip(row).zip(target) {
                    *g *= x - log_z - t - kl;
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(g, (n, v), arg.device())?))
    }
}

/// Rotary embedding in the rotate-half layout on `[B, T, H, D]` with `cos`/`sin` `[B, T, D/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.track_op() {
        // A rotation is orthogonal: its backward is the rotation by the opposite angles.
        let op = Rope { cos: cos.clone(), sin: sin.clone() };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    if !x.track_op() {
        return Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?);
    }
    let d = x.dim(D::Minus1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(2)?; // [B, T, 1, D]
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(2)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-with-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, self.name())?;
        let x = cpu_tensor(storage, start, end, layout.shape())?;
        into_cpu_storage(candle_nn::rotary_emb::rope_thd(&x, &self.cos, &self.sin)?)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(candle_nn::rotary_emb::rope_thd(&g, &self.cos, &self.sin.neg()?)?))
    }
}

/// Rows per parallel task of the row-wise ops: rows are independent, and a few hundred per task
/// keeps the threads' shares even.
const ROWS: usize = 256;

/// Row-wise ops over the last dimension with fused f32 CPU kernels and closed-form backwards.
enum RowOp {
    /// `x / sqrt(mean(x²) + eps) · alpha`, `alpha` frozen.
    RmsNorm {
        alpha: Vec<f32>,
        eps: f32,
    },
    Softmax,
    /// Softmax of `x + mask`, `mask` `[B, T, Tk]` shared by the `heads` of `[B, heads, T, Tk]`.
    MaskedSoftmax {
        mask: Vec<f32>,
        heads: usize,
        t: usize,
        tk: usize,
    },
    LogSoftmax,
}

impl RowOp {
    /// The row length when `x` can take the fused path (f32 on the CPU).
    fn applicable(x: &Tensor) -> Option<usize> {
        (x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 1).then(|| x.dims()[x.rank() - 1])
    }

    /// Computes output row `index` from input row `x`.
    fn row(&self, index: usize, x: &[f32], y: &mut [f32]) {
        match self {
            RowOp::RmsNorm { alpha, eps } => {
                let ms = kernels::dot(x, x) / x.len() as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for ((y, x), a) in y.iter_mut().zip(x).zip(alpha) {
                    *y = x * r * a;
                }
            }
            RowOp::Softmax => {
                y.copy_from_slice(x);
                kernels::softmax_in_place(y);
            }
            RowOp::MaskedSoftmax { mask, heads, t, tk } => {
                // Row index = ((batch · heads) + head) · t + query.
                let (bi, q) = (index / (heads * t), index % t);
                let m = &mask[(bi * t + q) * tk..(bi * t + q + 1) * tk];
                y.iter_mut().zip(x).zip(m).for_each(|((y, x), m)| *y = x + m);
                kernels::softmax_in_place(y);
            }
            RowOp::LogSoftmax => {
                let log_z = kernels::log_sum_exp(x);
                for (y, x) in y.iter_mut().zip(x) {
                    *y = x - log_z;
                }
            }
        }
    }
}

impl CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        match self {
            RowOp::RmsNorm { .. } => "rms-norm-with-backward",
            RowOp::Softmax => "softmax-with-backward",
            RowOp::MaskedSoftmax { .. } => "masked-softmax-with-backward",
            RowOp::LogSoftmax => "log-softmax-with-backward",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = contiguous_range(layout, self.name())?;
        let CpuStorage::F32(v) = storage else { candle_core::bail!("{}: f32 input expected", self.name()) };
        let x = &v[start..end];
        let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * ROWS).zip(x.par_chunks(n * ROWS)).enumerate().for_each(|(c, (ys, xs))| {
            for (i, (y, x)) in ys.chunks_mut(n).zip(xs.chunks(n)).enumerate() {
                self.row(c * ROWS + i, x, y)
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = match self {
            // d/dx of x·r·α with r = (mean(x²) + eps)^(-1/2): r·(g⊙α) − x·r³·mean(g⊙α⊙x).
            RowOp::RmsNorm { alpha, eps } => {
                let n = alpha.len();
                let mut dx = vec![0f32; arg.elem_count()];
                with_f32(&[arg, grad], |t| {
                    let rows =
                        dx.par_chunks_mut(n * ROWS).zip(t[0].par_chunks(n * ROWS).zip(t[1].par_chunks(n * ROWS)));
                    rows.for_each(|(dx, (x, g))| {
                        for ((dx, x), g) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
                            let r = 1.0 / (kernels::dot(x, x) / n as f32 + eps).sqrt();
                            let m = g.iter().zip(alpha).zip(x).map(|((g, a), x)| g * a * x).sum::<f32>() / n as f32;
                            let c = r * r * r * m;
                            for (((d, g), a), x) in dx.iter_mut().zip(g).zip(alpha).zip(x) {
                                *d = r * g * a - x * c;
                            }
                        }
                    })
                })?;
                Tensor::from_vec(dx, arg.shape(), arg.device())?
            }
            // y ⊙ (g − Σ g⊙y); the mask is a constant.
            RowOp::Softmax | RowOp::MaskedSoftmax { .. } => {
                let s = (grad * res)?.sum_keepdim(D::Minus1)?;
                (grad.broadcast_sub(&s)? * res)?
            }
            // g − softmax ⊙ Σ g
            RowOp::LogSoftmax => {
                let s = grad.sum_keepdim(D::Minus1)?;
                (grad - res.exp()?.broadcast_mul(&s)?)?
            }
        };
        Ok(Some(g))
    }
}

/// The core of grouped-query attention, `softmax(q · kᵀ + mask) · v`, per batch row and
/// key/value group: `q` `[B, G, R·T, D]` (the R query heads sharing a key/value head stacked as
/// rows, already scaled by 1/√D), `k` and `v` `[B, G, Tk, D]`, `mask` the additive `[B, T, Tk]`
/// shared by the heads (`None`: every key visible). Returns `[B, G, R·T, D]`.
///
/// On the CPU in f32 with BLAS loaded this is one custom op: the products go through BLAS, one
/// (batch row, group) per task, and the probabilities are never stored; the backward pass
/// recomputes them (as FlashAttention does), so the graph holds no `[.., T, Tk]` tensor and the
/// gradients of the scores and probabilities are never accumulated by candle. Queries go in
/// blocks of [`QUERY_BLOCK`] positions, each against the keys up to the last one any of them
/// sees (mask entries at or below [`HIDDEN`] hide a key), so a causal mask costs about half the
/// products of a full one. Elsewhere it is the composition of matmuls and the (masked) softmax
/// above.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, t: usize) -> Result<Tensor> {
    let (b, g, rows, _) = q.dims4()?;
    let tk = k.dim(2)?;
    let fused = crate::blas::blas().is_some()
        && [q, k, v].iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
        && t > 0
        && rows % t == 0
        && mask.is_none_or(|m| m.dtype() == DType::F32 && m.dims() == [b, t, tk]);
    if fused {
        let mask = mask.map(|m| m.flatten_all().and_then(|m| m.to_vec1::<f32>())).transpose()?;
        let op = Attention { mask, t };
        // Keys and values may be a view of the first `Tk` positions of a longer buffer (the
        // generation cache, `KvCache::with_capacity`): each (batch row, group)'s rows are then
        // contiguous, and the op reads them in place instead of copying the whole cache.
        let rows_in_place = |x: &Tensor| -> Result<Tensor> {
            let st = x.stride();
            let rows_contiguous = st[3] == 1 && (st[2] == x.dim(3)? || x.dim(2)? == 1);
            Ok(if rows_contiguous { x.clone() } else { x.contiguous()? })
        };
        return Ok(q.contiguous()?.apply_op3(&rows_in_place(k)?, &rows_in_place(v)?, op)?);
    }
    let scores = q.matmul(&k.t()?)?;
    let probs = match mask {
        None => softmax_last_dim(&scores)?,
        Some(m) => masked_softmax(&scores.reshape((b, g * rows / t, t, tk))?, m)?.reshape((b, g, rows, tk))?,
    };
    Ok(probs.matmul(v)?)
}

/// Query positions per block of the fused attention.
const QUERY_BLOCK: usize = 64;

/// An additive mask entry at or below this hides its key (the model's masks use −1e30): its
/// probability is 0 in f32 whatever the score.
pub const HIDDEN: f32 = -1.0e9;

/// [`attention`]'s fused CPU op.
struct Attention {
    /// The additive mask `[B, T, Tk]`, flattened.
    mask: Option<Vec<f32>>,
    /// Query positions per head (row `r` of a group is position `r % t`).
    t: usize,
}

/// Rows `row0..row0 + rows` of one (batch row, group) of queries, against keys `0..keys`.
#[derive(Clone, Copy)]
struct QueryBlock {
    row0: usize,
    rows: usize,
    keys: usize,
}

impl Attention {
    /// The query blocks of batch row `bi` (`rows` query rows, `tk` keys): without a mask, all rows
    /// against all keys; with one, [`QUERY_BLOCK`] positions of one head at a time against the
    /// keys up to the last one they see.
    fn blocks(&self, bi: usize, rows: usize, tk: usize) -> Vec<QueryBlock> {
        let Some(mask) = &self.mask else {
            return vec![QueryBlock { row0: 0, rows, keys: tk }];
        };
        let t = self.t;
        // One past the last visible key of each query position (all keys if none is visible,
        // which keeps a fully masked row what the plain composition makes of it).
        let limit = |q: usize| {
            let row = &mask[(bi * t + q) * tk..][..tk];
            row.iter().rposition(|&m| m > HIDDEN).map_or(tk, |i| i + 1)
        };
        let limits: Vec<usize> = (0..t).map(limit).collect();
        let mut out = Vec::new();
        for head in 0..rows / t {
            for q0 in (0..t).step_by(QUERY_BLOCK) {
                let n = QUERY_BLOCK.min(t - q0);
                let keys = limits[q0..q0 + n].iter().copied().max().unwrap_or(tk);
                out.push(QueryBlock { row0: head * t + q0, rows: n, keys });
            }
        }
        out
    }

    /// The probabilities `[blk.rows, blk.keys]` of one block of batch row `bi`:
    /// `softmax(q · kᵀ + mask)` over the block's keys (`q`: the block's rows, `k`: the group's keys).
    #[allow(clippy::too_many_arguments)]
    fn probs(&self, blas: &Blas, bi: usize, blk: QueryBlock, q: &[f32], k: &[f32], d: usize, tk: usize, p: &mut [f32]) {
        let l = blk.keys;
        blas.gemm_serial(&Product::new(blk.rows, l, d).b_t(), q, &k[..l * d], p);
        for (i, row) in p.chunks_mut(l).enumerate() {
            if let Some(mask) = &self.mask {
                let at = (bi * self.t + (blk.row0 + i) % self.t) * tk;
                row.iter_mut().zip(&mask[at..at + l]).for_each(|(s, m)| *s += m);
            }
            kernels::softmax_in_place(row);
        }
    }
}

/// The BLAS an op that was chosen because one is loaded runs on.
fn loaded_blas(op: &str) -> candle_core::Result<&'static Blas> {
    crate::blas::blas().ok_or_else(|| candle_core::Error::Msg(format!("{op}: no BLAS loaded")))
}

/// Runs `f` on the contiguous f32 data of CPU tensors, without copying contiguous ones.
pub(crate) fn with_f32<R>(xs: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> candle_core::Result<R> {
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = xs.iter().map(|x| x.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(xs.len());
    for (storage, layout) in &guards {
        let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&**storage, layout.contiguous_offsets()) else {
            candle_core::bail!("an f32 CPU tensor was expected")
        };
        slices.push(&v[a..b]);
    }
    Ok(f(&slices))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let blas = loaded_blas("attention")?;
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("attention: f32 inputs expected")
        };
        let q = &q[contiguous_range(ql, "attention")?.0..];
        let (b, g, rows, d) = ql.shape().dims4()?;
        let tk = kl.shape().dims4()?.2;
        // Keys and values: each (batch row, group)'s `Tk` rows of `D` contiguous, the groups at
        // any stride (a view of a longer cache buffer, see `attention`).
        let group = |x: &'_ [f32], l: &Layout, bg: usize| -> candle_core::Result<std::ops::Range<usize>> {
            let st = l.stride();
            // A dimension of size 1 may have any stride.
            if l.shape().dims4()? != (b, g, tk, d) || st[3] != 1 || (st[2] != d && tk > 1) {
                candle_core::bail!("attention: keys/values of shape {:?}, strides {st:?}", l.shape());
            }
            let at = l.start_offset() + (bg / g) * st[0] + (bg % g) * st[1];
            if at + tk * d > x.len() {
                candle_core::bail!("attention: keys/values outside their storage");
            }
            Ok(at..at + tk * d)
        };
        let ranges =
            (0..b * g).map(|bg| Ok((group(k, kl, bg)?, group(v, vl, bg)?))).collect::<candle_core::Result<Vec<_>>>()?;
        let blocks: Vec<Vec<QueryBlock>> = (0..b).map(|bi| self.blocks(bi, rows, tk)).collect();
        let mut out = vec![0f32; ql.shape().elem_count()];
        out.par_chunks_mut(rows * d).enumerate().for_each(|(bg, o)| {
            let bi = bg / g;
            let (qi, ki, vi) = (&q[bg * rows * d..][..rows * d], &k[ranges[bg].0.clone()], &v[ranges[bg].1.clone()]);
            let mut p = Vec::new();
            for &blk in &blocks[bi] {
                let (rs, l) = (blk.row0 * d..(blk.row0 + blk.rows) * d, blk.keys);
                p.resize(blk.rows * l, 0.0);
                self.probs(blas, bi, blk, &qi[rs.clone()], ki, d, tk, &mut p);
                blas.gemm_serial(&Product::new(blk.rows, d, l), &p, &vi[..l * d], &mut o[rs]);
            }
        });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    /// With P the probabilities and dO the output's gradient, block by block: dV += Pᵀ·dO,
    /// dP = dO·Vᵀ, dS = P ⊙ (dP − Σ_row dP ⊙ P), dQ = dS·K, dK += dSᵀ·Q (the mask is a constant).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let blas = loaded_blas("attention")?;
        let (b, g, rows, d) = q.dims4()?;
        let tk = k.dim(2)?;
        let blocks: Vec<Vec<QueryBlock>> = (0..b).map(|bi| self.blocks(bi, rows, tk)).collect();
        let (mut dq, mut dk, mut dv) =
            (vec![0f32; q.elem_count()], vec![0f32; k.elem_count()], vec![0f32; v.elem_count()]);
        with_f32(&[q, k, v, grad], |x| {
            let (qv, kv, vv, go) = (x[0], x[1], x[2], x[3]);
            dq.par_chunks_mut(rows * d)
                .zip(dk.par_chunks_mut(tk * d))
                .zip(dv.par_chunks_mut(tk * d))
                .enumerate()
                .for_each(|(bg, ((dq, dk), dv))| {
                    let bi = bg / g;
                    let qi = &qv[bg * rows * d..][..rows * d];
                    let (ki, vi) = (&kv[bg * tk * d..][..tk * d], &vv[bg * tk * d..][..tk * d]);
                    let gi = &go[bg * rows * d..][..rows * d];
                    let (mut p, mut ds) = (Vec::new(), Vec::new());
                    for &blk in &blocks[bi] {
                        let (rs, l, n) = (blk.row0 * d..(blk.row0 + blk.rows) * d, blk.keys, blk.rows);
                        let (qb, gb) = (&qi[rs.clone()], &gi[rs.clone()]);
                        p.resize(n * l, 0.0);
                        ds.resize(n * l, 0.0);
                        self.probs(blas, bi, blk, qb, ki, d, tk, &mut p);
                        blas.gemm_serial(&Product::new(l, d, n).a_t().accumulate(), &p, gb, &mut dv[..l * d]);
                        blas.gemm_serial(&Product::new(n, l, d).b_t(), gb, &vi[..l * d], &mut ds);
                        for (dsr, pr) in ds.chunks_mut(l).zip(p.chunks(l)) {
                            let dot = kernels::dot(dsr, pr);
                            dsr.iter_mut().zip(pr).for_each(|(s, p)| *s = p * (*s - dot));
                        }
                        blas.gemm_serial(&Product::new(n, d, l), &ds, &ki[..l * d], &mut dq[rs]);
                        blas.gemm_serial(&Product::new(l, d, n).a_t().accumulate(), &ds, qb, &mut dk[..l * d]);
                    }
                })
        })?;
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), &dev)?),
            Some(Tensor::from_vec(dk, k.shape(), &dev)?),
            Some(Tensor::from_vec(dv, v.shape(), &dev)?),
        ))
    }
}

/// SwiGLU's gating, `silu(gate) · up`. Fused on the CPU in f32 (one pass, and a backward pass
/// that needs only the two inputs); candle's composition elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = [gate, up].iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32) && gate.shape() == up.shape();
    if fused {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?);
    }
    Ok((gate.silu()? * up)?)
}

/// [`swiglu`]'s fused CPU op.
struct SwiGlu;

/// Elements per parallel task of the element-wise ops.
const ELEMENTS: usize = 1 << 14;

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gs, us) else {
            candle_core::bail!("swiglu: f32 inputs expected")
        };
        let (g0, g1) = contiguous_range(gl, "swiglu")?;
        let (u0, u1) = contiguous_range(ul, "swiglu")?;
        let (g, u) = (&g[g0..g1], &u[u0..u1]);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(ELEMENTS)
            .zip(g.par_chunks(ELEMENTS).zip(u.par_chunks(ELEMENTS)))
            .for_each(|(y, (g, u))| kernels::swiglu(g, u, y));
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_f32(&[gate, up, grad], |x| {
            dg.par_chunks_mut(ELEMENTS)
                .zip(du.par_chunks_mut(ELEMENTS))
                .zip(x[0].par_chunks(ELEMENTS).zip(x[1].par_chunks(ELEMENTS)).zip(x[2].par_chunks(ELEMENTS)))
                .for_each(|((dg, du), ((g, u), d))| kernels::swiglu_backward(g, u, d, dg, du));
        })?;
        let dev = Device::Cpu;
        Ok((Some(Tensor::from_vec(dg, gate.shape(), &dev)?), Some(Tensor::from_vec(du, up.shape(), &dev)?)))
    }
}

/// A LoRA-adapted frozen linear layer in one op: `x · wᵀ + scale · (x · aᵀ) · bᵀ`, with `x`
/// `[N, in]`, the frozen `w` `[out, in]`, `a` `[r, in]` and `b` `[out, r]`.
///
/// On the CPU in f32 with BLAS loaded, every product goes through BLAS (the products by `w` in
/// bf16 where it has a bf16 copy, see [`crate::bf16`]) and the backward pass computes `x`'s
/// gradient only when `x` is tracked, and `w`'s never; the graph gets one node where the
/// composition makes five. Returns `None` elsewhere: the caller composes [`frozen_linear`] and
/// candle's matmuls.
pub fn lora_linear(x: &Tensor, w: FrozenWeight<'_>, a: &Tensor, b: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let fused = crate::blas::blas().is_some()
        && [x, w.tensor, a, b].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2);
    if !fused {
        return Ok(None);
    }
    let op =
        LoraLinear { w: w.tensor.contiguous()?, w16: w.bf16.cloned(), scale: scale as f32, x_tracked: x.track_op() };
    Ok(Some(x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?))
}

/// `y + scale · (x · aᵀ) · bᵀ` without autograd, for a `y` computed elsewhere (the quantised
/// generation weights): `x` `[N, in]`, `y` `[N, out]`, `a` `[r, in]`, `b` `[out, r]`.
///
/// On the CPU in f32 with BLAS loaded the two rank-r products are the BLAS calls
/// [`lora_linear`]'s forward makes (`u = x · aᵀ`, then `y += scale · u · bᵀ`), so the term added is
/// the one the f32 path adds. Returns `None` elsewhere: the caller composes candle's products.
pub fn lora_add(x: &Tensor, y: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let Some(blas) = crate::blas::blas() else { return Ok(None) };
    if ![x, y, a, b].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2) {
        return Ok(None);
    }
    let (n, i) = x.dims2()?;
    let (r, ia) = a.dims2()?;
    let (o, rb) = b.dims2()?;
    if ia != i || rb != r || y.dims() != [n, o] {
        return Err(ModelError::Invalid(format!(
            "lora-add: x [{n}, {i}], y {:?}, a [{r}, {ia}] and b [{o}, {rb}] do not fit",
            y.dims()
        )));
    }
    let mut out = y.flatten_all()?.to_vec1::<f32>()?;
    with_f32(&[x, a, b], |t| {
        let mut u = vec![0f32; n * r];
        blas.gemm(&Product::new(n, r, i).b_t(), t[0], t[1], &mut u);
        blas.gemm(&Product::new(n, o, r).b_t().scaled(scale as f32).accumulate(), &u, t[2], &mut out);
    })?;
    Ok(Some(Tensor::from_vec(out, (n, o), &Device::Cpu)?))
}

/// [`lora_linear`]'s fused CPU op.
struct LoraLinear {
    w: Tensor,
    /// `w`'s bf16 copy, when products by it run in bf16.
    w16: Option<Arc<Bf16Matrix>>,
    scale: f32,
    /// Whether `x` needs a gradient (not in the first block, whose input is the frozen embedding).
    x_tracked: bool,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let blas = loaded_blas("lora-linear")?;
        let (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) = (xs, as_, bs) else {
            candle_core::bail!("lora-linear: f32 inputs expected")
        };
        let (x0, x1) = contiguous_range(xl, self.name())?;
        let (a0, a1) = contiguous_range(al, self.name())?;
        let (b0, b1) = contiguous_range(bl, self.name())?;
        let (x, a, b) = (&x[x0..x1], &a[a0..a1], &b[b0..b1]);
        let (n, i) = xl.shape().dims2()?;
        let (r, ia) = al.shape().dims2()?;
        let (o, rb) = bl.shape().dims2()?;
        let (ow, iw) = self.w.dims2()?;
        if ia != i || iw != i || rb != r || ow != o {
            candle_core::bail!("lora-linear: x [{n}, {i}], a [{r}, {ia}], b [{o}, {rb}] and w [{ow}, {iw}] do not fit");
        }
        let mut y = match &self.w16 {
            Some(w16) => bf16_times(x, n, i, w16, true).map_err(candle_err)?,
            None => with_f32(&[&self.w], |w| blas.gemm_new(&Product::new(n, o, i).b_t(), x, w[0]))?,
        };
        let mut u = vec![0f32; n * r];
        blas.gemm(&Product::new(n, r, i).b_t(), x, a, &mut u);
        blas.gemm(&Product::new(n, o, r).b_t().scaled(self.scale).accumulate(), &u, b, &mut y);
        Ok((CpuStorage::F32(y), (n, o).into()))
    }

    /// With u = x·aᵀ and g the output's gradient: db = s·gᵀ·u, gu = s·g·b, da = guᵀ·x and
    /// dx = g·w + gu·a.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let blas = loaded_blas("lora-linear")?;
        let (n, i) = x.dims2()?;
        let (r, o) = (a.dim(0)?, b.dim(0)?);
        let s = self.scale;
        let (mut u, mut gu, mut da, mut db) =
            (vec![0f32; n * r], vec![0f32; n * r], vec![0f32; r * i], vec![0f32; o * r]);
        let dx = with_f32(&[x, a, b, grad, &self.w], |t| {
            let (x, a, b, g, w) = (t[0], t[1], t[2], t[3], t[4]);
            blas.gemm(&Product::new(n, r, i).b_t(), x, a, &mut u);
            blas.gemm(&Product::new(o, r, n).a_t().scaled(s), g, &u, &mut db);
            blas.gemm(&Product::new(n, r, o).scaled(s), g, b, &mut gu);
            blas.gemm(&Product::new(r, i, n).a_t(), &gu, x, &mut da);
            self.x_tracked
                .then(|| {
                    let mut dx = match &self.w16 {
                        Some(w16) => bf16_times(g, n, o, w16, false)?,
                        None => blas.gemm_new(&Product::new(n, i, o), g, w),
                    };
                    blas.gemm(&Product::new(n, i, r).accumulate(), &gu, a, &mut dx);
                    Ok::<_, ModelError>(dx)
                })
                .transpose()
        })?
        .map_err(candle_err)?;
        let dev = Device::Cpu;
        let dx = dx.map(|dx| Tensor::from_vec(dx, (n, i), &dev)).transpose()?;
        Ok((dx, Some(Tensor::from_vec(da, (r, i), &dev)?), Some(Tensor::from_vec(db, (o, r), &dev)?)))
    }
}

/// The storage range of a custom op's input; the ops here are applied to contiguous tensors.
fn contiguous_range(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: non-contiguous input")))
}

/// A CPU tensor holding a copy of `storage[start..end]` (float dtypes).
fn cpu_tensor(storage: &CpuStorage, start: usize, end: usize, shape: &Shape) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    Ok(match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, &dev)?,
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, &dev)?,
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], shape, &dev)?,
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], shape, &dev)?,
        _ => candle_core::bail!("unsupported dtype (f32, f64, bf16, f16 expected)"),
    })
}

/// The storage of a contiguous CPU tensor, for returning from a custom op.
pub(crate) fn into_cpu_storage(t: Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) if l.start_offset() == 0 && l.is_contiguous() => Ok((c.clone(), l.shape().clone())),
        _ => candle_core::bail!("a custom op's result is not a contiguous CPU tensor"),
    }
}

fn candle_err(e: ModelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn cross_entropy_matches_log_softmax_and_gather_in_value_and_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 4.0, (5, 11), &dev).unwrap())).unwrap();
        let targets = [3u32, 0, 10, 3, 7];
        let fused = cross_entropy(x.as_tensor(), &targets).unwrap();
        let idx = Tensor::new(&targets, &dev).unwrap().unsqueeze(1).unwrap();
        let plain = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        // Scaled, so that the incoming gradient is not 1.
        let gf = (fused * 3.0).unwrap().backward().unwrap();
        let gp = (plain * 3.0).unwrap().backward().unwrap();
        let (a, e) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        assert!(max_diff(a, e) < 1e-5, "{}", max_diff(a, e));
        // Rows of the gradient sum to zero: softmax minus a one-hot.
        let sums = a.sum(1).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(sums < 1e-5);
        assert!(cross_entropy(x.as_tensor(), &[1, 2]).unwrap_err().to_string().contains("5 rows of logits, 2 targets"));
        assert!(cross_entropy(x.as_tensor(), &[1, 2, 3, 4, 11]).unwrap_err().to_string().contains("target 11"));
    }

    #[test]
    fn taken_log_softmax_matches_log_softmax_and_gather_in_value_and_gradient() {
        let dev = Device::Cpu;
        // 70 columns: the vectorised exponentials' full blocks and a remainder.
        let x = Var::from_tensor(&(Tensor::randn(0f32, 4.0, (5, 70), &dev).unwrap())).unwrap();
        let tokens = [3u32, 0, 69, 3, 17];
        let fused = taken_log_softmax(x.as_tensor(), &tokens).unwrap();
        let idx = Tensor::new(&tokens, &dev).unwrap().unsqueeze(1).unwrap();
        let plain =
            candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap().gather(&idx, 1).unwrap().squeeze(1).unwrap();
        assert_eq!(fused.dims(), [5]);
        assert!(max_diff(&fused, &plain) < 1e-5);
        // Each row weighted differently, so that the incoming gradient differs per row.
        let w = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0, 0.0], &dev).unwrap();
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, e) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        assert!(max_diff(a, e) < 1e-5, "{}", max_diff(a, e));
        assert!(taken_log_softmax(x.as_tensor(), &[1, 2])
            .unwrap_err()
            .to_string()
            .contains("5 rows of logits, 2 tokens"));
        assert!(taken_log_softmax(x.as_tensor(), &[1, 2, 3, 4, 70]).unwrap_err().to_string().contains("token 70"));
    }

    #[test]
    fn kl_from_logits_matches_the_composition_in_value_and_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (4, 70), &dev).unwrap())).unwrap();
        let target = candle_nn::ops::log_softmax(&Tensor::randn(0f32, 2.0, (4, 70), &dev).unwrap(), D::Minus1).unwrap();
        let fused = kl_from_logits(x.as_tensor(), &target).unwrap();
        let logp = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
        let plain = (logp.exp().unwrap() * (&logp - &target).unwrap()).unwrap().sum(1).unwrap();
        assert_eq!(fused.dims(), [4]);
        assert!(max_diff(&fused, &plain) < 1e-4, "{}", max_diff(&fused, &plain));
        assert!(fused.min(0).unwrap().to_scalar::<f32>().unwrap() > 0.0, "a KL is positive");
        let w = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0], &dev).unwrap();
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, e) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        assert!(max_diff(a, e) < 1e-5, "{}", max_diff(a, e));
        // The KL of a distribution to itself, and its gradient, are zero.
        let same = kl_from_logits(x.as_tensor(), &logp.detach()).unwrap();
        assert!(same.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        assert!(kl_from_logits(x.as_tensor(), &target.narrow(1, 0, 69).unwrap()).is_err());
    }

    /// The fused attention against the plain composition, in value and in the gradients of q, k
    /// and v: `b` batch rows, `g` key/value groups of `r` query heads, `t` query positions after
    /// `past` cached keys, head width 8, under a causal mask with `pad` padding keys at the start
    /// of the second row (hidden by `hidden`), and without a mask.
    fn check_attention(g: usize, r: usize, t: usize, past: usize, pad: usize, hidden: f32) {
        assert!(crate::blas::blas().is_some(), "this test needs BLAS: run scripts/setup.sh python");
        let (b, d, tk) = (2, 8, past + t);
        let dev = Device::Cpu;
        let mut mask = vec![0f32; b * t * tk];
        for bi in 0..b {
            for q in 0..t {
                for k in 0..tk {
                    // Padding keys are seen only by themselves.
                    let padding = bi == 1 && k < pad && k != q + past;
                    if k > q + past || padding {
                        mask[(bi * t + q) * tk + k] = hidden;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, t, tk), &dev).unwrap();
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, g, r * t, d), &dev).unwrap()).unwrap();
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, g, tk, d), &dev).unwrap()).unwrap();
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, g, tk, d), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (b, g, r * t, d), &dev).unwrap();
        for m in [Some(&mask), None] {
            let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), m, t).unwrap();
            // The plain composition, written out here so that it does not depend on BLAS.
            let scores = q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap();
            let scores = match m {
                Some(m) => scores
                    .reshape((b, g * r, t, tk))
                    .unwrap()
                    .broadcast_add(&m.unsqueeze(1).unwrap())
                    .unwrap()
                    .reshape((b, g, r * t, tk))
                    .unwrap(),
                None => scores,
            };
            let plain = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(v.as_tensor()).unwrap();
            assert!(max_diff(&fused, &plain) < 1e-5, "values differ by {}", max_diff(&fused, &plain));
            let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (&plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, e) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
                assert!(max_diff(a, e) < 1e-4, "d{name} differs by {} (mask: {})", max_diff(a, e), m.is_some());
            }
            // No score-sized tensor gets a gradient: the op's only inputs are q, k and v.
            assert_eq!(gf.get_ids().count(), 4);
        }
    }

    #[test]
    fn fused_attention_matches_the_composition_in_value_and_gradient() {
        check_attention(2, 3, 4, 2, 2, -1e9);
    }

    /// More query positions than one block holds: the blocks against their key prefixes give
    /// what the whole rows give.
    #[test]
    fn fused_attention_in_several_query_blocks_matches_the_composition() {
        check_attention(2, 2, QUERY_BLOCK + 13, 3, 5, -1e30);
    }

    #[test]
    fn swiglu_matches_silu_times_up_in_value_and_gradient() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (7, 19), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (7, 19), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (7, 19), &dev).unwrap();
        let (g1, u1) = (Var::from_tensor(&gate).unwrap(), Var::from_tensor(&up).unwrap());
        let (g2, u2) = (Var::from_tensor(&gate).unwrap(), Var::from_tensor(&up).unwrap());
        let fused = swiglu(g1.as_tensor(), u1.as_tensor()).unwrap();
        let plain = (g2.as_tensor().silu().unwrap() * u2.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-5);
        let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (a, e) in [(&g1, &g2), (&u1, &u2)] {
            let d = max_diff(gf.get(a.as_tensor()).unwrap(), gp.get(e.as_tensor()).unwrap());
            assert!(d < 1e-5, "gradients differ by {d}");
        }
    }

    /// Random operands of a LoRA-adapted layer: `x` `[n, i]`, the frozen `w` `[o, i]`, `a`
    /// `[r, i]`, `b` `[o, r]`, and `up`, the output's gradient `[n, o]`.
    struct LoraOperands {
        x: Tensor,
        w: Tensor,
        a: Tensor,
        b: Tensor,
        up: Tensor,
    }

    impl LoraOperands {
        fn random(n: usize, i: usize, o: usize, r: usize) -> LoraOperands {
            let randn = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            LoraOperands { x: randn((n, i)), w: randn((o, i)), a: randn((r, i)), b: randn((o, r)), up: randn((n, o)) }
        }
    }

    /// The fused op against frozen_linear plus candle's products, with the input tracked (a
    /// later block) and untracked (the first block, whose input comes from the frozen embedding).
    #[test]
    fn lora_linear_matches_the_composition_in_value_and_gradient() {
        assert!(crate::blas::blas().is_some(), "this test needs BLAS: run scripts/setup.sh python");
        let scale = 2.5;
        let LoraOperands { x, w, a, b, up } = LoraOperands::random(9, 12, 10, 3);
        for x_tracked in [true, false] {
            let vars = |t: &Tensor| Var::from_tensor(t).unwrap();
            let (x1, a1, b1) = (vars(&x), vars(&a), vars(&b));
            let (x2, a2, b2) = (vars(&x), vars(&a), vars(&b));
            let (xi1, xi2) =
                if x_tracked { (x1.as_tensor().clone(), x2.as_tensor().clone()) } else { (x.clone(), x.clone()) };
            let fused = lora_linear(&xi1, FrozenWeight::exact(&w), a1.as_tensor(), b1.as_tensor(), scale)
                .unwrap()
                .expect("fused on the CPU");
            let base = frozen_linear(&xi2, FrozenWeight::exact(&w)).unwrap();
            let delta = (xi2.matmul(&a2.as_tensor().t().unwrap()).unwrap() * scale)
                .unwrap()
                .matmul(&b2.as_tensor().t().unwrap())
                .unwrap();
            let plain = (base + delta).unwrap();
            assert!(max_diff(&fused, &plain) < 1e-4, "values differ by {}", max_diff(&fused, &plain));
            let gf = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (&plain * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, f, p) in [("a", &a1, &a2), ("b", &b1, &b2)] {
                let d = max_diff(gf.get(f.as_tensor()).unwrap(), gp.get(p.as_tensor()).unwrap());
                assert!(d < 1e-4, "d{name} differs by {d} (x tracked: {x_tracked})");
            }
            if x_tracked {
                let d = max_diff(gf.get(x1.as_tensor()).unwrap(), gp.get(x2.as_tensor()).unwrap());
                assert!(d < 1e-4, "dx differs by {d}");
            }
            // Nothing else gets a gradient: not w, and not x when it is not tracked.
            assert!(gf.get(&w).is_none());
            assert_eq!(gf.get_ids().count(), if x_tracked { 4 } else { 3 });
        }
    }

    #[test]
    fn fused_row_ops_match_candles_composition_in_value_and_gradient() {
        let x = (Tensor::randn(0f32, 3.0, (3, 5, 17), &Device::Cpu).unwrap() + 0.3).unwrap();
        let alpha = Tensor::randn(1f32, 0.2, 17, &Device::Cpu).unwrap();
        type F = Box<dyn Fn(&Tensor) -> Tensor>;
        let a2 = alpha.clone();
        let cases: Vec<(&str, F, F)> = vec![
            (
                "softmax",
                Box::new(|t| softmax_last_dim(t).unwrap()),
                Box::new(|t| candle_nn::ops::softmax(t, D::Minus1).unwrap()),
            ),
            (
                "log_softmax",
                Box::new(|t| log_softmax(t).unwrap()),
                Box::new(|t| {
                    let z = t.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
                    t.broadcast_sub(&z).unwrap()
                }),
            ),
            (
                "rms_norm",
                Box::new(move |t| rms_norm(t, &alpha, 1e-5).unwrap()),
                Box::new(move |t| candle_nn::ops::rms_norm_slow(t, &a2, 1e-5).unwrap()),
            ),
        ];
        for (name, fused, composed) in cases {
            let v1 = Var::from_tensor(&x).unwrap();
            let v2 = Var::from_tensor(&x).unwrap();
            let y1 = fused(v1.as_tensor());
            let y2 = composed(v2.as_tensor());
            assert!(max_diff(&y1, &y2) < 1e-5, "{name}: values differ by {}", max_diff(&y1, &y2));
            let w = Tensor::randn(0f32, 1.0, y1.shape(), &Device::Cpu).unwrap();
            let g1 = (&y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (g1, g2) = (g1.get(v1.as_tensor()).unwrap(), g2.get(v2.as_tensor()).unwrap());
            assert!(max_diff(g1, g2) < 1e-4, "{name}: gradients differ by {}", max_diff(g1, g2));
        }
    }

    #[test]
    fn masked_softmax_equals_softmax_of_the_masked_scores() {
        let (b, h, t, tk) = (2, 3, 4, 5);
        let x = Tensor::randn(0f32, 2.0, (b, h, t, tk), &Device::Cpu).unwrap();
        let mask = Tensor::randn(0f32, 1.0, (b, t, tk), &Device::Cpu).unwrap();
        let mask = mask.ge(0.5).unwrap().to_dtype(DType::F32).unwrap().affine(-1e30, 0.0).unwrap();
        let (v1, v2) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
        let y1 = masked_softmax(v1.as_tensor(), &mask).unwrap();
        let y2 =
            candle_nn::ops::softmax(&v2.as_tensor().broadcast_add(&mask.unsqueeze(1).unwrap()).unwrap(), D::Minus1)
                .unwrap();
        assert!(max_diff(&y1, &y2) < 1e-6);
        let w = Tensor::randn(0f32, 1.0, (b, h, t, tk), &Device::Cpu).unwrap();
        let g1 = (&y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(v1.as_tensor()).unwrap(), g2.get(v2.as_tensor()).unwrap()) < 1e-5);
    }

    #[test]
    fn log_softmax_is_exact_where_softmax_underflows() {
        let x = Tensor::new(&[[0f32, -200.0, 1000.0]], &Device::Cpu).unwrap();
        let lp = log_softmax(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(lp[0], vec![-1000.0, -1200.0, 0.0]);
    }

    #[test]
    fn rope_backward_is_the_inverse_rotation() {
        let (b, t, h, d) = (2, 3, 2, 8);
        let x = Tensor::randn(0f32, 1.0, (b, t, h, d), &Device::Cpu).unwrap();
        let ang = Tensor::randn(0f32, 2.0, (b, t, d / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let composed = |t: &Tensor| {
            let c = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().unsqueeze(2).unwrap();
            let s = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().unsqueeze(2).unwrap();
            let x1 = t.narrow(D::Minus1, 0, d / 2).unwrap();
            let x2 = t.narrow(D::Minus1, d / 2, d / 2).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (t.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
        };
        let w = Tensor::randn(0f32, 1.0, (b, t, h, d), &Device::Cpu).unwrap();
        let (v1, v2) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&x).unwrap());
        let y1 = rope(v1.as_tensor(), &cos, &sin).unwrap();
        let y2 = composed(v2.as_tensor());
        assert!(max_diff(&y1, &y2) < 1e-5);
        let g1 = (&y1 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(v1.as_tensor()).unwrap(), g2.get(v2.as_tensor()).unwrap()) < 1e-5);
    }

    #[test]
    fn frozen_linear_gives_the_input_gradient_only() {
        let x = Tensor::randn(0f32, 1.0, (5, 7), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 7), &Device::Cpu).unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let y = frozen_linear(v.as_tensor(), FrozenWeight::exact(&w)).unwrap();
        assert!(max_diff(&y, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-5);
        let g = y.sum_all().unwrap().backward().unwrap();
        // d/dx Σ x·Wᵀ = 1 · W, the same for every row.
        let expect = Tensor::ones((5, 4), DType::F32, &Device::Cpu).unwrap().matmul(&w).unwrap();
        assert!(max_diff(g.get(v.as_tensor()).unwrap(), &expect) < 1e-5);
        assert!(g.get(&w).is_none());
    }

    /// `t` with every element rounded to bf16 (still f32).
    fn rounded(t: &Tensor) -> Tensor {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r: Vec<f32> = v.iter().map(|&x| crate::bf16::from_bf16(crate::bf16::to_bf16(x))).collect();
        Tensor::from_vec(r, t.shape(), t.device()).unwrap()
    }

    /// With a bf16 copy of the weight, the frozen products (forward, the input's gradient, and
    /// the untracked product) are those of the bf16-rounded operands accumulated in f32, the
    /// adapter's own products stay f32, and the results differ from the f32 path's.
    #[test]
    fn products_by_a_bf16_copy_round_both_operands_and_leave_the_adapter_in_f32() {
        crate::blas::bf16_blas().expect(crate::bf16::NO_BF16_BLAS);
        assert!(crate::blas::blas().is_some(), "the fused LoRA op needs BLAS: run scripts/setup.sh python");
        let scale = 0.7;
        let LoraOperands { x, w, a, b, up } = LoraOperands::random(6, 40, 24, 3);
        let w16 = Arc::new(Bf16Matrix::from_tensor(&w).unwrap());
        let frozen = FrozenWeight { tensor: &w, bf16: Some(&w16) };
        let (xr, wr) = (rounded(&x), rounded(&w));
        let base = xr.matmul(&wr.t().unwrap()).unwrap();

        // The untracked product, and the tracked one with its gradient.
        assert!(max_diff(&frozen_linear(&x, frozen).unwrap(), &base) < 1e-5);
        let v = Var::from_tensor(&x).unwrap();
        let y = frozen_linear(v.as_tensor(), frozen).unwrap();
        assert!(max_diff(&y, &base) < 1e-5);
        assert!(max_diff(&y, &x.matmul(&w.t().unwrap()).unwrap()) > 1e-3, "the f32 product was used");
        let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = rounded(&up).matmul(&wr).unwrap();
        assert!(max_diff(g.get(v.as_tensor()).unwrap(), &dx) < 1e-5);

        // The fused LoRA op: the base product in bf16, u = x·aᵀ and the rest in f32.
        let (xv, av, bv) =
            (Var::from_tensor(&x).unwrap(), Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
        let y = lora_linear(xv.as_tensor(), frozen, av.as_tensor(), bv.as_tensor(), scale).unwrap().unwrap();
        let u = x.matmul(&a.t().unwrap()).unwrap();
        let want = (&base + (u.matmul(&b.t().unwrap()).unwrap() * scale).unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-4);
        let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        // dx = g·w (bf16) + s·(g·b)·a (f32); db = s·gᵀ·u and da = s·(g·b)ᵀ·x, both f32.
        let gu = (up.matmul(&b).unwrap() * scale).unwrap();
        let want_dx = (&dx + gu.matmul(&a).unwrap()).unwrap();
        assert!(max_diff(g.get(xv.as_tensor()).unwrap(), &want_dx) < 1e-4);
        let want_db = (up.t().unwrap().matmul(&u).unwrap() * scale).unwrap();
        assert!(max_diff(g.get(bv.as_tensor()).unwrap(), &want_db) < 1e-4);
        let want_da = gu.t().unwrap().matmul(&x).unwrap();
        assert!(max_diff(g.get(av.as_tensor()).unwrap(), &want_da) < 1e-4);
    }
}
