//! The instance compiler and the accumulation of `W` and `b` over the DAG.
//!
//! [`Compiler::new`] builds, once per model, every operator that does not
//! depend on the input (dense weights, convolution Toeplitz matrices, average
//! pooling, batch-norm and other affine diagonals, padding, concatenation and
//! transpose selections). [`Compiler::instance`] runs one forward pass at `x`
//! through those operators and emits the input-dependent ones (activation
//! slopes, max-pool selections, LRN), so that every node is an exact affine
//! map `y = Σ_k A_k·u_k + c` of its inputs at this `x`. [`accumulate`] then
//! forms `W` and `b = Σ_i (∂out/∂node_i)·c_i` in reverse (adjoints flow from
//! the output; they add up at fan-out) or forward (tangents flow from the
//! input; concatenation stacks row blocks) order. `b` is always
//! back-propagated from the offsets, never computed as `F(x) − W·x`.
//!
//! The compiled path never calls the reference interpreter.

pub mod batch;
pub mod matfree;
pub mod plan;
pub mod region;

use std::sync::Arc;

use faer::{Mat, Par};
use nnlin_ir::{ExprClass, Layer, Network, PadMode, PoolKind};
pub use nnlin_ir::{NodeId, ValueId};
pub use nnlin_linalg::Block;
use nnlin_linalg::{
    ChannelScale, ConvGeometry, ConvOp, FixedFactor, KronOp, MatMulOp, Operator, Real, Selection,
    SoftmaxJac, Stage,
};

/// How smooth activations are linearized (piecewise-linear ones always use
/// the linear piece `x` lies on, which both modes agree on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Slope σ'(z), offset σ(z) − σ'(z)·z: `W` is the Jacobian.
    #[default]
    Tangent,
    /// The source paper's rescale: slope σ(z)/z (σ'(0) at z = 0, with σ(0)
    /// as offset), offset 0 otherwise. LRN: the denominator frozen.
    Secant,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Tangent => "tangent",
            Mode::Secant => "secant",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    /// `tangent` or `secant`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tangent" => Ok(Mode::Tangent),
            "secant" => Ok(Mode::Secant),
            other => Err(format!("mode: tangent or secant, got {other:?}")),
        }
    }
}

/// Accumulation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the output side: adjoint blocks with `m` rows.
    Reverse,
    /// From the input side: tangent blocks with `n` columns.
    Forward,
}

/// How convolutions are represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConvKernel {
    /// The faster one. `benches/conv_kernels.rs` measured the structured
    /// operator (im2col + GEMM) 1.7× to 30× faster than the explicit CSR on
    /// every shape and block width tried, and it holds only the kernel, so
    /// `Auto` is structured.
    #[default]
    Auto,
    /// Always the explicit CSR Toeplitz matrix.
    Csr,
    /// Always the structured operator (taps computed on the fly).
    Structured,
}

impl std::fmt::Display for ConvKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvKernel::Auto => "auto",
            ConvKernel::Csr => "csr",
            ConvKernel::Structured => "structured",
        })
    }
}

impl std::str::FromStr for ConvKernel {
    type Err = String;
    /// `auto`, `csr` or `structured`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ConvKernel::Auto),
            "csr" => Ok(ConvKernel::Csr),
            "structured" => Ok(ConvKernel::Structured),
            other => Err(format!("conv kernel: auto, csr or structured, got {other:?}")),
        }
    }
}

/// Errors of the compiler.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum CompileError {
    /// Input length mismatch.
    #[error("input has {got} elements, the model expects {expected}")]
    InputLength {
        /// Model input size.
        expected: usize,
        /// Given size.
        got: usize,
    },
    /// A NaN or infinity appeared in the input or in a layer's output.
    #[error("non-finite value (NaN or Inf) {where_}")]
    NonFinite {
        /// Where it appeared.
        where_: String,
    },
    /// Instances that cannot share one batched reverse pass.
    #[error("cannot batch these instances: {reason}")]
    Batch {
        /// Why.
        reason: &'static str,
    },
    /// A row index out of range.
    #[error("row {row} out of range: the output has {len} elements")]
    RowOutOfRange {
        /// The row.
        row: usize,
        /// Output length.
        len: usize,
    },
}

/// One node compiled at one instance: `y = Σ_k A_k·u_k + bias`.
#[derive(Clone, Debug)]
pub struct CompiledLayer {
    /// Node name.
    pub name: String,
    /// The layer kind (`dense`, `conv`, `activation`, …).
    pub layer_kind: &'static str,
    /// For each input: its value and the operator applied to it.
    pub inputs: Vec<(ValueId, Arc<Operator>)>,
    /// The offset `c` (shared with the compiler when it does not depend on
    /// the input).
    pub bias: Arc<Offset>,
    /// The value this node produces.
    pub output: ValueId,
    /// For activation layers: which units have a nonzero slope.
    pub active: Option<Vec<bool>>,
    /// Whether its operators were lowered at this instance (activations,
    /// max-pooling, products of two branches) rather than shared with the
    /// compiler and every other instance.
    pub per_instance: bool,
}

impl CompiledLayer {
    /// `Σ_k A_k·u_k (+ c)` given all values.
    ///
    /// The first product's buffer becomes `y` and the offset is added to it
    /// in place: `A_0·u_0 + c` has the bits of `c + A_0·u_0` (addition
    /// commutes), and a zero offset still adds `+0.0` (as `0 + t` did).
    /// Every value and product is in `T` ([`Operator::apply_t`]: a dense
    /// layer's or a convolution's sums in `T`, the others' in `f64`,
    /// rounded); in `f64` the same bits as ever.
    fn eval<T: Real>(&self, values: &[Option<Vec<T>>], with_offset: bool, par: Par) -> Vec<T> {
        match self.eval_elementwise(values, None, with_offset, par) {
            Some((y, _)) => y,
            None => self.eval_general::<T>(values, with_offset, par).0,
        }
    }

    /// The layer's output with its offset at an instance's values, and
    /// whether every element is finite. With `last_use` (the first
    /// input's value is read by nothing after this layer) an elementwise
    /// layer takes that value's buffer from `values` and writes its output
    /// over it: no new buffer, no zeroing, no page faults. The finiteness
    /// is found in the same pass. The same bits as [`CompiledLayer::eval`].
    fn eval_checked<T: Real>(
        &self,
        values: &mut [Option<Vec<T>>],
        last_use: bool,
        par: Par,
    ) -> (Vec<T>, bool) {
        let first = self.inputs.first().map(|(v, _)| *v);
        let own = match first {
            Some(v) if last_use && self.elementwise() => values[v.0].take(),
            _ => None,
        };
        match self.eval_elementwise(values, own, true, par) {
            Some(checked) => checked,
            None => self.eval_general::<T>(values, true, par),
        }
    }

    /// Whether every operator acts element by element.
    fn elementwise(&self) -> bool {
        self.inputs.iter().all(|(_, op)| Elementwise::of(op).is_some())
    }

    /// Adds the offset to `y`, elements `lo..` of the first product: `c`
    /// with `with_offset`, else `+0.0` (so that `-0.0` reads as `0 + t`
    /// would).
    fn add_offset<T: Real>(&self, lo: usize, y: &mut [T], with_offset: bool) {
        if with_offset {
            self.bias.add_to(lo, y);
        } else {
            y.iter_mut().for_each(|v| *v += T::ZERO);
        }
    }

    /// [`CompiledLayer::eval`] through each operator's own product in `T`
    /// ([`Operator::apply_t`]), and whether every output element is
    /// finite. The first product is offset, added to the others and
    /// checked chunk by chunk while each chunk is in cache: one pass over
    /// the output.
    fn eval_general<T: Real>(
        &self,
        values: &[Option<Vec<T>>],
        with_offset: bool,
        par: Par,
    ) -> (Vec<T>, bool) {
        let input = |v: ValueId| values[v.0].as_deref().expect("input value alive");
        let ((v0, op0), rest) = self.inputs.split_first().expect("a layer has an input");
        let rest: Vec<Vec<T>> =
            rest.iter().map(|(v, op)| op.apply_t::<T>(input(*v), par)).collect();
        let mut y = op0.apply_t::<T>(input(*v0), par);
        let finite = nnlin_linalg::for_chunks(&mut y, ACTIVATION_CHUNK, par, |lo, y| {
            self.add_offset(lo, y, with_offset);
            for t in &rest {
                for (yi, &ti) in y.iter_mut().zip(&t[lo..]) {
                    *yi += ti;
                }
            }
            all_finite(y, Par::Seq)
        });
        (y, finite)
    }

    /// [`CompiledLayer::eval`] for a layer whose operators are all
    /// elementwise (identity, diagonal, channel scale: a residual sum, a
    /// batch-norm): one pass over the output, `((A_0·u_0 + c) + A_1·u_1) +
    /// …` element by element, the same operations in the same order as
    /// the general path, so the same bits; in chunks across threads when
    /// `par` has them. With `own`, the first input's value itself (taken
    /// from `values`), the output is written over it. Also whether every
    /// output element is finite. `None` for any other layer.
    fn eval_elementwise<T: Real>(
        &self,
        values: &[Option<Vec<T>>],
        own: Option<Vec<T>>,
        with_offset: bool,
        par: Par,
    ) -> Option<(Vec<T>, bool)> {
        let ops: Vec<Elementwise<'_>> =
            self.inputs.iter().map(|(_, op)| Elementwise::of(op)).collect::<Option<_>>()?;
        let input = |v: ValueId| values[v.0].as_deref().expect("input value alive");
        let n = self.inputs.first().map(|(_, op)| op.nrows())?;
        let in_place = own.is_some();
        let chunk = |lo: usize, y: &mut [T]| {
            let len = y.len();
            for (q, ((v, _), op)) in self.inputs.iter().zip(&ops).enumerate() {
                // y = A_0·u_0 (u_0 already in y when in place), then y += A_q·u_q
                let put = |y: &mut [T], s: Option<&[f64]>| match (q, s, in_place) {
                    (0, None, true) => {}
                    (0, Some(s), true) => y.iter_mut().zip(s).for_each(|(y, &s)| *y *= T::of(s)),
                    (0, None, false) => y.copy_from_slice(&input(*v)[lo..lo + len]),
                    (0, Some(s), false) => {
                        let x = &input(*v)[lo..lo + len];
                        y.iter_mut().zip(x).zip(s).for_each(|((y, &x), &s)| *y = T::of(s) * x);
                    }
                    (_, None, _) => {
                        let x = &input(*v)[lo..lo + len];
                        y.iter_mut().zip(x).for_each(|(y, &x)| *y += x);
                    }
                    (_, Some(s), _) => {
                        let x = &input(*v)[lo..lo + len];
                        y.iter_mut().zip(x).zip(s).for_each(|((y, &x), &s)| *y += T::of(s) * x);
                    }
                };
                match op {
                    Elementwise::Identity => put(y, None),
                    Elementwise::Diagonal(d) => put(y, Some(&d[lo..lo + len])),
                    Elementwise::ChannelScale(cs) => {
                        let vals = cs.values();
                        for_blocks(lo, len, cs.spatial(), |a, b, c| {
                            let s = T::of(vals[c]);
                            let y = &mut y[a..b];
                            match (q, in_place) {
                                (0, true) => y.iter_mut().for_each(|y| *y *= s),
                                (0, false) => {
                                    let x = &input(*v)[lo + a..lo + b];
                                    y.iter_mut().zip(x).for_each(|(y, &x)| *y = s * x);
                                }
                                _ => {
                                    let x = &input(*v)[lo + a..lo + b];
                                    y.iter_mut().zip(x).for_each(|(y, &x)| *y += s * x);
                                }
                            }
                        });
                    }
                }
                if q == 0 {
                    // the offset, added to the first product
                    self.add_offset(lo, y, with_offset);
                }
            }
            all_finite(y, Par::Seq)
        };
        let mut y = match own {
            Some(y) => {
                debug_assert_eq!(y.len(), n, "an elementwise layer keeps its length");
                y
            }
            None => vec![T::ZERO; n],
        };
        let finite = nnlin_linalg::for_chunks(&mut y, ACTIVATION_CHUNK, par, chunk);
        Some((y, finite))
    }
}

