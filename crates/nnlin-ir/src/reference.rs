//! The reference interpreter: plain loops over the IR, generic over
//! [`Scalar`] (`f32`, `f64`, [`Dual`]). It is the oracle the compiled path is
//! tested against; the compiled path never calls it.

use crate::network::{Layer, Network, PadMode, PoolKind, ValueId};
use crate::scalar::{Dual, Scalar};
use rayon::prelude::*;

/// Evaluates every value of the network at `x` (flattened input).
///
/// # Panics
/// If `x.len()` is not the network's input size (a caller contract).
pub fn forward_values<S: Scalar>(net: &Network, x: &[S]) -> Vec<Vec<S>> {
    run(net, x, false)
}

/// Runs the network; with `free`, drops each value after its last use (only
/// the output is kept).
fn run<S: Scalar>(net: &Network, x: &[S], free: bool) -> Vec<Vec<S>> {
    assert_eq!(x.len(), net.input_len(), "reference: input length");
    let mut remaining = net.use_counts();
    let mut values: Vec<Vec<S>> = vec![x.to_vec()];
    for node in net.nodes() {
        // an elementwise layer whose first input nothing later reads
        // writes its output over that input's buffer (no fresh buffer to
        // fault in), each element from its own old value as below
        let v0 = node.inputs[0].0;
        let elementwise =
            matches!(node.layer, Layer::Affine(_) | Layer::Activation(_) | Layer::Add(_));
        let own =
            (free && elementwise && remaining[v0] == 1).then(|| std::mem::take(&mut values[v0]));
        let u = &values[v0];
        let in_shape = net.shape(node.inputs[0]);
        let y = match &node.layer {
            Layer::Dense(d) => dense(d, u),
            Layer::Affine(a) => par_map(u, own, a.spatial, |at, uc, yc| {
                let blocks = uc.chunks(a.spatial).zip(yc.chunks_mut(a.spatial));
                for (j, (ub, yb)) in blocks.enumerate() {
                    let k = at / a.spatial + j;
                    let (sc, sh) = (S::from_f64(a.scale[k]), S::from_f64(a.shift[k]));
                    for (y, &t) in yb.iter_mut().zip(ub) {
                        *y = sc * t + sh;
                    }
                }
            }),
            Layer::Activation(a) => {
                par_map(u, own, 1, |at, uc, yc| a.expr.eval_slice_at(at, uc, yc))
            }
            Layer::Reshape(_) => u.clone(),
            Layer::Conv(c) => match S::conv_fast(c, u) {
                Some(y) => y,
                None => conv_loops(c, u),
            },
            Layer::ConvTranspose(t) => {
                // the scatter form of the definition: every input element
                // adds weight × itself to the outputs its taps reach
                let c = &t.conv;
                let w = &c.window;
                let (cin_t, cout_t) = (c.c_out, c.c_in);
                let (coutg, cing) = (cout_t / c.groups, cin_t / c.groups);
                let mut y = vec![S::from_f64(0.0); cout_t * w.ih * w.iw];
                for ic in 0..cin_t {
                    let g = ic / cing;
                    for iy in 0..w.oh {
                        for ix in 0..w.ow {
                            let xv = u[(ic * w.oh + iy) * w.ow + ix];
                            for j in 0..coutg {
                                let oc = g * coutg + j;
                                for ky in 0..w.kh {
                                    let oy = (iy * w.sh + ky * w.dh) as isize - w.pt as isize;
                                    if oy < 0 || oy >= w.ih as isize {
                                        continue;
                                    }
                                    for kx in 0..w.kw {
                                        let ox = (ix * w.sw + kx * w.dw) as isize - w.pl as isize;
                                        if ox < 0 || ox >= w.iw as isize {
                                            continue;
                                        }
                                        let wt =
                                            c.weight[((ic * coutg + j) * w.kh + ky) * w.kw + kx];
                                        let o = (oc * w.ih + oy as usize) * w.iw + ox as usize;
                                        y[o] = y[o] + S::from_f64(wt) * xv;
                                    }
                                }
                            }
                        }
                    }
                }
                if let Some(b) = &t.bias {
                    let spatial = w.ih * w.iw;
                    for (k, v) in y.iter_mut().enumerate() {
                        *v = *v + S::from_f64(b[k / spatial]);
                    }
                }
                y
            }
            Layer::Pool(p) => {
                let w = &p.window;
                let mut y = vec![S::from_f64(0.0); p.channels * w.oh * w.ow];
                // one task per channel plane
                y.par_chunks_mut((w.oh * w.ow).max(1)).enumerate().for_each(|(ch, plane)| {
                    let mut y = plane.iter_mut();
                    for oy in 0..w.oh {
                        for ox in 0..w.ow {
                            let mut best: Option<S> = None;
                            let mut sum = S::from_f64(0.0);
                            let (mut inside, mut padded) = (0usize, 0usize);
                            for ky in 0..w.kh {
                                let py = oy * w.sh + ky * w.dh; // position in padded coordinates
                                for kx in 0..w.kw {
                                    let px = ox * w.sw + kx * w.dw;
                                    if py < w.ih + w.pt + w.pb && px < w.iw + w.pl + w.pr {
                                        padded += 1;
                                    }
                                    if py < w.pt
                                        || px < w.pl
                                        || py - w.pt >= w.ih
                                        || px - w.pl >= w.iw
                                    {
                                        continue;
                                    }
                                    let v = u[(ch * w.ih + py - w.pt) * w.iw + px - w.pl];
                                    inside += 1;
                                    sum = sum + v;
                                    // strict `>`: ties keep the first tap in window order
                                    if best.is_none_or(|b| v.value() > b.value()) {
                                        best = Some(v);
                                    }
                                }
                            }
                            *y.next().expect("one output per window") = match p.kind {
                                PoolKind::Max => best.expect("a pooling window inside the input"),
                                PoolKind::Average { count_include_pad } => {
                                    let d = if count_include_pad { padded } else { inside };
                                    sum / S::from_f64(d as f64)
                                }
                            };
                        }
                    }
                });
                y
            }
            // y = 0 + c_0·u_0, then y += c_k·u_k in input order
            Layer::Add(a) => par_map(u, own, 1, |at, u0, yc| {
                for (yi, &ui) in yc.iter_mut().zip(u0) {
                    *yi = S::from_f64(0.0) + S::from_f64(a.coeffs[0]) * ui;
                }
                for (k, v) in node.inputs.iter().enumerate().skip(1) {
                    for (yi, &ui) in yc.iter_mut().zip(&values[v.0][at..]) {
                        *yi = *yi + S::from_f64(a.coeffs[k]) * ui;
                    }
                }
            }),
            Layer::Concat(c) => {
                let outer: usize = in_shape[..c.axis].iter().product();
                let mut y = Vec::new();
                for o in 0..outer {
                    for v in &node.inputs {
                        let inner: usize = net.shape(*v)[c.axis..].iter().product();
                        y.extend_from_slice(&values[v.0][o * inner..(o + 1) * inner]);
                    }
                }
                y
            }
            Layer::Pad(p) => {
                let out_shape = net.shape(node.output);
                let numel: usize = out_shape.iter().product();
                let mut y = Vec::with_capacity(numel);
                for flat in 0..numel {
                    // decompose the output index, map each axis back
                    let mut rem = flat;
                    let mut src = 0usize;
                    let mut stride = 1usize;
                    let mut inside = true;
                    let mut coords = vec![0usize; out_shape.len()];
                    for ax in (0..out_shape.len()).rev() {
                        coords[ax] = rem % out_shape[ax];
                        rem /= out_shape[ax];
                    }
                    for ax in (0..out_shape.len()).rev() {
                        let d = in_shape[ax] as isize;
                        let mut i = coords[ax] as isize - p.begin[ax] as isize;
                        if i < 0 || i >= d {
                            match p.mode {
                                PadMode::Constant(_) => inside = false,
                                PadMode::Edge => i = i.clamp(0, d - 1),
                                PadMode::Reflect => i = if i < 0 { -i } else { 2 * (d - 1) - i },
                            }
                        }
                        src += i.max(0) as usize * stride;
                        stride *= in_shape[ax];
                    }
                    y.push(match (inside, p.mode) {
                        (false, PadMode::Constant(c)) => S::from_f64(c),
                        _ => u[src],
                    });
                }
                y
            }
            Layer::Transpose(t) => {
                let out_shape = net.shape(node.output);
                let rank = in_shape.len();
                let mut in_strides = vec![1usize; rank];
                for ax in (0..rank.saturating_sub(1)).rev() {
                    in_strides[ax] = in_strides[ax + 1] * in_shape[ax + 1];
                }
                let numel: usize = out_shape.iter().product();
                (0..numel)
                    .map(|flat| {
                        let mut rem = flat;
                        let mut src = 0;
                        for ax in (0..rank).rev() {
                            src += (rem % out_shape[ax]) * in_strides[t.perm[ax]];
                            rem /= out_shape[ax];
                        }
                        u[src]
                    })
                    .collect()
            }
            Layer::MatMul(_) => {
                let b = &values[node.inputs[1].0];
                let (batch, m, k, n) =
                    crate::network::MatMul::dims(in_shape, net.shape(node.inputs[1]));
                let mut y = Vec::with_capacity(batch * m * n);
                for t in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let mut acc = S::from_f64(0.0);
                            for q in 0..k {
                                acc = acc + u[(t * m + i) * k + q] * b[(t * k + q) * n + j];
                            }
                            y.push(acc);
                        }
                    }
                }
                y
            }
            Layer::Softmax(sm) => {
                let mut y = vec![S::from_f64(0.0); u.len()];
                for idx in sm.slices(in_shape) {
                    // shifted by the largest value, as every implementation
                    let top = idx.iter().map(|&i| u[i].value()).fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = S::from_f64(0.0);
                    for &i in &idx {
                        sum = sum + (u[i] - S::from_f64(top)).exp();
                    }
                    for &i in &idx {
                        let z = u[i] - S::from_f64(top);
                        y[i] = if sm.log { z - sum.ln() } else { z.exp() / sum };
                    }
                }
                y
            }
            Layer::Reduce(r) => {
                let out_len = net.numel(node.output);
                let mut y = vec![S::from_f64(0.0); out_len];
                for (i, t) in r.target(in_shape).into_iter().enumerate() {
                    y[t] = y[t] + u[i];
                }
                if r.mean {
                    let c = S::from_f64(1.0 / r.count(in_shape) as f64);
                    y.iter_mut().for_each(|v| *v = *v * c);
                }
                y
            }
            Layer::Product(_) => {
                let g = &values[node.inputs[1].0];
                let idx = crate::network::broadcast_index(in_shape, net.shape(node.inputs[1]));
                u.iter().zip(idx).map(|(&a, k)| a * g[k]).collect()
            }
            Layer::Select(sel) => sel
                .src
                .iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Some(j) => u[*j],
                    None => S::from_f64(sel.fill[i]),
                })
                .collect(),
            Layer::Lrn(l) => {
                let channels = in_shape[1];
                let spatial: usize = in_shape[2..].iter().product();
                let mut y = Vec::with_capacity(u.len());
                for c in 0..channels {
                    for s in 0..spatial {
                        let lo = c.saturating_sub((l.size - 1) / 2);
                        let hi = (c + (l.size - 1).div_ceil(2)).min(channels - 1);
                        let mut sq = S::from_f64(0.0);
                        for cc in lo..=hi {
                            let v = u[cc * spatial + s];
                            sq = sq + v * v;
                        }
                        let den = (S::from_f64(l.bias) + S::from_f64(l.alpha / l.size as f64) * sq)
                            .powf(l.beta);
                        y.push(u[c * spatial + s] / den);
                    }
                }
                y
            }
        };
        values.push(y);
        if free {
            for v in &node.inputs {
                remaining[v.0] -= 1;
                if remaining[v.0] == 0 {
                    values[v.0] = Vec::new();
                }
            }
        }
    }
    values
}

