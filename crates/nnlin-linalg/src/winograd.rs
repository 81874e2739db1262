//! The reverse product `G·A` of a 3×3, stride-1, undilated convolution by
//! Winograd's minimal filtering F(2×2, 3×3): each 2×2 block of the
//! adjoint's input-side image is formed from a 4×4 block of its output-side
//! image with 16 multiplications per channel pair instead of 36, so the
//! GEMMs do 4/9 of the direct method's multiply-adds (2.25× fewer).
//!
//! The reverse product of a stride-1 convolution is a correlation of the
//! output-side adjoint with the flipped kernel:
//! `G_in[r, ci, y, x] = Σ_co Σ_{a,b} W[co, ci, 2−a, 2−b] ·
//! G_out[r, co, y − q_y + a, x − q_x + b]` with `q = 2 − pad` (terms
//! outside the output zero). With the standard transforms (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016)
//!
//! ```text
//! Bᵀ = [1  0 −1  0]    G = [1    0    0 ]    Aᵀ = [1 1  1  0]
//!      [0  1  1  0]        [1/2  1/2  1/2]         [0 1 −1 −1]
//!      [0 −1  1  0]        [1/2 −1/2  1/2]
//!      [0  1  0 −1]        [0    0    1 ]
//! ```
//!
//! a 2×2 output block is `Aᵀ [Σ_co (G g Gᵀ) ⊙ (Bᵀ d B)] A`: the kernel
//! transform `U = G g Gᵀ` (per channel pair), the data transform
//! `V = Bᵀ d B` (per channel, block and adjoint row), then for each of the
//! 16 transformed positions one GEMM `M = V·U` summing over the output
//! channels, and the inverse transform. Every constant is a power of two
//! or ±1, so the transforms add and subtract only; the result differs from
//! the direct sum by rounding alone (tested against the explicit Toeplitz
//! matrix with a bound of the direct path's order).
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
/// with few channels the 16 small GEMMs and the transforms cost more than
/// they save (a network's first convolution, 3 input channels).
pub(crate) const WINOGRAD_MIN_CHANNELS: usize = 16;

/// Input positions below which the direct GEMM stays: the transformed
/// kernel (16 values per channel pair, formed once per operator) costs
/// more than a product over a tiny image saves. At 16 (4×4, a CIFAR
/// ResNet-18's last stage) a 10-row product already gains; one row of
/// ResNet-50 at 224² (its last stage 7×7) roughly breaks even in a
/// one-shot run, where the kernel is formed for a single product.
pub(crate) const WINOGRAD_MIN_POSITIONS: usize = 16;

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

/// `U = G g Gᵀ` of one 3×3 kernel `g` (row-major), already flipped; on
/// [`Lanes`], of several kernels at once (the same operations on each).
#[inline(always)]
fn kernel_transform<E: AddSub + Half>(g: [E; 9]) -> [E; 16] {
    // G g: 4×3
    let mut t = [E::default(); 12];
    for c in 0..3 {
        let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
        t[c] = g0;
        t[3 + c] = (g0 + g1 + g2).half();
        t[6 + c] = (g0 - g1 + g2).half();
        t[9 + c] = g2;
    }
    // (G g) Gᵀ: 4×4
    let mut u = [E::default(); 16];
    for r in 0..4 {
        let (a, b, c) = (t[3 * r], t[3 * r + 1], t[3 * r + 2]);
        u[4 * r] = a;
        u[4 * r + 1] = (a + b + c).half();
        u[4 * r + 2] = (a - b + c).half();
        u[4 * r + 3] = c;
    }
    u
}

/// Multiplication by ½ (exact in binary floating point).
trait Half {
    fn half(self) -> Self;
}

impl Half for f64 {
    #[inline(always)]
    fn half(self) -> Self {
        self * 0.5
    }
}

impl<T: Real> Half for Lanes<T> {
    #[inline(always)]
    fn half(mut self) -> Self {
        let h = T::of(0.5);
        for a in &mut self.0 {
            *a *= h;
        }
        self
    }
}

/// What the data and output transforms compute on: a scalar, or
/// [`Lanes`] of adjoint rows (the same operations on each).
trait AddSub: Copy + Default + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {}
impl<E: Copy + Default + std::ops::Add<Output = E> + std::ops::Sub<Output = E>> AddSub for E {}

/// [`LANES`] adjoint rows' values, added and subtracted lane by lane (a
/// fixed-size loop the compiler turns into vector instructions).
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