/// An operator that acts element by element, as
/// [`CompiledLayer::eval_elementwise`] applies it.
enum Elementwise<'a> {
    Identity,
    Diagonal(&'a [f64]),
    ChannelScale(&'a nnlin_linalg::ChannelScale),
}

impl<'a> Elementwise<'a> {
    /// `None` for an operator that mixes elements.
    fn of(op: &'a Operator) -> Option<Self> {
        match op {
            Operator::Identity(_) => Some(Elementwise::Identity),
            Operator::Diagonal(d) => Some(Elementwise::Diagonal(d)),
            Operator::ChannelScale(cs) => Some(Elementwise::ChannelScale(cs)),
            Operator::Dense(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Conv(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_)
            | Operator::Transposed(_) => None,
        }
    }
}

/// Calls `f(a, b, block)` for each piece of `lo..lo + len` within one block
/// of `spatial` elements, with `a..b` relative to `lo` (a zero `spatial`
/// counts as 1, as an empty channel has no elements to visit).
fn for_blocks(lo: usize, len: usize, spatial: usize, mut f: impl FnMut(usize, usize, usize)) {
    let spatial = spatial.max(1);
    let mut i = lo;
    while i < lo + len {
        let b = i / spatial;
        let end = ((b + 1) * spatial).min(lo + len);
        f(i - lo, end - lo, b);
        i = end;
    }
}

/// Whether every element of `y` is finite; in chunks across threads when
/// `par` has them.
fn all_finite<T: Real>(y: &[T], par: Par) -> bool {
    let finite = |c: &[T]| c.iter().fold(true, |a, v| a & v.is_finite());
    if par.degree() > 1 && y.len() > 2 * ACTIVATION_CHUNK {
        use rayon::prelude::*;
        y.par_chunks(ACTIVATION_CHUNK).all(finite)
    } else {
        finite(y)
    }
}

/// A layer's offset `c`, stored as compactly as its structure allows: most
/// layers have none (ReLU, reshapes, convolutions without bias), and a
/// convolution's is one value per channel; storing every element would
/// hold as many values as the network has activations (ResNet-50 at
/// 224×224: 89 MB for the convolutions alone).
#[derive(Clone, Debug, PartialEq)]
pub enum Offset {
    /// All zeros, of this length.
    Zero(usize),
    /// `values[c]` at each of the `spatial` positions of channel `c`.
    PerChannel {
        /// One value per channel.
        values: Vec<f64>,
        /// Positions per channel.
        spatial: usize,
    },
    /// One value per element.
    Full(Vec<f64>),
}

impl From<Vec<f64>> for Offset {
    /// `Zero` where every value is `+0.0`, else `Full`.
    fn from(v: Vec<f64>) -> Self {
        if v.iter().all(|x| x.to_bits() == 0) { Offset::Zero(v.len()) } else { Offset::Full(v) }
    }
}

impl Offset {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Offset::Zero(n) => *n,
            Offset::PerChannel { values, spatial } => values.len() * spatial,
            Offset::Full(v) => v.len(),
        }
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i`.
    pub fn get(&self, i: usize) -> f64 {
        match self {
            Offset::Zero(_) => 0.0,
            Offset::PerChannel { values, spatial } => values[i / spatial],
            Offset::Full(v) => v[i],
        }
    }
    /// Every element.
    pub fn to_vec(&self) -> Vec<f64> {
        match self {
            Offset::Zero(n) => vec![0.0; *n],
            Offset::PerChannel { values, spatial } => {
                values.iter().flat_map(|&v| std::iter::repeat_n(v, *spatial)).collect()
            }
            Offset::Full(v) => v.clone(),
        }
    }
    /// `y += c[lo..lo + y.len()]`, without expanding `c`; in `T`, `c`
    /// rounded to `T`.
    fn add_to<T: Real>(&self, lo: usize, y: &mut [T]) {
        match self {
            Offset::Zero(_) => y.iter_mut().for_each(|v| *v += T::ZERO),
            Offset::PerChannel { values, spatial } => {
                for_blocks(lo, y.len(), *spatial, |a, b, c| {
                    let v = T::of(values[c]);
                    y[a..b].iter_mut().for_each(|t| *t += v);
                });
            }
            Offset::Full(c) => y.iter_mut().zip(&c[lo..]).for_each(|(t, &v)| *t += T::of(v)),
        }
    }
    /// `b += G·c` for an adjoint block `G` (`m × len`), skipping zero
    /// entries of `c`: column by column in order, or for a per-channel `c`
    /// each channel's columns summed first.
    fn add_adjoint_product<T: Real>(&self, g: &Block<T>, b: &mut [T]) {
        let mut add = |j: usize, cj: f64| {
            if cj != 0.0 {
                let cj = T::of(cj);
                for (bi, &gij) in b.iter_mut().zip(g.col_as_slice(j)) {
                    *bi += gij * cj;
                }
            }
        };
        match self {
            Offset::Zero(_) => {}
            Offset::PerChannel { values, spatial } => {
                // b += (Σ_s G[:, (c, s)])·v_c: each channel's columns are one
                // contiguous run, summed as whole stretches of `m·WIDE`
                // entries (independent lanes, vectorized), folded to `m`
                let m = b.len();
                if m == 0 {
                    return;
                }
                let wide = m * Self::WIDE;
                let mut lanes = vec![T::ZERO; wide];
                let mut sum = vec![T::ZERO; m];
                for (c, &v) in values.iter().enumerate() {
                    if v == 0.0 {
                        continue;
                    }
                    let run = &g.as_slice()[c * spatial * m..(c + 1) * spatial * m];
                    lanes.fill(T::ZERO);
                    let mut chunks = run.chunks_exact(wide);
                    for chunk in &mut chunks {
                        for (l, &x) in lanes.iter_mut().zip(chunk) {
                            *l += x;
                        }
                    }
                    sum.fill(T::ZERO);
                    for part in lanes.chunks_exact(m).chain(chunks.remainder().chunks_exact(m)) {
                        for (s, &x) in sum.iter_mut().zip(part) {
                            *s += x;
                        }
                    }
                    let v = T::of(v);
                    for (bi, &si) in b.iter_mut().zip(&sum) {
                        *bi += si * v;
                    }
                }
            }
            Offset::Full(v) => v.iter().enumerate().for_each(|(j, &cj)| add(j, cj)),
        }
    }

    /// [`Offset::add_adjoint_product`] for an adjoint given by its nonzero
    /// columns alone (`cols` ascending, `b.len()` values each in `vals`),
    /// with the same bits: a zero column adds nothing to the sums (they
    /// start at +0 and are never -0).
    fn add_adjoint_product_cols<T: Real>(&self, cols: &[usize], vals: &[T], b: &mut [T]) {
        let m = b.len();
        if m == 0 {
            return;
        }
        let col = |i: usize| &vals[i * m..(i + 1) * m];
        match self {
            Offset::Zero(_) => {}
            Offset::PerChannel { values, spatial } => {
                // the lanes and remainder of the dense sums, filled from
                // the nonzero columns in the same order
                let wide = m * Self::WIDE;
                let full = spatial * m / wide * wide;
                let mut lanes = vec![T::ZERO; wide];
                let mut rest = vec![T::ZERO; spatial * m - full];
                let mut sum = vec![T::ZERO; m];
                let mut i = 0;
                while i < cols.len() {
                    let c = cols[i] / spatial;
                    let end = i + cols[i..].iter().take_while(|&&j| j / spatial == c).count();
                    let v = values[c];
                    if v != 0.0 {
                        lanes.fill(T::ZERO);
                        rest.fill(T::ZERO);
                        for q in i..end {
                            let e = (cols[q] - c * spatial) * m;
                            if e < full {
                                let l = e % wide;
                                for (o, &x) in lanes[l..l + m].iter_mut().zip(col(q)) {
                                    *o += x;
                                }
                            } else {
                                rest[e - full..e - full + m].copy_from_slice(col(q));
                            }
                        }
                        sum.fill(T::ZERO);
                        for part in lanes.chunks_exact(m).chain(rest.chunks_exact(m)) {
                            for (s, &x) in sum.iter_mut().zip(part) {
                                *s += x;
                            }
                        }
                        let v = T::of(v);
                        for (bi, &si) in b.iter_mut().zip(&sum) {
                            *bi += si * v;
                        }
                    }
                    i = end;
                }
            }
            Offset::Full(c) => {
                for (q, &j) in cols.iter().enumerate() {
                    if c[j] != 0.0 {
                        let cj = T::of(c[j]);
                        for (bi, &gij) in b.iter_mut().zip(col(q)) {
                            *bi += gij * cj;
                        }
                    }
                }
            }
        }
    }

    /// Columns summed side by side in [`Offset::add_adjoint_product`]'s
    /// per-channel sums.
    const WIDE: usize = 8;
}

/// A network compiled at one input.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The nodes in topological order.
    pub layers: Vec<CompiledLayer>,
    /// `F(x)` as propagated through the compiled operators.
    pub output: Vec<f64>,
    /// Input length `n`.
    pub input_len: usize,
    /// The output value.
    pub output_value: ValueId,
    /// Element count of every value (indexed by [`ValueId`]'s `.0`).
    pub value_lens: Vec<usize>,
}

impl Instance {
    /// Every value, pushing `start` from the input through the compiled
    /// operators, with or without each node's offset.
    fn propagate(&self, start: &[f64], with_offsets: bool) -> Vec<Option<Vec<f64>>> {
        let mut values: Vec<Option<Vec<f64>>> = vec![None; self.value_lens.len()];
        values[0] = Some(start.to_vec());
        for l in &self.layers {
            values[l.output.0] = Some(l.eval::<f64>(&values, with_offsets, Par::Seq));
        }
        values
    }

    /// `W·x` and `b` over all outputs without forming `W`: the frozen
    /// linear maps applied to `x` (no offsets), and [`Instance::offsets`].
    /// Two passes of matrix–vector products.
    pub fn wx_and_b(&self, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let wx = self.propagate(x, false).swap_remove(self.output_value.0).unwrap_or_default();
        (wx, self.offsets())
    }

    /// `b` over all outputs: the offsets pushed through the frozen maps from
    /// zero, the Horner form of `Σ_i (∂out/∂node_i)·c_i`.
    pub fn offsets(&self) -> Vec<f64> {
        let zero = vec![0.0; self.input_len];
        self.propagate(&zero, true).swap_remove(self.output_value.0).unwrap_or_default()
    }

    /// Every value at `x`, through the compiled operators.
    pub fn values(&self, x: &[f64]) -> Vec<Vec<f64>> {
        self.propagate(x, true).into_iter().map(Option::unwrap_or_default).collect()
    }
}

#[derive(Clone, Debug)]
enum Fixed {
    /// Operators per input and the bias, the same for every instance.
    Ops(Vec<Arc<Operator>>, Arc<Offset>),
    /// Depends on the instance: lowered at each `x` from this payload.
    PerInstance(Dynamic),
}

/// A layer whose operator depends on the instance, with what lowering it
/// needs (each kind once: adding one makes the compiler list every match).
#[derive(Clone, Debug)]
enum Dynamic {
    /// One input.
    Unary(Unary),
    /// A product of two branches.
    Product,
    /// A matrix product of two branches.
    MatMul,
}

/// A one-input layer whose operator depends on the instance.
#[derive(Clone, Debug)]
enum Unary {
    /// Slopes (tangent) or ratios (secant) per unit.
    Activation(nnlin_ir::Activation),
    /// The selected tap per window.
    MaxPool(nnlin_ir::Pool),
    /// The local response normalization's Jacobian or frozen denominator.
    Lrn(nnlin_ir::Lrn),
    /// The softmax Jacobian or per-element ratios.
    Softmax(nnlin_ir::Softmax),
}

/// Per-model compiled state: the input-independent operators.
#[derive(Clone, Debug)]
pub struct Compiler {
    net: Arc<Network>,
    fixed: Vec<Fixed>,
    uses: Vec<usize>,
    kernel: ConvKernel,
}

/// A row-major `rows × cols` matrix as a (column-major) faer matrix,
/// copied in square tiles: column by column it would read `w` with stride
/// `cols` (ResNet-50's 1000 × 2048 classifier: 21 ms of the import, one
/// cache miss per entry).
fn column_major(w: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    const TILE: usize = 32;
    let mut m = Mat::zeros(rows, cols);
    for j0 in (0..cols).step_by(TILE) {
        for i0 in (0..rows).step_by(TILE) {
            for j in j0..(j0 + TILE).min(cols) {
                for i in i0..(i0 + TILE).min(rows) {
                    m[(i, j)] = w[i * cols + j];
                }
            }
        }
    }
    m
}

fn dense_operator(d: &nnlin_ir::Dense, rows: usize) -> (Operator, Vec<f64>) {
    let bias1: Vec<f64> = d.bias.clone().unwrap_or_else(|| vec![0.0; d.out_features]);
    let m = column_major(&d.weight, d.out_features, d.in_features);
    if rows == 1 {
        (Operator::Dense(m.into()), bias1)
    } else {
        // I_rows ⊗ W over a token or channels-last tensor: W held once
        let op = KronOp::new(rows, Arc::new(m)).expect("the network's shapes fit in memory");
        (Operator::Kron(op), (0..rows).flat_map(|_| bias1.iter().copied()).collect())
    }
}

fn conv_operator(c: &nnlin_ir::Conv, kernel: ConvKernel) -> (Operator, Offset) {
    let w = &c.window;
    let geom = ConvGeometry {
        c_in: c.c_in,
        c_out: c.c_out,
        groups: c.groups,
        ih: w.ih,
        iw: w.iw,
        kh: w.kh,
        kw: w.kw,
        stride: (w.sh, w.sw),
        dilation: (w.dh, w.dw),
        pad: (w.pt, w.pl),
        oh: w.oh,
        ow: w.ow,
    };
    let op = ConvOp::new(geom, Arc::clone(&c.weight)).expect("the IR validated the convolution");
    let spatial = w.oh * w.ow;
    let bias = match &c.bias {
        Some(b) => Offset::PerChannel { values: b.clone(), spatial },
        None => Offset::Zero(c.c_out * spatial),
    };
    let csr = match kernel {
        ConvKernel::Csr => true,
        ConvKernel::Structured | ConvKernel::Auto => false,
    };
    (if csr { Operator::Csr(op.to_csr()) } else { Operator::Conv(op) }, bias)
}

fn avgpool_operator(p: &nnlin_ir::Pool, count_include_pad: bool) -> Operator {
    let w = &p.window;
    let mut tri = Vec::new();
    for ch in 0..p.channels {
        for oy in 0..w.oh {
            for ox in 0..w.ow {
                let row = (ch * w.oh + oy) * w.ow + ox;
                let count = if count_include_pad {
                    w.taps_in_padded(oy, ox)
                } else {
                    w.taps_in_input(oy, ox)
                };
                for ky in 0..w.kh {
                    let Some(iy) = w.iy(oy, ky) else { continue };
                    for kx in 0..w.kw {
                        let Some(ix) = w.ix(ox, kx) else { continue };
                        tri.push((row, (ch * w.ih + iy) * w.iw + ix, 1.0 / count as f64));
                    }
                }
            }
        }
    }
    Operator::csr_from_triplets(p.channels * w.oh * w.ow, p.channels * w.ih * w.iw, &tri)
}

/// Row-major strides of a shape.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for ax in (0..shape.len().saturating_sub(1)).rev() {
        s[ax] = s[ax + 1] * shape[ax + 1];
    }
    s
}

fn pad_operator(
    p: &nnlin_ir::Pad,
    in_shape: &[usize],
    out_shape: &[usize],
) -> (Operator, Vec<f64>) {
    let numel: usize = out_shape.iter().product();
    let ist = strides(in_shape);
    let ost = strides(out_shape);
    let mut cols = Vec::with_capacity(numel);
    let mut bias = vec![0.0; numel];
    for (flat, b) in bias.iter_mut().enumerate() {
        let mut src = 0usize;
        let mut zero = false;
        for ax in 0..out_shape.len() {
            let o = (flat / ost[ax]) % out_shape[ax];
            let d = in_shape[ax];
            let i = match o.checked_sub(p.begin[ax]) {
                Some(i) if i < d => i,
                under => match p.mode {
                    PadMode::Constant(_) => {
                        zero = true;
                        0
                    }
                    PadMode::Edge => {
                        if under.is_none() {
                            0
                        } else {
                            d - 1
                        }
                    }
                    PadMode::Reflect => match under {
                        None => p.begin[ax] - o,
                        Some(i) => 2 * (d - 1) - i,
                    },
                },
            };
            src += i * ist[ax];
        }
        if zero {
            if let PadMode::Constant(c) = p.mode {
                *b = c;
            }
            cols.push(Selection::ZERO);
        } else {
            cols.push(src);
        }
    }
    (
        Operator::Selection(
            Selection::new(in_shape.iter().product(), cols).expect("indices within the input"),
        ),
        bias,
    )
}

fn transpose_operator(perm: &[usize], in_shape: &[usize], out_shape: &[usize]) -> Operator {
    let ist = strides(in_shape);
    let ost = strides(out_shape);
    let numel: usize = out_shape.iter().product();
    let cols = (0..numel)
        .map(|flat| {
            (0..perm.len()).map(|ax| ((flat / ost[ax]) % out_shape[ax]) * ist[perm[ax]]).sum()
        })
        .collect();
    Operator::Selection(Selection::new(numel, cols).expect("indices within the input"))
}

fn concat_operators(
    axis: usize,
    in_shapes: &[&[usize]],
    out_shape: &[usize],
) -> Vec<Arc<Operator>> {
    let outer: usize = out_shape[..axis].iter().product();
    let out_inner: usize = out_shape[axis..].iter().product();
    let mut offset = 0;
    in_shapes
        .iter()
        .map(|s| {
            let inner: usize = s[axis..].iter().product();
            let mut cols = vec![Selection::ZERO; outer * out_inner];
            for o in 0..outer {
                for i in 0..inner {
                    cols[o * out_inner + offset + i] = o * inner + i;
                }
            }
            offset += inner;
            Arc::new(Operator::Selection(
                Selection::new(outer * inner, cols).expect("indices within the input"),
            ))
        })
        .collect()
}

impl Compiler {
    /// Prepares a network with the default convolution representation.
    pub fn new(net: &Network) -> Self {
        Self::with_conv_kernel(net, ConvKernel::Auto)
    }

    /// Prepares a network: builds the operators that do not depend on the
    /// input (copies the network; see [`Compiler::from_shared`]).
    pub fn with_conv_kernel(net: &Network, kernel: ConvKernel) -> Self {
        Self::from_shared(Arc::new(net.clone()), kernel)
    }

    /// Prepares a shared network without copying it.
    pub fn from_shared(net: Arc<Network>, kernel: ConvKernel) -> Self {
        let mut fixed = Vec::with_capacity(net.nodes().len());
        for node in net.nodes() {
            let in_shape = net.shape(node.inputs[0]);
            let numel: usize = in_shape.iter().product();
            let one = |op: Operator, bias: Offset| Fixed::Ops(vec![Arc::new(op)], Arc::new(bias));
            let f = match &node.layer {
                Layer::Dense(d) => {
                    let (op, b) = dense_operator(d, numel / d.in_features);
                    one(op, b.into())
                }
                Layer::Affine(a) if a.spatial == 1 => {
                    one(Operator::Diagonal(a.scale.clone()), a.shift.clone().into())
                }
                Layer::Affine(a) => {
                    // one scale and shift per block (a batch-norm's channel)
                    let op = ChannelScale::new(a.scale.clone(), a.spatial)
                        .expect("the network checked the blocks");
                    let bias = Offset::PerChannel { values: a.shift.clone(), spatial: a.spatial };
                    one(Operator::ChannelScale(op), bias)
                }
                Layer::Reshape(_) => one(Operator::Identity(numel), Offset::Zero(numel)),
                Layer::Conv(c) => {
                    let (op, b) = conv_operator(c, kernel);
                    one(op, b)
                }
                Layer::ConvTranspose(t) => {
                    // the adjoint convolution's operator, transposed
                    let (op, _) = conv_operator(&t.conv, kernel);
                    let spatial = t.conv.window.ih * t.conv.window.iw;
                    let bias = match &t.bias {
                        Some(b) => Offset::PerChannel { values: b.clone(), spatial },
                        None => Offset::Zero(t.conv.c_in * spatial),
                    };
                    one(Operator::Transposed(Box::new(op)), bias)
                }
                Layer::Pool(p) => match p.kind {
                    PoolKind::Max => Fixed::PerInstance(Dynamic::Unary(Unary::MaxPool(p.clone()))),
                    PoolKind::Average { count_include_pad } => {
                        let op = avgpool_operator(p, count_include_pad);
                        let rows = op.nrows();
                        one(op, Offset::Zero(rows))
                    }
                },
                Layer::Add(a) => Fixed::Ops(
                    a.coeffs
                        .iter()
                        .map(|&c| {
                            Arc::new(if c == 1.0 {
                                Operator::Identity(numel)
                            } else {
                                Operator::Diagonal(vec![c; numel])
                            })
                        })
                        .collect(),
                    Arc::new(Offset::Zero(numel)),
                ),
                Layer::Concat(c) => {
                    let shapes: Vec<&[usize]> = node.inputs.iter().map(|v| net.shape(*v)).collect();
                    let out = net.shape(node.output);
                    Fixed::Ops(
                        concat_operators(c.axis, &shapes, out),
                        Arc::new(Offset::Zero(out.iter().product())),
                    )
                }
                Layer::Pad(p) => {
                    let (op, b) = pad_operator(p, in_shape, net.shape(node.output));
                    one(op, b.into())
                }
                Layer::Transpose(t) => one(
                    transpose_operator(&t.perm, in_shape, net.shape(node.output)),
                    Offset::Zero(numel),
                ),
                Layer::Select(sel) => {
                    let cols = sel.src.iter().map(|s| s.unwrap_or(Selection::ZERO)).collect();
                    let bias = if sel.fill.is_empty() {
                        Offset::Zero(sel.src.len())
                    } else {
                        sel.fill.clone().into()
                    };
                    one(
                        Operator::Selection(
                            Selection::new(numel, cols).expect("indices within the input"),
                        ),
                        bias,
                    )
                }
                Layer::Reduce(r) => {
                    let w = if r.mean { 1.0 / r.count(in_shape) as f64 } else { 1.0 };
                    let tri: Vec<(usize, usize, f64)> = r
                        .target(in_shape)
                        .into_iter()
                        .enumerate()
                        .map(|(i, t)| (t, i, w))
                        .collect();
                    let rows = net.numel(node.output);
                    one(Operator::csr_from_triplets(rows, numel, &tri), Offset::Zero(rows))
                }
                Layer::Activation(a) => {
                    Fixed::PerInstance(Dynamic::Unary(Unary::Activation(a.clone())))
                }
                Layer::Lrn(l) => Fixed::PerInstance(Dynamic::Unary(Unary::Lrn(l.clone()))),
                Layer::Softmax(sm) => {
                    Fixed::PerInstance(Dynamic::Unary(Unary::Softmax(sm.clone())))
                }
                Layer::Product(_) => Fixed::PerInstance(Dynamic::Product),
                Layer::MatMul(_) => Fixed::PerInstance(Dynamic::MatMul),
            };
            fixed.push(f);
        }
        let uses = net.use_counts();
        Self { net, fixed, uses, kernel }
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.net
    }
    /// The operators every instance shares (those that do not depend on
    /// the input).
    pub fn shared_operators(&self) -> impl Iterator<Item = &Operator> {
        self.fixed
            .iter()
            .filter_map(|f| match f {
                Fixed::Ops(ops, _) => Some(ops),
                Fixed::PerInstance(_) => None,
            })
            .flatten()
            .map(|op| &**op)
    }

    /// Whether convolutions are compiled as explicit CSR matrices.
    pub fn csr_convolutions(&self) -> bool {
        match self.kernel {
            ConvKernel::Csr => true,
            ConvKernel::Structured | ConvKernel::Auto => false,
        }
    }
    /// The shared network.
    pub fn shared_network(&self) -> &Arc<Network> {
        &self.net
    }
    /// Input length `n`.
    pub fn input_len(&self) -> usize {
        self.net.input_len()
    }
    /// Output length.
    pub fn output_len(&self) -> usize {
        self.net.output_len()
    }

    /// Compiles every node at `x` into its affine operator.
    pub fn instance(&self, x: &[f64], mode: Mode) -> Result<Instance, CompileError> {
        self.instance_with(x, mode, Par::Seq)
    }

    /// [`Compiler::instance`] with the forward pass's structured products
    /// (convolutions, `I ⊗ W`, batched matrix products) spread over `par`:
    /// one instance on several threads.
    pub fn instance_with(&self, x: &[f64], mode: Mode, par: Par) -> Result<Instance, CompileError> {
        self.instance_in::<f64>(x, mode, par)
    }

    /// Forms what the network's fixed operators read in `T` (f32 weights,
    /// Winograd kernels), the operators side by side on the current rayon
    /// pool; once per model (later calls find them formed). An instance
    /// compiled in `f32` reads the f32 weights in its forward pass, which
    /// would otherwise round them one operator at a time as it reaches
    /// them (ResNet-50: 25 M weights).
    pub fn prepare<T: Real>(&self) {
        self.prepare_for::<T>(Stage::Reverse);
    }

    /// [`Compiler::prepare`] of what the products of `stage` read (see
    /// [`Operator::prepare_for`]): [`Stage::Forward`] forms what an
    /// instance's forward pass reads, and leaves the Winograd kernels to a
    /// later `Stage::Reverse` call, which may run beside that pass.
    pub fn prepare_for<T: Real>(&self, stage: Stage) {
        use rayon::prelude::*;
        self.fixed
            .par_iter()
            .filter_map(|f| match f {
                Fixed::Ops(ops, _) => Some(ops),
                Fixed::PerInstance(_) => None,
            })
            .flatten()
            .for_each(|op| op.prepare_for::<T>(stage));
    }

    /// [`Compiler::instance_with`] with the forward pass's values in `T`
    /// (the products through [`Operator::apply_t`], activations' slopes
    /// and offsets formed in `f64` from the widened values): for `f32`,
    /// the forward pass of `--precision f32`. The activation
    /// pattern, slopes and selections are then those of the values this
    /// pass computes: a unit whose pre-activation lies within `f32`
    /// rounding of a kink may fall on the other side than in `f64` (as in
    /// PyTorch's float32). In `f64` the same bits as `instance_with`.
    pub fn instance_in<T: Real>(
        &self,
        x: &[f64],
        mode: Mode,
        par: Par,
    ) -> Result<Instance, CompileError> {
        let n = self.net.input_len();
        if x.len() != n {
            return Err(CompileError::InputLength { expected: n, got: x.len() });
        }
        if !x.iter().all(|v| v.is_finite()) {
            return Err(CompileError::NonFinite { where_: "in the input".into() });
        }
        let nvalues = self.net.nodes().len() + 1;
        let mut values: Vec<Option<Vec<T>>> = vec![None; nvalues];
        let mut remaining = self.uses.clone();
        values[0] = Some(T::narrow(x.to_vec()));
        let mut layers = Vec::with_capacity(self.net.nodes().len());
        for (node, fixed) in self.net.nodes().iter().zip(&self.fixed) {
            let v0 = node.inputs[0].0;
            // the first input's value is read by nothing after this layer
            let last_use = remaining[v0] == 1;
            let mut active = None;
            // the layer's output where forming its operator gave it already
            let mut formed = None;
            let (ops, bias) = match fixed {
                Fixed::Ops(ops, bias) => (ops.clone(), bias.clone()),
                Fixed::PerInstance(d @ (Dynamic::Product | Dynamic::MatMul)) => {
                    // two factors that both depend on the input
                    let u = T::widen_slice(values[v0].as_ref().expect("input value alive"));
                    let g = T::widen_slice(
                        values[node.inputs[1].0].as_ref().expect("input value alive"),
                    );
                    let sa = self.net.shape(node.inputs[0]);
                    let sb = self.net.shape(node.inputs[1]);
                    let (ops, bias) = if matches!(d, Dynamic::MatMul) {
                        matmul_operators(&u, &g, sa, sb, mode)
                    } else {
                        product_operators(&u, &g, sa, sb, mode)
                    };
                    (ops.into_iter().map(Arc::new).collect(), Arc::new(Offset::from(bias)))
                }
                Fixed::PerInstance(Dynamic::Unary(d)) => {
                    let src = match d {
                        // an activation writes its output over a dead input
                        Unary::Activation(_) if last_use => {
                            Src::Over(values[v0].take().expect("input value alive"))
                        }
                        Unary::Activation(_)
                        | Unary::MaxPool(_)
                        | Unary::Lrn(_)
                        | Unary::Softmax(_) => {
                            Src::Read(values[v0].as_deref().expect("input value alive"))
                        }
                    };
                    let f = per_instance(d, src, self.net.shape(node.inputs[0]), mode, par);
                    active = f.active;
                    formed = f.output;
                    (vec![Arc::new(f.op)], Arc::new(f.offset))
                }
            };
            let layer = CompiledLayer {
                name: node.name.clone(),
                layer_kind: node.layer.kind(),
                inputs: node.inputs.iter().copied().zip(ops).collect(),
                bias,
                output: node.output,
                active,
                per_instance: matches!(fixed, Fixed::PerInstance(_)),
            };
            let (y, finite) = match formed {
                Some(y) => y,
                None => layer.eval_checked::<T>(&mut values, last_use, par),
            };
            if !finite {
                return Err(CompileError::NonFinite {
                    where_: format!("after layer `{}`", node.name),
                });
            }
            for v in &node.inputs {
                remaining[v.0] -= 1;
                if remaining[v.0] == 0 {
                    values[v.0] = None;
                }
            }
            values[node.output.0] = Some(y);
            layers.push(layer);
        }
        let out = self.net.output();
        let output = T::widen(values[out.0].take().expect("output value"));
        let value_lens = (0..nvalues).map(|v| self.net.numel(ValueId(v))).collect();
        Ok(Instance { layers, output, input_len: n, output_value: out, value_lens })
    }
}

/// The two operators and the offset of `y = a ⊙ broadcast(g)` at (a, g).
/// Tangent: the product rule, `dy = diag(g̃)·da + diag(a)·B·dg` (B the
/// broadcast), offset `−a ⊙ g̃` so that `W·x + b = F(x)`. Secant: the gate is
/// frozen, `y = diag(g̃)·a`, no dependence through g and no offset.
fn product_operators(
    a: &[f64],
    g: &[f64],
    shape: &[usize],
    gate_shape: &[usize],
    mode: Mode,
) -> (Vec<Operator>, Vec<f64>) {
    let idx = nnlin_ir::broadcast_index(shape, gate_shape);
    let gt: Vec<f64> = idx.iter().map(|&k| g[k]).collect();
    let n = a.len();
    match mode {
        Mode::Tangent => {
            let tri: Vec<(usize, usize, f64)> =
                idx.iter().enumerate().map(|(i, &k)| (i, k, a[i])).collect();
            let offset = a.iter().zip(&gt).map(|(p, q)| -p * q).collect();
            (vec![Operator::Diagonal(gt), Operator::csr_from_triplets(n, g.len(), &tri)], offset)
        }
        Mode::Secant => (
            vec![
                Operator::Diagonal(gt),
                Operator::Selection(
                    Selection::new(g.len(), vec![Selection::ZERO; n])
                        .expect("indices within the input"),
                ),
            ],
            vec![0.0; n],
        ),
    }
}

/// The two operators and the offset of `Y = A·B` (batched) at (A, B).
/// Tangent: the product rule, `dY = dA·B + A·dB` (two CSR operators, one
/// entry per multiply-add), offset `−A·B`. Secant: the first factor (the
/// attention weights) is frozen, `Y = Ã·B`, no dependence through A.
fn matmul_operators(
    a: &[f64],
    b: &[f64],
    sa: &[usize],
    sb: &[usize],
    mode: Mode,
) -> (Vec<Operator>, Vec<f64>) {
    let dims = nnlin_ir::MatMul::dims(sa, sb);
    let (batch, m, _, n) = dims;
    let rows = batch * m * n;
    let structured = |fixed, f: &[f64]| {
        Operator::MatMul(
            MatMulOp::new(dims, fixed, f.into()).expect("the network's shapes fit in memory"),
        )
    };
    // on B: dY = A·dB (A fixed)
    let on_b = structured(FixedFactor::Left, a);
    match mode {
        Mode::Tangent => {
            // on A: dY = dA·B (B fixed); offset −A·B
            let on_a = structured(FixedFactor::Right, b);
            let offset = on_b.apply(b).into_iter().map(|v| -v).collect();
            (vec![on_a, on_b], offset)
        }
        Mode::Secant => (
            vec![
                Operator::Selection(
                    Selection::new(a.len(), vec![Selection::ZERO; rows])
                        .expect("indices within the input"),
                ),
                on_b,
            ],
            vec![0.0; rows],
        ),
    }
}

/// The first of `taps` (indices into `plane`, in window order) whose value
/// no later one exceeds, and that value: a max-pool window's argmax, ties
/// to the first as PyTorch, chosen with selects rather than a branch per
/// tap.
///
/// # Panics
/// If `taps` is empty (a window wholly in the padding).
#[inline(always)]
fn first_max<T: Real>(plane: &[T], taps: impl IntoIterator<Item = usize>) -> (usize, T) {
    let mut taps = taps.into_iter();
    let first = taps.next().expect("a pooling window inside the input");
    let mut pick = (first, plane[first]);
    for at in taps {
        let above = plane[at] > pick.1;
        pick = if above { (at, plane[at]) } else { pick };
    }
    pick
}

/// Elements per task of [`activation_instance`].
const ACTIVATION_CHUNK: usize = 1 << 14;

/// A per-instance operator as formed at `u`: the operator, its offset, the
/// activation pattern (activations), and the layer's output where forming
/// the operator computed it (activations), with whether it is all finite.
struct Formed<T> {
    op: Operator,
    offset: Offset,
    active: Option<Vec<bool>>,
    output: Option<(Vec<T>, bool)>,
}

/// A per-instance layer's input value: read, or, where nothing after the
/// layer reads it, handed over for the layer to write its output over.
enum Src<'a, T> {
    Read(&'a [T]),
    Over(Vec<T>),
}

impl<T> Src<'_, T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Src::Read(u) => u,
            Src::Over(u) => u,
        }
    }
}

/// An activation layer at `u`, in one pass over chunks of the units (the
/// chunks in parallel when `par` has threads; the bits do not depend on
/// it): the slope per unit (tangent σ'(z); secant σ(z)/z for a smooth
/// function, σ'(0) at 0), the offset, the activation pattern, and the
/// output `slope·z + offset` with the bits [`CompiledLayer::eval`] gives
/// for the diagonal and offset, and whether that output is all finite.
/// Given [`Src::Over`], the output is written over the input's buffer.
/// Slopes and offsets are formed in `f64` from the values in `T` (exact
/// when widened); the output is rounded to `T`.
///
/// A piecewise-linear function whose one kink is at 0 (ReLU, LeakyReLU,
/// PReLU, Abs) is linear through the origin on each piece, so its offsets
/// `σ(z) − σ'(z)·z` come out `+0.0`: they are checked chunk by chunk and
/// not stored (ResNet-50: 10 M of them); a chunk where one differs forms
/// its offsets apart, from its own copy of the inputs.
fn activation_instance<T: Real>(
    a: &nnlin_ir::Activation,
    u: Src<'_, T>,
    mode: Mode,
    par: Par,
) -> ActivationFormed<T> {
    use rayon::prelude::*;
    let kind = ActivationKind::of(a);
    let ActivationKind { pwl, kink_at_zero, direct } = kind;
    // offsets known to be +0.0 unless shown otherwise
    let sparse = pwl && kink_at_zero;
    let (n, read, mut y) = match u {
        Src::Read(u) => (u.len(), Some(u), vec![T::ZERO; u.len()]),
        Src::Over(u) => (u.len(), None, u),
    };
    let (mut slope, mut active) = (vec![0.0; n], vec![false; n]);
    let mut offset = if sparse { vec![] } else { vec![0.0; n] };
    // one chunk, with two scratch buffers for its inputs and outputs in
    // `f64` (the forms without a direct branch): its offsets where some
    // differ from +0.0 and were not stored, and whether its outputs are
    // all finite
    let chunk = |k: usize,
                 s: &mut [f64],
                 act: &mut [bool],
                 y: &mut [T],
                 c: Option<&mut [f64]>,
                 (z, yf): &mut (Vec<f64>, Vec<f64>)|
     -> (Option<Vec<f64>>, bool) {
        let base = k * ACTIVATION_CHUNK;
        if c.is_none() && direct {
            // ReLU, LeakyReLU, PReLU: one pass over the chunk, in place
            if let Some(u) = read {
                y.copy_from_slice(&u[base..base + y.len()]);
            }
            let mut units = KinkedUnits { y: &mut *y, s: &mut *s, act: &mut *act, bits: 0 };
            let ran = a.expr.kinked_at_zero_runs(base, units.y.len(), &mut units);
            debug_assert!(ran, "a direct form has runs");
            let bits = units.bits;
            let finite = all_finite(y, Par::Seq);
            if bits == 0 {
                return (None, finite);
            }
            // an offset `v − d·z` is not +0.0 only where `v = d·z`
            // (below 0: `α·z` twice; above: `z − z`) is not finite, and
            // the output `d·z + off` is then NaN: the layer fails
            debug_assert!(!finite, "a nonzero offset of a finite output");
            return (None, false);
        }
        z.clear();
        let src: &[T] = match read {
            Some(u) => &u[base..base + y.len()],
            None => y,
        };
        z.extend(src.iter().map(|v| v.to_f64()));
        yf.clear();
        yf.resize(z.len(), 0.0);
        let (z, yo) = (&z[..], &mut yf[..]);
        a.expr.values_and_slopes_into(base, z, yo, s);
        // with the offsets stored, none is left to form; without, the
        // function is piecewise linear with its kink at 0 (`sparse`)
        let done = match c {
            None => pwl_units(z, yo, s, act),
            Some(c) => {
                for ((((s, act), y), &z), c) in
                    s.iter_mut().zip(act).zip(yo.iter_mut()).zip(z).zip(c)
                {
                    let (sl, off) = slope_and_offset(mode, pwl, z, *y, *s);
                    *s = sl;
                    *act = if kink_at_zero { z > 0.0 } else { sl != 0.0 };
                    *y = sl * z + off;
                    *c = off;
                }
                true
            }
        };
        for (y, &v) in y.iter_mut().zip(yo.iter()) {
            *y = T::of(v);
        }
        let finite = all_finite(y, Par::Seq);
        if done {
            return (None, finite);
        }
        // the rare chunk of nonzero offsets: formed again from the inputs
        let (mut v, mut d) = (vec![0.0; z.len()], vec![0.0; z.len()]);
        a.expr.values_and_slopes_into(base, z, &mut v, &mut d);
        let offs =
            z.iter().zip(&v).zip(&d).map(|((&z, &v), &d)| slope_and_offset(mode, pwl, z, v, d).1);
        (Some(offs.collect()), finite)
    };
    const C: usize = ACTIVATION_CHUNK;
    let chunks = n.div_ceil(C);
    let parallel = par.degree() > 1 && n > C;
    let mut offsets: Vec<(Option<Vec<f64>>, bool)> = Vec::with_capacity(chunks);
    let mut c_chunks: Vec<Option<&mut [f64]>> = if sparse {
        (0..chunks).map(|_| None).collect()
    } else {
        offset.chunks_mut(C).map(Some).collect()
    };
    let units =
        slope.chunks_mut(C).zip(active.chunks_mut(C)).zip(y.chunks_mut(C)).zip(c_chunks.drain(..));
    let scratch = || (Vec::new(), Vec::new());
    if parallel {
        let jobs: Vec<_> = units.collect();
        jobs.into_par_iter()
            .enumerate()
            .map_init(scratch, |z, (k, (((s, act), y), c))| chunk(k, s, act, y, c, z))
            .collect_into_vec(&mut offsets);
    } else {
        let mut z = scratch();
        offsets.extend(
            units.enumerate().map(|(k, (((s, act), y), c))| chunk(k, s, act, y, c, &mut z)),
        );
    }
    let finite = offsets.iter().all(|(_, f)| *f);
    let offset = if !sparse {
        Offset::from(offset)
    } else if offsets.iter().all(|(o, _)| o.is_none()) {
        Offset::Zero(n)
    } else {
        let mut full = vec![0.0; n];
        for (k, (o, _)) in offsets.into_iter().enumerate() {
            if let Some(o) = o {
                full[k * C..k * C + o.len()].copy_from_slice(&o);
            }
        }
        Offset::Full(full)
    };
    (slope, offset, active, y, finite)
}

/// [`pwl_units`] in place, run by run, for the activations with one kink
/// at 0 and a direct form ([`nnlin_ir::Expr::kinked_at_zero_runs`]): the
/// inputs in `y`, each unit's slope `s`, pattern `act` and output
/// `s·z + (σ(z) − s·z)` (rounded to `T`) in one pass, the offsets' bits
/// or-ed into `bits`.
struct KinkedUnits<'a, T> {
    y: &'a mut [T],
    s: &'a mut [f64],
    act: &'a mut [bool],
    bits: u64,
}

impl<T: Real> nnlin_ir::KinkedRuns for KinkedUnits<'_, T> {
    fn run(&mut self, lo: usize, hi: usize, form: impl Fn(f64) -> (f64, f64)) {
        let mut bits = 0u64;
        let units = self.y[lo..hi].iter_mut().zip(&mut self.s[lo..hi]).zip(&mut self.act[lo..hi]);
        for ((y, s), act) in units {
            let z = y.to_f64();
            let (v, d) = form(z);
            let (out, on, off) = kinked_unit(z, v, d);
            (*act, *s) = (on, d);
            bits |= off;
            *y = T::of(out);
        }
        self.bits |= bits;
    }
}

