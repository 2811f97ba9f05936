//! Single-precision matrix products through OpenBLAS, loaded at run time when the machine has it.
//!
//! candle's own CPU matmul (the `gemm` crate) uses AVX2 kernels on stable Rust; on this project's
//! reference machine OpenBLAS's AVX-512 kernels run the model's large products about 2.5 times
//! faster (measured side by side: 4 × 320 tokens through SmolLM2's output layer, 44 against 120
//! GFLOP/s on 2 cores). The library is optional and found at run time, so etpo builds and runs
//! without it (falling back to candle's kernels) and no BLAS is needed at build time.
//!
//! Where it is looked for, in order:
//! 1. `$ETPO_BLAS`: a path to a CBLAS shared library, or `off` to use candle's kernels;
//! 2. the project's Python environment: the `scipy-openblas32` wheel that `scripts/setup.sh python`
//!    installs into `.venv` (no root needed);
//! 3. the system's `libopenblas.so.0` (Debian/Ubuntu: `apt install libopenblas0`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `cblas_sgemm`, row-major; `blasint` is 32-bit in the libraries loaded here (the LP64 builds).
type Sgemm = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);
/// `cblas_sgemv`, row-major.
type Sgemv = unsafe extern "C" fn(
    order: i32,
    trans: i32,
    m: i32,
    n: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    x: *const f32,
    incx: i32,
    beta: f32,
    y: *mut f32,
    incy: i32,
);
type SetThreads = unsafe extern "C" fn(n: i32);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// A loaded CBLAS library.
pub struct Blas {
    sgemm: Sgemm,
    sgemv: Sgemv,
    /// Where it was loaded from (a file, or a name the dynamic loader resolved).
    path: PathBuf,
    // Keeps the function pointers valid for the life of the process.
    _lib: libloading::Library,
}

/// The process's BLAS, loaded on first use; `None` when none was found (or `ETPO_BLAS=off`).
pub fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let defaults = || venv_openblas().into_iter().chain([PathBuf::from("libopenblas.so.0")]).collect();
        library_candidates("ETPO_BLAS", defaults).iter().find_map(|p| Blas::open(p))
    })
    .as_ref()
}

/// The libraries to try for the BLAS the environment variable `var` chooses: none when it is
/// `off` (or `none`), the path it names, else `defaults`.
fn library_candidates(var: &str, defaults: impl FnOnce() -> Vec<PathBuf>) -> Vec<PathBuf> {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(v) if v == "off" || v == "none" => Vec::new(),
        Some(v) => vec![PathBuf::from(v)],
        None => defaults(),
    }
}

/// The project's `.venv/lib`, where pip puts the Python packages (and the `mkl` wheel's libraries).
fn venv_lib() -> Option<PathBuf> {
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.join(".venv").join("lib"))
}

/// The shared libraries in `dir` whose file names start with `prefix`, sorted by name.
fn shared_libraries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut libs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.contains(".so")))
        .collect();
    libs.sort();
    libs
}

/// `libscipy_openblas*.so` of the `scipy-openblas32` wheel in the project's `.venv`.
fn venv_openblas() -> Option<PathBuf> {
    std::fs::read_dir(venv_lib()?).ok()?.flatten().find_map(|py| {
        let dir = py.path().join("site-packages").join("scipy_openblas32").join("lib");
        shared_libraries(&dir, "libscipy_openblas").into_iter().next()
    })
}

