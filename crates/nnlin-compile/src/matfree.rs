//! W without forming it: the selected rows of one compiled instance's linear
//! map as a matrix-free operator. `W·v` pushes `v` through the frozen
//! operators (a jvp, no offsets); `Wᵀ·u` runs one reverse pass from the
//! output adjoint `u` (a vjp). Both cost what one pass of the network costs,
//! so W's top singular directions at 224×224 (W is 1000 × 150 528) come
//! from a few dozen passes instead of 1.2 GB of W. Implements faer's
//! [`LinOp`] and [`BiLinOp`], so faer's matrix-free solvers (partial SVD,
//! LSMR, …) run on it.

pub use faer::Par;
use faer::dyn_stack::{MemStack, StackReq};
use faer::matrix_free::{BiLinOp, LinOp};
use faer::{MatMut, MatRef};
use nnlin_linalg::Block;

use crate::ValueId;
use crate::{CompileError, Instance, check_rows, reverse_from};

/// The rows `rows` of one instance's `W`, applied without forming it.
#[derive(Clone, Debug)]
pub struct LinearMap {
    inst: Instance,
    rows: Vec<usize>,
}

impl LinearMap {
    /// The map `v ↦ W[rows]·v` of `inst`.
    ///
    /// # Errors
    /// If a row is not an output.
    pub fn new(inst: Instance, rows: Vec<usize>) -> Result<Self, CompileError> {
        check_rows(&inst, &rows)?;
        Ok(Self { inst, rows })
    }

    /// The compiled instance.
    pub fn instance(&self) -> &Instance {
        &self.inst
    }

    /// The selected output rows.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// Rows of W (the selected outputs).
    pub fn nrows(&self) -> usize {
        self.rows.len()
    }

    /// Columns of W (the input length).
    pub fn ncols(&self) -> usize {
        self.inst.input_len
    }

    /// `W·v`.
    ///
    /// # Panics
    /// If `v.len() != self.ncols()` (a caller contract).
    pub fn matvec(&self, v: &[f64]) -> Vec<f64> {
        assert_eq!(v.len(), self.ncols(), "matvec: dimension mismatch");
        let all = self.inst.propagate(v, false).swap_remove(self.inst.output_value.0);
        let all = all.unwrap_or_else(|| vec![0.0; self.inst.output.len()]);
        self.rows.iter().map(|&r| all[r]).collect()
    }

    /// `Wᵀ·U` for `U` of `nrows × k` given as its transpose `k × nrows`
    /// (each row of `ut` one vector): returns `k × ncols`, each row `Wᵀ·u`.
    pub fn rmatmat(&self, ut: &Block, par: Par) -> Block {
        assert_eq!(ut.ncols(), self.nrows(), "rmatvec: dimension mismatch");
        let k = ut.nrows();
        let mut g0 = Block::zeros(k, self.inst.output.len());
        for (j, &r) in self.rows.iter().enumerate() {
            for i in 0..k {
                g0[(i, r)] += ut[(i, j)];
            }
        }
        reverse_from(&self.inst, g0, ValueId(0), par)
            .0
            .unwrap_or_else(|| Block::zeros(k, self.ncols()))
    }

    /// `Wᵀ·u`.
    ///
    /// # Panics
    /// If `u.len() != self.nrows()` (a caller contract).
    pub fn rmatvec(&self, u: &[f64]) -> Vec<f64> {
        assert_eq!(u.len(), self.nrows(), "rmatvec: dimension mismatch");
        let ut = Block::from_col_major(1, u.len(), u.to_vec());
        self.rmatmat(&ut, Par::Seq).as_slice().to_vec()
    }
}

impl LinOp<f64> for LinearMap {
    fn apply_scratch(&self, _rhs_ncols: usize, _par: Par) -> StackReq {
        StackReq::EMPTY
    }

    fn nrows(&self) -> usize {
        LinearMap::nrows(self)
    }

    fn ncols(&self) -> usize {
        LinearMap::ncols(self)
    }

    fn apply(&self, mut out: MatMut<'_, f64>, rhs: MatRef<'_, f64>, _par: Par, _: &mut MemStack) {
        let mut v = vec![0.0; self.ncols()];
        for j in 0..rhs.ncols() {
            for (i, vi) in v.iter_mut().enumerate() {
                *vi = rhs[(i, j)];
            }
            for (i, y) in self.matvec(&v).into_iter().enumerate() {
                out[(i, j)] = y;
            }
        }
    }

    fn conj_apply(&self, out: MatMut<'_, f64>, rhs: MatRef<'_, f64>, par: Par, s: &mut MemStack) {
        // real: the conjugate is the map itself
        self.apply(out, rhs, par, s);
    }
}

impl BiLinOp<f64> for LinearMap {
    fn transpose_apply_scratch(&self, _rhs_ncols: usize, _par: Par) -> StackReq {
        StackReq::EMPTY
    }

    fn transpose_apply(
        &self,
        mut out: MatMut<'_, f64>,
        rhs: MatRef<'_, f64>,
        par: Par,
        _: &mut MemStack,
    ) {
        let k = rhs.ncols();
        let ut = Block::from_fn(k, self.nrows(), |i, j| rhs[(j, i)]);
        let g = self.rmatmat(&ut, par);
        for j in 0..k {
            for i in 0..self.ncols() {
                out[(i, j)] = g[(j, i)];
            }
        }
    }