/// [`activation_instance`]'s units of a piecewise-linear function with
/// its one kink at 0, whose offsets are not stored: given the inputs `z`,
/// the values `y = σ(z)` and slopes `s = σ'(z)` (the tangent in either
/// mode), writes the pattern (`z > 0`) and the outputs `s·z + (y − s·z)`
/// (the bits of [`slope_and_offset`]'s general loop) in one branch-free
/// loop the compiler vectorizes, and returns whether every offset is
/// `+0.0`.
fn pwl_units(z: &[f64], y: &mut [f64], s: &[f64], act: &mut [bool]) -> bool {
    let n = z.len();
    let (y, s, act) = (&mut y[..n], &s[..n], &mut act[..n]);
    let mut bits = 0u64;
    for i in 0..n {
        let (out, on, off) = kinked_unit(z[i], y[i], s[i]);
        (y[i], act[i]) = (out, on);
        bits |= off;
    }
    bits == 0
}

/// One unit of a piecewise-linear activation with its kink at 0, whose
/// offset is not stored, from its input `z`, value `v = σ(z)` and slope
/// `d`: its output `d·z + (v − d·z)` (the bits of [`slope_and_offset`]'s
/// general loop), its pattern (`z > 0`) and its offset's bits (0 for
/// `+0.0`).
#[inline(always)]
fn kinked_unit(z: f64, v: f64, d: f64) -> (f64, bool, u64) {
    let off = v - d * z;
    (d * z + off, z > 0.0, off.to_bits())
}

