//! The reverse product `G·A` of a 3×3, stride-1, undilated convolution by
//! Winograd's minimal filtering F(m×m, 3×3), m = 2 or 4: each m×m block of
//! the adjoint's input-side image is formed from an (m+2)×(m+2) block of
//! its output-side image with (m+2)² multiplications per channel pair
//! instead of 9m², so the GEMMs do 4/9 (F(2×2, 3×3), 2.25× fewer) or 1/4
//! (F(4×4, 3×3), 4× fewer) of the direct method's multiply-adds.
//!
//! The reverse product of a stride-1 convolution is a correlation of the
//! output-side adjoint with the flipped kernel:
//! `G_in[r, ci, y, x] = Σ_co Σ_{a,b} W[co, ci, 2−a, 2−b] ·
//! G_out[r, co, y − q_y + a, x − q_x + b]` with `q = 2 − pad` (terms
//! outside the output zero). With the standard transforms (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016), for
//! F(2×2, 3×3)
//!
//! ```text
//! Bᵀ = [1  0 −1  0]    G = [1    0    0 ]    Aᵀ = [1 1  1  0]
//!      [0  1  1  0]        [1/2  1/2  1/2]         [0 1 −1 −1]
//!      [0 −1  1  0]        [1/2 −1/2  1/2]
//!      [0  1  0 −1]        [0    0    1 ]
//! ```
//!
//! and for F(4×4, 3×3) (interpolation points 0, ±1, ±2, ∞)
//!
//! ```text
//! Bᵀ = [4  0 −5  0 1 0]   G = [ 1/4    0     0  ]   Aᵀ = [1 1  1 1  1 0]
//!      [0 −4 −4  1 1 0]       [−1/6 −1/6  −1/6 ]        [0 1 −1 2 −2 0]
//!      [0  4 −4 −1 1 0]       [−1/6  1/6  −1/6 ]        [0 1  1 4  4 0]
//!      [0 −2 −1  2 1 0]       [1/24  1/12  1/6 ]        [0 1 −1 8 −8 1]
//!      [0  2 −1 −2 1 0]       [1/24 −1/12  1/6 ]
//!      [0  4  0 −5 0 1]       [ 0     0     1  ]
//! ```
//!
//! an m×m output block is `Aᵀ [Σ_co (G g Gᵀ) ⊙ (Bᵀ d B)] A`: the kernel
//! transform `U = G g Gᵀ` (per channel pair, formed in f64 and rounded
//! once), the data transform `V = Bᵀ d B` (per channel, block and adjoint
//! row), then for each of the (m+2)² transformed positions one GEMM
//! `M = V·U` summing over the output channels, and the inverse transform.
//! F(2×2)'s constants are powers of two or ±1, so its result differs from
//! the direct sum by rounding alone; F(4×4)'s data and output transforms
//! scale by up to 8, which widens that rounding (tested against the
//! explicit Toeplitz matrix with a bound of the direct path's order for
//! F(2×2) and one 16 times wider for F(4×4)). Which tile a convolution takes
//! depends on its geometry alone ([`Tile::of`]): F(4×4) on images of at
//! least [`F4_MIN_POSITIONS`] positions.
//!
//! The blocks of the image are taken in bands of whole block rows, a band's
//! transforms and GEMMs fitting in a core's L2; bands run in parallel,
//! each writing its own rows of the result, so the bits do not depend on
//! the threads.

use faer::{Accum, MatMut, MatRef, Par};

use crate::Real;
use crate::conv::ConvGeometry;

/// Each band's GEMMs have about this many rows (adjoint rows × blocks) at
/// least, and their data about `BAND_ENTRIES` entries: below the first the
/// GEMM's packing outweighs its work, above the second a band leaves L2.
const BAND_MIN_ROWS: usize = 64;
/// See [`BAND_MIN_ROWS`]: 2^16 entries (256 KB in `f32`).
const BAND_ENTRIES: usize = 1 << 16;

/// Channels per group, on both sides, below which the direct GEMM stays:
/// with few channels the small GEMMs and the transforms cost more than
/// they save (a network's first convolution, 3 input channels).
pub(crate) const WINOGRAD_MIN_CHANNELS: usize = 16;

/// Input positions below which the direct GEMM stays: the transformed
/// kernel (16 values per channel pair, formed once per operator) costs
/// more than a product over a tiny image saves. At 16 (4×4, a CIFAR
/// ResNet-18's last stage) a 10-row product already gains; one row of
/// ResNet-50 at 224² (its last stage 7×7) roughly breaks even in a
/// one-shot run, where the kernel is formed for a single product.
pub(crate) const WINOGRAD_MIN_POSITIONS: usize = 16;

/// Input positions from which F(4×4, 3×3) replaces F(2×2, 3×3): on smaller
/// images its blocks are too few for its GEMMs (a 10-row product over an
/// 8×8 image has 40 GEMM rows with 4×4 blocks, 160 with 2×2 ones), and its
/// kernel (36 values per channel pair against 16) is formed for less work.
pub(crate) const F4_MIN_POSITIONS: usize = 256;

/// Whether the reverse product of `g` takes the Winograd path: a 3×3,
/// stride-1, undilated kernel with leading pads of at most 2 (a block's
/// rows then start at most 2 before its output's), at least
/// [`WINOGRAD_MIN_CHANNELS`] channels per group on each side and
/// [`WINOGRAD_MIN_POSITIONS`] input positions. Never the number of adjoint
/// rows: a row's bits do not depend on which other rows are asked for.
pub(crate) fn eligible(g: &ConvGeometry) -> bool {
    (g.kh, g.kw, g.stride, g.dilation) == (3, 3, (1, 1), (1, 1))
        && g.pad.0 <= 2
        && g.pad.1 <= 2
        && g.c_in / g.groups >= WINOGRAD_MIN_CHANNELS
        && g.c_out / g.groups >= WINOGRAD_MIN_CHANNELS
        && g.ih * g.iw >= WINOGRAD_MIN_POSITIONS
}

/// The two Winograd tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    /// F(2×2, 3×3): 4×4 blocks, 16 transformed positions.
    F2,
    /// F(4×4, 3×3): 6×6 blocks, 36 transformed positions.
    F4,
}

impl Tile {
    /// The tile an [`eligible`] convolution takes, from its geometry alone
    /// (never the number of adjoint rows): F(4×4) from
    /// [`F4_MIN_POSITIONS`] input positions.
    pub(crate) fn of(g: &ConvGeometry) -> Self {
        if g.ih * g.iw >= F4_MIN_POSITIONS { Tile::F4 } else { Tile::F2 }
    }

