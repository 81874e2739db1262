//! nnlin's network IR: a DAG of nodes over a closed [`Layer`] enum, fused
//! elementwise [`Expr`]essions, and the plain-loop [`reference`](mod@reference) interpreter
//! generic over `f32`, `f64` and forward-mode [`Dual`] numbers.

pub mod error;
pub mod expr;
pub mod geometry;
pub mod network;
pub mod reference;
pub mod scalar;

pub use error::IrError;
pub use expr::{Binary, Const, Expr, ExprClass, ExprNode, KinkedRuns, Unary};
pub use geometry::Window;
pub use network::{
    Activation, Add, Affine, Concat, Conv, ConvTranspose, Dense, Layer, Lrn, MatMul, Network, Node,
    NodeId, Pad, PadMode, Pool, PoolKind, Product, Reduce, Reshape, Select, Softmax, Transpose,
    ValueId, broadcast_index, checked_numel,
};
pub use scalar::{Dual, Scalar};
