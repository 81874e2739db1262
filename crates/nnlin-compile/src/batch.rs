//! Reverse accumulation over a batch of instances of one compiled network,
//! as `vmap` runs a batch: the instances' adjoint rows are stacked into one
//! block (`B·m` rows, instance `b`'s at `b·m .. (b+1)·m`), every operator
//! the instances share (the compiler's input-independent ones: dense,
//! convolution, batch-norm, pooling, reshapes) multiplies the whole stack
//! at once, reading its weights once for the batch, and each instance's
//! own factors (activation slopes, max-pool selections, LRN, products of
//! two branches) act on its own row block. It is the crate's one reverse
//! pass (`reverse_walk`), pushing adjoints back through `Stacked`.
//!
//! A row's adjoint never mixes with another instance's: every product acts
//! row by row, so the batch computes each instance's `W` and `b` with the
//! same operations as [`crate::accumulate_reverse`] does alone. The
//! kernels may still group a row's sums differently when the stack is
//! taller (a GEMM's blocking, or a convolution's kernel chosen by the
//! stack's nonzero columns instead of the instance's), so the results
//! agree within rounding, never in which terms are summed: the tests check
//! every entry within `8·depth·ε·max|W|` (`ε` of the precision, `depth`
//! the node count) of the one-at-a-time results, in `f64` and `f32`, on
//! random CNN-shaped graphs, and on every modern fixture (gates,
//! attention, norms) in both modes. A convolution whose adjoint is sparse
//! for some instance ([`Operator::skips_zero_columns`]) runs instance by
//! instance, so that its sparse kernel still sees that instance's zero
//! columns.

use std::sync::Arc;

use faer::Par;
use nnlin_linalg::{Block, Operator, Real, Selection};

use crate::{
    Adjoint, CompileError, Instance, NodeId, Offset, Pushback, ValueId, check_rows, reverse_walk,
};

/// One instance's `W` (`m × n`) and `b` (`m`).
pub type Formed<T> = (Block<T>, Vec<T>);

/// Rows `b·m .. (b+1)·m` of a stacked block, as their own block.
fn rows_of<T: Real>(g: &Block<T>, b: usize, m: usize) -> Block<T> {
    let bm = g.nrows();
    let mut data = Vec::with_capacity(m * g.ncols());
    if m > 0 {
        for col in g.as_slice().chunks_exact(bm) {
            data.extend_from_slice(&col[b * m..(b + 1) * m]);
        }
    }
    Block::from_col_major(m, g.ncols(), data)
}

/// Writes `src` (`m` rows) over rows `b·m ..` of the stacked `dst`.
fn set_rows<T: Real>(dst: &mut Block<T>, b: usize, src: &Block<T>) {
    let (bm, m) = (dst.nrows(), src.nrows());
    if m == 0 {
        return;
    }
    for (d, s) in dst.as_mut_slice().chunks_exact_mut(bm).zip(src.as_slice().chunks_exact(m)) {
        d[b * m..(b + 1) * m].copy_from_slice(s);
    }
}

/// Whether two instances have the same nodes reading and writing the same
/// values (instances of one compiler always do).
fn same_structure(a: &Instance, b: &Instance) -> bool {
    a.input_len == b.input_len
        && a.output_value == b.output_value
        && a.value_lens == b.value_lens
        && a.output.len() == b.output.len()
        && a.layers.len() == b.layers.len()
        && a.layers.iter().zip(&b.layers).all(|(x, y)| {
            x.output == y.output
                && x.inputs.len() == y.inputs.len()
                && x.inputs.iter().zip(&y.inputs).all(|((u, p), (v, q))| {
                    u == v && p.nrows() == q.nrows() && p.ncols() == q.ncols()
                })
        })
}

/// `W` (`rows[b].len() × n`) and `b` of every instance's selected rows, by
/// one reverse pass over the batch with every product in `T` (see the
/// module documentation; one instance is [`crate::accumulate_reverse`]
/// itself). Every instance must select as many rows, and all must come
/// from one compiler.
///
/// # Errors
/// A row out of range, or instances that differ in row count or structure
/// ([`CompileError::Batch`]).
///
/// # Panics
/// If `insts` and `rows` differ in length.
pub fn accumulate_reverse_batch<T: Real>(
    insts: &[&Instance],
    rows: &[&[usize]],
    par: Par,
) -> Result<Vec<Formed<T>>, CompileError> {
    assert_eq!(insts.len(), rows.len(), "one row list per instance");
    let Some((&first, _)) = insts.split_first() else { return Ok(vec![]) };
    let m = rows[0].len();
    for (inst, r) in insts.iter().zip(rows) {
        check_rows(inst, r)?;
        if r.len() != m {
            return Err(CompileError::Batch { reason: "instances select different row counts" });
        }
        if !same_structure(first, inst) {
            return Err(CompileError::Batch { reason: "instances of different networks" });
        }
    }
    if insts.len() == 1 {
        return Ok(vec![crate::accumulate_reverse(first, rows[0], par)?]);
    }
    crate::prepare_products::<T>(first, par);
    let count = insts.len();
    let bm = count * m;
    let mut g0 = Block::zeros(bm, first.output.len());
    for (b, r) in rows.iter().enumerate() {
        for (i, &row) in r.iter().enumerate() {
            g0[(b * m + i, row)] = T::ONE;
        }
    }
    let stacked = Stacked { insts, m, par };
    let (w, bias) = reverse_walk(first, g0, ValueId(0), &stacked, None);
    let w = w.unwrap_or_else(|| Block::zeros(bm, first.input_len));
    Ok((0..count).map(|b| (rows_of(&w, b, m), bias[b * m..(b + 1) * m].to_vec())).collect())
}