    /// Transformed positions per block: (m+2)².
    fn xi(self) -> usize {
        match self {
            Tile::F2 => F2::XI,
            Tile::F4 => F4::XI,
        }
    }

    /// Output block side m.
    fn m(self) -> usize {
        match self {
            Tile::F2 => F2::M,
            Tile::F4 => F4::M,
        }
    }
}

/// Fixed-size arrays a tile's transforms take and give.
trait Arr<E: Copy>: Copy + AsRef<[E]> + AsMut<[E]> {
    fn filled(e: E) -> Self;
}

impl<E: Copy, const N: usize> Arr<E> for [E; N] {
    #[inline(always)]
    fn filled(e: E) -> Self {
        [e; N]
    }
}

/// F(m×m, 3×3) at compile time: its sizes and its three transforms, on
/// scalars or on [`Lanes`] (the same operations on each lane).
trait Wino: 'static {
    /// This tile's value.
    const TILE: Tile;
    /// Output block side.
    const M: usize;
    /// Input block side, `M + 2`.
    const A: usize = Self::M + 2;
    /// Transformed positions, `A²`.
    const XI: usize = Self::A * Self::A;
    /// `XI` values of one block.
    type Block<E: Copy>: Arr<E>;
    /// `M²` values of one output block.
    type Out<E: Copy>: Arr<E>;
    /// `U = G g Gᵀ` of one 3×3 kernel `g` (row-major), already flipped.
    fn kernel<E: Ops>(g: [E; 9]) -> Self::Block<E>;
    /// `Bᵀ d B` of one block `d` (row-major), entry `ξ` handed to
    /// `store(ξ, e)` as it is formed: no block is returned, which for
    /// F(4×4)'s 36 vectors was a copy through memory.
    fn data_into<E: Ops>(d: Self::Block<E>, store: impl FnMut(usize, E));
    /// `Aᵀ m A` of one transformed block, output `i` (row-major) handed to
    /// `store(i, e)` as it is formed.
    fn output_into<E: Ops>(m: Self::Block<E>, store: impl FnMut(usize, E));
    /// [`Wino::data_into`] as a block (for the tests).
    #[cfg(test)]
    fn data<E: Ops>(d: Self::Block<E>) -> Self::Block<E> {
        let mut v = Self::Block::<E>::filled(E::default());
        Self::data_into(d, |i, e| v.as_mut()[i] = e);
        v
    }
    /// [`Wino::output_into`] as a block.
    #[inline(always)]
    fn output<E: Ops>(m: Self::Block<E>) -> Self::Out<E> {
        let mut y = Self::Out::<E>::filled(E::default());
        Self::output_into(m, |i, e| y.as_mut()[i] = e);
        y
    }
}

/// What the transforms compute on: a scalar, or [`Lanes`] of adjoint rows.
/// `scale` multiplies by a constant (rounded once to the scalar type).
trait Ops: Copy + Default + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {
    fn scale(self, c: f64) -> Self;
}

impl Ops for f64 {
    #[inline(always)]
    fn scale(self, c: f64) -> Self {
        self * c
    }
}

/// F(2×2, 3×3).
struct F2;

impl Wino for F2 {
    const TILE: Tile = Tile::F2;
    const M: usize = 2;
    type Block<E: Copy> = [E; 16];
    type Out<E: Copy> = [E; 4];

    #[inline(always)]
    fn kernel<E: Ops>(g: [E; 9]) -> [E; 16] {
        // G g: 4×3
        let mut t = [E::default(); 12];
        for c in 0..3 {
            let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
            t[c] = g0;
            t[3 + c] = (g0 + g1 + g2).scale(0.5);
            t[6 + c] = (g0 - g1 + g2).scale(0.5);
            t[9 + c] = g2;
        }
        // (G g) Gᵀ: 4×4
        let mut u = [E::default(); 16];
        for r in 0..4 {
            let (a, b, c) = (t[3 * r], t[3 * r + 1], t[3 * r + 2]);
            u[4 * r] = a;
            u[4 * r + 1] = (a + b + c).scale(0.5);
            u[4 * r + 2] = (a - b + c).scale(0.5);
            u[4 * r + 3] = c;
        }
        u
    }

    #[inline(always)]
    fn data_into<E: Ops>(d: [E; 16], mut store: impl FnMut(usize, E)) {
        // Bᵀ d: rows
        let mut t = [E::default(); 16];
        for c in 0..4 {
            let (d0, d1, d2, d3) = (d[c], d[4 + c], d[8 + c], d[12 + c]);
            t[c] = d0 - d2;
            t[4 + c] = d1 + d2;
            t[8 + c] = d2 - d1;
            t[12 + c] = d1 - d3;
        }
        // (Bᵀ d) B: columns
        for r in 0..4 {
            let (a, b, c, e) = (t[4 * r], t[4 * r + 1], t[4 * r + 2], t[4 * r + 3]);
            store(4 * r, a - c);
            store(4 * r + 1, b + c);
            store(4 * r + 2, c - b);
            store(4 * r + 3, b - e);
        }
    }

    #[inline(always)]
    fn output_into<E: Ops>(m: [E; 16], mut store: impl FnMut(usize, E)) {
        // Aᵀ m: 2×4
        let mut t = [E::default(); 8];
        for c in 0..4 {
            let (m0, m1, m2, m3) = (m[c], m[4 + c], m[8 + c], m[12 + c]);
            t[c] = m0 + m1 + m2;
            t[4 + c] = m1 - m2 - m3;
        }
        for r in 0..2 {
            let (a, b, c, e) = (t[4 * r], t[4 * r + 1], t[4 * r + 2], t[4 * r + 3]);
            store(2 * r, a + b + c);
            store(2 * r + 1, b - c - e);
        }
    }
}

/// F(4×4, 3×3).
struct F4;

impl F4 {
    /// `G x` of one column `x` of 3 values (the kernel transform's 1-D
    /// step).
    #[inline(always)]
    fn g<E: Ops>(x0: E, x1: E, x2: E) -> [E; 6] {
        let s = x0 + x2;
        [
            x0.scale(0.25),
            (s + x1).scale(-1.0 / 6.0),
            (s - x1).scale(-1.0 / 6.0),
            x0.scale(1.0 / 24.0) + x1.scale(1.0 / 12.0) + x2.scale(1.0 / 6.0),
            x0.scale(1.0 / 24.0) - x1.scale(1.0 / 12.0) + x2.scale(1.0 / 6.0),
            x2,
        ]
    }

