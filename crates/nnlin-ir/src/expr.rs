//! Elementwise expressions: a small tree over one variable and constant
//! tensors, evaluated per element.
//!
//! The ONNX importer fuses any subgraph of elementwise operations on one tensor
//! (GELU's `Div/Erf/Add/Mul`, SiLU's `x·sigmoid(x)`, Mish, input normalization,
//! named activations) into one [`Expr`]. The instance compiler then gets σ(z)
//! and σ'(z) from one [`Dual`](crate::Dual) evaluation, however the exporter
//! decomposed the function.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::scalar::Scalar;

/// A unary elementwise function. Kinks follow PyTorch autograd (see
/// [`Unary::eval`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Unary {
    /// `-x`.
    Neg,
    /// `max(x, 0)`; derivative 0 at 0.
    Relu,
    /// `x` for `x > 0`, else `alpha·x`; derivative `alpha` at 0.
    LeakyRelu {
        /// Negative slope.
        alpha: f64,
    },
    /// `min(max(x, min), max)` (ReLU6, HardTanh); derivative 0 at either bound.
    Clip {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// `x` for `x > 0`, else `alpha·(e^x − 1)`; derivative `alpha` at 0.
    Elu {
        /// Scale of the negative part.
        alpha: f64,
    },
    /// `gamma·elu_alpha(x)`.
    Selu {
        /// ELU alpha.
        alpha: f64,
        /// Output scale.
        gamma: f64,
    },
    /// `x` for `x > 0`, else `alpha·(e^{x/alpha} − 1)`; derivative 1 at 0.
    Celu {
        /// Scale.
        alpha: f64,
    },
    /// Exact GELU `x·Φ(x) = 0.5·x·(1 + erf(x/√2))`.
    Gelu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// `ln(1 + e^x)`.
    Softplus,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `max(0, min(1, alpha·x + beta))`; derivative 0 at either bound.
    HardSigmoid {
        /// Slope.
        alpha: f64,
        /// Offset.
        beta: f64,
    },
    /// `x·relu6(x + 3)/6`, with PyTorch's derivative (0 at −3, 1 at 3).
    HardSwish,
    /// `x / (1 + |x|)`.
    Softsign,
    /// Gauss error function.
    Erf,
    /// `e^x`.
    Exp,
    /// `ln x`.
    Log,
    /// `√x`.
    Sqrt,
    /// `|x|`; derivative 0 at 0.
    Abs,
    /// `1/x`.
    Reciprocal,
}

/// A binary elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `a + b`.
    Add,
    /// `a − b`.
    Sub,
    /// `a · b`.
    Mul,
    /// `a / b`.
    Div,
    /// `a ^ b` (`b` constant: `powf`; otherwise `e^{b·ln a}`).
    Pow,
    /// `a` for `a > 0`, else `b·a` (PReLU; `b` is the per-element slope).
    PRelu,
}

/// One node of an [`Expr`]; children are indices of earlier nodes.
#[derive(Clone, Debug, PartialEq)]
pub enum ExprNode {
    /// The variable (the layer's input element).
    Var,
    /// A constant tensor, index into [`Expr::consts`].
    Const(usize),
    /// A unary function of a child.
    Unary(Unary, usize),
    /// A binary function of two children.
    Binary(Binary, usize, usize),
}

/// How an expression depends on its variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExprClass {
    /// Does not depend on the variable.
    Constant,
    /// `scale·x + shift` per element.
    Affine,
    /// Continuous piecewise linear (ReLU, LeakyReLU, PReLU, Clip, HardSigmoid,
    /// and affine combinations of them): a finite set of linear pieces.
    PiecewiseLinear,
    /// Anything else (GELU, ELU, SiLU, tanh, HardSwish, …).
    Smooth,
}

/// A constant tensor of an [`Expr`], stored once per block of `repeat`
/// consecutive elements: element `i` reads `values[i / repeat]`, and a
/// scalar (one value) is read everywhere. A per-channel constant of an
/// `[1, C, H, W]` tensor (batch-norm) is `C` values repeated `H·W` times;
/// a per-element one has `repeat` 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Const {
    /// One value per block (or one scalar).
    pub values: Arc<[f64]>,
    /// Elements per block, at least 1.
    pub repeat: usize,
}

impl Const {
    /// The value at element `i`.
    #[inline]
    pub fn at(&self, i: usize) -> f64 {
        if self.values.len() == 1 { self.values[0] } else { self.values[i / self.repeat] }
    }

    /// The value at element `i` and how many elements from `i` on share it
    /// (to the end of its block; unbounded for a scalar): a loop over one
    /// run reads a constant, with no division per element.
    #[inline]
    pub fn run(&self, i: usize) -> (f64, usize) {
        if self.values.len() == 1 {
            (self.values[0], usize::MAX)
        } else {
            (self.values[i / self.repeat], self.repeat - i % self.repeat)
        }
    }

    /// Whether the constant fits a tensor of `numel` elements: a scalar, or
    /// blocks that tile it exactly.
    pub fn fits(&self, numel: usize) -> bool {
        self.values.len() == 1
            || (self.repeat >= 1 && self.values.len().checked_mul(self.repeat) == Some(numel))
    }
}

/// An elementwise function of one tensor: nodes in topological order, the
/// last one the result. Each constant is a scalar or covers the tensor's
/// elements in blocks ([`Const`]).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Expr {
    /// Nodes; the last is the result.
    pub nodes: Vec<ExprNode>,
    /// Constant tensors.
    pub consts: Vec<Const>,
}