/// A unit's slope and offset from its input `z`, its value `v = σ(z)` and
/// its derivative `d = σ'(z)`: tangent `(d, v − d·z)`; secant, for a
/// smooth function away from 0, `(v / z, 0)`.
fn slope_and_offset(mode: Mode, pwl: bool, z: f64, v: f64, d: f64) -> (f64, f64) {
    if mode == Mode::Secant && !pwl && z != 0.0 { (v / z, 0.0) } else { (d, v - d * z) }
}

/// What [`activation_instance`] needs to know of an activation's function,
/// found once per layer (`breakpoints` allocates).
#[derive(Clone, Copy, Debug)]
struct ActivationKind {
    /// Piecewise linear (or simpler): its slopes are tangents in either
    /// mode.
    pwl: bool,
    /// One kink, at 0 (ReLU, LeakyReLU, PReLU, Abs): the activation
    /// pattern is the piece each unit is on, z > 0 (a LeakyReLU unit below
    /// 0 still has a nonzero slope); for the others (Clip, HardSigmoid,
    /// smooth ones) it is a nonzero slope.
    kink_at_zero: bool,
    /// ReLU, LeakyReLU or PReLU: formed unit by unit in one pass
    /// ([`nnlin_ir::Expr::kinked_at_zero_runs`]).
    direct: bool,
}

