//! The network IR: a DAG of nodes over a closed [`Layer`] enum, with shapes
//! inferred and validated as nodes are added.
//!
//! Shapes keep ONNX's batch dimension fixed at 1 (one instance is linearized
//! at a time) and data is row-major, so the flattened index of every value is
//! its ONNX (NCHW) index.

use crate::error::IrError;
use crate::expr::{Expr, ExprClass};
pub use crate::geometry::Window;

/// Index of a value (a tensor) in a [`Network`]; value 0 is the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

/// Index of a node (a layer) in a [`Network`]'s topological order, and of
/// its compiled layer in an instance (the compiler keeps one per node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// A fully connected layer over the last axis:
/// `y[..., o] = Σ_k weight[o, k]·x[..., k] + bias[o]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Output features.
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
    /// Row-major `out_features × in_features`.
    pub weight: Vec<f64>,
    /// Length `out_features`, if any.
    pub bias: Option<Vec<f64>>,
}

/// An elementwise affine map `y = scale ⊙ x + shift` (input normalization,
/// batch-norm, `Add`/`Sub`/`Mul`/`Div` by constants), stored once per block
/// of `spatial` consecutive elements: element `i` is
/// `scale[i / spatial]·x_i + shift[i / spatial]`. A batch-norm of an
/// `[1, C, H, W]` tensor holds `C` pairs with `spatial = H·W`; a
/// per-element map has `spatial` 1. `scale.len() · spatial` is the
/// tensor's element count.
#[derive(Clone, Debug, PartialEq)]
pub struct Affine {
    /// Scale, one per block.
    pub scale: Vec<f64>,
    /// Shift, one per block.
    pub shift: Vec<f64>,
    /// Elements per block, at least 1.
    pub spatial: usize,
}

impl Affine {
    /// One scale and shift per element.
    pub fn per_element(scale: Vec<f64>, shift: Vec<f64>) -> Self {
        Self { scale, shift, spatial: 1 }
    }

    /// The same map with one scale and shift per element (for readers that
    /// want them spelled out; the compiled path keeps the blocks).
    pub fn expanded(&self) -> (Vec<f64>, Vec<f64>) {
        let rep =
            |v: &[f64]| v.iter().flat_map(|&c| std::iter::repeat_n(c, self.spatial)).collect();
        (rep(&self.scale), rep(&self.shift))
    }
}

/// An elementwise nonlinear function `y_i = σ_i(x_i)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    /// The function, possibly fused from several ONNX nodes.
    pub expr: Expr,
}

impl Activation {
    /// Piecewise linear or smooth (an affine expression is an [`Affine`] layer).
    pub fn class(&self) -> ExprClass {
        self.expr.class()
    }
    /// Whether the activation is piecewise linear.
    pub fn is_piecewise_linear(&self) -> bool {
        self.class() <= ExprClass::PiecewiseLinear
    }
}

/// A change of shape that keeps the row-major data (Flatten, Reshape,
/// Squeeze, Unsqueeze, Identity, Dropout at inference).
#[derive(Clone, Debug, PartialEq)]
pub struct Reshape {
    /// The output shape.
    pub shape: Vec<usize>,
}

/// A 1-D or 2-D convolution (cross-correlation, as ONNX and PyTorch define
/// it) over an input `[1, c_in, (ih,) iw]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv {
    /// Spatial geometry (1-D: height 1).
    pub window: Window,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Groups (`c_in` = depthwise).
    pub groups: usize,
    /// `c_out × (c_in / groups) × kh × kw`, row-major (shared with the
    /// compiled operator).
    pub weight: std::sync::Arc<Vec<f64>>,
    /// Length `c_out`, if any.
    pub bias: Option<Vec<f64>>,
    /// Whether the layer is 1-D (shapes `[1, c, w]`).
    pub one_d: bool,
}

impl Conv {
    /// Weight of output channel `oc`, input channel `icg` within its group,
    /// tap `(ky, kx)`.
    #[inline]
    pub fn w(&self, oc: usize, icg: usize, ky: usize, kx: usize) -> f64 {
        let cig = self.c_in / self.groups;
        self.weight[((oc * cig + icg) * self.window.kh + ky) * self.window.kw + kx]
    }
    /// The input channel range of output channel `oc`'s group.
    #[inline]
    pub fn group_inputs(&self, oc: usize) -> std::ops::Range<usize> {
        let cig = self.c_in / self.groups;
        let g = oc / (self.c_out / self.groups);
        g * cig..(g + 1) * cig
    }
    /// Output shape.
    pub fn out_shape(&self) -> Vec<usize> {
        if self.one_d {
            vec![1, self.c_out, self.window.ow]
        } else {
            vec![1, self.c_out, self.window.oh, self.window.ow]
        }
    }
}