/// The convolution's definition as weight-stationary loops, for any
/// scalar: see the comments inside.
fn conv_loops<S: Scalar>(c: &crate::network::Conv, u: &[S]) -> Vec<S> {
    // Weight-stationary loops over blocks of output channels,
    // parallel over blocks: each input row is read once per
    // block (in cache) instead of once per channel. Each output
    // element still adds its bias, then its taps in (input
    // channel, ky, kx) order, skipping taps in the padding, so
    // the sums are the direct definition's, bit for bit; the
    // innermost loop runs along an output row.
    let w = &c.window;
    let cog = c.c_out / c.groups;
    let cig = c.c_in / c.groups;
    let plane = w.oh * w.ow;
    // a block's output planes within ~256 KB of f64, the block
    // inside one group (its channels read the same inputs)
    let mut block = (32_768 / plane.max(1)).clamp(1, 16).min(cog);
    while !cog.is_multiple_of(block) {
        block -= 1;
    }
    let mut y = vec![S::from_f64(0.0); c.c_out * plane];
    // the outputs o in [lo, hi) whose input o·s + off − p lies in [0, len)
    let range = |outs: usize, len: usize, s: usize, off: usize, p: usize| {
        let lo = if off >= p { 0 } else { (p - off).div_ceil(s) };
        let hi = if len + p > off { ((len + p - off - 1) / s + 1).min(outs) } else { 0 };
        (lo, hi)
    };
    y.par_chunks_mut((plane * block).max(1)).enumerate().for_each(|(bi, yb)| {
        let oc0 = bi * block;
        for (j, yo) in yb.chunks_mut(plane.max(1)).enumerate() {
            yo.fill(S::from_f64(c.bias.as_ref().map_or(0.0, |b| b[oc0 + j])));
        }
        // a strided input row, gathered once for the block
        let mut packed: Vec<S> = Vec::new();
        for icg in 0..cig {
            let ic = oc0 / cog * cig + icg;
            for ky in 0..w.kh {
                let (oy_lo, oy_hi) = range(w.oh, w.ih, w.sh, ky * w.dh, w.pt);
                for kx in 0..w.kw {
                    let off = kx * w.dw;
                    let (ox_lo, ox_hi) = range(w.ow, w.iw, w.sw, off, w.pl);
                    if ox_lo >= ox_hi || oy_lo >= oy_hi {
                        continue;
                    }
                    let wt = |j: usize| {
                        S::from_f64(c.weight[(((oc0 + j) * cig + icg) * w.kh + ky) * w.kw + kx])
                    };
                    // the input element of output (oy, ox_lo)
                    let at = |oy: usize| {
                        let iy = oy * w.sh + ky * w.dh - w.pt;
                        (ic * w.ih + iy) * w.iw + ox_lo * w.sw + off - w.pl
                    };
                    // whole rows, stride 1, equal widths: the
                    // tap's rows are one contiguous span of input
                    // and of output
                    if w.sw == 1 && w.sh == 1 && (ox_lo, ox_hi) == (0, w.ow) && w.iw == w.ow {
                        let (first, len) = (at(oy_lo), (oy_hi - oy_lo) * w.ow);
                        for (j, yo) in yb.chunks_mut(plane.max(1)).enumerate() {
                            S::axpy(
                                &mut yo[oy_lo * w.ow..oy_lo * w.ow + len],
                                &u[first..first + len],
                                wt(j),
                            );
                        }
                        continue;
                    }
                    let n = ox_hi - ox_lo;
                    for oy in oy_lo..oy_hi {
                        let first = at(oy);
                        let src: &[S] = if w.sw == 1 {
                            &u[first..first + n]
                        } else {
                            packed.clear();
                            packed.extend(u[first..].iter().step_by(w.sw).take(n));
                            &packed
                        };
                        for (j, yo) in yb.chunks_mut(plane.max(1)).enumerate() {
                            S::axpy(&mut yo[oy * w.ow + ox_lo..oy * w.ow + ox_hi], src, wt(j));
                        }
                    }
                }
            }
        }
    });
    y
}