impl Blas {
    /// Loads the library at `path` (a file, or a name the dynamic loader resolves) if it exports
    /// `cblas_sgemm` (or the `scipy_`-prefixed name of the scipy-openblas wheels). Sets its thread
    /// count to the number of cores candle uses, so both share the machine the same way.
    fn open(path: &Path) -> Option<Blas> {
        // SAFETY: loading a shared library runs its initialisers; the candidates are BLAS
        // libraries chosen by the user or installed by the project's set-up.
        let lib = unsafe { libloading::Library::new(path) }.ok()?;
        let (sgemm, sgemv, prefix) = ["", "scipy_"].iter().find_map(|prefix| {
            let gemm = format!("{prefix}cblas_sgemm\0");
            let gemv = format!("{prefix}cblas_sgemv\0");
            // SAFETY: the symbols have the CBLAS signatures declared above.
            let gemm = unsafe { lib.get::<Sgemm>(gemm.as_bytes()) }.ok()?;
            let gemv = unsafe { lib.get::<Sgemv>(gemv.as_bytes()) }.ok()?;
            Some((*gemm, *gemv, *prefix))
        })?;
        // One BLAS thread per call: etpo splits a product over candle's thread pool itself.
        // OpenBLAS's own threads spin while waiting, which stalls everything on a busy machine
        // (measured: decoding 5x slower than without BLAS at a load of 8 on 2 cores).
        let set_threads = format!("{prefix}openblas_set_num_threads\0");
        // SAFETY: OpenBLAS's `openblas_set_num_threads(int)`.
        if let Ok(set) = unsafe { lib.get::<SetThreads>(set_threads.as_bytes()) } {
            unsafe { set(1) };
        }
        Some(Blas { sgemm, sgemv, path: path.to_path_buf(), _lib: lib })
    }

    /// `c = alpha · op(a) · op(b) + beta · c` (see [`Product`]), split over candle's thread pool
    /// when it is large enough to gain from it (see `Product::run_parts`).
    ///
    /// # Panics
    /// When a slice's length does not match the dimensions, or a dimension exceeds `i32::MAX`.
    pub fn gemm(&self, p: &Product, a: &[f32], b: &[f32], c: &mut [f32]) {
        p.check(a, b, c.len());
        if p.k == 0 {
            c.iter_mut().for_each(|c| *c *= p.beta);
            return;
        }
        // SAFETY: c holds m·n elements (checked), initialised.
        unsafe { self.gemm_into(p, a, b, c.as_mut_ptr()) }
    }

    /// [`Blas::gemm`] into a new `[m, n]` matrix (`beta` is ignored: there is no old value).
    pub fn gemm_new(&self, p: &Product, a: &[f32], b: &[f32]) -> Vec<f32> {
        let p = Product { beta: 0.0, ..*p };
        let len = p.m * p.n;
        p.check(a, b, len);
        if p.k == 0 {
            return vec![0.0; len];
        }
        // BLAS never reads c when beta is 0 (it need not be set on input), so the buffer is not
        // zeroed first: that would be a pass over memory the product overwrites.
        let mut c = Vec::with_capacity(len);
        // SAFETY: the buffer has room for m·n elements; with k > 0 and beta 0 the product writes
        // every one of them without reading any, so all are initialised when the length is set.
        unsafe {
            self.gemm_into(&p, a, b, c.as_mut_ptr());
            c.set_len(len);
        }
        c
    }

    /// The body of [`Blas::gemm`] for `k > 0`.
    ///
    /// # Safety
    /// `a` and `b` must fit `p` (checked by the callers) and `c` must point to `m·n` writable
    /// elements, initialised unless `beta` is 0.
    unsafe fn gemm_into(&self, p: &Product, a: &[f32], b: &[f32], c: *mut f32) {
        let (a, b, c) = (Shared(a.as_ptr().cast_mut()), Shared(b.as_ptr().cast_mut()), Shared(c));
        // SAFETY: each part reads within a and b and writes only its own rows (or columns) of c
        // (see `Product::run_parts`), and the caller's contract covers the whole product.
        let part =
            |pt: Part| unsafe { self.raw(p, pt.m, pt.n, a.get().add(pt.a), b.get().add(pt.b), c.get().add(pt.c), p.n) };
        p.run_parts(part);
    }