/// A transposed convolution (`ConvTranspose`), stored as the convolution
/// whose adjoint it is: `conv` maps this layer's *output* space to its
/// *input* space (`conv.c_in` = output channels, `conv.c_out` = input
/// channels, `conv.window` over the output), so the layer computes
/// `y = convᵀ·x + bias`. ONNX's weight `[C_in, C_out/groups, kh, kw]` is
/// exactly `conv`'s weight layout.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvTranspose {
    /// The adjoint convolution (its own bias is `None`).
    pub conv: Conv,
    /// Per output channel (`conv.c_in`), if any.
    pub bias: Option<Vec<f64>>,
}

impl ConvTranspose {
    /// Input shape (the adjoint convolution's output shape).
    pub fn in_shape(&self) -> Vec<usize> {
        self.conv.out_shape()
    }
    /// Output shape (the adjoint convolution's input shape).
    pub fn out_shape(&self) -> Vec<usize> {
        let w = &self.conv.window;
        if self.conv.one_d {
            vec![1, self.conv.c_in, w.iw]
        } else {
            vec![1, self.conv.c_in, w.ih, w.iw]
        }
    }
}

/// Pooling kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// Max over the window; ties go to the first tap in window order.
    Max,
    /// Mean over the window.
    Average {
        /// Whether padded positions count in the divisor.
        count_include_pad: bool,
    },
}

/// Max or average pooling (global pooling is a window over the whole input).
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    /// Spatial geometry.
    pub window: Window,
    /// Channels.
    pub channels: usize,
    /// Max or average.
    pub kind: PoolKind,
    /// Whether the layer is 1-D.
    pub one_d: bool,
}

impl Pool {
    /// Output shape.
    pub fn out_shape(&self) -> Vec<usize> {
        if self.one_d {
            vec![1, self.channels, self.window.ow]
        } else {
            vec![1, self.channels, self.window.oh, self.window.ow]
        }
    }
}

/// `y = Σ_k coeffs[k]·u_k` over inputs of equal shape (residual `Add`,
/// `Sum`, `Sub`).
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    /// One coefficient per input.
    pub coeffs: Vec<f64>,
}

/// Concatenation along an axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    /// The axis.
    pub axis: usize,
}

/// Padding mode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadMode {
    /// A constant value.
    Constant(f64),
    /// Mirror without repeating the edge.
    Reflect,
    /// Repeat the edge.
    Edge,
}

/// Padding of every axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Pad {
    /// Elements added before each axis.
    pub begin: Vec<usize>,
    /// Elements added after each axis.
    pub end: Vec<usize>,
    /// Mode.
    pub mode: PadMode,
}

/// A permutation of axes.
#[derive(Clone, Debug, PartialEq)]
pub struct Transpose {
    /// Output axis `i` is input axis `perm[i]`.
    pub perm: Vec<usize>,
}

/// A fixed selection: every output element is an input element or a
/// constant, `y[i] = x[src[i]]` or `fill[i]` where `src[i]` is `None`.
/// `Slice`, `Split`, `Gather` with constant indices, `Expand`, `Tile`,
/// `Concat` with constants and `Where` with a constant condition on an
/// activation all lower to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Select {
    /// Output shape.
    pub shape: Vec<usize>,
    /// For every output element (row-major), its input element, or `None`
    /// for a constant.
    pub src: Vec<Option<usize>>,
    /// The constants: `fill[i]` where `src[i]` is `None` (0 elsewhere);
    /// empty when every element is selected.
    pub fill: Vec<f64>,
}

/// The elementwise product of two tensors, `y = a ⊙ broadcast(g)`: input
/// 0 (`a`) has the output's shape, input 1 (`g`, a gate such as a
/// squeeze-and-excitation scale) the same rank with each axis equal or 1.
/// Tangent mode linearizes by the product rule; secant mode freezes the
/// gate `g` at x (see ARCHITECTURE.md).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Product {}

/// For every element of a tensor of shape `big`, the element of a tensor of
/// shape `small` (the same rank, each axis equal or 1) broadcast onto it.
/// The same map serves a broadcast (a product's gate, an expanded value) and
/// a reduction (the output each input element adds to).
pub fn broadcast_index(big: &[usize], small: &[usize]) -> Vec<usize> {
    let rank = big.len();
    let numel: usize = big.iter().product();
    let mut strides = vec![0usize; rank];
    let mut s = 1;
    for ax in (0..rank).rev() {
        strides[ax] = if small[ax] == 1 { 0 } else { s };
        s *= small[ax];
    }
    (0..numel)
        .map(|flat| {
            let (mut rem, mut g) = (flat, 0);
            for ax in (0..rank).rev() {
                g += (rem % big[ax]) * strides[ax];
                rem /= big[ax];
            }
            g
        })
        .collect()
}