/// Positions per task of [`conv_gemm`]: its im2col tile holds at most this
/// many entries (2 MB of `f64`, within a core's L2).
const GEMM_TILE: usize = 1 << 18;
/// Output channels per task of [`conv_gemm`].
const GEMM_CHANNELS: usize = 64;
/// im2col entries [`conv_gemm`] holds at once (8 MB of `f64`): the tiles
/// of a batch, each formed once for all its channel chunks.
const GEMM_SHARED: usize = 4 * GEMM_TILE;

/// The convolution in `f64` as an im2col and a GEMM per group: for a tile
/// of output positions, `Xᵀ` (positions × taps, taps in the padding 0)
/// times `Wᵀ` (taps × output channels), then the bias. Tasks are fixed
/// tiles of positions and channels (sized by the shape alone), each a
/// sequential GEMM, so the bits do not depend on the thread count; a
/// tile's `Xᵀ` is formed once and read by all its channels' tasks. The sums
/// are the definition's in another order: within `(taps + 1)·ε·Σ|w·u|` of
/// it (tested). The oracle owns this im2col; the compiled path's kernels
/// live in `nnlin-linalg`.
pub fn conv_gemm(c: &crate::network::Conv, u: &[f64]) -> Vec<f64> {
    use faer::{Accum, MatMut, MatRef, Par};
    let w = &c.window;
    let (cog, cig) = (c.c_out / c.groups, c.c_in / c.groups);
    let (plane, inplane) = (w.oh * w.ow, w.ih * w.iw);
    let taps = cig * w.kh * w.kw;
    let mut y = vec![0.0; c.c_out * plane];
    if plane == 0 || c.c_out == 0 {
        return y;
    }
    let tile = (GEMM_TILE / taps.max(1)).clamp(1, plane);
    // a pointwise, unstrided, unpadded convolution reads the input as is
    let direct = w.kh == 1
        && w.kw == 1
        && (w.sh, w.sw) == (1, 1)
        && (w.pt, w.pl) == (0, 0)
        && (w.oh, w.ow) == (w.ih, w.iw);
    let tiles = plane.div_ceil(tile);
    let chunks = cog.div_ceil(GEMM_CHANNELS);
    // each task's block of the output (positions p0.., channels oc0..),
    // borrowed from y seen as positions × channels: disjoint views, each
    // written by its task's GEMM in place; listed per tile `(g, t)`
    type Task<'a> = (usize, MatMut<'a, f64>);
    let mut per_tile: Vec<Vec<Task<'_>>> = (0..c.groups * tiles).map(|_| Vec::new()).collect();
    let mut rest = MatMut::from_column_major_slice_mut(&mut y, plane, c.c_out);
    for g in 0..c.groups {
        for k in 0..chunks {
            let cols = GEMM_CHANNELS.min(cog - k * GEMM_CHANNELS);
            let (mut chunk, r) = rest.split_at_col_mut(cols);
            rest = r;
            for t in 0..tiles {
                let rows = tile.min(plane - t * tile);
                let (block, r) = chunk.split_at_row_mut(rows);
                chunk = r;
                per_tile[g * tiles + t].push((k, block));
            }
        }
    }
    // the im2col of tile `(g, t)`: positions × taps, column-major
    let im2col = |g: usize, t: usize| -> Vec<f64> {
        let (p0, rows) = (t * tile, tile.min(plane - t * tile));
        let input = &u[g * cig * inplane..(g + 1) * cig * inplane];
        let mut cols_buf = vec![0.0; rows * taps];
        for icg in 0..cig {
            for ky in 0..w.kh {
                for kx in 0..w.kw {
                    let col = &mut cols_buf[((icg * w.kh + ky) * w.kw + kx) * rows..][..rows];
                    // the tile's positions, one output row segment
                    // at a time (no division per element)
                    let (mut oy, mut ox, mut r) = (p0 / w.ow, p0 % w.ow, 0);
                    while r < rows {
                        let seg = &mut col[r..r + (w.ow - ox).min(rows - r)];
                        let iy = (oy * w.sh + ky * w.dh).wrapping_sub(w.pt);
                        if iy < w.ih && w.sw == 1 {
                            // stride 1: the segment is one span of the
                            // padded row (zeros, a copy, zeros)
                            let row = &input[(icg * w.ih + iy) * w.iw..][..w.iw];
                            let start = ox + kx * w.dw;
                            let n = seg.len();
                            let lo = w.pl.saturating_sub(start).min(n);
                            let hi = (w.pl + w.iw).saturating_sub(start).clamp(lo, n);
                            seg.fill(0.0);
                            if lo < hi {
                                seg[lo..hi]
                                    .copy_from_slice(&row[start + lo - w.pl..start + hi - w.pl]);
                            }
                        } else if iy < w.ih {
                            let row = &input[(icg * w.ih + iy) * w.iw..][..w.iw];
                            for (j, v) in seg.iter_mut().enumerate() {
                                let ix = ((ox + j) * w.sw + kx * w.dw).wrapping_sub(w.pl);
                                *v = if ix < w.iw { row[ix] } else { 0.0 };
                            }
                        } else {
                            seg.fill(0.0);
                        }
                        r += seg.len();
                        (oy, ox) = (oy + 1, 0);
                    }
                }
            }
        }
        cols_buf
    };
    // tiles in batches of at most GEMM_SHARED im2col entries: a batch's
    // im2col tiles are formed in parallel, then every chunk's GEMM of
    // them reads its tile's (formed once, not once per chunk)
    let batch = if direct { per_tile.len() } else { (GEMM_SHARED / (tile * taps).max(1)).max(1) };
    let mut units = per_tile.into_iter().enumerate();
    loop {
        let now: Vec<(usize, Vec<Task<'_>>)> = units.by_ref().take(batch).collect();
        if now.is_empty() {
            break;
        }
        let formed: Vec<Vec<f64>> = if direct {
            vec![]
        } else {
            now.par_iter().map(|(i, _)| im2col(i / tiles, i % tiles)).collect()
        };
        let tasks: Vec<(usize, usize, Task<'_>)> = now
            .into_iter()
            .enumerate()
            .flat_map(|(slot, (i, ts))| ts.into_iter().map(move |task| (slot, i, task)))
            .collect();
        tasks.into_par_iter().for_each(|(slot, i, (k, mut block))| {
            let (g, t) = (i / tiles, i % tiles);
            let (p0, rows) = (t * tile, tile.min(plane - t * tile));
            let (c0, cols) = (k * GEMM_CHANNELS, GEMM_CHANNELS.min(cog - k * GEMM_CHANNELS));
            let xt: MatRef<'_, f64> = if direct {
                let input = &u[g * cig * inplane..(g + 1) * cig * inplane];
                MatRef::from_column_major_slice_with_stride(input, inplane, cig, inplane)
                    .subrows(p0, rows)
            } else {
                MatRef::from_column_major_slice(&formed[slot], rows, taps)
            };
            let oc0 = g * cog + c0;
            let wt = MatRef::from_column_major_slice(
                &c.weight[oc0 * taps..(oc0 + cols) * taps],
                taps,
                cols,
            );
            faer::linalg::matmul::matmul(block.as_mut(), Accum::Replace, xt, wt, 1.0, Par::Seq);
            for j in 0..cols {
                let b = c.bias.as_ref().map_or(0.0, |b| b[oc0 + j]);
                for d in block.as_mut().col_mut(j).iter_mut() {
                    *d += b;
                }
            }
        });
    }
    y
}

