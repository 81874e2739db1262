//! A graph pass: composite ONNX operators rewritten into primitive ones the
//! importer already lowers exactly, before they are imported. Each rewrite
//! reads the shapes (and constant inputs) known at that point of the graph
//! and emits ordinary nodes and constants:
//!
//! - `Einsum` with one or two operands, where it is a (batched) matrix
//!   product, a transpose or a sum: `ReduceSum`, `Transpose`, `Reshape` and
//!   `MatMul`.
//! - `Resize` (opsets 10–21) and `Upsample`: nearest modes become a `Gather`
//!   per resized axis (a selection); linear and cubic modes a `MatMul` by the
//!   fixed interpolation matrix of each resized axis (moved last by a
//!   `Transpose`), with ONNX's coordinate transformations and edge clamping.
//! - `ReduceMax`/`ReduceMin`: the reduced axes moved last and flattened, then
//!   a `MaxPool` over them (PyTorch's max-pool convention at ties: the first
//!   maximum), `Neg` on both sides for the minimum.
//! - 3-D `Conv`: for each output depth, the sum over the kernel's depth taps
//!   of 2-D convolutions of input depth slices (`Gather`) by the kernel's
//!   depth slices, concatenated along depth.
//! - 3-D pools: separable, a 2-D pool over (height, width) with depth folded
//!   into the channels, then a pool over depth: a box's maximum is the
//!   maximum over depth of the per-slice maxima, picking the same first
//!   maximum in (d, h, w) order as PyTorch; a box's average, with or without
//!   the padding counted, is the average over depth of the per-slice
//!   averages, since the valid count of a box is the product of its axes'.

use crate::proto::{AttributeProto, NodeProto};
use crate::tensor::Tensor;
use crate::{attr, attr_i, attr_s};

/// Nodes and constants that replace one node; the last node writes the
/// original node's output.
pub(crate) struct Expansion {
    pub nodes: Vec<NodeProto>,
    pub consts: Vec<(String, Tensor)>,
}

/// What a rewrite may read of the graph imported so far.
pub(crate) struct Ctx<'a> {
    /// The shape of a defined name.
    pub shape: &'a dyn Fn(&str) -> Option<Vec<usize>>,
    /// The value of a defined constant.
    pub constant: &'a dyn Fn(&str) -> Option<Tensor>,
    pub opset: i64,
    /// Bytes a generated constant may take.
    pub budget: usize,
}

/// The most nodes one rewrite may emit (a 3-D convolution emits one 2-D
/// convolution per output depth and depth tap).
const MAX_NODES: usize = 1 << 16;

/// The operators this pass rewrites.
pub(crate) const EXPANDED: &[&str] = &["Einsum", "ReduceMax", "ReduceMin", "Resize", "Upsample"];

/// The rewrite of `node`, or `None` if its operator is not rewritten here.
/// `Err` carries the reason the node cannot be rewritten.
pub(crate) fn expand(node: &NodeProto, ctx: &Ctx<'_>) -> Result<Option<Expansion>, String> {
    let op = node.op_type.as_deref().unwrap_or("");
    let volumetric =
        matches!(op, "Conv" | "MaxPool" | "AveragePool" | "GlobalMaxPool" | "GlobalAveragePool")
            && node.input.first().and_then(|x| (ctx.shape)(x)).is_some_and(|s| s.len() == 5);
    if !EXPANDED.contains(&op) && !volumetric {
        return Ok(None);
    }
    let out = node.output.first().filter(|o| !o.is_empty()).ok_or("the node has no output")?;
    let mut b = Builder { base: out.clone(), k: 0, nodes: vec![], consts: vec![] };
    let input = |i: usize| node.input.get(i).filter(|s| !s.is_empty()).cloned();
    let x = input(0).ok_or("missing input 0")?;
    let shape_of = |name: &str| (ctx.shape)(name).ok_or(format!("`{name}` is not defined"));
    let last = match op {
        "Einsum" => einsum(node, ctx, &mut b)?,
        "ReduceMax" | "ReduceMin" => {
            let axes = match attr(node, "axes") {
                Some(a) => Some(a.ints.clone()),
                None => input(1)
                    .map(|n| (ctx.constant)(&n).map(|t| t.as_ints()))
                    .map(|a| a.ok_or_else(|| "the axes must be a constant".to_string()))
                    .transpose()?,
            };
            let noop = attr_i(node, "noop_with_empty_axes", 0) != 0;
            let keep = attr_i(node, "keepdims", 1) != 0;
            reduce_max(&x, &shape_of(&x)?, axes, noop, keep, op == "ReduceMin", &mut b)?
        }
        "Conv" => conv3d(node, ctx, &x, &shape_of(&x)?, &mut b)?,
        "MaxPool" | "AveragePool" | "GlobalMaxPool" | "GlobalAveragePool" => {
            pool3d(node, &x, &shape_of(&x)?, &mut b)?
        }
        _ => resize(node, ctx, &x, &shape_of(&x)?, &mut b)?,
    };
    b.node("Identity", vec![last], vec![], Some(out.clone()));
    let bytes: usize = b.consts.iter().map(|(_, t)| t.numel().saturating_mul(8)).sum();
    if bytes > ctx.budget {
        return Err(format!(
            "its constants need {bytes} bytes, over the memory budget of {} bytes",
            ctx.budget
        ));
    }
    Ok(Some(Expansion { nodes: b.nodes, consts: b.consts }))
}

