//! The op table: every ONNX operator nnlin imports and how. It drives the
//! importer's dispatch, the supported-ops list in [`crate::OnnxError`]'s
//! text, [`supported_ops`] and `fixtures/supported_ops.txt` (which
//! `fixtures/conformance.py` reads; a test keeps the file current), so they
//! cannot drift apart.

/// How the importer lowers a node whose inputs depend on the model input.
/// Nodes whose inputs are all constant are folded instead, whatever their
/// handler (see `fold.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handler {
    /// Fused into the pending elementwise expression of its input.
    /// `named`: a named activation, before which a pending affine map
    /// becomes its own layer.
    Elementwise { named: bool },
    /// The identity on its first input.
    Identity,
    /// A cast: the identity to a floating type, refused to an integer one.
    Cast,
    /// `Gemm`/`MatMul`: a dense layer, or a product of two tensors.
    Dense,
    /// A convolution.
    Conv,
    /// A transposed convolution.
    ConvTranspose,
    /// Max or average pooling, global or windowed.
    Pool,
    /// `ReduceMean`/`ReduceSum`.
    Reduce,
    /// Concatenation.
    Concat,
    /// Layer, instance and group normalization.
    Normalization,
    /// A fixed selection of elements (and constants).
    Select,
    /// `Split` into several outputs.
    Split,
    /// Padding.
    Pad,
    /// An axis permutation.
    Transpose,
    /// Local response normalization.
    Lrn,
    /// A shape change.
    Reshape,
    /// Softmax or log-softmax (trailing ones are skipped).
    Softmax,
    /// Rewritten into primitive nodes first (`expand.rs`).
    Expand,
    /// A `Constant` node.
    Constant,
    /// `Shape`: static, so constant whatever its input.
    Shape,
    /// Only folded: every input must be constant.
    FoldOnly,
}

/// One imported operator.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Op {
    pub name: &'static str,
    pub handler: Handler,
    /// A restriction shown in the supported-ops list.
    pub note: Option<&'static str>,
}

const fn op(name: &'static str, handler: Handler) -> Op {
    Op { name, handler, note: None }
}

const fn noted(name: &'static str, handler: Handler, note: &'static str) -> Op {
    Op { name, handler, note: Some(note) }
}

const ACT: Handler = Handler::Elementwise { named: true };
const ELT: Handler = Handler::Elementwise { named: false };
const FOLD: Handler = Handler::FoldOnly;
const OF_CONSTANTS: &str = "of constants";