    /// [`Blas::gemm`] on the calling thread, for callers that run many small products in
    /// parallel themselves (attention's per-head products).
    ///
    /// # Panics
    /// When a slice's length does not match the dimensions, or a dimension exceeds `i32::MAX`.
    pub fn gemm_serial(&self, p: &Product, a: &[f32], b: &[f32], c: &mut [f32]) {
        p.check(a, b, c.len());
        if p.m == 0 || p.n == 0 {
            return;
        }
        if p.k == 0 {
            c.iter_mut().for_each(|c| *c *= p.beta);
            return;
        }
        // SAFETY: the slices have exactly the sizes the dimensions and leading dimensions imply
        // (checked above).
        unsafe { self.raw(p, p.m, p.n, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), p.n) }
    }

    /// One BLAS call for an `m × n` part of `p`'s output (the leading dimensions of a and b are
    /// those of the whole product); a matrix-vector product when `m` is 1 (gemm would first pack
    /// all of b).
    ///
    /// # Safety
    /// `a`, `b` and `c` (with leading dimension `ldc`) must hold the elements the product reads
    /// and writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw(&self, p: &Product, m: usize, n: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        let op = |t: bool| if t { TRANS } else { NO_TRANS };
        let (k, ldb) = (p.k as i32, p.ldb() as i32);
        if m == 1 {
            // c = op(b)ᵀ a: b stored [n, k] (transposed) is the matrix [n, k], else [k, n]. A row of
            // a stored transposed is strided by lda.
            let (trans, rows, cols) = if p.b_transposed { (NO_TRANS, n as i32, k) } else { (TRANS, k, n as i32) };
            let inc_a = if p.a_transposed { p.lda() as i32 } else { 1 };
            // SAFETY: the pointers hold what the product reads and writes (this function's contract).
            unsafe { (self.sgemv)(ROW_MAJOR, trans, rows, cols, p.alpha, b, ldb, a, inc_a, p.beta, c, 1) }
        } else {
            let (m, n) = (m as i32, n as i32);
            // SAFETY: as above.
            unsafe {
                (self.sgemm)(
                    ROW_MAJOR,
                    op(p.a_transposed),
                    op(p.b_transposed),
                    m,
                    n,
                    k,
                    p.alpha,
                    a,
                    p.lda() as i32,
                    b,
                    ldb,
                    p.beta,
                    c,
                    ldc as i32,
                )
            }
        }
    }
}

/// `cblas_gemm_bf16bf16f32` (oneMKL) and `cblas_sbgemm` (OpenBLAS): [`Sgemm`] with bf16 operands
/// (`u16` bit patterns) and an f32 output, accumulated in f32.
type Bf16Gemm = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const u16,
    lda: i32,
    b: *const u16,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);
/// oneMKL's `MKL_Set_Threading_Layer` and `MKL_CBWR_Set`.
type MklSetInt = unsafe extern "C" fn(i32) -> i32;

/// A loaded BLAS with a bf16 product (see [`crate::bf16`]).
pub struct Bf16Blas {
    gemm: Bf16Gemm,
    /// The library's file or name, for reports.
    name: String,
    _lib: libloading::Library,
}

/// The process's bf16 BLAS, loaded on first use; `None` when none was found (or
/// `ETPO_BF16_BLAS=off`). Looked for, in order: `$ETPO_BF16_BLAS` (a path); the f32 BLAS
/// ([`blas`]) when it is an OpenBLAS built with bf16 products; oneMKL's `libmkl_rt` in the
/// project's `.venv` (the `mkl` wheel, `scripts/setup.sh bf16`; the newest if several).
pub fn bf16_blas() -> Option<&'static Bf16Blas> {
    static BF16: OnceLock<Option<Bf16Blas>> = OnceLock::new();
    BF16.get_or_init(|| {
        let defaults = || {
            let mkl = venv_lib().and_then(|dir| shared_libraries(&dir, "libmkl_rt").pop());
            blas().map(|b| b.path.clone()).into_iter().chain(mkl).collect()
        };
        library_candidates("ETPO_BF16_BLAS", defaults).iter().find_map(|p| Bf16Blas::open(p))
    })
    .as_ref()
}

