//! The scalars products run in: `f64` (the exactness mode) and `f32`
//! (twice the SIMD width, half the bytes). Operators keep their entries in
//! `f64`; a product in `f32` reads them converted (a GEMM's weights once per
//! product, a scalar loop's entries one at a time), so one generic kernel
//! serves both.

use std::borrow::Cow;
use std::sync::OnceLock;

use faer::{Accum, Mat, Par};

use crate::{Block, Operator};

/// A scalar of the products: `f32` or `f64`.
pub trait Real:
    faer::traits::ComplexField
    + Copy
    + Default
    + PartialEq
    + PartialOrd
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
{
    /// `0`.
    const ZERO: Self;
    /// `1`.
    const ONE: Self;
    /// `v` rounded to this type (exact for `f64`).
    fn of(v: f64) -> Self;
    /// The value as `f64` (exact).
    fn to_f64(self) -> f64;
    /// The bits of the value without its sign: zero exactly when the value
    /// is `±0.0` (what `!= 0.0` tests, as integer operations that vectorize
    /// within a short run of values).
    fn magnitude_bits(self) -> u64;
    /// `self · a + b` with one rounding (the same bits on every CPU: an
    /// FMA instruction where the caller is compiled for one, else libm).
    fn fma(self, a: Self, b: Self) -> Self;
    /// `w`'s matrix in this type: borrowed for `f64`; for `f32` rounded
    /// once, on first use.
    fn matrix(w: &Weights) -> &Mat<Self>;
    /// `w` in this type (borrowed for `f64`).
    fn slice(w: &[f64]) -> Cow<'_, [Self]>;
    /// `v` as `f64` values (exact; the same vector for `f64`).
    fn widen(v: Vec<Self>) -> Vec<f64>;
    /// `v` as `f64` values (exact; borrowed for `f64`).
    fn widen_slice(v: &[Self]) -> Cow<'_, [f64]>;
    /// `v` rounded to this type (the same vector for `f64`).
    fn narrow(v: Vec<f64>) -> Vec<Self>;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// `w` in this type: borrowed for `f64`; for `f32` rounded into `cache`
    /// on first use and borrowed from it after.
    fn cached<'a>(w: &'a [f64], cache: &'a OnceLock<Vec<f32>>) -> &'a [Self];
    /// Values `make` forms in this type, kept in `wide` for `f64` and in
    /// `narrow` for `f32`: formed on first use, then borrowed.
    fn formed<'a>(
        wide: &'a OnceLock<Vec<f64>>,
        narrow: &'a OnceLock<Vec<f32>>,
        make: impl FnOnce() -> Vec<Self>,
    ) -> &'a [Self];
    /// `G·A` for a transposed operator (a transposed convolution): in `f64`
    /// for both types today (an `f32` adjoint is widened and the product
    /// rounded back), as the forward products are `f64` only.
    fn transposed_left_mul(op: &Operator, g: &Block<Self>, par: Par) -> Block<Self>;
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn magnitude_bits(self) -> u64 {
        self.to_bits() << 1
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
    fn matrix(w: &Weights) -> &Mat<Self> {
        &w.f64
    }
    fn slice(w: &[f64]) -> Cow<'_, [Self]> {
        Cow::Borrowed(w)
    }
    fn widen(v: Vec<Self>) -> Vec<f64> {
        v
    }
    fn widen_slice(v: &[Self]) -> Cow<'_, [f64]> {
        Cow::Borrowed(v)
    }
    fn narrow(v: Vec<f64>) -> Vec<Self> {
        v
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn cached<'a>(w: &'a [f64], _: &'a OnceLock<Vec<f32>>) -> &'a [Self] {
        w
    }
    fn formed<'a>(
        wide: &'a OnceLock<Vec<f64>>,
        _: &'a OnceLock<Vec<f32>>,
        make: impl FnOnce() -> Vec<Self>,
    ) -> &'a [Self] {
        wide.get_or_init(make)
    }
    fn transposed_left_mul(op: &Operator, g: &Block<Self>, par: Par) -> Block<Self> {
        op.transposed_left_mul(g, par)
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn magnitude_bits(self) -> u64 {
        u64::from(self.to_bits() << 1)
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
    fn matrix(w: &Weights) -> &Mat<Self> {
        w.f32
            .get_or_init(|| Mat::from_fn(w.f64.nrows(), w.f64.ncols(), |i, j| w.f64[(i, j)] as f32))
    }
    fn slice(w: &[f64]) -> Cow<'_, [Self]> {
        Cow::Owned(w.iter().map(|&v| v as f32).collect())
    }
    fn widen(v: Vec<Self>) -> Vec<f64> {
        v.into_iter().map(f64::from).collect()
    }
    fn widen_slice(v: &[Self]) -> Cow<'_, [f64]> {
        Cow::Owned(v.iter().map(|&x| f64::from(x)).collect())
    }
    fn narrow(v: Vec<f64>) -> Vec<Self> {
        v.into_iter().map(|x| x as f32).collect()
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn cached<'a>(w: &'a [f64], cache: &'a OnceLock<Vec<f32>>) -> &'a [Self] {
        cache.get_or_init(|| w.iter().map(|&v| v as f32).collect())
    }
    fn formed<'a>(
        _: &'a OnceLock<Vec<f64>>,
        narrow: &'a OnceLock<Vec<f32>>,
        make: impl FnOnce() -> Vec<Self>,
    ) -> &'a [Self] {
        narrow.get_or_init(make)
    }
    fn transposed_left_mul(op: &Operator, g: &Block<Self>, par: Par) -> Block<Self> {
        op.transposed_left_mul(&g.cast::<f64>(), par).cast()
    }
}