/// ReLU, `max(x, 0)` with `+0.0` at and below 0 (PyTorch's value; its
/// autograd slope at 0 is 0).
#[inline(always)]
fn relu<S: Scalar>(x: S) -> S {
    if x.value() > 0.0 { x } else { S::from_f64(0.0) }
}

impl Unary {
    /// Evaluates the function; kink branches follow PyTorch autograd.
    pub fn eval<S: Scalar>(&self, x: S) -> S {
        let v = x.value();
        let c = S::from_f64;
        match *self {
            Unary::Neg => -x,
            Unary::Relu => relu(x),
            Unary::LeakyRelu { alpha } => {
                if v > 0.0 {
                    x
                } else {
                    x * c(alpha)
                }
            }
            Unary::Clip { min, max } => {
                if v <= min {
                    c(min)
                } else if v >= max {
                    c(max)
                } else {
                    x
                }
            }
            Unary::Elu { alpha } => {
                if v > 0.0 {
                    x
                } else {
                    c(alpha) * (x.exp() - c(1.0))
                }
            }
            Unary::Selu { alpha, gamma } => {
                if v > 0.0 {
                    c(gamma) * x
                } else {
                    c(gamma * alpha) * (x.exp() - c(1.0))
                }
            }
            Unary::Celu { alpha } => {
                if v > 0.0 {
                    x
                } else {
                    c(alpha) * ((x / c(alpha)).exp() - c(1.0))
                }
            }
            Unary::Gelu => c(0.5) * x * (c(1.0) + (x * c(std::f64::consts::FRAC_1_SQRT_2)).erf()),
            Unary::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let inner = c(k) * (x + c(0.044715) * x * x * x);
                c(0.5) * x * (c(1.0) + inner.tanh())
            }
            Unary::Softplus => x.ln_1p_exp(),
            Unary::Sigmoid => x.sigmoid(),
            Unary::Tanh => x.tanh(),
            Unary::HardSigmoid { alpha, beta } => {
                let t = c(alpha) * x + c(beta);
                let tv = t.value();
                if tv <= 0.0 {
                    c(0.0)
                } else if tv >= 1.0 {
                    c(1.0)
                } else {
                    t
                }
            }
            Unary::HardSwish => {
                if v <= -3.0 {
                    c(0.0)
                } else if v < 3.0 {
                    x * (x + c(3.0)) / c(6.0)
                } else {
                    x
                }
            }
            Unary::Softsign => {
                let a = if v >= 0.0 { x } else { -x };
                x / (c(1.0) + a)
            }
            Unary::Erf => x.erf(),
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Sqrt => x.sqrt(),
            Unary::Abs => {
                if v > 0.0 {
                    x
                } else if v < 0.0 {
                    -x
                } else {
                    c(0.0)
                }
            }
            Unary::Reciprocal => c(1.0) / x,
        }
    }

    fn is_piecewise_linear(&self) -> bool {
        matches!(
            self,
            Unary::Neg
                | Unary::Relu
                | Unary::LeakyRelu { .. }
                | Unary::Clip { .. }
                | Unary::HardSigmoid { .. }
                | Unary::Abs
        )
    }

    /// Short lower-case name.
    pub fn name(&self) -> String {
        match self {
            Unary::Neg => "neg".into(),
            Unary::Relu => "relu".into(),
            Unary::LeakyRelu { alpha } => format!("leaky_relu({alpha})"),
            Unary::Clip { min, max } => format!("clip({min},{max})"),
            Unary::Elu { alpha } => format!("elu({alpha})"),
            Unary::Selu { .. } => "selu".into(),
            Unary::Celu { alpha } => format!("celu({alpha})"),
            Unary::Gelu => "gelu".into(),
            Unary::GeluTanh => "gelu_tanh".into(),
            Unary::Softplus => "softplus".into(),
            Unary::Sigmoid => "sigmoid".into(),
            Unary::Tanh => "tanh".into(),
            Unary::HardSigmoid { alpha, beta } => format!("hard_sigmoid({alpha},{beta})"),
            Unary::HardSwish => "hard_swish".into(),
            Unary::Softsign => "softsign".into(),
            Unary::Erf => "erf".into(),
            Unary::Exp => "exp".into(),
            Unary::Log => "log".into(),
            Unary::Sqrt => "sqrt".into(),
            Unary::Abs => "abs".into(),
            Unary::Reciprocal => "reciprocal".into(),
        }
    }
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Pow => "pow",
            Binary::PRelu => "prelu",
        }
    }
}

impl Expr {
    /// The identity expression `x`.
    pub fn var() -> Self {
        Self { nodes: vec![ExprNode::Var], consts: vec![] }
    }

    /// `f(x)` for a unary function.
    pub fn unary(f: Unary) -> Self {
        Self { nodes: vec![ExprNode::Var, ExprNode::Unary(f, 0)], consts: vec![] }
    }