impl Bf16Blas {
    /// Loads the library at `path` if it exports a bf16 product. oneMKL is set to run each call
    /// on the calling thread (etpo splits products over candle's pool, as with OpenBLAS) and to
    /// give the same result whatever the operands' alignment.
    fn open(path: &Path) -> Option<Bf16Blas> {
        // SAFETY: as in `Blas::open`: a BLAS library chosen by the user or the project's set-up.
        let lib = unsafe { libloading::Library::new(path) }.ok()?;
        let names: [&[u8]; 3] = [b"cblas_gemm_bf16bf16f32\0", b"cblas_sbgemm\0", b"scipy_cblas_sbgemm\0"];
        // SAFETY: each symbol has the signature of `Bf16Gemm`.
        let gemm = names.iter().find_map(|n| unsafe { lib.get::<Bf16Gemm>(n) }.ok().map(|f| *f))?;
        // SAFETY: oneMKL's `int MKL_Set_Threading_Layer(int)` and `int MKL_CBWR_Set(int)`, called
        // before any product. 1 is MKL_THREADING_SEQUENTIAL; 2 | 0x10000 is MKL_CBWR_AUTO with
        // MKL_CBWR_STRICT (results independent of alignment).
        unsafe {
            if let Ok(set) = lib.get::<MklSetInt>(b"MKL_Set_Threading_Layer\0") {
                set(1);
            }
            if let Ok(set) = lib.get::<MklSetInt>(b"MKL_CBWR_Set\0") {
                set(2 | 0x10000);
            }
        }
        // Sets OpenBLAS to one thread per call, as `Blas::open` does (the same library may be
        // both).
        for name in [&b"openblas_set_num_threads\0"[..], b"scipy_openblas_set_num_threads\0"] {
            // SAFETY: OpenBLAS's `openblas_set_num_threads(int)`.
            if let Ok(set) = unsafe { lib.get::<SetThreads>(name) } {
                unsafe { set(1) };
            }
        }
        request_amx();
        Some(Bf16Blas { gemm, name: path.display().to_string(), _lib: lib })
    }

    /// The library's path (or name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `c = alpha · op(a) · op(b) + beta · c` with bf16 `a` and `b` and an f32 `c` (see
    /// [`Product`]), split over candle's thread pool like [`Blas::gemm`].
    ///
    /// # Panics
    /// When a slice's length does not match the dimensions, or a dimension exceeds `i32::MAX`.
    pub fn gemm(&self, p: &Product, a: &[u16], b: &[u16], c: &mut [f32]) {
        p.check(a, b, c.len());
        if p.k == 0 {
            c.iter_mut().for_each(|c| *c *= p.beta);
            return;
        }
        let op = |t: bool| if t { TRANS } else { NO_TRANS };
        let (a, b, c) = (Shared(a.as_ptr().cast_mut()), Shared(b.as_ptr().cast_mut()), Shared(c.as_mut_ptr()));
        p.run_parts(|pt| {
            // SAFETY: the slices fit the product (checked above); each part reads within a and b
            // and writes only its own block of c (`Product::run_parts`).
            unsafe {
                (self.gemm)(
                    ROW_MAJOR,
                    op(p.a_transposed),
                    op(p.b_transposed),
                    pt.m as i32,
                    pt.n as i32,
                    p.k as i32,
                    p.alpha,
                    a.get().add(pt.a),
                    p.lda() as i32,
                    b.get().add(pt.b),
                    p.ldb() as i32,
                    p.beta,
                    c.get().add(pt.c),
                    p.n as i32,
                )
            }
        });
    }

    /// [`Bf16Blas::gemm`] into a new `[m, n]` matrix (`beta` is ignored).
    pub fn gemm_new(&self, p: &Product, a: &[u16], b: &[u16]) -> Vec<f32> {
        let mut c = vec![0f32; p.m * p.n];
        self.gemm(&Product { beta: 0.0, ..*p }, a, b, &mut c);
        c
    }
}

/// Asks Linux for the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which
/// a process must do before its first AMX instruction; without it the library's AMX kernels
/// would fault. Harmless where the CPU has no AMX (the call fails and nothing changes).
fn request_amx() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: arch_prctl with these arguments only changes which register state the kernel
        // lets this process use.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    }
}

/// The number of threads candle uses, read once: `candle_core::utils::get_num_threads` parses
/// /proc/cpuinfo on every call, which cost 7% of a decoding step when asked per product.
pub(crate) fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// The shape of one product `c = alpha · op(a) · op(b) + beta · c`, all matrices row-major and
/// contiguous: `op(a)` is `[m, k]` (`a` stored `[k, m]` when `a_transposed`), `op(b)` is `[k, n]`
/// (`b` stored `[n, k]` when `b_transposed`), `c` is `[m, n]`.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    /// Rows of `c`.
    pub m: usize,
    /// Columns of `c`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// `a` is stored transposed, `[k, m]`.
    pub a_transposed: bool,
    /// `b` is stored transposed, `[n, k]`.
    pub b_transposed: bool,
    /// Factor of the product.
    pub alpha: f32,
    /// Factor of `c`'s old value (0: `c` is overwritten).
    pub beta: f32,
}