    /// `Bᵀ x` of one column `x` of 6 values (the data transform's 1-D step).
    #[inline(always)]
    fn b<E: Ops>(x: [E; 6]) -> [E; 6] {
        let [d0, d1, d2, d3, d4, d5] = x;
        [
            d0.scale(4.0) - d2.scale(5.0) + d4,
            d4 + d3 - (d1 + d2).scale(4.0),
            d4 - d3 + (d1 - d2).scale(4.0),
            d4 - d2 + (d3 - d1).scale(2.0),
            d4 - d2 - (d3 - d1).scale(2.0),
            d1.scale(4.0) - d3.scale(5.0) + d5,
        ]
    }

    /// `Aᵀ x` of one column `x` of 6 values (the output transform's 1-D
    /// step).
    #[inline(always)]
    fn a<E: Ops>(x: [E; 6]) -> [E; 4] {
        let [m0, m1, m2, m3, m4, m5] = x;
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [m0 + s12 + s34, d12 + d34.scale(2.0), s12 + s34.scale(4.0), d12 + d34.scale(8.0) + m5]
    }

    /// `Fᵀ x F` of a 6×6 block `x` (row-major), where `f` is the 1-D step
    /// `v ↦ Fᵀ v` from a column of 6 values to `N`: the columns first, then
    /// the rows; `store(i, e)` takes entry `i` of the `N × N` result
    /// (row-major). The data (`F = B`) and output (`F = A`) transforms.
    #[inline(always)]
    fn separable<E: Ops, const N: usize>(
        x: [E; 36],
        f: impl Fn([E; 6]) -> [E; N],
        mut store: impl FnMut(usize, E),
    ) {
        // Fᵀ x: column by column, N × 6
        let mut t = [[E::default(); 6]; N];
        for c in 0..6 {
            let col = f([x[c], x[6 + c], x[12 + c], x[18 + c], x[24 + c], x[30 + c]]);
            for (r, v) in col.into_iter().enumerate() {
                t[r][c] = v;
            }
        }
        // (Fᵀ x) F: row by row
        for (r, row) in t.into_iter().enumerate() {
            for (c, v) in f(row).into_iter().enumerate() {
                store(N * r + c, v);
            }
        }
    }
}

impl Wino for F4 {
    const TILE: Tile = Tile::F4;
    const M: usize = 4;
    type Block<E: Copy> = [E; 36];
    type Out<E: Copy> = [E; 16];

    #[inline(always)]
    fn kernel<E: Ops>(g: [E; 9]) -> [E; 36] {
        // G g: 6×3, column by column
        let mut t = [E::default(); 18];
        for c in 0..3 {
            for (r, v) in F4::g(g[c], g[3 + c], g[6 + c]).into_iter().enumerate() {
                t[3 * r + c] = v;
            }
        }
        // (G g) Gᵀ: 6×6, row by row
        let mut u = [E::default(); 36];
        for r in 0..6 {
            u[6 * r..6 * r + 6].copy_from_slice(&F4::g(t[3 * r], t[3 * r + 1], t[3 * r + 2]));
        }
        u
    }

    #[inline(always)]
    fn data_into<E: Ops>(d: [E; 36], store: impl FnMut(usize, E)) {
        F4::separable(d, F4::b, store);
    }

    #[inline(always)]
    fn output_into<E: Ops>(m: [E; 36], store: impl FnMut(usize, E)) {
        F4::separable(m, F4::a, store);
    }
}

/// Adjoint rows transformed together: a block's vectors are read and
/// written this many rows at a time, as fixed-size arrays the compiler
/// keeps in vector registers.
const LANES: usize = 8;

/// [`LANES`] adjoint rows' values, added, subtracted and scaled lane by
/// lane (fixed-size loops the compiler turns into vector instructions).
#[derive(Clone, Copy, Default)]
struct Lanes<T>([T; LANES]);

impl<T: Real> std::ops::Add for Lanes<T> {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, o: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
        self
    }
}

impl<T: Real> std::ops::Sub for Lanes<T> {
    type Output = Self;
    #[inline(always)]
    fn sub(mut self, o: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a -= b;
        }
        self
    }
}

impl<T: Real> Ops for Lanes<T> {
    #[inline(always)]
    fn scale(mut self, c: f64) -> Self {
        let c = T::of(c);
        for a in &mut self.0 {
            *a *= c;
        }
        self
    }
}

/// Rows `r0 .. r0 + len` (`len ≤ LANES`) of each of a block's vectors, as
/// lanes (zeros past `len`).
#[inline(always)]
fn load_lanes<T: Real, B: Arr<Lanes<T>>>(src: &[&[T]], r0: usize, len: usize) -> B {
    // (loops, not `array::from_fn`: everything here must inline into the
    // AVX2 copy)
    let mut d = B::filled(Lanes([T::ZERO; LANES]));
    for (d, s) in d.as_mut().iter_mut().zip(src) {
        let s = &s[r0..r0 + len];
        // whole lanes as fixed-size copies (vector moves)
        match <&[T; LANES]>::try_from(s) {
            Ok(full) => d.0 = *full,
            Err(_) => d.0[..len].copy_from_slice(s),
        }
    }
    d
}

/// `dst[at..][..len] = e`'s first `len` lanes.
#[inline(always)]
fn store_lanes<T: Real>(dst: &mut [T], at: usize, len: usize, e: &Lanes<T>) {
    let out = &mut dst[at..at + len];
    match <&mut [T; LANES]>::try_from(&mut *out) {
        Ok(full) => *full = e.0,
        Err(_) => {
            for (l, o) in out.iter_mut().enumerate() {
                *o = e.0[l];
            }
        }
    }
}

/// Calls `f(r0, len)` over the adjoint rows `0..k` in pieces of [`LANES`]:
/// whole pieces where `k` allows, the last one overlapping the one before
/// it (its rows are formed twice, alike) instead of a partial one.
#[inline(always)]
fn lane_pieces(k: usize, mut f: impl FnMut(usize, usize)) {
    if k < LANES {
        f(0, k);
        return;
    }
    let mut r0 = 0;
    loop {
        f(r0.min(k - LANES), LANES);
        if r0 + LANES >= k {
            break;
        }
        r0 += LANES;
    }
}

/// `dst[ξ][at + r] = (Bᵀ d_r B)[ξ]` for every adjoint row `r < k`, where
/// `d_r[i] = src[i][r]`.
#[inline(always)]
fn data_lanes<W: Wino, T: Real>(src: &[&[T]], dst: &mut [&mut [T]], at: usize, k: usize) {
    lane_pieces(
        k,
        #[inline(always)]
        |r0, len| {
            let d = load_lanes::<T, W::Block<Lanes<T>>>(src, r0, len);
            W::data_into(
                d,
                #[inline(always)]
                |xi, e| store_lanes(dst[xi], at + r0, len, &e),
            );
        },
    );
}

