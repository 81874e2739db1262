//! Folding a diagonal or selection factor into an explicit (dense or CSR)
//! neighbour: one CSR operator for the pair, one pass over the
//! neighbour's nonzeros ([`Operator::fold`]). The matrix-chain program
//! prices and forms these folds.

use crate::{Operator, Selection};

/// A factor cheap to fold into an explicit neighbour.
enum Cheap<'a> {
    /// `values[i / spatial]` at element `i`.
    Diagonal(&'a [f64], usize),
    Selection(&'a Selection),
}

/// The entries of an explicit (dense or CSR) factor, row-major, nonzeros
/// only; `None` for the other kinds.
fn explicit_entries(op: &Operator) -> Option<Vec<(usize, usize, f64)>> {
    match op {
        Operator::Dense(m) => Some(
            (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| (i, j, m[(i, j)])))
                .filter(|e| e.2 != 0.0)
                .collect(),
        ),
        Operator::Csr(m) => {
            let indptr = m.indptr().raw_storage().to_vec();
            Some(
                (0..m.rows())
                    .flat_map(|i| (indptr[i]..indptr[i + 1]).map(move |p| (i, p)))
                    .map(|(i, p)| (i, m.indices()[p], m.data()[p]))
                    .collect(),
            )
        }
        Operator::Identity(_)
        | Operator::Diagonal(_)
        | Operator::ChannelScale(_)
        | Operator::Selection(_)
        | Operator::Conv(_)
        | Operator::Transposed(_)
        | Operator::Kron(_)
        | Operator::Softmax(_)
        | Operator::MatMul(_) => None,
    }
}

fn is_explicit(op: &Operator) -> bool {
    matches!(op, Operator::Dense(_) | Operator::Csr(_))
}

fn cheap(op: &Operator) -> Option<Cheap<'_>> {
    match op {
        Operator::Diagonal(d) => Some(Cheap::Diagonal(d, 1)),
        Operator::ChannelScale(d) => Some(Cheap::Diagonal(d.values(), d.spatial())),
        Operator::Selection(s) => Some(Cheap::Selection(s)),
        Operator::Identity(_)
        | Operator::Dense(_)
        | Operator::Csr(_)
        | Operator::Conv(_)
        | Operator::Transposed(_)
        | Operator::Kron(_)
        | Operator::Softmax(_)
        | Operator::MatMul(_) => None,
    }
}

impl Operator {
    /// Whether `outer · inner` folds into one explicit operator: a
    /// diagonal, channel scale or selection beside a dense or CSR factor.
    pub fn foldable(outer: &Operator, inner: &Operator) -> bool {
        (is_explicit(outer) && cheap(inner).is_some())
            || (cheap(outer).is_some() && is_explicit(inner))
    }

    /// `outer · inner` as one CSR operator (explicit entries only), or
    /// `None` when the pair is not [`Operator::foldable`].
    pub fn fold(outer: &Operator, inner: &Operator) -> Option<Operator> {
        fold(outer, inner)
    }
}

/// [`Operator::fold`].
fn fold(outer: &Operator, inner: &Operator) -> Option<Operator> {
    let (rows, cols) = (outer.nrows(), inner.ncols());
    let mut tri: Vec<(usize, usize, f64)> = Vec::new();
    if let (Some(c), Some(entries)) = (cheap(outer), explicit_entries(inner)) {
        match c {
            Cheap::Diagonal(d, s) => {
                tri.extend(entries.into_iter().map(|(i, j, v)| (i, j, d[i / s] * v)));
            }
            Cheap::Selection(sel) => {
                // gather rows of the explicit factor
                let mut by_row: Vec<Vec<(usize, f64)>> = vec![vec![]; inner.nrows()];
                for (i, j, v) in entries {
                    by_row[i].push((j, v));
                }
                for (r, &c) in sel.cols().iter().enumerate() {
                    if c != Selection::ZERO {
                        tri.extend(by_row[c].iter().map(|&(j, v)| (r, j, v)));
                    }
                }
            }
        }
    } else if let (Some(entries), Some(c)) = (explicit_entries(outer), cheap(inner)) {
        match c {
            Cheap::Diagonal(d, s) => {
                tri.extend(entries.into_iter().map(|(i, j, v)| (i, j, v * d[j / s])));
            }
            Cheap::Selection(sel) => {
                // (a·S)[:, c] = Σ_{i: S picks c at row i} a[:, i]
                for (i, j, v) in entries {
                    let c = sel.cols()[j];
                    if c != Selection::ZERO {
                        tri.push((i, c, v));
                    }
                }
            }
        }
    } else {
        return None;
    }
    Some(Operator::csr_from_triplets(rows, cols, &tri))
}

#[cfg(test)]
mod tests {
    use faer::{Mat, Par};

    use crate::{Operator, Selection};

    #[test]
    fn folds_equal_the_products() {
        let dense = Operator::Dense(Mat::from_fn(4, 5, |i, j| (i * 5 + j) as f64 - 7.0).into());
        let csr = Operator::csr_from_triplets(
            4,
            5,
            &[(0, 1, 2.0), (2, 4, -1.5), (3, 0, 0.5), (3, 3, 4.0)],
        );
        let diag_out = Operator::Diagonal(vec![1.0, -2.0, 0.0, 3.0]);
        let diag_in = Operator::Diagonal(vec![0.5, 1.0, -1.0, 2.0, 0.0]);
        let sel_out = Operator::Selection(
            Selection::new(4, vec![3, Selection::ZERO, 0, 3]).expect("indices within the input"),
        );
        let sel_in = Operator::Selection(
            Selection::new(6, vec![5, 0, 2, Selection::ZERO, 1]).expect("indices within the input"),
        );
        for a in [&dense, &csr] {
            for (outer, inner) in [(&diag_out, a), (a, &diag_in), (&sel_out, a), (a, &sel_in)] {
                assert!(Operator::foldable(outer, inner));
                let f = Operator::fold(outer, inner).expect("foldable").to_dense();
                let p = outer.right_mul(&inner.to_dense(), Par::Seq);
                assert_eq!((f.nrows(), f.ncols()), (p.nrows(), p.ncols()));
                for i in 0..p.nrows() {
                    for j in 0..p.ncols() {
                        assert!(
                            (f[(i, j)] - p[(i, j)]).abs() < 1e-12,
                            "{} {}",
                            outer.kind(),
                            inner.kind()
                        );
                    }
                }
            }
        }
        assert!(!Operator::foldable(&diag_out, &diag_out));
    }
}
