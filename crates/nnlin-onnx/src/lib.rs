//! ONNX import: protobuf bytes → [`nnlin_ir::Network`]. The only crate that
//! knows protobuf.
//!
//! The importer walks the graph once, in its (topological) order:
//! - nodes whose inputs are all constant are folded (initializers,
//!   `Constant`, `ConstantOfShape`, `Transpose`/`Reshape`/`Cast`/… of
//!   constants, and `Shape` of a value, whose shape is static with batch 1);
//! - elementwise nodes on one tensor are fused into one pending
//!   [`Expr`] per result, so GELU, SiLU, Mish, HardSwish and input
//!   normalization become one layer however the exporter decomposed them;
//!   a pending expression becomes a layer only where a structural node or the
//!   graph output consumes it (an `Affine` layer if it is affine, an
//!   `Activation` otherwise);
//! - structural nodes (`Gemm`, `MatMul`, `Flatten`, `Reshape`, …) become
//!   layers directly.

mod expand;
pub mod proto;
pub mod tensor;

use std::collections::HashMap;

use nnlin_ir::{
    Binary, Dense, Dual, Expr, ExprClass, ExprNode, IrError, Layer, Network, Unary, ValueId,
};
use prost::Message;

use crate::proto::{AttributeProto, ModelProto, NodeProto};
pub use crate::tensor::ExternalRef;
use crate::tensor::Tensor;

/// The ONNX operator types nnlin imports.
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And (of constants)",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Ceil (of constants)",
    "Celu",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Einsum",
    "Elu",
    "Equal (of constants)",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor (of constants)",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater (of constants)",
    "GreaterOrEqual (of constants)",
    "GroupNormalization",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Less (of constants)",
    "LessOrEqual (of constants)",
    "Log",
    "LogSoftmax",
    "LRN",
    "MatMul",
    "MaxPool",
    "Mish",
    "Mod (of constants)",
    "Mul",
    "Neg",
    "Not (of constants)",
    "Or (of constants)",
    "Pad",
    "Pow",
    "PRelu",
    "Range (of constants)",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "ScatterND (of constants)",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign (of constants)",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where (constant condition)",
    "Xor (of constants)",
];

/// Lowest and highest default-domain opset accepted.
pub const OPSET_RANGE: (i64, i64) = (6, 21);

/// An import failure.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum OnnxError {
    /// The bytes are not an ONNX model.
    #[error("malformed ONNX file: {0}")]
    Decode(String),
    /// The model's opset is outside the supported range.
    #[error("unsupported opset {0} (nnlin reads opsets {lo} to {hi})", lo = OPSET_RANGE.0, hi = OPSET_RANGE.1)]
    Opset(i64),
    /// An operator nnlin does not implement.
    #[error("unsupported op: node `{node}` has op type `{op_type}`; supported ops: {}", SUPPORTED_OPS.join(", "))]
    UnsupportedOp {
        /// Node name.
        node: String,
        /// Its op type.
        op_type: String,
    },
    /// A supported operator used in a way nnlin does not implement.
    #[error("node `{node}` ({op_type}): {reason}")]
    Unsupported {
        /// Node name.
        node: String,
        /// Its op type.
        op_type: String,
        /// Why.
        reason: String,
    },
    /// A tensor that cannot be decoded.
    #[error("tensor `{name}`: {reason}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The graph itself is malformed (no input, unknown value, …).
    #[error("malformed graph: {0}")]
    Graph(String),
    /// A size stated in the file would allocate more than the memory budget
    /// (or overflows).
    #[error("node {node}: {what} needs {}, above the memory budget of {budget} bytes", need_text(*.need))]
    TooLarge {
        /// The node, as `` `name` (OpType) ``.
        node: String,
        /// What would be allocated, in words.
        what: String,
        /// How many bytes (`None` where the size overflows).
        need: Option<usize>,
        /// The budget in bytes.
        budget: usize,
    },
    /// The input has a dynamic dimension other than the batch and no
    /// [`ImportOptions::input_shape`] fixes it.
    #[error(
        "input `{input}` has a dynamic dimension {dim}; it is fixed from the input's shape (inspect: --input-shape)"
    )]
    DynamicInput {
        /// The graph input's name.
        input: String,
        /// The dynamic dimension.
        dim: usize,
    },
    /// The resulting network is invalid (shape mismatch, NaN weights).
    #[error(transparent)]
    Ir(#[from] IrError),
}

fn need_text(need: Option<usize>) -> String {
    need.map_or_else(|| "more than 2^64 bytes".into(), |b| format!("{b} bytes"))
}

/// A normalization parameter (scale or bias) spread over every output element.
type PerElement = Box<dyn Fn(&Tensor) -> Option<Vec<f64>>>;

/// What the importer may allocate.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportOptions {
    /// The most bytes any one buffer sized by the file may take: a folded
    /// constant, a value of the network (as `f64`), a convolution's unfolded
    /// input, a pooling layer's window taps. Sizes are checked (with
    /// overflow checks) before anything is allocated.
    pub max_bytes: usize,
    /// Which graph output to explain, by name; `None`: the only one (a
    /// graph with several outputs then needs a name).
    pub output: Option<String>,
    /// The shape of the data the model will run on, with or without its
    /// batch axis: it fixes the input's dynamic dimensions other than the
    /// batch (static ones are the model's).
    pub input_shape: Option<Vec<usize>>,
}

impl Default for ImportOptions {
    /// A budget of 8 GiB.
    fn default() -> Self {
        Self { max_bytes: 8 << 30, output: None, input_shape: None }
    }
}

impl ImportOptions {
    /// The same options with a memory budget of `bytes`.
    pub fn with_max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }
    /// The same options with dynamic input dimensions fixed from `shape`
    /// (the data's shape, with or without its batch axis).
    pub fn with_input_shape(mut self, shape: Vec<usize>) -> Self {
        self.input_shape = Some(shape);
        self
    }
    /// The same options explaining the graph output named `name`.
    pub fn with_output(mut self, name: impl Into<String>) -> Self {
        self.output = Some(name.into());
        self
    }
}

/// The most nodes one fused elementwise expression holds; a longer one is
/// made a layer of its own and fusion starts again from its result. This
/// keeps import linear in the number of nodes (each node copies its input's
/// expression) without changing what is computed.
pub const MAX_EXPR_NODES: usize = 256;

/// The most op names a fused expression's label (`source`) lists.
const MAX_SOURCES: usize = 32;

/// A model as imported.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The network.
    pub network: Network,
    /// The default-domain opset.
    pub opset: i64,
    /// `producer_name producer_version`.
    pub producer: String,
    /// The graph input's name.
    pub input_name: String,
    /// The graph output's name.
    pub output_name: String,
    /// The op type of a trailing `Softmax`/`LogSoftmax` that was skipped
    /// (the logits are explained instead).
    pub skipped_softmax: Option<String>,
}

#[derive(Clone, Debug)]
enum Sym {
    Const(Tensor),
    Value(ValueId),
    /// A pending elementwise function of `root`.
    Expr {
        root: ValueId,
        expr: Expr,
        sources: Vec<String>,
    },
}

struct Importer<'a> {
    net: Network,
    syms: HashMap<String, Sym>,
    opset: i64,
    node: &'a NodeProto,
    budget: usize,
}

fn attr<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}
fn attr_f(node: &NodeProto, name: &str, default: f64) -> f64 {
    attr(node, name).and_then(|a| a.f).map_or(default, tensor::literal_f32)
}
fn attr_i(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).and_then(|a| a.i).unwrap_or(default)
}
fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}
fn attr_s(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
}

fn node_name(node: &NodeProto) -> String {
    match node.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => node.output.first().cloned().unwrap_or_default(),
    }
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Named activation ops: an affine map pending on their input becomes its
/// own layer first.
const NAMED_ACTIVATIONS: &[&str] = &[
    "Celu",
    "Clip",
    "Elu",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Mish",
    "PRelu",
    "Relu",
    "Selu",
    "Sigmoid",
    "Softplus",
    "Softsign",
    "Tanh",
];

const ELEMENTWISE: &[&str] = &[
    "Abs",
    "Add",
    "BatchNormalization",
    "Celu",
    "Clip",
    "Div",
    "Elu",
    "Erf",
    "Exp",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Log",
    "Mish",
    "Mul",
    "Neg",
    "Pow",
    "PRelu",
    "Reciprocal",
    "Relu",
    "Selu",
    "Sigmoid",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Sub",
    "Sum",
    "Tanh",
];

/// `v` as a `usize` (a dimension, stride, pad, index), or an error naming it.
fn to_usize(v: i64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} is negative"))
}

