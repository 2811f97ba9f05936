//! Frozen-weight products in bf16 with f32 accumulation, for CPUs that multiply bf16 in hardware.
//!
//! On a CPU with AVX512-BF16 (and AMX-BF16 on the newer Xeons), PyTorch's bf16 autocast trains a
//! LoRA step about 1.7 times as fast as f32 (issue 21: 3.05 against 5.19 s on a 2-core Xeon). Most
//! of that time is the products by the frozen base weights: `x · Wᵀ` forward and `g · W` for the
//! input's gradient. With [`MatmulPrecision::Bf16`] those products take both operands rounded to
//! bf16 (round to nearest, ties to even) and accumulate in f32, through a BLAS that has such a
//! product: oneMKL's `cblas_gemm_bf16bf16f32` (the PyPI wheel `mkl`, which `scripts/setup.sh bf16`
//! puts into `.venv`) or OpenBLAS's `cblas_sbgemm` (a build with `BUILD_BFLOAT16`); see
//! [`crate::blas::bf16_blas`]. Everything else stays f32, as in mixed-precision training: the
//! adapters and their products, the optimiser state, the activations between ops, attention,
//! norms and losses. The base keeps its f32 tensors too (generation quantises from them); the bf16
//! copy costs half the base's f32 size again.
//!
//! The precision is chosen at run time ([`MatmulPrecision::for_this_machine`]): bf16 where the CPU
//! has AVX512-BF16 and a bf16 BLAS is found, f32 elsewhere; `ETPO_MATMUL=f32|bf16|auto` overrides
//! (auto is the default). On a CPU without bf16 instructions the library converts the operands
//! back to f32 itself, which is no faster than an f32 product, so auto keeps f32 there.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// The precision of the products by a model's frozen base weights on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 operands and accumulation (every CPU).
    F32,
    /// bf16 operands, f32 accumulation (needs a bf16 BLAS, see the module docs).
    Bf16,
}

impl MatmulPrecision {
    /// What this process should use: `ETPO_MATMUL` when set (`f32`, `bf16` or `auto`), else
    /// `auto`: bf16 when the CPU has AVX512-BF16 and a bf16 BLAS is loaded, f32 otherwise.
    ///
    /// # Errors
    /// `ETPO_MATMUL` names something else, or asks for bf16 where no bf16 BLAS is found.
    pub fn for_this_machine() -> Result<MatmulPrecision> {
        let asked = std::env::var("ETPO_MATMUL").unwrap_or_default();
        match asked.trim() {
            "" | "auto" => Ok(if cpu_multiplies_bf16() && crate::blas::bf16_blas().is_some() {
                MatmulPrecision::Bf16
            } else {
                MatmulPrecision::F32
            }),
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => match crate::blas::bf16_blas() {
                Some(_) => Ok(MatmulPrecision::Bf16),
                None => Err(ModelError::Invalid(format!("ETPO_MATMUL=bf16: {}", NO_BF16_BLAS))),
            },
            other => Err(ModelError::Invalid(format!("ETPO_MATMUL={other:?}: expected f32, bf16 or auto"))),
        }
    }

    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

/// The path (or name) of the bf16 BLAS this process loaded, if any.
pub fn library() -> Option<&'static str> {
    crate::blas::bf16_blas().map(|b| b.name())
}

/// Why bf16 products are not available, and how to get them.
pub(crate) const NO_BF16_BLAS: &str = "no BLAS with bf16 products was found (oneMKL's \
    cblas_gemm_bf16bf16f32 or OpenBLAS's cblas_sbgemm): install one into .venv with \
    `scripts/setup.sh bf16`, or point ETPO_BF16_BLAS at one";

/// Whether this CPU multiplies bf16 in hardware (AVX512-BF16; every CPU with AMX-BF16 has it too).
pub fn cpu_multiplies_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bf16 (the upper 16 bits of an f32), to nearest with ties to even, as PyTorch
/// and the CPU's own conversion (`vcvtneps2bf16`) round. NaN stays NaN (quiet); infinities and
/// values beyond bf16's largest finite value become infinities, as in any rounding to nearest.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let lsb = (bits >> 16) & 1;
    ((bits + 0x7fff + lsb) >> 16) as u16
}