struct Builder {
    base: String,
    k: usize,
    nodes: Vec<NodeProto>,
    consts: Vec<(String, Tensor)>,
}

impl Builder {
    fn fresh(&mut self, what: &str) -> String {
        self.k += 1;
        format!("{}::{what}.{}", self.base, self.k)
    }

    fn konst(&mut self, t: Tensor) -> String {
        let name = self.fresh("const");
        self.consts.push((name.clone(), t));
        name
    }

    fn node(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attribute: Vec<AttributeProto>,
        out: Option<String>,
    ) -> String {
        let out = out.unwrap_or_else(|| self.fresh(&op.to_lowercase()));
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![out.clone()],
            name: Some(out.clone()),
            op_type: Some(op.into()),
            attribute,
            ..Default::default()
        });
        out
    }

    fn reshape(&mut self, x: String, dims: &[usize]) -> String {
        let shape = self.konst(Tensor::ints(&dims.iter().map(|&d| d as i64).collect::<Vec<_>>()));
        self.node("Reshape", vec![x, shape], vec![], None)
    }

    /// `x` transposed by `perm`, or `x` itself for the identity.
    fn transpose(&mut self, x: String, perm: &[usize]) -> String {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return x;
        }
        self.node("Transpose", vec![x], vec![ints("perm", perm)], None)
    }
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: v.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(2), i: Some(v), ..Default::default() }
}

fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let r = rank as i64;
        let b = if a < 0 { a + r } else { a };
        if !(0..r).contains(&b) {
            return Err(format!("axis {a} out of range for rank {rank}"));
        }
        out.push(b as usize);
    }
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("duplicate axes {axes:?}"));
    }
    Ok(out)
}

/// `ReduceMax` (or `ReduceMin`) as a max-pool over the reduced axes.
fn reduce_max(
    x: &str,
    shape: &[usize],
    axes: Option<Vec<i64>>,
    noop: bool,
    keep: bool,
    min: bool,
    b: &mut Builder,
) -> Result<String, String> {
    let rank = shape.len();
    let axes = match axes {
        Some(a) if !a.is_empty() => norm_axes(&a, rank)?,
        _ if noop => return Ok(x.to_string()),
        _ => (0..rank).collect(),
    };
    let kept: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
    let len: usize = axes.iter().map(|&a| shape[a]).product();
    let outer: usize = kept.iter().map(|&a| shape[a]).product();
    if len == 0 {
        return Err("a reduction over an empty axis".into());
    }
    let mut v = x.to_string();
    if min {
        v = b.node("Neg", vec![v], vec![], None);
    }
    let perm: Vec<usize> = kept.iter().chain(&axes).copied().collect();
    v = b.transpose(v, &perm);
    v = b.reshape(v, &[1, outer, 1, len]);
    v = b.node("MaxPool", vec![v], vec![ints("kernel_shape", &[1, len])], None);
    let out: Vec<usize> = if keep {
        (0..rank).map(|a| if axes.contains(&a) { 1 } else { shape[a] }).collect()
    } else {
        kept.iter().map(|&a| shape[a]).collect()
    };
    v = b.reshape(v, &out);
    if min {
        v = b.node("Neg", vec![v], vec![], None);
    }
    Ok(v)
}

