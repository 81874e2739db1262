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
//!   layers directly;
//! - composite nodes (`Einsum`, `Resize`, `ReduceMax`, …) are first rewritten
//!   into primitive nodes (`expand.rs`), which are imported in their place.
//!
//! One op table (`ops.rs`) says which ops are imported and how; the modules
//! split the work by job (see docs/ARCHITECTURE.md's code map).

mod elementwise;
mod error;
mod expand;
mod fold;
mod layers;
mod ops;
mod passes;
pub mod proto;
mod shape;
pub mod tensor;

pub use error::OnnxError;
pub use ops::supported_ops;

use std::collections::HashMap;

use nnlin_ir::{Binary, Dense, Expr, ExprClass, ExprNode, IrError, Layer, Network, Unary, ValueId};
use prost::Message;

use crate::ops::Handler;
use crate::passes::{fuse_dense_affine, trailing_through_shape_ops};
use crate::proto::{AttributeProto, ModelProto, NodeProto};
pub use crate::tensor::ExternalRef;
use crate::tensor::Tensor;

/// Lowest and highest default-domain opset accepted.
pub const OPSET_RANGE: (i64, i64) = (6, 21);

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
    /// Per input of `node`: whether no later node or graph output reads
    /// it, so a constant there may be moved out instead of copied.
    last_use: Vec<bool>,
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
    /// [`Importer::const_input`], moving the tensor out of the symbol table
    /// where this node is its last reader (a weight is then held once, by
    /// the layer, instead of twice until import ends).
    fn take_const_input(&mut self, i: usize) -> Result<Option<Tensor>, OnnxError> {
        if self.last_use.get(i).copied().unwrap_or(false)
            && let Some(Sym::Const(_)) = self.input(i)?
        {
            let name = &self.node.input[i];
            if let Some(Sym::Const(t)) = self.syms.remove(name) {
                return Ok(Some(t));
            }
        }
        self.const_input(i)
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
                        // the value and slope at 0, once per block on which
                        // every constant is constant (per channel for a
                        // batch-norm)
                        if !expr.consts.iter().all(|c| c.fits(numel)) {
                            return Err(self.unsupported(format!(
                                "a constant of `{name}` does not fit its {numel} elements"
                            )));
                        }
                        let (scale, shift, spatial) = expr.affine_coefficients(numel);
                        let layer = Layer::Affine(nnlin_ir::Affine { scale, shift, spatial });
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
    import_buf(bytes, options, resolve)
}

/// [`import_with_resolver`] for a model the caller hands over (a file read
/// into memory): the tensors' raw data are decoded as slices of `bytes`
/// instead of copies of them.
pub fn import_owned_with_resolver(
    bytes: Vec<u8>,
    options: &ImportOptions,
    resolve: &dyn Fn(&ExternalRef) -> Result<Vec<u8>, String>,
) -> Result<Imported, OnnxError> {
    import_buf(prost::bytes::Bytes::from(bytes), options, resolve)
}