/// `o[to[i] + r] = (Aᵀ m_r A)[i]` for every adjoint row `r < k` and every
/// output `i` with a place `to[i]`, where `m_r[ξ] = src[ξ][r]`.
#[inline(always)]
fn output_lanes<W: Wino, T: Real>(src: &[&[T]], o: &mut [T], to: &[Option<usize>], k: usize) {
    lane_pieces(
        k,
        #[inline(always)]
        |r0, len| {
            let m = load_lanes::<T, W::Block<Lanes<T>>>(src, r0, len);
            W::output_into(
                m,
                #[inline(always)]
                |i, e| {
                    if let Some(at) = to[i] {
                        store_lanes(o, at + r0, len, &e);
                    }
                },
            );
        },
    );
}

/// What every band of one group reads.
struct Band<'a, T> {
    geom: &'a ConvGeometry,
    /// The kernel's transformed matrices (one per ξ), each `cog × cig`
    /// column-major.
    u: &'a [T],
    /// The group's slice of the adjoint.
    gg: &'a [T],
    /// `k` zeros: a block's vectors outside the image.
    zeros: &'a [T],
    /// How far a block's rows and columns start before its output's.
    qy: isize,
    qx: isize,
}

/// One band of block rows `t0..t1` (see [`band`]), as pulp's job.
struct BandJob<'a, 'b, 'c, W, T> {
    ctx: &'a Band<'b, T>,
    t0: usize,
    t1: usize,
    dst: &'a mut [&'c mut [T]],
    scratch: &'a mut Vec<T>,
    par: Par,
    _w: std::marker::PhantomData<W>,
}

impl<W: Wino, T: Real> pulp::WithSimd for BandJob<'_, '_, '_, W, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        band::<W, T>(self.ctx, self.t0, self.t1, self.dst, self.scratch, self.par)
    }
}

/// The band of block rows `t0..t1`: its output rows `M·t0 .. M·t1` (within
/// `ih`) of every channel `ci` of the group, written into `dst[ci]` (those
/// rows of the result's plane, `[y][x][r]`), every entry. Its V and M live
/// in `scratch`, which the bands a thread runs reuse (grown, never
/// zeroed again: every entry a band reads it has written). A parallel
/// `par` runs its GEMMs as tasks, each sequential: the same bits.
#[inline(always)]
fn band<W: Wino, T: Real>(
    ctx: &Band<'_, T>,
    t0: usize,
    t1: usize,
    dst: &mut [&mut [T]],
    scratch: &mut Vec<T>,
    par: Par,
) {
    let Band { geom, u, gg, zeros, qy, qx } = *ctx;
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let (ih, iw, oh, ow) = (geom.ih, geom.iw, geom.oh, geom.ow);
    let (bm, ba) = (W::M, W::A);
    let tw = iw.div_ceil(bm);
    let k = zeros.len();
    let rows = gemm_rows(tw, t0, t1, k);
    let (sv, sm) = (skewed::<T>(rows * cog), skewed::<T>(rows * cig));
    let need = W::XI * (sv + sm);
    if scratch.len() < need {
        scratch.resize(need, T::ZERO);
    }
    let (v, m) = scratch[..need].split_at_mut(W::XI * sv);
    // V_ξ: rows × cog column-major, row (block, r); each block's
    // input vectors (over r, contiguous; zeros outside the image)
    // transformed lane by lane
    {
        let mut vx: Vec<&mut [T]> = v.chunks_exact_mut(sv).map(|c| &mut c[..rows * cog]).collect();
        // a lone GEMM row's zero partner (its row is read, never written)
        let real = (t1 - t0) * tw * k;
        for vxi in vx.iter_mut() {
            for co in 0..cog {
                vxi[co * rows + real..(co + 1) * rows].fill(T::ZERO);
            }
        }
        for co in 0..cog {
            let plane = &gg[co * oh * ow * k..(co + 1) * oh * ow * k];
            for ty in t0..t1 {
                let y0 = (bm * ty) as isize - qy;
                // where each row of the block row's taps starts in the
                // plane (none outside the image, which reads zeros; a
                // block has at most 6)
                let rows_in: [Option<usize>; 6] = std::array::from_fn(|a| {
                    let y = y0 + a as isize;
                    (a < ba && y >= 0 && (y as usize) < oh).then(|| y as usize * ow)
                });
                // the image column of tap column `b` of block `tx`, if inside
                let col_in = |tx: usize, b: usize| {
                    let x = (bm * tx + b) as isize - qx;
                    (x >= 0 && (x as usize) < ow).then_some(x as usize)
                };
                let row0 = co * rows + (ty - t0) * tw * k;
                if k >= LANES {
                    // lanes over the adjoint rows of one block
                    for tx in 0..tw {
                        let mut src = W::Block::<&[T]>::filled(zeros);
                        for (a, row) in rows_in.iter().take(ba).enumerate() {
                            let Some(row) = row else { continue };
                            for b in 0..ba {
                                if let Some(x) = col_in(tx, b) {
                                    let at = (row + x) * k;
                                    src.as_mut()[a * ba + b] = &plane[at..at + k];
                                }
                            }
                        }
                        data_lanes::<W, T>(src.as_ref(), &mut vx, row0 + tx * k, k);
                    }
                } else {
                    // few adjoint rows: lanes over (block, r), the GEMM
                    // rows of this block row, gathered
                    lane_pieces(
                        tw * k,
                        #[inline(always)]
                        |q0, len| {
                            let mut d = W::Block::<Lanes<T>>::filled(Lanes([T::ZERO; LANES]));
                            for l in 0..len {
                                let (tx, r) = ((q0 + l) / k, (q0 + l) % k);
                                for (a, row) in rows_in.iter().take(ba).enumerate() {
                                    for b in 0..ba {
                                        d.as_mut()[a * ba + b].0[l] = match (row, col_in(tx, b)) {
                                            (Some(row), Some(x)) => plane[(row + x) * k + r],
                                            _ => T::ZERO,
                                        };
                                    }
                                }
                            }
                            W::data_into(
                                d,
                                #[inline(always)]
                                |xi, e| store_lanes(vx[xi], row0 + q0, len, &e),
                            );
                        },
                    );
                }
            }
        }
    }
    // M_ξ = V_ξ·U_ξ: rows × cig column-major (every entry written)
    let v = &*v;
    let gemm = |xi: usize, mx: &mut [T]| {
        let a = MatRef::from_column_major_slice(&v[xi * sv..][..rows * cog], rows, cog);
        let b = MatRef::from_column_major_slice(&u[xi * cog * cig..][..cog * cig], cog, cig);
        let c = MatMut::from_column_major_slice_mut(&mut mx[..rows * cig], rows, cig);
        faer::linalg::matmul::matmul(c, Accum::Replace, a, b, T::ONE, Par::Seq);
    };
    if par.degree() > 1 {
        use rayon::prelude::*;
        m.par_chunks_exact_mut(sm).enumerate().for_each(|(xi, mx)| gemm(xi, mx));
    } else {
        m.chunks_exact_mut(sm).enumerate().for_each(|(xi, mx)| gemm(xi, mx));
    }
    let y_lo = bm * t0;
    {
        let mut mx = W::Block::<&[T]>::filled(&[]);
        for (d, c) in mx.as_mut().iter_mut().zip(m.chunks_exact(sm)) {
            *d = &c[..rows * cig];
        }
        for ci in 0..cig {
            for ty in t0..t1 {
                let row0 = ci * rows + (ty - t0) * tw * k;
                // where output `i` of block `tx`, row `r`, goes (nowhere
                // past the image's edge)
                let place = |tx: usize, r: usize, i: usize| {
                    let (oy, ox) = (bm * ty + i / bm, bm * tx + i % bm);
                    (oy < ih && ox < iw).then(|| ((oy - y_lo) * iw + ox) * k + r)
                };
                if k >= LANES {
                    for tx in 0..tw {
                        let at = row0 + tx * k;
                        let mut src = mx;
                        for s in src.as_mut() {
                            *s = &s[at..at + k];
                        }
                        let mut to = W::Out::<Option<usize>>::filled(None);
                        for (i, t) in to.as_mut().iter_mut().enumerate() {
                            *t = place(tx, 0, i);
                        }
                        output_lanes::<W, T>(src.as_ref(), dst[ci], to.as_ref(), k);
                    }
                } else {
                    let mut src = mx;
                    for s in src.as_mut() {
                        *s = &s[row0..row0 + tw * k];
                    }
                    lane_pieces(
                        tw * k,
                        #[inline(always)]
                        |q0, len| {
                            let e = W::output(load_lanes::<T, W::Block<Lanes<T>>>(
                                src.as_ref(),
                                q0,
                                len,
                            ));
                            for l in 0..len {
                                let (tx, r) = ((q0 + l) / k, (q0 + l) % k);
                                for (i, e) in e.as_ref().iter().enumerate() {
                                    if let Some(at) = place(tx, r, i) {
                                        dst[ci][at] = e.0[l];
                                    }
                                }
                            }
                        },
                    );
                }
            }
        }
    }
}