/// The labels of one Einsum term, `...` replaced by `rank − explicit`
/// broadcast labels (`'0'`, `'1'`, … aligned right).
fn labels(term: &str, rank: Option<usize>, ell: usize) -> Result<Vec<char>, String> {
    let explicit: Vec<char> = term.chars().filter(|c| c.is_ascii_alphabetic()).collect();
    if !term.chars().all(|c| c.is_ascii_alphabetic() || c == '.') {
        return Err(format!("term `{term}` has characters other than letters and `...`"));
    }
    let Some(pos) = term.find("...") else {
        if term.contains('.') {
            return Err(format!("term `{term}`: a `.` outside `...`"));
        }
        return Ok(explicit);
    };
    let n = match rank {
        Some(r) => {
            r.checked_sub(explicit.len()).ok_or(format!("term `{term}` has too many labels"))?
        }
        None => ell,
    };
    let before = term[..pos].chars().filter(|c| c.is_ascii_alphabetic()).count();
    let mut out = explicit[..before].to_vec();
    out.extend((ell - n..ell).map(|i| char::from(b'0' + i as u8)));
    out.extend(&explicit[before..]);
    Ok(out)
}

fn einsum(node: &NodeProto, ctx: &Ctx<'_>, b: &mut Builder) -> Result<String, String> {
    let eq: String = attr_s(node, "equation")
        .ok_or("no equation")?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    let names: Vec<String> = node.input.iter().filter(|s| !s.is_empty()).cloned().collect();
    if terms.len() != names.len() || !(1..=2).contains(&names.len()) {
        return Err(format!(
            "{} terms for {} inputs (one or two are supported)",
            terms.len(),
            names.len()
        ));
    }
    let shapes: Vec<Vec<usize>> = names
        .iter()
        .map(|n| (ctx.shape)(n).ok_or(format!("`{n}` is not defined")))
        .collect::<Result<_, _>>()?;
    // the broadcast (ellipsis) rank: the largest any term takes
    let mut ell = 0;
    for (t, s) in terms.iter().zip(&shapes) {
        if t.contains("...") {
            let explicit = t.chars().filter(|c| c.is_ascii_alphabetic()).count();
            ell = ell.max(
                s.len().checked_sub(explicit).ok_or(format!("term `{t}` has too many labels"))?,
            );
        }
    }
    if ell > 10 {
        return Err("more than 10 broadcast axes".into());
    }
    let mut ops: Vec<Vec<char>> = Vec::new();
    let mut dims: std::collections::BTreeMap<char, usize> = Default::default();
    for (t, s) in terms.iter().zip(&shapes) {
        let l = labels(t, Some(s.len()), ell)?;
        if l.len() != s.len() {
            return Err(format!(
                "term `{t}` has {} labels for a tensor of rank {}",
                l.len(),
                s.len()
            ));
        }
        for (i, &c) in l.iter().enumerate() {
            if l[..i].contains(&c) {
                return Err(format!("label `{c}` repeats within `{t}` (a diagonal)"));
            }
            match dims.insert(c, s[i]) {
                Some(d) if d != s[i] => {
                    return Err(format!(
                        "label `{c}` has sizes {d} and {} (broadcasting is not supported)",
                        s[i]
                    ));
                }
                _ => {}
            }
        }
        ops.push(l);
    }
    let out: Vec<char> = match &rhs {
        Some(r) => labels(r, None, ell)?,
        None => {
            // implicit mode: broadcast labels, then the labels seen once, sorted
            let mut once: Vec<char> = dims
                .keys()
                .filter(|c| {
                    c.is_ascii_alphabetic() && ops.iter().flatten().filter(|d| d == c).count() == 1
                })
                .copied()
                .collect();
            once.sort_unstable();
            let mut o: Vec<char> = (0..ell).map(|i| char::from(b'0' + i as u8)).collect();
            o.extend(once);
            o
        }
    };
    for (i, c) in out.iter().enumerate() {
        if out[..i].contains(c) || !dims.contains_key(c) {
            return Err(format!("output label `{c}` repeats or appears in no input"));
        }
    }
    // sum first over the labels only one operand has and the output lacks
    let vals: Vec<(String, Vec<char>)> = names.iter().cloned().zip(ops).collect();
    let mut summed = Vec::new();
    for k in 0..vals.len() {
        let (name, l) = vals[k].clone();
        let others: Vec<char> = vals
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .flat_map(|(_, v)| v.1.clone())
            .collect();
        let gone: Vec<usize> =
            (0..l.len()).filter(|&i| !out.contains(&l[i]) && !others.contains(&l[i])).collect();
        let mut v = name;
        let mut l2 = l.clone();
        if !gone.is_empty() {
            v = b.node("ReduceSum", vec![v], vec![ints("axes", &gone), int("keepdims", 0)], None);
            l2 = l.iter().enumerate().filter(|(i, _)| !gone.contains(i)).map(|(_, &c)| c).collect();
        }
        summed.push((v, l2));
    }
    if summed.len() == 1 {
        let (v, l) = summed.pop().expect("one operand");
        let perm: Vec<usize> =
            out.iter().map(|c| l.iter().position(|d| d == c).expect("an output label")).collect();
        return Ok(b.transpose(v, &perm));
    }
    let (vb, lb) = summed.pop().expect("two operands");
    let (va, la) = summed.pop().expect("two operands");
    let batch: Vec<char> =
        out.iter().filter(|c| la.contains(c) && lb.contains(c)).copied().collect();
    let contracted: Vec<char> =
        la.iter().filter(|c| lb.contains(c) && !out.contains(c)).copied().collect();
    let left: Vec<char> = la.iter().filter(|c| !lb.contains(c)).copied().collect();
    let right: Vec<char> = lb.iter().filter(|c| !la.contains(c)).copied().collect();
    let size = |cs: &[char]| -> usize { cs.iter().map(|c| dims[c]).product() };
    let (bs, m, kk, n) = (size(&batch), size(&left), size(&contracted), size(&right));
    let a_const = (ctx.constant)(&va).is_some();
    let b_const = (ctx.constant)(&vb).is_some();
    if (a_const || b_const) && !batch.is_empty() {
        return Err("a batched product with a constant factor".into());
    }
    // arrange: variable factor first, as [batch, rows, contracted]
    let (first, lf, free_f, second, ls, free_s) = if a_const {
        (vb, lb, right.clone(), va, la, left.clone())
    } else {
        (va, la, left.clone(), vb, lb, right.clone())
    };
    let (mf, ns) = if a_const { (n, m) } else { (m, n) };
    let pos = |l: &[char], c: &char| l.iter().position(|d| d == c).expect("a label of the term");
    let perm_f: Vec<usize> =
        batch.iter().chain(&free_f).chain(&contracted).map(|c| pos(&lf, c)).collect();
    let perm_s: Vec<usize> =
        batch.iter().chain(&contracted).chain(&free_s).map(|c| pos(&ls, c)).collect();
    let mut f = b.transpose(first, &perm_f);
    let mut s = b.transpose(second, &perm_s);
    if batch.is_empty() {
        f = b.reshape(f, &[mf, kk]);
        s = b.reshape(s, &[kk, ns]);
    } else {
        f = b.reshape(f, &[bs, mf, kk]);
        s = b.reshape(s, &[bs, kk, ns]);
    }
    let y = b.node("MatMul", vec![f, s], vec![], None);
    let order: Vec<char> = batch.iter().chain(&free_f).chain(&free_s).copied().collect();
    let y = b.reshape(y, &order.iter().map(|c| dims[c]).collect::<Vec<_>>());
    let perm: Vec<usize> = out.iter().map(|c| pos(&order, c)).collect();
    Ok(b.transpose(y, &perm))
}