impl Importer<'_> {
    /// Checks that `count` elements of `width` bytes fit the budget.
    fn check_alloc(
        &self,
        what: &str,
        count: Option<usize>,
        width: usize,
    ) -> Result<usize, OnnxError> {
        let bytes = count.and_then(|c| c.checked_mul(width));
        match bytes {
            Some(b) if b <= self.budget => Ok(count.unwrap_or(0)),
            _ => Err(OnnxError::TooLarge {
                node: format!("`{}` ({})", node_name(self.node), self.op()),
                what: what.to_string(),
                need: bytes,
                budget: self.budget,
            }),
        }
    }
    /// Checks a shape's element count (as `f64`s) against the budget.
    fn check_shape(&self, what: &str, dims: &[usize]) -> Result<usize, OnnxError> {
        self.check_alloc(&format!("{what} of shape {dims:?}"), nnlin_ir::checked_numel(dims), 8)
    }
    /// An integer attribute list as non-negative sizes.
    fn sizes(&self, name: &str, v: &[i64]) -> Result<Vec<usize>, OnnxError> {
        v.iter().map(|&x| to_usize(x, name).map_err(|e| self.unsupported(e))).collect()
    }
    fn op(&self) -> &str {
        self.node.op_type.as_deref().unwrap_or("")
    }
    fn unsupported(&self, reason: impl Into<String>) -> OnnxError {
        OnnxError::Unsupported {
            node: node_name(self.node),
            op_type: self.op().to_string(),
            reason: reason.into(),
        }
    }
    fn input(&self, i: usize) -> Result<Option<&Sym>, OnnxError> {
        match self.node.input.get(i).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(name) => self.syms.get(name).map(Some).ok_or_else(|| {
                OnnxError::Graph(format!(
                    "node `{}` reads `{name}`, which is not defined before it",
                    node_name(self.node)
                ))
            }),
        }
    }
    fn const_input(&self, i: usize) -> Result<Option<Tensor>, OnnxError> {
        match self.input(i)? {
            None => Ok(None),
            Some(Sym::Const(t)) => Ok(Some(t.clone())),
            Some(_) => Err(self.unsupported(format!("input {i} must be a constant"))),
        }
    }
    fn shape_of(&self, s: &Sym) -> Vec<usize> {
        match s {
            Sym::Const(t) => t.dims.clone(),
            Sym::Value(v) | Sym::Expr { root: v, .. } => self.net.shape(*v).to_vec(),
        }
    }

    /// Turns a pending expression into a layer; returns the value.
    fn materialize(&mut self, name: &str) -> Result<ValueId, OnnxError> {
        let sym = self.syms.get(name).cloned().ok_or_else(|| {
            OnnxError::Graph(format!("value `{name}` is not defined before it is used"))
        })?;
        let v = match sym {
            Sym::Value(v) => return Ok(v),
            Sym::Const(_) => {
                return Err(self.unsupported(format!(
                    "input `{name}` is a constant where a tensor depending on the model input is expected"
                )));
            }
            Sym::Expr { root, expr, sources } => {
                let numel = self.net.numel(root);
                let source = sources.join("+");
                match expr.class() {
                    _ if expr.is_identity() => root,
                    ExprClass::Constant => {
                        return Err(self
                            .unsupported(format!("`{name}` does not depend on the model input")));
                    }
                    ExprClass::Affine => {
                        let mut scratch = Vec::new();
                        let (mut scale, mut shift) = (Vec::new(), Vec::new());
                        for i in 0..numel {
                            let y = expr.eval(i, Dual::var(0.0), &mut scratch);
                            scale.push(y.d);
                            shift.push(y.v);
                        }
                        let layer = Layer::Affine(nnlin_ir::Affine { scale, shift });
                        self.net.push(name, source, layer, vec![root])?
                    }
                    ExprClass::PiecewiseLinear | ExprClass::Smooth => {
                        let layer = Layer::Activation(nnlin_ir::Activation { expr });
                        self.net.push(name, source, layer, vec![root])?
                    }
                }
            }
        };
        self.syms.insert(name.to_string(), Sym::Value(v));
        Ok(v)
    }

    fn input_value(&mut self, i: usize) -> Result<ValueId, OnnxError> {
        let name = self.node.input.get(i).cloned().unwrap_or_default();
        self.materialize(&name)
    }

    fn set_output(&mut self, sym: Sym) {
        if let Some(out) = self.node.output.first() {
            self.syms.insert(out.clone(), sym);
        }
    }

    /// An elementwise node with at least one non-constant input.
    fn elementwise(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        // A pending affine map (normalization, batch-norm) stays its own
        // diagonal layer before a named activation, so the activation's
        // secant rescale sees exactly its own pre-activation.
        if NAMED_ACTIVATIONS.contains(&op.as_str()) {
            for i in 0..self.node.input.len() {
                if let Some(Sym::Expr { expr, .. }) = self.input(i)?
                    && expr.class() == ExprClass::Affine
                    && !expr.is_identity()
                {
                    let name = self.node.input[i].clone();
                    self.materialize(&name)?;
                }
            }
        }
        if op == "BatchNormalization" {
            return self.batchnorm();
        }
        // Residual / branch sums: Add, Sub, Sum of different tensors.
        let roots: Vec<ValueId> = (0..self.node.input.len())
            .filter_map(|i| match self.input(i) {
                Ok(Some(Sym::Value(v) | Sym::Expr { root: v, .. })) => Some(*v),
                _ => None,
            })
            .collect();
        if roots.iter().any(|r| *r != roots[0]) {
            if matches!(op.as_str(), "Mul" | "Div") && self.node.input.len() == 2 {
                return self.product(op == "Div");
            }
            return self.branch_sum();
        }
        let mut root: Option<ValueId> = None;
        let mut out_shape: Vec<usize> = vec![];
        let mut inputs: Vec<Option<Sym>> = vec![];
        let rank = roots.first().map_or(0, |r| self.net.shape(*r).len());
        for i in 0..self.node.input.len() {
            let s = self.input(i)?.cloned();
            if let Some(s) = &s {
                let shape = match s {
                    Sym::Const(t) => self.legacy_broadcast(t, rank)?.dims,
                    other => self.shape_of(other),
                };
                out_shape = tensor::broadcast_shape(&out_shape, &shape).ok_or_else(|| {
                    self.unsupported(format!("shapes do not broadcast: {shape:?}"))
                })?;
                if let Sym::Value(v) | Sym::Expr { root: v, .. } = s {
                    match root {
                        None => root = Some(*v),
                        Some(r) if r == *v => {}
                        Some(_) => {
                            return Err(self.unsupported(
                                "elementwise op on two different tensors (a residual or gated \
                                 branch) is not supported",
                            ));
                        }
                    }
                }
            }
            inputs.push(s);
        }
        let root = root.expect("elementwise called with a non-constant input");
        let root_shape = self.net.shape(root).to_vec();
        if out_shape != root_shape {
            return Err(self.unsupported(format!(
                "broadcasting expands the tensor from {root_shape:?} to {out_shape:?}"
            )));
        }
        let mut e = Expr::var();
        let var = 0;
        let mut sources = vec![];
        let mut args: Vec<Option<usize>> = vec![];
        for (k, s) in inputs.iter().enumerate() {
            let repeated = self.node.input[..k].contains(&self.node.input[k]);
            args.push(match s {
                None => None,
                Some(Sym::Value(_)) => Some(var),
                Some(Sym::Expr { expr, sources: src, .. }) => {
                    // the op names of a shared subexpression are listed once;
                    // the list is a label, capped so that it cannot double
                    // with every node
                    if !repeated {
                        let room = MAX_SOURCES.saturating_sub(sources.len());
                        sources.extend(src.iter().take(room).cloned());
                    }
                    Some(e.splice(expr, var))
                }
                Some(Sym::Const(t)) => {
                    let t = &self.legacy_broadcast(t, root_shape.len())?;
                    let data = if t.numel() == 1 {
                        vec![t.data[0]]
                    } else {
                        tensor::broadcast_to(t, &root_shape).ok_or_else(|| {
                            self.unsupported(format!(
                                "constant of shape {:?} does not broadcast",
                                t.dims
                            ))
                        })?
                    };
                    Some(e.push_const(data))
                }
            });
        }
        sources.push(op.clone());
        let a = |i: usize| args.get(i).copied().flatten();
        if op == "Sum" {
            let mut acc = a(0).ok_or_else(|| self.unsupported("missing input 0"))?;
            for i in 1..args.len() {
                let y = a(i).ok_or_else(|| self.unsupported("missing input"))?;
                acc = e.push(ExprNode::Binary(Binary::Add, acc, y));
            }
            debug_assert_eq!(acc, e.nodes.len() - 1);
            return Ok(Sym::Expr { root, expr: e, sources });
        }
        let x = a(0).ok_or_else(|| self.unsupported("missing input 0"))?;
        let n = self.node;
        let un = |e: &mut Expr, f: Unary| e.push(ExprNode::Unary(f, x));
        let bin = |e: &mut Expr, f: Binary| -> Result<usize, OnnxError> {
            let y = a(1).ok_or_else(|| self.unsupported("missing input 1"))?;
            Ok(e.push(ExprNode::Binary(f, x, y)))
        };
        match op.as_str() {
            "Add" => bin(&mut e, Binary::Add)?,
            "Sub" => bin(&mut e, Binary::Sub)?,
            "Mul" => bin(&mut e, Binary::Mul)?,
            "Div" => bin(&mut e, Binary::Div)?,
            "Pow" => bin(&mut e, Binary::Pow)?,
            "PRelu" => {
                if !matches!(inputs.get(1), Some(Some(Sym::Const(_)))) {
                    return Err(self.unsupported("PRelu slope must be a constant"));
                }
                bin(&mut e, Binary::PRelu)?
            }
            "Relu" => un(&mut e, Unary::Relu),
            "LeakyRelu" => un(&mut e, Unary::LeakyRelu { alpha: attr_f(n, "alpha", 0.01) }),
            "Elu" => un(&mut e, Unary::Elu { alpha: attr_f(n, "alpha", 1.0) }),
            "Celu" => un(&mut e, Unary::Celu { alpha: attr_f(n, "alpha", 1.0) }),
            "Selu" => un(
                &mut e,
                Unary::Selu {
                    // The spec's defaults are the float32 roundings of SELU's
                    // constants; PyTorch computes with the exact ones.
                    alpha: attr_f(n, "alpha", 1.673_263_242_354_377_3),
                    gamma: attr_f(n, "gamma", 1.050_700_987_355_480_5),
                },
            ),
            "Gelu" => match attr_s(n, "approximate").as_deref() {
                Some("tanh") => un(&mut e, Unary::GeluTanh),
                None | Some("none") => un(&mut e, Unary::Gelu),
                Some(other) => {
                    return Err(self.unsupported(format!("approximate=`{other}`")));
                }
            },
            "Softplus" => un(&mut e, Unary::Softplus),
            "Sigmoid" => un(&mut e, Unary::Sigmoid),
            "Tanh" => un(&mut e, Unary::Tanh),
            "HardSigmoid" => un(
                &mut e,
                Unary::HardSigmoid { alpha: attr_f(n, "alpha", 0.2), beta: attr_f(n, "beta", 0.5) },
            ),
            "HardSwish" => un(&mut e, Unary::HardSwish),
            "Softsign" => un(&mut e, Unary::Softsign),
            "Mish" => {
                let sp = un(&mut e, Unary::Softplus);
                let th = e.push(ExprNode::Unary(Unary::Tanh, sp));
                e.push(ExprNode::Binary(Binary::Mul, x, th))
            }
            "Erf" => un(&mut e, Unary::Erf),
            "Exp" => un(&mut e, Unary::Exp),
            "Log" => un(&mut e, Unary::Log),
            "Sqrt" => un(&mut e, Unary::Sqrt),
            "Abs" => un(&mut e, Unary::Abs),
            "Neg" => un(&mut e, Unary::Neg),
            "Reciprocal" => un(&mut e, Unary::Reciprocal),
            "Clip" => {
                let (min, max) = if self.opset < 11 {
                    (attr_f(n, "min", f64::NEG_INFINITY), attr_f(n, "max", f64::INFINITY))
                } else {
                    let scalar = |i: usize| -> Result<Option<f64>, OnnxError> {
                        match inputs.get(i) {
                            Some(Some(Sym::Const(t))) if t.numel() == 1 => Ok(Some(t.data[0])),
                            Some(Some(_)) => {
                                Err(self.unsupported("Clip bounds must be constant scalars"))
                            }
                            _ => Ok(None),
                        }
                    };
                    (scalar(1)?.unwrap_or(f64::NEG_INFINITY), scalar(2)?.unwrap_or(f64::INFINITY))
                };
                // Bounds were pushed as constant nodes above; they are unused,
                // which is harmless.
                un(&mut e, Unary::Clip { min, max })
            }
            other => unreachable!("{other} is not elementwise"),
        };
        Ok(Sym::Expr { root, expr: e, sources })
    }

    /// Folds a node whose inputs are all constant.
    fn fold(&self) -> Result<Tensor, OnnxError> {
        let n = self.node;
        let op = self.op();
        let c = |i: usize| -> Result<Tensor, OnnxError> {
            self.const_input(i)?.ok_or_else(|| self.unsupported(format!("missing input {i}")))
        };
        let unary = |f: fn(f64) -> f64| -> Result<Tensor, OnnxError> {
            let t = c(0)?;
            let data = t.data.iter().map(|&v| f(v)).collect();
            Ok(Tensor::new(t.dims, data, false))
        };
        let bin = |f: fn(f64, f64) -> f64| -> Result<Tensor, OnnxError> {
            let (a, b) = (c(0)?, c(1)?);
            if let Some(shape) = tensor::broadcast_shape(&a.dims, &b.dims) {
                self.check_shape("the folded constant", &shape)?;
            }
            let mut t = tensor::binary(&a, &b, f)
                .ok_or_else(|| self.unsupported("constant shapes do not broadcast"))?;
            if t.is_int {
                t.data.iter_mut().for_each(|v| *v = v.trunc());
            }
            Ok(t)
        };
        let bool_bin = |f: fn(f64, f64) -> bool| -> Result<Tensor, OnnxError> {
            let (a, b) = (c(0)?, c(1)?);
            if let Some(shape) = tensor::broadcast_shape(&a.dims, &b.dims) {
                self.check_shape("the folded constant", &shape)?;
            }
            let mut t = tensor::binary(&a, &b, |x, y| f64::from(u8::from(f(x, y))))
                .ok_or_else(|| self.unsupported("constant shapes do not broadcast"))?;
            t.is_int = true;
            Ok(t)
        };
        Ok(match op {
            "Identity" | "Dropout" => c(0)?,
            "Add" => bin(|a, b| a + b)?,
            "Sub" => bin(|a, b| a - b)?,
            "Mul" => bin(|a, b| a * b)?,
            "Div" => bin(|a, b| a / b)?,
            "Pow" => bin(f64::powf)?,
            "Neg" => {
                let t = c(0)?;
                Tensor::new(t.dims.clone(), t.data.iter().map(|v| -v).collect(), t.is_int)
            }
            "Sqrt" => unary(f64::sqrt)?,
            "Exp" => unary(f64::exp)?,
            "Log" => unary(f64::ln)?,
            "Reciprocal" => unary(|v| 1.0 / v)?,
            "Erf" => unary(libm_erf)?,
            "Tanh" => unary(f64::tanh)?,
            "Sigmoid" => unary(|v| 1.0 / (1.0 + (-v).exp()))?,
            "Relu" => unary(|v| v.max(0.0))?,
            "Cast" | "CastLike" => {
                let t = c(0)?;
                let is_int = if op == "CastLike" {
                    c(1)?.is_int
                } else {
                    !matches!(attr_i(n, "to", 1), 1 | 10 | 11 | 16)
                };
                let data = if is_int {
                    t.data.iter().map(|v| v.trunc()).collect()
                } else {
                    t.data.clone()
                };
                Tensor::new(t.dims, data, is_int)
            }
            "Transpose" => {
                let t = c(0)?;
                let perm = self.perm(t.dims.len())?;
                tensor::transpose(&t, &perm)
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                let t = c(0)?;
                let dims = self.reshape_target(&t.dims)?;
                Tensor::new(dims, t.data, t.is_int)
            }
            "ConstantOfShape" => {
                let shape = self.sizes("dimension", &c(0)?.as_ints())?;
                let numel = self.check_shape("the constant", &shape)?;
                let (value, is_int) = match attr(n, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => {
                        let t = tensor::decode(t).map_err(|reason| OnnxError::BadTensor {
                            name: node_name(n),
                            reason,
                        })?;
                        (t.data.first().copied().unwrap_or(0.0), t.is_int)
                    }
                    None => (0.0, false),
                };
                Tensor::new(shape, vec![value; numel], is_int)
            }
            "Shape" => {
                let t = c(0)?;
                Tensor::ints(&t.dims.iter().map(|&d| d as i64).collect::<Vec<_>>())
            }
            "Concat" => {
                let parts: Vec<Tensor> = (0..n.input.len()).map(c).collect::<Result<_, _>>()?;
                let first = parts.first().ok_or_else(|| self.unsupported("no inputs"))?;
                let rank = first.dims.len();
                let axis = norm_axis(attr_i(n, "axis", 0), rank)
                    .ok_or_else(|| self.unsupported("bad axis"))?;
                let same = |p: &Tensor| {
                    p.dims.len() == rank
                        && p.dims
                            .iter()
                            .zip(&first.dims)
                            .enumerate()
                            .all(|(i, (a, b))| i == axis || a == b)
                };
                if !parts.iter().all(same) {
                    return Err(self.unsupported("concatenated shapes differ off the axis"));
                }
                let mut dims = first.dims.clone();
                dims[axis] = parts.iter().map(|p| p.dims[axis]).sum();
                self.check_shape("the concatenation", &dims)?;
                let outer: usize = dims[..axis].iter().product();
                let mut data = Vec::with_capacity(parts.iter().map(Tensor::numel).sum());
                for o in 0..outer {
                    for p in &parts {
                        let inner: usize = p.dims[axis..].iter().product();
                        data.extend_from_slice(&p.data[o * inner..(o + 1) * inner]);
                    }
                }
                Tensor::new(dims, data, parts.iter().all(|p| p.is_int))
            }
            "Tile" => {
                let t = c(0)?;
                let reps = self.sizes("repeats", &c(1)?.as_ints())?;
                if reps.len() != t.dims.len() {
                    return Err(self.unsupported("repeats must have one entry per axis"));
                }
                let dims: Option<Vec<usize>> =
                    t.dims.iter().zip(&reps).map(|(d, r)| d.checked_mul(*r)).collect();
                let dims = dims.ok_or_else(|| self.unsupported("the tiled shape overflows"))?;
                let numel = self.check_shape("the tiled tensor", &dims)?;
                let rank = dims.len();
                let st = tensor::strides(&t.dims);
                let data = (0..numel)
                    .map(|flat| {
                        let (mut rem, mut src) = (flat, 0);
                        for ax in (0..rank).rev() {
                            src += (rem % dims[ax]) % t.dims[ax] * st[ax];
                            rem /= dims[ax];
                        }
                        t.data[src]
                    })
                    .collect();
                Tensor::new(dims, data, t.is_int)
            }
            "Range" => {
                let scalar = |i: usize| -> Result<f64, OnnxError> {
                    match c(i)?.data.as_slice() {
                        [v] if v.is_finite() => Ok(*v),
                        _ => Err(self.unsupported("start, limit and delta must be finite scalars")),
                    }
                };
                let (start, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
                if delta == 0.0 {
                    return Err(self.unsupported("delta 0"));
                }
                let steps = ((limit - start) / delta).ceil().max(0.0);
                let count = if steps.is_finite() && steps < 2f64.powi(62) {
                    Some(steps as usize)
                } else {
                    None
                };
                let count = self.check_alloc(&format!("a range of {steps} elements"), count, 8)?;
                let data: Vec<f64> = (0..count).map(|i| start + i as f64 * delta).collect();
                Tensor::new(vec![count], data, c(0)?.is_int)
            }
            "Slice" => {
                let t = c(0)?;
                let rank = t.dims.len();
                let (starts, ends, axes, steps) = if self.opset < 10 {
                    (
                        attr_ints(n, "starts").unwrap_or_default(),
                        attr_ints(n, "ends").unwrap_or_default(),
                        attr_ints(n, "axes"),
                        None,
                    )
                } else {
                    (
                        c(1)?.as_ints(),
                        c(2)?.as_ints(),
                        self.const_input(3)?.map(|t| t.as_ints()),
                        self.const_input(4)?.map(|t| t.as_ints()),
                    )
                };
                let axes: Vec<i64> = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
                let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
                if [ends.len(), axes.len(), steps.len()].iter().any(|&l| l != starts.len()) {
                    return Err(self.unsupported(format!(
                        "{} starts, {} ends, {} axes and {} steps (all must be equal)",
                        starts.len(),
                        ends.len(),
                        axes.len(),
                        steps.len()
                    )));
                }
                // per axis: the list of source indices
                let mut picks: Vec<Vec<usize>> = t.dims.iter().map(|&d| (0..d).collect()).collect();
                for k in 0..starts.len() {
                    let ax =
                        norm_axis(axes[k], rank).ok_or_else(|| self.unsupported("bad axis"))?;
                    let d = t.dims[ax] as i64;
                    let step = steps[k];
                    if step == 0 {
                        return Err(self.unsupported("step 0"));
                    }
                    let clampi = |v: i64, lo: i64, hi: i64| {
                        let v = if v < 0 { v + d } else { v };
                        v.clamp(lo, hi)
                    };
                    let mut idx = vec![];
                    if step > 0 {
                        let (mut i, e) = (clampi(starts[k], 0, d), clampi(ends[k], 0, d));
                        while i < e {
                            idx.push(i as usize);
                            let Some(next) = i.checked_add(step) else { break };
                            i = next;
                        }
                    } else {
                        let (mut i, e) = (clampi(starts[k], -1, d - 1), clampi(ends[k], -1, d - 1));
                        while i > e {
                            idx.push(i as usize);
                            let Some(next) = i.checked_add(step) else { break };
                            i = next;
                        }
                    }
                    picks[ax] = idx;
                }
                let dims: Vec<usize> = picks.iter().map(Vec::len).collect();
                let numel: usize = dims.iter().product();
                let st = tensor::strides(&t.dims);
                let mut data = Vec::with_capacity(numel);
                let mut idx = vec![0usize; rank];
                for _ in 0..numel {
                    data.push(t.data[(0..rank).map(|a| picks[a][idx[a]] * st[a]).sum::<usize>()]);
                    for a in (0..rank).rev() {
                        idx[a] += 1;
                        if idx[a] < dims[a] {
                            break;
                        }
                        idx[a] = 0;
                    }
                }
                Tensor::new(dims, data, t.is_int)
            }
            "Expand" => {
                let t = c(0)?;
                let shape = self.sizes("dimension", &c(1)?.as_ints())?;
                let out = tensor::broadcast_shape(&t.dims, &shape)
                    .ok_or_else(|| self.unsupported("shapes do not broadcast"))?;
                self.check_shape("the expanded constant", &out)?;
                let data =
                    tensor::broadcast_to(&t, &out).ok_or_else(|| self.unsupported("broadcast"))?;
                Tensor::new(out, data, t.is_int)
            }
            "Equal" => bool_bin(|a, b| a == b)?,
            "Less" => bool_bin(|a, b| a < b)?,
            "LessOrEqual" => bool_bin(|a, b| a <= b)?,
            "Greater" => bool_bin(|a, b| a > b)?,
            "GreaterOrEqual" => bool_bin(|a, b| a >= b)?,
            "And" => bool_bin(|a, b| a != 0.0 && b != 0.0)?,
            "Or" => bool_bin(|a, b| a != 0.0 || b != 0.0)?,
            "Xor" => bool_bin(|a, b| (a != 0.0) != (b != 0.0))?,
            "Not" => {
                let t = c(0)?;
                Tensor::new(
                    t.dims,
                    t.data.iter().map(|&v| f64::from(u8::from(v == 0.0))).collect(),
                    true,
                )
            }
            "Floor" => unary(f64::floor)?,
            "Ceil" => unary(f64::ceil)?,
            "Sign" => unary(|v| {
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            })?,
            // integer Mod takes the divisor's sign (Python's %); fmod = 1
            // the dividend's, as C's fmod
            "Mod" if attr_i(n, "fmod", 0) != 0 => bin(|a, b| a % b)?,
            "Mod" => bin(|a, b| a - b * (a / b).floor())?,
            "Where" => {
                let (cond, a, b) = (c(0)?, c(1)?, c(2)?);
                let shape = tensor::broadcast_shape(&cond.dims, &a.dims)
                    .and_then(|s| tensor::broadcast_shape(&s, &b.dims))
                    .ok_or_else(|| self.unsupported("shapes do not broadcast"))?;
                self.check_shape("the selected constant", &shape)?;
                let bc = |t: &Tensor| {
                    tensor::broadcast_to(t, &shape).ok_or_else(|| self.unsupported("broadcast"))
                };
                let (cv, av, bv) = (bc(&cond)?, bc(&a)?, bc(&b)?);
                let data =
                    (0..cv.len()).map(|i| if cv[i] != 0.0 { av[i] } else { bv[i] }).collect();
                Tensor::new(shape, data, a.is_int && b.is_int)
            }
            "Gather" => {
                let (t, idx) = (c(0)?, c(1)?);
                let axis = norm_axis(attr_i(n, "axis", 0), t.dims.len())
                    .ok_or_else(|| self.unsupported("bad axis"))?;
                let len = t.dims[axis] as i64;
                let picks = idx
                    .as_ints()
                    .iter()
                    .map(|&i| {
                        let j = if i < 0 { i + len } else { i };
                        (0..len).contains(&j).then_some(j as usize).ok_or_else(|| {
                            self.unsupported(format!("index {i} out of range for {len}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut dims = t.dims[..axis].to_vec();
                dims.extend(&idx.dims);
                dims.extend(&t.dims[axis + 1..]);
                self.check_shape("the gathered tensor", &dims)?;
                let outer: usize = t.dims[..axis].iter().product();
                let inner: usize = t.dims[axis + 1..].iter().product();
                let mut data = Vec::with_capacity(outer * picks.len() * inner);
                for o in 0..outer {
                    for &j in &picks {
                        let at = (o * t.dims[axis] + j) * inner;
                        data.extend_from_slice(&t.data[at..at + inner]);
                    }
                }
                Tensor::new(dims, data, t.is_int)
            }
            "ScatterND" => {
                // a copy of data with the slices named by indices replaced
                // (or combined, per `reduction`) by updates
                let (data, idx, upd) = (c(0)?, c(1)?, c(2)?);
                let (r, q) = (data.dims.len(), idx.dims.len());
                let k = idx.dims.last().copied().unwrap_or(0);
                if q == 0 || k == 0 || k > r {
                    return Err(self.unsupported(format!(
                        "indices of shape {:?} for data of rank {r}",
                        idx.dims
                    )));
                }
                let mut want = idx.dims[..q - 1].to_vec();
                want.extend(&data.dims[k..]);
                if upd.dims != want {
                    return Err(self.unsupported(format!(
                        "updates of shape {:?}, expected {want:?}",
                        upd.dims
                    )));
                }
                let combine: fn(f64, f64) -> f64 = match attr_s(n, "reduction").as_deref() {
                    None | Some("none") => |_, u| u,
                    Some("add") => |a, u| a + u,
                    Some("mul") => |a, u| a * u,
                    Some("max") => f64::max,
                    Some("min") => f64::min,
                    Some(other) => return Err(self.unsupported(format!("reduction={other}"))),
                };
                let slice: usize = data.dims[k..].iter().product();
                let st = tensor::strides(&data.dims);
                let ints = idx.as_ints();
                let mut out = data.data.clone();
                for (t, tuple) in ints.chunks_exact(k).enumerate() {
                    let mut at = 0usize;
                    for (a, &i) in tuple.iter().enumerate() {
                        let d = data.dims[a] as i64;
                        let j = if i < 0 { i + d } else { i };
                        if !(0..d).contains(&j) {
                            return Err(self.unsupported(format!("index {i} out of range for {d}")));
                        }
                        at += j as usize * st[a];
                    }
                    for (o, &u) in out[at..at + slice].iter_mut().zip(&upd.data[t * slice..]) {
                        *o = combine(*o, u);
                    }
                }
                Tensor::new(data.dims.clone(), out, data.is_int && upd.is_int)
            }
            other => {
                return Err(OnnxError::UnsupportedOp {
                    node: node_name(n),
                    op_type: other.to_string(),
                });
            }
        })
    }

    /// Output shape of Reshape/Flatten/Squeeze/Unsqueeze applied to `dims`.
    fn reshape_target(&self, dims: &[usize]) -> Result<Vec<usize>, OnnxError> {
        let n = self.node;
        let numel: usize = dims.iter().product();
        let axes_of = |this: &Self| -> Result<Option<Vec<i64>>, OnnxError> {
            if let Some(a) = attr_ints(n, "axes") {
                return Ok(Some(a));
            }
            Ok(this.const_input(1)?.map(|t| t.as_ints()))
        };
        match self.op() {
            "Flatten" => {
                let axis = attr_i(n, "axis", 1);
                let a = if axis < 0 { axis + dims.len() as i64 } else { axis };
                if !(0..=dims.len() as i64).contains(&a) {
                    return Err(self.unsupported(format!("axis {axis} out of range")));
                }
                let lead: usize = dims[..a as usize].iter().product();
                Ok(vec![lead, numel / lead.max(1)])
            }
            "Reshape" => {
                let target = self
                    .const_input(1)?
                    .ok_or_else(|| self.unsupported("missing shape"))?
                    .as_ints();
                let allowzero = attr_i(n, "allowzero", 0) != 0;
                let mut out = Vec::with_capacity(target.len());
                let mut infer = None;
                for (i, &t) in target.iter().enumerate() {
                    match t {
                        -1 => {
                            infer = Some(i);
                            out.push(1);
                        }
                        0 if !allowzero => out.push(
                            *dims
                                .get(i)
                                .ok_or_else(|| self.unsupported("0 copies a missing dimension"))?,
                        ),
                        t if t >= 0 => out.push(t as usize),
                        t => return Err(self.unsupported(format!("bad dimension {t}"))),
                    }
                }
                if target.iter().filter(|&&t| t == -1).count() > 1 {
                    return Err(self.unsupported(format!("more than one -1 in {target:?}")));
                }
                if let Some(i) = infer {
                    let known = nnlin_ir::checked_numel(&out).ok_or_else(|| {
                        self.unsupported(format!("cannot reshape {dims:?} to {target:?}"))
                    })?;
                    if known == 0 || !numel.is_multiple_of(known) {
                        return Err(
                            self.unsupported(format!("cannot reshape {dims:?} to {target:?}"))
                        );
                    }
                    out[i] = numel / known;
                }
                if nnlin_ir::checked_numel(&out) != Some(numel) {
                    return Err(self.unsupported(format!("cannot reshape {dims:?} to {target:?}")));
                }
                Ok(out)
            }
            "Squeeze" => {
                let axes = axes_of(self)?;
                let rank = dims.len();
                let drop: Vec<usize> = match axes {
                    Some(a) => a
                        .iter()
                        .map(|&x| norm_axis(x, rank).ok_or_else(|| self.unsupported("bad axis")))
                        .collect::<Result<_, _>>()?,
                    None => (0..rank).filter(|&i| dims[i] == 1).collect(),
                };
                if drop.iter().any(|&i| dims[i] != 1) {
                    return Err(self.unsupported("squeezing a dimension that is not 1"));
                }
                Ok((0..rank).filter(|i| !drop.contains(i)).map(|i| dims[i]).collect())
            }
            "Unsqueeze" => {
                let axes = axes_of(self)?.ok_or_else(|| self.unsupported("missing axes"))?;
                let rank = dims.len() + axes.len();
                let mut ins: Vec<usize> = axes
                    .iter()
                    .map(|&x| norm_axis(x, rank).ok_or_else(|| self.unsupported("bad axis")))
                    .collect::<Result<_, _>>()?;
                ins.sort_unstable();
                if ins.windows(2).any(|w| w[0] == w[1]) {
                    return Err(self.unsupported(format!("duplicate axes {axes:?}")));
                }
                let mut out = Vec::with_capacity(rank);
                let mut it = dims.iter();
                for i in 0..rank {
                    if ins.contains(&i) {
                        out.push(1);
                    } else {
                        out.push(*it.next().ok_or_else(|| self.unsupported("bad axes"))?);
                    }
                }
                Ok(out)
            }
            other => unreachable!("{other} is not a reshape"),
        }
    }

    /// Opsets before 7 broadcast a constant only when `broadcast = 1`,
    /// aligning it at `axis` (PRelu: a per-channel slope at axis 1); later
    /// opsets use numpy rules. Returns the constant reshaped for numpy rules.
    fn legacy_broadcast(&self, t: &Tensor, rank: usize) -> Result<Tensor, OnnxError> {
        if self.opset >= 7 || t.numel() == 1 || t.dims.len() >= rank {
            return Ok(t.clone());
        }
        let axis = if self.op() == "PRelu" {
            1
        } else if attr_i(self.node, "broadcast", 0) != 0 {
            match attr(self.node, "axis").and_then(|a| a.i) {
                Some(a) => norm_axis(a, rank).ok_or_else(|| {
                    self.unsupported(format!("broadcast axis {a} outside rank {rank}"))
                })?,
                None => rank - t.dims.len(),
            }
        } else {
            return Ok(t.clone());
        };
        if axis + t.dims.len() > rank {
            return Err(self.unsupported(format!(
                "a constant of shape {:?} at axis {axis} exceeds rank {rank}",
                t.dims
            )));
        }
        let mut dims = vec![1; axis];
        dims.extend(&t.dims);
        dims.resize(rank, 1);
        Ok(Tensor::new(dims, t.data.clone(), t.is_int))
    }

    /// A transpose's permutation for `rank` axes (reversed by default),
    /// validated.
    fn perm(&self, rank: usize) -> Result<Vec<usize>, OnnxError> {
        let perm: Vec<usize> = match attr_ints(self.node, "perm") {
            Some(p) => self.sizes("perm entry", &p)?,
            None => (0..rank).rev().collect(),
        };
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if !sorted.iter().copied().eq(0..rank) {
            return Err(
                self.unsupported(format!("perm {perm:?} is not a permutation of {rank} axes"))
            );
        }
        Ok(perm)
    }

    /// Inference batch-norm, `(x − mean)/√(var + ε)·scale + B` per channel:
    /// an affine map pending on its input (a diagonal and a bias).
    fn batchnorm(&mut self) -> Result<Sym, OnnxError> {
        let eps = attr_f(self.node, "epsilon", 1e-5);
        if attr_i(self.node, "training_mode", 0) != 0 {
            return Err(self.unsupported("training_mode=1"));
        }
        if self.node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(self.unsupported("running-statistics outputs are not supported"));
        }
        let c = |i: usize| {
            self.const_input(i)?
                .ok_or_else(|| self.unsupported("scale, B, mean and var must be constants"))
        };
        let (scale, bias, mean, var) = (c(1)?, c(2)?, c(3)?, c(4)?);
        let (root, base, mut sources) = match self.input(0)?.cloned() {
            Some(Sym::Value(v)) => (v, Expr::var(), vec![]),
            Some(Sym::Expr { root, expr, sources }) => (root, expr, sources),
            _ => return Err(self.unsupported("input must depend on the model input")),
        };
        let shape = self.net.shape(root).to_vec();
        let channels = shape.get(1).copied().unwrap_or(1);
        if [&scale, &bias, &mean, &var].iter().any(|t| t.numel() != channels) {
            return Err(self.unsupported(format!("parameters must have {channels} channels")));
        }
        let inner: usize = shape.iter().skip(2).product();
        let mut mul = Vec::with_capacity(channels * inner);
        let mut add = Vec::with_capacity(channels * inner);
        for ch in 0..channels {
            let sc = scale.data[ch] / (var.data[ch] + eps).sqrt();
            let sh = bias.data[ch] - mean.data[ch] * sc;
            mul.extend(std::iter::repeat_n(sc, inner));
            add.extend(std::iter::repeat_n(sh, inner));
        }
        let mut e = Expr::var();
        let x = e.splice(&base, 0);
        let m = e.push_const(mul);
        let xm = e.push(ExprNode::Binary(Binary::Mul, x, m));
        let t = e.push_const(add);
        e.push(ExprNode::Binary(Binary::Add, xm, t));
        sources.push("BatchNormalization".into());
        Ok(Sym::Expr { root, expr: e, sources })
    }

    /// `Mul` of two tensors that depend on the input (a gate), or `Div` by
    /// one (the product with its reciprocal): a `Product` layer whose first
    /// input has the output's shape and whose second broadcasts to it. In
    /// secant mode the second is frozen: the gate, or the denominator.
    fn product(&mut self, divide: bool) -> Result<Sym, OnnxError> {
        let (mut a, mut g) = (self.input_value(0)?, self.input_value(1)?);
        let (sa, sg) = (self.net.shape(a).to_vec(), self.net.shape(g).to_vec());
        if divide {
            let layer =
                Layer::Activation(nnlin_ir::Activation { expr: Expr::unary(Unary::Reciprocal) });
            g = self.net.push(
                format!("{}.reciprocal", node_name(self.node)),
                "Div",
                layer,
                vec![g],
            )?;
        } else if sa != sg && tensor::broadcast_shape(&sa, &sg).as_deref() == Some(sg.as_slice()) {
            // the larger operand first (its shape is the output's)
            std::mem::swap(&mut a, &mut g);
        }
        let (sa, sg) = (self.net.shape(a).to_vec(), self.net.shape(g).to_vec());
        if sa.len() != sg.len()
            || tensor::broadcast_shape(&sa, &sg).as_deref() != Some(sa.as_slice())
        {
            return Err(self.unsupported(format!(
                "a product of shapes {sa:?} and {sg:?} (one must broadcast to the other at equal rank)"
            )));
        }
        let layer = Layer::Product(nnlin_ir::Product {});
        let y = self.net.push(node_name(self.node), self.op().to_string(), layer, vec![a, g])?;
        Ok(Sym::Value(y))
    }

    /// A `Softmax`/`LogSoftmax` inside the graph (attention weights). Before
    /// opset 13 the input is read as 2-D, `[∏ dims[..axis], ∏ dims[axis..]]`.
    fn softmax(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let rank = shape.len();
        let default = if self.opset < 13 { 1 } else { -1 };
        let axis = norm_axis(attr_i(self.node, "axis", default), rank)
            .ok_or_else(|| self.unsupported("bad axis"))?;
        let log = op == "LogSoftmax";
        let name = node_name(self.node);
        let coerced = self.opset < 13 && axis + 1 < rank;
        if !coerced {
            let layer = Layer::Softmax(nnlin_ir::Softmax { axis, log });
            return Ok(Sym::Value(self.net.push(name, op, layer, vec![x])?));
        }
        let slice: usize = shape[axis..].iter().product();
        let flat = vec![shape[..axis].iter().product(), slice];
        let r = Layer::Reshape(nnlin_ir::Reshape { shape: flat });
        let v = self.net.push(format!("{name}.2d"), op.clone(), r, vec![x])?;
        let layer = Layer::Softmax(nnlin_ir::Softmax { axis: 1, log });
        let v = self.net.push(name.clone(), op.clone(), layer, vec![v])?;
        let back = Layer::Reshape(nnlin_ir::Reshape { shape });
        Ok(Sym::Value(self.net.push(format!("{name}.nd"), op, back, vec![v])?))
    }

    /// `v` broadcast to `shape` (numpy rules): a selection.
    fn expand_to(&mut self, v: ValueId, shape: &[usize]) -> Result<ValueId, OnnxError> {
        let small = self.net.shape(v).to_vec();
        let mut padded = vec![1; shape.len().saturating_sub(small.len())];
        padded.extend(&small);
        self.check_shape("the broadcast value", shape)?;
        let src = nnlin_ir::broadcast_index(shape, &padded).into_iter().map(Some).collect();
        let layer = Layer::Select(nnlin_ir::Select { shape: shape.to_vec(), src, fill: vec![] });
        let name = format!("{}.expand{}", node_name(self.node), v.0);
        Ok(self.net.push(name, "Expand", layer, vec![v])?)
    }

    /// `(x − mean) / √(var + ε)` over `axes`, as layers: a mean (`Reduce`),
    /// its broadcast subtracted (`Add`), the mean of squares, `1/√(· + ε)`
    /// (an activation) and their `Product`. Tangent mode is the Jacobian;
    /// secant mode freezes the standard deviation (the product's gate),
    /// while the mean subtraction is linear and stays exact.
    fn normalize(&mut self, x: ValueId, axes: Vec<usize>, eps: f64) -> Result<ValueId, OnnxError> {
        let name = node_name(self.node);
        let op = self.op().to_string();
        let shape = self.net.shape(x).to_vec();
        let reduce =
            |axes: &Vec<usize>| Layer::Reduce(nnlin_ir::Reduce { axes: axes.clone(), mean: true });
        let mean = self.net.push(format!("{name}.mean"), op.clone(), reduce(&axes), vec![x])?;
        let mean = self.expand_to(mean, &shape)?;
        let sub = Layer::Add(nnlin_ir::Add { coeffs: vec![1.0, -1.0] });
        let centred = self.net.push(format!("{name}.centred"), op.clone(), sub, vec![x, mean])?;
        let mut sq = Expr::var();
        sq.push(ExprNode::Binary(Binary::Mul, 0, 0));
        let sq = Layer::Activation(nnlin_ir::Activation { expr: sq });
        let squared = self.net.push(format!("{name}.squared"), op.clone(), sq, vec![centred])?;
        let var =
            self.net.push(format!("{name}.variance"), op.clone(), reduce(&axes), vec![squared])?;
        let mut inv = Expr::var();
        let e = inv.push_const(vec![eps]);
        let ve = inv.push(ExprNode::Binary(Binary::Add, 0, e));
        let sd = inv.push(ExprNode::Unary(Unary::Sqrt, ve));
        inv.push(ExprNode::Unary(Unary::Reciprocal, sd));
        let inv = Layer::Activation(nnlin_ir::Activation { expr: inv });
        let inv_sd = self.net.push(format!("{name}.inv_std"), op.clone(), inv, vec![var])?;
        let product = Layer::Product(nnlin_ir::Product {});
        Ok(self.net.push(name, op, product, vec![centred, inv_sd])?)
    }

    /// `LayerNormalization`, `InstanceNormalization`, `GroupNormalization`:
    /// [`Self::normalize`] over their axes, then the scale and bias (an
    /// `Affine` layer).
    fn normalization(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        if self.node.output.iter().skip(1).any(|o| !o.is_empty()) {
            return Err(
                self.unsupported("the mean and inverse-deviation outputs are not supported")
            );
        }
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let rank = shape.len();
        let eps = attr_f(self.node, "epsilon", 1e-5);
        let scale =
            self.const_input(1)?.ok_or_else(|| self.unsupported("scale must be a constant"))?;
        let bias = self.const_input(2)?;
        let name = node_name(self.node);
        // each parameter element's value for every element of the output
        let (y, per_element): (ValueId, PerElement) = match op.as_str() {
            "LayerNormalization" => {
                let axis = norm_axis(attr_i(self.node, "axis", -1), rank)
                    .ok_or_else(|| self.unsupported("bad axis"))?;
                let y = self.normalize(x, (axis..rank).collect(), eps)?;
                let sh = shape.clone();
                (y, Box::new(move |t: &Tensor| tensor::broadcast_to(t, &sh)))
            }
            _ => {
                let channels = shape.get(1).copied().unwrap_or(0);
                if rank < 3 {
                    return Err(self.unsupported(format!("input {shape:?} has no spatial axes")));
                }
                let groups = if op == "InstanceNormalization" {
                    channels
                } else {
                    usize::try_from(attr_i(self.node, "num_groups", 0)).unwrap_or(0)
                };
                if groups == 0 || channels % groups != 0 {
                    return Err(self.unsupported(format!(
                        "num_groups {groups} must divide the {channels} channels"
                    )));
                }
                let y = if groups == channels {
                    self.normalize(x, (2..rank).collect(), eps)?
                } else {
                    let per_group = shape[1..].iter().product::<usize>() / groups;
                    let grouped =
                        Layer::Reshape(nnlin_ir::Reshape { shape: vec![1, groups, per_group] });
                    let g =
                        self.net.push(format!("{name}.groups"), op.clone(), grouped, vec![x])?;
                    let n = self.normalize(g, vec![2], eps)?;
                    let back = Layer::Reshape(nnlin_ir::Reshape { shape: shape.clone() });
                    self.net.push(format!("{name}.ungroup"), op.clone(), back, vec![n])?
                };
                // per channel, or per group (GroupNormalization at opset 18)
                let spatial: usize = shape[2..].iter().product();
                (
                    y,
                    Box::new(move |t: &Tensor| {
                        let per = match t.numel() {
                            n if n == channels => 1,
                            n if n == groups => channels / groups,
                            _ => return None,
                        };
                        Some(
                            (0..channels)
                                .flat_map(|c| std::iter::repeat_n(t.data[c / per], spatial))
                                .collect(),
                        )
                    }),
                )
            }
        };
        let sc = per_element(&scale)
            .ok_or_else(|| self.unsupported(format!("scale of shape {:?}", scale.dims)))?;
        let sh = match &bias {
            None => vec![0.0; sc.len()],
            Some(b) => per_element(b)
                .ok_or_else(|| self.unsupported(format!("bias of shape {:?}", b.dims)))?,
        };
        let layer = Layer::Affine(nnlin_ir::Affine { scale: sc, shift: sh });
        Ok(Sym::Value(self.net.push(format!("{name}.affine"), op, layer, vec![y])?))
    }

    /// `Add`/`Sub`/`Sum` of different tensors: an `Add` layer.
    fn branch_sum(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        if !matches!(op.as_str(), "Add" | "Sub" | "Sum") {
            return Err(self.unsupported(
                "elementwise op on two different tensors (only Add, Sub and Sum of branches are linear)",
            ));
        }
        let mut inputs = vec![];
        for i in 0..self.node.input.len() {
            if matches!(self.input(i)?, Some(Sym::Const(_))) {
                return Err(self.unsupported("a sum of branches and constants"));
            }
            inputs.push(self.input_value(i)?);
        }
        // broadcasting between branches (x − mean(x)): the smaller ones are
        // expanded by a selection
        let mut shape: Vec<usize> = vec![];
        for v in &inputs {
            shape = tensor::broadcast_shape(&shape, self.net.shape(*v))
                .ok_or_else(|| self.unsupported("branches whose shapes do not broadcast"))?;
        }
        for v in inputs.iter_mut() {
            if self.net.shape(*v) != shape.as_slice() {
                *v = self.expand_to(*v, &shape)?;
            }
        }
        let coeffs =
            (0..inputs.len()).map(|i| if op == "Sub" && i == 1 { -1.0 } else { 1.0 }).collect();
        let y = self.net.push(
            node_name(self.node),
            op,
            Layer::Add(nnlin_ir::Add { coeffs }),
            inputs,
        )?;
        Ok(Sym::Value(y))
    }

    /// Spatial attributes of Conv / pooling: (kernel, strides, dilations,
    /// pads as (top, left, bottom, right)), with 1-D lifted to 2-D.
    fn window(
        &self,
        spatial: &[usize],
        kernel: &[usize],
        ceil: bool,
    ) -> Result<nnlin_ir::Window, OnnxError> {
        let n = self.node;
        let rank = spatial.len();
        if !(1..=2).contains(&rank) || kernel.len() != rank {
            return Err(self.unsupported(format!(
                "only 1-D and 2-D windows are supported (input spatial {spatial:?})"
            )));
        }
        let ints = |name: &str, default: usize| -> Result<Vec<usize>, OnnxError> {
            match attr_ints(n, name) {
                None => Ok(vec![default; rank]),
                Some(v) => self.sizes(name, &v),
            }
        };
        let strides = ints("strides", 1)?;
        let dil = ints("dilations", 1)?;
        if strides.len() != rank || dil.len() != rank {
            return Err(self.unsupported("strides/dilations do not match the kernel rank"));
        }
        if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
            return Err(self.unsupported(format!(
                "strides {strides:?}, dilations {dil:?} and kernel {kernel:?} must be positive"
            )));
        }
        let auto_pad = attr_s(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let pads: Vec<usize> = match auto_pad.as_str() {
            "NOTSET" => match attr_ints(n, "pads") {
                None => vec![0; 2 * rank],
                Some(v) => self.sizes("pads", &v)?,
            },
            "VALID" => vec![0; 2 * rank],
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut p = vec![0; 2 * rank];
                for i in 0..rank {
                    let out = spatial[i].div_ceil(strides[i]);
                    let need = (out.saturating_sub(1))
                        .checked_mul(strides[i])
                        .and_then(|v| v.checked_add((kernel[i] - 1).checked_mul(dil[i])?))
                        .and_then(|v| v.checked_add(1))
                        .ok_or_else(|| self.unsupported("the window overflows"))?
                        .saturating_sub(spatial[i]);
                    let (small, big) = (need / 2, need - need / 2);
                    if auto_pad == "SAME_UPPER" {
                        (p[i], p[i + rank]) = (small, big)
                    } else {
                        (p[i], p[i + rank]) = (big, small)
                    }
                }
                p
            }
            other => return Err(self.unsupported(format!("auto_pad={other}"))),
        };
        if pads.len() != 2 * rank {
            return Err(self.unsupported("pads do not match the kernel rank"));
        }
        let w = if rank == 1 {
            nnlin_ir::Window::new(
                (1, spatial[0]),
                (1, kernel[0]),
                (1, strides[0]),
                (1, dil[0]),
                (0, pads[0], 0, pads[1]),
                ceil,
            )
        } else {
            nnlin_ir::Window::new(
                (spatial[0], spatial[1]),
                (kernel[0], kernel[1]),
                (strides[0], strides[1]),
                (dil[0], dil[1]),
                (pads[0], pads[1], pads[2], pads[3]),
                ceil,
            )
        };
        let w = w.ok_or_else(|| {
            self.unsupported(format!(
                "kernel {kernel:?} (pads {pads:?}) does not fit input {spatial:?}"
            ))
        })?;
        self.check_alloc("the output positions", w.oh.checked_mul(w.ow), 8)?;
        Ok(w)
    }

    fn conv(&mut self) -> Result<Sym, OnnxError> {
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let w =
            self.const_input(1)?.ok_or_else(|| self.unsupported("weight must be a constant"))?;
        if shape.len() < 3 || shape[0] != 1 || w.dims.len() != shape.len() {
            return Err(self.unsupported(format!("input {shape:?} with weight {:?}", w.dims)));
        }
        let group = attr_i(self.node, "group", 1);
        let groups = match usize::try_from(group) {
            Ok(g) if g > 0 => g,
            _ => return Err(self.unsupported(format!("group {group} must be positive"))),
        };
        let kernel = w.dims[2..].to_vec();
        if let Some(k) = attr_ints(self.node, "kernel_shape")
            && k.iter().map(|&v| usize::try_from(v).ok()).collect::<Vec<_>>()
                != kernel.iter().map(|&v| Some(v)).collect::<Vec<_>>()
        {
            return Err(self.unsupported("kernel_shape disagrees with the weight"));
        }
        let window = self.window(&shape[2..], &kernel, false)?;
        let (c_in, c_out) = (shape[1], w.dims[0]);
        if w.dims[1].checked_mul(groups) != Some(c_in) || c_out % groups != 0 {
            return Err(self.unsupported(format!(
                "weight {:?} with {groups} groups on {c_in} channels",
                w.dims
            )));
        }
        // the structured kernel unfolds the input: (C_in/g·kh·kw) × (oh·ow)
        let unfolded = [w.dims[1], window.kh, window.kw, window.oh, window.ow];
        self.check_alloc("the unfolded input", nnlin_ir::checked_numel(&unfolded), 8)?;
        let bias = self.const_input(2)?.map(|b| b.data);
        let one_d = shape.len() == 3;
        let layer = Layer::Conv(nnlin_ir::Conv {
            window,
            c_in,
            c_out,
            groups,
            weight: std::sync::Arc::new(w.data),
            bias,
            one_d,
        });
        Ok(Sym::Value(self.net.push(node_name(self.node), "Conv", layer, vec![x])?))
    }

    /// `ConvTranspose` (1-D and 2-D), as the transpose of the convolution
    /// from its output space to its input space.
    fn conv_transpose(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let w =
            self.const_input(1)?.ok_or_else(|| self.unsupported("weight must be a constant"))?;
        let rank = shape.len().saturating_sub(2);
        if !(1..=2).contains(&rank) || shape[0] != 1 || w.dims.len() != shape.len() {
            return Err(self.unsupported(format!("input {shape:?} with weight {:?}", w.dims)));
        }
        let group = attr_i(n, "group", 1);
        let groups = match usize::try_from(group) {
            Ok(g) if g > 0 => g,
            _ => return Err(self.unsupported(format!("group {group} must be positive"))),
        };
        let c_in = shape[1];
        if w.dims[0] != c_in || !c_in.is_multiple_of(groups) {
            return Err(self.unsupported(format!(
                "weight {:?} with {groups} groups on {c_in} channels",
                w.dims
            )));
        }
        let c_out = w.dims[1]
            .checked_mul(groups)
            .ok_or_else(|| self.unsupported("the channel count overflows"))?;
        let kernel = w.dims[2..].to_vec();
        let list = |name: &str, default: usize| -> Result<Vec<usize>, OnnxError> {
            match attr_ints(n, name) {
                None => Ok(vec![default; rank]),
                Some(v) => self.sizes(name, &v),
            }
        };
        let (strides, dil, out_pad) =
            (list("strides", 1)?, list("dilations", 1)?, list("output_padding", 0)?);
        if strides.len() != rank || dil.len() != rank || out_pad.len() != rank {
            return Err(
                self.unsupported("strides/dilations/output_padding do not match the kernel rank")
            );
        }
        if strides.contains(&0) || dil.contains(&0) || kernel.contains(&0) {
            return Err(self.unsupported(format!(
                "strides {strides:?}, dilations {dil:?} and kernel {kernel:?} must be positive"
            )));
        }
        let spatial = &shape[2..];
        // the full extent s·(in − 1) + output_padding + d·(k − 1) + 1
        let mut full = Vec::with_capacity(rank);
        for i in 0..rank {
            let f = (spatial[i] - 1)
                .checked_mul(strides[i])
                .and_then(|v| v.checked_add(out_pad[i]))
                .and_then(|v| v.checked_add((kernel[i] - 1).checked_mul(dil[i])?))
                .and_then(|v| v.checked_add(1))
                .ok_or_else(|| self.unsupported("the output extent overflows"))?;
            full.push(f);
        }
        let auto_pad = attr_s(n, "auto_pad").unwrap_or_else(|| "NOTSET".into());
        let target: Option<Vec<usize>> = match attr_ints(n, "output_shape") {
            Some(v) => {
                let v = self.sizes("output_shape", &v)?;
                // output_shape may list the spatial axes or all of them
                Some(if v.len() == rank + 2 { v[2..].to_vec() } else { v })
            }
            None if auto_pad.starts_with("SAME") => {
                Some(spatial.iter().zip(&strides).map(|(a, b)| a.saturating_mul(*b)).collect())
            }
            None => None,
        };
        let pads: Vec<usize> = match (&target, auto_pad.as_str()) {
            (Some(t), _) => {
                if t.len() != rank {
                    return Err(self.unsupported("output_shape does not match the kernel rank"));
                }
                let mut p = vec![0; 2 * rank];
                for i in 0..rank {
                    let total = full[i].checked_sub(t[i]).ok_or_else(|| {
                        self.unsupported(format!(
                            "output_shape {t:?} exceeds the full extent {full:?}"
                        ))
                    })?;
                    let (half, rest) = (total / 2, total - total / 2);
                    (p[i], p[i + rank]) =
                        if auto_pad == "SAME_UPPER" { (half, rest) } else { (rest, half) };
                }
                p
            }
            (None, "NOTSET") => match attr_ints(n, "pads") {
                None => vec![0; 2 * rank],
                Some(v) => self.sizes("pads", &v)?,
            },
            (None, "VALID") => vec![0; 2 * rank],
            (None, other) => return Err(self.unsupported(format!("auto_pad={other}"))),
        };
        if pads.len() != 2 * rank {
            return Err(self.unsupported("pads do not match the kernel rank"));
        }
        let mut out = Vec::with_capacity(rank);
        for i in 0..rank {
            let o = full[i].checked_sub(pads[i] + pads[i + rank]).filter(|&o| o > 0);
            out.push(o.ok_or_else(|| self.unsupported(format!("pads {pads:?} leave no output")))?);
        }
        let g2 = |v: &[usize], d: usize| if rank == 1 { (d, v[0]) } else { (v[0], v[1]) };
        let (pt, pl, pb, pr) =
            if rank == 1 { (0, pads[0], 0, pads[1]) } else { (pads[0], pads[1], pads[2], pads[3]) };
        let window = nnlin_ir::Window::new(
            g2(&out, 1),
            g2(&kernel, 1),
            g2(&strides, 1),
            g2(&dil, 1),
            (pt, pl, pb, pr),
            false,
        )
        .filter(|w| (w.oh, w.ow) == g2(spatial, 1))
        .ok_or_else(|| {
            self.unsupported(format!(
                "output_padding {out_pad:?} must be smaller than the stride or the dilation"
            ))
        })?;
        let unfolded = [w.dims[1], window.kh, window.kw, window.oh, window.ow];
        self.check_alloc("the unfolded input", nnlin_ir::checked_numel(&unfolded), 8)?;
        self.check_shape("the output", &[c_out, window.ih, window.iw])?;
        let bias = self.const_input(2)?.map(|b| b.data);
        let conv = nnlin_ir::Conv {
            window,
            c_in: c_out,
            c_out: c_in,
            groups,
            weight: std::sync::Arc::new(w.data),
            bias: None,
            one_d: rank == 1,
        };
        let layer = Layer::ConvTranspose(nnlin_ir::ConvTranspose { conv, bias });
        Ok(Sym::Value(self.net.push(node_name(n), "ConvTranspose", layer, vec![x])?))
    }

    fn pool(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        if self.node.output.len() > 1 && !self.node.output[1].is_empty() {
            return Err(self.unsupported("the Indices output is not supported"));
        }
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        if shape.len() < 3 || shape[0] != 1 {
            return Err(self.unsupported(format!("input {shape:?}")));
        }
        let spatial = &shape[2..];
        let global = op.starts_with("Global");
        let window = if global {
            if spatial.len() == 1 {
                nnlin_ir::Window::new(
                    (1, spatial[0]),
                    (1, spatial[0]),
                    (1, 1),
                    (1, 1),
                    (0, 0, 0, 0),
                    false,
                )
            } else if spatial.len() == 2 {
                nnlin_ir::Window::new(
                    (spatial[0], spatial[1]),
                    (spatial[0], spatial[1]),
                    (1, 1),
                    (1, 1),
                    (0, 0, 0, 0),
                    false,
                )
            } else {
                None
            }
            .ok_or_else(|| self.unsupported("only 1-D and 2-D pooling"))?
        } else {
            let kernel = attr_ints(self.node, "kernel_shape")
                .ok_or_else(|| self.unsupported("missing kernel_shape"))?;
            let kernel = self.sizes("kernel_shape", &kernel)?;
            self.window(spatial, &kernel, attr_i(self.node, "ceil_mode", 0) != 0)?
        };
        let taps = [shape[1], window.oh, window.ow, window.kh, window.kw];
        self.check_alloc("the pooling windows' taps", nnlin_ir::checked_numel(&taps), 8)?;
        let kind = if op.contains("Max") {
            nnlin_ir::PoolKind::Max
        } else {
            nnlin_ir::PoolKind::Average {
                count_include_pad: attr_i(self.node, "count_include_pad", 0) != 0,
            }
        };
        if let nnlin_ir::PoolKind::Max = kind
            && (0..window.oh).any(|oy| (0..window.ow).any(|ox| window.taps_in_input(oy, ox) == 0))
        {
            return Err(self.unsupported("a max-pool window lies entirely in the padding"));
        }
        let layer = Layer::Pool(nnlin_ir::Pool {
            window,
            channels: shape[1],
            kind,
            one_d: shape.len() == 3,
        });
        Ok(Sym::Value(self.net.push(node_name(self.node), op, layer, vec![x])?))
    }

    /// `ReduceMean`/`ReduceSum` over the spatial axes (how the dynamo
    /// exporter writes adaptive average pooling to 1): a global average pool,
    /// scaled for a sum, reshaped when `keepdims = 0`.
    fn reduce(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        let x = self.input_value(0)?;
        let shape = self.net.shape(x).to_vec();
        let rank = shape.len();
        let axes = match attr_ints(self.node, "axes") {
            Some(a) => Some(a),
            None => self.const_input(1)?.map(|t| t.as_ints()),
        };
        let mut axes: Vec<usize> = match axes {
            Some(a) => a
                .iter()
                .map(|&v| norm_axis(v, rank).ok_or_else(|| self.unsupported("bad axis")))
                .collect::<Result<_, _>>()?,
            None => (0..rank).collect(),
        };
        axes.sort_unstable();
        if axes.windows(2).any(|w| w[0] == w[1]) {
            return Err(self.unsupported(format!("duplicate axes {axes:?}")));
        }
        if axes.is_empty() && attr_i(self.node, "noop_with_empty_axes", 0) != 0 {
            return Ok(Sym::Value(x));
        }
        if axes.is_empty() {
            axes = (0..rank).collect();
        }
        let spatial: Vec<usize> = (2..rank).collect();
        if rank < 3 || axes != spatial || rank > 4 {
            // any other axes: a Reduce layer (the spatial case stays a pool)
            let name = node_name(self.node);
            let layer =
                Layer::Reduce(nnlin_ir::Reduce { axes: axes.clone(), mean: op == "ReduceMean" });
            let mut v = self.net.push(name.clone(), op.clone(), layer, vec![x])?;
            if attr_i(self.node, "keepdims", 1) == 0 {
                let kept: Vec<usize> =
                    (0..rank).filter(|a| !axes.contains(a)).map(|a| shape[a]).collect();
                let layer = Layer::Reshape(nnlin_ir::Reshape { shape: kept });
                v = self.net.push(format!("{name}.squeeze"), op, layer, vec![v])?;
            }
            return Ok(Sym::Value(v));
        }
        let window = if rank == 3 {
            nnlin_ir::Window::new((1, shape[2]), (1, shape[2]), (1, 1), (1, 1), (0, 0, 0, 0), false)
        } else {
            nnlin_ir::Window::new(
                (shape[2], shape[3]),
                (shape[2], shape[3]),
                (1, 1),
                (1, 1),
                (0, 0, 0, 0),
                false,
            )
        }
        .ok_or_else(|| self.unsupported("empty spatial axes"))?;
        let name = node_name(self.node);
        let kind = nnlin_ir::PoolKind::Average { count_include_pad: false };
        let layer =
            Layer::Pool(nnlin_ir::Pool { window, channels: shape[1], kind, one_d: rank == 3 });
        let mut v = self.net.push(name.clone(), op.clone(), layer, vec![x])?;
        if op == "ReduceSum" {
            let count: usize = shape[2..].iter().product();
            let n = self.net.numel(v);
            let layer = Layer::Affine(nnlin_ir::Affine {
                scale: vec![count as f64; n],
                shift: vec![0.0; n],
            });
            v = self.net.push(format!("{name}.sum"), op.clone(), layer, vec![v])?;
        }
        if attr_i(self.node, "keepdims", 1) == 0 {
            let layer = Layer::Reshape(nnlin_ir::Reshape { shape: shape[..2].to_vec() });
            v = self.net.push(format!("{name}.squeeze"), op, layer, vec![v])?;
        }
        Ok(Sym::Value(v))
    }

    /// The split sizes along `axis` of a tensor of length `len`, for
    /// `outputs` outputs (the `split` attribute or input, else equal parts).
    fn split_sizes(&self, len: usize, outputs: usize) -> Result<Vec<usize>, OnnxError> {
        let given = if self.opset < 13 {
            attr_ints(self.node, "split")
        } else {
            self.const_input(1)?.map(|t| t.as_ints())
        };
        let sizes = match given {
            Some(v) => self.sizes("split", &v)?,
            None => {
                let parts = match attr(self.node, "num_outputs").and_then(|a| a.i) {
                    Some(k) => usize::try_from(k).ok().filter(|&k| k > 0).ok_or_else(|| {
                        self.unsupported(format!("num_outputs {k} must be positive"))
                    })?,
                    None => outputs.max(1),
                };
                let each = len.div_ceil(parts);
                (0..parts).map(|k| each.min(len.saturating_sub(k * each))).collect()
            }
        };
        if sizes.len() != outputs
            || sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b)) != Some(len)
        {
            return Err(self.unsupported(format!(
                "split {sizes:?} does not cut an axis of {len} into {outputs} outputs"
            )));
        }
        Ok(sizes)
    }

    /// `Split`: every output is a slice along the axis (of a constant, or a
    /// selection of a tensor that depends on the input).
    fn split(&mut self) -> Result<(), OnnxError> {
        let sym = self.input(0)?.cloned().ok_or_else(|| self.unsupported("missing input"))?;
        let dims = self.shape_of(&sym);
        let axis = norm_axis(attr_i(self.node, "axis", 0), dims.len())
            .ok_or_else(|| self.unsupported("bad axis"))?;
        let sizes = self.split_sizes(dims[axis], self.node.output.len())?;
        let (source, index) = match &sym {
            Sym::Const(t) => (None, t.clone()),
            _ => {
                let v = self.input_value(0)?;
                let numel = self.net.numel(v);
                (Some(v), Tensor::new(dims.clone(), (0..numel).map(|k| k as f64).collect(), false))
            }
        };
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let mut start = 0;
        for (k, &len) in sizes.iter().enumerate() {
            let name = self.node.output[k].clone();
            let mut part_dims = dims.clone();
            part_dims[axis] = len;
            let mut data = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                let at = (o * dims[axis] + start) * inner;
                data.extend_from_slice(&index.data[at..at + len * inner]);
            }
            start += len;
            if name.is_empty() {
                continue;
            }
            let part = Tensor::new(part_dims.clone(), data, index.is_int);
            let sym = match source {
                None => Sym::Const(part),
                Some(v) => {
                    let src = part.data.iter().map(|&d| Some(d as usize)).collect();
                    let layer =
                        Layer::Select(nnlin_ir::Select { shape: part_dims, src, fill: vec![] });
                    Sym::Value(self.net.push(name.clone(), "Split", layer, vec![v])?)
                }
            };
            self.syms.insert(name, sym);
        }
        Ok(())
    }

    /// `Slice`, `Gather`, `Expand`, `Tile`, `Where` and `Concat` with
    /// constants, on tensors that depend on the input: a [`Layer::Select`].
    /// The constant folder computes it: it runs on a tensor of element
    /// indices in place of the data (constants as negative codes into a fill
    /// table), so each op's indexing rules are written once.
    fn select(&mut self) -> Result<Sym, OnnxError> {
        let op = self.op().to_string();
        let n_in = self.node.input.len();
        let data_inputs: Vec<usize> = match op.as_str() {
            "Where" => vec![1, 2],
            "Concat" => (0..n_in).collect(),
            _ => vec![0],
        };
        for i in 0..n_in {
            if !data_inputs.contains(&i) && !matches!(self.input(i)?, None | Some(Sym::Const(_))) {
                return Err(self.unsupported(format!("input {i} must be a constant")));
            }
        }
        // the tensors that depend on the input, each once
        let mut values: Vec<ValueId> = vec![];
        for &i in &data_inputs {
            if matches!(self.input(i)?, Some(Sym::Value(_) | Sym::Expr { .. })) {
                let v = self.input_value(i)?;
                if !values.contains(&v) {
                    values.push(v);
                }
            }
        }
        // one source value: several are flattened and concatenated first
        let source = match values.as_slice() {
            [] => return Err(self.unsupported("no input depends on the model input")),
            [v] => *v,
            vs => {
                let mut flat = vec![];
                for (k, v) in vs.iter().enumerate() {
                    let numel = self.net.numel(*v);
                    let layer = Layer::Reshape(nnlin_ir::Reshape { shape: vec![numel] });
                    flat.push(self.net.push(
                        format!("{}.flat{k}", node_name(self.node)),
                        op.clone(),
                        layer,
                        vec![*v],
                    )?);
                }
                let layer = Layer::Concat(nnlin_ir::Concat { axis: 0 });
                self.net.push(
                    format!("{}.sources", node_name(self.node)),
                    op.clone(),
                    layer,
                    flat,
                )?
            }
        };
        let mut offset = std::collections::HashMap::new();
        let mut at = 0usize;
        for v in &values {
            offset.insert(*v, at);
            at += self.net.numel(*v);
        }
        // index tensors in place of the data inputs
        let mut fill: Vec<f64> = vec![];
        let mut saved = vec![];
        for &i in &data_inputs {
            let Some(name) = self.node.input.get(i).filter(|s| !s.is_empty()).cloned() else {
                continue;
            };
            if saved.iter().any(|(n, _)| n == &name) {
                continue;
            }
            let sym = self.syms.get(&name).cloned().expect("checked above");
            // the tensors that depend on the input were materialized above
            let index = match &sym {
                Sym::Const(t) => {
                    let base = fill.len();
                    fill.extend(&t.data);
                    let codes = (0..t.numel()).map(|k| -((base + k) as f64) - 1.0).collect();
                    Tensor::new(t.dims.clone(), codes, false)
                }
                Sym::Value(v) => {
                    let base = offset[v];
                    let numel = self.net.numel(*v);
                    let data = (0..numel).map(|k| (base + k) as f64).collect();
                    Tensor::new(self.net.shape(*v).to_vec(), data, false)
                }
                Sym::Expr { .. } => unreachable!("data inputs are materialized before indexing"),
            };
            saved.push((name.clone(), sym));
            self.syms.insert(name, Sym::Const(index));
        }
        let folded = self.fold();
        for (name, sym) in saved {
            self.syms.insert(name, sym);
        }
        let out = folded?;
        let mut src = Vec::with_capacity(out.numel());
        let mut consts = vec![0.0; if out.data.iter().any(|&d| d < 0.0) { out.numel() } else { 0 }];
        for (i, &d) in out.data.iter().enumerate() {
            if d >= 0.0 {
                src.push(Some(d as usize));
            } else {
                src.push(None);
                consts[i] = fill[(-d - 1.0) as usize];
            }
        }
        let layer = Layer::Select(nnlin_ir::Select { shape: out.dims, src, fill: consts });
        Ok(Sym::Value(self.net.push(node_name(self.node), op, layer, vec![source])?))
    }

    fn concat(&mut self) -> Result<Sym, OnnxError> {
        let mut inputs = vec![];
        for i in 0..self.node.input.len() {
            if matches!(self.input(i)?, Some(Sym::Const(_))) {
                return self.select();
            }
        }
        for i in 0..self.node.input.len() {
            inputs.push(self.input_value(i)?);
        }
        let rank = self.net.shape(inputs[0]).len();
        let axis = norm_axis(attr_i(self.node, "axis", 0), rank)
            .ok_or_else(|| self.unsupported("bad axis"))?;
        let layer = Layer::Concat(nnlin_ir::Concat { axis });
        Ok(Sym::Value(self.net.push(node_name(self.node), "Concat", layer, inputs)?))
    }

    fn pad(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        let x = self.input_value(0)?;
        let rank = self.net.shape(x).len();
        let mode_s = attr_s(n, "mode").unwrap_or_else(|| "constant".into());
        let (pads, value, axes): (Vec<i64>, f64, Option<Vec<i64>>) = if self.opset < 11 {
            (attr_ints(n, "pads").unwrap_or_default(), attr_f(n, "value", 0.0), None)
        } else {
            let pads = self
                .const_input(1)?
                .ok_or_else(|| self.unsupported("pads must be a constant"))?
                .as_ints();
            let value =
                self.const_input(2)?.map_or(0.0, |t| t.data.first().copied().unwrap_or(0.0));
            let axes = self.const_input(3)?.map(|t| t.as_ints());
            (pads, value, axes)
        };
        let axes: Vec<usize> = match axes {
            None => (0..rank).collect(),
            Some(a) => a
                .iter()
                .map(|&v| norm_axis(v, rank).ok_or_else(|| self.unsupported("bad axis")))
                .collect::<Result<_, _>>()?,
        };
        if pads.len() != 2 * axes.len() || pads.iter().any(|&p| p < 0) {
            return Err(
                self.unsupported(format!("pads {pads:?} (negative pads are not supported)"))
            );
        }
        let mut begin = vec![0; rank];
        let mut end = vec![0; rank];
        for (k, &ax) in axes.iter().enumerate() {
            begin[ax] = pads[k] as usize;
            end[ax] = pads[k + axes.len()] as usize;
        }
        let mode = match mode_s.as_str() {
            "constant" => nnlin_ir::PadMode::Constant(value),
            "reflect" => nnlin_ir::PadMode::Reflect,
            "edge" => nnlin_ir::PadMode::Edge,
            other => return Err(self.unsupported(format!("mode={other}"))),
        };
        let layer = Layer::Pad(nnlin_ir::Pad { begin, end, mode });
        Ok(Sym::Value(self.net.push(node_name(n), "Pad", layer, vec![x])?))
    }

    fn transpose(&mut self) -> Result<Sym, OnnxError> {
        let x = self.input_value(0)?;
        let rank = self.net.shape(x).len();
        let perm = self.perm(rank)?;
        let layer = Layer::Transpose(nnlin_ir::Transpose { perm });
        Ok(Sym::Value(self.net.push(node_name(self.node), "Transpose", layer, vec![x])?))
    }

    fn lrn(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        let x = self.input_value(0)?;
        let size = attr_i(n, "size", 0);
        if size <= 0 {
            return Err(self.unsupported("size must be positive"));
        }
        let layer = Layer::Lrn(nnlin_ir::Lrn {
            size: size as usize,
            alpha: attr_f(n, "alpha", 1e-4),
            beta: attr_f(n, "beta", 0.75),
            bias: attr_f(n, "bias", 1.0),
        });
        Ok(Sym::Value(self.net.push(node_name(n), "LRN", layer, vec![x])?))
    }

    fn dense(&mut self) -> Result<Sym, OnnxError> {
        let n = self.node;
        if self.op() == "MatMul" && matches!(self.input(1)?, Some(Sym::Value(_) | Sym::Expr { .. }))
        {
            // both factors depend on the input (attention)
            if matches!(self.input(0)?, Some(Sym::Const(_))) {
                return Err(self.unsupported("a constant times a tensor (MatMul(C, x))"));
            }
            let (a, b) = (self.input_value(0)?, self.input_value(1)?);
            let layer = Layer::MatMul(nnlin_ir::MatMul {});
            return Ok(Sym::Value(self.net.push(node_name(n), "MatMul", layer, vec![a, b])?));
        }
        let x = self.input_value(0)?;
        let xshape = self.net.shape(x).to_vec();
        let b = self.const_input(1)?.ok_or_else(|| self.unsupported("missing weight"))?;
        if b.dims.len() != 2 {
            return Err(
                self.unsupported(format!("weight must be a 2-D constant, got shape {:?}", b.dims))
            );
        }
        let (alpha, beta, trans_a, trans_b) = if self.op() == "Gemm" {
            (
                attr_f(n, "alpha", 1.0),
                attr_f(n, "beta", 1.0),
                attr_i(n, "transA", 0),
                attr_i(n, "transB", 0),
            )
        } else {
            (1.0, 1.0, 0, 0)
        };
        let (k, out) = if trans_b != 0 { (b.dims[1], b.dims[0]) } else { (b.dims[0], b.dims[1]) };
        if trans_a != 0 {
            // A is K×M; with one instance (M = 1) its data is the K-vector.
            if xshape != [k, 1] {
                return Err(self.unsupported(format!("transA with input shape {xshape:?}")));
            }
        }
        if self.op() == "Gemm" && trans_a == 0 && xshape.len() != 2 {
            return Err(self.unsupported(format!("Gemm input must be 2-D, got {xshape:?}")));
        }
        let mut weight = vec![0.0; out * k];
        for o in 0..out {
            for kk in 0..k {
                let w = if trans_b != 0 { b.data[o * k + kk] } else { b.data[kk * out + o] };
                weight[o * k + kk] = alpha * w;
            }
        }
        let bias = match self.const_input(2)? {
            None => None,
            Some(c) => {
                let full = tensor::broadcast_to(&c, &[out])
                    .or_else(|| tensor::broadcast_to(&c, &[1, out]))
                    .ok_or_else(|| self.unsupported(format!("bias of shape {:?}", c.dims)))?;
                Some(full.iter().map(|v| beta * v).collect())
            }
        };
        let mut v = x;
        if trans_a != 0 {
            v = self.net.push(
                format!("{}.transA", node_name(n)),
                "Gemm",
                Layer::Reshape(nnlin_ir::Reshape { shape: vec![1, k] }),
                vec![v],
            )?;
        }
        let layer = Layer::Dense(Dense { out_features: out, in_features: k, weight, bias });
        let source = self.op().to_string();
        let y = self.net.push(node_name(n), source, layer, vec![v])?;
        Ok(Sym::Value(y))
    }
}

fn libm_erf(v: f64) -> f64 {
    <f64 as nnlin_ir::Scalar>::erf(v)
}

/// Decodes and imports an ONNX model with the default [`ImportOptions`].
pub fn import(bytes: &[u8]) -> Result<Imported, OnnxError> {
    import_with(bytes, &ImportOptions::default())
}

/// Decodes and imports an ONNX model; no buffer sized by the file exceeds
/// `options.max_bytes`. Tensors stored as external data are refused: see
/// [`import_with_resolver`].
pub fn import_with(bytes: &[u8], options: &ImportOptions) -> Result<Imported, OnnxError> {
    import_with_resolver(bytes, options, &|r: &ExternalRef| {
        Err(format!(
            "its data lie in the external file `{}`: load the model from its file (or pass a resolver)",
            r.location
        ))
    })
}

/// [`import_with`] for models whose tensors may be stored as external data
/// (`data_location = EXTERNAL`, as PyTorch's default exporter writes them):
/// `resolve` returns the bytes a reference names (it decides where files
/// may be read from and bounds the read by what is there; the importer
/// checks the length against the tensor's shape).
pub fn import_with_resolver(
    bytes: &[u8],
    options: &ImportOptions,
    resolve: &dyn Fn(&ExternalRef) -> Result<Vec<u8>, String>,
) -> Result<Imported, OnnxError> {
    let budget = options.max_bytes;
    // a tensor, its external data read through `resolve`
    let load = |tp: &proto::TensorProto| -> Result<Tensor, String> {
        match tensor::external_ref(tp)? {
            None => tensor::decode(tp),
            Some(r) => {
                let raw = resolve(&r)?;
                let inline = proto::TensorProto {
                    raw_data: Some(raw),
                    data_location: None,
                    external_data: vec![],
                    ..tp.clone()
                };
                tensor::decode(&inline)
            }
        }
    };
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let graph = model.graph.as_ref().ok_or_else(|| OnnxError::Decode("no graph".into()))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| OnnxError::Decode("no default-domain opset_import".into()))?;
    if !(OPSET_RANGE.0..=OPSET_RANGE.1).contains(&opset) {
        return Err(OnnxError::Opset(opset));
    }

    let mut syms: HashMap<String, Sym> = HashMap::new();
    for init in &graph.initializer {
        let name = init.name.clone().unwrap_or_default();
        let t = load(init).map_err(|reason| OnnxError::BadTensor { name: name.clone(), reason })?;
        if syms.insert(name.clone(), Sym::Const(t)).is_some() {
            return Err(OnnxError::Graph(format!("initializer `{name}` is defined twice")));
        }
    }
    // Real inputs: not initializers (older exporters list those as inputs
    // too) and not produced by a node (some zoo models list computed weights).
    let produced: std::collections::HashSet<&str> =
        graph.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| {
            let name = i.name.as_deref().unwrap_or("");
            !syms.contains_key(name) && !produced.contains(name)
        })
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(OnnxError::Graph(format!(
            "the graph must have exactly one non-initializer input, it has {}",
            inputs.len()
        )));
    };
    let input_name = input.name.clone().unwrap_or_default();
    let tt = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| OnnxError::Graph(format!("input `{input_name}` is not a tensor")))?;
    if !matches!(tt.elem_type, Some(1 | 11 | 10)) {
        return Err(OnnxError::Graph(format!(
            "input `{input_name}` has element type {:?}; a float tensor is expected",
            tt.elem_type
        )));
    }
    let mut shape = vec![];
    for (i, d) in tt.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or_default().iter().enumerate()
    {
        use proto::tensor_shape_proto::dimension::Value;
        let rank = tt.shape.as_ref().map_or(0, |s| s.dim.len());
        let v = match &d.value {
            // the batch dimension: one instance at a time, whatever the
            // exporter fixed it to
            _ if i == 0 && rank >= 2 => 1,
            Some(Value::DimValue(v)) if *v > 0 => usize::try_from(*v).unwrap_or(usize::MAX),
            _ if i == 0 => 1,
            // a dynamic dimension (a fully convolutional detector's height
            // and width): fixed from the data the model will run on, given
            // with or without its batch axis
            _ if options
                .input_shape
                .as_ref()
                .is_some_and(|h| h.len() == rank || h.len() + 1 == rank) =>
            {
                let h = options.input_shape.as_ref().expect("checked");
                let d = if h.len() == rank { h[i] } else { h[i - 1] };
                if d == 0 {
                    return Err(OnnxError::Graph(format!(
                        "input `{input_name}`: the given shape {h:?} has a zero dimension"
                    )));
                }
                d
            }
            _ => return Err(OnnxError::DynamicInput { input: input_name, dim: i }),
        };
        shape.push(v);
    }
    if shape.is_empty() {
        return Err(OnnxError::Graph(format!("input `{input_name}` has no shape")));
    }
    match nnlin_ir::checked_numel(&shape).and_then(|n| n.checked_mul(8)) {
        Some(b) if b <= budget => {}
        _ => {
            return Err(OnnxError::Graph(format!(
                "input `{input_name}` of shape {shape:?} is larger than the memory budget of {budget} bytes"
            )));
        }
    }

    let names = || {
        graph
            .output
            .iter()
            .map(|o| format!("`{}`", o.name.as_deref().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let output = match (&options.output, graph.output.as_slice()) {
        (_, []) => return Err(OnnxError::Graph("the graph has no output".into())),
        (Some(want), outs) => {
            outs.iter().find(|o| o.name.as_deref() == Some(want.as_str())).ok_or_else(|| {
                OnnxError::Graph(format!(
                    "the graph has no output `{want}`; its outputs are {}",
                    names()
                ))
            })?
        }
        (None, [one]) => one,
        (None, outs) => {
            return Err(OnnxError::Graph(format!(
                "the graph has {} outputs ({}); choose one (--output NAME)",
                outs.len(),
                names()
            )));
        }
    };
    let mut output_name = output.name.clone().unwrap_or_default();

    syms.insert(input_name.clone(), Sym::Value(ValueId(0)));
    let mut net = Network::new(shape);
    let mut skipped_softmax = None;

    // composite operators are rewritten into primitive nodes (expand.rs),
    // which are imported next, in order
    let mut queue: std::collections::VecDeque<std::borrow::Cow<'_, NodeProto>> =
        graph.node.iter().map(std::borrow::Cow::Borrowed).collect();
    while let Some(node) = queue.pop_front() {
        let node: &NodeProto = &node;
        let op = node.op_type.clone().unwrap_or_default();
        if expand::EXPANDED.contains(&op.as_str())
            && matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx"))
        {
            let shape = |name: &str| -> Option<Vec<usize>> {
                syms.get(name).map(|s| match s {
                    Sym::Const(t) => t.dims.clone(),
                    Sym::Value(v) | Sym::Expr { root: v, .. } => net.shape(*v).to_vec(),
                })
            };
            let constant = |name: &str| match syms.get(name) {
                Some(Sym::Const(t)) => Some(t.clone()),
                _ => None,
            };
            let ctx = expand::Ctx { shape: &shape, constant: &constant, opset, budget };
            let expansion = expand::expand(node, &ctx).map_err(|reason| {
                OnnxError::Unsupported { node: node_name(node), op_type: op.clone(), reason }
            })?;
            if let Some(e) = expansion {
                for (name, t) in e.consts {
                    if syms.insert(name.clone(), Sym::Const(t)).is_some() {
                        return Err(OnnxError::Graph(format!(
                            "node `{}` defines `{name}`, which is already defined",
                            node_name(node)
                        )));
                    }
                }
                for n in e.nodes.into_iter().rev() {
                    queue.push_front(std::borrow::Cow::Owned(n));
                }
                continue;
            }
        }
        if !matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            return Err(OnnxError::UnsupportedOp {
                node: node_name(node),
                op_type: format!("{}::{op}", node.domain.as_deref().unwrap_or("")),
            });
        }
        for out in node.output.iter().filter(|o| !o.is_empty()) {
            if syms.contains_key(out) || node.output.iter().filter(|o| *o == out).count() > 1 {
                return Err(OnnxError::Graph(format!(
                    "node `{}` defines `{out}`, which is already defined",
                    node_name(node)
                )));
            }
        }
        if op != "Constant" && node.input.iter().all(String::is_empty) {
            return Err(OnnxError::Graph(format!(
                "node `{}` ({op}) has no inputs",
                node_name(node)
            )));
        }
        let values_before = net.nodes().len();
        let mut imp = Importer { net, syms, opset, node, budget };
        let result = (|| -> Result<(), OnnxError> {
            if op == "Constant" {
                let a = node
                    .attribute
                    .first()
                    .ok_or_else(|| imp.unsupported("Constant without a value"))?;
                let t = match a.name.as_deref() {
                    Some("value") => {
                        let tp = a.t.as_ref().ok_or_else(|| imp.unsupported("no tensor"))?;
                        let mut t = load(tp).map_err(|reason| OnnxError::BadTensor {
                            name: node_name(node),
                            reason,
                        })?;
                        if tp.data_type == Some(proto::data_type::FLOAT) && t.numel() == 1 {
                            t.data[0] = tensor::literal_f32(t.data[0] as f32);
                        }
                        t
                    }
                    Some("value_float") => {
                        Tensor::new(vec![], vec![tensor::literal_f32(a.f.unwrap_or(0.0))], false)
                    }
                    Some("value_floats") => Tensor::new(
                        vec![a.floats.len()],
                        a.floats.iter().map(|&v| tensor::literal_f32(v)).collect(),
                        false,
                    ),
                    Some("value_int") => Tensor::new(vec![], vec![a.i.unwrap_or(0) as f64], true),
                    Some("value_ints") => Tensor::ints(&a.ints),
                    other => return Err(imp.unsupported(format!("Constant attribute {other:?}"))),
                };
                imp.set_output(Sym::Const(t));
                return Ok(());
            }
            if op == "Shape"
                && let Some(s) = imp.input(0)?.cloned()
            {
                {
                    let dims = imp.shape_of(&s);
                    let start = attr_i(node, "start", 0);
                    let end = attr(node, "end").and_then(|a| a.i).unwrap_or(dims.len() as i64);
                    let r = dims.len() as i64;
                    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                    let d: Vec<i64> = dims[clamp(start)..clamp(end).max(clamp(start))]
                        .iter()
                        .map(|&v| v as i64)
                        .collect();
                    imp.set_output(Sym::Const(Tensor::ints(&d)));
                    return Ok(());
                }
            }
            let all_const = node
                .input
                .iter()
                .filter(|i| !i.is_empty())
                .all(|i| matches!(imp.syms.get(i), Some(Sym::Const(_))));
            if all_const && op == "Split" {
                return imp.split();
            }
            if all_const && !node.input.is_empty() {
                let t = imp.fold()?;
                imp.set_output(Sym::Const(t));
                return Ok(());
            }
            match op.as_str() {
                o if ELEMENTWISE.contains(&o) => {
                    let s = imp.elementwise()?;
                    let long =
                        matches!(&s, Sym::Expr { expr, .. } if expr.nodes.len() > MAX_EXPR_NODES);
                    imp.set_output(s);
                    if long && let Some(out) = node.output.first() {
                        imp.materialize(out)?;
                    }
                }
                "Identity" | "Dropout" => {
                    let s =
                        imp.input(0)?.cloned().ok_or_else(|| imp.unsupported("missing input"))?;
                    imp.set_output(s);
                }
                "Cast" | "CastLike" => {
                    // to a floating type: the identity (nnlin computes in
                    // float64); to an integer type: a step function
                    let to_int = match op.as_str() {
                        "Cast" => !matches!(attr_i(node, "to", 1), 1 | 10 | 11 | 16),
                        _ => matches!(imp.input(1)?, Some(Sym::Const(t)) if t.is_int),
                    };
                    if to_int {
                        return Err(imp.unsupported(
                            "a cast of a tensor that depends on the input to an integer type",
                        ));
                    }
                    let s =
                        imp.input(0)?.cloned().ok_or_else(|| imp.unsupported("missing input"))?;
                    imp.set_output(s);
                }
                "Gemm" | "MatMul" => {
                    let s = imp.dense()?;
                    imp.set_output(s);
                }
                "Conv" => {
                    let s = imp.conv()?;
                    imp.set_output(s);
                }
                "ConvTranspose" => {
                    let s = imp.conv_transpose()?;
                    imp.set_output(s);
                }
                "MaxPool" | "AveragePool" | "GlobalMaxPool" | "GlobalAveragePool" => {
                    let s = imp.pool()?;
                    imp.set_output(s);
                }
                "ReduceMean" | "ReduceSum" => {
                    let s = imp.reduce()?;
                    imp.set_output(s);
                }
                "Concat" => {
                    let s = imp.concat()?;
                    imp.set_output(s);
                }
                "LayerNormalization" | "InstanceNormalization" | "GroupNormalization" => {
                    let s = imp.normalization()?;
                    imp.set_output(s);
                }
                "Slice" | "Gather" | "Expand" | "Tile" | "Where" => {
                    let s = imp.select()?;
                    imp.set_output(s);
                }
                "Split" => imp.split()?,
                "Pad" => {
                    let s = imp.pad()?;
                    imp.set_output(s);
                }
                "Transpose" => {
                    let s = imp.transpose()?;
                    imp.set_output(s);
                }
                "LRN" => {
                    let s = imp.lrn()?;
                    imp.set_output(s);
                }
                "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
                    let v = imp.input_value(0)?;
                    let dims = imp.net.shape(v).to_vec();
                    let target = imp.reshape_target(&dims)?;
                    let y = imp.net.push(
                        node_name(node),
                        op.as_str(),
                        Layer::Reshape(nnlin_ir::Reshape { shape: target }),
                        vec![v],
                    )?;
                    imp.set_output(Sym::Value(y));
                }
                "Softmax" | "LogSoftmax" => {
                    let out = node.output.first().cloned().unwrap_or_default();
                    let consumed = graph.node.iter().any(|m| m.input.contains(&out));
                    if out == output_name && !consumed {
                        skipped_softmax = Some(op.clone());
                        output_name = node.input.first().cloned().unwrap_or_default();
                    } else if trailing_through_shape_ops(graph, &out, &output_name) {
                        // Softmax → Reshape/Flatten/… → output: the shape ops
                        // apply to the logits instead
                        let s = imp
                            .input(0)?
                            .cloned()
                            .ok_or_else(|| imp.unsupported("missing input"))?;
                        imp.set_output(s);
                        skipped_softmax = Some(op.clone());
                    } else {
                        let s = imp.softmax()?;
                        imp.set_output(s);
                    }
                }
                _ => {
                    return Err(OnnxError::UnsupportedOp {
                        node: node_name(node),
                        op_type: op.clone(),
                    });
                }
            }
            // every value this node added must fit the budget (as f64s)
            for k in values_before..imp.net.nodes().len() {
                let v = imp.net.nodes()[k].output;
                imp.check_shape("the value", imp.net.shape(v))?;
            }
            Ok(())
        })();
        net = imp.net;
        syms = imp.syms;
        result?;
    }

    let dummy = NodeProto { op_type: Some("<graph output>".into()), ..Default::default() };
    let mut imp = Importer { net, syms, opset, node: &dummy, budget };
    let out = imp.materialize(&output_name)?;
    let mut net = imp.net;
    net.set_output(out);
    let net = fuse_dense_affine(prune(net)?)?;
    let producer = format!(
        "{} {}",
        model.producer_name.as_deref().unwrap_or(""),
        model.producer_version.as_deref().unwrap_or("")
    )
    .trim()
    .to_string();
    Ok(Imported {
        network: net,
        opset,
        producer,
        input_name,
        output_name: output.name.clone().unwrap_or_default(),
        skipped_softmax,
    })
}

