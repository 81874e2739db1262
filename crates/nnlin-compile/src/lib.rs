//! The instance compiler and the accumulation of `W` and `b`.
//!
//! [`Compiler::new`] builds, once per model, every operator that does not
//! depend on the input (dense weights, affine diagonals). [`Compiler::instance`]
//! runs one forward pass at `x` through those operators, and emits for each
//! activation the diagonal of its slopes and its offset, so that every layer
//! is an exact affine map `y = A·u + c` at this `x`. [`accumulate`] then forms
//! `W = A_L ⋯ A_1` and `b = Σ_i (A_L ⋯ A_{i+1})·c_i`, in reverse (from the
//! output side) or forward (from the input side) order. `b` is always
//! back-propagated from the offsets, never computed as `F(x) − W·x`.
//!
//! The compiled path never calls the reference interpreter.

use std::sync::Arc;

use faer::{Mat, Par};
use nnlin_ir::{Dual, ExprClass, Layer, Network, Node};
use nnlin_linalg::{AffineOp, Operator};

/// How smooth activations are linearized (piecewise-linear ones always use
/// the linear piece `x` lies on, which both modes agree on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Slope σ'(z), offset σ(z) − σ'(z)·z: `W` is the Jacobian.
    #[default]
    Tangent,
    /// The source paper's rescale: slope σ(z)/z (σ'(0) at z = 0, with σ(0)
    /// as offset), offset 0 otherwise.
    Secant,
}

/// Accumulation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the output side: `G ← G·A_i`, `G` has `m` rows.
    Reverse,
    /// From the input side: `T ← A_i·T`, `T` has `n` columns.
    Forward,
}

/// Errors of the compiler.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum CompileError {
    /// The network's output does not depend on its input through a chain.
    #[error("the network is not a chain of single-input layers (layer `{0}`)")]
    NotAChain(String),
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
    /// A row index out of range.
    #[error("row {row} out of range: the output has {len} elements")]
    RowOutOfRange {
        /// The row.
        row: usize,
        /// Output length.
        len: usize,
    },
}

/// One layer compiled at one instance.
#[derive(Clone, Debug)]
pub struct CompiledLayer {
    /// Node name.
    pub name: String,
    /// The layer kind (`dense`, `activation`, …).
    pub layer_kind: &'static str,
    /// `y = A·u + c` at this instance.
    pub affine: AffineOp,
    /// For activation layers: which units have a nonzero slope.
    pub active: Option<Vec<bool>>,
}

/// A network compiled at one input.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The layers in order, input side first.
    pub layers: Vec<CompiledLayer>,
    /// `F(x)` as propagated through the compiled operators.
    pub output: Vec<f64>,
    /// Input length `n`.
    pub input_len: usize,
}

/// Per-model compiled state: the input-independent operators.
#[derive(Clone, Debug)]
pub struct Compiler {
    chain: Vec<StaticLayer>,
    input_len: usize,
    output_len: usize,
}

#[derive(Clone, Debug)]
struct StaticLayer {
    name: String,
    layer: Layer,
    /// The input-independent operator and bias (None for activations).
    fixed: Option<AffineOp>,
}

fn dense_operator(d: &nnlin_ir::Dense, rows: usize) -> AffineOp {
    let bias1: Vec<f64> = d.bias.clone().unwrap_or_else(|| vec![0.0; d.out_features]);
    if rows == 1 {
        let m = Mat::from_fn(d.out_features, d.in_features, |i, j| d.weight[i * d.in_features + j]);
        AffineOp { op: Arc::new(Operator::Dense(m)), bias: bias1 }
    } else {
        // I_rows ⊗ W: block diagonal, explicit CSR.
        let mut tri = Vec::with_capacity(rows * d.weight.len());
        for r in 0..rows {
            for o in 0..d.out_features {
                for k in 0..d.in_features {
                    let w = d.weight[o * d.in_features + k];
                    if w != 0.0 {
                        tri.push((r * d.out_features + o, r * d.in_features + k, w));
                    }
                }
            }
        }
        let op = Operator::csr_from_triplets(rows * d.out_features, rows * d.in_features, &tri);
        let bias = (0..rows).flat_map(|_| bias1.iter().copied()).collect();
        AffineOp { op: Arc::new(op), bias }
    }
}

impl Compiler {
    /// Prepares a network: checks it is a chain and builds the operators that
    /// do not depend on the input.
    pub fn new(net: &Network) -> Result<Self, CompileError> {
        let nodes: Vec<&Node> = net.chain().ok_or_else(|| {
            let name = net.nodes().iter().find(|n| n.inputs.len() != 1).map_or("?", |n| &n.name);
            CompileError::NotAChain(name.to_string())
        })?;
        let mut chain = Vec::with_capacity(nodes.len());
        for node in nodes {
            let in_shape = net.shape(node.inputs[0]);
            let numel: usize = in_shape.iter().product();
            let fixed = match &node.layer {
                Layer::Dense(d) => Some(dense_operator(d, numel / d.in_features)),
                Layer::Affine(a) => Some(AffineOp {
                    op: Arc::new(Operator::Diagonal(a.scale.clone())),
                    bias: a.shift.clone(),
                }),
                Layer::Reshape(_) => Some(AffineOp {
                    op: Arc::new(Operator::Identity(numel)),
                    bias: vec![0.0; numel],
                }),
                Layer::Activation(_) => None,
            };
            chain.push(StaticLayer { name: node.name.clone(), layer: node.layer.clone(), fixed });
        }
        Ok(Self { chain, input_len: net.input_len(), output_len: net.output_len() })
    }