impl ActivationKind {
    fn of(a: &nnlin_ir::Activation) -> Self {
        ActivationKind {
            pwl: a.expr.class() <= ExprClass::PiecewiseLinear,
            kink_at_zero: a.expr.breakpoints(0).is_some_and(|b| b == [0.0]),
            direct: a.expr.has_kinked_at_zero_runs(),
        }
    }
}

/// An activation at one input: slopes, offset, pattern, outputs and
/// whether they are all finite.
type ActivationFormed<T> = (Vec<f64>, Offset, Vec<bool>, Vec<T>, bool);

/// The operator of a one-input node that depends on its input `u`.
fn per_instance<T: Real>(
    layer: &Unary,
    src: Src<'_, T>,
    in_shape: &[usize],
    mode: Mode,
    par: Par,
) -> Formed<T> {
    match layer {
        Unary::Activation(a) => {
            let (slope, offset, active, y, finite) = activation_instance(a, src, mode, par);
            Formed {
                op: Operator::Diagonal(slope),
                offset,
                active: Some(active),
                output: Some((y, finite)),
            }
        }
        Unary::MaxPool(p) => {
            // the same choices in `T` as in `f64` (widening keeps the order)
            let u = src.as_slice();
            let w = &p.window;
            // the input rows and columns each output row and column reads,
            // in window order (taps in the padding left out)
            let rows: Vec<Vec<usize>> =
                (0..w.oh).map(|oy| (0..w.kh).filter_map(|ky| w.iy(oy, ky)).collect()).collect();
            let cols_in: Vec<Vec<usize>> =
                (0..w.ow).map(|ox| (0..w.kw).filter_map(|kx| w.ix(ox, kx)).collect()).collect();
            let mut cols = Vec::with_capacity(p.channels * w.oh * w.ow);
            let mut y = Vec::with_capacity(p.channels * w.oh * w.ow);
            for ch in 0..p.channels {
                let plane = &u[ch * w.ih * w.iw..(ch + 1) * w.ih * w.iw];
                for ys in &rows {
                    for xs in &cols_in {
                        let (j, best) = match (&ys[..], &xs[..]) {
                            // a whole 2 × 2 window: four taps, unrolled
                            (&[y0, y1], &[x0, x1]) => first_max(
                                plane,
                                [y0 * w.iw + x0, y0 * w.iw + x1, y1 * w.iw + x0, y1 * w.iw + x1],
                            ),
                            _ => first_max(
                                plane,
                                ys.iter().flat_map(|&iy| xs.iter().map(move |&ix| iy * w.iw + ix)),
                            ),
                        };
                        cols.push(ch * w.ih * w.iw + j);
                        y.push(best);
                    }
                }
            }
            let rows = cols.len();
            // the selected inputs themselves: the bits the selection's
            // product gives
            let finite = all_finite(&y, Par::Seq);
            Formed {
                op: Operator::Selection(
                    Selection::new(u.len(), cols).expect("indices within the input"),
                ),
                offset: Offset::Zero(rows),
                active: None,
                output: Some((y, finite)),
            }
        }
        Unary::Softmax(sm) => {
            let u = T::widen_slice(src.as_slice());
            let u = &u[..];
            // values of each slice, shifted by its largest element
            let mut y = vec![0.0; u.len()];
            let mut s = vec![0.0; u.len()];
            for idx in sm.slices(in_shape) {
                let top = idx.iter().map(|&i| u[i]).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = idx.iter().map(|&i| (u[i] - top).exp()).sum();
                for &i in &idx {
                    s[i] = (u[i] - top).exp() / sum;
                    y[i] = if sm.log { u[i] - top - sum.ln() } else { s[i] };
                }
            }
            match mode {
                Mode::Tangent => {
                    // softmax: diag(s) − s·sᵀ; log-softmax: I − 1·sᵀ, per
                    // slice, applied structurally; offset y − J·u
                    let len = in_shape[sm.axis];
                    let inner: usize = in_shape[sm.axis + 1..].iter().product();
                    let outer: usize = in_shape[..sm.axis].iter().product();
                    let jac = SoftmaxJac::new(outer, len, inner, s, sm.log)
                        .expect("probabilities of the input's shape");
                    let ju = jac.apply(u);
                    let offset =
                        Offset::from(y.iter().zip(&ju).map(|(v, j)| v - j).collect::<Vec<_>>());
                    Formed { op: Operator::Softmax(jac), offset, active: None, output: None }
                }
                // secant: each output its own ratio y/z (the normalizer frozen
                // with the rest of the slice); where z = 0 the value is offset
                Mode::Secant => {
                    let mut offset = vec![0.0; u.len()];
                    let ratio = u
                        .iter()
                        .zip(&y)
                        .zip(offset.iter_mut())
                        .map(|((&z, &v), o)| {
                            if z == 0.0 {
                                *o = v;
                                0.0
                            } else {
                                v / z
                            }
                        })
                        .collect();
                    Formed {
                        op: Operator::Diagonal(ratio),
                        offset: Offset::from(offset),
                        active: None,
                        output: None,
                    }
                }
            }
        }
        Unary::Lrn(l) => {
            let u = T::widen_slice(src.as_slice());
            let u = &u[..];
            let channels = in_shape[1];
            let spatial: usize = in_shape[2..].iter().product();
            let k = l.alpha / l.size as f64;
            let mut diag = Vec::with_capacity(u.len());
            let mut tri = Vec::new();
            let mut offset = vec![0.0; u.len()];
            for c in 0..channels {
                let win = l.window(c, channels);
                for s in 0..spatial {
                    let sq: f64 = win.clone().map(|cc| u[cc * spatial + s].powi(2)).sum();
                    let d = l.bias + k * sq;
                    let inv = d.powf(-l.beta);
                    let row = c * spatial + s;
                    match mode {
                        Mode::Secant => diag.push(inv),
                        Mode::Tangent => {
                            // ∂y_c/∂x_j = δ_cj·d^-β − 2βk·x_c·x_j·d^(-β-1)
                            let xc = u[row];
                            let g = -2.0 * l.beta * k * xc * d.powf(-l.beta - 1.0);
                            let mut jx = 0.0;
                            for cc in win.clone() {
                                let j = cc * spatial + s;
                                let mut v = g * u[j];
                                if cc == c {
                                    v += inv;
                                }
                                tri.push((row, j, v));
                                jx += v * u[j];
                            }
                            offset[row] = xc * inv - jx;
                        }
                    }
                }
            }
            let op = match mode {
                Mode::Secant => Operator::Diagonal(diag),
                Mode::Tangent => Operator::csr_from_triplets(u.len(), u.len(), &tri),
            };
            Formed { op, offset: Offset::from(offset), active: None, output: None }
        }
    }
}