/// Whether `value` reaches the graph output `output` through shape ops
/// alone, each the only reader of the previous value.
fn trailing_through_shape_ops(graph: &proto::GraphProto, value: &str, output: &str) -> bool {
    const SHAPE_OPS: &[&str] =
        &["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"];
    let mut v = value.to_string();
    // each step moves to a later node, so at most one step per node
    for _ in 0..=graph.node.len() {
        if v == output {
            return true;
        }
        let readers: Vec<&NodeProto> = graph.node.iter().filter(|m| m.input.contains(&v)).collect();
        match readers.as_slice() {
            [m] if SHAPE_OPS.contains(&m.op_type.as_deref().unwrap_or(""))
                && m.input.first() == Some(&v)
                && !m.input[1..].contains(&v) =>
            {
                let Some(next) = m.output.first() else { return false };
                v = next.clone();
            }
            _ => return false,
        }
    }
    false
}

/// Rebuilds the network keeping only the nodes the output depends on.
fn prune(net: Network) -> Result<Network, IrError> {
    let mut live = vec![false; net.nodes().len() + 1];
    live[net.output().0] = true;
    for node in net.nodes().iter().rev() {
        if live[node.output.0] {
            for i in &node.inputs {
                live[i.0] = true;
            }
        }
    }
    let (input_shape, output) = (net.input_shape().to_vec(), net.output());
    let mut map: Vec<Option<ValueId>> = vec![None; live.len()];
    map[0] = Some(ValueId(0));
    let mut out = Network::new(input_shape);
    for node in net.into_nodes() {
        if live[node.output.0] {
            let inputs = node.inputs.iter().map(|i| map[i.0].expect("live input")).collect();
            map[node.output.0] = Some(out.push(node.name, node.source, node.layer, inputs)?);
        }
    }
    out.set_output(map[output.0].expect("live output"));
    Ok(out)
}

