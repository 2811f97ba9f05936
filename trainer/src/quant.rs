//! Weight matrices in blocks of 32 for sampling, multiplied by f32 activations.
//!
//! Two formats, both one row of blocks after another, with f32 scales:
//! - [`Format::Q4`], exact: `w = q · d + m` with `q` in 0..=15 (Q4_1's form). A matrix whose f32
//!   values have exactly this form, block by block, as they do when the f32 base was dequantised
//!   from a Q4_1 GGUF (the default model's projections), is stored this way without any rounding:
//!   0.75 bytes per weight;
//! - [`Format::Q8`]: `w ≈ q · d` with `q = round(w / d)` (ties to even), `d = max |w| / 127`
//!   (Q8_0's form), for any other matrix: 1.125 bytes per weight. A matrix dequantised from Q8_0
//!   (the default model's embedding, its output projection) comes back exactly.
//!
//! [`QMatrix::matmul_t`] turns each block back into f32 in registers (`q · d + m`, the arithmetic
//! of candle's dequantisation, so an exact copy gives back the very f32 weights) and multiplies
//! it by the activations in f32: only the weights' storage changes, the activations are not
//! rounded. Decoding on the CPU reads every weight once per step, 4 bytes each in f32 and 0.75 or
//! 1.125 here. The kernels use AVX-512 or AVX2 with FMA, chosen at run time
//! (`ETPO_QUANT_ISA=avx2|scalar` forces a lesser one), else a scalar loop.
//!
//! Every path computes the same bits (see [`scalar_dot`] for the order of the sums), and each
//! output element is computed by one thread whatever the split over threads and the number of
//! rows, so a row's result does not depend on the other rows of the batch.

use rayon::prelude::*;

use crate::blas::{threads, Shared};

/// Values per block.
pub const BLOCK: usize = 32;

/// How a weight matrix is stored (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `q · d + m`, `q` in 0..=15, exact.
    Q4,
    /// `q · d`, `q` in -127..=127, rounded.
    Q8,
}

/// Rounds each block of 32 of `v` to `round(v · 127 / max |v|)` (ties to even) with scale
/// `max |v| / 127`: the values and the scales.
fn quantize_q8(v: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut qs = vec![0i8; v.len()];
    let mut scales = vec![0f32; v.len() / BLOCK];
    qs.par_chunks_mut(BLOCK).zip(scales.par_iter_mut()).zip(v.par_chunks(BLOCK)).for_each(|((q, d), v)| {
        let amax = v.iter().fold(0f32, |m, &x| m.max(x.abs()));
        *d = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (q, &x) in q.iter_mut().zip(v) {
            // |x · inv| <= 127 up to rounding, which the saturating cast absorbs.
            *q = (x * inv).round_ties_even() as i8;
        }
    });
    (qs, scales)
}

/// `(d, m, q)` with `q as f32 · d + m == v[i]` bit for bit (the f32 arithmetic of candle's Q4_1
/// dequantisation), `q` in 0..=15, if the block has that form: `m` its smallest value, `d` the
/// half-precision number nearest `(max - min) / 15` (or `/ 14`, ... when that fails).
fn exact_q4(v: &[f32]) -> Option<(f32, f32, [u8; BLOCK])> {
    let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !(lo.is_finite() && hi.is_finite()) {
        return None;
    }
    // Q4_1's quantiser maps the largest value to 15; try smaller tops for blocks that have none.
    'top: for top in (1..=15).rev() {
        let d = half_round((hi - lo) / top as f32);
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; BLOCK];
        for (q, &x) in q.iter_mut().zip(v) {
            // x >= lo, so truncating after adding 1/2 rounds; the check below decides.
            let k = ((x - lo) * inv + 0.5) as u32;
            if k > 15 || k as f32 * d + lo != x {
                continue 'top;
            }
            *q = k as u8;
        }
        return Some((d, lo, q));
    }
    None
}

/// `x` rounded to the nearest half-precision value (ties to even), as an f32.
fn half_round(x: f32) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let e = x.abs().log2().floor().max(-14.0);
    // Half precision keeps 10 fraction bits; below 2^-14 the spacing stays 2^-24.
    let ulp = (e - 10.0).exp2();
    (x / ulp).round_ties_even() * ulp
}

/// A `[n, k]` weight matrix (`n` output rows of `k` inputs, as a linear layer's) in blocks.
///
/// Each row is stored as one run of bytes, so that a kernel reads one stream per row:
/// [`Format::Q8`]: its `k` values (i8), then its `k / 32` scales (native-endian f32);
/// [`Format::Q4`]: 16 bytes per block (byte `i` holds value `i` in its low half and value
/// `16 + i` in its high half, as in a GGUF), then the scales `d`, then the minimums `m`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    /// Bytes per row.
    stride: usize,
    rows: Vec<u8>,
}