/// The adjoint `∂F_row/∂v` of every value `v` (one reverse pass for one
/// output row); `None` for values the row does not depend on.
pub fn adjoints(
    inst: &Instance,
    row: usize,
    par: Par,
) -> Result<Vec<Option<Vec<f64>>>, CompileError> {
    let out_len = inst.output.len();
    if row >= out_len {
        return Err(CompileError::RowOutOfRange { row, len: out_len });
    }
    let mut g0 = Block::zeros(1, out_len);
    g0[(0, row)] = 1.0;
    let mut adj: Vec<Option<Vec<f64>>> = vec![None; inst.value_lens.len()];
    reverse_pass(
        inst,
        g0,
        ValueId(0),
        par,
        Some(&mut |v, g: &Block| {
            adj[v.0] = Some(g.as_slice().to_vec());
        }),
    );
    Ok(adj)
}

/// Estimated multiply-adds of accumulating `m` rows in `dir` order (see
/// [`plan::direction_cost`] for the full cost).
pub fn estimated_flops(inst: &Instance, m: usize, dir: Direction) -> f64 {
    plan::direction_cost(inst, m, dir).flops()
}

/// Checks that every selected row is an output.
pub(crate) fn check_rows(inst: &Instance, rows: &[usize]) -> Result<(), CompileError> {
    let len = inst.output.len();
    match rows.iter().find(|&&r| r >= len) {
        Some(&row) => Err(CompileError::RowOutOfRange { row, len }),
        None => Ok(()),
    }
}

fn add_into<T: Real>(acc: &mut Option<Block<T>>, x: Block<T>) {
    match acc {
        None => *acc = Some(x),
        Some(a) => a.add_assign(&x),
    }
}

/// With a parallel `par`, what `inst`'s reverse products read in `T` (f32
/// weights, Winograd kernels) formed side by side, not one at a time on
/// one thread as the products first reach them (ResNet-50: 25 M weights).
pub(crate) fn prepare_products<T: Real>(inst: &Instance, par: Par) {
    if par.degree() > 1 {
        use rayon::prelude::*;
        inst.layers
            .par_iter()
            .flat_map_iter(|l| l.inputs.iter())
            .for_each(|(_, op)| op.prepare::<T>());
    }
}

/// A forward tangent: the identity (the input itself) or a dense block.
pub(crate) enum Tangent {
    Identity,
    Dense(Block),
}

/// `W` (`rows.len() × n`) and `b` (`rows.len()`) of the selected output rows
/// by reverse accumulation with every product in `T` (`f32` or `f64`; in
/// `f64` the same bits as [`accumulate`] with [`Direction::Reverse`]).
pub fn accumulate_reverse<T: Real>(
    inst: &Instance,
    rows: &[usize],
    par: Par,
) -> Result<(Block<T>, Vec<T>), CompileError> {
    check_rows(inst, rows)?;
    prepare_products::<T>(inst, par);
    let (g, b) = reverse_to(inst, rows, ValueId(0), par);
    Ok((g.unwrap_or_else(|| Block::zeros(rows.len(), inst.input_len)), b))
}

/// `W` (`rows.len() × n`) and `b` (`rows.len()`) of the selected output rows.
pub fn accumulate(
    inst: &Instance,
    rows: &[usize],
    dir: Direction,
    par: Par,
) -> Result<(Block, Vec<f64>), CompileError> {
    check_rows(inst, rows)?;
    let (m, n) = (rows.len(), inst.input_len);
    Ok(match dir {
        Direction::Reverse => {
            let (g, b) = reverse_to(inst, rows, ValueId(0), par);
            (g.unwrap_or_else(|| Block::zeros(m, n)), b)
        }
        Direction::Forward => {
            let (t, bias) = forward_to(inst, inst.output_value, par);
            let w = match t {
                Tangent::Identity => Block::from_fn(m, n, |i, j| f64::from(u8::from(rows[i] == j))),
                Tangent::Dense(t) => Block::from_fn(m, n, |i, j| t[(rows[i], j)]),
            };
            (w, rows.iter().map(|&r| bias[r]).collect())
        }
    })
}

/// Reverse accumulation over the nodes after value `stop`: the adjoint of
/// `stop` (`None` if the rows do not depend on it) and the offsets of those
/// nodes pushed back (`Σ` adjoint · c).
pub(crate) fn reverse_to<T: Real>(
    inst: &Instance,
    rows: &[usize],
    stop: ValueId,
    par: Par,
) -> (Option<Block<T>>, Vec<T>) {
    let mut g0 = Block::zeros(rows.len(), inst.output.len());
    for (i, &r) in rows.iter().enumerate() {
        g0[(i, r)] = T::ONE;
    }
    reverse_from(inst, g0, stop, par)
}

/// [`reverse_to`] from any output adjoint `g0` (`k × outputs`): `g0·J` at
/// value `stop` and `g0`'s rows of the pushed-back offsets.
pub(crate) fn reverse_from<T: Real>(
    inst: &Instance,
    g0: Block<T>,
    stop: ValueId,
    par: Par,
) -> (Option<Block<T>>, Vec<T>) {
    reverse_pass(inst, g0, stop, par, None)
}

/// A layer's adjoint as a product receives it: owned where the layer has
/// one input (identity and diagonal factors then scale it in its own
/// buffer), else borrowed (every input reads it).
pub(crate) enum Adjoint<'a, T: Real> {
    Owned(Block<T>),
    Shared(&'a Block<T>),
}

impl<T: Real> Adjoint<'_, T> {
    /// The block.
    pub(crate) fn block(&self) -> &Block<T> {
        match self {
            Adjoint::Owned(g) => g,
            Adjoint::Shared(g) => g,
        }
    }
    /// `G·A`, in `G`'s buffer where it is owned.
    pub(crate) fn left_mul(self, op: &Operator, par: Par) -> Block<T> {
        match self {
            Adjoint::Owned(g) => op.left_mul_owned(g, par),
            Adjoint::Shared(g) => op.left_mul(g, par),
        }
    }
}

/// How [`reverse_pass`] pushes a layer's adjoint back: what one instance
/// does ([`OneInstance`]), or a batch of instances whose rows are stacked
/// (`batch::Stacked`).
pub(crate) trait Pushback<T: Real> {
    /// `b += G·c` for node `k`'s offset `c`.
    fn offset(&self, k: NodeId, g: &Block<T>, b: &mut [T]);
    /// `G·A` for node `k`'s operator on its input `j`.
    fn product(&self, k: NodeId, j: usize, g: Adjoint<'_, T>) -> Block<T>;
    /// The one instance whose own operators every product applies, if so
    /// (what [`PoolChain::fused`] may then multiply directly).
    fn alone(&self) -> Option<&Instance>;
}

/// One instance's push-back: its own offsets and operators.
struct OneInstance<'a> {
    inst: &'a Instance,
    par: Par,
}

impl<T: Real> Pushback<T> for OneInstance<'_> {
    fn offset(&self, k: NodeId, g: &Block<T>, b: &mut [T]) {
        self.inst.layers[k.0].bias.add_adjoint_product(g, b);
    }
    fn product(&self, k: NodeId, j: usize, g: Adjoint<'_, T>) -> Block<T> {
        g.left_mul(&self.inst.layers[k.0].inputs[j].1, self.par)
    }
    fn alone(&self) -> Option<&Instance> {
        Some(self.inst)
    }
}

/// What [`reverse_walk`] shows each value's adjoint to.
pub(crate) type Visit<'a, T> = &'a mut dyn FnMut(ValueId, &Block<T>);

/// [`reverse_walk`] through one instance's own offsets and operators.
fn reverse_pass<T: Real>(
    inst: &Instance,
    g0: Block<T>,
    stop: ValueId,
    par: Par,
    visit: Option<Visit<'_, T>>,
) -> (Option<Block<T>>, Vec<T>) {
    reverse_walk(inst, g0, stop, &OneInstance { inst, par }, visit)
}

/// The one reverse pass: over the nodes of `inst` after value `stop`, from
/// the output adjoint `g0` (`k × outputs`), each node's adjoint pushed to
/// its inputs by `push`. `visit(v, adjoint)` sees each value's adjoint once
/// it is complete (every reader of `v` has added its share), the output's
/// first and `stop`'s last. Without a visitor, a max-pool after an
/// activation after a convolution may be pushed through in one step
/// ([`PoolChain::fused`]). Returns the adjoint at `stop` (`None` if the rows do
/// not depend on it) and `g0`'s rows of the pushed-back offsets (`Σ`
/// adjoint · c).
pub(crate) fn reverse_walk<T: Real>(
    inst: &Instance,
    g0: Block<T>,
    stop: ValueId,
    push: &dyn Pushback<T>,
    mut visit: Option<Visit<'_, T>>,
) -> (Option<Block<T>>, Vec<T>) {
    let m = g0.nrows();
    let mut adj: Vec<Option<Block<T>>> = (0..inst.value_lens.len()).map(|_| None).collect();
    adj[inst.output_value.0] = Some(g0);
    let mut b = vec![T::ZERO; m];
    let chain = push.alone().filter(|_| visit.is_none()).map(|inst| PoolChain::new(inst, stop));
    for (k, layer) in inst.layers.iter().enumerate().rev().filter(|(_, l)| l.output > stop) {
        let Some(g) = adj[layer.output.0].take() else { continue };
        if let Some(f) = chain.as_ref().and_then(|c| c.fused(k, &g)) {
            // the pool's and the activation's offsets are zero, their
            // adjoints read by nothing else: straight to the conv's input
            f.layer.bias.add_adjoint_product_cols(&f.cols, &f.vals, &mut b);
            let into = f.layer.inputs[0].0;
            add_into(&mut adj[into.0], f.conv.backward_sparse_cols(m, &f.cols, &f.vals));
            continue;
        }
        if let Some(visit) = visit.as_mut() {
            visit(layer.output, &g);
        }
        push.offset(NodeId(k), &g, &mut b);
        let single = layer.inputs.len() == 1;
        let mut g = Some(g);
        for (j, (v, _)) in layer.inputs.iter().enumerate() {
            // a layer's only input takes the adjoint over: identity and
            // diagonal factors (activations) scale it in place
            let a = if single {
                Adjoint::Owned(g.take().expect("adjoint"))
            } else {
                Adjoint::Shared(g.as_ref().expect("adjoint"))
            };
            add_into(&mut adj[v.0], push.product(NodeId(k), j, a));
        }
    }
    if let (Some(g), Some(visit)) = (&adj[stop.0], visit.as_mut()) {
        visit(stop, g);
    }
    (adj[stop.0].take(), b)
}