    fn adjoint_apply(
        &self,
        out: MatMut<'_, f64>,
        rhs: MatRef<'_, f64>,
        par: Par,
        s: &mut MemStack,
    ) {
        self.transpose_apply(out, rhs, par, s);
    }
}

/// Below this many rows, [`top_singular`] diagonalizes the Gram matrix
/// `W·Wᵀ` (built column by column from one vjp and one jvp each, never
/// holding W) instead of iterating: exact up to rounding and cheaper than a
/// Krylov method whose subspace would be as large as W's rank.
pub const GRAM_ROWS: usize = 128;

/// The `k` largest singular values of `map` and their right singular
/// vectors (`ncols × k`, column j for value j), matrix-free: W is never
/// formed. With at most [`GRAM_ROWS`] rows, from the eigendecomposition of
/// the `m × m` Gram matrix `W·Wᵀ` (2m + 1 passes); otherwise by faer's
/// Krylov–Schur partial SVD. `k` is clamped to W's smaller dimension; the
/// vectors are unit length, their sign fixed so that the largest entry is
/// positive.
pub fn top_singular(map: &LinearMap, k: usize, par: Par) -> (Vec<f64>, faer::Mat<f64>) {
    let (m, n) = (map.nrows(), map.ncols());
    let k = k.min(m).min(n);
    if k == 0 {
        return (vec![], faer::Mat::zeros(n, 0));
    }
    let (vals, mut vecs) = if m <= GRAM_ROWS || m.min(n) <= 2 * k + 2 {
        gram_svd(map, k, par)
    } else {
        krylov_svd(map, k, par)
    };
    for j in 0..vecs.ncols() {
        let big =
            (0..n).map(|i| vecs[(i, j)]).fold(0.0f64, |a, v| if v.abs() > a.abs() { v } else { a });
        if big < 0.0 {
            for i in 0..n {
                vecs[(i, j)] = -vecs[(i, j)];
            }
        }
    }
    (vals, vecs)
}

fn gram_svd(map: &LinearMap, k: usize, par: Par) -> (Vec<f64>, faer::Mat<f64>) {
    let (m, n) = (map.nrows(), map.ncols());
    let mut gram = faer::Mat::<f64>::zeros(m, m);
    let mut e = vec![0.0; m];
    for i in 0..m {
        e.iter_mut().for_each(|v| *v = 0.0);
        e[i] = 1.0;
        // column i of W·Wᵀ: W·(row i of W)
        let col = map.matvec(&map.rmatvec(&e));
        for (r, v) in col.into_iter().enumerate() {
            gram[(r, i)] = v;
        }
    }
    // symmetrize the rounding
    let gram = faer::Mat::from_fn(m, m, |i, j| 0.5 * (gram[(i, j)] + gram[(j, i)]));
    let Ok(evd) = gram.self_adjoint_eigen(faer::Side::Lower) else {
        return (vec![], faer::Mat::zeros(n, 0));
    };
    // eigenvalues ascending: the last k, largest first
    let order: Vec<usize> = (0..m).rev().take(k).collect();
    let vals: Vec<f64> = order.iter().map(|&i| evd.S()[i].max(0.0).sqrt()).collect();
    // v_j = Wᵀ·u_j / σ_j, all k in one reverse pass
    let ut = Block::from_fn(k, m, |j, r| evd.U()[(r, order[j])]);
    let wt = map.rmatmat(&ut, par);
    let vecs =
        faer::Mat::from_fn(n, k, |i, j| if vals[j] > 0.0 { wt[(j, i)] / vals[j] } else { 0.0 });
    (vals, vecs)
}

fn krylov_svd(map: &LinearMap, k: usize, par: Par) -> (Vec<f64>, faer::Mat<f64>) {
    use faer::matrix_free::eigen::{PartialEigenParams, partial_svd, partial_svd_scratch};
    let (m, n) = (map.nrows(), map.ncols());
    let params = PartialEigenParams {
        max_dim: (2 * k + 16).min(m.min(n) - 1),
        max_restarts: 1000,
        ..PartialEigenParams::default()
    };
    let mut u = faer::Mat::<f64>::zeros(m, k);
    let mut v = faer::Mat::<f64>::zeros(n, k);
    let mut s = vec![0.0; k];
    // a fixed, dense start vector: results do not depend on a seed
    let v0 = faer::Col::<f64>::from_fn(n, |i| 1.0 + ((i * 7919) % 1009) as f64 / 1009.0);
    let v0 = &v0 * (1.0 / v0.norm_l2());
    let mut mem = faer::dyn_stack::MemBuffer::new(partial_svd_scratch(map, k, par, params));
    let info = partial_svd(
        u.as_mut(),
        v.as_mut(),
        &mut s,
        map,
        v0.as_ref(),
        1e-12,
        par,
        MemStack::new(&mut mem),
        params,
    );
    let got = info.n_converged_eigen.min(k);
    let mut order: Vec<usize> = (0..got).collect();
    order.sort_by(|&a, &b| s[b].abs().total_cmp(&s[a].abs()));
    let vals = order.iter().map(|&i| s[i].abs()).collect();
    let vecs = faer::Mat::from_fn(n, got, |r, c| v[(r, order[c])]);
    (vals, vecs)
}