/// Folds an `Affine` layer into the `Dense` layer that feeds it (ONNX
/// `MatMul` followed by `Add` of the bias, or a scale), when the dense output
/// has no other consumer and covers one row.
fn fuse_dense_affine(net: Network) -> Result<Network, IrError> {
    let uses = net.use_counts();
    let (input_shape, output) = (net.input_shape().to_vec(), net.output());
    let mut nodes: Vec<Option<nnlin_ir::Node>> = net.into_nodes().into_iter().map(Some).collect();
    let mut out = Network::new(input_shape);
    let mut map: Vec<Option<ValueId>> = vec![None; nodes.len() + 1];
    map[0] = Some(ValueId(0));
    for k in 0..nodes.len() {
        let Some(node) = nodes[k].take() else { continue };
        let inputs: Vec<ValueId> =
            node.inputs.iter().map(|i| map[i.0].expect("mapped input")).collect();
        // a Dense whose output is read only by an Affine of matching width
        let consumer = match &node.layer {
            Layer::Dense(d) if uses[node.output.0] == 1 && node.output != output => (k + 1..nodes.len())
                .find(|&j| nodes[j].as_ref().is_some_and(|n| n.inputs.contains(&node.output)))
                .filter(|&j| {
                    nodes[j].as_ref().is_some_and(|n| {
                        n.inputs.len() == 1 && matches!(&n.layer, Layer::Affine(a) if a.scale.len() == d.out_features)
                    })
                }),
            _ => None,
        };
        let (Some(j), Layer::Dense(mut d)) = (consumer, node.layer.clone()) else {
            map[node.output.0] = Some(out.push(node.name, node.source, node.layer, inputs)?);
            continue;
        };
        let next = nodes[j].take().expect("consumer");
        let Layer::Affine(a) = &next.layer else { unreachable!("checked above") };
        let old = d.bias.take().unwrap_or_else(|| vec![0.0; d.out_features]);
        for o in 0..d.out_features {
            for w in &mut d.weight[o * d.in_features..(o + 1) * d.in_features] {
                *w *= a.scale[o];
            }
        }
        d.bias = Some((0..d.out_features).map(|o| a.scale[o] * old[o] + a.shift[o]).collect());
        let source = format!("{}+{}", node.source, next.source);
        let v = out.push(node.name, source, Layer::Dense(d), inputs)?;
        map[node.output.0] = Some(v);
        map[next.output.0] = Some(v);
    }
    out.set_output(map[output.0].expect("mapped output"));
    Ok(out)
}
