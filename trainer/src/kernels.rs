//! Vectorised f32 row kernels for the fused CPU ops in [`crate::ops`]: exponentials, softmax,
//! log-sum-exp and sums.
//!
//! glibc's `expf` is scalar and takes a slow path for arguments that underflow (every masked
//! attention score does); the softmax of attention, the cross-entropy over a 49k vocabulary and
//! SwiGLU call it hundreds of millions of times per training step. [`exp`] here has no slow path
//! (Cephes' polynomial, within 2 ulp of the exact value on its range, exactly 0 below it), and the
//! kernels compute it eight lanes at a time with AVX2/FMA intrinsics when the CPU has those
//! (checked once), one element at a time otherwise; both compute the same function.

use std::sync::OnceLock;

/// Below this `e^x` is subnormal or 0 in f32; [`exp`] returns 0.
const EXP_MIN: f32 = -87.336_55;
/// Above this `e^x` overflows f32.
const EXP_MAX: f32 = 88.722_83;
/// ln 2 split in two so that n·ln 2 is subtracted without rounding error (Cody-Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for (e^r − 1 − r) / r² on [−ln2/2, ln2/2], highest degree first.
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `e^x` in f32: within 2 ulp for `x` in [-87.3, 88.7], 0 below, `+inf` above; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    // n = floor(x·log2(e) + 1/2), written with an integer conversion so that it vectorises
    // without SSE4.1's rounding instructions.
    let t = xc * std::f32::consts::LOG2_E + 0.5;
    let ti = t as i32;
    let n = ti - i32::from(t < ti as f32);
    let nf = n as f32;
    let r = xc - nf * LN2_HI - nf * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let er = p * r * r + r + 1.0;
    // 2^n as two factors: n reaches 128 near the top of the range, past f32's largest exponent.
    let n_lo = n >> 1;
    let n_hi = n - n_lo;
    let y = er * f32::from_bits(((n_hi + 127) as u32) << 23) * f32::from_bits(((n_lo + 127) as u32) << 23);
    if x < EXP_MIN {
        0.0
    } else if x > EXP_MAX {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Whether the AVX2/FMA kernels can run here (checked once).
fn has_avx2_fma() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines a public kernel that runs `avx2::$name` when the CPU has AVX2 and FMA and the scalar
/// `scalar::$name` otherwise.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                return unsafe { avx2::$name($($arg),*) };
            }
            scalar::$name($($arg),*)
        }
    };
}

dispatch!(
    /// The largest element (`-inf` for an empty slice).
    max(x: &[f32]) -> f32
);
dispatch!(
    /// `y[i] = exp(x[i] − shift) · scale` over the common length; returns `Σ exp(x[i] − shift)`.
    exp_shift(x: &[f32], shift: f32, scale: f32, y: &mut [f32]) -> f32
);
dispatch!(
    /// `x[i] ← exp(x[i] − shift)`; returns the sum of the new values.
    exp_shift_in_place(x: &mut [f32], shift: f32) -> f32
);
dispatch!(
    /// `Σ exp(x[i] − shift)`.
    sum_exp_shift(x: &[f32], shift: f32) -> f32
);
dispatch!(
    /// `Σ x[i] · y[i]` over the common length.
    dot(x: &[f32], y: &[f32]) -> f32
);
dispatch!(
    /// `y = silu(gate) · up`, element by element, over the common length.
    swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) -> ()
);
dispatch!(
    /// The gradients of [`swiglu`] given the output's gradient `d`: with s = sigmoid(gate),
    /// `d_up = d · gate · s` and `d_gate = d · up · s · (1 + gate · (1 − s))`.
    swiglu_backward(gate: &[f32], up: &[f32], d: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) -> ()
);

/// The kernels one element at a time (tails of the vector loops, and CPUs without AVX2).
mod scalar {
    use super::exp;

    pub fn max(x: &[f32]) -> f32 {
        x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }

