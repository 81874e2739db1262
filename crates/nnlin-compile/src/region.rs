//! Lemma 1 of the source paper: the linear region around an instance.
//!
//! Inside the region every activation unit stays on its linear piece and
//! every max-pool window keeps its argmax, so `F = W·x' + b` there. Each
//! piece boundary is a hyperplane in input space, `g·x' + h = 0`, where `g`
//! is the input gradient of a unit's pre-activation minus a breakpoint (or
//! of the difference between a max-pool window's selected value and another
//! candidate). The largest ℓ2 ball around `x` in the region has radius
//! `min |g·x + h| / ‖g‖₂`, the largest ℓ∞ ball `min |g·x + h| / ‖g‖₁`.
//!
//! Rules (see `docs/ARCHITECTURE.md`, "Linear regions"):
//! - a boundary with `g = 0` is never crossed and is skipped: a unit whose
//!   pre-activation is constant, or two max-pool candidates whose values
//!   move together (a tie among inactive units): crossing them leaves the
//!   linear map unchanged;
//! - a unit exactly on a breakpoint with `g ≠ 0` (or a max-pool tie between
//!   values that move differently) puts `x` on a boundary: the radius is 0.
//!   They are counted, and the radius over the remaining boundaries is
//!   reported as its own figure.
//!
//! All gradients come from forward accumulation over column blocks of the
//! identity, so memory stays bounded by one block per live value.

use std::ops::Range;

use faer::Par;
use nnlin_ir::{Layer, Network, PoolKind};
use nnlin_linalg::Block;
use nnlin_linalg::Operator;

use std::borrow::Cow;

use crate::{Instance, NodeId, Tangent};

/// What a boundary belongs to.
#[derive(Clone, Debug, PartialEq)]
pub enum BoundaryKind {
    /// An activation unit reaching breakpoint `at`.
    Unit {
        /// Element index in the layer's input.
        index: usize,
        /// The breakpoint.
        at: f64,
    },
    /// A max-pool window whose argmax `selected` would give way to `other`.
    PoolTie {
        /// Output element of the pooling layer.
        output: usize,
        /// Input index selected now.
        selected: usize,
        /// The competing input index.
        other: usize,
    },
    /// A face of the input box.
    Box {
        /// Input element.
        index: usize,
    },
}

/// The closest boundary in one norm.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// Node (layer) name; `input box` for a box face.
    pub layer: String,
    /// Which boundary.
    pub kind: BoundaryKind,
    /// Distance.
    pub distance: f64,
}

/// The linear region of one instance.
#[derive(Clone, Debug)]
pub struct Region {
    /// Radius of the largest ℓ2 ball in the region (0 if `x` is on a kink).
    pub radius_l2: f64,
    /// Radius of the largest ℓ∞ ball.
    pub radius_linf: f64,
    /// ℓ2 radius over the boundaries that do not pass through `x`.
    pub radius_l2_excluding_kinks: f64,
    /// ℓ∞ radius over the boundaries that do not pass through `x`.
    pub radius_linf_excluding_kinks: f64,
    /// Units (and max-pool ties) exactly on a boundary.
    pub units_at_kink: usize,
    /// Boundaries examined (with a nonzero gradient).
    pub boundaries: usize,
    /// The binding boundary in ℓ2 (among the non-kink ones).
    pub binding_l2: Option<Binding>,
    /// The binding boundary in ℓ∞ (among the non-kink ones).
    pub binding_linf: Option<Binding>,
    /// The boundaries through `x` (node and boundary).
    pub kinks: Vec<(NodeId, BoundaryKind)>,
    /// Unit ℓ2 direction from `x` to the ℓ2-binding boundary.
    pub direction_l2: Vec<f64>,
    /// ℓ∞ direction (a vertex of the unit cube) to the ℓ∞-binding boundary.
    pub direction_linf: Vec<f64>,
}

/// Why a region cannot be computed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum RegionError {
    /// A smooth activation (or LRN): no linear region.
    #[error("layer `{0}` is smooth: a smooth network has no linear region")]
    Smooth(String),
    /// A piecewise-linear expression whose breakpoints nnlin does not know.
    #[error("layer `{0}`: the breakpoints of this piecewise-linear expression are not known")]
    UnknownBreakpoints(String),
    /// A max-pool layer whose compiled operator is not a selection (a
    /// compiler invariant broken; reported rather than panicking).
    #[error("layer `{0}`: a max-pool compiled to something other than a selection")]
    NotASelection(String),
}