impl Product {
    /// `c = a · b` with `a` `[m, k]` and `b` `[k, n]`.
    pub fn new(m: usize, n: usize, k: usize) -> Product {
        Product { m, n, k, a_transposed: false, b_transposed: false, alpha: 1.0, beta: 0.0 }
    }

    /// `a` is stored `[k, m]`.
    pub fn a_t(mut self) -> Product {
        self.a_transposed = true;
        self
    }

    /// `b` is stored `[n, k]`.
    pub fn b_t(mut self) -> Product {
        self.b_transposed = true;
        self
    }

    /// Scales the product by `alpha`.
    pub fn scaled(mut self, alpha: f32) -> Product {
        self.alpha = alpha;
        self
    }

    /// Adds the product to `c` instead of overwriting it.
    pub fn accumulate(mut self) -> Product {
        self.beta = 1.0;
        self
    }

    fn lda(&self) -> usize {
        if self.a_transposed {
            self.m
        } else {
            self.k
        }
    }

    fn ldb(&self) -> usize {
        if self.b_transposed {
            self.k
        } else {
            self.n
        }
    }

    /// The product split over candle's thread pool where it is large enough to gain from it: by
    /// rows of `c` when it has more rows than columns, by columns otherwise. Each part packs the
    /// operand it shares with the others again, so the split leaves the smaller one shared (the
    /// weight, not the activations, in a layer's products). Runs `part` on each, in parallel.
    fn run_parts(&self, part: impl Fn(Part) + Sync) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        // Below about a quarter of a million multiply-adds a split costs more than it saves.
        let by_rows = m > n;
        let (dim, align) = if by_rows { (m, 8) } else { (n, 16) };
        let count = if m * n * k < (1 << 18) { 1 } else { threads().min(dim.div_ceil(align)) };
        if count == 1 {
            part(Part { m, n, a: 0, b: 0, c: 0 });
            return;
        }
        let chunk = dim.div_ceil(count).next_multiple_of(align).min(dim);
        let at = |i0: usize| {
            let len = chunk.min(dim - i0);
            // The leading dimensions stay those of the whole matrices: rows i0.. of op(a) are
            // rows of a, or columns of a stored transposed; columns i0.. of op(b) are rows of b
            // stored transposed, or columns of b.
            if by_rows {
                Part { m: len, n, a: if self.a_transposed { i0 } else { i0 * k }, b: 0, c: i0 * n }
            } else {
                Part { m, n: len, a: 0, b: if self.b_transposed { i0 * k } else { i0 }, c: i0 }
            }
        };
        use rayon::prelude::*;
        (0..dim).step_by(chunk).collect::<Vec<_>>().into_par_iter().for_each(|i0| part(at(i0)));
    }

    fn check<A, B>(&self, a: &[A], b: &[B], c_len: usize) {
        let (m, n, k) = (self.m, self.n, self.k);
        assert_eq!(a.len(), m * k, "gemm: a is not [m, k] / [k, m]");
        assert_eq!(b.len(), n * k, "gemm: b is not [k, n] / [n, k]");
        assert_eq!(c_len, m * n, "gemm: c is not [m, n]");
        assert!(m.max(n).max(k) <= i32::MAX as usize, "gemm: dimension exceeds i32");
    }
}

/// One part of a product split over threads ([`Product::run_parts`]): an `m × n` block of `c`,
/// with the offsets (in elements) of its first operand elements and of its first output element.
#[derive(Debug, Clone, Copy)]
struct Part {
    m: usize,
    n: usize,
    a: usize,
    b: usize,
    c: usize,
}