impl QMatrix {
    /// A row-major `[n, k]` matrix in [`Format::Q4`] if every block of it has that form exactly,
    /// else in [`Format::Q8`]. `k` must be a multiple of [`BLOCK`].
    ///
    /// # Panics
    /// When `w` is not `n · k` long or `k` is not a multiple of [`BLOCK`].
    pub fn new(w: &[f32], n: usize, k: usize) -> QMatrix {
        QMatrix::exact_q4(w, n, k).unwrap_or_else(|| QMatrix::q8(w, n, k))
    }

    /// [`Format::Q8`].
    ///
    /// # Panics
    /// As [`QMatrix::new`].
    pub fn q8(w: &[f32], n: usize, k: usize) -> QMatrix {
        check_shape(w, n, k);
        let (qs, scales) = quantize_q8(w);
        let nb = k / BLOCK;
        let stride = k + 4 * nb;
        let mut rows = vec![0u8; n * stride];
        for (j, row) in rows.chunks_mut(stride).enumerate() {
            let (q, d) = row.split_at_mut(k);
            q.iter_mut().zip(&qs[j * k..(j + 1) * k]).for_each(|(o, &v)| *o = v as u8);
            put_f32s(d, &scales[j * nb..(j + 1) * nb]);
        }
        QMatrix { format: Format::Q8, n, k, stride, rows }
    }

    /// [`Format::Q4`], or `None` when a block does not have that form exactly.
    ///
    /// # Panics
    /// As [`QMatrix::new`].
    pub fn exact_q4(w: &[f32], n: usize, k: usize) -> Option<QMatrix> {
        check_shape(w, n, k);
        let nb = k / BLOCK;
        let stride = k / 2 + 8 * nb;
        let blocks: Vec<(f32, f32, [u8; BLOCK])> = w.par_chunks(BLOCK).map(exact_q4).collect::<Option<_>>()?;
        let mut rows = vec![0u8; n * stride];
        for (j, row) in rows.chunks_mut(stride).enumerate() {
            let blk = &blocks[j * nb..(j + 1) * nb];
            let (q, rest) = row.split_at_mut(k / 2);
            let (d, m) = rest.split_at_mut(4 * nb);
            for (out, b) in q.chunks_mut(BLOCK / 2).zip(blk) {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = b.2[i] | (b.2[i + BLOCK / 2] << 4);
                }
            }
            put_f32s(d, &blk.iter().map(|b| b.0).collect::<Vec<_>>());
            put_f32s(m, &blk.iter().map(|b| b.1).collect::<Vec<_>>());
        }
        Some(QMatrix { format: Format::Q4, n, k, stride, rows })
    }

    /// How the weights are stored.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.rows.len()
    }

    /// Row `j`'s weights in f32 as the kernels make them: `q · d + m` (Q4) or `q · d` (Q8).
    fn row(&self, j: usize) -> Vec<f32> {
        let (k, nb) = (self.k, self.k / BLOCK);
        let row = &self.rows[j * self.stride..(j + 1) * self.stride];
        match self.format {
            Format::Q8 => {
                let (q, d) = row.split_at(k);
                let d = get_f32s(d);
                q.iter().enumerate().map(|(i, &v)| f32::from(v as i8) * d[i / BLOCK]).collect()
            }
            Format::Q4 => {
                let (q, rest) = row.split_at(k / 2);
                let (d, m) = rest.split_at(4 * nb);
                let (d, m) = (get_f32s(d), get_f32s(m));
                (0..k)
                    .map(|i| {
                        let (b, o) = (i / BLOCK, i % BLOCK);
                        let byte = q[b * BLOCK / 2 + o % (BLOCK / 2)];
                        let v = if o < BLOCK / 2 { byte & 15 } else { byte >> 4 };
                        f32::from(v) * d[b] + m[b]
                    })
                    .collect()
            }
        }
    }

    /// `x · Wᵀ` for a row-major `[m, k]` `x`: a new row-major `[m, n]` matrix.
    ///
    /// # Panics
    /// When `x` is not `m · k` long.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "quant: the input is not [{m}, {k}]");
        let mut y = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return y;
        }
        // Columns in parts of at least 16; below about 2^18 multiply-adds a split costs more than
        // it saves.
        let parts = if m * n * k < (1 << 18) { 1 } else { threads().min(n.div_ceil(16)) };
        let chunk = n.div_ceil(parts).next_multiple_of(16).min(n);
        let out = Shared(y.as_mut_ptr());
        let part = |j0: usize| {
            let j1 = (j0 + chunk).min(n);
            // SAFETY: each part writes only columns j0..j1 of y (m · n elements, alive for the
            // whole call), disjoint between parts.
            unsafe { self.columns(x, m, j0, j1, out) };
        };
        if parts == 1 {
            part(0);
        } else {
            (0..n).step_by(chunk).collect::<Vec<_>>().into_par_iter().for_each(part);
        }
        y
    }

    /// Columns `j0..j1` of `x · Wᵀ` into `y` (`[m, n]`), in chunks of columns whose weights stay
    /// in the core's caches while every group of rows goes through them (the weights are read
    /// from memory once per product). A group takes up to eight rows (AVX-512; two with AVX2) and
    /// for one or two rows, several columns at a time (independent sums to overlap). With
    /// AVX2 and at least [`AVX2_UNPACK_ROWS`] rows, [`simd::avx2_unpacked`] does the work instead.
    ///
    /// # Safety
    /// `y` must point to `m · n` writable f32s that nothing else writes in columns `j0..j1`.
    unsafe fn columns(&self, x: &[f32], m: usize, j0: usize, j1: usize, y: Shared) {
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx2 && m >= AVX2_UNPACK_ROWS {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the caller's contract.
            unsafe {
                match self.format {
                    Format::Q4 => simd::avx2_unpacked::<true>(self, x, m, j0, j1, y),
                    Format::Q8 => simd::avx2_unpacked::<false>(self, x, m, j0, j1, y),
                }
            }
            return;
        }
        let chunk = (COLUMN_CHUNK_BYTES / self.stride).max(4) / 4 * 4;
        let most = if isa() == Isa::Avx512 { 8 } else { 2 };
        for c0 in (j0..j1).step_by(chunk) {
            let c1 = (c0 + chunk).min(j1);
            let mut r0 = 0;
            while r0 < m {
                let rows = match (m - r0).min(most) {
                    8 => 8,
                    4..=7 => 4,
                    r => r,
                };
                // Columns at a time for one or two rows. One row takes four with AVX-512 (two
                // accumulators each) but two with AVX2: four columns of four accumulators would
                // fill all sixteen registers with sums alone, and the spills made the products
                // of a decoding step 1.2-1.5x slower (`probe`).
                let step = match rows {
                    1 if most == 8 => 4,
                    1 | 2 => 2,
                    _ => 1,
                };
                let mid = c0 + (c1 - c0) / step * step;
                let job = Job { w: self, x, r0, y };
                // SAFETY: rows r0..r0 + rows are within x's m rows, columns within j0..j1 (the
                // caller's contract covers y).
                unsafe {
                    match rows {
                        1 if step == 4 => {
                            kernel::<4, 1>(&job, c0, mid);
                            kernel::<1, 1>(&job, mid, c1);
                        }
                        1 => {
                            kernel::<2, 1>(&job, c0, mid);
                            kernel::<1, 1>(&job, mid, c1);
                        }
                        2 => {
                            kernel::<2, 2>(&job, c0, mid);
                            kernel::<1, 2>(&job, mid, c1);
                        }
                        3 => kernel::<1, 3>(&job, c0, c1),
                        4 => kernel::<1, 4>(&job, c0, c1),
                        _ => kernel::<1, 8>(&job, c0, c1),
                    }
                }
                r0 += rows;
            }
        }
    }
}