/// A dense weight matrix, held once (shared by `Arc`), with its `f32`
/// rounding made on the first `f32` product and kept: a layer's weights are
/// converted once per model, not once per instance. Dereferences to the
/// `f64` matrix.
#[derive(Clone, Debug)]
pub struct Weights {
    f64: std::sync::Arc<Mat<f64>>,
    f32: OnceLock<Mat<f32>>,
}

impl Weights {
    /// Weights of `m`.
    pub fn new(m: std::sync::Arc<Mat<f64>>) -> Self {
        Self { f64: m, f32: OnceLock::new() }
    }

    /// The matrix in `T`.
    pub fn get<T: Real>(&self) -> &Mat<T> {
        T::matrix(self)
    }

    /// The shared `f64` matrix.
    pub fn shared(&self) -> &std::sync::Arc<Mat<f64>> {
        &self.f64
    }

    /// `G·W` for `G` of `k × nrows`: one GEMM.
    pub fn left_mul<T: Real>(&self, g: &Block<T>, par: Par) -> Block<T> {
        let mut out = Block::zeros(g.nrows(), self.f64.ncols());
        faer::linalg::matmul::matmul(
            out.as_mut(),
            Accum::Replace,
            g.as_ref(),
            self.get::<T>(),
            T::ONE,
            par,
        );
        out
    }

    /// Whether the reverse product in `T` takes [`Weights::left_mul_tiled`]:
    /// in `f32`, for at most [`DENSE_TILED_MAX`] weights. Decided by the
    /// layer and the precision alone, so that a row's bits never depend on
    /// how many rows are asked for. `benches/row_skip.rs`, 10 rows, one
    /// thread, tiles against faer's GEMM at 50 % and 100 % nonzero adjoint
    /// columns: LeNet-5's 120 × 400 in f32 10.2 / 18.0 µs against 18.9 /
    /// 19.0; 1024 × 1024 in f32 186 / 360 against 381 / 382 µs; in f64
    /// (8-row tiles: 10 rows take two) 22.6 / 41.0 against 26.4 / 26.8 µs
    /// and 411 / 745 against 555 / 591 µs, so f64 keeps the GEMM.
    pub fn prefers_tiled<T: Real>(&self) -> bool {
        std::mem::size_of::<T>() == 4
            && self.f64.nrows().saturating_mul(self.f64.ncols()) <= DENSE_TILED_MAX
    }

    /// `G·W` through register tiles instead of a GEMM: blocks of 16
    /// adjoint rows (8 in `f64`) × [`DENSE_TILE_COLUMNS`] output columns,
    /// summed in registers over `G`'s nonzero columns
    /// ascending, each output from zero in fused multiply-adds. A term
    /// whose adjoint entry is `±0` leaves the sum's bits as they are (the
    /// sum, begun at `+0`, is never `−0`), so a row's bits do not depend on
    /// the other rows. No packing or blocking: for the few adjoint rows of
    /// one instance, where a GEMM's packing costs more than it saves and
    /// half the columns are zero after a ReLU.
    pub fn left_mul_tiled<T: Real>(&self, g: &Block<T>) -> Block<T> {
        let (k, m, n) = (g.nrows(), self.f64.nrows(), self.f64.ncols());
        assert_eq!(g.ncols(), m, "dense reverse: dimension mismatch");
        let mut out = Block::zeros(k, n);
        if k == 0 || n == 0 {
            return out;
        }
        let w = self.get::<T>();
        let nz: Vec<usize> = crate::nonzero_columns(g.as_slice(), k)
            .iter()
            .enumerate()
            .filter_map(|(i, &on)| on.then_some(i))
            .collect();
        crate::simd::dispatch(
            #[inline(always)]
            || {
                if std::mem::size_of::<T>() == 4 {
                    dense_tiles::<T, 16>(g, w, &nz, &mut out);
                } else {
                    dense_tiles::<T, 8>(g, w, &nz, &mut out);
                }
            },
        );
        out
    }