/// A raw pointer shared by the parts of one product (each writes its own rows or columns).
pub(crate) struct Shared<T = f32>(pub(crate) *mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
// SAFETY: used only inside the BLAS products here and `quant::QMatrix::matmul_t`, whose parts
// read shared operands and write disjoint parts of the output.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(b_transposed: bool, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] =
                    (0..k).map(|l| a[i * k + l] * if b_transposed { b[j * k + l] } else { b[l * n + j] }).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_matches_the_definition() {
        let blas =
            blas().expect("no BLAS library found: `scripts/setup.sh python` installs scipy-openblas32 into .venv");
        for &(m, n, k) in &[(1, 7, 5), (3, 4, 2), (6, 1, 9), (5, 3, 1)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
            for t in [true, false] {
                let mut c = vec![f32::NAN; m * n];
                let p = Product::new(m, n, k);
                blas.gemm(&if t { p.b_t() } else { p }, &a, &b, &mut c);
                for (x, y) in c.iter().zip(naive(t, m, n, k, &a, &b)) {
                    assert!((x - y).abs() < 1e-5, "{m}x{n}x{k} transposed={t}: {x} vs {y}");
                }
            }
        }
    }

    /// `a` stored transposed, a scale and accumulation, serial and split over threads (the last
    /// two shapes are large enough to be split, by columns and by rows), including the
    /// matrix-vector case; and a product into a new matrix.
    #[test]
    fn gemm_with_transposed_a_scale_and_accumulation_matches_the_definition() {
        let blas =
            blas().expect("no BLAS library found: `scripts/setup.sh python` installs scipy-openblas32 into .venv");
        for &(m, n, k) in &[(1, 7, 5), (5, 3, 4), (70, 200, 40), (200, 70, 40)] {
            // a_stored is [k, m]; a = a_storedᵀ.
            let a_stored: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.29).sin()).collect();
            let a: Vec<f32> = (0..m * k).map(|i| a_stored[(i % k) * m + i / k]).collect();
            let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.07).cos()).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
            let want: Vec<f32> = naive(true, m, n, k, &a, &b).iter().zip(&c0).map(|(p, c)| 0.5 * p + c).collect();
            let p = Product::new(m, n, k).a_t().b_t().scaled(0.5).accumulate();
            for serial in [true, false] {
                let mut c = c0.clone();
                if serial {
                    blas.gemm_serial(&p, &a_stored, &b, &mut c);
                } else {
                    blas.gemm(&p, &a_stored, &b, &mut c);
                }
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "{m}x{n}x{k} serial={serial}: {x} vs {y}");
                }
            }
            let fresh = blas.gemm_new(&p, &a_stored, &b);
            for ((x, y), c) in fresh.iter().zip(&want).zip(&c0) {
                assert!((x - (y - c)).abs() < 1e-4, "{m}x{n}x{k} new: {x} vs {}", y - c);
            }
        }
    }

    /// The bf16 product against the exact product of the bf16-rounded operands (computed in f64):
    /// both operand layouts, a scale and accumulation, a matrix-vector shape, and shapes large
    /// enough to be split over threads by columns and by rows. bf16 products of bf16 numbers
    /// are exact in f32, so the only differences left are the f32 sums' rounding.
    #[test]
    fn bf16_gemm_matches_the_product_of_the_rounded_operands() {
        use crate::bf16::{from_bf16, to_bf16};
        let blas = bf16_blas().expect(crate::bf16::NO_BF16_BLAS);
        for &(m, n, k) in &[(1, 7, 5), (5, 3, 4), (70, 200, 40), (200, 70, 40)] {
            let a: Vec<u16> = (0..m * k).map(|i| to_bf16((i as f32 * 0.29).sin())).collect();
            let b: Vec<u16> = (0..n * k).map(|i| to_bf16((i as f32 * 0.07).cos() * 3.0)).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
            for (a_t, b_t) in [(false, true), (false, false), (true, true)] {
                // Element (i, l) of op(a) and (l, j) of op(b) from their stored layouts.
                let av = |i: usize, l: usize| from_bf16(if a_t { a[l * m + i] } else { a[i * k + l] }) as f64;
                let bv = |l: usize, j: usize| from_bf16(if b_t { b[j * k + l] } else { b[l * n + j] }) as f64;
                let mut p = Product::new(m, n, k).scaled(0.5).accumulate();
                p.a_transposed = a_t;
                p.b_transposed = b_t;
                let mut c = c0.clone();
                blas.gemm(&p, &a, &b, &mut c);
                let fresh = blas.gemm_new(&p, &a, &b);
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|l| av(i, l) * bv(l, j)).sum::<f64>() * 0.5;
                        let got = c[i * n + j] as f64;
                        let want = exact + c0[i * n + j] as f64;
                        assert!((got - want).abs() < 1e-5, "{m}x{n}x{k} a_t={a_t} b_t={b_t}: {got} vs {want}");
                        assert!((fresh[i * n + j] as f64 - exact).abs() < 1e-5, "{m}x{n}x{k} new");
                    }
                }
            }
        }
    }
}
