//! The structured convolution operator: a convolution's Toeplitz matrix
//! applied through im2col + GEMM (forward) and GEMM + col2im (reverse),
//! never materialized except by [`ConvOp::to_csr`].

use std::sync::{Arc, OnceLock};

use faer::{Accum, MatMut, MatRef, Par};
use sprs::CsMat;

use crate::real::fma_lanes;
use crate::{Block, Real, ShapeError, Stage};

/// Entries of the per-tile im2col / col2im buffer: a tile of output
/// positions is formed, multiplied and scattered while it is in cache
/// (2^16 entries: 256 KB in `f32`, 512 KB in `f64`, within a core's L2).
const TILE: usize = 1 << 16;

/// A reverse tile spans at least this many GEMM rows (positions × adjoint
/// rows), even past [`TILE`]: below it the GEMM's packing and call
/// overhead outweigh the cache gain (measured with 10 adjoint rows on 512
/// channels at 4×4: 1-position tiles ran at 11 G/s, 26-position ones at 22).
const MIN_TILE_ROWS: usize = 256;

/// [`ConvOp::forward_direct`] is chosen for at most this many output
/// channels a group (measured: see [`ConvOp::prefers_direct`]).
pub const DIRECT_MAX_CHANNELS: usize = 16;

/// Output channels per register tile of [`ConvOp::forward_direct`]: with
/// two AVX registers of positions each, 12 registers of sums.
const DIRECT_CHANNELS: usize = 6;

/// One group of [`ConvOp::forward_direct`]: its zero-padded input planes,
/// `cig` planes of rows `iwp` wide, and where each tap reads in them.
struct Sliding<'a, T> {
    xp: &'a [T],
    iwp: usize,
    /// Tap `t`'s offset in the planes from an output's first tap.
    offs: &'a [usize],
    /// The group's weights transposed, `kk × cp` row-major (`cp ≥ cog`,
    /// the channels past `cog` zero).
    w: &'a [T],
    cog: usize,
    cp: usize,
    oh: usize,
    ow: usize,
    /// The vertical stride.
    sh: usize,
}

impl<T: Real> Sliding<'_, T> {
    /// The group's outputs into `og` (`cog` channels of `oh·ow`), `P`
    /// positions of a row × [`DIRECT_CHANNELS`] channels at a time.
    #[inline(always)]
    fn run<const P: usize>(&self, og: &mut [T]) {
        let p_len = self.oh * self.ow;
        for oy in 0..self.oh {
            let base = oy * self.sh * self.iwp;
            for ox in (0..self.ow).step_by(P) {
                let n = P.min(self.ow - ox);
                for oc in (0..self.cog).step_by(DIRECT_CHANNELS) {
                    let sums = self.tile::<P>(base + ox, oc);
                    let o = DIRECT_CHANNELS.min(self.cog - oc);
                    for (i, a) in sums.iter().take(o).enumerate() {
                        let at = (oc + i) * p_len + oy * self.ow + ox;
                        og[at..at + n].copy_from_slice(&a[..n]);
                    }
                }
            }
        }
    }

    /// The sums of channels `oc ..` at the `P` positions whose first tap
    /// reads the planes at `at`: six named rows, so that each stays in its
    /// registers over every tap, each from zero in tap order.
    #[inline(always)]
    fn tile<const P: usize>(&self, at: usize, oc: usize) -> [[T; P]; DIRECT_CHANNELS] {
        let z = [T::ZERO; P];
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (z, z, z, z, z, z);
        for (tap, &off) in self.offs.iter().enumerate() {
            let x: &[T; P] = self.xp[at + off..at + off + P].try_into().expect("P values");
            let w: &[T; DIRECT_CHANNELS] = self.w
                [tap * self.cp + oc..tap * self.cp + oc + DIRECT_CHANNELS]
                .try_into()
                .expect("a channel tile");
            fma_lanes(&mut a0, w[0], x);
            fma_lanes(&mut a1, w[1], x);
            fma_lanes(&mut a2, w[2], x);
            fma_lanes(&mut a3, w[3], x);
            fma_lanes(&mut a4, w[4], x);
            fma_lanes(&mut a5, w[5], x);
        }
        [a0, a1, a2, a3, a4, a5]
    }
}

/// Splits a slice of the tap table into maximal runs, calling `f(p, run,
/// len)` for each: `len` positions from `p` in the padding (`run` is
/// `None`) or reading consecutive input indices from `Some(idx)`. A
/// stride-1 convolution's rows are single runs, so im2col copies and col2im
/// adds contiguous slices.
#[inline(always)]
fn for_runs(tt: &[usize], mut f: impl FnMut(usize, Option<usize>, usize)) {
    let mut p = 0;
    while p < tt.len() {
        let start = tt[p];
        let mut len = 1;
        if start == usize::MAX {
            while p + len < tt.len() && tt[p + len] == usize::MAX {
                len += 1;
            }
            f(p, None, len);
        } else {
            while p + len < tt.len() && tt[p + len] == start + len {
                len += 1;
            }
            f(p, Some(start), len);
        }
        p += len;
    }
}

/// The maximal runs of a tap table ([`for_runs`]), per tap: `(first
/// position, first input index or `None` in the padding, length)`, in
/// position order. A stride-1 convolution has a few per output row where
/// its tap table has one entry per position, so im2col and col2im step
/// from run to run instead of testing every position.
#[derive(Debug)]
struct Runs {
    /// Tap `t`'s runs are `runs[start[t]..start[t + 1]]`.
    start: Vec<usize>,
    runs: Vec<(usize, Option<usize>, usize)>,
}

impl Runs {
    /// The runs of `taps` (`ntaps` rows of `p_len` positions); `None` when
    /// they would be more than a quarter of its entries (strided
    /// convolutions, whose runs are mostly single positions).
    fn of(taps: &[usize], p_len: usize) -> Option<Self> {
        let mut start = vec![0];
        let mut runs = vec![];
        for tt in taps.chunks_exact(p_len.max(1)) {
            for_runs(tt, |p, run, len| runs.push((p, run, len)));
            if runs.len() * 4 > taps.len() {
                return None;
            }
            start.push(runs.len());
        }
        Some(Self { start, runs })
    }

    /// [`for_runs`] over positions `p0..p0 + pn` of tap `tap`'s row: the
    /// same calls (positions relative to `p0`), found by a binary search
    /// and clipped to the range.
    #[inline(always)]
    fn for_each(
        &self,
        tap: usize,
        p0: usize,
        pn: usize,
        mut f: impl FnMut(usize, Option<usize>, usize),
    ) {
        if pn == 0 {
            // (an empty range has no runs, as `for_runs` of an empty slice)
            return;
        }
        let rs = &self.runs[self.start[tap]..self.start[tap + 1]];
        let end = p0 + pn;
        let first = rs.partition_point(|&(p, _, len)| p + len <= p0);
        for &(p, src, len) in &rs[first..] {
            if p >= end {
                break;
            }
            let (a, b) = (p.max(p0), (p + len).min(end));
            f(a - p0, src.map(|s| s + (a - p)), b - a);
        }
    }
}

/// The kernel taps of one output coordinate `o` that land inside an input
/// of `len` along one axis (stride `s`, dilation `d`, leading pad `pad`,
/// `k` taps): `(first, end, first's input coordinate)`; `first >= end`
/// when none does. The taps between are consecutive and in range: the same
/// ones a tap table marks inside.
#[inline(always)]
fn tap_span(
    o: usize,
    s: usize,
    d: usize,
    pad: usize,
    len: usize,
    k: usize,
) -> (usize, usize, usize) {
    let at = o * s;
    // the first tap with at + t·d >= pad, and the first past the input's end
    let first = pad.saturating_sub(at).div_ceil(d).min(k);
    let end = (len + pad).saturating_sub(at).div_ceil(d).min(k);
    (first, end.max(first), (at + first * d).saturating_sub(pad))
}

/// The most output channels of one position a sparse scatter updates a
/// tap's tile for at once (their tiles held in registers).
const SCATTER_CHANNELS: usize = 4;

/// The nonzero columns of a convolution's adjoint by group and output
/// position: bucket `key = group·positions + position` holds
/// `cols[start[key]..start[key + 1]]` (column, where its values are),
/// channels ascending.
struct Buckets<'a> {
    start: &'a [usize],
    cols: &'a [(usize, usize)],
}

/// A sparse scatter's passes over the adjoint rows, `RL` at a time:
/// `pass(r0, rb, acc)` adds rows `r0..r0 + rb` into `acc`, the output's
/// columns as whole register tiles (zeroed, from a cache line, so a 64-byte
/// tile never straddles two). The output block, `k × ncols`.
#[inline(always)]
fn scatter_passes<T: Real, const RL: usize>(
    k: usize,
    ncols: usize,
    mut pass: impl FnMut(usize, usize, &mut [[T; RL]]),
) -> Block<T> {
    let mut buf = vec![T::ZERO; (ncols + 64 / size_of::<T>()) * RL];
    let lead = buf.as_ptr().align_offset(64).min(buf.len());
    let (acc, _) = buf[lead..].as_chunks_mut::<RL>();
    let acc = &mut acc[..ncols];
    if k <= RL {
        pass(0, k, acc);
        // one pass: whole tiles in column order, each overwriting the
        // lanes past `k` the one before wrote (fixed-length copies, where a
        // copy of `k` values is a call per column)
        let mut data = vec![T::ZERO; ncols * k + RL];
        for (j, a) in acc.iter().enumerate() {
            let d: &mut [T; RL] = (&mut data[j * k..j * k + RL]).try_into().expect("a whole tile");
            *d = *a;
        }
        data.truncate(ncols * k);
        return Block::from_col_major(k, ncols, data);
    }
    let mut out = Block::zeros(k, ncols);
    for r0 in (0..k).step_by(RL) {
        let rb = RL.min(k - r0);
        if r0 > 0 {
            acc.fill([T::ZERO; RL]);
        }
        pass(r0, rb, acc);
        for (j, a) in acc.iter().enumerate() {
            out.col_as_slice_mut(j)[r0..r0 + rb].copy_from_slice(&a[..rb]);
        }
    }
    out
}