/// How an output coordinate maps to the input axis.
#[derive(Clone, Copy)]
enum Coord {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    HalfPixelSymmetric,
}

fn resize(
    node: &NodeProto,
    ctx: &Ctx<'_>,
    x: &str,
    shape: &[usize],
    b: &mut Builder,
) -> Result<String, String> {
    let op = node.op_type.as_deref().unwrap_or("");
    let rank = shape.len();
    let konst = |i: usize| -> Result<Option<Tensor>, String> {
        match node.input.get(i).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(n) => (ctx.constant)(n).map(Some).ok_or(format!("input {i} must be a constant")),
        }
    };
    let (scales, sizes) = if op == "Upsample" {
        match attr(node, "scales") {
            Some(a) => (Some(a.floats.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()), None),
            None => (konst(1)?.map(|t| t.data), None),
        }
    } else if ctx.opset < 11 {
        (konst(1)?.map(|t| t.data), None)
    } else {
        let sizes = konst(3)?.map(|t| t.as_ints());
        let scales = konst(2)?.map(|t| t.data).filter(|s| !s.is_empty());
        (scales, sizes.filter(|s| !s.is_empty()))
    };
    // the resized axes (opset 18's `axes`), all of them by default
    let axes = match attr(node, "axes") {
        Some(a) => norm_axes(&a.ints, rank)?,
        None => (0..rank).collect(),
    };
    if attr_i(node, "antialias", 0) != 0 {
        return Err("antialias=1 is not supported".into());
    }
    if let Some(p) = attr_s(node, "keep_aspect_ratio_policy").filter(|p| p != "stretch")
        && sizes.is_some()
    {
        return Err(format!("keep_aspect_ratio_policy={p} is not supported"));
    }

    let mut out_dims = shape.to_vec();
    let mut scale = vec![1.0f64; rank];
    match (scales, sizes) {
        (Some(s), None) => {
            if s.len() != axes.len() {
                return Err(format!("{} scales for {} axes", s.len(), axes.len()));
            }
            for (&a, &f) in axes.iter().zip(&s) {
                if !(f.is_finite() && f > 0.0) {
                    return Err(format!("scale {f} is not positive"));
                }
                let d = (shape[a] as f64 * f).floor();
                if !(d >= 1.0 && d < 2f64.powi(40)) {
                    return Err(format!("scale {f} of an axis of {} gives {d} elements", shape[a]));
                }
                out_dims[a] = d as usize;
                scale[a] = f;
            }
        }
        (None, Some(z)) => {
            if z.len() != axes.len() {
                return Err(format!("{} sizes for {} axes", z.len(), axes.len()));
            }
            for (&a, &d) in axes.iter().zip(&z) {
                if !(1..1 << 40).contains(&d) {
                    return Err(format!("size {d} is out of range"));
                }
                out_dims[a] = d as usize;
                scale[a] = d as f64 / shape[a] as f64;
            }
        }
        (Some(_), Some(_)) => return Err("both scales and sizes are given".into()),
        (None, None) => return Err("neither scales nor sizes is given".into()),
    }
    let mode = attr_s(node, "mode").unwrap_or_else(|| "nearest".into());
    let coord = match attr_s(node, "coordinate_transformation_mode").as_deref() {
        _ if op == "Upsample" || ctx.opset < 11 => Coord::Asymmetric,
        None | Some("half_pixel") => Coord::HalfPixel,
        Some("pytorch_half_pixel") => Coord::PytorchHalfPixel,
        Some("align_corners") => Coord::AlignCorners,
        Some("asymmetric") => Coord::Asymmetric,
        Some("half_pixel_symmetric") => Coord::HalfPixelSymmetric,
        Some(other) => {
            return Err(format!("coordinate_transformation_mode={other} is not supported"));
        }
    };
    let nearest = attr_s(node, "nearest_mode").unwrap_or_else(|| "round_prefer_floor".into());
    let cubic_a = attr(node, "cubic_coeff_a").and_then(|a| a.f).map_or(-0.75, f64::from);
    let exclude = attr_i(node, "exclude_outside", 0) != 0;
    let mut v = x.to_string();
    for a in 0..rank {
        let (din, dout) = (shape[a], out_dims[a]);
        // the index list or interpolation matrix must fit before it is built
        match din.checked_mul(dout).and_then(|c| c.checked_mul(8)) {
            Some(bytes) if bytes <= ctx.budget => {}
            _ => {
                return Err(format!(
                    "resizing an axis of {din} to {dout} needs a {din}×{dout} matrix, over the memory budget of {} bytes",
                    ctx.budget
                ));
            }
        }
        // an axis kept at its size with scale 1 maps every output to its
        // own input in every mode (the source coordinate is the integer o)
        if dout == din && scale[a] == 1.0 {
            continue;
        }
        let src = |o: usize| -> f64 {
            let (o, s, i, n) = (o as f64, scale[a], din as f64, dout as f64);
            match coord {
                Coord::HalfPixel => (o + 0.5) / s - 0.5,
                Coord::PytorchHalfPixel => {
                    if dout > 1 {
                        (o + 0.5) / s - 0.5
                    } else {
                        0.0
                    }
                }
                Coord::AlignCorners => {
                    let w = s * i;
                    if w == 1.0 { 0.0 } else { o * (i - 1.0) / (w - 1.0) }
                }
                Coord::Asymmetric => o / s,
                Coord::HalfPixelSymmetric => {
                    let adjustment = n / (s * i);
                    let offset = i / 2.0 * (1.0 - adjustment);
                    offset + (o + 0.5) / s - 0.5
                }
            }
        };
        let clamp = |j: i64| j.clamp(0, din as i64 - 1) as usize;
        match mode.as_str() {
            "nearest" => {
                let pick = |x: f64| -> i64 {
                    let f = x.floor();
                    let half = x - f == 0.5;
                    (match nearest.as_str() {
                        "round_prefer_ceil" => {
                            if half {
                                f + 1.0
                            } else {
                                x.round()
                            }
                        }
                        "floor" => f,
                        "ceil" => x.ceil(),
                        _ => {
                            if half {
                                f
                            } else {
                                x.round()
                            }
                        }
                    }) as i64
                };
                let idx: Vec<i64> = (0..dout).map(|o| clamp(pick(src(o))) as i64).collect();
                let t = b.konst(Tensor::ints(&idx));
                v = b.node("Gather", vec![v, t], vec![int("axis", a as i64)], None);
            }
            "linear" | "cubic" => {
                // rows: output positions; each a few weighted input taps
                let mut w = vec![0.0; din * dout]; // [din, dout]: x · w over the axis
                for o in 0..dout {
                    let xo = src(o);
                    // ratio in (0, 1]: the pixel left of xo is preferred
                    let base = xo.floor();
                    let (i0, r) =
                        if xo == base { (base as i64 - 1, 1.0) } else { (base as i64, xo - base) };
                    let taps: Vec<(i64, f64)> = if mode == "linear" {
                        vec![(i0, 1.0 - r), (i0 + 1, r)]
                    } else {
                        let c = cubic_a;
                        let f = |t: f64| -> f64 {
                            let t = t.abs();
                            if t <= 1.0 {
                                ((c + 2.0) * t - (c + 3.0)) * t * t + 1.0
                            } else if t < 2.0 {
                                ((c * t - 5.0 * c) * t + 8.0 * c) * t - 4.0 * c
                            } else {
                                0.0
                            }
                        };
                        vec![
                            (i0 - 1, f(r + 1.0)),
                            (i0, f(r)),
                            (i0 + 1, f(1.0 - r)),
                            (i0 + 2, f(2.0 - r)),
                        ]
                    };
                    let inside = |j: i64| (0..din as i64).contains(&j);
                    let total: f64 = if exclude {
                        taps.iter().filter(|t| inside(t.0)).map(|t| t.1).sum()
                    } else {
                        1.0
                    };
                    for (j, c) in taps {
                        if exclude && !inside(j) {
                            continue;
                        }
                        w[clamp(j) * dout + o] += c / total;
                    }
                }
                let last = rank - 1;
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(a, last);
                v = b.transpose(v, &perm);
                let t = b.konst(Tensor::new(vec![din, dout], w, false));
                v = b.node("MatMul", vec![v, t], vec![], None);
                v = b.transpose(v, &perm);
            }
            other => return Err(format!("mode={other} is not supported")),
        }
    }
    Ok(v)
}