    /// Input length `n`.
    pub fn input_len(&self) -> usize {
        self.input_len
    }
    /// Output length.
    pub fn output_len(&self) -> usize {
        self.output_len
    }

    /// Compiles every layer at `x` into its affine operator.
    pub fn instance(&self, x: &[f64], mode: Mode) -> Result<Instance, CompileError> {
        if x.len() != self.input_len {
            return Err(CompileError::InputLength { expected: self.input_len, got: x.len() });
        }
        if !x.iter().all(|v| v.is_finite()) {
            return Err(CompileError::NonFinite { where_: "in the input".into() });
        }
        let mut u = x.to_vec();
        let mut layers = Vec::with_capacity(self.chain.len());
        let mut scratch = Vec::new();
        for sl in &self.chain {
            let (affine, active) = match (&sl.layer, &sl.fixed) {
                (_, Some(fixed)) => (fixed.clone(), None),
                (Layer::Activation(a), None) => {
                    let pwl = a.expr.class() <= ExprClass::PiecewiseLinear;
                    let mut slope = Vec::with_capacity(u.len());
                    let mut offset = Vec::with_capacity(u.len());
                    for (i, &z) in u.iter().enumerate() {
                        let y = a.expr.eval(i, Dual::var(z), &mut scratch);
                        let (s, c) = if mode == Mode::Secant && !pwl && z != 0.0 {
                            (y.v / z, 0.0)
                        } else {
                            (y.d, y.v - y.d * z)
                        };
                        slope.push(s);
                        offset.push(c);
                    }
                    let active = slope.iter().map(|&s| s != 0.0).collect();
                    (
                        AffineOp { op: Arc::new(Operator::Diagonal(slope)), bias: offset },
                        Some(active),
                    )
                }
                (layer, None) => unreachable!("layer kind {} has no fixed operator", layer.kind()),
            };
            u = affine.apply(&u);
            if !u.iter().all(|v| v.is_finite()) {
                return Err(CompileError::NonFinite {
                    where_: format!("after layer `{}`", sl.name),
                });
            }
            layers.push(CompiledLayer {
                name: sl.name.clone(),
                layer_kind: sl.layer.kind(),
                affine,
                active,
            });
        }
        Ok(Instance { layers, output: u, input_len: self.input_len })
    }
}

/// Estimated multiply-adds of accumulating `m` rows in `dir` order.
pub fn estimated_flops(inst: &Instance, m: usize, dir: Direction) -> f64 {
    let width = match dir {
        Direction::Reverse => m,
        Direction::Forward => inst.input_len,
    };
    inst.layers
        .iter()
        .map(|l| match *l.affine.op {
            Operator::Identity(_) => 0.0,
            ref op => (op.nnz() * width) as f64,
        })
        .sum()
}

/// `W` (`rows.len() × n`) and `b` (`rows.len()`) of the selected output rows.
pub fn accumulate(
    inst: &Instance,
    rows: &[usize],
    dir: Direction,
    par: Par,
) -> Result<(Mat<f64>, Vec<f64>), CompileError> {
    let out_len = inst.output.len();
    if let Some(&row) = rows.iter().find(|&&r| r >= out_len) {
        return Err(CompileError::RowOutOfRange { row, len: out_len });
    }
    let m = rows.len();
    Ok(match dir {
        Direction::Reverse => {
            let mut g = Mat::<f64>::zeros(m, out_len);
            for (i, &r) in rows.iter().enumerate() {
                g[(i, r)] = 1.0;
            }
            let mut b = vec![0.0; m];
            for layer in inst.layers.iter().rev() {
                let c = &layer.affine.bias;
                if c.iter().any(|&v| v != 0.0) {
                    for (j, &cj) in c.iter().enumerate() {
                        if cj != 0.0 {
                            for (bi, gij) in b.iter_mut().zip(g.col_as_slice(j)) {
                                *bi += gij * cj;
                            }
                        }
                    }
                }
                if !matches!(*layer.affine.op, Operator::Identity(_)) {
                    g = layer.affine.op.left_mul(&g, par);
                }
            }
            (g, b)
        }
        Direction::Forward => {
            let n = inst.input_len;
            let mut t: Option<Mat<f64>> = None;
            let mut bias = vec![0.0; n];
            for layer in &inst.layers {
                let op = &layer.affine.op;
                if !matches!(**op, Operator::Identity(_)) {
                    t = Some(match t {
                        None => op.to_dense(),
                        Some(t) => op.right_mul(&t, par),
                    });
                }
                bias = layer.affine.apply(&bias);
            }
            let t = t.unwrap_or_else(|| Mat::identity(n, n));
            let w = Mat::from_fn(m, n, |i, j| t[(rows[i], j)]);
            (w, rows.iter().map(|&r| bias[r]).collect())
        }
    })
}