/// One output position's taps inside the input: kernel rows `ky0..ky1`
/// from input row `y0`, kernel columns `kx0..kx1` from input column `x0`.
struct Span {
    ky0: usize,
    ky1: usize,
    y0: usize,
    kx0: usize,
    kx1: usize,
    x0: usize,
}

impl Span {
    /// Every tap of one input channel's plane `dst`, for `C` output
    /// channels: channel `c`'s kernel `w[c]` times its adjoint tile
    /// `gv[c]`, added to a tap's tile channel after channel.
    #[inline(always)]
    fn taps<T: Real, const RL: usize, const C: usize>(
        &self,
        geo: &ConvGeometry,
        dst: &mut [[T; RL]],
        w: [&[T]; C],
        gv: [[T; RL]; C],
    ) {
        match (geo.dilation.1, self.kx1 - self.kx0) {
            (1, 3) => return self.taps_row::<T, RL, C, 3>(geo, dst, w, gv),
            (1, 5) => return self.taps_row::<T, RL, C, 5>(geo, dst, w, gv),
            _ => {}
        }
        for ky in self.ky0..self.ky1 {
            let iy = self.y0 + (ky - self.ky0) * geo.dilation.0;
            let first = iy * geo.iw + self.x0;
            let row = ky * geo.kw;
            for (t, kx) in (self.kx0..self.kx1).enumerate() {
                let o = &mut dst[first + t * geo.dilation.1];
                let mut a = *o;
                for c in 0..C {
                    fma_lanes(&mut a, w[c][row + kx], &gv[c]);
                }
                *o = a;
            }
        }
    }

    /// [`Span::taps`] where a kernel row's taps inside the input are `KW`
    /// adjacent tiles (a horizontal dilation of 1): each kernel row's tiles
    /// and weights as arrays, so the taps unroll without a bounds check or
    /// an index computed per tap. The same operations in the same order.
    #[inline(always)]
    fn taps_row<T: Real, const RL: usize, const C: usize, const KW: usize>(
        &self,
        geo: &ConvGeometry,
        dst: &mut [[T; RL]],
        w: [&[T]; C],
        gv: [[T; RL]; C],
    ) {
        for ky in self.ky0..self.ky1 {
            let iy = self.y0 + (ky - self.ky0) * geo.dilation.0;
            let first = iy * geo.iw + self.x0;
            let row = ky * geo.kw + self.kx0;
            let d: &mut [[T; RL]; KW] =
                (&mut dst[first..first + KW]).try_into().expect("a kernel row of tiles");
            let mut ws = [[T::ZERO; KW]; C];
            for (ws, w) in ws.iter_mut().zip(w) {
                *ws = w[row..row + KW].try_into().expect("a kernel row of weights");
            }
            for (t, o) in d.iter_mut().enumerate() {
                let mut a = *o;
                for c in 0..C {
                    fma_lanes(&mut a, ws[c][t], &gv[c]);
                }
                *o = a;
            }
        }
    }
}

/// Additions per parallel col2im task: below this a task costs more to
/// hand to a thread than to run (a few microseconds).
const PAR_MIN_ADDS: usize = 1 << 14;

/// The most adjoint rows per register tile of [`ConvOp::backward_active`]:
/// two AVX registers, 16 in `f32` and 8 in `f64` (fewer rows take a
/// narrower tile).
fn active_rows<T>() -> usize {
    if size_of::<T>() == 4 { 16 } else { 8 }
}

/// The register tile of [`ConvOp::backward_sparse`] for `k` adjoint rows:
/// 0 for none, 1 for one, else the fewest of 4, 8 or 16 lanes that hold
/// them (16, two AVX registers of `f32`, at most; more rows take several
/// passes).
fn sparse_lanes(k: usize) -> usize {
    match k {
        0 | 1 => k,
        2..=4 => 4,
        5..=8 => 8,
        _ => 16,
    }
}

/// Taps per register tile of [`ConvOp::backward_active`]: with two AVX
/// registers of adjoint rows per tap, 12 accumulators.
pub const ACTIVE_TAPS: usize = 6;

/// The reverse product through a convolution runs
/// [`ConvOp::backward_active`] when fewer than this fraction (numerator,
/// denominator) of `G`'s columns are nonzero. `benches/row_skip.rs`, 10
/// rows, one thread, against the im2col GEMM (f32 / f64): ONet's second
/// convolution (32→64, 3×3, 21²) at 20 %: 1.6 / 4.9 ms against 2.9 /
/// 6.1; at 33 %: 1.8 / 5.2 against 3.3 / 7.0; a 64-channel 3×3 at 32²:
/// even at 33 % (12.6 / 21.9 against 12.9 / 32.1), slower at 50 % (19.3 /
/// 39.1 against 15.8 / 29.9).
pub const CONV_ACTIVE_BELOW: (usize, usize) = (1, 3);

/// The fewest im2col rows per group (`c_in/groups · kh · kw`) for which
/// [`ConvOp::backward_active`] is chosen: below, the per-position work
/// (lists, register tiles, col2im) outweighs the skipped products. ONet's
/// first convolution (3→32, 27 rows) lost at 20 % (1.2 ms against 1.0,
/// f32).
pub const ACTIVE_MIN_TAPS: usize = 64;

/// The fewest nonzero adjoint columns per output position and group (the
/// output channels a position's register tiles sum, on average) for which
/// [`ConvOp::backward_active`] is chosen: each position's tiles are
/// stored and scattered whatever that count, so with few channels to sum
/// the sparse scatter or the GEMM costs less. `benches/row_skip.rs`, 10
/// rows, f32, one thread, active / GEMM / scatter: LeNet-5's second
/// convolution (6→16, 5×5, 10²) at 10 % (1.6 channels) 128 / 98 / 87 µs,
/// at 20 % (3.2) 149 / 107 / 117 µs; ONet's second (32→64, 3×3, 21²) at
/// 10 % (6.4) 1.44 / 2.00 / 2.48 ms, and its third (64→64, 3×3, 8²) at
/// 10 % 0.37 / 0.54 / 0.99 ms. LeNet-5's reverse sees 14 % there (2.3
/// channels; ONet's second and third 16 % and 25 %, 10 and 16).
pub const ACTIVE_MIN_CHANNELS: usize = 4;

/// How [`ConvOp::backward_tiled`] forms a tile's im2col block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fill {
    /// A GEMM over every output channel.
    Gemm,
    /// Register tiles over the channels active at each position.
    Active,
}

/// Per position `p` of a group's adjoint columns (`cog` channels of `p_len`
/// positions; `nonzero[oc·p_len + p]`), the channels whose column is
/// nonzero: `lists[start[p]..start[p + 1]]`, in order. `lists` grows to
/// the group's nonzero count where it is shorter (one entry per nonzero
/// column, not per column: after a max-pool and a ReLU a sixth of them).
fn active_lists(nonzero: &[bool], p_len: usize, start: &mut [usize], lists: &mut Vec<usize>) {
    start.fill(0);
    for flags in nonzero.chunks_exact(p_len) {
        for (s, &f) in start[1..].iter_mut().zip(flags) {
            *s += usize::from(f);
        }
    }
    for p in 0..p_len {
        start[p + 1] += start[p];
    }
    if lists.len() < start[p_len] {
        lists.resize(start[p_len], 0);
    }
    let mut fill = start[..p_len].to_vec();
    for (oc, flags) in nonzero.chunks_exact(p_len).enumerate() {
        for (p, _) in flags.iter().enumerate().filter(|(_, f)| **f) {
            lists[fill[p]] = oc;
            fill[p] += 1;
        }
    }
}

/// [`ConvOp::backward_active`]'s im2col block for positions `p0..p0+pn`
/// of one group: column `t` (`ld` apart, rows `(p − p0)·k + r`) is
/// `Σ_{oc active at p} W[oc, t] · G[r, (oc, p)]`, channels in order from
/// zero. Register tiles are `RL` rows × [`ACTIVE_TAPS`] taps: each active
/// channel's adjoint rows are one vector (`gbuf`, zero-padded), each weight
/// a broadcast, and each tap's sums one contiguous store. A tile writes
/// whole vectors: the rows past `k` land on the next position's rows,
/// written after, or on the column's padding; taps past `kk` on padding
/// columns.
/// The buffers of [`active_fill`]: the im2col tile and its column stride,
/// the adjoint-row vectors, the group's adjoint, its padded weight rows,
/// their padded length, and the im2col rows.
type FillBuffers<'a, T> = (&'a mut [T], usize, &'a mut [T], &'a [T], &'a [T], usize, usize);
/// Where [`active_fill`] works: the active lists and their starts, the
/// tile's first position and count, the adjoint rows, and the positions'
/// stride per channel (`p_len·k`).
type FillAt<'a> = (&'a [usize], &'a [usize], usize, usize, usize, usize);

