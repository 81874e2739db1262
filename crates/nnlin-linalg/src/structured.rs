//! Structured operators that hold their factors once instead of one explicit
//! entry per multiply-add: the block diagonal `I ⊗ W` of a fully connected
//! layer applied to every row of a token or channels-last tensor, the
//! block-diagonal Jacobian of a softmax, and a batched matrix product with
//! one factor fixed (attention). Each is applied with GEMMs or one pass
//! over its input; [`crate::Operator::to_dense`] gives the explicit matrix
//! for tests.

use crate::{Block, Real};
use faer::{Accum, Mat, MatMut, MatRef, Par};
use std::sync::Arc;

/// Why a structured operator's parts do not fit together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

pub(crate) fn product(dims: &[usize], what: &str) -> Result<usize, ShapeError> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| ShapeError(format!("{what}: {dims:?} overflows")))
}

/// `I_rows ⊗ W`: the dense `out × in` matrix `W` applied to each of `rows`
/// consecutive input vectors (row-major `[rows, in]` → `[rows, out]`).
#[derive(Clone, Debug)]
pub struct KronOp {
    rows: usize,
    w: crate::Weights,
}

impl KronOp {
    /// `I_rows ⊗ w`.
    ///
    /// # Errors
    /// If `rows · w.nrows()` or `rows · w.ncols()` overflows.
    pub fn new(rows: usize, w: Arc<Mat<f64>>) -> Result<Self, ShapeError> {
        product(&[rows, w.nrows(), w.ncols()], "I ⊗ W")?;
        Ok(Self { rows, w: crate::Weights::new(w) })
    }

    /// The repeated block.
    pub fn weight(&self) -> &Mat<f64> {
        &self.w
    }

    /// Number of diagonal blocks.
    pub fn blocks(&self) -> usize {
        self.rows
    }

    /// Rows of the whole operator.
    pub fn nrows(&self) -> usize {
        self.rows * self.w.nrows()
    }

    /// Columns of the whole operator.
    pub fn ncols(&self) -> usize {
        self.rows * self.w.ncols()
    }

    /// `(I ⊗ W)·T` for `T` of `rows·in × k`: the columns of `T` read as one
    /// `in × rows·k` matrix, one GEMM.
    pub fn forward(&self, t: &[f64], k: usize, par: Par) -> Vec<f64> {
        let (o, i) = (self.w.nrows(), self.w.ncols());
        let cols = self.rows * k;
        let mut out = vec![0.0; o * cols];
        gemm(
            MatMut::from_column_major_slice_mut(&mut out, o, cols),
            self.weight().as_ref(),
            MatRef::from_column_major_slice(t, i, cols),
            par,
        );
        out
    }

    /// `G·(I ⊗ W)` for `G` of `k × rows·out`: `G` regrouped as one
    /// `out × rows·k` matrix (a transpose of each row block), one GEMM with
    /// `Wᵀ`, and the result regrouped back.
    pub fn backward<T: Real>(&self, g: &Block<T>, par: Par) -> Block<T> {
        let k = g.nrows();
        let (o, i) = (self.w.nrows(), self.w.ncols());
        let cols = self.rows * k;
        let gd = g.as_slice();
        // h[(r·k + q)·o + p] = G[q, r·o + p]
        let h: std::borrow::Cow<'_, [T]> = if k == 1 {
            std::borrow::Cow::Borrowed(gd)
        } else {
            let mut h = vec![T::ZERO; o * cols];
            for r in 0..self.rows {
                for p in 0..o {
                    let src = &gd[(r * o + p) * k..(r * o + p + 1) * k];
                    for (q, &v) in src.iter().enumerate() {
                        h[(r * k + q) * o + p] = v;
                    }
                }
            }
            std::borrow::Cow::Owned(h)
        };
        let mut z = vec![T::ZERO; i * cols];
        let w: &Mat<T> = self.w.get::<T>();
        gemm(
            MatMut::from_column_major_slice_mut(&mut z, i, cols),
            w.as_ref().transpose(),
            MatRef::from_column_major_slice(&h, o, cols),
            par,
        );
        if k == 1 {
            return Block::from_col_major(1, self.ncols(), z);
        }
        let mut out = vec![T::ZERO; k * self.ncols()];
        for r in 0..self.rows {
            for q in 0..k {
                let src = &z[(r * k + q) * i..(r * k + q + 1) * i];
                for (j, &v) in src.iter().enumerate() {
                    out[(r * i + j) * k + q] = v;
                }
            }
        }
        Block::from_col_major(k, self.ncols(), out)
    }
}