/// A sum or mean over some axes (`ReduceSum`/`ReduceMean`, and the means of
/// a layer, instance or group normalization). Reduced axes are kept with
/// length 1 (a `Reshape` drops them where `keepdims = 0`).
#[derive(Clone, Debug, PartialEq)]
pub struct Reduce {
    /// The reduced axes, ascending.
    pub axes: Vec<usize>,
    /// Mean (else sum).
    pub mean: bool,
}

impl Reduce {
    /// The output shape for an input of shape `shape` (reduced axes kept
    /// with length 1).
    pub fn out_shape(&self, shape: &[usize]) -> Vec<usize> {
        (0..shape.len()).map(|a| if self.axes.contains(&a) { 1 } else { shape[a] }).collect()
    }
    /// For every input element (shape `shape`), the output element it adds
    /// to.
    pub fn target(&self, shape: &[usize]) -> Vec<usize> {
        broadcast_index(shape, &self.out_shape(shape))
    }
    /// Elements summed into each output.
    pub fn count(&self, shape: &[usize]) -> usize {
        self.axes.iter().map(|&a| shape[a]).product()
    }
}

/// Softmax (or log-softmax) along one axis, inside the graph (attention
/// weights). A trailing softmax is skipped at import instead.
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax {
    /// The normalized axis.
    pub axis: usize,
    /// `LogSoftmax` (else `Softmax`).
    pub log: bool,
}

impl Softmax {
    /// The slices along the axis of a tensor of shape `shape`: for each, the
    /// flat indices of its elements.
    pub fn slices(&self, shape: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
        let len = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product();
        let outer: usize = shape[..self.axis].iter().product();
        (0..outer * inner).map(move |k| {
            let (o, i) = (k / inner, k % inner);
            (0..len).map(|a| (o * len + a) * inner + i).collect()
        })
    }
}

/// The matrix product of two tensors that depend on the input (attention's
/// `Q·Kᵀ` and `weights·V`): `[..., m, k] × [..., k, n] → [..., m, n]`, the
/// leading (batch) axes equal. Tangent mode: the product rule; secant mode
/// freezes the first factor (the attention weights).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct MatMul {}

impl MatMul {
    /// (batch, m, k, n) of inputs of shapes `a` and `b`.
    pub fn dims(a: &[usize], b: &[usize]) -> (usize, usize, usize, usize) {
        let r = a.len();
        (a[..r - 2].iter().product(), a[r - 2], a[r - 1], b[r - 1])
    }
}

/// Local response normalization across channels:
/// `y_c = x_c / (bias + alpha/size · Σ_{c' ∈ window(c)} x_{c'}²)^beta`.
#[derive(Clone, Debug, PartialEq)]
pub struct Lrn {
    /// Window size (channels).
    pub size: usize,
    /// Scale.
    pub alpha: f64,
    /// Exponent.
    pub beta: f64,
    /// Additive constant.
    pub bias: f64,
}

impl Lrn {
    /// The channel window of channel `c` among `channels` (ONNX:
    /// `[c − ⌊(size−1)/2⌋, c + ⌈(size−1)/2⌉]`).
    pub fn window(&self, c: usize, channels: usize) -> std::ops::Range<usize> {
        let lo = c.saturating_sub((self.size - 1) / 2);
        let hi = (c + (self.size - 1).div_ceil(2) + 1).min(channels);
        lo..hi
    }
}

/// The closed set of layers. Adding a variant makes the compiler list every
/// place to update (shape inference, reference, instance compiler, inspect).
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// Fully connected layer over the last axis.
    Dense(Dense),
    /// Elementwise affine map.
    Affine(Affine),
    /// Elementwise nonlinearity.
    Activation(Activation),
    /// Shape change.
    Reshape(Reshape),
    /// Convolution.
    Conv(Conv),
    /// Transposed convolution.
    ConvTranspose(ConvTranspose),
    /// Max / average pooling.
    Pool(Pool),
    /// Weighted sum of several inputs.
    Add(Add),
    /// Concatenation.
    Concat(Concat),
    /// Padding.
    Pad(Pad),
    /// Axis permutation.
    Transpose(Transpose),
    /// Local response normalization.
    Lrn(Lrn),
    /// Fixed selection of elements and constants.
    Select(Select),
    /// Product of two tensors (a gate).
    Product(Product),
    /// Sum or mean over axes.
    Reduce(Reduce),
    /// Softmax along an axis.
    Softmax(Softmax),
    /// Matrix product of two tensors.
    MatMul(MatMul),
}