/// `ints` of an attribute, or `default` repeated `n` times; negative values
/// refused.
fn attr_sizes(
    node: &NodeProto,
    name: &str,
    n: usize,
    default: usize,
) -> Result<Vec<usize>, String> {
    match attr(node, name) {
        None => Ok(vec![default; n]),
        Some(a) => {
            let v: Vec<usize> = a
                .ints
                .iter()
                .map(|&x| usize::try_from(x).map_err(|_| format!("{name} {x} is negative")))
                .collect::<Result<_, _>>()?;
            if v.len() != n {
                return Err(format!("{name} has {} entries, expected {n}", v.len()));
            }
            Ok(v)
        }
    }
}

/// Per-axis geometry of a 3-D window: pads (begin, end) from `pads` or
/// `auto_pad`, and the output extents.
struct Geometry3 {
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dil: Vec<usize>,
    begin: Vec<usize>,
    end: Vec<usize>,
    out: Vec<usize>,
}

fn geometry3(
    node: &NodeProto,
    spatial: &[usize],
    kernel: Vec<usize>,
    ceil: bool,
) -> Result<Geometry3, String> {
    let strides = attr_sizes(node, "strides", 3, 1)?;
    let dil = attr_sizes(node, "dilations", 3, 1)?;
    if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
        return Err(format!(
            "strides {strides:?}, dilations {dil:?} and kernel {kernel:?} must be positive"
        ));
    }
    let (mut begin, mut end) = (vec![0; 3], vec![0; 3]);
    match attr_s(node, "auto_pad").as_deref().unwrap_or("NOTSET") {
        "NOTSET" => {
            let p = attr_sizes(node, "pads", 6, 0)?;
            begin.copy_from_slice(&p[..3]);
            end.copy_from_slice(&p[3..]);
        }
        "VALID" => {}
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            for i in 0..3 {
                let out = spatial[i].div_ceil(strides[i]);
                let need = ((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1)
                    .saturating_sub(spatial[i]);
                let (small, big) = (need / 2, need - need / 2);
                (begin[i], end[i]) = if mode == "SAME_UPPER" { (small, big) } else { (big, small) };
            }
        }
        other => return Err(format!("auto_pad={other}")),
    }
    let mut out = vec![0; 3];
    for i in 0..3 {
        let span = (kernel[i] - 1)
            .checked_mul(dil[i])
            .and_then(|v| v.checked_add(1))
            .ok_or("the window overflows")?;
        let padded = spatial[i]
            .checked_add(begin[i])
            .and_then(|v| v.checked_add(end[i]))
            .ok_or("the padded extent overflows")?;
        if padded < span {
            return Err(format!("kernel {kernel:?} does not fit input {spatial:?}"));
        }
        let steps = padded - span;
        out[i] = if ceil { steps.div_ceil(strides[i]) } else { steps / strides[i] } + 1;
        // ceil mode: a last window that starts in the right padding is dropped
        if ceil && (out[i] - 1) * strides[i] >= spatial[i] + begin[i] {
            out[i] -= 1;
        }
    }
    Ok(Geometry3 { kernel, strides, dil, begin, end, out })
}