fn gemm<T: Real>(dst: MatMut<'_, T>, a: MatRef<'_, T>, b: MatRef<'_, T>, par: Par) {
    faer::linalg::matmul::matmul(dst, Accum::Replace, a, b, T::ONE, par);
}

/// The Jacobian of a softmax (or log-softmax) along one axis of a tensor
/// viewed as `[outer, len, inner]`, at probabilities `s`: per slice
/// `diag(s) − s·sᵀ` (softmax) or `I − 1·sᵀ` (log-softmax). Applied in one
/// pass, `O(n)` per vector, never formed.
#[derive(Clone, Debug, PartialEq)]
pub struct SoftmaxJac {
    outer: usize,
    len: usize,
    inner: usize,
    s: Vec<f64>,
    log: bool,
}

impl SoftmaxJac {
    /// The Jacobian at probabilities `s` (row-major `[outer, len, inner]`).
    ///
    /// # Errors
    /// If `s.len() != outer · len · inner`.
    pub fn new(
        outer: usize,
        len: usize,
        inner: usize,
        s: Vec<f64>,
        log: bool,
    ) -> Result<Self, ShapeError> {
        let n = product(&[outer, len, inner], "softmax Jacobian")?;
        if s.len() != n {
            return Err(ShapeError(format!(
                "softmax Jacobian: {} probabilities for [{outer}, {len}, {inner}]",
                s.len()
            )));
        }
        Ok(Self { outer, len, inner, s, log })
    }

    /// Whether this is the log-softmax Jacobian.
    pub fn is_log(&self) -> bool {
        self.log
    }

    /// The probabilities.
    pub fn probabilities(&self) -> &[f64] {
        &self.s
    }

    /// Side length of the (square) operator.
    pub fn size(&self) -> usize {
        self.s.len()
    }

    /// `J·x`.
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        let (len, inner) = (self.len, self.inner);
        for o in 0..self.outer {
            for t in 0..inner {
                let at = |a: usize| (o * len + a) * inner + t;
                let dot: f64 = (0..len).map(|a| self.s[at(a)] * x[at(a)]).sum();
                for a in 0..len {
                    let e = at(a);
                    y[e] = if self.log { x[e] - dot } else { self.s[e] * (x[e] - dot) };
                }
            }
        }
        y
    }

    /// `G·J` for `G` of `k × n` (column-major: each column of `G` a
    /// contiguous run of `k`).
    pub fn backward<T: Real>(&self, g: &Block<T>) -> Block<T> {
        let k = g.nrows();
        let (len, inner) = (self.len, self.inner);
        let gd = g.as_slice();
        let mut out = vec![T::ZERO; gd.len()];
        let mut acc = vec![T::ZERO; k];
        for o in 0..self.outer {
            for t in 0..inner {
                let at = |a: usize| (o * len + a) * inner + t;
                acc.iter_mut().for_each(|v| *v = T::ZERO);
                // softmax: Σ_a G[:, a]·s_a; log-softmax: Σ_a G[:, a]
                for a in 0..len {
                    let e = at(a);
                    let w = if self.log { T::ONE } else { T::of(self.s[e]) };
                    for (v, &gv) in acc.iter_mut().zip(&gd[e * k..(e + 1) * k]) {
                        *v += w * gv;
                    }
                }
                for a in 0..len {
                    let e = at(a);
                    let se = T::of(self.s[e]);
                    let dst = &mut out[e * k..(e + 1) * k];
                    for ((d, &gv), &v) in dst.iter_mut().zip(&gd[e * k..(e + 1) * k]).zip(&acc) {
                        *d = if self.log { gv - se * v } else { se * (gv - v) };
                    }
                }
            }
        }
        Block::from_col_major(k, self.s.len(), out)
    }
}

/// Which factor of a batched product `Y_t = A_t·B_t` is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixedFactor {
    /// `A` is fixed: the operator maps `B` to `A·B`.
    Left,
    /// `B` is fixed: the operator maps `A` to `A·B`.
    Right,
}

/// A batched matrix product with one factor fixed, `Y_t = A_t·B_t` for
/// `t < batch` (`A_t` is `m × k`, `B_t` is `k × n`, all row-major): the
/// linear map from the other factor to `Y`. Holds the fixed factor once.
#[derive(Clone, Debug, PartialEq)]
pub struct MatMulOp {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    fixed: FixedFactor,
    factor: Arc<[f64]>,
}