fn check_shape(w: &[f32], n: usize, k: usize) {
    assert!(k.is_multiple_of(BLOCK), "quant: {k} inputs are not a multiple of {BLOCK}");
    assert_eq!(w.len(), n * k, "quant: the weights are not [{n}, {k}]");
}

fn put_f32s(out: &mut [u8], v: &[f32]) {
    out.chunks_mut(4).zip(v).for_each(|(o, v)| o.copy_from_slice(&v.to_ne_bytes()));
}

fn get_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// How many column groups ahead the kernels prefetch weight rows (measured on a 2-core Xeon:
/// 1 to 4 groups ahead all beat none by about a quarter; 2 and 4 were within noise).
const PF_GROUPS: usize = 2;

/// Bytes of weights per chunk of columns in [`QMatrix::columns`] (well within a core's L2).
const COLUMN_CHUNK_BYTES: usize = 64 * 1024;

/// From how many activation rows the AVX2 path turns each weight row into f32 once and
/// multiplies every row by it ([`simd::avx2_unpacked`]) instead of turning each block back into
/// f32 for every group of rows.
const AVX2_UNPACK_ROWS: usize = 3;

/// What a kernel call works on: the weights, the activations, and where the results go.
struct Job<'a> {
    w: &'a QMatrix,
    x: &'a [f32],
    /// The first activation row of the group.
    r0: usize,
    y: Shared,
}

/// Which kernels the CPU runs (checked once).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    /// AVX-512F (and AVX2, FMA): 16 lanes.
    Avx512,
    /// AVX2 and FMA: 8 lanes.
    Avx2,
    /// Neither: the scalar loop.
    Scalar,
}

