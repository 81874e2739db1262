//! Errors raised while building or validating a network.

/// An invalid network.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum IrError {
    /// A layer's input shape does not fit its parameters.
    #[error("layer `{layer}`: expected input shape {expected}, got {got:?}")]
    ShapeMismatch {
        /// Layer name.
        layer: String,
        /// What was expected, in words.
        expected: String,
        /// The shape it got.
        got: Vec<usize>,
    },
    /// A parameter is NaN or infinite.
    #[error("layer `{layer}`: parameter `{param}` holds a NaN or infinite value")]
    NonFinite {
        /// Layer name.
        layer: String,
        /// Parameter name.
        param: String,
    },
    /// A node refers to a value that does not exist yet.
    #[error("layer `{layer}`: input value {value} is not defined before it")]
    BadInput {
        /// Layer name.
        layer: String,
        /// Referenced value id.
        value: usize,
    },
    /// A shape whose element count (or a size computed from it) overflows.
    #[error("layer `{layer}`: {what} overflows the address space")]
    Overflow {
        /// Layer name.
        layer: String,
        /// What overflowed, in words.
        what: String,
    },
}