    pub fn exp_shift(x: &[f32], shift: f32, scale: f32, y: &mut [f32]) -> f32 {
        let mut sum = 0.0;
        for (y, &x) in y.iter_mut().zip(x) {
            let e = exp(x - shift);
            sum += e;
            *y = e * scale;
        }
        sum
    }

    pub fn exp_shift_in_place(x: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0.0;
        for v in x {
            *v = exp(*v - shift);
            sum += *v;
        }
        sum
    }

    pub fn sum_exp_shift(x: &[f32], shift: f32) -> f32 {
        x.iter().map(|&v| exp(v - shift)).sum()
    }

    pub fn dot(x: &[f32], y: &[f32]) -> f32 {
        x.iter().zip(y).map(|(a, b)| a * b).sum()
    }

    pub fn swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g / (1.0 + exp(-g)) * u;
        }
    }

    pub fn swiglu_backward(gate: &[f32], up: &[f32], d: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        for ((((dg, du), &g), &u), &d) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gate).zip(up).zip(d) {
            let s = 1.0 / (1.0 + exp(-g));
            *du = d * g * s;
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// The kernels eight lanes at a time; the last `len % 8` elements go through [`scalar`].
/// Every function requires AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{scalar, EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};

    const W: usize = 8;

    /// [`super::exp`] on eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let min = _mm256_set1_ps(EXP_MIN);
        let max = _mm256_set1_ps(EXP_MAX);
        let xc = _mm256_min_ps(_mm256_max_ps(x, min), max);
        let t = _mm256_fmadd_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5));
        let nf = _mm256_floor_ps(t);
        let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let er = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let n = _mm256_cvtps_epi32(nf);
        let n_lo = _mm256_srai_epi32::<1>(n);
        let n_hi = _mm256_sub_epi32(n, n_lo);
        let bias = _mm256_set1_epi32(127);
        let s_hi = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n_hi, bias)));
        let s_lo = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n_lo, bias)));
        let y = _mm256_mul_ps(_mm256_mul_ps(er, s_hi), s_lo);
        let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, min));
        let y = _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), _mm256_cmp_ps::<_CMP_GT_OQ>(x, max));
        _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x))
    }

    /// `((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))` (also the reduction of
    /// `crate::quant`'s kernels, which must match its scalar dot product's order).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    fn load(x: &[f32], i: usize) -> __m256 {
        assert!(i + W <= x.len());
        // SAFETY: eight elements from i are within x (asserted).
        unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn store(y: &mut [f32], i: usize, v: __m256) {
        assert!(i + W <= y.len());
        // SAFETY: eight elements from i are within y (asserted).
        unsafe { _mm256_storeu_ps(y.as_mut_ptr().add(i), v) }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn max(x: &[f32]) -> f32 {
        let full = x.len() - x.len() % W;
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(W) {
            m = _mm256_max_ps(m, load(x, i));
        }
        let mut lanes = [0f32; W];
        store(&mut lanes, 0, m);
        lanes.iter().fold(scalar::max(&x[full..]), |m, &v| if v > m { v } else { m })
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn exp_shift(x: &[f32], shift: f32, scale: f32, y: &mut [f32]) -> f32 {
        let n = x.len().min(y.len());
        let full = n - n % W;
        let (sh, sc) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
        let mut acc = _mm256_setzero_ps();
        for i in (0..full).step_by(W) {
            let e = exp8(_mm256_sub_ps(load(x, i), sh));
            acc = _mm256_add_ps(acc, e);
            store(y, i, _mm256_mul_ps(e, sc));
        }
        hsum(acc) + scalar::exp_shift(&x[full..n], shift, scale, &mut y[full..n])
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn exp_shift_in_place(x: &mut [f32], shift: f32) -> f32 {
        let full = x.len() - x.len() % W;
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        for i in (0..full).step_by(W) {
            let e = exp8(_mm256_sub_ps(load(x, i), sh));
            acc = _mm256_add_ps(acc, e);
            store(x, i, e);
        }
        hsum(acc) + scalar::exp_shift_in_place(&mut x[full..], shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn sum_exp_shift(x: &[f32], shift: f32) -> f32 {
        let full = x.len() - x.len() % W;
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        for i in (0..full).step_by(W) {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(load(x, i), sh)));
        }
        hsum(acc) + scalar::sum_exp_shift(&x[full..], shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn dot(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let full = n - n % W;
        let mut acc = _mm256_setzero_ps();
        for i in (0..full).step_by(W) {
            acc = _mm256_fmadd_ps(load(x, i), load(y, i), acc);
        }
        hsum(acc) + scalar::dot(&x[full..n], &y[full..n])
    }

    /// sigmoid(g) = 1 / (1 + e^−g) on eight lanes.
    #[target_feature(enable = "avx2,fma")]
    fn sigmoid8(g: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))))
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) {
        let n = gate.len().min(up.len()).min(y.len());
        let full = n - n % W;
        for i in (0..full).step_by(W) {
            let g = load(gate, i);
            store(y, i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), load(up, i)));
        }
        scalar::swiglu(&gate[full..n], &up[full..n], &mut y[full..n]);
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn swiglu_backward(gate: &[f32], up: &[f32], d: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
        let n = gate.len().min(up.len()).min(d.len()).min(d_gate.len()).min(d_up.len());
        let full = n - n % W;
        let one = _mm256_set1_ps(1.0);
        for i in (0..full).step_by(W) {
            let (g, u, dd) = (load(gate, i), load(up, i), load(d, i));
            let s = sigmoid8(g);
            store(d_up, i, _mm256_mul_ps(dd, _mm256_mul_ps(g, s)));
            // 1 + g·(1 − s)
            let f = _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one);
            store(d_gate, i, _mm256_mul_ps(_mm256_mul_ps(dd, u), _mm256_mul_ps(s, f)));
        }
        scalar::swiglu_backward(&gate[full..n], &up[full..n], &d[full..n], &mut d_gate[full..n], &mut d_up[full..n]);
    }
}