    /// Appends a node and returns its index.
    pub fn push(&mut self, node: ExprNode) -> usize {
        if let ExprNode::Unary(_, a) = node {
            assert!(a < self.nodes.len(), "expression child out of order");
        }
        if let ExprNode::Binary(_, a, b) = node {
            assert!(a < self.nodes.len() && b < self.nodes.len(), "expression child out of order");
        }
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Appends a constant tensor (length 1 or `numel`) and a node for it.
    pub fn push_const(&mut self, values: Vec<f64>) -> usize {
        self.push_const_repeated(values, 1)
    }

    /// Appends a constant of one value per block of `repeat` consecutive
    /// elements ([`Const`]) and a node for it.
    ///
    /// # Panics
    /// If `repeat` is 0.
    pub fn push_const_repeated(&mut self, values: Vec<f64>, repeat: usize) -> usize {
        assert!(repeat >= 1, "a constant's blocks hold at least one element");
        self.consts.push(Const { values: values.into(), repeat });
        self.push(ExprNode::Const(self.consts.len() - 1))
    }

    /// A key identifying a node's operation and operands, for sharing equal
    /// subexpressions (constants are the same when they share storage).
    fn key(&self, node: &ExprNode) -> (u8, usize, usize, String) {
        match node {
            ExprNode::Var => (0, 0, 0, String::new()),
            ExprNode::Const(c) => {
                let v = &self.consts[*c];
                (1, v.values.as_ptr() as usize, v.values.len(), v.repeat.to_string())
            }
            ExprNode::Unary(f, a) => (2, *a, 0, format!("{f:?}")),
            ExprNode::Binary(f, a, b) => (3, *a, *b, format!("{f:?}")),
        }
    }

    /// Copies `other` into `self`, returning the index of its result;
    /// `other`'s `Var` becomes node `var_at` of `self`. Subexpressions that
    /// `self` already holds (the same operation on the same operands, the
    /// same constant storage) are shared, not copied: the expression is a
    /// DAG, so a chain of `Add(r, r)` nodes grows by one node a step, not
    /// doubles. The result is always the last node.
    pub fn splice(&mut self, other: &Expr, var_at: usize) -> usize {
        let mut seen: HashMap<(u8, usize, usize, String), usize> =
            (0..self.nodes.len()).map(|i| (self.key(&self.nodes[i]), i)).collect();
        let mut const_map: HashMap<usize, usize> = HashMap::new();
        let mut map = Vec::with_capacity(other.nodes.len());
        for node in &other.nodes {
            let mapped = match node {
                ExprNode::Var => None,
                ExprNode::Const(c) => {
                    let existing = self
                        .consts
                        .iter()
                        .position(|v| {
                            Arc::ptr_eq(&v.values, &other.consts[*c].values)
                                && v.repeat == other.consts[*c].repeat
                        })
                        .or_else(|| const_map.get(c).copied());
                    let k = match existing {
                        Some(k) => k,
                        None => {
                            self.consts.push(other.consts[*c].clone());
                            const_map.insert(*c, self.consts.len() - 1);
                            self.consts.len() - 1
                        }
                    };
                    Some(ExprNode::Const(k))
                }
                ExprNode::Unary(f, a) => Some(ExprNode::Unary(f.clone(), map[*a])),
                ExprNode::Binary(f, a, b) => Some(ExprNode::Binary(*f, map[*a], map[*b])),
            };
            let idx = match mapped {
                None => var_at,
                Some(n) => {
                    let key = self.key(&n);
                    match seen.get(&key) {
                        Some(&i) => i,
                        None => {
                            let i = self.push(n);
                            seen.insert(key, i);
                            i
                        }
                    }
                }
            };
            map.push(idx);
        }
        let result = *map.last().expect("empty expression");
        if result + 1 == self.nodes.len() {
            result
        } else {
            // keep the invariant that the result is the last node
            let copy = self.nodes[result].clone();
            self.nodes.push(copy);
            self.nodes.len() - 1
        }
    }

    /// Index of the variable node (inserting one if absent).
    pub fn var_node(&mut self) -> usize {
        match self.nodes.iter().position(|n| matches!(n, ExprNode::Var)) {
            Some(i) => i,
            None => self.push(ExprNode::Var),
        }
    }

    /// The coefficients of an affine expression over `numel` elements:
    /// `(scale, shift, spatial)` with element `i` mapped to
    /// `scale[i / spatial]·x + shift[i / spatial]`. `spatial` is the largest
    /// block on which every constant is constant (the gcd of their
    /// repeats; `numel` when all are scalars), so a batch-norm keeps one
    /// pair per channel. The values are the expression's value and slope at
    /// 0, one dual evaluation per block, the same bits as per element.
    ///
    /// # Panics
    /// If a constant does not fit `numel` elements (see [`Const::fits`]).
    pub fn affine_coefficients(&self, numel: usize) -> (Vec<f64>, Vec<f64>, usize) {
        assert!(self.consts.iter().all(|c| c.fits(numel)), "a constant does not fit the tensor");
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let spatial = self
            .consts
            .iter()
            .filter(|c| c.values.len() > 1)
            .fold(numel, |g, c| gcd(g, c.repeat))
            .max(1);
        let blocks = numel / spatial;
        let (shift, scale) = if spatial == 1 {
            let zeros = vec![crate::Dual::var(0.0); numel];
            let mut y = zeros.clone();
            self.eval_slice(&zeros, &mut y);
            y.iter().map(|d| (d.v, d.d)).unzip()
        } else {
            let mut scratch = Vec::new();
            (0..blocks)
                .map(|k| {
                    let d = self.eval(k * spatial, crate::Dual::var(0.0), &mut scratch);
                    (d.v, d.d)
                })
                .unzip()
        };
        (scale, shift, spatial)
    }

    /// Evaluates the expression for element `i` at `x`. `scratch` is reused
    /// between calls to avoid allocation.
    pub fn eval<S: Scalar>(&self, i: usize, x: S, scratch: &mut Vec<S>) -> S {
        scratch.clear();
        for node in &self.nodes {
            let v = match *node {
                ExprNode::Var => x,
                ExprNode::Const(c) => S::from_f64(self.const_at(c, i)),
                ExprNode::Unary(ref f, a) => f.eval(scratch[a]),
                ExprNode::Binary(f, a, b) => {
                    let (p, q) = (scratch[a], scratch[b]);
                    match f {
                        Binary::Add => p + q,
                        Binary::Sub => p - q,
                        Binary::Mul => p * q,
                        Binary::Div => p / q,
                        Binary::Pow => match self.nodes[b] {
                            ExprNode::Const(c) => p.powf(self.const_at(c, i)),
                            _ => (q * p.ln()).exp(),
                        },
                        Binary::PRelu => {
                            if p.value() > 0.0 {
                                p
                            } else {
                                p * q
                            }
                        }
                    }
                }
            };
            scratch.push(v);
        }
        *scratch.last().expect("empty expression")
    }

    /// Evaluates the expression at every element of `u` (element `i` at
    /// `u[i]`) into `out`, node by node over chunks of [`EVAL_CHUNK`]
    /// elements: per element the operations of [`Expr::eval`] in the same
    /// order (the same bits), but each node a loop over a chunk (which
    /// vectorizes) instead of a walk of the nodes per element.
    ///
    /// # Panics
    /// If `out` and `u` differ in length.
    pub fn eval_slice<S: Scalar>(&self, u: &[S], out: &mut [S]) {
        self.eval_slice_at(0, u, out);
    }

    /// [`Expr::eval_slice`] for the elements `offset..offset + u.len()` of
    /// the tensor (`u[i]` is element `offset + i`, which per-element
    /// constants index): a slice of a larger tensor, with the bits of the
    /// whole-tensor evaluation.
    ///
    /// # Panics
    /// If `out` and `u` differ in length.
    pub fn eval_slice_at<S: Scalar>(&self, offset: usize, u: &[S], out: &mut [S]) {
        assert_eq!(u.len(), out.len(), "eval_slice: lengths differ");
        if let [ExprNode::Var, ExprNode::Unary(ref f, 0)] = *self.nodes.as_slice() {
            // one function of the input (most activations): one pass, no
            // node buffers; ReLU's own loop (where `Unary::eval` is not
            // inlined, its match per element costs a tenth of ResNet-50's
            // reference pass)
            if *f == Unary::Relu {
                for (d, &x) in out.iter_mut().zip(u) {
                    *d = relu(x);
                }
            } else {
                for (d, &x) in out.iter_mut().zip(u) {
                    *d = f.eval(x);
                }
            }
            return;
        }
        let nn = self.nodes.len();
        let mut buf = vec![S::from_f64(0.0); nn * EVAL_CHUNK];
        for (ci, (uc, oc)) in u.chunks(EVAL_CHUNK).zip(out.chunks_mut(EVAL_CHUNK)).enumerate() {
            let (base, len) = (offset + ci * EVAL_CHUNK, uc.len());
            for (k, node) in self.nodes.iter().enumerate() {
                let (done, rest) = buf.split_at_mut(k * EVAL_CHUNK);
                let dst = &mut rest[..len];
                let src = |a: usize| &done[a * EVAL_CHUNK..a * EVAL_CHUNK + len];
                match *node {
                    ExprNode::Var => dst.copy_from_slice(uc),
                    ExprNode::Const(c) => {
                        // one value per run (a channel's positions), no
                        // division per element
                        let (cst, mut j) = (&self.consts[c], 0);
                        while j < len {
                            let (v, run) = cst.run(base + j);
                            let end = j + run.min(len - j);
                            dst[j..end].fill(S::from_f64(v));
                            j = end;
                        }
                    }
                    ExprNode::Unary(ref f, a) => {
                        for (d, &x) in dst.iter_mut().zip(src(a)) {
                            *d = f.eval(x);
                        }
                    }
                    ExprNode::Binary(f, a, b) => {
                        let (p, q) = (src(a), src(b));
                        let each = |dst: &mut [S], op: &dyn Fn(usize, S, S) -> S| {
                            for (j, d) in dst.iter_mut().enumerate() {
                                *d = op(j, p[j], q[j]);
                            }
                        };
                        match f {
                            Binary::Add => {
                                for ((d, &x), &y) in dst.iter_mut().zip(p).zip(q) {
                                    *d = x + y;
                                }
                            }
                            Binary::Sub => {
                                for ((d, &x), &y) in dst.iter_mut().zip(p).zip(q) {
                                    *d = x - y;
                                }
                            }
                            Binary::Mul => {
                                for ((d, &x), &y) in dst.iter_mut().zip(p).zip(q) {
                                    *d = x * y;
                                }
                            }
                            Binary::Div => each(dst, &|_, x, y| x / y),
                            Binary::Pow => match self.nodes[b] {
                                ExprNode::Const(c) => {
                                    each(dst, &|j, x, _| x.powf(self.const_at(c, base + j)));
                                }
                                _ => each(dst, &|_, x, y| (y * x.ln()).exp()),
                            },
                            Binary::PRelu => {
                                each(dst, &|_, x, y| if x.value() > 0.0 { x } else { x * y });
                            }
                        }
                    }
                }
            }
            oc.copy_from_slice(&buf[(nn - 1) * EVAL_CHUNK..(nn - 1) * EVAL_CHUNK + len]);
        }
    }

    /// `(σ(u_i), σ'(u_i))` at every element: [`Expr::value_and_slope`]'s
    /// direct branches where the expression has one, else one chunked dual
    /// evaluation ([`Expr::eval_slice`]); the same values either way.
    pub fn values_and_slopes(&self, u: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (mut v, mut d) = (vec![0.0; u.len()], vec![0.0; u.len()]);
        self.values_and_slopes_into(0, u, &mut v, &mut d);
        (v, d)
    }

    /// [`Expr::values_and_slopes`] of the elements `offset..offset +
    /// u.len()` of a tensor into `v` and `d` (a slice of a larger tensor,
    /// the same bits).
    ///
    /// # Panics
    /// If `v`, `d` and `u` differ in length.
    pub fn values_and_slopes_into(&self, offset: usize, u: &[f64], v: &mut [f64], d: &mut [f64]) {
        assert!(v.len() == u.len() && d.len() == u.len(), "values_and_slopes: lengths differ");
        // the forms with a direct branch: one tight loop per form instead of
        // matching the nodes at every element
        /// Writes `v` and `d` over each run.
        struct Into<'a> {
            u: &'a [f64],
            v: &'a mut [f64],
            d: &'a mut [f64],
        }
        impl KinkedRuns for Into<'_> {
            fn run(&mut self, lo: usize, hi: usize, form: impl Fn(f64) -> (f64, f64)) {
                let (v, d, u) = (&mut self.v[lo..hi], &mut self.d[lo..hi], &self.u[lo..hi]);
                for ((vi, di), &z) in v.iter_mut().zip(d.iter_mut()).zip(u) {
                    (*vi, *di) = form(z);
                }
            }
        }
        if self.kinked_at_zero_runs(offset, u.len(), &mut Into { u, v, d }) {
            return;
        }
        match self.nodes.as_slice() {
            [ExprNode::Var, ExprNode::Unary(Unary::Clip { .. }, 0)] => {
                let mut scratch = Vec::new();
                for (i, ((vi, di), &z)) in v.iter_mut().zip(d.iter_mut()).zip(u).enumerate() {
                    (*vi, *di) = self.value_and_slope(offset + i, z, &mut scratch);
                }
            }
            _ => {
                let vars: Vec<crate::Dual> = u.iter().map(|&z| crate::Dual::var(z)).collect();
                let mut out = vec![crate::Dual::var(0.0); u.len()];
                self.eval_slice_at(offset, &vars, &mut out);
                for ((vi, di), y) in v.iter_mut().zip(d.iter_mut()).zip(&out) {
                    (*vi, *di) = (y.v, y.d);
                }
            }
        }
    }

    /// For ReLU, LeakyReLU and PReLU (the forms with a direct branch and
    /// one kink, at 0): hands `runs` the elements `0..len` (elements
    /// `offset..` of a tensor) as consecutive runs, each with its form
    /// `z ↦ (σ(z), σ'(z))` (one slope below 0 per run), the values and
    /// slopes of [`Expr::values_and_slopes_into`]; each run's loop is
    /// compiled for its form. `false`, and no run, for any other
    /// expression.
    pub fn kinked_at_zero_runs(
        &self,
        offset: usize,
        len: usize,
        runs: &mut impl KinkedRuns,
    ) -> bool {
        let Some(below) = self.below_zero() else { return false };
        self.below_runs(&below, offset, len, |lo, hi, alpha| match alpha {
            None => runs.run(lo, hi, |z| if z > 0.0 { (z, 1.0) } else { (0.0, 0.0) }),
            Some(a) => runs.run(lo, hi, |z| if z > 0.0 { (z, 1.0) } else { (a * z, a) }),
        });
        true
    }

    /// Whether [`Expr::kinked_at_zero_runs`] has runs for this expression
    /// (ReLU, LeakyReLU, PReLU).
    pub fn has_kinked_at_zero_runs(&self) -> bool {
        self.below_zero().is_some()
    }

    /// The slope below 0 of ReLU (`Zero`), LeakyReLU (`Scalar`) and PReLU
    /// (`PerElement`); `None` for any other expression.
    fn below_zero(&self) -> Option<BelowZero<'_>> {
        match self.nodes.as_slice() {
            [ExprNode::Var, ExprNode::Unary(Unary::Relu, 0)] => Some(BelowZero::Zero),
            [ExprNode::Var, ExprNode::Unary(Unary::LeakyRelu { alpha }, 0)] => {
                Some(BelowZero::Scalar(*alpha))
            }
            [ExprNode::Var, ExprNode::Const(c), ExprNode::Binary(Binary::PRelu, 0, 1)]
            | [ExprNode::Const(c), ExprNode::Var, ExprNode::Binary(Binary::PRelu, 1, 0)] => {
                Some(BelowZero::PerElement(&self.consts[*c]))
            }
            _ => None,
        }
    }

    /// Calls `run(lo, hi, alpha)` for consecutive pieces `lo..hi` of
    /// `0..len` (elements `offset + lo..` of the tensor) over which the
    /// slope below 0 is one value: `None` for ReLU's `(0, 0)`, else `Some`.
    fn below_runs(
        &self,
        below: &BelowZero<'_>,
        offset: usize,
        len: usize,
        mut run: impl FnMut(usize, usize, Option<f64>),
    ) {
        match below {
            BelowZero::Zero => run(0, len, None),
            BelowZero::Scalar(a) => run(0, len, Some(*a)),
            BelowZero::PerElement(a) => {
                // one slope per run of elements (a channel's positions)
                let mut i = 0;
                while i < len {
                    let (alpha, r) = a.run(offset + i);
                    let end = i + r.min(len - i);
                    run(i, end, Some(alpha));
                    i = end;
                }
            }
        }
    }

    fn const_at(&self, c: usize, i: usize) -> f64 {
        self.consts[c].at(i)
    }

    /// How the result depends on the variable (a structural, conservative
    /// classification).
    pub fn class(&self) -> ExprClass {
        use ExprClass::*;
        let mut cls: Vec<ExprClass> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let k = match node {
                ExprNode::Var => Affine,
                ExprNode::Const(_) => Constant,
                ExprNode::Unary(f, a) => {
                    let a = cls[*a];
                    if a == Constant {
                        Constant
                    } else if matches!(f, Unary::Neg) {
                        a
                    } else if f.is_piecewise_linear() && a <= PiecewiseLinear {
                        PiecewiseLinear
                    } else {
                        Smooth
                    }
                }
                ExprNode::Binary(f, a, b) => {
                    let (a, b) = (cls[*a], cls[*b]);
                    match f {
                        Binary::Add | Binary::Sub => a.max(b),
                        Binary::Mul => {
                            if a == Constant || b == Constant {
                                a.max(b)
                            } else {
                                Smooth
                            }
                        }
                        Binary::Div => {
                            if b == Constant {
                                a
                            } else {
                                Smooth
                            }
                        }
                        Binary::Pow => {
                            if a == Constant && b == Constant {
                                Constant
                            } else {
                                Smooth
                            }
                        }
                        Binary::PRelu => {
                            if b != Constant {
                                Smooth
                            } else if a == Constant {
                                Constant
                            } else {
                                a.max(PiecewiseLinear)
                            }
                        }
                    }
                }
            };
            cls.push(k);
        }
        *cls.last().expect("empty expression")
    }

    /// The breakpoints (in the variable) of a piecewise-linear expression
    /// that is one named function of the variable, for element `i`: ReLU,
    /// LeakyReLU, PReLU, Abs → 0; Clip → its bounds; HardSigmoid → where the
    /// ramp starts and ends. `None` for other expressions.
    pub fn breakpoints(&self, i: usize) -> Option<Vec<f64>> {
        let _ = i;
        let is_var = |k: usize| matches!(self.nodes[k], ExprNode::Var);
        match self.nodes.last()? {
            ExprNode::Unary(f, a) if is_var(*a) => match *f {
                Unary::Relu | Unary::LeakyRelu { .. } | Unary::Abs => Some(vec![0.0]),
                Unary::Clip { min, max } => {
                    Some([min, max].into_iter().filter(|v| v.is_finite()).collect())
                }
                Unary::HardSigmoid { alpha, beta } if alpha != 0.0 => {
                    Some(vec![-beta / alpha, (1.0 - beta) / alpha])
                }
                _ => None,
            },
            ExprNode::Binary(Binary::PRelu, a, b)
                if is_var(*a) && matches!(self.nodes[*b], ExprNode::Const(_)) =>
            {
                Some(vec![0.0])
            }
            _ => None,
        }
    }

    /// `(σ(z), σ'(z))` for element `i`: a direct branch for the common
    /// piecewise-linear activations (ReLU, LeakyReLU, PReLU, Clip), a dual
    /// number evaluation otherwise. Same kink conventions either way.
    #[inline]
    pub fn value_and_slope(&self, i: usize, z: f64, scratch: &mut Vec<crate::Dual>) -> (f64, f64) {
        if let [ExprNode::Var, ExprNode::Unary(f, 0)] = self.nodes.as_slice() {
            match *f {
                Unary::Relu => return if z > 0.0 { (z, 1.0) } else { (0.0, 0.0) },
                Unary::LeakyRelu { alpha } => {
                    return if z > 0.0 { (z, 1.0) } else { (alpha * z, alpha) };
                }
                Unary::Clip { min, max } => {
                    return if z <= min {
                        (min, 0.0)
                    } else if z >= max {
                        (max, 0.0)
                    } else {
                        (z, 1.0)
                    };
                }
                _ => {}
            }
        }
        // PReLU with a constant slope tensor: x > 0 ? x : α·x, slope α at
        // and below the kink (as the dual evaluation of `Binary::PRelu`)
        if let [.., ExprNode::Binary(Binary::PRelu, a, b)] = self.nodes.as_slice()
            && self.nodes.len() == 3
            && matches!(self.nodes[*a], ExprNode::Var)
            && let ExprNode::Const(c) = self.nodes[*b]
        {
            let alpha = self.const_at(c, i);
            return if z > 0.0 { (z, 1.0) } else { (alpha * z, alpha) };
        }
        let y = self.eval(i, crate::Dual::var(z), scratch);
        (y.v, y.d)
    }

    /// Whether the expression is the bare variable.
    pub fn is_identity(&self) -> bool {
        matches!(self.nodes.last(), Some(ExprNode::Var))
    }

    /// A readable rendering, e.g. `mul(x, sigmoid(x))`.
    pub fn render(&self) -> String {
        // an expression is a DAG: written out as a tree, shared operands
        // repeat, and a chain of Add(r, r) would double with every node; the
        // text is cut after RENDER_NODES nodes, so the work is bounded too
        let mut left = RENDER_NODES;
        self.render_node(self.nodes.len() - 1, &mut left)
    }

    fn render_node(&self, i: usize, left: &mut usize) -> String {
        if *left == 0 {
            return "…".into();
        }
        *left -= 1;
        match &self.nodes[i] {
            ExprNode::Var => "x".into(),
            ExprNode::Const(c) => {
                let v = &self.consts[*c].values;
                if v.len() == 1 { format!("{}", v[0]) } else { format!("c[{}]", v.len()) }
            }
            ExprNode::Unary(f, a) => format!("{}({})", f.name(), self.render_node(*a, left)),
            ExprNode::Binary(f, a, b) => {
                let ra = self.render_node(*a, left);
                let rb = self.render_node(*b, left);
                format!("{}({ra}, {rb})", f.name())
            }
        }
    }
}