fn conv3d(
    node: &NodeProto,
    ctx: &Ctx<'_>,
    x: &str,
    shape: &[usize],
    b: &mut Builder,
) -> Result<String, String> {
    let wname = node.input.get(1).filter(|s| !s.is_empty()).ok_or("missing weight")?;
    let w = (ctx.constant)(wname).ok_or("the weight must be a constant")?;
    if shape[0] != 1 || w.dims.len() != 5 {
        return Err(format!("input {shape:?} with weight {:?}", w.dims));
    }
    let g = geometry3(node, &shape[2..], w.dims[2..].to_vec(), false)?;
    let (m, cg, kd) = (w.dims[0], w.dims[1], w.dims[2]);
    if g.out[0].saturating_mul(kd) > MAX_NODES {
        return Err(format!(
            "{} output depths × {kd} depth taps exceed the {MAX_NODES} 2-D convolutions a rewrite may make",
            g.out[0]
        ));
    }
    let (kh, kw) = (w.dims[3], w.dims[4]);
    let slab = cg * kh * kw;
    let group = attr_i(node, "group", 1);
    let bias = node.input.get(2).filter(|s| !s.is_empty()).cloned();
    // the 2-D convolution of one depth slice by one depth tap of the kernel
    let attrs2 = || {
        vec![
            ints("kernel_shape", &[kh, kw]),
            ints("strides", &g.strides[1..]),
            ints("dilations", &g.dil[1..]),
            ints("pads", &[g.begin[1], g.begin[2], g.end[1], g.end[2]]),
            int("group", group),
        ]
    };
    let taps: Vec<String> = (0..kd)
        .map(|t| {
            let mut data = Vec::with_capacity(m * slab);
            for o in 0..m {
                for c in 0..cg {
                    let at = ((o * cg + c) * kd + t) * kh * kw;
                    data.extend_from_slice(&w.data[at..at + kh * kw]);
                }
            }
            b.konst(Tensor::new(vec![m, cg, kh, kw], data, false))
        })
        .collect();
    let mut slices: Vec<Option<String>> = vec![None; shape[2]];
    let mut planes = Vec::with_capacity(g.out[0]);
    for od in 0..g.out[0] {
        let mut acc: Option<String> = None;
        for (t, tap) in taps.iter().enumerate() {
            let Some(id) = (od * g.strides[0] + t * g.dil[0]).checked_sub(g.begin[0]) else {
                continue;
            };
            if id >= shape[2] {
                continue;
            }
            let slice = match &slices[id] {
                Some(s) => s.clone(),
                None => {
                    let i = b.konst(Tensor::new(vec![], vec![id as f64], true));
                    let s = b.node("Gather", vec![x.to_string(), i], vec![int("axis", 2)], None);
                    slices[id] = Some(s.clone());
                    s
                }
            };
            let mut inputs = vec![slice, tap.clone()];
            if acc.is_none()
                && let Some(bn) = &bias
            {
                inputs.push(bn.clone());
            }
            let y = b.node("Conv", inputs, attrs2(), None);
            acc = Some(match acc {
                None => y,
                Some(a) => b.node("Add", vec![a, y], vec![], None),
            });
        }
        let y = acc.ok_or_else(|| format!("output depth {od} reads only padding"))?;
        planes.push(y);
    }
    let (oh, ow) = (g.out[1], g.out[2]);
    let planes: Vec<String> =
        planes.into_iter().map(|p| b.reshape(p, &[1, m, 1, oh, ow])).collect();
    Ok(if planes.len() == 1 {
        planes.into_iter().next().expect("one plane")
    } else {
        b.node("Concat", planes, vec![int("axis", 2)], None)
    })
}