    /// `G·W` when only the columns `nz` of `G` are nonzero: those columns
    /// and the rows of `W` they select, gathered, and a smaller GEMM.
    pub fn left_mul_rows<T: Real>(&self, g: &Block<T>, nz: &[usize], par: Par) -> Block<T> {
        let k = g.nrows();
        let mut gc = Vec::with_capacity(k * nz.len());
        for &t in nz {
            gc.extend_from_slice(g.col_as_slice(t));
        }
        let gc = Block::from_col_major(k, nz.len(), gc);
        let ac = Mat::<T>::from_fn(nz.len(), self.f64.ncols(), |t, j| T::of(self.f64[(nz[t], j)]));
        let mut out = Block::zeros(k, self.f64.ncols());
        faer::linalg::matmul::matmul(out.as_mut(), Accum::Replace, gc.as_ref(), &ac, T::ONE, par);
        out
    }
}

/// The most weights a dense layer may have for its reverse product to
/// take [`Weights::left_mul_tiled`]: up to 1 M measured (above); larger
/// layers (ResNet-50's 2 M, VGG's 16.8 M) keep the GEMM.
pub const DENSE_TILED_MAX: usize = 1 << 20;

/// Output columns per register tile of [`Weights::left_mul_tiled`]: with
/// two AVX registers of adjoint rows each, 12 registers of sums.
pub const DENSE_TILE_COLUMNS: usize = 6;

/// [`Weights::left_mul_tiled`]'s loops: `RL` adjoint rows (16 in `f32`,
/// 8 in `f64`) × [`DENSE_TILE_COLUMNS`] output columns at a time, 12 AVX
/// registers of sums.
#[inline(always)]
fn dense_tiles<T: Real, const RL: usize>(
    g: &Block<T>,
    w: &Mat<T>,
    nz: &[usize],
    out: &mut Block<T>,
) {
    const JB: usize = DENSE_TILE_COLUMNS;
    let (k, n) = (g.nrows(), w.ncols());
    let mut tiles = vec![[T::ZERO; RL]; nz.len()];
    for r0 in (0..k).step_by(RL) {
        let rb = RL.min(k - r0);
        for (t, &i) in tiles.iter_mut().zip(nz) {
            t[..rb].copy_from_slice(&g.col_as_slice(i)[r0..r0 + rb]);
        }
        for j0 in (0..n).step_by(JB) {
            let jn = JB.min(n - j0);
            // the block's weight columns (the last block's missing ones
            // repeat its first; their sums are not stored)
            let wc: [&[T]; JB] =
                std::array::from_fn(|c| w.col_as_slice(j0 + if c < jn { c } else { 0 }));
            let z = [T::ZERO; RL];
            let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (z, z, z, z, z, z);
            for (t, &i) in tiles.iter().zip(nz) {
                fma_lanes(&mut a0, wc[0][i], t);
                fma_lanes(&mut a1, wc[1][i], t);
                fma_lanes(&mut a2, wc[2][i], t);
                fma_lanes(&mut a3, wc[3][i], t);
                fma_lanes(&mut a4, wc[4][i], t);
                fma_lanes(&mut a5, wc[5][i], t);
            }
            for (c, a) in [a0, a1, a2, a3, a4, a5].iter().take(jn).enumerate() {
                out.col_as_slice_mut(j0 + c)[r0..r0 + rb].copy_from_slice(&a[..rb]);
            }
        }
    }
}

/// `a += w·x`, lane by lane, in fused multiply-adds: the register-tile
/// step of the crate's own kernels (dense tiles, the direct forward
/// convolution, the active reverse convolution, the sparse scatter's taps,
/// where each lane's bits are those of its adjoint row alone).
#[inline(always)]
pub(crate) fn fma_lanes<T: Real, const N: usize>(a: &mut [T; N], w: T, x: &[T; N]) {
    for (s, &xi) in a.iter_mut().zip(x) {
        *s = w.fma(xi, *s);
    }
}

impl From<Mat<f64>> for Weights {
    fn from(m: Mat<f64>) -> Self {
        Self::new(std::sync::Arc::new(m))
    }
}

impl std::ops::Deref for Weights {
    type Target = Mat<f64>;
    fn deref(&self) -> &Mat<f64> {
        &self.f64
    }
}

impl PartialEq for Weights {
    fn eq(&self, other: &Self) -> bool {
        self.f64 == other.f64
    }
}