/// Outputs of a dense layer summed side by side ([`dense`]).
const DENSE_LANES: usize = 8;

/// A dense layer's output: each element its dot product in input order,
/// then the bias. [`DENSE_LANES`] outputs of a row are summed side by side,
/// each in its own accumulator (their adds are independent, so they
/// overlap instead of waiting on one another; each element's operations
/// are the same as alone), and tasks of whole groups run in parallel.
fn dense<S: Scalar>(d: &crate::network::Dense, u: &[S]) -> Vec<S> {
    let (n, outs) = (d.in_features, d.out_features);
    let bias = |o: usize| d.bias.as_ref().map_or(S::from_f64(0.0), |b| S::from_f64(b[o]));
    if n == 0 {
        // an empty dot product: one row of biases
        return (0..outs).map(bias).collect();
    }
    let mut y = vec![S::from_f64(0.0); u.len() / n * outs];
    if outs == 0 {
        return y;
    }
    let per_task = DENSE_LANES * (PAR_CHUNK / (DENSE_LANES * n)).max(1);
    y.par_chunks_mut(outs).zip(u.par_chunks(n)).for_each(|(yr, ur)| {
        yr.par_chunks_mut(per_task).enumerate().for_each(|(t, yt)| {
            for (g, yg) in yt.chunks_mut(DENSE_LANES).enumerate() {
                let o0 = t * per_task + g * DENSE_LANES;
                let mut acc = [S::from_f64(0.0); DENSE_LANES];
                let w = &d.weight[o0 * n..(o0 + yg.len()) * n];
                for (k, &uk) in ur.iter().enumerate() {
                    for (a, wo) in acc.iter_mut().zip(w.chunks_exact(n)) {
                        *a = *a + S::from_f64(wo[k]) * uk;
                    }
                }
                for (o, (yo, a)) in yg.iter_mut().zip(acc).enumerate() {
                    *yo = match &d.bias {
                        Some(b) => a + S::from_f64(b[o0 + o]),
                        None => a,
                    };
                }
            }
        });
    });
    y
}