#[inline(always)]
fn active_fill<T: Real, const RL: usize>(
    (cols, ld, gbuf, g, wp, kp, kk): FillBuffers<'_, T>,
    (lists, start, p0, pn, k, width): FillAt<'_>,
) {
    for pp in 0..pn {
        let p = p0 + pp;
        let on = &lists[start[p]..start[p + 1]];
        let mut r0 = 0;
        while r0 < k {
            let rb = RL.min(k - r0);
            for (i, &oc) in on.iter().enumerate() {
                let dst = &mut gbuf[i * RL..(i + 1) * RL];
                let c = oc * width + p * k + r0;
                dst[..rb].copy_from_slice(&g[c..c + rb]);
                dst[rb..].fill(T::ZERO);
            }
            let row = pp * k + r0;
            let mut t0 = 0;
            while t0 < kk {
                let mut acc = [[T::ZERO; RL]; ACTIVE_TAPS];
                for (i, &oc) in on.iter().enumerate() {
                    let gv: &[T; RL] = gbuf[i * RL..(i + 1) * RL].try_into().expect("RL rows");
                    let w: &[T; ACTIVE_TAPS] = wp[oc * kp + t0..oc * kp + t0 + ACTIVE_TAPS]
                        .try_into()
                        .expect("a tap tile");
                    for (a, &wt) in acc.iter_mut().zip(w) {
                        fma_lanes(a, wt, gv);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    let o = (t0 + t) * ld + row;
                    cols[o..o + RL].copy_from_slice(a);
                }
                t0 += ACTIVE_TAPS;
            }
            r0 += rb;
        }
    }
}

/// [`active_fill`] for one adjoint row (`k = 1`; `acc` holds `kk`
/// entries in place of the adjoint-row vectors): a position's im2col row
/// is `Σ_{oc active at p} G[oc, p] · W[oc, :]`, summed in one accumulator
/// over all `kk` taps, each active channel's weight row one contiguous run
/// of multiply-adds (vectors across the taps, where the register tiles of
/// one row would be one lane wide). Each tap's sum is the same fused
/// multiply-adds in the same channel order from zero as in
/// [`active_fill`], so the same bits.
#[inline(always)]
fn active_fill_one<T: Real>(
    (cols, ld, acc, g, wp, kp, kk): FillBuffers<'_, T>,
    (lists, start, p0, pn, k, width): FillAt<'_>,
) {
    debug_assert_eq!(k, 1, "one adjoint row");
    let acc = &mut acc[..kk];
    for pp in 0..pn {
        let p = p0 + pp;
        acc.fill(T::ZERO);
        for &oc in &lists[start[p]..start[p + 1]] {
            let gv = g[oc * width + p];
            for (a, &w) in acc.iter_mut().zip(&wp[oc * kp..oc * kp + kk]) {
                *a = w.fma(gv, *a);
            }
        }
        for (t, &a) in acc.iter().enumerate() {
            cols[t * ld + pp] = a;
        }
    }
}

/// A convolution's sizes as the GEMM kernels use them.
struct Sizes {
    /// Output positions per channel.
    p_len: usize,
    /// Input channels per group.
    cig: usize,
    /// Output channels per group.
    cog: usize,
    /// Kernel taps.
    ntaps: usize,
    /// im2col rows per group (`cig · ntaps`).
    kk: usize,
    /// Input positions per channel.
    plane: usize,
    /// 1×1, stride 1, unpadded: im2col and col2im are the identity.
    pointwise: bool,
    /// The tap table (empty when pointwise).
    taps: Arc<Vec<usize>>,
}

/// A 2-D convolution's shape (1-D as height 1): `c_in × ih × iw` in,
/// `c_out × oh × ow` out, `groups` groups, a `kh × kw` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Groups (both channel counts are multiples of it).
    pub groups: usize,
    /// Input height.
    pub ih: usize,
    /// Input width.
    pub iw: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides (vertical, horizontal).
    pub stride: (usize, usize),
    /// Dilations (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Leading pads (top, left); trailing pads follow from `oh`, `ow`.
    pub pad: (usize, usize),
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

#[cfg(test)]
impl ConvOp {
    /// The operator of `geom` with weights in [−1, 1) drawn from `seed`;
    /// `None` where `ConvOp::new` refuses the shape.
    pub(crate) fn seeded(geom: ConvGeometry, seed: u64) -> Option<Self> {
        let n = geom.c_out * (geom.c_in / geom.groups.max(1)) * geom.kh * geom.kw;
        let weight = (0..n)
            .map(|i| ((i as u64 ^ seed).wrapping_mul(2654435761) % 2000) as f64 / 1000.0 - 1.0)
            .collect();
        ConvOp::new(geom, Arc::new(weight)).ok()
    }
}

#[cfg(test)]
impl ConvGeometry {
    /// A 3×3, stride-1, undilated convolution padded by 1 on every side
    /// over `hw × hw` positions (the output the input's size).
    pub(crate) fn same_3x3(c_in: usize, c_out: usize, groups: usize, hw: usize) -> Self {
        ConvGeometry {
            c_in,
            c_out,
            groups,
            ih: hw,
            iw: hw,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            dilation: (1, 1),
            pad: (1, 1),
            oh: hw,
            ow: hw,
        }
    }
}

/// A convolution's Toeplitz matrix, kept structured: rows are output
/// positions `(oc, oy, ox)`, columns input positions `(ic, iy, ix)`, both
/// row-major; entries are kernel weights. Applied without materializing it;
/// [`ConvOp::to_csr`] gives the explicit matrix. Built by [`ConvOp::new`],
/// which checks that the shape and the weights agree.
#[derive(Clone, Debug)]
pub struct ConvOp {
    geom: ConvGeometry,
    /// `c_out × (c_in/groups) × kh × kw`, row-major.
    weight: Arc<Vec<f64>>,
    /// The weights rounded to `f32`, on the first `f32` product.
    weight32: OnceLock<Vec<f32>>,
    /// The tap table, on first use (see `tap_table`).
    taps: OnceLock<Arc<Vec<usize>>>,
    /// The tap table's runs, on first use (see `run_table`).
    runs: OnceLock<Option<Arc<Runs>>>,
    /// The Winograd-transformed kernel, on the first reverse product that
    /// takes that path (see `winograd`), in each precision used.
    wino: OnceLock<Vec<f64>>,
    wino32: OnceLock<Vec<f32>>,
}

impl PartialEq for ConvOp {
    fn eq(&self, other: &Self) -> bool {
        self.geom == other.geom && self.weight == other.weight
    }
}

impl ConvOp {
    /// The operator of `geom` with `weight` (`c_out × (c_in/groups) × kh ×
    /// kw`, row-major).
    ///
    /// # Errors
    /// If a count, kernel extent, stride or dilation is zero, the groups do
    /// not divide both channel counts, the weight length is not the kernel's,
    /// or an extent overflows.
    pub fn new(geom: ConvGeometry, weight: Arc<Vec<f64>>) -> Result<Self, ShapeError> {
        let g = &geom;
        let err = |m: String| Err(ShapeError(format!("convolution {g:?}: {m}")));
        if [
            g.c_in,
            g.c_out,
            g.groups,
            g.kh,
            g.kw,
            g.stride.0,
            g.stride.1,
            g.dilation.0,
            g.dilation.1,
        ]
        .contains(&0)
        {
            return err("a count, kernel extent, stride or dilation is zero".into());
        }
        if !g.c_in.is_multiple_of(g.groups) || !g.c_out.is_multiple_of(g.groups) {
            return err("the groups do not divide the channels".into());
        }
        let kernel =
            crate::structured::product(&[g.c_out, g.c_in / g.groups, g.kh, g.kw], "kernel")?;
        if weight.len() != kernel {
            return err(format!("{} weights for a kernel of {kernel}", weight.len()));
        }
        crate::structured::product(&[g.c_out, g.oh, g.ow], "output")?;
        crate::structured::product(&[g.c_in, g.ih, g.iw], "input")?;
        crate::structured::product(&[g.kh, g.kw, g.oh, g.ow], "tap table")?;
        let reach = |o: usize, s: usize, k: usize, d: usize| {
            o.saturating_sub(1)
                .checked_mul(s)
                .zip((k - 1).checked_mul(d))
                .and_then(|(a, b)| a.checked_add(b))
        };
        if reach(g.oh, g.stride.0, g.kh, g.dilation.0).is_none()
            || reach(g.ow, g.stride.1, g.kw, g.dilation.1).is_none()
        {
            return err("the window's reach overflows".into());
        }
        Ok(Self {
            geom,
            weight,
            weight32: OnceLock::new(),
            taps: OnceLock::new(),
            runs: OnceLock::new(),
            wino: OnceLock::new(),
            wino32: OnceLock::new(),
        })
    }

    /// The shape.
    pub fn geometry(&self) -> &ConvGeometry {
        &self.geom
    }

    /// The weights, `c_out × (c_in/groups) × kh × kw`, row-major.
    pub fn weight(&self) -> &[f64] {
        &self.weight
    }

    /// The weights in `T` (`f32`: rounded once, on first use).
    pub(crate) fn weight_as<T: Real>(&self) -> &[T] {
        T::cached(&self.weight, &self.weight32)
    }

    /// Forms what the products of `stage` read in `T`, once: the weights
    /// (rounded once for `f32`) for both; for [`Stage::Reverse`] also the
    /// transformed kernel of a convolution the Winograd path takes.
    pub(crate) fn prepare<T: Real>(&self, stage: Stage) {
        self.weight_as::<T>();
        if stage == Stage::Reverse && crate::winograd::eligible(&self.geom) {
            self.winograd_kernel::<T>();
        }
    }

    /// Whether its reverse products take the Winograd path (a 3×3,
    /// stride-1 kernel with enough channels and positions).
    pub fn winograd(&self) -> bool {
        crate::winograd::eligible(&self.geom)
    }

    /// Entries a reverse product with `k` adjoint rows holds beyond its
    /// input and result (the Winograd bands' V and M; none on the direct
    /// path's tiles, which are bounded by a constant).
    pub fn reverse_scratch(&self, k: usize) -> usize {
        if self.winograd() {
            crate::winograd::scratch(&self.geom, k, rayon::current_num_threads())
        } else {
            0
        }
    }

    /// Bytes its products form and keep: the f32 weights, and on the
    /// Winograd path the transformed kernel in f64 and in f32.
    pub fn formed_bytes(&self) -> usize {
        let f32_weights = self.weight.len() * std::mem::size_of::<f32>();
        let kernel = if self.winograd() { crate::winograd::kernel_len(&self.geom) } else { 0 };
        f32_weights + kernel * (std::mem::size_of::<f64>() + std::mem::size_of::<f32>())
    }

    /// The Winograd-transformed kernel in `T` (see `winograd::kernel`).
    fn winograd_kernel<T: Real>(&self) -> &[T] {
        T::formed(&self.wino, &self.wino32, || {
            crate::winograd::kernel::<T>(&self.geom, &self.weight)
        })
    }

    /// Rows (`c_out·oh·ow`).
    pub fn nrows(&self) -> usize {
        self.geom.c_out * self.geom.oh * self.geom.ow
    }
    /// Columns (`c_in·ih·iw`).
    pub fn ncols(&self) -> usize {
        self.geom.c_in * self.geom.ih * self.geom.iw
    }

    /// What the GEMM kernels derive from the shape.
    fn sizes(&self) -> Sizes {
        let g = &self.geom;
        let (cig, ntaps) = (g.c_in / g.groups, g.kh * g.kw);
        // a 1×1, stride-1, unpadded convolution: output position p reads
        // input position p, so im2col and col2im are the identity
        let pointwise =
            (g.kh, g.kw, g.stride, g.pad, g.oh, g.ow) == (1, 1, (1, 1), (0, 0), g.ih, g.iw);
        Sizes {
            p_len: g.oh * g.ow,
            cig,
            cog: g.c_out / g.groups,
            ntaps,
            kk: cig * ntaps,
            plane: g.ih * g.iw,
            pointwise,
            taps: if pointwise { Arc::new(Vec::new()) } else { self.tap_table() },
        }
    }

    /// Calls `f(row, col, weight)` for every structural nonzero, row by row.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(usize, usize, f64)) {
        let cig = self.geom.c_in / self.geom.groups;
        let cog = self.geom.c_out / self.geom.groups;
        let (sh, sw) = self.geom.stride;
        let (dh, dw) = self.geom.dilation;
        let (pt, pl) = self.geom.pad;
        for oc in 0..self.geom.c_out {
            let g = oc / cog;
            for oy in 0..self.geom.oh {
                for ox in 0..self.geom.ow {
                    let row = (oc * self.geom.oh + oy) * self.geom.ow + ox;
                    for icg in 0..cig {
                        let ic = g * cig + icg;
                        for ky in 0..self.geom.kh {
                            let Some(iy) =
                                (oy * sh + ky * dh).checked_sub(pt).filter(|&y| y < self.geom.ih)
                            else {
                                continue;
                            };
                            for kx in 0..self.geom.kw {
                                let Some(ix) = (ox * sw + kx * dw)
                                    .checked_sub(pl)
                                    .filter(|&x| x < self.geom.iw)
                                else {
                                    continue;
                                };
                                let w = self.weight
                                    [((oc * cig + icg) * self.geom.kh + ky) * self.geom.kw + kx];
                                f(row, (ic * self.geom.ih + iy) * self.geom.iw + ix, w);
                            }
                        }
                    }
                }
            }
        }
    }

    /// For each kernel tap `(ky, kx)` and output position `p = oy·ow + ox`,
    /// the input spatial index `iy·iw + ix`, or `usize::MAX` in the padding.
    fn tap_table(&self) -> Arc<Vec<usize>> {
        Arc::clone(self.taps.get_or_init(|| Arc::new(self.build_tap_table())))
    }

    /// The tap table's runs ([`Runs`]), where they are few.
    fn run_table(&self) -> Option<Arc<Runs>> {
        self.runs
            .get_or_init(|| {
                let p_len = self.geom.oh * self.geom.ow;
                Runs::of(&self.tap_table(), p_len).map(Arc::new)
            })
            .clone()
    }

    fn build_tap_table(&self) -> Vec<usize> {
        let p_len = self.geom.oh * self.geom.ow;
        let mut t = vec![usize::MAX; self.geom.kh * self.geom.kw * p_len];
        for ky in 0..self.geom.kh {
            for kx in 0..self.geom.kw {
                for oy in 0..self.geom.oh {
                    let Some(iy) = (oy * self.geom.stride.0 + ky * self.geom.dilation.0)
                        .checked_sub(self.geom.pad.0)
                        .filter(|&y| y < self.geom.ih)
                    else {
                        continue;
                    };
                    for ox in 0..self.geom.ow {
                        if let Some(ix) = (ox * self.geom.stride.1 + kx * self.geom.dilation.1)
                            .checked_sub(self.geom.pad.1)
                            .filter(|&x| x < self.geom.iw)
                        {
                            t[(ky * self.geom.kw + kx) * p_len + oy * self.geom.ow + ox] =
                                iy * self.geom.iw + ix;
                        }
                    }
                }
            }
        }
        t
    }

    /// `A·T`: `t` holds `k` input vectors (column-major, `ncols × k`);
    /// returns `nrows × k`, column-major. Through [`ConvOp::forward_direct`]
    /// where [`ConvOp::prefers_direct`] says so, else through
    /// [`ConvOp::forward_gemm`]. In `f32` the weights are the ones rounded
    /// once per model.
    pub fn forward<T: Real>(&self, t: &[T], k: usize, par: Par) -> Vec<T> {
        if self.prefers_direct() {
            return self.forward_direct(t, k);
        }
        self.forward_gemm(t, k, par)
    }

    /// `A·T` (layout as [`ConvOp::forward`]) through im2col and a faer GEMM
    /// per group. The GEMM writes each tile of output positions in place;
    /// a pointwise convolution multiplies the input as it lies.
    pub fn forward_gemm<T: Real>(&self, t: &[T], k: usize, par: Par) -> Vec<T> {
        self.forward_tiled(t, k, par, TILE, MIN_TILE_ROWS)
    }

    /// `A·T` (layout as [`ConvOp::forward`]) without im2col: each input
    /// channel is copied once into a zero-padded plane, and a register tile
    /// of 6 output channels × one vector of positions
    /// along an output row sums its taps straight from the planes (with a
    /// horizontal stride of 1, a tap's positions are contiguous there).
    /// Each output is its taps' products summed in tap order from zero, in
    /// fused multiply-adds (the same bits on every CPU). Sequential. A
    /// horizontal stride other than 1 goes to [`ConvOp::forward_gemm`].
    pub fn forward_direct<T: Real>(&self, t: &[T], k: usize) -> Vec<T> {
        let g = &self.geom;
        if g.stride.1 != 1 {
            return self.forward_gemm(t, k, Par::Seq);
        }
        let (nrows, ncols) = (self.nrows(), self.ncols());
        assert_eq!(t.len(), ncols * k, "conv forward: dimension mismatch");
        // (the sizes without `Sizes`'s tap table, which this kernel does not read)
        let (cig, cog, ntaps) = (g.c_in / g.groups, g.c_out / g.groups, g.kh * g.kw);
        let (p_len, kk, plane) = (g.oh * g.ow, cig * ntaps, g.ih * g.iw);
        let mut out = vec![T::ZERO; nrows * k];
        if p_len == 0 || cog == 0 {
            return out;
        }
        let weight = self.weight_as::<T>();
        // positions per register tile: two AVX registers
        let lanes = 64 / std::mem::size_of::<T>();
        // the padded planes: rows `oh` outputs read, each wide enough for
        // the last tile's vector at the last tap
        let ihp = (g.oh - 1) * g.stride.0 + g.kh.saturating_sub(1) * g.dilation.0 + 1;
        let iwp = g.ow.next_multiple_of(lanes) + g.kw.saturating_sub(1) * g.dilation.1;
        let pplane = ihp * iwp;
        let offs: Vec<usize> = (0..kk)
            .map(|tap| {
                let (icg, r) = (tap / ntaps, tap % ntaps);
                let (ky, kx) = (r / g.kw, r % g.kw);
                icg * pplane + ky * g.dilation.0 * iwp + kx * g.dilation.1
            })
            .collect();
        // each group's weights transposed: a tap's channels contiguous
        let cp = cog.next_multiple_of(DIRECT_CHANNELS);
        let mut wt = vec![T::ZERO; g.groups * kk * cp];
        for (grp, wg) in wt.chunks_exact_mut((kk * cp).max(1)).enumerate().take(g.groups) {
            for oc in 0..cog {
                for tap in 0..kk {
                    wg[tap * cp + oc] = weight[(grp * cog + oc) * kk + tap];
                }
            }
        }
        let mut xp = vec![T::ZERO; cig * pplane];
        for q in 0..k {
            let (tq, oq) = (&t[q * ncols..(q + 1) * ncols], &mut out[q * nrows..(q + 1) * nrows]);
            for grp in 0..g.groups {
                for icg in 0..cig {
                    let src = &tq[(grp * cig + icg) * plane..(grp * cig + icg + 1) * plane];
                    let dst = &mut xp[icg * pplane..(icg + 1) * pplane];
                    for (yp, row) in dst.chunks_exact_mut(iwp).enumerate() {
                        let iy = yp.checked_sub(g.pad.0).filter(|&y| y < g.ih);
                        let Some(iy) = iy else {
                            row.fill(T::ZERO);
                            continue;
                        };
                        let srow = &src[iy * g.iw..(iy + 1) * g.iw];
                        // input column ix at padded column ix + pad.1
                        let lead = g.pad.1.min(iwp);
                        row[..lead].fill(T::ZERO);
                        let len = g.iw.min(iwp - lead);
                        row[lead..lead + len].copy_from_slice(&srow[..len]);
                        row[lead + len..].fill(T::ZERO);
                    }
                }
                let plan = Sliding {
                    xp: &xp,
                    iwp,
                    offs: &offs,
                    w: &wt[grp * kk * cp..(grp + 1) * kk * cp],
                    cog,
                    cp,
                    oh: g.oh,
                    ow: g.ow,
                    sh: g.stride.0,
                };
                let og = &mut oq[grp * cog * p_len..(grp + 1) * cog * p_len];
                crate::simd::dispatch(
                    #[inline(always)]
                    || {
                        if lanes == 16 {
                            plan.run::<16>(og);
                        } else {
                            plan.run::<8>(og);
                        }
                    },
                );
            }
        }
        out
    }

    /// Whether [`ConvOp::forward_direct`] is the faster forward product: a
    /// horizontal stride of 1 and at most [`DIRECT_MAX_CHANNELS`] output
    /// channels a group. `benches/conv_kernels.rs`, group `forward`, one
    /// thread, f32 (f64), direct against im2col + GEMM: LeNet-5's 1→6 5×5
    /// at 28² 5.1 µs against 10.4 (9.4 / 18.6); its 6→16 5×5 at 14² 13.5
    /// against 15.9 (25.6 / 23.6); a 16→16 3×3 at 32² 76 against 110 (148
    /// / 193); from 32 channels on the GEMM wins (ONet's 3→32 3×3 at 48²:
    /// 70 against 63; a 64→64 3×3 at 32²: 1.24 ms against 1.10), reading
    /// each input vector for more channels at once.
    pub fn prefers_direct(&self) -> bool {
        let g = &self.geom;
        g.stride.1 == 1 && g.c_out / g.groups.max(1) <= DIRECT_MAX_CHANNELS
    }

    /// [`ConvOp::forward_gemm`] with tiles of `tile` im2col entries and at
    /// least `min_rows` positions. A parallel `par` runs the tiles of a
    /// group as tasks, each a sequential GEMM (the GEMMs of one tile are too
    /// small to split well), with the bits of the sequential loop; a group
    /// of one tile hands `par` to its GEMM.
    fn forward_tiled<T: Real>(
        &self,
        t: &[T],
        k: usize,
        par: Par,
        tile: usize,
        min_rows: usize,
    ) -> Vec<T> {
        use rayon::prelude::*;
        let (nrows, ncols) = (self.nrows(), self.ncols());
        assert_eq!(t.len(), ncols * k, "conv forward: dimension mismatch");
        let g = &self.geom;
        let Sizes { p_len, cig, cog, ntaps, kk, plane, pointwise, taps } = self.sizes();
        let runs = if pointwise { None } else { self.run_table() };
        let weight = self.weight_as::<T>();
        let mut out = vec![T::ZERO; nrows * k];
        if p_len == 0 || cog == 0 {
            return out;
        }
        let pc = (tile / kk.max(1)).max(min_rows).clamp(1, p_len);
        let tiles = p_len.div_ceil(pc);
        let cols_len = if pointwise { 0 } else { pc * kk };
        // the im2col block of positions p0 .. p0 + pn of group `grp`:
        // `colsᵀ`, pn × K, column-major, element (p, tap) at tap·pn + p
        let im2col = |tq: &[T], grp: usize, p0: usize, pn: usize, cols: &mut [T]| {
            for icg in 0..cig {
                let src = &tq[(grp * cig + icg) * plane..(grp * cig + icg + 1) * plane];
                for tap in 0..ntaps {
                    let row = icg * ntaps + tap;
                    let dst = &mut cols[row * pn..(row + 1) * pn];
                    let Some(runs) = runs.as_deref() else {
                        // no run table (a strided convolution: its runs
                        // are single positions): entry by entry
                        let tt = &taps[tap * p_len + p0..tap * p_len + p0 + pn];
                        for (d, &idx) in dst.iter_mut().zip(tt) {
                            *d = if idx == usize::MAX { T::ZERO } else { src[idx] };
                        }
                        continue;
                    };
                    runs.for_each(tap, p0, pn, |p, run, len| match run {
                        Some(idx) => dst[p..p + len].copy_from_slice(&src[idx..idx + len]),
                        None => dst[p..p + len].fill(T::ZERO),
                    });
                }
            }
        };
        // one tile: positions p0.. of `dst`'s rows, its im2col in `cols`
        let run = |tq: &[T], grp: usize, p0: usize, dst: MatMut<'_, T>, cols: &mut [T], par| {
            let pn = dst.nrows();
            let w = MatRef::from_row_major_slice(
                &weight[grp * cog * kk..(grp + 1) * cog * kk],
                cog,
                kk,
            );
            let x = if pointwise {
                MatRef::from_column_major_slice(
                    &tq[grp * cig * plane..(grp + 1) * cig * plane],
                    p_len,
                    cig,
                )
                .subrows(p0, pn)
            } else {
                im2col(tq, grp, p0, pn, cols);
                MatRef::from_column_major_slice(&cols[..pn * kk], pn, kk)
            };
            faer::linalg::matmul::matmul(dst, Accum::Replace, x, w.transpose(), T::ONE, par);
        };
        let mut cols = vec![T::ZERO; cols_len];
        for q in 0..k {
            let (tq, oq) = (&t[q * ncols..(q + 1) * ncols], &mut out[q * nrows..(q + 1) * nrows]);
            for grp in 0..g.groups {
                let og = &mut oq[grp * cog * p_len..(grp + 1) * cog * p_len];
                let dst = MatMut::from_column_major_slice_mut(og, p_len, cog);
                if tiles == 1 {
                    run(tq, grp, 0, dst, &mut cols, par);
                } else if par.degree() > 1 {
                    dst.par_row_chunks_mut(pc).enumerate().for_each_init(
                        || vec![T::ZERO; cols_len],
                        |cols, (i, d)| run(tq, grp, i * pc, d, cols, Par::Seq),
                    );
                } else {
                    let mut rest = dst;
                    for i in 0..tiles {
                        let (d, r) = rest.split_at_row_mut(pc.min(p_len - i * pc));
                        run(tq, grp, i * pc, d, &mut cols, Par::Seq);
                        rest = r;
                    }
                }
            }
        }
        out
    }

    /// `G·A` through a GEMM per group and col2im: `g` holds a `k × nrows`
    /// block with element `(r, j)` at `j·k + r`; returns `k × ncols` in the
    /// same layout. Tiles of output positions are multiplied and scattered
    /// while in cache; a pointwise convolution's GEMM writes the result in
    /// place.
    pub fn backward_gemm<T: Real>(&self, g: &[T], k: usize, par: Par) -> Vec<T> {
        if crate::winograd::eligible(&self.geom) {
            return crate::winograd::backward(&self.geom, self.winograd_kernel::<T>(), g, k, par);
        }
        // (under the AVX2 dispatch for col2im's adds; faer dispatches its own)
        crate::simd::dispatch(
            #[inline(always)]
            || self.backward_tiled(g, k, par, TILE, MIN_TILE_ROWS, Fill::Gemm, &[], PAR_MIN_ADDS),
        )
    }

    /// `G·A` (layout as [`ConvOp::backward_gemm`]) through the nonzero
    /// columns of `G` only: a tile's im2col block, row `(p, r)`, is
    /// `Σ_{oc active at p} G[r, (oc, p)] · W[oc, :]` (channels in order, each
    /// sum from zero), formed in registers (up to 16 rows in `f32`, 8 in
    /// `f64`, × [`ACTIVE_TAPS`] taps at a time), then scattered by the GEMM path's
    /// col2im. Its work is proportional to the nonzero columns, where the
    /// GEMM's is to all of them: after a max-pool or a ReLU most are zero.
    /// Sequential; fused multiply-adds, the same bits on every CPU.
    pub fn backward_active<T: Real>(&self, g: &[T], k: usize) -> Vec<T> {
        if k == 0 {
            return Vec::new();
        }
        self.backward_active_with(g, k, &crate::nonzero_columns(g, k))
    }

    /// Whether [`ConvOp::backward_active`] is the cheaper reverse product
    /// when `nonzero` of `G`'s columns are nonzero: fewer than
    /// [`CONV_ACTIVE_BELOW`] of them, yet at least [`ACTIVE_MIN_CHANNELS`]
    /// per output position and group, and at least [`ACTIVE_MIN_TAPS`]
    /// im2col rows. Neither the thread count nor the number of adjoint rows
    /// plays a part, so an instance's bits do not depend on the threads, on
    /// how many instances share them, or on which other rows of W are
    /// asked for (each row's sums are the same whatever the register
    /// tile's width); the kernel itself is sequential.
    pub fn prefers_active(&self, nonzero: usize) -> bool {
        let (num, den) = CONV_ACTIVE_BELOW;
        let g = &self.geom;
        // im2col rows, without forming the tap table `sizes` carries
        let kk = g.c_in / g.groups * g.kh * g.kw;
        let positions = g.oh * g.ow * g.groups;
        nonzero * den < self.nrows() * num
            && nonzero >= ACTIVE_MIN_CHANNELS * positions
            && kk >= ACTIVE_MIN_TAPS
    }

    /// [`ConvOp::backward_active`] with `G`'s nonzero columns given
    /// (`nonzero[j]`: column `j` has a nonzero entry; one per row of the
    /// operator).
    ///
    /// # Panics
    /// If `nonzero` does not have one flag per row.
    pub fn backward_active_with<T: Real>(&self, g: &[T], k: usize, nonzero: &[bool]) -> Vec<T> {
        assert_eq!(nonzero.len(), self.nrows(), "conv backward: one flag per column of G");
        crate::simd::dispatch(
            #[inline(always)]
            || {
                self.backward_tiled(
                    g,
                    k,
                    Par::Seq,
                    TILE,
                    MIN_TILE_ROWS,
                    Fill::Active,
                    nonzero,
                    PAR_MIN_ADDS,
                )
            },
        )
    }

    /// [`ConvOp::backward_gemm`] or [`ConvOp::backward_active`] with tiles of
    /// `tile` col2im entries and at least `min_rows` rows.
    #[inline(always)]
    fn backward_tiled<T: Real>(
        &self,
        g: &[T],
        k: usize,
        par: Par,
        tile: usize,
        min_rows: usize,
        fill: Fill,
        nonzero: &[bool],
        par_min: usize,
    ) -> Vec<T> {
        let (nrows, ncols) = (self.nrows(), self.ncols());
        assert_eq!(g.len(), nrows * k, "conv backward: dimension mismatch");
        let geom = &self.geom;
        let Sizes { p_len, cig, cog, ntaps, kk, plane, pointwise, taps } = self.sizes();
        let weight = self.weight_as::<T>();
        let mut out = crate::written_zeros_par(ncols * k, par);
        if k == 0 || kk == 0 {
            return out;
        }
        let width = p_len * k;
        // positions per tile; the active fill's do not depend on `k`: col2im
        // adds a tile at a time, so the tiles set the order of each input
        // element's sum, and a row's bits must not depend on the other rows
        let kt = if fill == Fill::Active { active_rows::<T>() } else { k.max(1) };
        let pc = (tile / (kk * kt).max(1)).max(min_rows.div_ceil(kt)).clamp(1, p_len.max(1));
        // the active fill scatters through col2im, pointwise or not
        let (pointwise, taps) = match fill {
            Fill::Active if pointwise => (false, self.tap_table()),
            Fill::Gemm | Fill::Active => (pointwise, taps),
        };
        let runs = if pointwise { None } else { self.run_table() };
        // the im2col tile, column-major with columns `pc·k` apart
        // (the active fill writes whole register tiles: rows past a
        // column's end and whole tap tiles past `kk`, never read)
        let active = fill == Fill::Active;
        let ld = if active { pc * k + active_rows::<T>() } else { pc * k };
        let kp = kk.next_multiple_of(ACTIVE_TAPS);
        let mut cols = match (pointwise, active) {
            (true, _) => vec![],
            (false, false) => vec![T::ZERO; ld * kk],
            (false, true) => vec![T::ZERO; ld * kp],
        };
        // (one adjoint row: an accumulator over the taps instead)
        let mut gbuf = match (active, k) {
            (false, _) => vec![],
            (true, 1) => vec![T::ZERO; kk],
            (true, _) => vec![T::ZERO; cog * active_rows::<T>()],
        };
        // Fill::Active: the group's weight rows padded to whole lanes, and
        // per position the channels whose column is nonzero
        let mut wp = if active { vec![T::ZERO; cog * kp] } else { vec![] };
        let mut start = if active { vec![0usize; p_len + 1] } else { vec![] };
        let mut lists = Vec::new();
        for grp in 0..geom.groups {
            let gg = &g[grp * cog * width..(grp + 1) * cog * width];
            let w = MatRef::from_row_major_slice(
                &weight[grp * cog * kk..(grp + 1) * cog * kk],
                cog,
                kk,
            );
            if pointwise {
                // (P·k) × cig, column-major, is the group's slice of the output
                let ggt = MatRef::from_column_major_slice(gg, width, cog);
                let dst = MatMut::from_column_major_slice_mut(
                    &mut out[grp * cig * plane * k..(grp + 1) * cig * plane * k],
                    width,
                    cig,
                );
                faer::linalg::matmul::matmul(dst, Accum::Replace, ggt, w, T::ONE, par);
                continue;
            }
            if active {
                for (oc, row) in wp.chunks_exact_mut(kp).enumerate() {
                    row[..kk].copy_from_slice(&weight[(grp * cog + oc) * kk..][..kk]);
                }
                let flags = &nonzero[grp * cog * p_len..(grp + 1) * cog * p_len];
                active_lists(flags, p_len, &mut start, &mut lists);
            }
            let mut p0 = 0;
            while p0 < p_len {
                let pn = pc.min(p_len - p0);
                match fill {
                    Fill::Gemm => {
                        // G_gᵀ rows p0·k .. (p0+pn)·k: (pn·k) × cog, columns width apart
                        let ggt = MatRef::from_column_major_slice_with_stride(
                            &gg[p0 * k..],
                            pn * k,
                            cog,
                            width,
                        );
                        // colsᵀ = G_gᵀ·W_g: (pn·k) × K, element (p·k + r, tap) contiguous in r
                        let c = MatMut::from_column_major_slice_with_stride_mut(
                            &mut cols,
                            pn * k,
                            kk,
                            ld,
                        );
                        faer::linalg::matmul::matmul(c, Accum::Replace, ggt, w, T::ONE, par);
                    }
                    Fill::Active => {
                        // the register tile's rows by the adjoint's: the
                        // width changes the speed, never the bits (each
                        // row's sums are the same)
                        let f = (&mut cols[..], ld, &mut gbuf[..], gg, &wp[..], kp, kk);
                        let at = (&lists[..], &start[..], p0, pn, k, width);
                        match (active_rows::<T>(), k) {
                            (16, 9..) => active_fill::<T, 16>(f, at),
                            (_, 5..) => active_fill::<T, 8>(f, at),
                            (_, 2..) => active_fill::<T, 4>(f, at),
                            // one row (none returned above)
                            _ => active_fill_one::<T>(f, at),
                        }
                    }
                }
                // col2im: input channel `icg` of the group takes im2col
                // columns icg·ntaps.., each added in tap order; channels
                // are disjoint, so threads split them with the same bits
                let og = &mut out[grp * cig * plane * k..(grp + 1) * cig * plane * k];
                // (inlined, so that under `simd::dispatch` its adds are
                // AVX2's too)
                let scatter = std::convert::identity(
                    #[inline(always)]
                    |icg: usize, dst_c: &mut [T]| {
                        for tap in 0..ntaps {
                            let t = icg * ntaps + tap;
                            let col = &cols[t * ld..t * ld + pn * k];
                            let Some(runs) = runs.as_deref() else {
                                // no run table (a strided convolution: its
                                // runs are single positions): the tap
                                // table's entries in turn, the same adds
                                let tt = &taps[tap * p_len + p0..tap * p_len + p0 + pn];
                                if k == 1 {
                                    for (&idx, &v) in tt.iter().zip(col) {
                                        if idx != usize::MAX {
                                            dst_c[idx] += v;
                                        }
                                    }
                                    continue;
                                }
                                for (&idx, v) in tt.iter().zip(col.chunks_exact(k)) {
                                    if idx != usize::MAX {
                                        let o = &mut dst_c[idx * k..(idx + 1) * k];
                                        for (o, &v) in o.iter_mut().zip(v) {
                                            *o += v;
                                        }
                                    }
                                }
                                continue;
                            };
                            runs.for_each(
                                tap,
                                p0,
                                pn,
                                #[inline(always)]
                                |p, run, len| {
                                    if let Some(idx) = run {
                                        for (o, &v) in dst_c[idx * k..(idx + len) * k]
                                            .iter_mut()
                                            .zip(&col[p * k..(p + len) * k])
                                        {
                                            *o += v;
                                        }
                                    }
                                },
                            );
                        }
                    },
                );
                let per_channel = ntaps * pn * k;
                if par.degree() > 1 && cig > 1 && per_channel * cig >= 2 * par_min {
                    use rayon::prelude::*;
                    og.par_chunks_mut(plane * k)
                        .with_min_len(par_min.div_ceil(per_channel))
                        .enumerate()
                        .for_each(|(icg, dst_c)| scatter(icg, dst_c));
                } else {
                    for (icg, dst_c) in og.chunks_mut(plane * k).enumerate() {
                        scatter(icg, dst_c);
                    }
                }
                p0 += pn;
            }
        }
        out
    }

    /// `G·A` touching only the columns `nz` of `G` (the others are zero):
    /// each output position scatters its kernel taps, for all its nonzero
    /// channels at once. Each output entry is summed as `o += w·g` over the
    /// output positions in order, then over each position's channels in
    /// order, whatever `G`'s row count and the order of `nz`: the adjoint
    /// rows ride in a register tile of 4, 8 or 16 lanes (zero-padded), so
    /// one tap is one vector fused multiply-add (the same bits with or
    /// without AVX2) rather than a loop over rows; more rows than lanes
    /// take a pass per lane group.
    pub fn backward_sparse<T: Real>(&self, g: &Block<T>, nz: &[usize]) -> Block<T> {
        assert_eq!(g.ncols(), self.nrows(), "conv backward: dimension mismatch");
        assert!(nz.iter().all(|&r| r < g.ncols()), "conv backward: a column past the adjoint");
        let mut order: Vec<(usize, usize)> = nz.iter().map(|&r| (r, r)).collect();
        order.sort_unstable();
        order.dedup();
        self.scatter(g.nrows(), order, |r| g.col_as_slice(r))
    }

    /// [`ConvOp::backward_sparse`] of an adjoint given by its nonzero
    /// columns alone: column `cols[i]` (below [`ConvOp::nrows`]) holds
    /// `vals[i·k..(i + 1)·k]`, every other column is zero. The same bits as
    /// `backward_sparse` of the whole block with those columns, whatever
    /// their order; a column listed twice adds both.
    ///
    /// # Panics
    /// If `vals` does not hold `k` values per column, or a column is past
    /// the operator's rows.
    pub fn backward_sparse_cols<T: Real>(&self, k: usize, cols: &[usize], vals: &[T]) -> Block<T> {
        assert_eq!(vals.len(), cols.len() * k, "conv backward: k values per column");
        assert!(cols.iter().all(|&r| r < self.nrows()), "conv backward: a column past the adjoint");
        let mut order: Vec<(usize, usize)> = cols.iter().copied().zip(0..).collect();
        order.sort_unstable();
        self.scatter(k, order, |i| &vals[i * k..(i + 1) * k])
    }

    /// The scatter of the columns `order` (column, where `col` finds its
    /// `k` values), sorted by column: bucketed by group and output
    /// position, channels ascending within a position.
    fn scatter<'a, T: Real>(
        &self,
        k: usize,
        order: Vec<(usize, usize)>,
        col: impl Fn(usize) -> &'a [T],
    ) -> Block<T> {
        let geo = &self.geom;
        let p_len = geo.oh * geo.ow;
        let cog = geo.c_out / geo.groups;
        let mut start = vec![0usize; geo.groups * p_len + 1];
        let bucket = |r: usize| (r / p_len / cog) * p_len + r % p_len;
        for &(r, _) in &order {
            start[bucket(r) + 1] += 1;
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut fill = start.clone();
        let mut sorted = vec![(0usize, 0usize); order.len()];
        for (r, at) in order {
            let b = bucket(r);
            sorted[fill[b]] = (r, at);
            fill[b] += 1;
        }
        let buckets = Buckets { start: &start, cols: &sorted };
        crate::simd::dispatch(
            #[inline(always)]
            || match sparse_lanes(k) {
                0 => Block::zeros(0, self.ncols()),
                1 => self.scatter_lanes::<T, 1>(k, &col, &buckets),
                4 => self.scatter_lanes::<T, 4>(k, &col, &buckets),
                8 => self.scatter_lanes::<T, 8>(k, &col, &buckets),
                _ => self.scatter_lanes::<T, 16>(k, &col, &buckets),
            },
        )
    }

    /// [`ConvOp::backward_sparse`] with adjoint rows in tiles of `RL` lanes.
    /// A position's taps are walked kernel row by kernel row over the range
    /// inside the input (from the geometry, formed once per output row and
    /// column), each tap's tile updated once for up to [`SCATTER_CHANNELS`]
    /// channels held in registers.
    #[inline(always)]
    fn scatter_lanes<'a, T: Real, const RL: usize>(
        &self,
        k: usize,
        col: &impl Fn(usize) -> &'a [T],
        b: &Buckets,
    ) -> Block<T> {
        let geo = &self.geom;
        let p_len = geo.oh * geo.ow;
        let cig = geo.c_in / geo.groups;
        let plane = geo.ih * geo.iw;
        let ntaps = geo.kh * geo.kw;
        let weight = self.weight_as::<T>();
        // each output row's and column's taps inside the input
        let rows: Vec<(usize, usize, usize)> = (0..geo.oh)
            .map(|oy| tap_span(oy, geo.stride.0, geo.dilation.0, geo.pad.0, geo.ih, geo.kh))
            .collect();
        let cols: Vec<(usize, usize, usize)> = (0..geo.ow)
            .map(|ox| tap_span(ox, geo.stride.1, geo.dilation.1, geo.pad.1, geo.iw, geo.kw))
            .collect();
        // channels per register group: the group's tiles and one
        // accumulator tile fit the 16 AVX registers
        let per_group = if RL * size_of::<T>() <= 64 { SCATTER_CHANNELS } else { 2 };
        scatter_passes::<T, RL>(
            k,
            self.ncols(),
            // (inlined, so that under `simd::dispatch` it is AVX2's too)
            #[inline(always)]
            |r0, rb, acc| {
                for (key, w) in b.start.windows(2).enumerate() {
                    let cols_here = &b.cols[w[0]..w[1]];
                    if cols_here.is_empty() {
                        continue;
                    }
                    let (grp, p) = (key / p_len, key % p_len);
                    let (ky0, ky1, y0) = rows[p / geo.ow];
                    let (kx0, kx1, x0) = cols[p % geo.ow];
                    if kx0 >= kx1 || ky0 >= ky1 {
                        continue;
                    }
                    let span = Span { ky0, ky1, y0, kx0, kx1, x0 };
                    for chunk in cols_here.chunks(per_group) {
                        // each column's tile and output channel
                        let mut tiles = [[T::ZERO; RL]; SCATTER_CHANNELS];
                        let mut oc = [0; SCATTER_CHANNELS];
                        for (i, &(r, at)) in chunk.iter().enumerate() {
                            tiles[i][..rb].copy_from_slice(&col(at)[r0..r0 + rb]);
                            oc[i] = r / p_len;
                        }
                        let [t0, t1, t2, t3] = tiles;
                        for icg in 0..cig {
                            let ic = grp * cig + icg;
                            let dst = &mut acc[ic * plane..(ic + 1) * plane];
                            let w = |i: usize| &weight[(oc[i] * cig + icg) * ntaps..][..ntaps];
                            match chunk.len() {
                                1 => span.taps(geo, dst, [w(0)], [t0]),
                                2 => span.taps(geo, dst, [w(0), w(1)], [t0, t1]),
                                3 => span.taps(geo, dst, [w(0), w(1), w(2)], [t0, t1, t2]),
                                _ => {
                                    span.taps(geo, dst, [w(0), w(1), w(2), w(3)], [t0, t1, t2, t3])
                                }
                            }
                        }
                    }
                }
            },
        )
    }

    /// Structural nonzeros (taps inside the input).
    pub fn nnz(&self) -> usize {
        let g = &self.geom;
        let taps = |o: usize, k: usize, s: usize, d: usize, p: usize, len: usize| {
            let (first, end, _) = tap_span(o, s, d, p, len, k);
            end - first
        };
        let rows: usize =
            (0..g.oh).map(|oy| taps(oy, g.kh, g.stride.0, g.dilation.0, g.pad.0, g.ih)).sum();
        let cols: usize =
            (0..g.ow).map(|ox| taps(ox, g.kw, g.stride.1, g.dilation.1, g.pad.1, g.iw)).sum();
        rows * cols * (g.c_in / g.groups) * g.c_out
    }

    /// The explicit Toeplitz matrix.
    pub fn to_csr(&self) -> CsMat<f64> {
        let nnz = self.nnz();
        let mut indptr = Vec::with_capacity(self.nrows() + 1);
        let mut indices = Vec::with_capacity(nnz);
        let mut data = Vec::with_capacity(nnz);
        indptr.push(0);
        let mut current = 0;
        self.for_each(|row, col, w| {
            while current < row {
                indptr.push(indices.len());
                current += 1;
            }
            indices.push(col);
            data.push(w);
        });
        while indptr.len() < self.nrows() + 1 {
            indptr.push(indices.len());
        }
        // columns within a row are sorted: (ic, iy, ix) increase with (icg, ky, kx)
        CsMat::new((self.nrows(), self.ncols()), indptr, indices, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A random convolution: any groups, strides, dilations and pads (the
    /// trailing pads through `oh`, `ow`), pointwise ones included.
    fn conv() -> impl Strategy<Value = ConvOp> {
        conv_in(1..4, 1..4, 1..10, 1..4)
    }

    /// [`conv`] with `cig` input and `cog` output channels a group, `iw`
    /// input columns and horizontal strides `sw`.
    fn conv_in(
        cig: std::ops::Range<usize>,
        cog: std::ops::Range<usize>,
        iw: std::ops::Range<usize>,
        sw: std::ops::Range<usize>,
    ) -> impl Strategy<Value = ConvOp> {
        (
            (cig, 1usize..3, cog),
            // (kernel widths to 5: the scatter unrolls rows of 3 and 5 taps)
            (1usize..10, iw, 1usize..4, 1usize..6),
            (1usize..4, sw, 1usize..3, 1usize..3),
            (0usize..3, 0usize..3, 0usize..3, 0usize..3),
            any::<u64>(),
        )
            .prop_filter_map(
                "the kernel fits",
                |(
                    (cig, groups, cog),
                    (ih, iw, kh, kw),
                    (sh, sw, dh, dw),
                    (pt, pl, pb, pr),
                    seed,
                )| {
                    let span = |i: usize, k: usize, d: usize, a: usize, b: usize| {
                        (i + a + b).checked_sub(d * (k - 1) + 1)
                    };
                    let oh = span(ih, kh, dh, pt, pb)? / sh + 1;
                    let ow = span(iw, kw, dw, pl, pr)? / sw + 1;
                    let (c_in, c_out) = (cig * groups, cog * groups);
                    let geom = ConvGeometry {
                        c_in,
                        c_out,
                        groups,
                        ih,
                        iw,
                        kh,
                        kw,
                        stride: (sh, sw),
                        dilation: (dh, dw),
                        pad: (pt, pl),
                        oh,
                        ow,
                    };
                    ConvOp::seeded(geom, seed)
                },
            )
    }

    fn entries(n: usize, seed: usize) -> Vec<f64> {
        (0..n).map(|i| ((i * 7 + seed * 13) % 23) as f64 / 11.0 - 1.0).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The direct forward kernel against the im2col GEMM (itself
        /// checked against the Toeplitz matrix) on shapes wide enough for
        /// several register tiles of channels and positions: f64 within
        /// rounding, f32 within `(inner + 2)·ε32` of `|A|·|T|`.
        #[test]
        fn direct_forward_matches_the_gemm(
            op in conv_in(1..5, 1..20, 1..40, 1..3),
            k in 1usize..3,
            seed in any::<u64>(),
        ) {
            let n = op.ncols();
            let t = entries(n * k, seed as usize % 97);
            let g = *op.geometry();
            let want = op.forward_gemm(&t, k, Par::Seq);
            let got = op.forward_direct(&t, k);
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "direct {g} vs {w}");
            }
            let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
            let got = op.forward_direct(&t32, k);
            let mag = {
                // |A|·|T| through the Toeplitz matrix
                let a = op.to_csr();
                let m = op.nrows();
                let mut mag = vec![0.0; m * k];
                for q in 0..k {
                    for (i, row) in a.outer_iterator().enumerate() {
                        mag[q * m + i] = row.iter().map(|(j, &v)| (v * t[q * n + j]).abs()).sum();
                    }
                }
                mag
            };
            let gamma = (g.c_in / g.groups * g.kh * g.kw + 2) as f64 * f64::from(f32::EPSILON);
            for ((v, w), m) in got.iter().zip(&want).zip(&mag) {
                prop_assert!((f64::from(*v) - w).abs() <= gamma * m + 1e-30, "f32 direct {v} vs {w}");
            }
        }
    }

    proptest! {
        /// Every tiling of the GEMM kernels, and the pointwise path, against
        /// the explicit Toeplitz matrix; f32 within its rounding bound.
        #[test]
        fn tiled_kernels_match_the_toeplitz_matrix(op in conv(), k in 1usize..7, tile in 1usize..200, seed in 0usize..100) {
            let a = op.to_csr();
            prop_assert_eq!(op.nnz(), a.nnz());
            let (m, n) = (op.nrows(), op.ncols());
            // forward: A·T, T column-major n × k
            let t = entries(n * k, seed);
            let mut want = vec![0.0; m * k];
            for q in 0..k {
                for (i, row) in a.outer_iterator().enumerate() {
                    want[q * m + i] = row.iter().map(|(j, &v)| v * t[q * n + j]).sum();
                }
            }
            let tiled = [
                op.forward_tiled(&t, k, Par::Seq, tile, 1),
                op.forward_tiled(&t, k, Par::rayon(2), tile, 1),
                op.forward_gemm(&t, k, Par::Seq),
                op.forward_direct(&t, k),
            ];
            // parallel tiles give the sequential loop's bits
            prop_assert_eq!(&tiled[0], &tiled[1]);
            for got in tiled {
                for (g, w) in got.iter().zip(&want) {
                    prop_assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "forward {g} vs {w}");
                }
            }
            // in f32 (input and weights rounded, sums of c_in·kh·kw
            // products in f32): within (inner + 2)·ε32 of |A|·|T|
            let t32: Vec<f32> = t.iter().map(|&v| v as f32).collect();
            let inner = op.geometry().c_in / op.geometry().groups * op.geometry().kh * op.geometry().kw;
            for got in [op.forward_tiled(&t32, k, Par::Seq, tile, 1), op.forward_gemm(&t32, k, Par::rayon(2)), op.forward_direct(&t32, k)] {
                for q in 0..k {
                    for (i, row) in a.outer_iterator().enumerate() {
                        let mag: f64 = row.iter().map(|(j, &v)| (v * t[q * n + j]).abs()).sum();
                        let (g, w) = (f64::from(got[q * m + i]), want[q * m + i]);
                        let gamma = (inner + 2) as f64 * f64::from(f32::EPSILON);
                        prop_assert!((g - w).abs() <= gamma * mag + 1e-30, "f32 forward {g} vs {w}");
                    }
                }
            }
            // reverse: G·A, G with element (r, j) at j·k + r
            let g = entries(m * k, seed + 1);
            let mut want = vec![0.0; n * k];
            for (i, row) in a.outer_iterator().enumerate() {
                for (j, &v) in row.iter() {
                    for r in 0..k {
                        want[j * k + r] += g[i * k + r] * v;
                    }
                }
            }
            let bound = |w: f64, eps: f64| (op.geometry().c_in * op.geometry().kh * op.geometry().kw + 2) as f64 * eps * 4.0 * (1.0 + w.abs());
            for got in [op.backward_tiled(&g, k, Par::Seq, tile, 1, Fill::Gemm, &[], 1), op.backward_tiled(&g, k, Par::Seq, tile, 1, Fill::Active, &crate::nonzero_columns(&g, k), 1), op.backward_gemm(&g, k, Par::Seq), op.backward_active(&g, k)] {
                for (v, w) in got.iter().zip(&want) {
                    prop_assert!((v - w).abs() <= bound(*w, f64::EPSILON), "reverse {v} vs {w}");
                }
            }
            // col2im split over channels between threads (every task one
            // addition or more): the sequential loop's bits
            prop_assert_eq!(
                op.backward_tiled(&g, k, Par::rayon(2), tile, 1, Fill::Gemm, &[], 1),
                op.backward_tiled(&g, k, Par::Seq, tile, 1, Fill::Gemm, &[], 1)
            );
            let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            // the f32 weights `prepare` forms are those the first product forms
            let prepared = crate::Operator::Conv(op.clone());
            prepared.prepare::<f32>();
            let crate::Operator::Conv(prepared) = prepared else { unreachable!() };
            prop_assert_eq!(prepared.backward_gemm(&g32, k, Par::Seq), op.clone().backward_gemm(&g32, k, Par::Seq));
            for got in [op.backward_tiled(&g32, k, Par::Seq, tile, 1, Fill::Gemm, &[], 1), op.backward_tiled(&g32, k, Par::Seq, tile, 1, Fill::Active, &crate::nonzero_columns(&g32, k), 1), op.backward_gemm(&g32, k, Par::Seq), op.backward_active(&g32, k)] {
                for (&v, w) in got.iter().zip(&want) {
                    prop_assert!((f64::from(v) - w).abs() <= bound(*w, f64::from(f32::EPSILON)), "f32 reverse {v} vs {w}");
                }
            }
            // columns zero in every row (inactive units, unselected max-pool
            // positions), as backward_active skips them: exactly the
            // products of the nonzero ones
            let gz: Vec<f64> = g.iter().enumerate().map(|(i, &v)| if (i / k.max(1)) % 3 == seed % 3 { v } else { 0.0 }).collect();
            let mut want = vec![0.0; n * k];
            for (i, row) in a.outer_iterator().enumerate() {
                for (j, &v) in row.iter() {
                    for r in 0..k {
                        want[j * k + r] += gz[i * k + r] * v;
                    }
                }
            }
            for got in [op.backward_active(&gz, k), op.backward_tiled(&gz, k, Par::Seq, tile, 1, Fill::Active, &crate::nonzero_columns(&gz, k), 1), op.backward_gemm(&gz, k, Par::Seq)] {
                for (v, w) in got.iter().zip(&want) {
                    prop_assert!((v - w).abs() <= bound(*w, f64::EPSILON), "zero columns: reverse {v} vs {w}");
                }
            }
            // a row's bits do not depend on the other rows: the first row
            // alone gives the first row of the whole, tile for tile
            let g1: Vec<f64> = (0..m).map(|i| gz[i * k]).collect();
            let one = op.backward_tiled(&g1, 1, Par::Seq, tile, 1, Fill::Active, &crate::nonzero_columns(&g1, 1), 1);
            let all = op.backward_tiled(&gz, k, Par::Seq, tile, 1, Fill::Active, &crate::nonzero_columns(&gz, k), 1);
            for j in 0..n {
                prop_assert_eq!(one[j].to_bits(), all[j * k].to_bits(), "row 0 alone differs at {}", j);
            }
        }

        /// The run table gives, for every tap and every range of
        /// positions, the calls `for_runs` makes on that slice of the tap
        /// table.
        #[test]
        fn run_table_clips_to_for_runs_of_the_slice(op in conv(), p0 in 0usize..100, pn in 0usize..100) {
            let taps = op.tap_table();
            let p_len = op.geometry().oh * op.geometry().ow;
            let (p0, pn) = (p0.min(p_len), pn.min(p_len - p0.min(p_len)));
            let Some(runs) = Runs::of(&taps, p_len) else { return Ok(()) };
            for tap in 0..op.geometry().kh * op.geometry().kw {
                let (mut want, mut got) = (vec![], vec![]);
                for_runs(&taps[tap * p_len + p0..tap * p_len + p0 + pn], |p, r, l| want.push((p, r, l)));
                runs.for_each(tap, p0, pn, |p, r, l| got.push((p, r, l)));
                prop_assert_eq!(got, want);
            }
        }

        /// The scatter of the nonzero columns, for every register tile
        /// (1, 4, 8, 16 lanes) and several passes of 16: against the
        /// Toeplitz matrix in f64 and f32, the same bits for the columns
        /// listed in another order or repeated, or given alone
        /// (`backward_sparse_cols`), and each row exactly the bits of that
        /// row scattered alone (lanes never mix).
        #[test]
        fn sparse_scatter_matches_the_toeplitz_matrix(op in conv(), k in 1usize..40, keep in 1usize..4, seed in 0usize..100) {
            let a = op.to_csr();
            let (m, n) = (op.nrows(), op.ncols());
            let g = Block::from_fn(k, m, |r, j| {
                if (j * 7 + seed) % 4 < keep { entries(1, seed + j * k + r)[0] } else { 0.0 }
            });
            let nz: Vec<usize> = (0..m).filter(|&j| g.col_as_slice(j).iter().any(|&v| v != 0.0)).collect();
            let mut want = vec![0.0; n * k];
            let mut mag = vec![0.0; n * k];
            for (i, row) in a.outer_iterator().enumerate() {
                for (j, &v) in row.iter() {
                    for r in 0..k {
                        want[j * k + r] += g.col_as_slice(i)[r] * v;
                        mag[j * k + r] += (g.col_as_slice(i)[r] * v).abs();
                    }
                }
            }
            let inner = (op.geometry().c_in * op.geometry().kh * op.geometry().kw + 2) as f64;
            let got = op.backward_sparse(&g, &nz);
            let g32 = Block::from_col_major(k, m, g.as_slice().iter().map(|&v| v as f32).collect());
            let got32 = op.backward_sparse(&g32, &nz);
            for (q, w) in want.iter().enumerate() {
                let (v, v32) = (got.as_slice()[q], f64::from(got32.as_slice()[q]));
                prop_assert!((v - w).abs() <= inner * f64::EPSILON * mag[q], "f64 {v} vs {w}");
                prop_assert!((v32 - w).abs() <= inner * f64::from(f32::EPSILON) * mag[q] + 1e-30, "f32 {v32} vs {w}");
            }
            // the columns in any order, repeated or not: the same bits
            let shuffled: Vec<usize> = nz.iter().rev().chain(nz.iter().step_by(3)).copied().collect();
            let again = op.backward_sparse(&g, &shuffled);
            prop_assert!(again.as_slice().iter().zip(got.as_slice()).all(|(a, b)| a.to_bits() == b.to_bits()));
            // the nonzero columns alone, in any order: the same bits
            let rev: Vec<usize> = nz.iter().rev().copied().collect();
            let vals: Vec<f64> = rev.iter().flat_map(|&j| g.col_as_slice(j).iter().copied()).collect();
            let alone = op.backward_sparse_cols(k, &rev, &vals);
            prop_assert!(alone.as_slice().iter().zip(got.as_slice()).all(|(a, b)| a.to_bits() == b.to_bits()));
            for r in [0, k / 2, k - 1] {
                let row = Block::from_fn(1, m, |_, j| g.col_as_slice(j)[r]);
                let alone = op.backward_sparse(&row, &nz);
                for j in 0..n {
                    prop_assert_eq!(alone.col_as_slice(j)[0].to_bits(), got.col_as_slice(j)[r].to_bits());
                }
            }
        }

        /// The constructor refuses weights that do not fit the kernel.
        #[test]
        fn new_checks_the_weight_length(op in conv(), extra in 1usize..3) {
            let mut w = op.weight().to_vec();
            w.extend(std::iter::repeat_n(0.0, extra));
            prop_assert!(ConvOp::new(*op.geometry(), Arc::new(w)).is_err());
        }
    }

    #[test]
    fn new_refuses_bad_shapes() {
        let g = ConvGeometry::same_3x3(4, 6, 2, 5);
        let w = |n: usize| Arc::new(vec![0.5; n]);
        assert!(ConvOp::new(g, w(6 * 2 * 9)).is_ok());
        assert!(ConvOp::new(ConvGeometry { groups: 4, ..g }, w(6 * 9)).is_err());
        assert!(ConvOp::new(ConvGeometry { stride: (0, 1), ..g }, w(6 * 2 * 9)).is_err());
        assert!(ConvOp::new(ConvGeometry { kh: 0, ..g }, w(0)).is_err());
        assert!(ConvOp::new(ConvGeometry { oh: usize::MAX, ..g }, w(6 * 2 * 9)).is_err());
        assert!(
            ConvOp::new(ConvGeometry { c_out: usize::MAX / 2, groups: 1, c_in: 4, ..g }, w(4))
                .is_err()
        );
    }
}