fn pool3d(node: &NodeProto, x: &str, shape: &[usize], b: &mut Builder) -> Result<String, String> {
    let op = node.op_type.as_deref().unwrap_or("");
    if node.output.len() > 1 && !node.output[1].is_empty() {
        return Err("the Indices output is not supported".into());
    }
    let (c, d, h, w) = (shape[1], shape[2], shape[3], shape[4]);
    if shape[0] != 1 {
        return Err(format!("input {shape:?}"));
    }
    if let Some(global) = op.strip_prefix("Global") {
        let v = b.reshape(x.to_string(), &[1, c, 1, d * h * w]);
        let v = b.node(&format!("Global{global}"), vec![v], vec![], None);
        return Ok(b.reshape(v, &[1, c, 1, 1, 1]));
    }
    let kernel = attr_sizes(node, "kernel_shape", 3, 0)?;
    let ceil = attr_i(node, "ceil_mode", 0) != 0;
    let g = geometry3(node, &shape[2..], kernel, ceil)?;
    let mut common = vec![int("ceil_mode", i64::from(ceil))];
    if op == "AveragePool" {
        common.push(int("count_include_pad", attr_i(node, "count_include_pad", 0)));
    }
    let with = |mut a: Vec<AttributeProto>| {
        a.extend(common.iter().cloned());
        a
    };
    // (height, width), depth folded into the channels
    let v = b.reshape(x.to_string(), &[1, c * d, h, w]);
    let v = b.node(
        op,
        vec![v],
        with(vec![
            ints("kernel_shape", &g.kernel[1..]),
            ints("strides", &g.strides[1..]),
            ints("pads", &[g.begin[1], g.begin[2], g.end[1], g.end[2]]),
            ints("dilations", &g.dil[1..]),
        ]),
        None,
    );
    let plane = g.out[1] * g.out[2];
    // then depth, with the plane flattened into the width
    let v = b.reshape(v, &[1, c, d, plane]);
    let v = b.node(
        op,
        vec![v],
        with(vec![
            ints("kernel_shape", &[g.kernel[0], 1]),
            ints("strides", &[g.strides[0], 1]),
            ints("pads", &[g.begin[0], 0, g.end[0], 0]),
            ints("dilations", &[g.dil[0], 1]),
        ]),
        None,
    );
    Ok(b.reshape(v, &[1, c, g.out[0], g.out[1], g.out[2]]))
}
