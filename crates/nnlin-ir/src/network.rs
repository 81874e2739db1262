//! The network IR: a DAG of nodes over a closed [`Layer`] enum, with shapes
//! inferred and validated as nodes are added.
//!
//! Shapes keep ONNX's batch dimension fixed at 1 (one instance is linearized
//! at a time) and data is row-major, so the flattened index of every value is
//! its ONNX (NCHW) index.

use crate::error::IrError;
use crate::expr::{Expr, ExprClass};

/// Index of a value (a tensor) in a [`Network`]; value 0 is the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

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
/// `Add`/`Sub`/`Mul`/`Div` by constants). Both vectors have the tensor's
/// element count.
#[derive(Clone, Debug, PartialEq)]
pub struct Affine {
    /// Per-element scale.
    pub scale: Vec<f64>,
    /// Per-element shift.
    pub shift: Vec<f64>,
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
}

impl Layer {
    /// A short name of the layer kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Dense(_) => "dense",
            Layer::Affine(_) => "affine",
            Layer::Activation(_) => "activation",
            Layer::Reshape(_) => "reshape",
        }
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        match self {
            Layer::Dense(d) => d.weight.len() + d.bias.as_ref().map_or(0, Vec::len),
            Layer::Affine(a) => a.scale.len() + a.shift.len(),
            Layer::Activation(a) => a.expr.consts.iter().map(Vec::len).sum(),
            Layer::Reshape(_) => 0,
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
            if v.iter().all(|t| t.is_finite()) {
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
                if a.scale.len() != numel || a.shift.len() != numel {
                    return Err(mismatch(format!("{} elements", a.scale.len()), x));
                }
                finite("scale", &a.scale)?;
                finite("shift", &a.shift)?;
                Ok(x.to_vec())
            }
            Layer::Activation(a) => {
                for c in &a.expr.consts {
                    if c.len() != 1 && c.len() != numel {
                        return Err(mismatch(format!("{} elements", c.len()), x));
                    }
                    finite("constant", c)?;
                }
                Ok(x.to_vec())
            }
            Layer::Reshape(r) => {
                if r.shape.iter().product::<usize>() != numel {
                    return Err(mismatch(format!("{} elements for {:?}", numel, r.shape), x));
                }
                Ok(r.shape.clone())
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
        for v in &inputs {
            if v.0 >= self.shapes.len() {
                return Err(IrError::BadInput { layer: name, value: v.0 });
            }
        }
        let in_shapes: Vec<&[usize]> = inputs.iter().map(|v| self.shapes[v.0].as_slice()).collect();
        let shape = layer.output_shape(&name, &in_shapes)?;
        let output = ValueId(self.shapes.len());
        self.shapes.push(shape);
        self.nodes.push(Node { name, source: source.into(), layer, inputs, output });
        self.output = output;
        Ok(output)
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