/// What of a compiled layer makes up the activation pattern.
enum Pattern<'a> {
    /// An activation's slopes (the layer keeps its `active` mask).
    Slopes(&'a [f64]),
    /// A max-pool's selected inputs, one per output.
    Selected(&'a [usize]),
    /// Neither: the layer is the same linear map at every input.
    Fixed,
}

impl<'a> Pattern<'a> {
    fn of(l: &'a crate::CompiledLayer) -> Self {
        match &*l.inputs[0].1 {
            Operator::Diagonal(d) if l.active.is_some() => Pattern::Slopes(d.as_slice()),
            Operator::Selection(s) if l.layer_kind == "maxpool" => Pattern::Selected(s.cols()),
            Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Dense(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Conv(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_)
            | Operator::Transposed(_) => Pattern::Fixed,
        }
    }
}

/// One boundary being measured: its signed offset `s = g·x + h` and the rows
/// of the tangent whose difference is `g`.
struct Pending {
    layer: NodeId,
    kind: BoundaryKind,
    plus: usize,
    minus: Option<usize>,
    offset: f64,
    l2sq: f64,
    l1: f64,
}

/// Forward accumulation over the input columns `cols`: calls `visit(k,
/// tangents)` before node `k` with the tangent blocks (`numel × cols.len()`)
/// of its inputs. The compiler's one forward pass (`forward_pass`),
/// started from those columns of the identity.
pub fn forward_blocks(
    inst: &Instance,
    cols: Range<usize>,
    par: Par,
    mut visit: impl FnMut(NodeId, &[&Block]),
) {
    let n = inst.input_len;
    let t0 = Block::from_fn(n, cols.len(), |i, j| f64::from(u8::from(i == cols.start + j)));
    let last = crate::ValueId(inst.value_lens.len().saturating_sub(1));
    crate::forward_pass(inst, Tangent::Dense(t0), last, false, par, &mut |k, tans| {
        // from a block, every tangent is a block; the identity (as a
        // block of these columns) would read the same
        let blocks: Vec<Cow<'_, Block>> = tans
            .iter()
            .map(|t| match t {
                Tangent::Dense(b) => Cow::Borrowed(b),
                Tangent::Identity => Cow::Owned(Block::from_fn(n, cols.len(), |i, j| {
                    f64::from(u8::from(i == cols.start + j))
                })),
            })
            .collect();
        let refs: Vec<&Block> = blocks.iter().map(|b| &**b).collect();
        visit(k, &refs);
    });
}

/// Computes the region of `inst` (compiled in tangent mode at `x`) of the
/// network `net`. `input_box` bounds every input element. Column blocks of
/// `block` inputs bound the memory.
pub fn region(
    net: &Network,
    inst: &Instance,
    x: &[f64],
    input_box: Option<(f64, f64)>,
    block: usize,
    par: Par,
) -> Result<Region, RegionError> {
    let values = inst.values(x);
    let mut pending: Vec<Pending> = vec![];
    let mut kinks = 0usize;
    for (k, (node, layer)) in net.nodes().iter().zip(&inst.layers).enumerate() {
        let k = NodeId(k);
        let v = node.inputs[0].0;
        let u = &values[v];
        match &node.layer {
            Layer::Activation(a) => {
                if !a.is_piecewise_linear() {
                    return Err(RegionError::Smooth(node.name.clone()));
                }
                for (i, &z) in u.iter().enumerate() {
                    let bps = a
                        .expr
                        .breakpoints(i)
                        .ok_or_else(|| RegionError::UnknownBreakpoints(node.name.clone()))?;
                    for at in bps {
                        pending.push(Pending {
                            layer: k,
                            kind: BoundaryKind::Unit { index: i, at },
                            plus: i,
                            minus: None,
                            offset: z - at,
                            l2sq: 0.0,
                            l1: 0.0,
                        });
                    }
                }
            }
            Layer::Pool(p) if p.kind == PoolKind::Max => {
                let Pattern::Selected(selected) = Pattern::of(layer) else {
                    return Err(RegionError::NotASelection(node.name.clone()));
                };
                let w = &p.window;
                for ch in 0..p.channels {
                    for oy in 0..w.oh {
                        for ox in 0..w.ow {
                            let o = (ch * w.oh + oy) * w.ow + ox;
                            let s = selected[o];
                            for ky in 0..w.kh {
                                let Some(iy) = w.iy(oy, ky) else { continue };
                                for kx in 0..w.kw {
                                    let Some(ix) = w.ix(ox, kx) else { continue };
                                    let j = (ch * w.ih + iy) * w.iw + ix;
                                    if j == s {
                                        continue;
                                    }
                                    pending.push(Pending {
                                        layer: k,
                                        kind: BoundaryKind::PoolTie {
                                            output: o,
                                            selected: s,
                                            other: j,
                                        },
                                        plus: s,
                                        minus: Some(j),
                                        offset: u[s] - u[j],
                                        l2sq: 0.0,
                                        l1: 0.0,
                                    });
                                }
                            }
                        }
                    }
                }
            }
            // a product of two tensors is not piecewise linear: no region
            Layer::Lrn(_) | Layer::Product(_) | Layer::Softmax(_) | Layer::MatMul(_) => {
                return Err(RegionError::Smooth(node.name.clone()));
            }
            // fixed linear maps (and average pooling): no boundary
            Layer::Dense(_)
            | Layer::Affine(_)
            | Layer::Reshape(_)
            | Layer::Conv(_)
            | Layer::ConvTranspose(_)
            | Layer::Pool(_)
            | Layer::Add(_)
            | Layer::Concat(_)
            | Layer::Pad(_)
            | Layer::Transpose(_)
            | Layer::Select(_)
            | Layer::Reduce(_) => {}
        }
    }
    // gradient norms, one column block at a time
    let n = inst.input_len;
    let block = block.max(1);
    let mut by_layer: Vec<Vec<usize>> = vec![vec![]; inst.layers.len()];
    for (q, p) in pending.iter().enumerate() {
        by_layer[p.layer.0].push(q);
    }
    let mut start = 0;
    while start < n {
        let cols = start..(start + block).min(n);
        forward_blocks(inst, cols, par, |k, tans| {
            let t = tans[0];
            for &q in &by_layer[k.0] {
                let p = &mut pending[q];
                for c in 0..t.ncols() {
                    let g = t[(p.plus, c)] - p.minus.map_or(0.0, |m| t[(m, c)]);
                    p.l2sq += g * g;
                    p.l1 += g.abs();
                }
            }
        });
        start += block;
    }
    // distances
    let mut best_l2: Option<(f64, usize)> = None;
    let mut best_l1: Option<(f64, usize)> = None;
    let mut boundaries = 0;
    let mut kink_list = vec![];
    for (q, p) in pending.iter().enumerate() {
        if p.l2sq == 0.0 {
            continue; // never crossed; crossing it would not change the map
        }
        boundaries += 1;
        if p.offset == 0.0 {
            kinks += 1;
            kink_list.push((p.layer, p.kind.clone()));
            continue;
        }
        let d2 = p.offset.abs() / p.l2sq.sqrt();
        let d1 = p.offset.abs() / p.l1;
        if best_l2.is_none_or(|(d, _)| d2 < d) {
            best_l2 = Some((d2, q));
        }
        if best_l1.is_none_or(|(d, _)| d1 < d) {
            best_l1 = Some((d1, q));
        }
    }
    let name = |k: NodeId| inst.layers[k.0].name.clone();
    let mut binding_l2 = best_l2.map(|(d, q)| Binding {
        layer: name(pending[q].layer),
        kind: pending[q].kind.clone(),
        distance: d,
    });
    let mut binding_linf = best_l1.map(|(d, q)| Binding {
        layer: name(pending[q].layer),
        kind: pending[q].kind.clone(),
        distance: d,
    });
    let mut dir_l2 = vec![0.0; n];
    let mut dir_linf = vec![0.0; n];
    // the binding boundaries' gradients: one more pass
    for (best, dir, l2) in [(best_l2, &mut dir_l2, true), (best_l1, &mut dir_linf, false)] {
        let Some((_, q)) = best else { continue };
        let p = &pending[q];
        let mut g = vec![0.0; n];
        let mut start = 0;
        while start < n {
            let cols = start..(start + block).min(n);
            let c0 = cols.start;
            forward_blocks(inst, cols, par, |k, tans| {
                if k == p.layer {
                    let t = tans[0];
                    for c in 0..t.ncols() {
                        g[c0 + c] = t[(p.plus, c)] - p.minus.map_or(0.0, |m| t[(m, c)]);
                    }
                }
            });
            start += block;
        }
        // move so that the offset shrinks toward 0
        let sign = -p.offset.signum();
        if l2 {
            let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (d, gi) in dir.iter_mut().zip(&g) {
                *d = sign * gi / norm;
            }
        } else {
            for (d, gi) in dir.iter_mut().zip(&g) {
                *d = if *gi == 0.0 { 0.0 } else { sign * gi.signum() };
            }
        }
    }
    let mut r2 = best_l2.map_or(f64::INFINITY, |b| b.0);
    let mut r1 = best_l1.map_or(f64::INFINITY, |b| b.0);
    if let Some((lo, hi)) = input_box {
        let (mut bd, mut bi, mut up) = (f64::INFINITY, 0, false);
        for (i, &xi) in x.iter().enumerate() {
            let (a, b) = ((xi - lo).max(0.0), (hi - xi).max(0.0));
            if a < bd {
                (bd, bi, up) = (a, i, false);
            }
            if b < bd {
                (bd, bi, up) = (b, i, true);
            }
        }
        let face = Binding {
            layer: "input box".into(),
            kind: BoundaryKind::Box { index: bi },
            distance: bd,
        };
        let unit = |d: &mut Vec<f64>| {
            d.iter_mut().for_each(|v| *v = 0.0);
            d[bi] = if up { 1.0 } else { -1.0 };
        };
        if bd < r2 {
            r2 = bd;
            binding_l2 = Some(face.clone());
            unit(&mut dir_l2);
        }
        if bd < r1 {
            r1 = bd;
            binding_linf = Some(face);
            unit(&mut dir_linf);
        }
    }
    let strict = |r: f64| if kinks > 0 { 0.0 } else { r };
    Ok(Region {
        radius_l2: strict(r2),
        radius_linf: strict(r1),
        radius_l2_excluding_kinks: r2,
        radius_linf_excluding_kinks: r1,
        units_at_kink: kinks,
        kinks: kink_list,
        boundaries,
        binding_l2,
        binding_linf,
        direction_l2: dir_l2,
        direction_linf: dir_linf,
    })
}

/// Whether two instances of the same network share their activation
/// pattern (every activation slope and every max-pool selection), ignoring
/// the units and windows listed in `ignore` (a region's kinks).
pub fn same_pattern(a: &Instance, b: &Instance, ignore: &[(NodeId, BoundaryKind)]) -> bool {
    for (k, (la, lb)) in a.layers.iter().zip(&b.layers).enumerate() {
        let k = NodeId(k);
        let skip = |i: usize| {
            ignore.iter().any(|(l, kind)| {
                *l == k
                    && match kind {
                        BoundaryKind::Unit { index, .. } => *index == i,
                        BoundaryKind::PoolTie { output, .. } => *output == i,
                        BoundaryKind::Box { .. } => false,
                    }
            })
        };
        let differs = match (Pattern::of(la), Pattern::of(lb)) {
            (Pattern::Slopes(x), Pattern::Slopes(y)) => {
                x.iter().zip(y).enumerate().any(|(i, (p, q))| p != q && !skip(i))
            }
            (Pattern::Selected(x), Pattern::Selected(y)) => {
                x.iter().zip(y).enumerate().any(|(i, (p, q))| p != q && !skip(i))
            }
            (Pattern::Fixed, Pattern::Fixed) => false,
            // one network's layer compiled to different kinds: not shown
            // to be the same pattern
            (Pattern::Slopes(_), Pattern::Selected(_) | Pattern::Fixed)
            | (Pattern::Selected(_), Pattern::Slopes(_) | Pattern::Fixed)
            | (Pattern::Fixed, Pattern::Slopes(_) | Pattern::Selected(_)) => true,
        };
        if differs {
            return false;
        }
    }
    true
}
