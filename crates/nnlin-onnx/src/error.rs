//! The importer's error type.

use nnlin_ir::IrError;

use crate::OPSET_RANGE;

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
    #[error("unsupported op: node `{node}` has op type `{op_type}`; supported ops: {}", crate::ops::supported_ops().join(", "))]
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
    /// [`crate::ImportOptions::input_shape`] fixes it.
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

pub(crate) fn need_text(need: Option<usize>) -> String {
    need.map_or_else(|| "more than 2^64 bytes".into(), |b| format!("{b} bytes"))
}