/// The transformed kernel of a convolution [`eligible`] for the Winograd
/// path, from its weights (`c_out × (c_in/groups) × 3 × 3`, row-major):
/// per group, the matrices `U_ξ` (one per transformed position of its
/// [`Tile`]), each `cog × cig` column-major, of the flipped kernels
/// `G g Gᵀ`, formed in `f64` and rounded once to `T`. Input-independent:
/// formed once per operator and precision. The kernels of [`LANES`]
/// output channels are transformed together, as lanes (the scalar
/// transform's operations, so its bits), and each `U_ξ` column written
/// [`LANES`] entries at a time.
pub(crate) fn kernel<T: Real>(geom: &ConvGeometry, weight: &[f64]) -> Vec<T> {
    match Tile::of(geom) {
        Tile::F2 => kernel_in::<F2, T>(geom, weight),
        Tile::F4 => kernel_in::<F4, T>(geom, weight),
    }
}

/// [`kernel`] for the tile `W`.
fn kernel_in<W: Wino, T: Real>(geom: &ConvGeometry, weight: &[f64]) -> Vec<T> {
    pulp::Arch::new().dispatch(KernelJob::<W, T> { geom, weight, _t: std::marker::PhantomData })
}

/// [`kernel`] as pulp's job (compiled for AVX2 too, where the CPU has it).
struct KernelJob<'a, W, T> {
    geom: &'a ConvGeometry,
    weight: &'a [f64],
    _t: std::marker::PhantomData<(W, T)>,
}

impl<W: Wino, T: Real> pulp::WithSimd for KernelJob<'_, W, T> {
    type Output = Vec<T>;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<T> {
        let (geom, weight) = (self.geom, self.weight);
        let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
        let mut u = vec![T::ZERO; kernel_len_in(geom, W::TILE)];
        for (grp, ug) in u.chunks_exact_mut(W::XI * cog * cig).enumerate() {
            // two pieces of lanes per column and block: 16 entries, a
            // whole cache line of f32, written at once
            for cb in (0..cog).step_by(2 * LANES) {
                for ci in 0..cig {
                    for co0 in (cb..(cb + 2 * LANES).min(cog)).step_by(LANES) {
                        let len = LANES.min(cog - co0);
                        // flipped: gf[a][b] = w[2 − a][2 − b], lane l for
                        // output channel co0 + l (zeros past `len`)
                        let mut gf = [Lanes([0.0f64; LANES]); 9];
                        for l in 0..len {
                            let w = &weight[((grp * cog + co0 + l) * cig + ci) * 9..][..9];
                            for (i, g) in gf.iter_mut().enumerate() {
                                g.0[l] = w[8 - i];
                            }
                        }
                        for (xi, v) in W::kernel(gf).as_ref().iter().enumerate() {
                            let dst = &mut ug[xi * cog * cig + ci * cog + co0..][..len];
                            for (d, &e) in dst.iter_mut().zip(&v.0) {
                                *d = T::of(e);
                            }
                        }
                    }
                }
            }
        }
        u
    }
}

/// The GEMM rows of the band of block rows `t0..t1` (`tw` blocks a row):
/// one per (block, adjoint row), at least 2, a zero row added to a lone
/// one, as faer takes a one-row product down another path (a
/// matrix-vector product, with other sums), and a row's bits must not
/// depend on how many adjoint rows there are.
fn gemm_rows(tw: usize, t0: usize, t1: usize, k: usize) -> usize {
    ((t1 - t0) * tw * k).max(2)
}

/// Entries of the transformed kernel: per group, one matrix of the output
/// by the input channels per transformed position.
pub(crate) fn kernel_len(geom: &ConvGeometry) -> usize {
    kernel_len_in(geom, Tile::of(geom))
}