fn isa() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let forced = std::env::var("ETPO_QUANT_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if forced != "scalar" && forced != "avx2" && avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if forced != "scalar" && avx2 {
                return Isa::Avx2;
            }
        }
        drop(forced);
        Isa::Scalar
    })
}

/// `y[r0 + r][j + c]` for the `R` activation rows from `job.r0` and the columns `j0..j1` taken
/// `C` at a time (`j1 - j0` a multiple of `C`), as [`scalar_dot`] computes them.
///
/// # Safety
/// `job.y` must point to `[rows of x, n]` writable f32s that nothing else writes in these rows
/// and columns.
unsafe fn kernel<const C: usize, const R: usize>(job: &Job, j0: usize, j1: usize) {
    let (w, k) = (job.w, job.w.k);
    assert!((j1 - j0).is_multiple_of(C) && j1 <= w.n && w.rows.len() == w.n * w.stride, "quant: columns out of range");
    assert!(job.x.len() >= (job.r0 + R) * k, "quant: rows out of range");
    match (isa(), w.format) {
        // SAFETY (all four): the CPU has the features (checked at run time); the rows and
        // columns are within the operands (asserted above) and y is the caller's.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Format::Q8) => unsafe { simd::avx512::<C, R, false>(job, j0, j1) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Format::Q4) => unsafe { simd::avx512::<C, R, true>(job, j0, j1) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Format::Q8) => unsafe { simd::avx2::<C, R, false>(job, j0, j1) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Format::Q4) => unsafe { simd::avx2::<C, R, true>(job, j0, j1) },
        _ => {
            for j in j0..j1 {
                let wr = w.row(j);
                for r in 0..R {
                    let i = job.r0 + r;
                    let v = scalar_dot(&wr, &job.x[i * k..(i + 1) * k]);
                    // SAFETY: (i, j) is within y (the caller's contract).
                    unsafe { *job.y.get().add(i * w.n + j) = v };
                }
            }
        }
    }
}

/// One element of [`kernel`] with plain arithmetic, the reference for the vector paths' bits:
/// 32 lanes, lane `l` accumulating `fma(w_i, x_i, lane)` over `i = l, l + 32, l + 64, ...` in
/// order; then `v_l = lane_l + lane_(l+16)` and `u_l = v_l + v_(l+8)` for `l < 8`, and the result
/// `((u0 + u4) + (u2 + u6)) + ((u1 + u5) + (u3 + u7))`.
fn scalar_dot(w: &[f32], x: &[f32]) -> f32 {
    let mut lanes = [0f32; BLOCK];
    for (i, (&w, &x)) in w.iter().zip(x).enumerate() {
        lanes[i % BLOCK] = w.mul_add(x, lanes[i % BLOCK]);
    }
    let v: [f32; 16] = std::array::from_fn(|l| lanes[l] + lanes[l + 16]);
    let u: [f32; 8] = std::array::from_fn(|l| v[l] + v[l + 8]);
    ((u[0] + u[4]) + (u[2] + u[6])) + ((u[1] + u[5]) + (u[3] + u[7]))
}