/// Elements per task of [`par_map`].
const PAR_CHUNK: usize = 1 << 14;

/// A layer's elementwise output: `f(at, u[at..], y[at..])` over chunks of
/// whole blocks of `align` elements, in parallel (each element's
/// operations are the same whichever task runs them; `f` writes every
/// element of its chunk). With `own`, the input's own buffer (nothing
/// later reads it), the output is written over it, each chunk's `u` a copy
/// of its old values: the same values, no fresh buffer.
fn par_map<S: Scalar>(
    u: &[S],
    own: Option<Vec<S>>,
    align: usize,
    f: impl Fn(usize, &[S], &mut [S]) + Sync,
) -> Vec<S> {
    let align = align.max(1);
    let chunk = align * (PAR_CHUNK / align).max(1);
    match own {
        Some(mut y) => {
            y.par_chunks_mut(chunk).enumerate().for_each_init(Vec::new, |old, (k, yc)| {
                old.clear();
                old.extend_from_slice(yc);
                f(k * chunk, old, yc);
            });
            y
        }
        None => {
            let mut y = vec![S::from_f64(0.0); u.len()];
            y.par_chunks_mut(chunk).zip(u.par_chunks(chunk)).enumerate().for_each(
                |(k, (yc, uc))| {
                    f(k * chunk, uc, yc);
                },
            );
            y
        }
    }
}