/// [`kernel_len`] with `tile`.
fn kernel_len_in(geom: &ConvGeometry, tile: Tile) -> usize {
    tile.xi() * (geom.c_out / geom.groups) * (geom.c_in / geom.groups) * geom.groups
}

/// The bands of block rows `(t0, t1)` a product with `k` adjoint rows
/// takes with `tile`: at least [`BAND_MIN_ROWS`] GEMM rows each, and at
/// least `cig·cog / (cig + cog)`, so that a band's V and M hold as many
/// entries as the kernel it streams (every band reads all of `U`: with
/// many channels and few blocks, CIFAR ResNet-18's 8×8 stage, two bands
/// read its 4 MB twice); at most [`BAND_ENTRIES`] entries of V and M
/// where that allows more than one block row.
fn bands(geom: &ConvGeometry, k: usize, tile: Tile) -> Vec<(usize, usize)> {
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let (th, tw) = (geom.ih.div_ceil(tile.m()), geom.iw.div_ceil(tile.m()));
    let per_row = (tw * k).max(1);
    let fit = BAND_ENTRIES / (tile.xi() * (cig + cog) * per_row).max(1);
    let kernel_rows = (cig * cog).div_ceil((cig + cog).max(1));
    let band = fit.max(BAND_MIN_ROWS.max(kernel_rows).div_ceil(per_row)).clamp(1, th.max(1));
    (0..th).step_by(band).map(|t0| (t0, (t0 + band).min(th))).collect()
}

/// Entries a product with `k` adjoint rows holds beyond its input and
/// result: each band's V and M (one matrix per transformed position of its
/// GEMM rows by the output and input channels), for as many bands as
/// `threads` run at once.
pub(crate) fn scratch(geom: &ConvGeometry, k: usize, threads: usize) -> usize {
    let tile = Tile::of(geom);
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let tw = geom.iw.div_ceil(tile.m());
    let bands = bands(geom, k, tile);
    let widest = bands.iter().map(|&(t0, t1)| gemm_rows(tw, t0, t1, k)).max().unwrap_or(0);
    // (each matrix [`skewed`], for whichever scalar pads it more)
    let skew = |len: usize| skewed::<f32>(len).max(skewed::<f64>(len));
    tile.xi() * (skew(widest * cig) + skew(widest * cog)) * threads.clamp(1, bands.len().max(1))
}

/// The distance between a band's consecutive V (or M) matrices of `len`
/// entries: `len` padded to whole cache lines, and one line more where
/// that would make an even number of lines. A block's transform stores
/// (and the output transform loads) the same entry of every matrix, 16 or
/// 36 of them, at once; at distances of a multiple of 4 KiB (20 KiB for
/// 80 GEMM rows of 64 channels in `f32`) they all fall in one set of the
/// L1 cache, which holds 12, and evict one another. An odd number of lines
/// puts them in as many different sets (odd is invertible modulo the 64
/// lines of 4 KiB). CIFAR ResNet-18, f32, one thread, a band's data
/// transform / GEMMs / output transform (minimum over the run, ms): 32×32
/// 0.425 / 0.163 / 0.077 → 0.326 / 0.135 / 0.046; 4×4 0.377 / 4.71 /
/// 0.080 → 0.148 / 2.86 / 0.054 (the GEMMs read V and write M there).
fn skewed<T>(len: usize) -> usize {
    let line = (64 / size_of::<T>()).max(1);
    let padded = len.next_multiple_of(line);
    if (padded / line).is_multiple_of(2) { padded + line } else { padded }
}

/// `G·A` for a convolution [`eligible`] for the Winograd path: `g` holds a
/// `k × (c_out·oh·ow)` block with element `(r, j)` at `j·k + r`, `u` the
/// transformed kernel ([`kernel`]) in `T`; returns the `k × (c_in·ih·iw)`
/// block in the same layout.
pub(crate) fn backward<T: Real>(
    geom: &ConvGeometry,
    u: &[T],
    g: &[T],
    k: usize,
    par: Par,
) -> Vec<T> {
    match Tile::of(geom) {
        Tile::F2 => backward_in::<F2, T>(geom, u, g, k, par),
        Tile::F4 => backward_in::<F4, T>(geom, u, g, k, par),
    }
}