fn import_buf(
    bytes: impl prost::bytes::Buf,
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
                    raw_data: Some(raw.into()),
                    data_location: None,
                    external_data: vec![],
                    ..tp.clone()
                };
                tensor::decode(&inline)
            }
        }
    };
    let mut model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let mut graph = model.graph.take().ok_or_else(|| OnnxError::Decode("no graph".into()))?;
    // each initializer's bytes are freed as soon as it is decoded
    let initializers = std::mem::take(&mut graph.initializer);
    let graph = &graph;
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| OnnxError::Decode("no default-domain opset_import".into()))?;
    if !(OPSET_RANGE.0..=OPSET_RANGE.1).contains(&opset) {
        return Err(OnnxError::Opset(opset));
    }

    // Tensors stored in the file decode in parallel (a large model's import
    // is mostly this conversion and the page faults of its f64 buffers);
    // their bytes are slices of the file's one buffer, so decoding them
    // together holds no more memory than one at a time. External data is
    // read and decoded one tensor at a time, below, so only one tensor's
    // raw bytes are held at once.
    let inline: Vec<Option<Result<Tensor, String>>> = {
        use rayon::prelude::*;
        initializers
            .par_iter()
            .map(|init| {
                matches!(tensor::external_ref(init), Ok(None)).then(|| tensor::decode(init))
            })
            .collect()
    };
    let mut syms: HashMap<String, Sym> = HashMap::new();
    for (init, decoded) in initializers.into_iter().zip(inline) {
        let name = init.name.clone().unwrap_or_default();
        let t = match decoded {
            Some(t) => t,
            None => load(&init),
        }
        .map_err(|reason| OnnxError::BadTensor { name: name.clone(), reason })?;
        drop(init);
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
        .and_then(|t| match &t.value {
            Some(proto::type_proto::Value::TensorType(tt)) => Some(tt),
            _ => None,
        })
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
    // reads left of each name by the graph's own nodes and outputs
    let mut reads: HashMap<&str, usize> = HashMap::new();
    for name in graph
        .node
        .iter()
        .flat_map(|n| n.input.iter())
        .chain(graph.output.iter().filter_map(|o| o.name.as_ref()))
    {
        *reads.entry(name.as_str()).or_default() += 1;
    }
    while let Some(node) = queue.pop_front() {
        // per input: whether no later original node or graph output reads
        // it (only the graph's own nodes are counted: a rewrite's nodes
        // never move a constant out)
        let last_use: Vec<bool> = match &node {
            std::borrow::Cow::Borrowed(n) => {
                let last = n
                    .input
                    .iter()
                    .map(|name| {
                        reads.get(name.as_str()) == Some(&1)
                            && n.input.iter().filter(|m| *m == name).count() == 1
                    })
                    .collect();
                for name in &n.input {
                    if let Some(c) = reads.get_mut(name.as_str()) {
                        *c -= 1;
                    }
                }
                last
            }
            std::borrow::Cow::Owned(_) => vec![],
        };
        let node: &NodeProto = &node;
        let op = node.op_type.clone().unwrap_or_default();
        if matches!(ops::handler(&op), Some(Handler::Expand | Handler::Conv | Handler::Pool))
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
        let mut imp = Importer { net, syms, opset, node, budget, last_use };
        let result = (|| -> Result<(), OnnxError> {
            let handler = ops::handler(&op).ok_or_else(|| OnnxError::UnsupportedOp {
                node: node_name(node),
                op_type: op.clone(),
            })?;
            if handler == Handler::Constant {
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
            if handler == Handler::Shape
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
            if all_const && handler == Handler::Split {
                return imp.split();
            }
            if all_const && !node.input.is_empty() {
                let t = imp.fold()?;
                imp.set_output(Sym::Const(t));
                return Ok(());
            }
            match handler {
                Handler::Elementwise { .. } => {
                    let s = imp.elementwise()?;
                    let long =
                        matches!(&s, Sym::Expr { expr, .. } if expr.nodes.len() > MAX_EXPR_NODES);
                    imp.set_output(s);
                    if long && let Some(out) = node.output.first() {
                        imp.materialize(out)?;
                    }
                }
                Handler::Identity => {
                    let s =
                        imp.input(0)?.cloned().ok_or_else(|| imp.unsupported("missing input"))?;
                    imp.set_output(s);
                }
                Handler::Cast => {
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
                Handler::Dense => {
                    let s = imp.dense()?;
                    imp.set_output(s);
                }
                Handler::Conv => {
                    let s = imp.conv()?;
                    imp.set_output(s);
                }
                Handler::ConvTranspose => {
                    let s = imp.conv_transpose()?;
                    imp.set_output(s);
                }
                Handler::Pool => {
                    let s = imp.pool()?;
                    imp.set_output(s);
                }
                Handler::Reduce => {
                    let s = imp.reduce()?;
                    imp.set_output(s);
                }
                Handler::Concat => {
                    let s = imp.concat()?;
                    imp.set_output(s);
                }
                Handler::Normalization => {
                    let s = imp.normalization()?;
                    imp.set_output(s);
                }
                Handler::Select => {
                    let s = imp.select()?;
                    imp.set_output(s);
                }
                Handler::Split => imp.split()?,
                Handler::Pad => {
                    let s = imp.pad()?;
                    imp.set_output(s);
                }
                Handler::Transpose => {
                    let s = imp.transpose()?;
                    imp.set_output(s);
                }
                Handler::Lrn => {
                    let s = imp.lrn()?;
                    imp.set_output(s);
                }
                Handler::Reshape => {
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
                Handler::Softmax => {
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
                // only reached with an input that depends on the model input
                Handler::FoldOnly => {
                    return Err(imp.unsupported(
                        "its inputs must be constant (it is folded, not linearized)",
                    ));
                }
                // handled before folding; rewritten before import
                Handler::Constant | Handler::Shape | Handler::Expand => {
                    return Err(imp.unsupported("this form is not supported"));
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
    let mut imp = Importer { net, syms, opset, node: &dummy, budget, last_use: vec![] };
    let out = imp.materialize(&output_name)?;
    let mut net = imp.net;
    net.set_output(out);
    let net = fuse_dense_affine(net.pruned())?;
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