/// A max-pool's adjoint pushed back through the activation before it to
/// the convolution before that ([`PoolChain::fused`]).
struct Fused<'a, T> {
    /// The convolution's layer.
    layer: &'a CompiledLayer,
    /// Its operator.
    conv: &'a ConvOp,
    /// The nonzero columns of its output's adjoint, ascending.
    cols: Vec<usize>,
    /// Their values, the adjoint's rows for each.
    vals: Vec<T>,
}

/// One instance's layers as [`reverse_walk`] sees them for the fused
/// step: how many layers read each value, which layer writes it, and the
/// value the walk stops at.
struct PoolChain<'a> {
    inst: &'a Instance,
    readers: Vec<usize>,
    writer: Vec<Option<usize>>,
    stop: ValueId,
}

impl<'a> PoolChain<'a> {
    /// `inst`'s readers and writers, for a walk that stops at `stop`.
    fn new(inst: &'a Instance, stop: ValueId) -> Self {
        let mut readers = vec![0; inst.value_lens.len()];
        let mut writer = vec![None; inst.value_lens.len()];
        for (k, l) in inst.layers.iter().enumerate() {
            l.inputs.iter().for_each(|(v, _)| readers[v.0] += 1);
            writer[l.output.0] = Some(k);
        }
        PoolChain { inst, readers, writer, stop }
    }

    /// Layer `at` and its only input, if `at` has one input and writes
    /// value `v`, and `v` is after `stop` and read by no other layer.
    fn sole(
        &self,
        v: ValueId,
        at: usize,
    ) -> Option<(&'a CompiledLayer, &'a (ValueId, Arc<Operator>))> {
        let l = &self.inst.layers[at];
        let [input] = &l.inputs[..] else { return None };
        (self.writer[v.0] == Some(at) && v > self.stop && self.readers[v.0] == 1)
            .then_some((l, input))
    }

    /// Layer `k`'s adjoint `g` pushed through a max-pool (a selection) at
    /// `k`, the activation (a diagonal) before it and the convolution
    /// before that, as [`Operator::left_mul`] would push it one layer at a
    /// time and with the same bits, where the convolution then takes its
    /// scatter. Formed from the pool's selected columns alone, so the zero
    /// three quarters of a 2 × 2 pool's input adjoint are never written,
    /// scaled or searched. The three layers must follow one another, so
    /// that every other offset and adjoint is still added in the walk's
    /// order.
    fn fused<T: Real>(&self, k: usize, g: &Block<T>) -> Option<Fused<'a, T>> {
        let pool = &self.inst.layers[k];
        let ([(v, sel)], Offset::Zero(_)) = (&pool.inputs[..], &*pool.bias) else {
            return None;
        };
        let Operator::Selection(sel) = &**sel else { return None };
        let (act, (u, d)) = self.sole(*v, k.checked_sub(1)?)?;
        let (Operator::Diagonal(d), Offset::Zero(_)) = (&**d, &*act.bias) else { return None };
        // (the convolution's own offset is pushed back by the caller)
        let (layer, (_, conv)) = self.sole(*u, k.checked_sub(2)?)?;
        let Operator::Conv(conv) = &**conv else { return None };
        // at most one nonzero column per pooled output whose selected unit
        // has a nonzero slope: where even that many would not take the
        // scatter, the sparse form is not formed. (Counting the pooled
        // outputs alone is no bound to decide by: a 2 × 2 pool after a
        // convolution with few positions sits at the active kernel's
        // lower edge, `ACTIVE_MIN_CHANNELS` per position, LeNet-5's
        // second convolution exactly.)
        let bound = sel.cols().iter().filter(|&&c| d.get(c).is_some_and(|&s| s != 0.0)).count();
        if !nnlin_linalg::conv_takes_scatter(conv, bound.min(conv.nrows())) {
            return None;
        }
        let (cols, vals) = sel.pushed_through(g, d);
        nnlin_linalg::conv_takes_scatter(conv, cols.len()).then_some(Fused {
            layer,
            conv,
            cols,
            vals,
        })
    }
}

/// Forward accumulation over the nodes up to value `stop`: its tangent
/// (`numel(stop) × n`) and its offset (the offsets pushed forward from 0).
fn forward_to(inst: &Instance, stop: ValueId, par: Par) -> (Tangent, Vec<f64>) {
    let (t, off) = forward_pass(inst, Tangent::Identity, stop, true, par, &mut |_, _| {});
    (t.expect("tangent at stop"), off.expect("offset at stop"))
}

/// The one forward pass: over the nodes whose output is value `stop` or
/// before, from the input's tangent `t0` (the identity, or a block of its
/// columns), each node's tangent formed from its inputs'. `visit(k,
/// tangents)` sees node `k`'s input tangents before it runs. With
/// `offsets`, each value's offset too (the offsets pushed forward from
/// the input's 0). Returns `stop`'s tangent and offset.
pub(crate) fn forward_pass(
    inst: &Instance,
    t0: Tangent,
    stop: ValueId,
    offsets: bool,
    par: Par,
    visit: &mut dyn FnMut(NodeId, &[&Tangent]),
) -> (Option<Tangent>, Option<Vec<f64>>) {
    let n = inst.input_len;
    let nvalues = inst.value_lens.len();
    let layers: Vec<(NodeId, &CompiledLayer)> = inst
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.output <= stop)
        .map(|(k, l)| (NodeId(k), l))
        .collect();
    let mut remaining = vec![0usize; nvalues];
    for (_, l) in &layers {
        for (v, _) in &l.inputs {
            remaining[v.0] += 1;
        }
    }
    let mut tan: Vec<Option<Tangent>> = (0..nvalues).map(|_| None).collect();
    let mut off: Vec<Option<Vec<f64>>> = vec![None; nvalues];
    tan[0] = Some(t0);
    if offsets {
        off[0] = Some(vec![0.0; n]);
    }
    for (k, layer) in layers {
        {
            let ins: Vec<&Tangent> = layer
                .inputs
                .iter()
                .map(|(v, _)| tan[v.0].as_ref().expect("tangent alive"))
                .collect();
            visit(k, &ins);
        }
        let mut t: Option<Tangent> = None;
        let mut c = offsets.then(|| layer.bias.to_vec());
        for (v, op) in &layer.inputs {
            let tv = tan[v.0].as_ref().expect("tangent alive");
            let contrib = match (tv, &**op) {
                (Tangent::Identity, Operator::Identity(_)) => Tangent::Identity,
                (Tangent::Identity, op) => Tangent::Dense(op.to_dense()),
                (Tangent::Dense(b), op) => Tangent::Dense(op.right_mul(b, par)),
            };
            t = Some(match (t, contrib) {
                (None, x) => x,
                (Some(a), x) => {
                    let dense = |t: Tangent| match t {
                        Tangent::Identity => Block::identity(n, n),
                        Tangent::Dense(b) => b,
                    };
                    let mut sum = dense(a);
                    sum.add_assign(&dense(x));
                    Tangent::Dense(sum)
                }
            });
            if let Some(c) = c.as_mut() {
                for (ci, t) in c.iter_mut().zip(op.apply(off[v.0].as_ref().expect("offset alive")))
                {
                    *ci += t;
                }
            }
            remaining[v.0] -= 1;
            if remaining[v.0] == 0 && *v != stop {
                tan[v.0] = None;
                off[v.0] = None;
            }
        }
        tan[layer.output.0] = t;
        off[layer.output.0] = c;
    }
    (tan[stop.0].take(), off[stop.0].take())
}