/// [`backward`] with the tile `W`.
fn backward_in<W: Wino, T: Real>(
    geom: &ConvGeometry,
    u: &[T],
    g: &[T],
    k: usize,
    par: Par,
) -> Vec<T> {
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let (ih, iw, oh, ow) = (geom.ih, geom.iw, geom.oh, geom.ow);
    assert_eq!(g.len(), geom.c_out * oh * ow * k, "conv backward: dimension mismatch");
    assert_eq!(u.len(), kernel_len_in(geom, W::TILE), "conv backward: kernel of another tile");
    let mut out = vec![T::ZERO; geom.c_in * ih * iw * k];
    if k == 0 {
        return out;
    }
    let bands = bands(geom, k, W::TILE);
    // the bands' V and M, one buffer reused by the bands run in sequence
    let mut scratch = Vec::new();
    let (qy, qx) = (2 - geom.pad.0 as isize, 2 - geom.pad.1 as isize);
    let xs = W::XI * cog * cig;
    for grp in 0..geom.groups {
        // the kernel's transformed matrices, each cog × cig column-major
        let u = &u[grp * xs..(grp + 1) * xs];
        let gg = &g[grp * cog * oh * ow * k..(grp + 1) * cog * oh * ow * k];
        let zeros = vec![T::ZERO; k];
        let ctx = Band { geom, u, gg, zeros: &zeros, qy, qx };
        // each band's rows of every channel's plane, as its own slices of
        // the result: the bands write their outputs in place
        let og = &mut out[grp * cig * ih * iw * k..(grp + 1) * cig * ih * iw * k];
        let mut dsts: Vec<Vec<&mut [T]>> = bands.iter().map(|_| Vec::with_capacity(cig)).collect();
        for plane in og.chunks_exact_mut(ih * iw * k) {
            let mut rest = plane;
            for (d, &(t0, t1)) in dsts.iter_mut().zip(&bands) {
                let rows = (W::M * t1).min(ih) - W::M * t0;
                let (head, tail) = rest.split_at_mut(rows * iw * k);
                d.push(head);
                rest = tail;
            }
        }
        // bands as tasks, or one band's GEMMs as tasks (the last stages of
        // a network: few blocks, many channels); each GEMM sequential
        let across = par.degree() > 1 && bands.len() > 1;
        let inner = if across { Par::Seq } else { par };
        let run_band =
            |scratch: &mut Vec<T>, (&(t0, t1), dst): (&(usize, usize), &mut Vec<&mut [T]>)| {
                // compiled for AVX2 too, where the CPU has it
                let par = inner;
                let job = BandJob::<W, T> {
                    ctx: &ctx,
                    t0,
                    t1,
                    dst,
                    scratch,
                    par,
                    _w: std::marker::PhantomData,
                };
                pulp::Arch::new().dispatch(job)
            };
        if across {
            use rayon::prelude::*;
            bands.par_iter().zip(dsts.par_iter_mut()).for_each_init(Vec::new, run_band);
        } else {
            bands.iter().zip(dsts.iter_mut()).for_each(|b| run_band(&mut scratch, b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use faer::Par;
    use proptest::prelude::*;

    use crate::conv::{ConvGeometry, ConvOp};

    /// An eligible convolution: 16–19 channels per group on each side,
    /// 1–2 groups, any image size (odd ones leave half blocks), leading
    /// and trailing pads 0–2.
    fn eligible_conv() -> impl Strategy<Value = ConvOp> {
        (
            (16usize..40, 16usize..40, 1usize..3),
            (4usize..20, 4usize..20),
            (0usize..3, 0usize..3, 0usize..3, 0usize..3),
            any::<u64>(),
        )
            .prop_filter_map(
                "the kernel fits",
                |((cig, cog, groups), (ih, iw), (pt, pl, pb, pr), seed)| {
                    let oh = (ih + pt + pb).checked_sub(2)?;
                    let ow = (iw + pl + pr).checked_sub(2)?;
                    let geom = ConvGeometry {
                        c_in: cig * groups,
                        c_out: cog * groups,
                        groups,
                        ih,
                        iw,
                        kh: 3,
                        kw: 3,
                        stride: (1, 1),
                        dilation: (1, 1),
                        pad: (pt, pl),
                        oh,
                        ow,
                    };
                    ConvOp::seeded(geom, seed)
                },
            )
    }

    /// One tile's product against the explicit Toeplitz product `want`
    /// (`mag`: the sum of its terms' magnitudes), in f64 and f32, within
    /// `factor·ε·(mag + 1)`; across threads with the sequential bits; and
    /// a row alone as in the whole block.
    fn check_tile<W: super::Wino>(
        op: &ConvOp,
        g: &[f64],
        k: usize,
        want: &[f64],
        mag: &[f64],
        factor: f64,
    ) -> Result<Vec<f64>, TestCaseError> {
        let geom = op.geometry();
        let m = op.nrows();
        let u = super::kernel_in::<W, f64>(geom, op.weight());
        let got = super::backward_in::<W, f64>(geom, &u, g, k, Par::Seq);
        prop_assert_eq!(&got, &super::backward_in::<W, f64>(geom, &u, g, k, Par::rayon(2)));
        let bound = |j: usize, eps: f64| factor * eps * (mag[j] + 1.0);
        for (j, (v, w)) in got.iter().zip(want).enumerate() {
            prop_assert!((v - w).abs() <= bound(j, f64::EPSILON), "f64 at {}: {} vs {}", j, v, w);
        }
        let u32: Vec<f32> = super::kernel_in::<W, f32>(geom, op.weight());
        prop_assert!(u.iter().zip(&u32).all(|(&a, &b)| a as f32 == b));
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        let got32 = super::backward_in::<W, f32>(geom, &u32, &g32, k, Par::Seq);
        prop_assert_eq!(&got32, &super::backward_in::<W, f32>(geom, &u32, &g32, k, Par::rayon(2)));
        for (j, (&v, w)) in got32.iter().zip(want).enumerate() {
            prop_assert!(
                (f64::from(v) - w).abs() <= bound(j, f64::from(f32::EPSILON)),
                "f32 at {}: {} vs {}",
                j,
                v,
                w
            );
        }
        // the first row alone: its bits in the whole block
        let g1: Vec<f64> = (0..m).map(|i| g[i * k]).collect();
        let one = super::backward_in::<W, f64>(geom, &u, &g1, 1, Par::Seq);
        for j in 0..op.ncols() {
            prop_assert_eq!(one[j].to_bits(), got[j * k].to_bits(), "row 0 alone at {}", j);
        }
        Ok(got)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Both tiles' products against the explicit Toeplitz matrix, in
        /// f64 and f32 (see `check_tile`), and the operator's reverse GEMM
        /// on the tile its geometry takes. F(2×2)'s bound is of the direct
        /// path's order (its transforms add at most 4 terms of the same
        /// scale per stage); F(4×4)'s is 16 times wider: its data transform
        /// scales by up to 5 and sums 3 terms per stage, its output
        /// transform by up to 8, and its kernel carries sixths.
        #[test]
        fn winograd_matches_the_toeplitz_matrix(op in eligible_conv(), k in 1usize..12, seed in any::<u64>()) {
            let geom = *op.geometry();
            prop_assert!(super::eligible(&geom));
            let a = op.to_csr();
            let (m, n) = (op.nrows(), op.ncols());
            let mut next = crate::xorshift(seed);
            let g: Vec<f64> = (0..m * k).map(|_| (next() % 2001) as f64 / 1000.0 - 1.0).collect();
            let (mut want, mut mag) = (vec![0.0; n * k], vec![0.0; n * k]);
            for (i, row) in a.outer_iterator().enumerate() {
                for (j, &v) in row.iter() {
                    for r in 0..k {
                        want[j * k + r] += g[i * k + r] * v;
                        mag[j * k + r] += (g[i * k + r] * v).abs();
                    }
                }
            }
            let f2 = check_tile::<super::F2>(&op, &g, k, &want, &mag, 64.0)?;
            let f4 = check_tile::<super::F4>(&op, &g, k, &want, &mag, 1024.0)?;
            // ConvOp's reverse GEMM takes this path, with its geometry's tile
            let got = match super::Tile::of(&geom) {
                super::Tile::F2 => f2,
                super::Tile::F4 => f4,
            };
            prop_assert_eq!(&op.backward_gemm(&g, k, Par::Seq), &got);
            let u32: Vec<f32> = super::kernel(&geom, op.weight());
            let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            let got32 = super::backward(&geom, &u32, &g32, k, Par::Seq);
            // the operator's own f32 kernel, prepared or formed on first use
            let prepared = crate::Operator::Conv(op.clone());
            prepared.prepare::<f32>();
            let crate::Operator::Conv(prepared) = prepared else { unreachable!() };
            prop_assert_eq!(&prepared.backward_gemm(&g32, k, Par::Seq), &got32);
            prop_assert_eq!(&op.clone().backward_gemm(&g32, k, Par::Seq), &got32);
        }
    }

    /// Kernels other than 3×3, stride 1, no dilation, pads up to 2 and 16
    /// channels a side keep the direct path.
    #[test]
    fn only_eligible_convolutions_take_the_winograd_path() {
        let base = ConvGeometry::same_3x3(16, 16, 1, 8);
        assert!(super::eligible(&base));
        let no = [
            ConvGeometry { kh: 5, ..base },
            ConvGeometry { stride: (2, 1), ..base },
            ConvGeometry { dilation: (1, 2), ..base },
            ConvGeometry { pad: (3, 1), ..base },
            ConvGeometry { c_in: 8, ..base },
            ConvGeometry { c_out: 32, groups: 2, c_in: 16, ..base },
            ConvGeometry { ih: 3, iw: 3, oh: 3, ow: 3, ..base },
        ];
        for g in no {
            assert!(!super::eligible(&g), "{g:?}");
        }
    }

    /// The kernel formed lanes at a time (output channels not a multiple
    /// of the lanes, two groups) holds, bit for bit, each flipped kernel's
    /// scalar transform, in f64 and rounded once to f32, for either tile.
    #[test]
    fn the_transformed_kernel_is_each_kernels_scalar_transform() {
        fn check<W: super::Wino>() {
            for (c_in, c_out, groups) in [(16, 16, 1), (17, 19, 1), (40, 42, 2)] {
                let op = ConvOp::seeded(ConvGeometry::same_3x3(c_in, c_out, groups, 6), 7).unwrap();
                let (geom, w) = (op.geometry(), op.weight());
                let u64_ = super::kernel_in::<W, f64>(geom, w);
                let u32_ = super::kernel_in::<W, f32>(geom, w);
                let (cig, cog) = (c_in / groups, c_out / groups);
                for grp in 0..groups {
                    for co in 0..cog {
                        for ci in 0..cig {
                            let k = &w[((grp * cog + co) * cig + ci) * 9..][..9];
                            let mut gf = [0.0f64; 9];
                            for (i, g) in gf.iter_mut().enumerate() {
                                *g = k[8 - i];
                            }
                            for (xi, &v) in W::kernel(gf).as_ref().iter().enumerate() {
                                let at = (grp * W::XI + xi) * cog * cig + ci * cog + co;
                                assert_eq!(u64_[at].to_bits(), v.to_bits());
                                assert_eq!(u32_[at].to_bits(), (v as f32).to_bits());
                            }
                        }
                    }
                }
            }
        }
        check::<super::F2>();
        check::<super::F4>();
    }

    /// The tiles' transforms on one block of a one-channel correlation,
    /// in exact arithmetic's place f64 with small integers: each output of
    /// `Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A` is the direct sum `Σ g[a][b]·d[y+a][x+b]`.
    #[test]
    fn each_tile_computes_the_correlation_of_its_block() {
        fn check<W: super::Wino>() {
            use super::Arr;
            let (bm, ba) = (W::M, W::A);
            let g: [f64; 9] = [1.0, -2.0, 3.0, 0.5, 4.0, -1.0, 2.0, 1.5, -3.0];
            let mut d = W::Block::<f64>::filled(0.0);
            for (i, v) in d.as_mut().iter_mut().enumerate() {
                *v = ((i * 7 + 3) % 11) as f64 - 5.0;
            }
            let (u, v) = (W::kernel(g), W::data(d));
            let mut p = W::Block::<f64>::filled(0.0);
            for ((p, u), v) in p.as_mut().iter_mut().zip(u.as_ref()).zip(v.as_ref()) {
                *p = u * v;
            }
            let y = W::output(p);
            for oy in 0..bm {
                for ox in 0..bm {
                    let mut want = 0.0;
                    for a in 0..3 {
                        for b in 0..3 {
                            want += g[3 * a + b] * d.as_ref()[(oy + a) * ba + ox + b];
                        }
                    }
                    let got = y.as_ref()[oy * bm + ox];
                    assert!(
                        (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                        "{oy},{ox}: {got} vs {want}"
                    );
                }
            }
        }
        check::<super::F2>();
        check::<super::F4>();
    }

    /// Which tile a geometry takes: F(4×4) from `F4_MIN_POSITIONS` input
    /// positions, whatever the channels.
    #[test]
    fn large_images_take_the_f4_tile() {
        use super::Tile;
        assert_eq!(Tile::of(&ConvGeometry::same_3x3(16, 16, 1, 15)), Tile::F2);
        assert_eq!(Tile::of(&ConvGeometry::same_3x3(16, 16, 1, 16)), Tile::F4);
        assert_eq!(Tile::of(&ConvGeometry::same_3x3(64, 64, 1, 56)), Tile::F4);
        assert_eq!(Tile::of(&ConvGeometry::same_3x3(512, 512, 1, 7)), Tile::F2);
    }

    /// The memory budget's view of a convolution: on the Winograd path its
    /// kept kernel (16 values per channel pair and group, in f64 and f32)
    /// and its bands' transformed blocks, at least one band's V and M;
    /// off it, neither. Both paths keep the f32 weights.
    #[test]
    fn the_budget_counts_the_winograd_kernel_and_bands() {
        let on = ConvOp::seeded(ConvGeometry::same_3x3(32, 48, 2, 8), 3).unwrap();
        // 8 input channels: too few for the Winograd path
        let off = ConvOp::seeded(ConvGeometry::same_3x3(8, 48, 1, 8), 3).unwrap();
        let weights = 48 * 16 * 9;
        assert_eq!(on.formed_bytes(), weights * 4 + 16 * 24 * 16 * 2 * 12);
        for k in [1, 3, 10, 64] {
            let band = super::bands(on.geometry(), k, super::Tile::F2)[0];
            let rows = super::gemm_rows(4, band.0, band.1, k);
            assert!(on.reverse_scratch(k) >= 16 * rows * (16 + 24), "k = {k}");
            assert_eq!(off.reverse_scratch(k), 0);
        }
        assert_eq!(off.formed_bytes(), 48 * 8 * 9 * 4);
    }

    /// The bands cover every block row once, in order.
    #[test]
    fn bands_tile_the_block_rows() {
        for (hw, k) in [(2, 1), (7, 1), (8, 10), (33, 3), (64, 1)] {
            let geom = ConvGeometry::same_3x3(16, 16, 1, hw);
            let tile = super::Tile::of(&geom);
            let b = super::bands(&geom, k, tile);
            assert_eq!(b.first().map(|x| x.0), Some(0));
            assert_eq!(b.last().map(|x| x.1), Some(hw.div_ceil(tile.m())));
            assert!(b.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
        }
    }
}