/// The f32 value of a bf16 number (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to bf16 element by element, in parallel when it is long.
pub(crate) fn round_all(x: &[f32]) -> Vec<u16> {
    const CHUNK: usize = 1 << 16;
    if x.len() <= CHUNK {
        return x.iter().map(|&v| to_bf16(v)).collect();
    }
    let mut out = vec![0u16; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        o.iter_mut().zip(x).for_each(|(o, &v)| *o = to_bf16(v));
    });
    out
}

/// A row-major matrix of bf16 numbers: the bf16 copy of a frozen weight.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    bits: Vec<u16>,
    rows: usize,
    cols: usize,
}

impl Bf16Matrix {
    /// The bf16 copy of a 2-D f32 CPU tensor.
    ///
    /// # Errors
    /// `w` is not a 2-D f32 tensor on the CPU.
    pub fn from_tensor(w: &Tensor) -> Result<Bf16Matrix> {
        if !matches!(w.device(), Device::Cpu) || w.dtype() != DType::F32 || w.rank() != 2 {
            return Err(ModelError::Invalid(format!(
                "bf16 products need 2-D f32 CPU weights, got {:?} {:?} on {:?}",
                w.dims(),
                w.dtype(),
                w.device()
            )));
        }
        let (rows, cols) = w.dims2()?;
        let v = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Bf16Matrix { bits: round_all(&v), rows, cols })
    }

    /// `(rows, columns)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The elements, row after row.
    pub fn bits(&self) -> &[u16] {
        &self.bits
    }
}

/// A frozen weight `[out, in]` as the products see it: its tensor, and the bf16 copy that takes
/// its place in the CPU products when the model multiplies in bf16.
#[derive(Debug, Clone, Copy)]
pub struct FrozenWeight<'a> {
    /// The weight itself (f32 on the CPU, bf16 on CUDA).
    pub tensor: &'a Tensor,
    /// Its bf16 copy, where products by it run in bf16 ([`MatmulPrecision::Bf16`]).
    pub bf16: Option<&'a Arc<Bf16Matrix>>,
}

impl<'a> FrozenWeight<'a> {
    /// A weight whose products run in its own dtype.
    pub fn exact(tensor: &'a Tensor) -> FrozenWeight<'a> {
        FrozenWeight { tensor, bf16: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_bf16_is_to_nearest_with_ties_to_even() {
        // 1 + 2^-8 lies halfway between 1 (0x3F80) and 1 + 2^-7 (0x3F81): ties go to the even 0x3F80.
        assert_eq!(to_bf16(1.0), 0x3F80);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2^-8 lies halfway between 0x3F81 and 0x3F82: to the even 0x3F82.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        // Just above the halfway point rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(to_bf16(f32::from_bits(0x3F80_7FFF)), 0x3F80);
        assert_eq!(to_bf16(-2.0), 0xC000);
        assert_eq!(to_bf16(0.0), 0);
        assert_eq!(to_bf16(f32::INFINITY), 0x7F80);
        // The largest f32 is beyond bf16's largest finite value (0x7F7F) by more than half a step.
        assert_eq!(to_bf16(f32::MAX), 0x7F80);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        // A NaN whose payload sits only in the low bits must not become an infinity.
        assert!(from_bf16(to_bf16(f32::from_bits(0x7F80_0001))).is_nan());
        assert_eq!(from_bf16(0x3F81), 1.0078125);
    }

    #[test]
    fn rounding_a_long_slice_in_parallel_matches_element_by_element() {
        let x: Vec<f32> = (0..200_000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let all = round_all(&x);
        assert!(all.iter().zip(&x).all(|(&b, &v)| b == to_bf16(v)));
    }

    #[test]
    fn a_bf16_copy_keeps_shape_and_rounds_each_element() {
        let w = Tensor::from_vec(vec![1.0f32, -2.0, 1.0 + 3.0 / 256.0, 0.5, 3.0, 7.0], (2, 3), &Device::Cpu).unwrap();
        let m = Bf16Matrix::from_tensor(&w).unwrap();
        assert_eq!(m.dims(), (2, 3));
        assert_eq!(m.bits(), &[0x3F80, 0xC000, 0x3F82, 0x3F00, 0x4040, 0x40E0]);
        assert!(Bf16Matrix::from_tensor(&w.to_dtype(DType::BF16).unwrap()).is_err());
    }
}