/// Elements per chunk of [`Expr::eval_slice`]: every node's chunk stays in
/// L1 (an expression of 8 nodes over dual numbers: 32 KB).
pub const EVAL_CHUNK: usize = 256;

/// The most nodes [`Expr::render`] writes out.
const RENDER_NODES: usize = 64;

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// What [`Expr::kinked_at_zero_runs`] hands its runs to.
pub trait KinkedRuns {
    /// Elements `lo..hi`, whose value and slope at `z` are `form(z)`.
    fn run(&mut self, lo: usize, hi: usize, form: impl Fn(f64) -> (f64, f64));
}

/// The slope below 0 of an activation with one kink, at 0, and a direct
/// branch ([`Expr::kinked_at_zero_runs`]).
enum BelowZero<'a> {
    /// ReLU: value and slope 0.
    Zero,
    /// LeakyReLU: one slope.
    Scalar(f64),
    /// PReLU: a slope per element (runs of one per channel).
    PerElement(&'a Const),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::Dual;

    fn d(f: &Unary, x: f64) -> f64 {
        f.eval(Dual::var(x)).d
    }

    #[test]
    fn kinks_follow_pytorch() {
        assert_eq!(d(&Unary::Relu, 0.0), 0.0);
        assert_eq!(d(&Unary::LeakyRelu { alpha: 0.1 }, 0.0), 0.1);
        assert_eq!(d(&Unary::Clip { min: 0.0, max: 6.0 }, 0.0), 0.0);
        assert_eq!(d(&Unary::Clip { min: 0.0, max: 6.0 }, 6.0), 0.0);
        assert_eq!(d(&Unary::Elu { alpha: 0.5 }, 0.0), 0.5);
        assert_eq!(d(&Unary::Celu { alpha: 0.5 }, 0.0), 1.0);
        assert_eq!(d(&Unary::HardSwish, -3.0), 0.0);
        assert_eq!(d(&Unary::HardSwish, 3.0), 1.0);
        assert_eq!(d(&Unary::Abs, 0.0), 0.0);
        let mut e = Expr::var();
        let s = e.push_const(vec![0.25]);
        e.push(ExprNode::Binary(Binary::PRelu, 0, s));
        assert_eq!(e.eval(0, Dual::var(0.0), &mut vec![]).d, 0.25);
        assert_eq!(e.class(), ExprClass::PiecewiseLinear);
    }

    /// Affine coefficients kept per block equal the per-element ones: a
    /// batch-norm (per channel) composed with a per-pair constant keeps the
    /// blocks both share, and scalars alone keep one block.
    #[test]
    fn affine_coefficients_keep_the_shared_blocks() {
        let per_channel = |e: &mut Expr, v: Vec<f64>, r: usize| e.push_const_repeated(v, r);
        // (x·m_c + t_c)·k_p + 0.5 over 3 channels of 4 elements, k per 2
        let mut e = Expr::var();
        let m = per_channel(&mut e, vec![0.5, -2.0, 3.0], 4);
        let xm = e.push(ExprNode::Binary(Binary::Mul, 0, m));
        let t = per_channel(&mut e, vec![0.1, 0.2, -0.3], 4);
        let y = e.push(ExprNode::Binary(Binary::Add, xm, t));
        let k = per_channel(&mut e, (0..6).map(|i| 1.0 + f64::from(i)).collect(), 2);
        let yk = e.push(ExprNode::Binary(Binary::Mul, y, k));
        let h = e.push_const(vec![0.5]);
        e.push(ExprNode::Binary(Binary::Add, yk, h));
        let (scale, shift, spatial) = e.affine_coefficients(12);
        assert_eq!((scale.len(), spatial), (6, 2));
        for i in 0..12 {
            let d = e.eval(i, Dual::var(0.0), &mut vec![]);
            assert_eq!(
                (scale[i / 2].to_bits(), shift[i / 2].to_bits()),
                (d.d.to_bits(), d.v.to_bits())
            );
        }
        let mut s = Expr::var();
        let c = s.push_const(vec![4.0]);
        s.push(ExprNode::Binary(Binary::Div, 0, c));
        assert_eq!(s.affine_coefficients(10), (vec![0.25], vec![0.0], 10));
        assert!(!Const { values: vec![1.0, 2.0].into(), repeat: 3 }.fits(7));
    }

    /// The direct branches of `value_and_slope` give the dual evaluation's
    /// value and slope bit for bit, at the kinks too.
    #[test]
    fn direct_branches_equal_the_dual_evaluation() {
        let mut prelu = Expr::var();
        let s = prelu.push_const(vec![0.25, -0.5, 3.0]);
        prelu.push(ExprNode::Binary(Binary::PRelu, 0, s));
        let mut scalar = Expr::var();
        let s = scalar.push_const(vec![0.1]);
        scalar.push(ExprNode::Binary(Binary::PRelu, 0, s));
        let mut relu = Expr::var();
        relu.push(ExprNode::Unary(Unary::Relu, 0));
        let mut leaky = Expr::var();
        leaky.push(ExprNode::Unary(Unary::LeakyRelu { alpha: 0.2 }, 0));
        let mut clip = Expr::var();
        clip.push(ExprNode::Unary(Unary::Clip { min: -1.0, max: 6.0 }, 0));
        for e in [&prelu, &scalar, &relu, &leaky, &clip] {
            for i in 0..3 {
                for z in [-7.5, -1.0, -0.0, 0.0, 1e-300, 0.3, 6.0, 9.0] {
                    let y = e.eval(i, Dual::var(z), &mut vec![]);
                    let (v, d) = e.value_and_slope(i, z, &mut vec![]);
                    assert_eq!(
                        (v.to_bits(), d.to_bits()),
                        (y.v.to_bits(), y.d.to_bits()),
                        "{e} at {z}"
                    );
                }
            }
        }
    }

    /// The chunked evaluation gives each element the bits of the per-element
    /// walk, in f64 and in dual numbers, across chunk boundaries and with
    /// per-element constants (a fused batch-norm + ReLU, SiLU, GELU, a power,
    /// a PReLU with per-element slopes).
    #[test]
    fn eval_slice_equals_the_per_element_walk() {
        let n = 2 * EVAL_CHUNK + 37;
        let per: Vec<f64> = (0..n).map(|i| (i % 17) as f64 / 8.0 - 1.0).collect();
        let mut bn_relu = Expr::var();
        let m = bn_relu.push_const(per.clone());
        let xm = bn_relu.push(ExprNode::Binary(Binary::Mul, 0, m));
        let t = bn_relu.push_const(per.iter().map(|v| v * 0.3 + 0.1).collect());
        let z = bn_relu.push(ExprNode::Binary(Binary::Add, xm, t));
        bn_relu.push(ExprNode::Unary(Unary::Relu, z));
        let mut silu = Expr::var();
        let s = silu.push(ExprNode::Unary(Unary::Sigmoid, 0));
        silu.push(ExprNode::Binary(Binary::Mul, 0, s));
        let mut gelu = Expr::var();
        gelu.push(ExprNode::Unary(Unary::Gelu, 0));
        let mut pow = Expr::var();
        let a = pow.push(ExprNode::Unary(Unary::Abs, 0));
        let e = pow.push_const(vec![1.5]);
        let p = pow.push(ExprNode::Binary(Binary::Pow, a, e));
        let d = pow.push_const(per.iter().map(|v| v + 3.0).collect());
        pow.push(ExprNode::Binary(Binary::Div, p, d));
        let mut prelu = Expr::var();
        let s = prelu.push_const(per.clone());
        prelu.push(ExprNode::Binary(Binary::PRelu, 0, s));
        // per-channel constants: 61 blocks of 9 elements (runs that straddle
        // the chunks and the slice offsets below)
        assert_eq!(n, 61 * 9);
        let chan: Vec<f64> = (0..61).map(|i| (i % 7) as f64 / 4.0 - 0.5).collect();
        let mut prelu_c = Expr::var();
        let s = prelu_c.push_const_repeated(chan.clone(), 9);
        prelu_c.push(ExprNode::Binary(Binary::PRelu, 0, s));
        let mut bn_c = Expr::var();
        let m = bn_c.push_const_repeated(chan.iter().map(|v| v + 1.5).collect(), 9);
        let xm = bn_c.push(ExprNode::Binary(Binary::Mul, 0, m));
        let t = bn_c.push_const_repeated(chan, 9);
        let z = bn_c.push(ExprNode::Binary(Binary::Add, xm, t));
        bn_c.push(ExprNode::Unary(Unary::Relu, z));
        let u: Vec<f64> = (0..n).map(|i| ((i * 7919) % 211) as f64 / 50.0 - 2.1).collect();
        for e in [&bn_relu, &silu, &gelu, &pow, &prelu, &prelu_c, &bn_c] {
            let mut got = vec![0.0; n];
            e.eval_slice(&u, &mut got);
            let duals: Vec<Dual> = u.iter().map(|&z| Dual::var(z)).collect();
            let mut got_d = vec![Dual::var(0.0); n];
            e.eval_slice(&duals, &mut got_d);
            let (vals, slopes) = e.values_and_slopes(&u);
            for i in 0..n {
                let want = e.eval(i, u[i], &mut vec![]);
                let want_d = e.eval(i, Dual::var(u[i]), &mut vec![]);
                assert_eq!(got[i].to_bits(), want.to_bits(), "{e} at element {i}");
                assert_eq!(
                    (got_d[i].v.to_bits(), got_d[i].d.to_bits()),
                    (want_d.v.to_bits(), want_d.d.to_bits()),
                    "{e}"
                );
                assert_eq!((vals[i], slopes[i]), (want_d.v, want_d.d), "{e}");
            }
            // a slice at an offset (a task's chunk) has the whole's bits
            let (lo, hi) = (EVAL_CHUNK / 2 + 3, n - 5);
            let (mut v, mut d) = (vec![0.0; hi - lo], vec![0.0; hi - lo]);
            e.values_and_slopes_into(lo, &u[lo..hi], &mut v, &mut d);
            let mut part = vec![0.0; hi - lo];
            e.eval_slice_at(lo, &u[lo..hi], &mut part);
            for i in lo..hi {
                assert_eq!(
                    (v[i - lo].to_bits(), d[i - lo].to_bits()),
                    (vals[i].to_bits(), slopes[i].to_bits()),
                    "{e}"
                );
                assert_eq!(part[i - lo].to_bits(), got[i].to_bits(), "{e}");
            }
        }
    }

    #[test]
    fn silu_is_smooth_and_matches() {
        let mut e = Expr::var();
        let s = e.push(ExprNode::Unary(Unary::Sigmoid, 0));
        e.push(ExprNode::Binary(Binary::Mul, 0, s));
        assert_eq!(e.class(), ExprClass::Smooth);
        let x = 0.7_f64;
        let y = e.eval(0, Dual::var(x), &mut vec![]);
        let sg = 1.0 / (1.0 + (-x).exp());
        assert!((y.v - x * sg).abs() < 1e-15);
        assert!((y.d - (sg + x * sg * (1.0 - sg))).abs() < 1e-15);
    }
}