impl Layer {
    /// A short name of the layer kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Dense(_) => "dense",
            Layer::Affine(_) => "affine",
            Layer::Activation(_) => "activation",
            Layer::Reshape(_) => "reshape",
            Layer::Conv(_) => "conv",
            Layer::ConvTranspose(_) => "conv_transpose",
            Layer::Pool(p) => match p.kind {
                PoolKind::Max => "maxpool",
                PoolKind::Average { .. } => "avgpool",
            },
            Layer::Add(_) => "add",
            Layer::Concat(_) => "concat",
            Layer::Pad(_) => "pad",
            Layer::Transpose(_) => "transpose",
            Layer::Select(_) => "select",
            Layer::Product(_) => "product",
            Layer::MatMul(_) => "matmul",
            Layer::Softmax(s) => {
                if s.log {
                    "log_softmax"
                } else {
                    "softmax"
                }
            }
            Layer::Reduce(r) => {
                if r.mean {
                    "reduce_mean"
                } else {
                    "reduce_sum"
                }
            }
            Layer::Lrn(_) => "lrn",
        }
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        match self {
            Layer::Dense(d) => d.weight.len() + d.bias.as_ref().map_or(0, Vec::len),
            Layer::Affine(a) => a.scale.len() + a.shift.len(),
            Layer::Activation(a) => a.expr.consts.iter().map(|c| c.values.len()).sum(),
            Layer::Conv(c) => c.weight.len() + c.bias.as_ref().map_or(0, Vec::len),
            Layer::ConvTranspose(t) => t.conv.weight.len() + t.bias.as_ref().map_or(0, Vec::len),
            Layer::Reshape(_)
            | Layer::Pool(_)
            | Layer::Add(_)
            | Layer::Concat(_)
            | Layer::Pad(_)
            | Layer::Transpose(_)
            | Layer::Select(_)
            | Layer::Product(_)
            | Layer::Reduce(_)
            | Layer::Softmax(_)
            | Layer::MatMul(_)
            | Layer::Lrn(_) => 0,
        }
    }

    /// Infers the output shape from the input shapes, validating parameters.
    pub fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Vec<usize>, IrError> {
        let mismatch = |expected: String, got: &[usize]| IrError::ShapeMismatch {
            layer: name.to_string(),
            expected,
            got: got.to_vec(),
        };
        let x = inputs[0];
        let numel: usize = x.iter().product();
        let finite = |param: &str, v: &[f64]| {
            // a fold without early exit vectorizes (weights are finite but
            // for hostile files, and every weight passes through here);
            // large tensors in pieces on the current rayon pool (ResNet-50:
            // 25 M weights)
            use rayon::prelude::*;
            let piece = |c: &[f64]| c.iter().fold(true, |a, t| a & t.is_finite());
            let ok = if v.len() >= 1 << 18 {
                v.par_chunks(1 << 16).all(piece)
            } else {
                v.chunks(4096).all(piece)
            };
            if ok {
                Ok(())
            } else {
                Err(IrError::NonFinite { layer: name.to_string(), param: param.to_string() })
            }
        };
        match self {
            Layer::Dense(d) => {
                if d.weight.len() != d.out_features * d.in_features {
                    return Err(mismatch(
                        format!("weight of {}×{}", d.out_features, d.in_features),
                        &[d.weight.len()],
                    ));
                }
                if let Some(b) = &d.bias {
                    if b.len() != d.out_features {
                        return Err(mismatch(format!("bias of {}", d.out_features), &[b.len()]));
                    }
                    finite("bias", b)?;
                }
                finite("weight", &d.weight)?;
                match x.last() {
                    Some(&k) if k == d.in_features => {
                        let mut s = x.to_vec();
                        *s.last_mut().expect("nonempty") = d.out_features;
                        Ok(s)
                    }
                    _ => Err(mismatch(format!("[..., {}]", d.in_features), x)),
                }
            }
            Layer::Affine(a) => {
                if a.spatial == 0
                    || a.scale.len() != a.shift.len()
                    || a.scale.len().checked_mul(a.spatial) != Some(numel)
                {
                    return Err(mismatch(
                        format!("{} blocks of {} elements", a.scale.len(), a.spatial),
                        x,
                    ));
                }
                finite("scale", &a.scale)?;
                finite("shift", &a.shift)?;
                Ok(x.to_vec())
            }
            Layer::Activation(a) => {
                for c in &a.expr.consts {
                    if !c.fits(numel) {
                        return Err(mismatch(
                            format!("{} blocks of {} elements", c.values.len(), c.repeat),
                            x,
                        ));
                    }
                    finite("constant", &c.values)?;
                }
                Ok(x.to_vec())
            }
            Layer::Reshape(r) => {
                if r.shape.iter().product::<usize>() != numel {
                    return Err(mismatch(format!("{} elements for {:?}", numel, r.shape), x));
                }
                Ok(r.shape.clone())
            }
            Layer::Conv(c) => {
                let w = &c.window;
                let want: Vec<usize> =
                    if c.one_d { vec![1, c.c_in, w.iw] } else { vec![1, c.c_in, w.ih, w.iw] };
                if x != want.as_slice() {
                    return Err(mismatch(format!("{want:?}"), x));
                }
                if c.groups == 0 || c.c_in % c.groups != 0 || c.c_out % c.groups != 0 {
                    return Err(mismatch(format!("channels divisible by {} groups", c.groups), x));
                }
                if c.weight.len() != c.c_out * (c.c_in / c.groups) * w.kh * w.kw {
                    return Err(mismatch("a weight matching the kernel".into(), &[c.weight.len()]));
                }
                if let Some(b) = &c.bias {
                    if b.len() != c.c_out {
                        return Err(mismatch(format!("bias of {}", c.c_out), &[b.len()]));
                    }
                    finite("bias", b)?;
                }
                finite("weight", &c.weight)?;
                Ok(c.out_shape())
            }
            Layer::ConvTranspose(t) => {
                let c = &t.conv;
                if x != t.in_shape().as_slice() {
                    return Err(mismatch(format!("{:?}", t.in_shape()), x));
                }
                if c.bias.is_some() {
                    return Err(mismatch("an adjoint convolution without bias".into(), x));
                }
                if c.groups == 0 || c.c_in % c.groups != 0 || c.c_out % c.groups != 0 {
                    return Err(mismatch(format!("channels divisible by {} groups", c.groups), x));
                }
                let w = &c.window;
                if c.weight.len() != c.c_out * (c.c_in / c.groups) * w.kh * w.kw {
                    return Err(mismatch("a weight matching the kernel".into(), &[c.weight.len()]));
                }
                if let Some(b) = &t.bias {
                    if b.len() != c.c_in {
                        return Err(mismatch(format!("bias of {}", c.c_in), &[b.len()]));
                    }
                    finite("bias", b)?;
                }
                finite("weight", &c.weight)?;
                Ok(t.out_shape())
            }
            Layer::Pool(p) => {
                let w = &p.window;
                let want: Vec<usize> = if p.one_d {
                    vec![1, p.channels, w.iw]
                } else {
                    vec![1, p.channels, w.ih, w.iw]
                };
                if x != want.as_slice() {
                    return Err(mismatch(format!("{want:?}"), x));
                }
                Ok(p.out_shape())
            }
            Layer::Add(a) => {
                if a.coeffs.len() != inputs.len() || inputs.iter().any(|s| *s != x) {
                    return Err(mismatch(format!("{} inputs of equal shape", a.coeffs.len()), x));
                }
                Ok(x.to_vec())
            }
            Layer::Concat(c) => {
                let mut out = x.to_vec();
                if c.axis >= x.len() {
                    return Err(mismatch(format!("rank above {}", c.axis), x));
                }
                for s in &inputs[1..] {
                    let same = s.len() == x.len()
                        && s.iter().zip(x).enumerate().all(|(i, (a, b))| i == c.axis || a == b);
                    if !same {
                        return Err(mismatch(format!("shapes equal except axis {}", c.axis), s));
                    }
                    out[c.axis] =
                        out[c.axis].checked_add(s[c.axis]).ok_or_else(|| IrError::Overflow {
                            layer: name.to_string(),
                            what: "the concatenated shape".into(),
                        })?;
                }
                Ok(out)
            }
            Layer::Pad(p) => {
                if p.begin.len() != x.len() || p.end.len() != x.len() {
                    return Err(mismatch(format!("rank {}", p.begin.len()), x));
                }
                if !matches!(p.mode, PadMode::Constant(_))
                    && x.iter().zip(p.begin.iter().zip(&p.end)).any(|(&d, (&b, &e))| {
                        (b > 0 || e > 0)
                            && (d == 0 || (p.mode == PadMode::Reflect && (b >= d || e >= d)))
                    })
                {
                    return Err(mismatch(
                        "padding smaller than the axis for reflect/edge".into(),
                        x,
                    ));
                }
                x.iter()
                    .zip(p.begin.iter().zip(&p.end))
                    .map(|(d, (b, e))| d.checked_add(*b).and_then(|v| v.checked_add(*e)))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| IrError::Overflow {
                        layer: name.to_string(),
                        what: "the padded shape".into(),
                    })
            }
            Layer::Transpose(t) => {
                let mut sorted = t.perm.clone();
                sorted.sort_unstable();
                if sorted != (0..x.len()).collect::<Vec<_>>() {
                    return Err(mismatch(
                        format!("rank {} for perm {:?}", t.perm.len(), t.perm),
                        x,
                    ));
                }
                Ok(t.perm.iter().map(|&p| x[p]).collect())
            }
            Layer::MatMul(_) => {
                let b = inputs.get(1).copied().unwrap_or(&[]);
                let r = x.len();
                let fits = inputs.len() == 2
                    && r >= 2
                    && b.len() == r
                    && x[..r - 2] == b[..r - 2]
                    && x[r - 1] == b[r - 2];
                if !fits {
                    return Err(mismatch(format!("[..., k, n] after {x:?}"), b));
                }
                let mut out = x.to_vec();
                out[r - 1] = b[r - 1];
                Ok(out)
            }
            Layer::Softmax(sm) => {
                if sm.axis >= x.len() {
                    return Err(mismatch(format!("rank above {}", sm.axis), x));
                }
                Ok(x.to_vec())
            }
            Layer::Reduce(r) => {
                let ascending = r.axes.windows(2).all(|w| w[0] < w[1]);
                if r.axes.is_empty() || !ascending || r.axes.iter().any(|&a| a >= x.len()) {
                    return Err(mismatch(format!("axes {:?} within the rank", r.axes), x));
                }
                Ok(r.out_shape(x))
            }
            Layer::Product(_) => {
                let fits = inputs.len() == 2
                    && inputs[1].len() == x.len()
                    && inputs[1].iter().zip(x).all(|(g, a)| g == a || *g == 1);
                if !fits {
                    return Err(mismatch(
                        format!("two inputs, the second broadcasting to {x:?}"),
                        inputs.get(1).copied().unwrap_or(&[]),
                    ));
                }
                Ok(x.to_vec())
            }
            Layer::Select(sel) => {
                if checked_numel(&sel.shape) != Some(sel.src.len()) {
                    return Err(mismatch(
                        format!("{} selections for {:?}", sel.src.len(), sel.shape),
                        x,
                    ));
                }
                if let Some(j) = sel.src.iter().flatten().find(|&&j| j >= numel) {
                    return Err(mismatch(format!("more than {j} elements"), x));
                }
                let constants = sel.src.iter().any(Option::is_none);
                if (constants && sel.fill.len() != sel.src.len())
                    || (!constants && !sel.fill.is_empty())
                {
                    return Err(mismatch(format!("{} constants", sel.fill.len()), x));
                }
                finite("fill", &sel.fill)?;
                Ok(sel.shape.clone())
            }
            Layer::Lrn(l) => {
                if x.len() < 2 || l.size == 0 {
                    return Err(mismatch("[1, C, ...] and size ≥ 1".into(), x));
                }
                Ok(x.to_vec())
            }
        }
    }
}