// The kernels' loops index several arrays of registers and pointers in step.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{Job, BLOCK, PF_GROUPS};

    /// A value read at any alignment: the packed wrapper makes the read one unaligned load. (The
    /// dev profile keeps debug assertions, and `_mm256_loadu_ps` goes through
    /// `copy_nonoverlapping`, whose checks made these kernels several times slower.)
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned<T>(T);

    /// The value at `p`, at any alignment.
    ///
    /// # Safety
    /// `p` must point to a readable `T`.
    #[inline(always)]
    unsafe fn read<T: Copy, U>(p: *const U) -> T {
        // SAFETY: the caller's contract; the wrapper's alignment is 1.
        unsafe { (*p.cast::<Unaligned<T>>()).0 }
    }

    // Its order, ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)), is the one
    // `super::scalar_dot` sums in.
    use crate::kernels::avx2::hsum;

    /// Where a kernel is in each of its `C` weight rows (values, scales, minimums) and `R`
    /// activation rows, from block 0. Pointers move with `wrapping_add` (no debug checks); the
    /// kernels read only within the rows and columns their callers vouched for.
    struct Walk<const C: usize, const R: usize> {
        wq: [*const u8; C],
        wd: [*const f32; C],
        wm: [*const f32; C],
        x: [*const f32; R],
    }

    impl<const C: usize, const R: usize> Walk<C, R> {
        #[inline(always)]
        fn new(job: &Job, j: usize, q4: bool) -> Self {
            let w = job.w;
            let (k, nb) = (w.k, w.k / BLOCK);
            let values = if q4 { k / 2 } else { k };
            let row = |c: usize| w.rows.as_ptr().wrapping_add((j + c) * w.stride);
            Walk {
                wq: std::array::from_fn(row),
                wd: std::array::from_fn(|c| row(c).wrapping_add(values).cast::<f32>()),
                wm: std::array::from_fn(|c| row(c).wrapping_add(values + 4 * nb).cast::<f32>()),
                x: std::array::from_fn(|r| job.x.as_ptr().wrapping_add((job.r0 + r) * k)),
            }
        }

        /// Moves on by one block.
        #[inline(always)]
        fn advance(&mut self, q4: bool) {
            for c in 0..C {
                self.wq[c] = self.wq[c].wrapping_add(if q4 { BLOCK / 2 } else { BLOCK });
                self.wd[c] = self.wd[c].wrapping_add(1);
                self.wm[c] = self.wm[c].wrapping_add(1);
            }
            for r in 0..R {
                self.x[r] = self.x[r].wrapping_add(BLOCK);
            }
        }

        /// Prefetches, `ahead` bytes on, the rows the column loop reads `PF_GROUPS` iterations
        /// later (the weights are read once, so the hardware prefetchers need the help).
        #[inline(always)]
        fn prefetch(&self, c: usize, stride: usize, ahead: usize) {
            let p = self.wq[c].wrapping_add(PF_GROUPS * C * stride + ahead);
            // SAFETY: prefetching has no effect on memory, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
        }
    }

    /// Writes `v` to `y[r0 + r][j]`.
    ///
    /// # Safety
    /// The element must be within y and the caller's to write.
    #[inline(always)]
    unsafe fn put(job: &Job, r: usize, j: usize, v: f32) {
        let at = (job.r0 + r) * job.w.n + j;
        // SAFETY: the caller's contract.
        unsafe { *job.y.get().wrapping_add(at) = v };
    }

    /// The 32 weights of the block at `p` (scale `d`, minimum `m`) in f32, 16 per vector.
    ///
    /// # Safety
    /// `p` must point to the block's 16 (Q4) or 32 (Q8) bytes, `d` and `m` to readable f32s; the
    /// CPU must have AVX-512F.
    #[target_feature(enable = "avx2,fma,avx512f")]
    #[inline]
    unsafe fn weights16<const Q4: bool>(p: *const u8, d: *const f32, m: *const f32) -> [__m512; 2] {
        // SAFETY: the caller's contract.
        unsafe {
            let dv = _mm512_set1_ps(read(d));
            if Q4 {
                let bytes: __m128i = read(p);
                let mask = _mm_set1_epi8(15);
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
                let mv = _mm512_set1_ps(read(m));
                let f = |v: __m128i| _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)), dv), mv);
                [f(lo), f(hi)]
            } else {
                let f = |v: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), dv);
                [f(read(p)), f(read(p.wrapping_add(16)))]
            }
        }
    }

    /// [`super::kernel`] with AVX-512: per block and weight row, the 32 weights in two vectors
    /// once, then per activation row two FMAs into that (row, column)'s two accumulators (lanes
    /// 0-15 and 16-31 of [`super::scalar_dot`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and FMA; as [`super::kernel`].
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub unsafe fn avx512<const C: usize, const R: usize, const Q4: bool>(job: &Job, j0: usize, j1: usize) {
        let (nb, stride) = (job.w.k / BLOCK, job.w.stride);
        let step = if Q4 { BLOCK / 2 } else { BLOCK };
        let mut j = j0;
        while j < j1 {
            let mut p = Walk::<C, R>::new(job, j, Q4);
            let mut acc = [[[_mm512_setzero_ps(); 2]; R]; C];
            for b in 0..nb {
                for c in 0..C {
                    // Two lines per block cover the next rows' values, scales and minimums.
                    p.prefetch(c, stride, 2 * b * step);
                    p.prefetch(c, stride, 2 * b * step + 64);
                    // SAFETY: block b of every row and column is read (the caller's contract).
                    unsafe {
                        let w = weights16::<Q4>(p.wq[c], p.wd[c], p.wm[c]);
                        for r in 0..R {
                            for (h, &wh) in w.iter().enumerate() {
                                let a = &mut acc[c][r][h];
                                *a = _mm512_fmadd_ps(wh, read(p.x[r].wrapping_add(16 * h)), *a);
                            }
                        }
                    }
                }
                p.advance(Q4);
            }
            for c in 0..C {
                for r in 0..R {
                    let v = _mm512_add_ps(acc[c][r][0], acc[c][r][1]);
                    let lo = _mm512_castps512_ps256(v);
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                    // SAFETY: (r0 + r, j + c) is within y and this call's to write.
                    unsafe { put(job, r, j + c, hsum(_mm256_add_ps(lo, hi))) };
                }
            }
            j += C;
        }
    }

    /// The 32 weights of the block at `p` in f32, 8 per vector; as [`weights16`].
    ///
    /// # Safety
    /// As [`weights16`], with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn weights8<const Q4: bool>(p: *const u8, d: *const f32, m: *const f32) -> [__m256; 4] {
        // SAFETY: the caller's contract.
        unsafe {
            let dv = _mm256_set1_ps(read(d));
            if Q4 {
                let bytes: __m128i = read(p);
                let mask = _mm_set1_epi8(15);
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
                let mv = _mm256_set1_ps(read(m));
                let f = |v: __m128i| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), dv), mv);
                [f(lo), f(_mm_srli_si128::<8>(lo)), f(hi), f(_mm_srli_si128::<8>(hi))]
            } else {
                let f = |o: usize| {
                    let v = _mm_cvtsi64_si128(read::<i64, _>(p.wrapping_add(o)));
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), dv)
                };
                [f(0), f(8), f(16), f(24)]
            }
        }
    }

    /// One dot product from its four 8-lane accumulators (lanes 0-7, ..., 24-31 of
    /// [`super::scalar_dot`]), in that function's order: both AVX2 kernels end with it.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn sum_lanes(a: &[__m256; 4]) -> f32 {
        hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3])))
    }

    /// Writes `v` at `p`, at any alignment.
    ///
    /// # Safety
    /// `p` must point to a writable `T`.
    #[inline(always)]
    unsafe fn write<T: Copy, U>(p: *mut U, v: T) {
        // SAFETY: the caller's contract; the wrapper's alignment is 1.
        unsafe { *p.cast::<Unaligned<T>>() = Unaligned(v) };
    }

    /// Columns `j0..j1` of `x · Wᵀ` for all `m` rows of `x` with AVX2, for batches of several
    /// rows: each weight row is turned into f32 once, into a buffer that stays in the L1 cache,
    /// and the activation rows are multiplied by it three at a time. Each dot product needs four
    /// accumulators (lanes 0-7, ..., 24-31 of [`super::scalar_dot`]), so three rows take twelve
    /// of AVX2's sixteen registers; [`avx2`] instead turns every block back into f32 again for
    /// each pair of rows, which costs more than the products. The sums are [`avx2`]'s, in its
    /// order: the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` must hold `m` rows of `w.k`, and `y` must point to
    /// `[m, w.n]` writable f32s that nothing else writes in columns `j0..j1 <= w.n`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2_unpacked<const Q4: bool>(
        w: &super::QMatrix,
        x: &[f32],
        m: usize,
        j0: usize,
        j1: usize,
        y: super::Shared,
    ) {
        let k = w.k;
        assert!(j1 <= w.n && w.rows.len() == w.n * w.stride && x.len() >= m * k, "quant: out of range");
        let mut unpacked = vec![0f32; k];
        let u = unpacked.as_mut_ptr();
        let job = Job { w, x, r0: 0, y };
        for j in j0..j1 {
            let mut p = Walk::<1, 0>::new(&job, j, Q4);
            for b in 0..k / BLOCK {
                // SAFETY: block b of row j (within the matrix, asserted) is read; u holds k f32s.
                unsafe {
                    let v = weights8::<Q4>(p.wq[0], p.wd[0], p.wm[0]);
                    for (h, &vh) in v.iter().enumerate() {
                        write(u.wrapping_add(b * BLOCK + 8 * h), vh);
                    }
                }
                p.advance(Q4);
            }
            let mut r0 = 0;
            while r0 < m {
                // SAFETY: rows r0.. of x and column j of y (the caller's contract); u holds row j.
                r0 += unsafe {
                    match m - r0 {
                        1 => dot_rows::<1>(u, x, k, r0, j, w.n, y),
                        2 => dot_rows::<2>(u, x, k, r0, j, w.n, y),
                        _ => dot_rows::<3>(u, x, k, r0, j, w.n, y),
                    }
                };
            }
        }
    }

    /// `y[r0 + r][j] = u · x[r0 + r]` for `R` rows, in [`super::scalar_dot`]'s order; returns `R`.
    ///
    /// # Safety
    /// As [`avx2_unpacked`]; `u` must hold `k` f32s and rows `r0..r0 + R` must be within `x`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_rows<const R: usize>(
        u: *const f32,
        x: &[f32],
        k: usize,
        r0: usize,
        j: usize,
        n: usize,
        y: super::Shared,
    ) -> usize {
        let mut xs: [*const f32; R] = std::array::from_fn(|r| x.as_ptr().wrapping_add((r0 + r) * k));
        let mut up = u;
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for _ in 0..k / BLOCK {
            for h in 0..4 {
                // SAFETY: lanes 8h.. of the current block are within u and within each row
                // (the caller's contract; the pointers move on by one block per iteration).
                unsafe {
                    let wv: __m256 = read(up.wrapping_add(8 * h));
                    for r in 0..R {
                        acc[r][h] = _mm256_fmadd_ps(wv, read(xs[r].wrapping_add(8 * h)), acc[r][h]);
                    }
                }
            }
            up = up.wrapping_add(BLOCK);
            for p in xs.iter_mut() {
                *p = p.wrapping_add(BLOCK);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: (r0 + r, j) is within y and the caller's to write.
            unsafe { *y.get().wrapping_add((r0 + r) * n + j) = sum_lanes(a) };
        }
        R
    }

    /// [`super::kernel`] with AVX2: as [`avx512`] with four 8-lane accumulators per (row,
    /// column), lanes 0-7, 8-15, 16-23 and 24-31 of [`super::scalar_dot`].
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; as [`super::kernel`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2<const C: usize, const R: usize, const Q4: bool>(job: &Job, j0: usize, j1: usize) {
        let (nb, stride) = (job.w.k / BLOCK, job.w.stride);
        let step = if Q4 { BLOCK / 2 } else { BLOCK };
        let mut j = j0;
        while j < j1 {
            let mut p = Walk::<C, R>::new(job, j, Q4);
            let mut acc = [[[_mm256_setzero_ps(); 4]; R]; C];
            for b in 0..nb {
                for c in 0..C {
                    p.prefetch(c, stride, 2 * b * step);
                    p.prefetch(c, stride, 2 * b * step + 64);
                    // SAFETY: block b of every row and column is read (the caller's contract).
                    unsafe {
                        let w = weights8::<Q4>(p.wq[c], p.wd[c], p.wm[c]);
                        for r in 0..R {
                            for (h, &wh) in w.iter().enumerate() {
                                let a = &mut acc[c][r][h];
                                *a = _mm256_fmadd_ps(wh, read(p.x[r].wrapping_add(8 * h)), *a);
                            }
                        }
                    }
                }
                p.advance(Q4);
            }
            for c in 0..C {
                for r in 0..R {
                    // SAFETY: (r0 + r, j + c) is within y and this call's to write.
                    unsafe { put(job, r, j + c, sum_lanes(&acc[c][r])) };
                }
            }
            j += C;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(n: usize, k: usize, seed: f32) -> Vec<f32> {
        (0..n * k).map(|i| (i as f32 * 0.37 + seed).sin() * 0.1).collect()
    }

    /// A matrix of Q4_1's form: per block, `q · d + m` in f32 with half-precision `d` and `m`.
    pub(super) fn q4_matrix(n: usize, k: usize, seed: u32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * k);
        for b in 0..n * k / BLOCK {
            let x = (b as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            let d = half_round(0.001 + (x % 97) as f32 * 1e-4);
            let m = half_round(-((x % 89) as f32) * 7e-4);
            for i in 0..BLOCK {
                let q = ((x >> (i % 16)) as usize + i * 7) % 16;
                // Each block has a minimum (q = 0) and a maximum (q = 15), as Q4_1's quantiser
                // makes, except every fifth, whose top is 12.
                let q = match i {
                    0 => 0,
                    1 if b % 5 == 0 => 12,
                    1 => 15,
                    _ if b % 5 == 0 => q % 13,
                    _ => q,
                };
                out.push(q as f32 * d + m);
            }
        }
        out
    }

    fn stored(q: &QMatrix) -> Vec<f32> {
        (0..q.n).flat_map(|j| q.row(j)).collect()
    }

    #[test]
    fn q8_rounds_each_block_to_its_scale() {
        let (n, k) = (3, 64);
        let w = matrix(n, k, 1.0);
        let q = QMatrix::new(&w, n, k);
        assert_eq!(q.format(), Format::Q8);
        for (blk, (w, b)) in w.chunks(BLOCK).zip(stored(&q).chunks(BLOCK)).enumerate() {
            let amax = w.iter().fold(0f32, |m, &v| m.max(v.abs()));
            // Round to nearest: at most half a step of d = amax / 127 (plus f32 rounding).
            for (x, y) in w.iter().zip(b) {
                assert!((x - y).abs() <= amax / 254.0 * 1.0001, "block {blk}: {x} vs {y}");
            }
        }
        assert_eq!(q.size_in_bytes(), n * k + 4 * n * k / BLOCK);
        assert_eq!(QMatrix::q8(&[0.0; 32], 1, 32).row(0), vec![0.0; 32]);
        // Ties go to even: 0.5, 1.5 and -2.5 steps.
        let mut v = [0f32; 32];
        v[..4].copy_from_slice(&[127.0, 0.5, 1.5, -2.5]);
        assert_eq!(&QMatrix::q8(&v, 1, 32).row(0)[..4], &[127.0, 0.0, 2.0, -2.0]);
        // A Q8_0-dequantised matrix (half-precision scale times -127..=127, the largest 127)
        // comes back exactly.
        let d = half_round(0.0123);
        let q = |i: usize| if i.is_multiple_of(32) { 127.0 } else { ((i * 37) % 255) as f32 - 127.0 };
        let v: Vec<f32> = (0..64).map(|i| q(i) * d).collect();
        assert_eq!(stored(&QMatrix::q8(&v, 1, 64)), v);
    }

    #[test]
    fn q4_form_is_found_exactly_or_not_at_all() {
        for (n, k) in [(5, 96), (3, 128)] {
            let w = q4_matrix(n, k, 7);
            let q = QMatrix::new(&w, n, k);
            assert_eq!(q.format(), Format::Q4, "{n}x{k}");
            assert_eq!(stored(&q), w, "{n}x{k}: not exact");
            assert_eq!(q.size_in_bytes(), n * (k / 2 + 8 * k / BLOCK));
        }
        // One value off the grid: the whole matrix is 8-bit.
        let mut w = q4_matrix(2, 64, 3);
        w[40] += 1e-3;
        assert_eq!(QMatrix::new(&w, 2, 64).format(), Format::Q8);
        assert_eq!(QMatrix::new(&matrix(2, 64, 0.0), 2, 64).format(), Format::Q8);
        // Constant blocks (d = 0).
        assert_eq!(stored(&QMatrix::new(&[0.25; 64], 2, 32)), vec![0.25; 64]);
        assert_eq!(half_round(1.0 + 1.0 / 4096.0), 1.0);
        assert_eq!(half_round(1.0 + 3.0 / 2048.0), 1.0 + 2.0 / 1024.0);
    }

    /// The product against its definition with the stored weights, every kernel shape, the split
    /// over threads, both formats, and the scalar loop's bits.
    #[test]
    fn product_is_the_f32_product_with_the_stored_weights() {
        for &(m, n, k) in &[(1, 5, 32), (2, 7, 64), (3, 40, 64), (5, 33, 96), (9, 600, 256), (16, 70, 64)] {
            let x = matrix(m, k, 2.0);
            for w in [matrix(n, k, 0.5), q4_matrix(n, k, 11)] {
                let q = QMatrix::new(&w, n, k);
                let wd = stored(&q);
                let y = q.matmul_t(&x, m);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|l| f64::from(x[i * k + l]) * f64::from(wd[j * k + l])).sum();
                        let got = y[i * n + j];
                        let what = format!("{:?} {m}x{n}x{k} at ({i}, {j})", q.format());
                        assert!((f64::from(got) - want).abs() < 1e-5, "{what}: {got} vs {want}");
                        let s = scalar_dot(&wd[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]);
                        assert_eq!(s.to_bits(), got.to_bits(), "{what}: {s} vs {got}");
                    }
                }
                // A row's result does not depend on the other rows.
                for i in 0..m {
                    let alone = q.matmul_t(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(alone, y[i * n..(i + 1) * n].to_vec(), "{:?} {m}x{n}x{k} row {i}", q.format());
                }
            }
        }
    }
}

#[cfg(test)]
mod probe {
    use super::*;

    /// All linear products of one SmolLM2-135M decoding step (30 layers, 7 projections in Q4,
    /// the head in Q8), to time by hand: `cargo test -p etpo-trainer --lib quant::probe -- --ignored
    /// --nocapture` (`PROBE_M` rows, `PROBE_REPS` steps).
    #[test]
    #[ignore]
    fn decoding_step() {
        let (h, i, v) = (576usize, 1536usize, 49152usize);
        let shapes = [(h, h), (192, h), (192, h), (h, h), (i, h), (i, h), (h, i)];
        let mut mats = Vec::new();
        for l in 0..30u32 {
            for &(n, k) in &shapes {
                mats.push(QMatrix::new(&super::tests::q4_matrix(n, k, l), n, k));
            }
        }
        let w: Vec<f32> = (0..v * h).map(|j| (j as f32 * 0.11).sin() * 0.05).collect();
        mats.push(QMatrix::new(&w, v, h));
        let ms: Vec<usize> = std::env::var("PROBE_M").map(|v| vec![v.parse().unwrap()]).unwrap_or(vec![1, 8]);
        let reps: usize = std::env::var("PROBE_REPS").map(|v| v.parse().unwrap()).unwrap_or(20);
        for m in ms {
            let xs: Vec<Vec<f32>> =
                [h, i].iter().map(|&k| (0..m * k).map(|j| (j as f32 * 0.3).cos()).collect()).collect();
            let run = || {
                for q in &mats {
                    std::hint::black_box(q.matmul_t(if q.cols() == h { &xs[0] } else { &xs[1] }, m));
                }
            };
            run();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                run();
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let bytes: usize = mats.iter().map(QMatrix::size_in_bytes).sum();
            eprintln!("m {m}: {:.2} ms per step, {:.1} GB/s", dt * 1e3, bytes as f64 / dt / 1e9);
        }
    }
}