/// In-place softmax of one row: `x ← exp(x − max) / Σ exp(x − max)`.
pub fn softmax_in_place(x: &mut [f32]) {
    let m = max(x);
    let sum = exp_shift_in_place(x, m);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `log Σ exp(x)`, computed stably.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    m + sum_exp_shift(x, m).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar `exp` and the vector one (through `exp_shift`, eight lanes at a time where the
    /// CPU has AVX2) against f64's.
    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value_and_exact_at_the_edges() {
        let xs: Vec<f32> = (0..12_800).map(|i| -87.0 + i as f32 * 0.013_7).collect();
        let mut vector = vec![0f32; xs.len()];
        exp_shift(&xs, 0.0, 1.0, &mut vector);
        let mut worst = 0f64;
        for (&x, &v) in xs.iter().zip(&vector) {
            let want = (x as f64).exp();
            // One ulp of the exact value (f32 has 24 significant bits).
            let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
            for got in [exp(x), v] {
                worst = worst.max((got as f64 - want).abs() / ulp);
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        let edges = [0.0, -1.0e30, f32::NEG_INFINITY, -100.0, 100.0, f32::INFINITY, f32::NAN, 1.0];
        let want = [1.0, 0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY, f32::NAN, std::f32::consts::E];
        let mut vector = [0f32; 8];
        exp_shift(&edges, 0.0, 1.0, &mut vector);
        for ((&x, &w), &v) in edges.iter().zip(&want).zip(&vector) {
            for got in [exp(x), v] {
                assert!(got == w || (w.is_nan() && got.is_nan()) || (got - w).abs() < 1e-6, "exp({x}) = {got}");
            }
        }
    }

    #[test]
    fn row_kernels_match_plain_loops_on_every_length() {
        for n in [0usize, 1, 5, 16, 17, 33, 100] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m);
            let want: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
            assert!((sum_exp_shift(&x, m) as f64 - want).abs() <= 1e-5 * want.max(1.0), "n={n}");
            let mut y = vec![0f32; n];
            let s = exp_shift(&x, m, 2.0, &mut y);
            assert!((s as f64 - want).abs() <= 1e-5 * want.max(1.0));
            for (y, &v) in y.iter().zip(&x) {
                assert!((*y as f64 - 2.0 * ((v - m) as f64).exp()).abs() < 1e-6);
            }
            let mut z = x.clone();
            softmax_in_place(&mut z);
            if n > 0 {
                assert!((z.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                let lse = log_sum_exp(&x) as f64;
                assert!((lse - (m as f64 + want.ln())).abs() < 1e-5);
            }
            let d: f64 = x.iter().zip(&y).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            assert!((dot(&x, &y) as f64 - d).abs() < 1e-4 * d.abs().max(1.0));
        }
    }

    /// The scalar versions (what a CPU without AVX2 runs) agree with the dispatched ones.
    #[test]
    fn scalar_and_dispatched_kernels_agree() {
        let x: Vec<f32> = (0..77).map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.9).collect();
        let u: Vec<f32> = (0..77).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.4).collect();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0);
        assert_eq!(scalar::max(&x), max(&x));
        assert!(close(scalar::sum_exp_shift(&x, 1.5), sum_exp_shift(&x, 1.5)));
        assert!(close(scalar::dot(&x, &u), dot(&x, &u)));
        let (mut y1, mut y2) = (vec![0f32; 77], vec![0f32; 77]);
        assert!(close(scalar::exp_shift(&x, 1.5, 0.5, &mut y1), exp_shift(&x, 1.5, 0.5, &mut y2)));
        assert!(y1.iter().zip(&y2).all(|(a, b)| close(*a, *b)));
        let (mut z1, mut z2) = (x.clone(), x.clone());
        assert!(close(scalar::exp_shift_in_place(&mut z1, 2.0), exp_shift_in_place(&mut z2, 2.0)));
        assert!(z1.iter().zip(&z2).all(|(a, b)| close(*a, *b)));
        scalar::swiglu(&x, &u, &mut y1);
        swiglu(&x, &u, &mut y2);
        assert!(y1.iter().zip(&y2).all(|(a, b)| close(*a, *b)));
        let (mut g1, mut g2, mut d1, mut d2) = (vec![0f32; 77], vec![0f32; 77], vec![0f32; 77], vec![0f32; 77]);
        scalar::swiglu_backward(&x, &u, &y1, &mut g1, &mut d1);
        swiglu_backward(&x, &u, &y1, &mut g2, &mut d2);
        assert!(g1.iter().zip(&g2).chain(d1.iter().zip(&d2)).all(|(a, b)| close(*a, *b)));
    }

    #[test]
    fn swiglu_and_its_gradient_match_the_definition() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.4).collect();
        let up: Vec<f32> = (0..37).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let d: Vec<f32> = (0..37).map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.2).collect();
        let mut y = vec![0f32; 37];
        swiglu(&gate, &up, &mut y);
        let (mut dg, mut du) = (vec![0f32; 37], vec![0f32; 37]);
        swiglu_backward(&gate, &up, &d, &mut dg, &mut du);
        let silu = |g: f64| g / (1.0 + (-g).exp());
        for i in 0..37 {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            assert!((y[i] as f64 - silu(g) * u).abs() < 1e-6);
            // Central differences of silu(g)·u.
            let h = 1e-4;
            let dsilu = (silu(g + h) - silu(g - h)) / (2.0 * h);
            assert!((dg[i] as f64 - d[i] as f64 * u * dsilu).abs() < 1e-5, "d_gate at {i}");
            assert!((du[i] as f64 - d[i] as f64 * silu(g)).abs() < 1e-6, "d_up at {i}");
        }
    }
}