/// `W` and `b` split at the cut value `cut` (every path from the input to the
/// output passes through it): forward accumulation up to the cut, reverse
/// accumulation down to it, one GEMM to join them.
pub fn accumulate_split(
    inst: &Instance,
    rows: &[usize],
    cut: ValueId,
    par: Par,
) -> Result<(Block, Vec<f64>), CompileError> {
    check_rows(inst, rows)?;
    let (m, n) = (rows.len(), inst.input_len);
    let (g, mut b) = reverse_to(inst, rows, cut, par);
    let Some(g) = g else { return Ok((Block::zeros(m, n), b)) };
    let (t, off) = forward_to(inst, cut, par);
    for (bi, row) in b.iter_mut().zip(0..m) {
        *bi += (0..off.len()).map(|j| g[(row, j)] * off[j]).sum::<f64>();
    }
    let w = match t {
        Tangent::Identity => g,
        Tangent::Dense(t) => {
            let mut w = Block::zeros(m, n);
            faer::linalg::matmul::matmul(
                w.as_mut(),
                faer::Accum::Replace,
                g.as_ref(),
                t.as_ref(),
                1.0,
                par,
            );
            w
        }
    };
    Ok((w, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The activation pass, reading its input or writing over it,
    /// sequential and across threads, gives each unit's slope, offset and
    /// output as the per-unit formula does, bit for bit, signed zeros and
    /// kinks included: a function with one kink at 0 stores no offsets,
    /// Clip keeps them, and a chunk whose offsets overflow to NaN (a huge
    /// leak slope) has its outputs reported not finite. In `f32`, the
    /// formula at the widened values, each output rounded once.
    #[test]
    fn activation_pass_matches_the_per_unit_formula() {
        use nnlin_ir::{Binary, Expr, ExprNode, Unary as U};
        let n = 3 * ACTIVATION_CHUNK + 17;
        let mut u: Vec<f64> = (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => -0.0,
                _ => ((i * 37) % 201) as f64 / 50.0 - 2.0,
            })
            .collect();
        let mut prelu = Expr::var();
        let slope = prelu.push_const((0..n).map(|i| (i % 5) as f64 / 10.0).collect());
        prelu.push(ExprNode::Binary(Binary::PRelu, 0, slope));
        let acts = [
            (Expr::unary(U::Relu), false, false),
            (Expr::unary(U::LeakyRelu { alpha: 0.01 }), false, false),
            (Expr::unary(U::Abs), false, false),
            (prelu, false, false),
            (Expr::unary(U::Clip { min: -1.0, max: 1.0 }), true, false),
            (Expr::unary(U::LeakyRelu { alpha: 1e300 }), false, true),
        ];
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (expr, offsets, overflow) in acts {
            if overflow {
                // in the second chunk only: 1e300 · −1e10 overflows
                u[ACTIVATION_CHUNK + 5] = -1e10;
            }
            let a = nnlin_ir::Activation { expr };
            for mode in [Mode::Tangent, Mode::Secant] {
                let (mut v, mut d) = (vec![0.0; n], vec![0.0; n]);
                a.expr.values_and_slopes_into(0, &u, &mut v, &mut d);
                let kind = ActivationKind::of(&a);
                let want: Vec<(f64, f64)> =
                    (0..n).map(|i| slope_and_offset(mode, kind.pwl, u[i], v[i], d[i])).collect();
                let want_y: Vec<f64> = (0..n).map(|i| want[i].0 * u[i] + want[i].1).collect();
                for par in [Par::Seq, Par::rayon(2)] {
                    for over in [false, true] {
                        let src = if over { Src::Over(u.clone()) } else { Src::Read(&u) };
                        let got = activation_instance(&a, src, mode, par);
                        let slopes: Vec<f64> = want.iter().map(|w| w.0).collect();
                        assert_eq!(bits(&got.0), bits(&slopes), "{:?}", a.expr);
                        let offs: Vec<f64> = want.iter().map(|w| w.1).collect();
                        match (&got.1, offsets || overflow) {
                            // a layer whose output is not finite fails: its
                            // offsets are not read (the one-pass forms leave
                            // them unformed)
                            (_, true) if overflow && !got.4 => {}
                            (Offset::Zero(len), false) => assert_eq!(*len, n),
                            (Offset::Full(o), true) => {
                                assert_eq!(o.len(), n);
                                for (g, w) in o.iter().zip(&offs) {
                                    assert!(g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan());
                                }
                            }
                            (o, _) => panic!("{:?}: offset {o:?}", a.expr),
                        }
                        if kind.kink_at_zero {
                            assert!(got.2.iter().zip(&u).all(|(&act, &z)| act == (z > 0.0)));
                        }
                        assert_eq!(got.4, want_y.iter().all(|y| y.is_finite()));
                        assert_eq!(got.4, !overflow);
                        for (g, w) in got.3.iter().zip(&want_y) {
                            assert!(g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan());
                        }
                    }
                }
                // in f32: the formula at the widened f32 values, the
                // outputs rounded to f32 (finite only if they stay so)
                let u32: Vec<f32> = u.iter().map(|&z| z as f32).collect();
                let w: Vec<f64> = u32.iter().map(|&z| f64::from(z)).collect();
                a.expr.values_and_slopes_into(0, &w, &mut v, &mut d);
                let want: Vec<(f64, f64)> =
                    (0..n).map(|i| slope_and_offset(mode, kind.pwl, w[i], v[i], d[i])).collect();
                let want_y: Vec<f32> =
                    (0..n).map(|i| (want[i].0 * w[i] + want[i].1) as f32).collect();
                for par in [Par::Seq, Par::rayon(2)] {
                    for over in [false, true] {
                        let src = if over { Src::Over(u32.clone()) } else { Src::Read(&u32) };
                        let got = activation_instance::<f32>(&a, src, mode, par);
                        let slopes: Vec<f64> = want.iter().map(|w| w.0).collect();
                        assert_eq!(bits(&got.0), bits(&slopes), "f32 {:?}", a.expr);
                        if kind.kink_at_zero {
                            assert!(got.2.iter().zip(&w).all(|(&act, &z)| act == (z > 0.0)));
                        }
                        assert_eq!(got.4, want_y.iter().all(|y| y.is_finite()));
                        for (g, w) in got.3.iter().zip(&want_y) {
                            assert!(g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan());
                        }
                        if got.4 && !offsets {
                            assert_eq!(got.1, Offset::Zero(n), "f32 {:?}", a.expr);
                        }
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// The fused elementwise evaluation (residual sums, batch-norms)
        /// gives the bits of the general path, for every mix of identity,
        /// diagonal and channel-scale inputs and every offset kind, with
        /// and without the offset, sequential and across threads, on
        /// lengths across several chunks whose channels straddle them.
        #[test]
        fn elementwise_eval_has_the_general_paths_bits(
            kinds in proptest::collection::vec(0u8..3, 1..4),
            offset in 0u8..3,
            spatial in 1usize..5000,
            channels in 1usize..30,
            with_offset in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // signed zeros among the values: `+ 0.0` matters for -0.0
                if s % 17 == 0 { -0.0 } else { (s % 2001) as f64 / 1000.0 - 1.0 }
            };
            let n = channels * spatial;
            let mut values = vec![None];
            let mut inputs = vec![];
            for (i, &k) in kinds.iter().enumerate() {
                values.push(Some((0..n).map(|_| next()).collect::<Vec<f64>>()));
                let op = match k {
                    0 => Operator::Identity(n),
                    1 => Operator::Diagonal((0..n).map(|_| next()).collect()),
                    _ => Operator::ChannelScale(
                        ChannelScale::new((0..channels).map(|_| next()).collect(), spatial).unwrap(),
                    ),
                };
                inputs.push((ValueId(i + 1), Arc::new(op)));
            }
            let bias = match offset {
                0 => Offset::Zero(n),
                1 => Offset::PerChannel { values: (0..channels).map(|_| next()).collect(), spatial },
                _ => Offset::Full((0..n).map(|_| next()).collect()),
            };
            let layer = CompiledLayer {
                name: "l".into(),
                layer_kind: "add",
                inputs,
                bias: Arc::new(bias),
                output: ValueId(kinds.len() + 1),
                active: None,
                per_instance: false,
            };
            let want = layer.eval_general::<f64>(&values, with_offset, Par::Seq).0;
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for par in [Par::Seq, Par::rayon(2)] {
                let (got, finite) =
                    layer.eval_elementwise(&values, None, with_offset, par).expect("elementwise");
                prop_assert_eq!(bits(&got), bits(&want));
                prop_assert_eq!(finite, all_finite(&want, Par::Seq));
                // over the first input's own buffer, that value taken away
                let mut taken = values.clone();
                let own = taken[1].take();
                let (got, finite) =
                    layer.eval_elementwise(&taken, own, with_offset, par).expect("elementwise");
                prop_assert_eq!(bits(&got), bits(&want));
                prop_assert_eq!(finite, all_finite(&want, Par::Seq));
            }
        }

        /// A per-channel offset's adjoint product (channel sums first, in
        /// wide stretches) equals the column-by-column product of the
        /// expanded offset within the rounding of the two sums, in f64
        /// and f32, for any rows, channels and positions (remainders
        /// included) and zero channel values.
        #[test]
        fn per_channel_adjoint_product_matches_the_expanded_offset(
            m in 0usize..12, channels in 1usize..5, spatial in 1usize..40, seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f64 / 1000.0 - 1.0
            };
            let values: Vec<f64> = (0..channels).map(|c| if c == 1 { 0.0 } else { next() }).collect();
            let n = channels * spatial;
            let g = Block::<f64>::from_fn(m, n, |_, _| next());
            let per = Offset::PerChannel { values: values.clone(), spatial };
            let full = Offset::Full(per.to_vec());
            let (mut b1, mut b2) = (vec![0.5; m], vec![0.5; m]);
            per.add_adjoint_product(&g, &mut b1);
            full.add_adjoint_product(&g, &mut b2);
            let bound = |i: usize, eps: f64| {
                let mag: f64 = (0..n).map(|j| (g[(i, j)] * per.get(j)).abs()).sum::<f64>() + 0.5;
                2.0 * (n + 2) as f64 * eps * mag
            };
            for i in 0..m {
                prop_assert!((b1[i] - b2[i]).abs() <= bound(i, f64::EPSILON), "f64 row {i}: {} vs {}", b1[i], b2[i]);
            }
            let g32: Block<f32> = g.cast();
            let (mut c1, mut c2) = (vec![0.5f32; m], vec![0.5f32; m]);
            per.add_adjoint_product(&g32, &mut c1);
            full.add_adjoint_product(&g32, &mut c2);
            for i in 0..m {
                let e = f64::from((c1[i] - c2[i]).abs());
                prop_assert!(e <= bound(i, f64::from(f32::EPSILON)), "f32 row {i}: {} vs {}", c1[i], c2[i]);
            }
        }
    }

    /// Conv → ReLU (or LeakyReLU) → 2 × 2 max-pool twice, the convolutions
    /// with biases: the reverse walk without a visitor (the fused step at
    /// both pools) gives the bits of the walk one layer at a time, W and
    /// b, in f64 and f32, for several row sets.
    #[test]
    fn fused_pool_chain_has_the_layer_by_layer_bits() {
        use nnlin_ir::{Activation, Conv, Expr, Pool, Unary as U, Window};
        let mut next = {
            let mut s = 0x9e37_79b9_7f4a_7c15u64;
            move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            }
        };
        let mut net = Network::new(vec![1, 2, 12, 12]);
        let mut v = ValueId(0);
        for (i, (c_in, c_out, hw, pad, act)) in
            [(2, 5, 12, 1, U::Relu), (5, 4, 6, 0, U::LeakyRelu { alpha: 0.1 })]
                .into_iter()
                .enumerate()
        {
            let window =
                Window::new((hw, hw), (3, 3), (1, 1), (1, 1), (pad, pad, pad, pad), false).unwrap();
            let (o, w) = (window.oh, c_out * c_in * 9);
            let conv = Conv {
                window,
                c_in,
                c_out,
                groups: 1,
                weight: Arc::new((0..w).map(|_| next()).collect()),
                bias: Some((0..c_out).map(|_| next()).collect()),
                one_d: false,
            };
            v = net.push(format!("conv{i}"), "Conv", Layer::Conv(conv), vec![v]).unwrap();
            let a = Layer::Activation(Activation { expr: Expr::unary(act) });
            v = net.push(format!("act{i}"), "Relu", a, vec![v]).unwrap();
            let window = Window::new((o, o), (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), false).unwrap();
            let pool = Pool { window, channels: c_out, kind: PoolKind::Max, one_d: false };
            v = net.push(format!("pool{i}"), "MaxPool", Layer::Pool(pool), vec![v]).unwrap();
        }
        fn walk<T: Real>(inst: &Instance, rows: &[usize], fuse: bool) -> Vec<u64> {
            let mut g0 = Block::<T>::zeros(rows.len(), inst.output.len());
            for (i, &r) in rows.iter().enumerate() {
                g0[(i, r)] = T::ONE;
            }
            let one = OneInstance { inst, par: Par::Seq };
            let mut nothing = |_: ValueId, _: &Block<T>| {};
            let visit: Option<Visit<'_, T>> = if fuse { None } else { Some(&mut nothing) };
            let (w, b) = reverse_walk(inst, g0, ValueId(0), &one, visit);
            let w = w.expect("W");
            w.as_slice().iter().chain(&b).map(|v| v.to_f64().to_bits()).collect()
        }
        let compiler = Compiler::new(&net);
        for _ in 0..6 {
            let x: Vec<f64> = (0..net.input_len()).map(|_| next()).collect();
            let inst = compiler.instance(&x, Mode::Tangent).unwrap();
            // both pools fuse
            let chain = PoolChain::new(&inst, ValueId(0));
            for k in [2, 5] {
                let n = inst.value_lens[inst.layers[k].output.0];
                let g = Block::from_fn(3, n, |_, _| next());
                assert!(chain.fused(k, &g).is_some(), "pool {k} fuses");
            }
            let all: Vec<usize> = (0..inst.output.len()).collect();
            for rows in [&all[..], &[3, 7, 11], &all[..10]] {
                assert_eq!(walk::<f64>(&inst, rows, true), walk::<f64>(&inst, rows, false));
                assert_eq!(walk::<f32>(&inst, rows, true), walk::<f32>(&inst, rows, false));
            }
        }
    }

    proptest! {
        /// An offset's adjoint product from the nonzero columns alone: the
        /// bits of the product over the whole block, per channel (with a
        /// remainder past the wide lanes) and per element.
        #[test]
        fn offset_product_from_nonzero_columns_has_the_blocks_bits(
            m in 1usize..12, channels in 1usize..4, spatial in 1usize..30, keep in 1usize..4, seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            };
            let n = channels * spatial;
            let on: Vec<bool> = (0..n).map(|_| next() * 2.0 < keep as f64 - 2.0).collect();
            let g = Block::from_fn(m, n, |_, j| if on[j] { next() } else { 0.0 });
            let cols: Vec<usize> = (0..n).filter(|&j| on[j]).collect();
            let vals: Vec<f64> = cols.iter().flat_map(|&j| g.col_as_slice(j).iter().copied()).collect();
            let per_channel = Offset::PerChannel {
                values: (0..channels).map(|c| if c == 1 { 0.0 } else { next() }).collect(),
                spatial,
            };
            let full = Offset::Full((0..n).map(|j| if j % 5 == 0 { 0.0 } else { next() }).collect());
            for offset in [per_channel, full, Offset::Zero(n)] {
                let (mut want, mut got) = (vec![0.5; m], vec![0.5; m]);
                offset.add_adjoint_product(&g, &mut want);
                offset.add_adjoint_product_cols(&cols, &vals, &mut got);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&got), bits(&want));
            }
        }
    }
}