/// One node: a layer applied to earlier values, producing one value.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Name (the ONNX node name, or a generated one).
    pub name: String,
    /// The ONNX op types this node was built from, for reports.
    pub source: String,
    /// The layer.
    pub layer: Layer,
    /// Input values.
    pub inputs: Vec<ValueId>,
    /// Output value.
    pub output: ValueId,
}

/// A network: value 0 is the input, node `k` produces value `k + 1`, nodes
/// are in topological order.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    shapes: Vec<Vec<usize>>,
    nodes: Vec<Node>,
    output: ValueId,
}

/// The element count of a shape, or `None` where it overflows `usize`.
/// Every shape that comes from a file goes through this before it sizes
/// anything.
pub fn checked_numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Network {
    /// An empty network (output = input) with the given input shape.
    pub fn new(input_shape: Vec<usize>) -> Self {
        Self { shapes: vec![input_shape], nodes: vec![], output: ValueId(0) }
    }

    /// Appends a node; validates its inputs and infers its output shape. The
    /// network's output becomes the new value.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        source: impl Into<String>,
        layer: Layer,
        inputs: Vec<ValueId>,
    ) -> Result<ValueId, IrError> {
        let name = name.into();
        if inputs.is_empty() {
            return Err(IrError::ShapeMismatch {
                layer: name,
                expected: "at least one input".into(),
                got: vec![],
            });
        }
        for v in &inputs {
            if v.0 >= self.shapes.len() {
                return Err(IrError::BadInput { layer: name, value: v.0 });
            }
        }
        let in_shapes: Vec<&[usize]> = inputs.iter().map(|v| self.shapes[v.0].as_slice()).collect();
        let shape = layer.output_shape(&name, &in_shapes)?;
        if checked_numel(&shape).is_none() {
            return Err(IrError::Overflow {
                layer: name,
                what: format!("the element count of shape {shape:?}"),
            });
        }
        let output = ValueId(self.shapes.len());
        self.shapes.push(shape);
        self.nodes.push(Node { name, source: source.into(), layer, inputs, output });
        self.output = output;
        Ok(output)
    }

    /// The network without the nodes its output does not depend on, values
    /// renumbered in order. The kept nodes, their layers and their input
    /// shapes are unchanged, so they are not checked again (a check reads
    /// every parameter).
    pub fn pruned(self) -> Network {
        let mut live = vec![false; self.shapes.len()];
        live[self.output.0] = true;
        for node in self.nodes.iter().rev() {
            if live[node.output.0] {
                for i in &node.inputs {
                    live[i.0] = true;
                }
            }
        }
        let mut map: Vec<Option<ValueId>> = vec![None; self.shapes.len()];
        map[0] = Some(ValueId(0));
        let Network { mut shapes, nodes, output } = self;
        let mut out = Network::new(std::mem::take(&mut shapes[0]));
        for mut node in nodes {
            if !live[node.output.0] {
                continue;
            }
            for i in &mut node.inputs {
                *i = map[i.0].expect("a live node's inputs are live and earlier");
            }
            let v = ValueId(out.shapes.len());
            out.shapes.push(std::mem::take(&mut shapes[node.output.0]));
            map[node.output.0] = Some(v);
            node.output = v;
            out.nodes.push(node);
        }
        out.output = map[output.0].expect("the output is live");
        out
    }

    /// Replaces node `k`'s layer (and its source label) by one that gives
    /// the same output shape from the same inputs, checked as [`push`]
    /// checks a layer: a pass that folds parameters into a layer.
    ///
    /// [`push`]: Network::push
    ///
    /// # Errors
    /// If `k` is not a node, or the layer does not fit or changes the shape.
    pub fn replace_layer(
        &mut self,
        k: usize,
        layer: Layer,
        source: impl Into<String>,
    ) -> Result<(), IrError> {
        let node =
            self.nodes.get(k).ok_or(IrError::BadInput { layer: format!("#{k}"), value: k })?;
        let in_shapes: Vec<&[usize]> =
            node.inputs.iter().map(|v| self.shapes[v.0].as_slice()).collect();
        let shape = layer.output_shape(&node.name, &in_shapes)?;
        if shape != self.shapes[node.output.0] {
            return Err(IrError::ShapeMismatch {
                layer: node.name.clone(),
                expected: format!("the replaced layer's output {:?}", self.shapes[node.output.0]),
                got: shape,
            });
        }
        let node = &mut self.nodes[k];
        node.layer = layer;
        node.source = source.into();
        Ok(())
    }

    /// Makes every reader of node `k`'s output, and the network's output if
    /// it is that value, read the node's one input instead (of the same
    /// shape); the node is left dead for [`Network::pruned`] to drop.
    ///
    /// # Errors
    /// If `k` is not a node, or it has several inputs or changes the shape.
    pub fn bypass(&mut self, k: usize) -> Result<(), IrError> {
        let node =
            self.nodes.get(k).ok_or(IrError::BadInput { layer: format!("#{k}"), value: k })?;
        let (from, to) = (node.output, node.inputs[0]);
        if node.inputs.len() != 1 || self.shapes[from.0] != self.shapes[to.0] {
            return Err(IrError::ShapeMismatch {
                layer: node.name.clone(),
                expected: "one input of the output's shape (to bypass the node)".into(),
                got: self.shapes[to.0].clone(),
            });
        }
        // readers of `from` come after node k, which comes after `to`
        for n in &mut self.nodes[k + 1..] {
            for i in &mut n.inputs {
                if *i == from {
                    *i = to;
                }
            }
        }
        if self.output == from {
            self.output = to;
        }
        Ok(())
    }

    /// Takes the nodes out (for passes that rebuild the network without
    /// copying layer parameters).
    pub fn into_nodes(self) -> Vec<Node> {
        self.nodes
    }

    /// Makes `v` the network's output.
    pub fn set_output(&mut self, v: ValueId) {
        assert!(v.0 < self.shapes.len(), "output value out of range");
        self.output = v;
    }

    /// Shape of the input (batch dimension 1 kept if the model has one).
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[0]
    }
    /// Number of input elements `n`.
    pub fn input_len(&self) -> usize {
        self.shapes[0].iter().product()
    }
    /// The output value.
    pub fn output(&self) -> ValueId {
        self.output
    }
    /// Shape of the output.
    pub fn output_shape(&self) -> &[usize] {
        &self.shapes[self.output.0]
    }
    /// Number of output elements.
    pub fn output_len(&self) -> usize {
        self.output_shape().iter().product()
    }
    /// Shape of a value.
    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.shapes[v.0]
    }
    /// Element count of a value.
    pub fn numel(&self, v: ValueId) -> usize {
        self.shapes[v.0].iter().product()
    }
    /// The nodes in topological order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    /// The node producing value `v` (None for the input).
    pub fn producer(&self, v: ValueId) -> Option<&Node> {
        v.0.checked_sub(1).map(|k| &self.nodes[k])
    }

    /// For every value, the number of nodes reading it (plus one for the
    /// network output).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.shapes.len()];
        for node in &self.nodes {
            for i in &node.inputs {
                uses[i.0] += 1;
            }
        }
        uses[self.output.0] += 1;
        uses
    }

    /// The nodes the output depends on, in order, if they form a chain
    /// (each node's single input is the previous node's output, starting at
    /// the input). Every network of single-input layers whose dead branches
    /// were pruned is a chain.
    pub fn chain(&self) -> Option<Vec<&Node>> {
        let mut rev = vec![];
        let mut v = self.output;
        while let Some(node) = self.producer(v) {
            if node.inputs.len() != 1 {
                return None;
            }
            rev.push(node);
            v = node.inputs[0];
        }
        rev.reverse();
        Some(rev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::{Expr, Unary};

    /// A dead branch (and a dead node after the output) is dropped, the
    /// values are renumbered, and the output is the unpruned network's.
    #[test]
    fn pruned_drops_dead_nodes_and_keeps_the_output() {
        let mut net = Network::new(vec![1, 4]);
        let act = |f| Layer::Activation(Activation { expr: Expr::unary(f) });
        let dead = net.push("dead", "Tanh", act(Unary::Tanh), vec![ValueId(0)]).unwrap();
        let a = net.push("a", "Relu", act(Unary::Relu), vec![ValueId(0)]).unwrap();
        net.push("dead2", "Abs", act(Unary::Abs), vec![dead]).unwrap();
        let scale = Layer::Affine(Affine::per_element(vec![2.0; 4], vec![1.0; 4]));
        let b = net.push("b", "Mul", scale, vec![a]).unwrap();
        let sum = Layer::Add(Add { coeffs: vec![1.0, -1.0] });
        let out = net.push("sum", "Add", sum, vec![b, a]).unwrap();
        net.push("after", "Abs", act(Unary::Abs), vec![out]).unwrap();
        net.set_output(out);
        let x = [0.5, -1.0, 2.0, -0.25];
        let want = crate::reference::forward::<f64>(&net, &x);
        let p = net.pruned();
        let names: Vec<&str> = p.nodes().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "sum"]);
        assert_eq!(p.nodes()[2].inputs, [ValueId(2), ValueId(1)]);
        assert_eq!(p.output(), ValueId(3));
        assert_eq!(p.shape(p.output()), [1, 4]);
        assert_eq!(crate::reference::forward::<f64>(&p, &x), want);
    }

    /// A replaced layer is checked; a bypassed node's readers and the
    /// output read its input; what does not fit is refused.
    #[test]
    fn replace_layer_and_bypass_check_what_they_change() {
        let mut net = Network::new(vec![1, 3]);
        let dense = |out: usize, w: f64| {
            Layer::Dense(Dense {
                in_features: 3,
                out_features: out,
                weight: vec![w; 3 * out],
                bias: None,
            })
        };
        let d = net.push("d", "Gemm", dense(3, 1.0), vec![ValueId(0)]).unwrap();
        let scale = Layer::Affine(Affine::per_element(vec![2.0; 3], vec![0.5; 3]));
        let a = net.push("a", "Mul", scale, vec![d]).unwrap();
        let relu = Layer::Activation(Activation { expr: Expr::unary(Unary::Relu) });
        net.push("r", "Relu", relu, vec![a]).unwrap();
        assert!(net.replace_layer(0, dense(2, 1.0), "x").is_err(), "a new shape");
        assert!(net.replace_layer(0, dense(3, f64::NAN), "x").is_err(), "a NaN weight");
        assert!(net.replace_layer(7, dense(3, 1.0), "x").is_err(), "no node 7");
        net.replace_layer(0, dense(3, 2.0), "Gemm+Mul").unwrap();
        net.bypass(1).unwrap();
        let p = net.pruned();
        let names: Vec<&str> = p.nodes().iter().map(|n| n.source.as_str()).collect();
        assert_eq!(names, ["Gemm+Mul", "Relu"]);
        assert_eq!(crate::reference::forward::<f64>(&p, &[1.0, -1.0, 0.5]), [1.0; 3]);
        let mut two = Network::new(vec![1, 3]);
        let sum = Layer::Add(Add { coeffs: vec![1.0, 1.0] });
        two.push("s", "Add", sum, vec![ValueId(0), ValueId(0)]).unwrap();
        assert!(two.bypass(0).is_err(), "two inputs");
    }

    /// A large weight tensor (checked in pieces across threads) with one
    /// non-finite value anywhere is refused, as a small one is.
    #[test]
    fn a_non_finite_weight_in_a_large_tensor_is_refused() {
        let (inp, out) = (1024, 300);
        for bad in [0, 77_777, inp * out - 1] {
            for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut weight = vec![0.5; inp * out];
                weight[bad] = v;
                let dense =
                    Layer::Dense(Dense { in_features: inp, out_features: out, weight, bias: None });
                let mut net = Network::new(vec![1, inp]);
                let err = net.push("d", "Gemm", dense, vec![ValueId(0)]).unwrap_err();
                assert!(matches!(err, IrError::NonFinite { .. }), "{err:?}");
            }
        }
        let dense = Layer::Dense(Dense {
            in_features: inp,
            out_features: out,
            weight: vec![0.5; inp * out],
            bias: None,
        });
        assert!(Network::new(vec![1, inp]).push("d", "Gemm", dense, vec![ValueId(0)]).is_ok());
    }
}