/// `Bᵀ d B` of one 4×4 block `d` (row-major).
#[inline(always)]
fn data_transform<E: AddSub>(d: [E; 16]) -> [E; 16] {
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
    let mut v = [E::default(); 16];
    for r in 0..4 {
        let (a, b, c, e) = (t[4 * r], t[4 * r + 1], t[4 * r + 2], t[4 * r + 3]);
        v[4 * r] = a - c;
        v[4 * r + 1] = b + c;
        v[4 * r + 2] = c - b;
        v[4 * r + 3] = b - e;
    }
    v
}

/// `Aᵀ m A` of one transformed 4×4 block: the 2×2 output block.
#[inline(always)]
fn output_transform<E: AddSub>(m: [E; 16]) -> [E; 4] {
    // Aᵀ m: 2×4
    let mut t = [E::default(); 8];
    for c in 0..4 {
        let (m0, m1, m2, m3) = (m[c], m[4 + c], m[8 + c], m[12 + c]);
        t[c] = m0 + m1 + m2;
        t[4 + c] = m1 - m2 - m3;
    }
    let mut y = [E::default(); 4];
    for r in 0..2 {
        let (a, b, c, e) = (t[4 * r], t[4 * r + 1], t[4 * r + 2], t[4 * r + 3]);
        y[2 * r] = a + b + c;
        y[2 * r + 1] = b - c - e;
    }
    y
}

/// Adjoint rows transformed together: a block's 16 vectors are read and
/// written this many rows at a time, as fixed-size arrays the compiler
/// keeps in vector registers.
const LANES: usize = 8;

/// Rows `r0 .. r0 + len` (`len ≤ LANES`) of each of a block's vectors, as
/// lanes (zeros past `len`).
#[inline(always)]
fn load_lanes<T: Real, const I: usize>(src: &[&[T]; I], r0: usize, len: usize) -> [Lanes<T>; I] {
    // (loops, not `array::from_fn`: everything here must inline into the
    // AVX2 copy)
    let mut d = [Lanes([T::ZERO; LANES]); I];
    for (d, s) in d.iter_mut().zip(src) {
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
fn data_lanes<T: Real>(src: &[&[T]; 16], dst: &mut [&mut [T]], at: usize, k: usize) {
    lane_pieces(
        k,
        #[inline(always)]
        |r0, len| {
            let e = data_transform(load_lanes(src, r0, len));
            for (d, e) in dst.iter_mut().zip(&e) {
                store_lanes(d, at + r0, len, e);
            }
        },
    );
}

/// `o[to[i] + r] = (Aᵀ m_r A)[i]` for every adjoint row `r < k` and every
/// output `i` with a place `to[i]`, where `m_r[ξ] = src[ξ][r]`.
#[inline(always)]
fn output_lanes<T: Real>(src: &[&[T]; 16], o: &mut [T], to: &[Option<usize>; 4], k: usize) {
    lane_pieces(
        k,
        #[inline(always)]
        |r0, len| {
            let e = output_transform(load_lanes(src, r0, len));
            for (t, e) in to.iter().zip(&e) {
                if let Some(at) = t {
                    store_lanes(o, at + r0, len, e);
                }
            }
        },
    );
}

/// What every band of one group reads.
struct Band<'a, T> {
    geom: &'a ConvGeometry,
    /// The kernel's 16 transformed matrices, each `cog × cig` column-major.
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
struct BandJob<'a, 'b, 'c, T> {
    ctx: &'a Band<'b, T>,
    t0: usize,
    t1: usize,
    dst: &'a mut [&'c mut [T]],
    scratch: &'a mut Vec<T>,
    par: Par,
}

impl<T: Real> pulp::WithSimd for BandJob<'_, '_, '_, T> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        band(self.ctx, self.t0, self.t1, self.dst, self.scratch, self.par)
    }
}