/// Every operator nnlin imports, sorted case-insensitively by name.
pub(crate) const OPS: &[Op] = &[
    op("Abs", ELT),
    op("Add", ELT),
    noted("And", FOLD, OF_CONSTANTS),
    op("AveragePool", Handler::Pool),
    op("BatchNormalization", ELT),
    op("Cast", Handler::Cast),
    op("CastLike", Handler::Cast),
    noted("Ceil", FOLD, OF_CONSTANTS),
    op("Celu", ACT),
    op("Clip", ACT),
    op("Concat", Handler::Concat),
    op("Constant", Handler::Constant),
    op("ConstantOfShape", FOLD),
    op("Conv", Handler::Conv),
    op("ConvTranspose", Handler::ConvTranspose),
    op("Div", ELT),
    op("Dropout", Handler::Identity),
    op("Einsum", Handler::Expand),
    op("Elu", ACT),
    noted("Equal", FOLD, OF_CONSTANTS),
    op("Erf", ELT),
    op("Exp", ELT),
    op("Expand", Handler::Select),
    op("Flatten", Handler::Reshape),
    noted("Floor", FOLD, OF_CONSTANTS),
    op("Gather", Handler::Select),
    op("Gelu", ACT),
    op("Gemm", Handler::Dense),
    op("GlobalAveragePool", Handler::Pool),
    op("GlobalMaxPool", Handler::Pool),
    noted("Greater", FOLD, OF_CONSTANTS),
    noted("GreaterOrEqual", FOLD, OF_CONSTANTS),
    op("GroupNormalization", Handler::Normalization),
    op("HardSigmoid", ACT),
    op("HardSwish", ACT),
    op("Identity", Handler::Identity),
    op("InstanceNormalization", Handler::Normalization),
    op("LayerNormalization", Handler::Normalization),
    op("LeakyRelu", ACT),
    noted("Less", FOLD, OF_CONSTANTS),
    noted("LessOrEqual", FOLD, OF_CONSTANTS),
    op("Log", ELT),
    op("LogSoftmax", Handler::Softmax),
    op("LRN", Handler::Lrn),
    op("MatMul", Handler::Dense),
    op("MaxPool", Handler::Pool),
    op("Mish", ACT),
    noted("Mod", FOLD, OF_CONSTANTS),
    op("Mul", ELT),
    op("Neg", ELT),
    noted("Not", FOLD, OF_CONSTANTS),
    noted("Or", FOLD, OF_CONSTANTS),
    op("Pad", Handler::Pad),
    op("Pow", ELT),
    op("PRelu", ACT),
    noted("Range", FOLD, OF_CONSTANTS),
    op("Reciprocal", ELT),
    op("ReduceMax", Handler::Expand),
    op("ReduceMean", Handler::Reduce),
    op("ReduceMin", Handler::Expand),
    op("ReduceSum", Handler::Reduce),
    op("Relu", ACT),
    op("Reshape", Handler::Reshape),
    op("Resize", Handler::Expand),
    noted("ScatterND", FOLD, OF_CONSTANTS),
    op("Selu", ACT),
    op("Shape", Handler::Shape),
    op("Sigmoid", ACT),
    noted("Sign", FOLD, OF_CONSTANTS),
    op("Slice", Handler::Select),
    op("Softmax", Handler::Softmax),
    op("Softplus", ACT),
    op("Softsign", ACT),
    op("Split", Handler::Split),
    op("Sqrt", ELT),
    op("Squeeze", Handler::Reshape),
    op("Sub", ELT),
    op("Sum", ELT),
    op("Tanh", ACT),
    op("Tile", Handler::Select),
    op("Transpose", Handler::Transpose),
    op("Unsqueeze", Handler::Reshape),
    op("Upsample", Handler::Expand),
    noted("Where", Handler::Select, "constant condition"),
    noted("Xor", FOLD, OF_CONSTANTS),
];

/// The handler of an op type, if nnlin imports it.
pub(crate) fn handler(op_type: &str) -> Option<Handler> {
    OPS.iter().find(|o| o.name == op_type).map(|o| o.handler)
}

/// The operators nnlin imports, each with its restriction if any
/// (`"Mod (of constants)"`), sorted by name.
pub fn supported_ops() -> Vec<String> {
    OPS.iter()
        .map(|o| match o.note {
            Some(n) => format!("{} ({n})", o.name),
            None => o.name.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_unique() {
        for w in OPS.windows(2) {
            assert!(
                w[0].name.to_lowercase() < w[1].name.to_lowercase(),
                "{} before {}",
                w[0].name,
                w[1].name
            );
        }
    }

    #[test]
    fn expanded_ops_are_exactly_the_rewritten_ones() {
        let expand: Vec<&str> =
            OPS.iter().filter(|o| o.handler == Handler::Expand).map(|o| o.name).collect();
        assert_eq!(expand, crate::expand::EXPANDED);
    }

    /// `fixtures/supported_ops.txt` (read by `fixtures/conformance.py`) is the
    /// table's list; `NNLIN_BLESS=1` rewrites it.
    #[test]
    fn the_committed_list_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/supported_ops.txt");
        let want: String = OPS.iter().map(|o| format!("{}\n", o.name)).collect();
        if std::env::var_os("NNLIN_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(have, want, "fixtures/supported_ops.txt is stale: rerun with NNLIN_BLESS=1");
    }
}