/// Evaluates the network's output at `x`.
pub fn forward<S: Scalar>(net: &Network, x: &[S]) -> Vec<S> {
    let out: ValueId = net.output();
    run(net, x, true).swap_remove(out.0)
}

/// The output `F(x)` and the Jacobian `∂F/∂x` (row-major, `m × n`) by
/// forward-mode dual numbers: one pass per input element.
pub fn jacobian(net: &Network, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = x.len();
    let m = net.output_len();
    let mut jac = vec![0.0; m * n];
    let mut out = forward::<f64>(net, x);
    for j in 0..n {
        let xd: Vec<Dual> =
            x.iter().enumerate().map(|(i, &v)| Dual::new(v, f64::from(u8::from(i == j)))).collect();
        let y = forward(net, &xd);
        for (i, yi) in y.iter().enumerate() {
            jac[i * n + j] = yi.d;
        }
        if j == 0 {
            out = y.iter().map(|t| t.v).collect();
        }
    }
    (out, jac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Window;
    use crate::network::Conv;
    use proptest::prelude::*;

    /// The convolution's definition, one output element at a time: its
    /// bias, then every tap inside the input in (input channel, ky, kx)
    /// order.
    fn direct(c: &Conv, u: &[f64]) -> Vec<f64> {
        let w = &c.window;
        let (cog, cig) = (c.c_out / c.groups, c.c_in / c.groups);
        let mut y = vec![];
        for oc in 0..c.c_out {
            for oy in 0..w.oh {
                for ox in 0..w.ow {
                    let mut acc = c.bias.as_ref().map_or(0.0, |b| b[oc]);
                    for icg in 0..cig {
                        let ic = oc / cog * cig + icg;
                        for ky in 0..w.kh {
                            for kx in 0..w.kw {
                                let iy = (oy * w.sh + ky * w.dh) as isize - w.pt as isize;
                                let ix = (ox * w.sw + kx * w.dw) as isize - w.pl as isize;
                                if iy < 0 || ix < 0 || iy >= w.ih as isize || ix >= w.iw as isize {
                                    continue;
                                }
                                let wt = c.weight[((oc * cig + icg) * w.kh + ky) * w.kw + kx];
                                acc += wt * u[(ic * w.ih + iy as usize) * w.iw + ix as usize];
                            }
                        }
                    }
                    y.push(acc);
                }
            }
        }
        y
    }

    /// Every small row geometry, padding wider than the input included (an
    /// output row whose taps all lie in the padding): the GEMM path's
    /// im2col against the definition.
    #[test]
    fn conv_gemm_matches_on_every_small_padded_row() {
        for (iw, kw, pl, pr, dw, sw) in (1..4usize).flat_map(|iw| {
            (1..4usize).flat_map(move |kw| {
                (0..4usize).flat_map(move |pl| {
                    (0..4usize).flat_map(move |pr| {
                        (1..3usize)
                            .flat_map(move |dw| (1..3usize).map(move |sw| (iw, kw, pl, pr, dw, sw)))
                    })
                })
            })
        }) {
            let Some(window) =
                Window::new((2, iw), (1, kw), (1, sw), (1, dw), (1, pl, 0, pr), false)
            else {
                continue;
            };
            let conv = Conv {
                window,
                c_in: 2,
                c_out: 3,
                groups: 1,
                weight: std::sync::Arc::new((0..6 * kw).map(|i| i as f64 * 0.25 - 1.0).collect()),
                bias: Some(vec![0.5, -0.25, 1.0]),
                one_d: false,
            };
            let x: Vec<f64> = (0..2 * 2 * iw).map(|i| (i as f64 * 0.7).sin()).collect();
            let (got, want) = (conv_gemm(&conv, &x), direct(&conv, &x));
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-13, "{a} vs {b} at {:?}", (iw, kw, pl, pr, dw, sw));
            }
        }
    }

    /// Several position tiles (the last one partial), channel chunks and
    /// groups, padded and strided: the GEMM path stays within its bound.
    #[test]
    fn conv_gemm_tiles_and_chunks_match_the_definition() {
        for (stride, pad) in [(1, 1), (2, 0)] {
            let window = Window::new(
                (40, 40),
                (3, 3),
                (stride, stride),
                (1, 1),
                (pad, pad, pad, pad),
                false,
            )
            .expect("a window");
            let (groups, cig, cog) = (2, 150, 70);
            let taps = cig * 9;
            assert!(window.oh * window.ow > GEMM_TILE / taps && cog > GEMM_CHANNELS);
            let mut s = 7u64;
            let mut next = move || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            };
            let conv = Conv {
                window,
                c_in: groups * cig,
                c_out: groups * cog,
                groups,
                weight: std::sync::Arc::new((0..groups * cog * taps).map(|_| next()).collect()),
                bias: Some((0..groups * cog).map(|_| next()).collect()),
                one_d: false,
            };
            let x: Vec<f64> = (0..groups * cig * 1600).map(|_| next()).collect();
            let (got, want) = (conv_gemm(&conv, &x), direct(&conv, &x));
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-12, "{worst:e}");
        }
    }

    proptest! {
        /// A dense layer's outputs, summed side by side, have the bits of
        /// each one's dot product alone (input order, then the bias).
        #[test]
        fn dense_equals_its_definition(
            rows in 1usize..3, n in 0usize..40, outs in 1usize..30, bias: bool, seed in 0u64..1000,
        ) {
            let mut s = seed;
            let mut next = move || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            };
            let d = crate::network::Dense {
                out_features: outs,
                in_features: n,
                weight: (0..outs * n).map(|_| next()).collect(),
                bias: bias.then(|| (0..outs).map(|_| next()).collect()),
            };
            let u: Vec<f64> = (0..rows * n).map(|_| next()).collect();
            // (with no inputs, one row: the biases)
            let got = dense(&d, &u);
            let rows = if n == 0 { 1 } else { rows };
            prop_assert_eq!(got.len(), rows * outs);
            for (ro, g) in got.iter().enumerate() {
                let (r, o) = (ro / outs, ro % outs);
                let mut acc = 0.0;
                for k in 0..n {
                    acc += d.weight[o * n + k] * u[r * n + k];
                }
                if let Some(b) = &d.bias {
                    acc += b[o];
                }
                prop_assert_eq!(g.to_bits(), acc.to_bits());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The weight-stationary loops give the definition's sums bit for
        /// bit, on any geometry; the f64 GEMM path is within its bound.
        #[test]
        fn conv_equals_its_definition(
            groups in 1usize..3, cig in 1usize..3, cog in 1usize..10,
            ih in 1usize..9, iw in 1usize..24, kh in 1usize..4, kw in 1usize..4,
            sh in 1usize..3, sw in 1usize..4, dh in 1usize..3, dw in 1usize..3,
            pads in (0usize..3, 0usize..3, 0usize..3, 0usize..3), bias: bool, seed in 0u64..1000,
        ) {
            let Some(window) = Window::new((ih, iw), (kh, kw), (sh, sw), (dh, dw), pads, false)
            else { return Ok(()) };
            let (c_in, c_out) = (groups * cig, groups * cog);
            let mut s = seed;
            let mut next = move || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            };
            let weight: Vec<f64> = (0..c_out * cig * kh * kw).map(|_| next()).collect();
            let conv = Conv {
                window,
                c_in,
                c_out,
                groups,
                weight: std::sync::Arc::new(weight),
                bias: bias.then(|| (0..c_out).map(|_| next()).collect()),
                one_d: false,
            };
            let x: Vec<f64> = (0..c_in * ih * iw).map(|_| next()).collect();
            let mut net = Network::new(vec![1, c_in, ih, iw]);
            net.push("conv", "Conv", Layer::Conv(conv.clone()), vec![ValueId(0)]).unwrap();
            let want = direct(&conv, &x);
            let loops = conv_loops(&conv, &x);
            prop_assert_eq!(loops.len(), want.len());
            for (a, b) in loops.iter().zip(&want) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
            // the f64 GEMM path (what `forward` runs): the same sums in
            // another order, within (taps + 2)·ε·(|b| + Σ|w·u|)
            let got = forward(&net, &x);
            let abs = Conv {
                weight: std::sync::Arc::new(conv.weight.iter().map(|v| v.abs()).collect()),
                bias: conv.bias.as_ref().map(|b| b.iter().map(|v| v.abs()).collect()),
                ..conv.clone()
            };
            let mag = direct(&abs, &x.iter().map(|v| v.abs()).collect::<Vec<_>>());
            let gamma = (cig * kh * kw + 2) as f64 * f64::EPSILON;
            prop_assert_eq!(got.len(), want.len());
            for ((a, b), m) in got.iter().zip(&want).zip(&mag) {
                prop_assert!((a - b).abs() <= gamma * m, "{a} vs {b}");
            }
        }
    }
}