/// The band of block rows `t0..t1`: its output rows `2·t0 .. 2·t1` (within
/// `ih`) of every channel `ci` of the group, written into `dst[ci]` (those
/// rows of the result's plane, `[y][x][r]`), every entry. Its V and M live
/// in `scratch`, which the bands a thread runs reuse (grown, never
/// zeroed again: every entry a band reads it has written). A parallel
/// `par` runs its 16 GEMMs as tasks, each sequential: the same bits.
#[inline(always)]
fn band<T: Real>(
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
    let tw = iw.div_ceil(2);
    let k = zeros.len();
    let rows = gemm_rows(tw, t0, t1, k);
    let need = 16 * rows * (cog + cig);
    if scratch.len() < need {
        scratch.resize(need, T::ZERO);
    }
    let (v, m) = scratch[..need].split_at_mut(16 * rows * cog);
    // V_ξ: rows × cog column-major, row (block, r); each block's
    // 16 input vectors (over r, contiguous; zeros outside the
    // image) transformed lane by lane
    {
        let mut vx: Vec<&mut [T]> = v.chunks_exact_mut(rows * cog).collect();
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
                let y0 = 2 * ty as isize - qy;
                // where tap `i` of block `tx` starts in the plane (its `k`
                // rows follow); none outside the image, which reads zeros
                let tap_at = |tx: usize, i: usize| {
                    let (y, x) = (y0 + (i / 4) as isize, 2 * tx as isize - qx + (i % 4) as isize);
                    (y >= 0 && x >= 0 && (y as usize) < oh && (x as usize) < ow)
                        .then(|| (y as usize * ow + x as usize) * k)
                };
                let row0 = co * rows + (ty - t0) * tw * k;
                if k >= LANES {
                    // lanes over the adjoint rows of one block
                    for tx in 0..tw {
                        let mut src: [&[T]; 16] = [zeros; 16];
                        for (i, s) in src.iter_mut().enumerate() {
                            if let Some(at) = tap_at(tx, i) {
                                *s = &plane[at..at + k];
                            }
                        }
                        data_lanes(&src, &mut vx, row0 + tx * k, k);
                    }
                } else {
                    // few adjoint rows: lanes over (block, r), the GEMM
                    // rows of this block row, gathered
                    lane_pieces(
                        tw * k,
                        #[inline(always)]
                        |q0, len| {
                            let mut d = [Lanes([T::ZERO; LANES]); 16];
                            for l in 0..len {
                                let (tx, r) = ((q0 + l) / k, (q0 + l) % k);
                                for (i, d) in d.iter_mut().enumerate() {
                                    d.0[l] = tap_at(tx, i).map_or(T::ZERO, |at| plane[at + r]);
                                }
                            }
                            let e = data_transform(d);
                            for (dst, e) in vx.iter_mut().zip(&e) {
                                store_lanes(dst, row0 + q0, len, e);
                            }
                        },
                    );
                }
            }
        }
    }
    // M_ξ = V_ξ·U_ξ: rows × cig column-major (every entry written)
    let v = &*v;
    let gemm = |xi: usize, mx: &mut [T]| {
        let a = MatRef::from_column_major_slice(&v[xi * rows * cog..][..rows * cog], rows, cog);
        let b = MatRef::from_column_major_slice(&u[xi * cog * cig..][..cog * cig], cog, cig);
        let c = MatMut::from_column_major_slice_mut(mx, rows, cig);
        faer::linalg::matmul::matmul(c, Accum::Replace, a, b, T::ONE, Par::Seq);
    };
    if par.degree() > 1 {
        use rayon::prelude::*;
        m.par_chunks_exact_mut(rows * cig).enumerate().for_each(|(xi, mx)| gemm(xi, mx));
    } else {
        m.chunks_exact_mut(rows * cig).enumerate().for_each(|(xi, mx)| gemm(xi, mx));
    }
    let y_lo = 2 * t0;
    {
        let mut mx: [&[T]; 16] = [&[]; 16];
        for (d, c) in mx.iter_mut().zip(m.chunks_exact(rows * cig)) {
            *d = c;
        }
        for ci in 0..cig {
            for ty in t0..t1 {
                let row0 = ci * rows + (ty - t0) * tw * k;
                // where output `i` of block `tx`, row `r`, goes (nowhere
                // past the image's edge)
                let place = |tx: usize, r: usize, i: usize| {
                    let (oy, ox) = (2 * ty + i / 2, 2 * tx + i % 2);
                    (oy < ih && ox < iw).then(|| ((oy - y_lo) * iw + ox) * k + r)
                };
                if k >= LANES {
                    for tx in 0..tw {
                        let at = row0 + tx * k;
                        let mut src: [&[T]; 16] = mx;
                        for s in &mut src {
                            *s = &s[at..at + k];
                        }
                        let mut to = [None; 4];
                        for (i, t) in to.iter_mut().enumerate() {
                            *t = place(tx, 0, i);
                        }
                        output_lanes(&src, dst[ci], &to, k);
                    }
                } else {
                    let mut src: [&[T]; 16] = mx;
                    for s in &mut src {
                        *s = &s[row0..row0 + tw * k];
                    }
                    lane_pieces(
                        tw * k,
                        #[inline(always)]
                        |q0, len| {
                            let e = output_transform(load_lanes(&src, q0, len));
                            for l in 0..len {
                                let (tx, r) = ((q0 + l) / k, (q0 + l) % k);
                                for (i, e) in e.iter().enumerate() {
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
/// per group, the 16 matrices `U_ξ`, each `cog × cig` column-major, of the
/// flipped kernels `G g Gᵀ`, formed in `f64` and rounded once to `T`.
/// Input-independent: formed once per operator and precision. The kernels
/// of [`LANES`] output channels are transformed together, as lanes (the
/// scalar transform's operations, so its bits), and each `U_ξ` column
/// written [`LANES`] entries at a time.
pub(crate) fn kernel<T: Real>(geom: &ConvGeometry, weight: &[f64]) -> Vec<T> {
    pulp::Arch::new().dispatch(KernelJob { geom, weight, _t: std::marker::PhantomData })
}

/// [`kernel`] as pulp's job (compiled for AVX2 too, where the CPU has it).
struct KernelJob<'a, T> {
    geom: &'a ConvGeometry,
    weight: &'a [f64],
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> pulp::WithSimd for KernelJob<'_, T> {
    type Output = Vec<T>;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Vec<T> {
        let (geom, weight) = (self.geom, self.weight);
        let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
        let mut u = vec![T::ZERO; kernel_len(geom)];
        for (grp, ug) in u.chunks_exact_mut(16 * cog * cig).enumerate() {
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
                        for (xi, v) in kernel_transform(gf).iter().enumerate() {
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

/// Entries of the transformed kernel: per group, 16 matrices of the
/// output by the input channels.
pub(crate) fn kernel_len(geom: &ConvGeometry) -> usize {
    16 * (geom.c_out / geom.groups) * (geom.c_in / geom.groups) * geom.groups
}

/// The bands of block rows `(t0, t1)` a product with `k` adjoint rows
/// takes: at least [`BAND_MIN_ROWS`] GEMM rows each, at most
/// [`BAND_ENTRIES`] entries of V and M where that allows more than one
/// block row.
fn bands(geom: &ConvGeometry, k: usize) -> Vec<(usize, usize)> {
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let (th, tw) = (geom.ih.div_ceil(2), geom.iw.div_ceil(2));
    let per_row = (tw * k).max(1);
    let fit = BAND_ENTRIES / (16 * (cig + cog) * per_row).max(1);
    let band = fit.max(BAND_MIN_ROWS.div_ceil(per_row)).clamp(1, th.max(1));
    (0..th).step_by(band).map(|t0| (t0, (t0 + band).min(th))).collect()
}

/// Entries a product with `k` adjoint rows holds beyond its input and
/// result: each band's V and M (16 matrices of its GEMM rows by the output
/// and input channels), for as many bands as `threads` run at once.
pub(crate) fn scratch(geom: &ConvGeometry, k: usize, threads: usize) -> usize {
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let tw = geom.iw.div_ceil(2);
    let bands = bands(geom, k);
    let widest = bands.iter().map(|&(t0, t1)| gemm_rows(tw, t0, t1, k)).max().unwrap_or(0);
    16 * widest * (cig + cog) * threads.clamp(1, bands.len().max(1))
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
    let (cig, cog) = (geom.c_in / geom.groups, geom.c_out / geom.groups);
    let (ih, iw, oh, ow) = (geom.ih, geom.iw, geom.oh, geom.ow);
    assert_eq!(g.len(), geom.c_out * oh * ow * k, "conv backward: dimension mismatch");
    let mut out = vec![T::ZERO; geom.c_in * ih * iw * k];
    if k == 0 {
        return out;
    }
    let bands = bands(geom, k);
    // the bands' V and M, one buffer reused by the bands run in sequence
    let mut scratch = Vec::new();
    // the kernel's 16 transformed matrices, each cog × cig column-major
    let (qy, qx) = (2 - geom.pad.0 as isize, 2 - geom.pad.1 as isize);
    for grp in 0..geom.groups {
        let u = &u[grp * 16 * cog * cig..(grp + 1) * 16 * cog * cig];
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
                let rows = (2 * t1).min(ih) - 2 * t0;
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
                pulp::Arch::new().dispatch(BandJob { ctx: &ctx, t0, t1, dst, scratch, par })
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The Winograd product against the explicit Toeplitz matrix, in
        /// f64 and f32, within a bound of the direct path's order (the
        /// transforms add at most 4 terms of the same scale per stage);
        /// across threads with the sequential bits; and a row alone as in
        /// the whole block.
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
            let u = super::kernel::<f64>(&geom, op.weight());
            let got = super::backward(&geom, &u, &g, k, Par::Seq);
            prop_assert_eq!(&got, &super::backward(&geom, &u, &g, k, Par::rayon(2)));
            // the transforms' magnitudes: |U| ≤ |g|·(9/4)... a modest
            // multiple of the direct sum's rounding bound
            let bound = |j: usize, eps: f64| 64.0 * eps * (mag[j] + 1.0);
            for (j, (v, w)) in got.iter().zip(&want).enumerate() {
                prop_assert!((v - w).abs() <= bound(j, f64::EPSILON), "f64 at {}: {} vs {}", j, v, w);
            }
            let u32: Vec<f32> = super::kernel(&geom, op.weight());
            prop_assert!(u.iter().zip(&u32).all(|(&a, &b)| a as f32 == b));
            let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            let got32 = super::backward(&geom, &u32, &g32, k, Par::Seq);
            // the operator's own f32 kernel, prepared or formed on first use
            let prepared = crate::Operator::Conv(op.clone());
            prepared.prepare::<f32>();
            let crate::Operator::Conv(prepared) = prepared else { unreachable!() };
            prop_assert_eq!(&prepared.backward_gemm(&g32, k, Par::Seq), &got32);
            prop_assert_eq!(&op.clone().backward_gemm(&g32, k, Par::Seq), &got32);
            for (j, (&v, w)) in got32.iter().zip(&want).enumerate() {
                prop_assert!((f64::from(v) - w).abs() <= bound(j, f64::from(f32::EPSILON)), "f32 at {}: {} vs {}", j, v, w);
            }
            // ConvOp's reverse GEMM takes this path
            prop_assert_eq!(&op.backward_gemm(&g, k, Par::Seq), &got);
            // the first row alone: its bits in the whole block
            let g1: Vec<f64> = (0..m).map(|i| g[i * k]).collect();
            let one = super::backward(&geom, &u, &g1, 1, Par::Seq);
            for j in 0..n {
                prop_assert_eq!(one[j].to_bits(), got[j * k].to_bits(), "row 0 alone at {}", j);
            }
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
    /// scalar transform, in f64 and rounded once to f32.
    #[test]
    fn the_transformed_kernel_is_each_kernels_scalar_transform() {
        for (c_in, c_out, groups) in [(16, 16, 1), (17, 19, 1), (40, 42, 2)] {
            let op = ConvOp::seeded(ConvGeometry::same_3x3(c_in, c_out, groups, 6), 7).unwrap();
            let (geom, w) = (op.geometry(), op.weight());
            let (u64_, u32_) = (super::kernel::<f64>(geom, w), super::kernel::<f32>(geom, w));
            let (cig, cog) = (c_in / groups, c_out / groups);
            for grp in 0..groups {
                for co in 0..cog {
                    for ci in 0..cig {
                        let k = &w[((grp * cog + co) * cig + ci) * 9..][..9];
                        let mut gf = [0.0f64; 9];
                        for (i, g) in gf.iter_mut().enumerate() {
                            *g = k[8 - i];
                        }
                        for (xi, v) in super::kernel_transform(gf).into_iter().enumerate() {
                            let at = grp * 16 * cog * cig + xi * cog * cig + ci * cog + co;
                            assert_eq!(u64_[at].to_bits(), v.to_bits());
                            assert_eq!(u32_[at].to_bits(), (v as f32).to_bits());
                        }
                    }
                }
            }
        }
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
            let band = super::bands(on.geometry(), k)[0];
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
            let b = super::bands(&ConvGeometry::same_3x3(16, 16, 1, hw), k);
            assert_eq!(b.first().map(|x| x.0), Some(0));
            assert_eq!(b.last().map(|x| x.1), Some(hw.div_ceil(2)));
            assert!(b.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
        }
    }
}