/// The push-back of instances whose adjoint rows are stacked, `m` each.
struct Stacked<'a, 'b> {
    insts: &'a [&'b Instance],
    m: usize,
    par: Par,
}

impl<T: Real> Pushback<T> for Stacked<'_, '_> {
    /// A shared offset once for the stack, else each instance's on its rows.
    fn offset(&self, k: NodeId, g: &Block<T>, b: &mut [T]) {
        let (first, m) = (&self.insts[0].layers[k.0].bias, self.m);
        if self.insts.iter().all(|i| Arc::ptr_eq(&i.layers[k.0].bias, first)) {
            first.add_adjoint_product(g, b);
            return;
        }
        for (i, inst) in self.insts.iter().enumerate() {
            let c = &inst.layers[k.0].bias;
            if !matches!(**c, Offset::Zero(_)) {
                c.add_adjoint_product(&rows_of(g, i, m), &mut b[i * m..(i + 1) * m]);
            }
        }
    }

    /// A shared operator on the whole stack, unless some instance's rows
    /// are sparse enough for it to skip their zero columns
    /// ([`sparse_rows`]); else each instance's own operator on its rows.
    /// Several instances: no fused step.
    fn alone(&self) -> Option<&Instance> {
        None
    }
    fn product(&self, k: NodeId, j: usize, g: Adjoint<'_, T>) -> Block<T> {
        let ops: Vec<&Arc<Operator>> =
            self.insts.iter().map(|i| &i.layers[k.0].inputs[j].1).collect();
        let shared = ops.iter().all(|op| Arc::ptr_eq(op, ops[0]));
        if shared && !sparse_rows(ops[0], g.block(), self.m) {
            return g.left_mul(ops[0], self.par);
        }
        let ops: Vec<&Operator> = ops.into_iter().map(|op| &**op).collect();
        let g = match g {
            Adjoint::Owned(g) => g,
            Adjoint::Shared(g) => g.clone(),
        };
        own_factors(&ops, g, self.m, self.par)
    }
}

/// Whether some instance's rows of `g` are sparse enough that `op` would
/// skip their zero columns ([`Operator::skips_zero_columns`]): the stack's
/// nonzero columns are the union of the instances', so such a product runs
/// instance by instance.
fn sparse_rows<T: Real>(op: &Operator, g: &Block<T>, m: usize) -> bool {
    if !op.skips_zero_columns(0) || m == 0 {
        return false;
    }
    let bm = g.nrows();
    let mut count = vec![0usize; bm / m];
    for col in g.as_slice().chunks_exact(bm) {
        for (c, rows) in count.iter_mut().zip(col.chunks_exact(m)) {
            *c += usize::from(rows.iter().any(|&v| v != T::ZERO));
        }
    }
    count.into_iter().any(|c| op.skips_zero_columns(c))
}

/// Whether [`own_factors`] applies this kind of an instance's own factor
/// on the stack itself (diagonals in place, selections gathered) rather
/// than on a copy of the instance's rows.
pub(crate) fn in_stack(op: &Operator) -> bool {
    match op {
        Operator::Diagonal(_) | Operator::Selection(_) => true,
        Operator::Identity(_)
        | Operator::ChannelScale(_)
        | Operator::Dense(_)
        | Operator::Csr(_)
        | Operator::Conv(_)
        | Operator::Kron(_)
        | Operator::Softmax(_)
        | Operator::MatMul(_)
        | Operator::Transposed(_) => false,
    }
}

/// `ops[b]` applied to row block `b` of the stacked `g` (`m` rows each):
/// diagonals scale their rows in place and selections gather them (the
/// same operations as alone); any other operator multiplies a copy of its
/// rows.
fn own_factors<T: Real>(ops: &[&Operator], mut g: Block<T>, m: usize, par: Par) -> Block<T> {
    let bm = g.nrows();
    if m == 0 {
        return Block::zeros(0, ops[0].ncols());
    }
    let diagonals: Option<Vec<&[f64]>> = ops
        .iter()
        .map(|op| match op {
            Operator::Diagonal(d) => Some(d.as_slice()),
            _ => None,
        })
        .collect();
    if let Some(d) = diagonals {
        for (j, col) in g.as_mut_slice().chunks_exact_mut(bm).enumerate() {
            for (rows, d) in col.chunks_exact_mut(m).zip(&d) {
                let dj = T::of(d[j]);
                for v in rows {
                    *v *= dj;
                }
            }
        }
        return g;
    }
    let selections: Option<Vec<&Selection>> = ops
        .iter()
        .map(|op| match op {
            Operator::Selection(s) => Some(s),
            _ => None,
        })
        .collect();
    if let Some(s) = selections {
        let mut out = Block::zeros(bm, ops[0].ncols());
        for (b, s) in s.iter().enumerate() {
            for (i, &c) in s.cols().iter().enumerate() {
                if c == Selection::ZERO {
                    continue;
                }
                let gi = &g.col_as_slice(i)[b * m..(b + 1) * m];
                let o = &mut out.col_as_slice_mut(c)[b * m..(b + 1) * m];
                for (o, &gv) in o.iter_mut().zip(gi) {
                    *o += gv;
                }
            }
        }
        return out;
    }
    let mut out = Block::zeros(bm, ops[0].ncols());
    for (b, op) in ops.iter().enumerate() {
        set_rows(&mut out, b, &op.left_mul_owned(rows_of(&g, b, m), par));
    }
    out
}