impl MatMulOp {
    /// The map `X ↦ A·X` (`fixed = Left`, `factor = A`) or `X ↦ X·B`
    /// (`fixed = Right`, `factor = B`).
    ///
    /// # Errors
    /// If the factor's length is not `batch·m·k` (left) or `batch·k·n`
    /// (right), or the sizes overflow.
    pub fn new(
        (batch, m, k, n): (usize, usize, usize, usize),
        fixed: FixedFactor,
        factor: Arc<[f64]>,
    ) -> Result<Self, ShapeError> {
        let want = match fixed {
            FixedFactor::Left => product(&[batch, m, k], "matmul factor")?,
            FixedFactor::Right => product(&[batch, k, n], "matmul factor")?,
        };
        product(&[batch, m, n], "matmul output")?;
        product(&[batch, m.max(n), k], "matmul input")?;
        if factor.len() != want {
            return Err(ShapeError(format!(
                "matmul: a fixed factor of {} values for batch {batch}, {m}×{k}·{k}×{n}",
                factor.len()
            )));
        }
        Ok(Self { batch, m, k, n, fixed, factor })
    }

    /// Rows: `batch·m·n`.
    pub fn nrows(&self) -> usize {
        self.batch * self.m * self.n
    }

    /// Columns: the other factor's length.
    pub fn ncols(&self) -> usize {
        match self.fixed {
            FixedFactor::Left => self.batch * self.k * self.n,
            FixedFactor::Right => self.batch * self.m * self.k,
        }
    }

    /// Multiply-adds of one application.
    pub fn madds(&self) -> usize {
        self.batch * self.m * self.k * self.n
    }

    /// Bytes of the fixed factor.
    pub fn bytes(&self) -> usize {
        self.factor.len() * std::mem::size_of::<f64>()
    }

    /// The operator applied to each of the `c` columns of `t` (column-major
    /// `ncols × c`).
    pub fn forward(&self, t: &[f64], c: usize, par: Par) -> Vec<f64> {
        let (m, k, n) = (self.m, self.k, self.n);
        let (rows, cols) = (self.nrows(), self.ncols());
        let mut out = vec![0.0; rows * c];
        for (col, dst) in out.chunks_exact_mut(rows).enumerate().take(c) {
            let x = &t[col * cols..(col + 1) * cols];
            for b in 0..self.batch {
                let y =
                    MatMut::from_row_major_slice_mut(&mut dst[b * m * n..(b + 1) * m * n], m, n);
                match self.fixed {
                    FixedFactor::Left => gemm(
                        y,
                        MatRef::from_row_major_slice(&self.factor[b * m * k..][..m * k], m, k),
                        MatRef::from_row_major_slice(&x[b * k * n..][..k * n], k, n),
                        par,
                    ),
                    FixedFactor::Right => gemm(
                        y,
                        MatRef::from_row_major_slice(&x[b * m * k..][..m * k], m, k),
                        MatRef::from_row_major_slice(&self.factor[b * k * n..][..k * n], k, n),
                        par,
                    ),
                }
            }
        }
        out
    }

    /// `G·A` for `G` of `w × nrows`.
    pub fn backward<T: Real>(&self, g: &Block<T>, par: Par) -> Block<T> {
        let w = g.nrows();
        let (m, k, n) = (self.m, self.k, self.n);
        let gd = g.as_slice();
        let factor = T::slice(&self.factor);
        let mut out = vec![T::ZERO; w * self.ncols()];
        match self.fixed {
            FixedFactor::Left => {
                // dX_t = A_tᵀ·G_t, with G_t read as m × (n·w): row p holds
                // (q, i) ↦ G[i, (t·m + p)·n + q] contiguously
                for b in 0..self.batch {
                    gemm(
                        MatMut::from_row_major_slice_mut(
                            &mut out[b * k * n * w..][..k * n * w],
                            k,
                            n * w,
                        ),
                        MatRef::from_row_major_slice(&factor[b * m * k..][..m * k], m, k)
                            .transpose(),
                        MatRef::from_row_major_slice(&gd[b * m * n * w..][..m * n * w], m, n * w),
                        par,
                    );
                }
            }
            FixedFactor::Right => {
                // for each row p of A_t: dX[(t,p), r, i] = Σ_q B_t[r, q]·G[(t,p), q, i]
                for b in 0..self.batch {
                    let bt = MatRef::from_row_major_slice(&factor[b * k * n..][..k * n], k, n);
                    for p in 0..m {
                        let tp = b * m + p;
                        gemm(
                            MatMut::from_row_major_slice_mut(&mut out[tp * k * w..][..k * w], k, w),
                            bt,
                            MatRef::from_row_major_slice(&gd[tp * n * w..][..n * w], n, w),
                            par,
                        );
                    }
                }
            }
        }
        Block::from_col_major(w, self.ncols(), out)
    }
}
