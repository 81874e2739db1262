//! The closed [`Operator`] enum and its products, with the structured
//! payloads it carries whole ([`Selection`], [`ChannelScale`]).

use faer::{Accum, Mat, Par};
use sprs::CsMat;

use crate::{
    Block, ConvOp, KronOp, MatMulOp, PAR_ELEMENTS, Real, ShapeError, SoftmaxJac, Weights,
    nonzero_columns,
};

/// A convolution's reverse product, where the active kernel is not
/// eligible ([`ConvOp::prefers_active`]: fewer than 64 im2col rows, a
/// network's first layers, or few channels a position), scatters only the
/// nonzero columns of the adjoint (`ConvOp::backward_sparse`) when they are
/// fewer than this fraction (numerator, denominator) of its output
/// positions, and runs the im2col GEMM over all of them otherwise; with
/// fewer than [`CONV_GEMM_MIN_CHANNELS`] output channels a group, below
/// [`CONV_SPARSE_BELOW_FEW_CHANNELS`] instead. The GEMM sums a group's
/// output channels per tap, so its rate grows with them, while the
/// scatter's does not. `benches/row_skip.rs`, 10 rows, one thread, scatter
/// against GEMM, f32 (f64): ONet's first convolution (3→32, 3×3) wins at
/// 10 % (361 µs / 584; 0.94 ms / 1.76) and loses at 20 % (732 / 575; 1.66
/// / 1.26), ONet's second (32→64) is even at 20 % (1.83 ms / 1.91); the
/// threshold sits between. LeNet-5's first (1→6, 5×5) wins at 33 % (68 /
/// 82; 129 / 159) and loses at 50 % (85 / 78), its second (6→16) wins at
/// 33 % (80 / 104; 146 / 192) and is even or loses at 50 % (101 / 102; 348
/// / 283).
pub const CONV_SPARSE_BELOW: (usize, usize) = (3, 20);

/// [`CONV_SPARSE_BELOW`] for a convolution with fewer than
/// [`CONV_GEMM_MIN_CHANNELS`] output channels a group (measured there).
pub const CONV_SPARSE_BELOW_FEW_CHANNELS: (usize, usize) = (1, 3);

/// Output channels a group from which a convolution's reverse GEMM runs
/// at a rate that moves the scatter's crossover to [`CONV_SPARSE_BELOW`].
pub const CONV_GEMM_MIN_CHANNELS: usize = 32;

/// Whether [`Operator::left_mul`] of a convolution takes the scatter
/// (`ConvOp::backward_sparse`) for an adjoint with `nonzero` nonzero
/// columns: neither the active kernel nor the GEMM.
pub fn conv_takes_scatter(c: &ConvOp, nonzero: usize) -> bool {
    !c.prefers_active(nonzero) && conv_prefers_sparse(c, nonzero)
}

/// Whether a convolution's reverse product of an adjoint with `nonzero`
/// nonzero columns scatters them rather than running the GEMM.
fn conv_prefers_sparse(c: &ConvOp, nonzero: usize) -> bool {
    let g = c.geometry();
    let (num, den) = if g.c_out / g.groups < CONV_GEMM_MIN_CHANNELS {
        CONV_SPARSE_BELOW_FEW_CHANNELS
    } else {
        CONV_SPARSE_BELOW
    };
    nonzero * den < c.nrows() * num
}

/// A dense layer's reverse product multiplies only the rows of its weight
/// that nonzero adjoint columns select (a gather and a smaller GEMM) when
/// those are fewer than this fraction of its rows. `benches/row_skip.rs`,
/// 10 rows, one thread: LeNet-5's 120 × 400 layer gains at 10 % (16 µs
/// against 39 µs) and 20 % (27 / 35), loses from 33 % on (36 / 30); a
/// 4096 × 4096 layer gains only at 5 % (18.8 ms / 21.7) and loses 2.9× at
/// 33 % (gathering the weight rows costs more than the GEMM saves).
pub const DENSE_SKIP_BELOW: (usize, usize) = (1, 8);

/// The nonzero columns of `g` when there are none or fewer than `fraction`
/// of its columns, else `None`; the columns are tested by
/// [`nonzero_columns`], the test the convolution's kernels use.
fn sparse_columns<T: Real>(g: &Block<T>, (num, den): (usize, usize)) -> Option<Vec<usize>> {
    // count · den < n · num
    let limit = (g.ncols() * num).div_ceil(den);
    let flags = nonzero_columns(g.as_slice(), g.nrows());
    let nz: Vec<usize> = flags.iter().enumerate().filter(|(_, f)| **f).map(|(j, _)| j).collect();
    (nz.is_empty() || nz.len() < limit).then_some(nz)
}

/// A row-selection operator: row `i` of `A` is `e_{cols[i]}ᵀ` (gather), or
/// zero where `cols[i] == Selection::ZERO` (padding, the other blocks of a
/// concatenation). Built by [`Selection::new`], which checks every index.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    ncols: usize,
    cols: Vec<usize>,
}

impl Selection {
    /// The selection of `cols` from an input of `ncols` elements.
    ///
    /// # Errors
    /// If an index is neither below `ncols` nor [`Selection::ZERO`].
    pub fn new(ncols: usize, cols: Vec<usize>) -> Result<Self, ShapeError> {
        match cols.iter().position(|&c| c >= ncols && c != Self::ZERO) {
            Some(r) => {
                Err(ShapeError(format!("selection row {r} reads input {} of {ncols}", cols[r])))
            }
            None => Ok(Self { ncols, cols }),
        }
    }

    /// Number of columns (input length).
    pub fn ncols(&self) -> usize {
        self.ncols
    }

    /// For each output row, the input index it copies (or
    /// [`Selection::ZERO`]).
    pub fn cols(&self) -> &[usize] {
        &self.cols
    }

    /// Marks a zero row.
    pub const ZERO: usize = usize::MAX;

    /// `G·S·D` for a selection `S` and a diagonal `D = diag(d)` after it
    /// (a max-pool after an activation, pushed back), as its nonzero
    /// columns alone: the columns ascending and their values (`G`'s rows,
    /// `g.nrows()` each). The same bits as [`Operator::left_mul`] of `S`
    /// and then of `D`: each column's selected adjoint columns summed in
    /// order from +0, then scaled; a column is nonzero where an entry is
    /// not `±0`. Touches the selected columns only, not the whole product.
    ///
    /// # Panics
    /// If `g` does not have a column per row of `S`, or `d` an entry per
    /// input.
    pub fn pushed_through<T: Real>(&self, g: &Block<T>, d: &[f64]) -> (Vec<usize>, Vec<T>) {
        assert_eq!(g.ncols(), self.cols.len(), "selection: one adjoint column per row");
        assert_eq!(d.len(), self.ncols, "selection: one slope per input");
        if u32::try_from(self.cols.len()).is_err() {
            // (row indices past the kernels' 32-bit slots)
            return self.pushed_rows_any(g, d);
        }
        macro_rules! by_rows {
            ($($n:literal)*) => {
                match g.nrows() {
                    0 => (vec![], vec![]),
                    $($n => crate::simd::dispatch(
                        #[inline(always)]
                        || self.pushed_rows::<T, $n>(g.as_slice(), d),
                    ),)*
                    _ => self.pushed_rows_any(g, d),
                }
            };
        }
        by_rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    /// [`Selection::pushed_through`] for `K` rows (one array per column).
    /// The selected inputs are marked in a bitmap and walked ascending
    /// through its words, so neither pass touches the unselected inputs;
    /// `slot` is read only where the bitmap says it was written. Where no
    /// input is selected twice (pools whose windows do not overlap), a
    /// selected input's sum is its one adjoint column, read in place.
    #[inline(always)]
    fn pushed_rows<T: Real, const K: usize>(&self, g: &[T], d: &[f64]) -> (Vec<usize>, Vec<T>) {
        let (g, _) = g.as_chunks::<K>();
        let mut picked = vec![0u64; self.ncols.div_ceil(64)];
        // the row that selects each input (the first, if several do)
        let mut slot = vec![0u32; self.ncols];
        let mut twice = false;
        for (i, &col) in self.cols.iter().enumerate() {
            if col == Self::ZERO {
                continue;
            }
            let (word, bit) = (col / 64, 1u64 << (col % 64));
            twice |= picked[word] & bit != 0;
            if picked[word] & bit == 0 {
                slot[col] = i as u32;
            }
            picked[word] |= bit;
        }
        // each selected input's sum from +0, in the order first selected
        let sums: Vec<[T; K]> = if twice {
            let mut sums = vec![[T::ZERO; K]; self.cols.len()];
            for (&col, gi) in self.cols.iter().zip(g) {
                if col != Self::ZERO {
                    let s = &mut sums[slot[col] as usize];
                    for (o, &x) in s.iter_mut().zip(gi) {
                        *o += x;
                    }
                }
            }
            sums
        } else {
            vec![]
        };
        let sum = |col: usize| -> [T; K] {
            let i = slot[col] as usize;
            if twice { sums[i] } else { std::array::from_fn(|r| T::ZERO + g[i][r]) }
        };
        // the selected inputs ascending, scaled; kept where nonzero
        let mut cols = Vec::with_capacity(self.cols.len());
        let mut vals = Vec::with_capacity(self.cols.len() * K);
        let mut kept = 0;
        for (word, &bits) in picked.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let col = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let dj = T::of(d[col]);
                let s = sum(col);
                let v: [T; K] = std::array::from_fn(|r| s[r] * dj);
                // pushed, then dropped again where zero: no branch on the
                // activation pattern, which a new instance's predictor
                // cannot know (the truncations never shorten past `kept`)
                cols.push(col);
                vals.extend_from_slice(&v);
                kept += usize::from(v.iter().fold(0, |a, x| a | x.magnitude_bits()) != 0);
                cols.truncate(kept);
                vals.truncate(kept * K);
            }
        }
        (cols, vals)
    }

    /// [`Selection::pushed_through`] for any row count, through the
    /// products themselves.
    fn pushed_rows_any<T: Real>(&self, g: &Block<T>, d: &[f64]) -> (Vec<usize>, Vec<T>) {
        let k = g.nrows();
        let selected = Operator::Selection(self.clone()).left_mul(g, Par::Seq);
        let scaled = Operator::Diagonal(d.to_vec()).left_mul_owned(selected, Par::Seq);
        let flags = crate::nonzero_columns(scaled.as_slice(), k);
        let cols: Vec<usize> = (0..self.ncols).filter(|&j| flags[j]).collect();
        let vals = cols.iter().flat_map(|&j| scaled.col_as_slice(j).iter().copied()).collect();
        (cols, vals)
    }
}

/// `diag(values ⊗ 1_spatial)`: one scale per block of `spatial` consecutive
/// elements (a batch-norm's per-channel scale over its `H·W` positions),
/// stored once per block rather than once per element.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelScale {
    values: Vec<f64>,
    spatial: usize,
}

impl ChannelScale {
    /// `values[c]` on elements `c·spatial .. (c+1)·spatial`.
    ///
    /// # Errors
    /// If `spatial` is 0 or the element count overflows.
    pub fn new(values: Vec<f64>, spatial: usize) -> Result<Self, ShapeError> {
        if spatial == 0 || values.len().checked_mul(spatial).is_none() {
            return Err(ShapeError(format!(
                "{} blocks of {spatial} elements is not a size",
                values.len()
            )));
        }
        Ok(Self { values, spatial })
    }

    /// One scale per block.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Elements per block.
    pub fn spatial(&self) -> usize {
        self.spatial
    }

    /// Elements (rows and columns).
    pub fn len(&self) -> usize {
        self.values.len() * self.spatial
    }

    /// Whether the operator is `0 × 0`.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `(block, scale)` for every element range.
    fn blocks(&self) -> impl Iterator<Item = (std::ops::Range<usize>, f64)> + '_ {
        self.values.iter().enumerate().map(|(c, &v)| (c * self.spatial..(c + 1) * self.spatial, v))
    }
}

/// Which products' one-time data [`Operator::prepare_for`] forms: those of
/// a forward pass, or those of the reverse products (which read the
/// forward's too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The forward products (an instance's compilation).
    Forward,
    /// The reverse products (and the forward's).
    Reverse,
}

/// The closed set of linear operators.
#[derive(Clone, Debug)]
pub enum Operator {
    /// `n × n` identity (reshape, flatten, dropout at inference).
    Identity(usize),
    /// Diagonal `diag(d)` (elementwise affine layers, activation slopes).
    Diagonal(Vec<f64>),
    /// A diagonal with one value per block of elements (batch-norm).
    ChannelScale(ChannelScale),
    /// A dense matrix (fully connected layers).
    Dense(Weights),
    /// A CSR matrix with explicit nonzeros.
    Csr(CsMat<f64>),
    /// A 0/1 gather.
    Selection(Selection),
    /// A convolution's Toeplitz matrix, structured.
    Conv(ConvOp),
    /// `I ⊗ W`: one dense matrix applied to every row of a tensor.
    Kron(KronOp),
    /// The block-diagonal Jacobian of a softmax or log-softmax.
    Softmax(SoftmaxJac),
    /// A batched matrix product with one factor fixed.
    MatMul(MatMulOp),
    /// The transpose of another operator (a transposed convolution is the
    /// transpose of a convolution).
    Transposed(Box<Operator>),
}

/// An affine map `y = A·u + bias`.
#[derive(Clone, Debug)]
pub struct AffineOp {
    /// The linear part.
    pub op: std::sync::Arc<Operator>,
    /// The offset, length `op.nrows()`.
    pub bias: Vec<f64>,
}

impl AffineOp {
    /// `A·u + bias`.
    pub fn apply(&self, u: &[f64]) -> Vec<f64> {
        let mut y = self.op.apply(u);
        for (yi, bi) in y.iter_mut().zip(&self.bias) {
            *yi += bi;
        }
        y
    }
}

/// `m·x` column by column, skipping zero entries of `x` (called under
/// [`crate::simd::dispatch`]: the same unfused operations, wider).
#[inline(always)]
fn dense_forward<T: Real>(m: &Mat<T>, x: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; m.nrows()];
    for (j, &xj) in x.iter().enumerate() {
        if xj != T::ZERO {
            for (yi, &aij) in y.iter_mut().zip(m.col_as_slice(j)) {
                *yi += aij * xj;
            }
        }
    }
    y
}

impl Operator {
    /// Short kind name for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Operator::Identity(_) => "identity",
            Operator::Diagonal(_) | Operator::ChannelScale(_) => "diagonal",
            Operator::Dense(_) => "dense",
            Operator::Csr(_) => "csr",
            Operator::Selection(_) => "selection",
            Operator::Conv(_) => "conv",
            Operator::Kron(_) => "kron",
            Operator::Softmax(_) => "softmax",
            Operator::MatMul(_) => "matmul",
            Operator::Transposed(a) => match **a {
                Operator::Conv(_) => "conv_transpose",
                _ => "transposed",
            },
        }
    }

    /// Rows.
    pub fn nrows(&self) -> usize {
        match self {
            Operator::Identity(n) => *n,
            Operator::Diagonal(d) => d.len(),
            Operator::ChannelScale(d) => d.len(),
            Operator::Dense(m) => m.nrows(),
            Operator::Csr(m) => m.rows(),
            Operator::Selection(s) => s.cols().len(),
            Operator::Conv(c) => c.nrows(),
            Operator::Kron(k) => k.nrows(),
            Operator::Softmax(j) => j.size(),
            Operator::MatMul(p) => p.nrows(),
            Operator::Transposed(a) => a.ncols(),
        }
    }

    /// Columns.
    pub fn ncols(&self) -> usize {
        match self {
            Operator::Identity(n) => *n,
            Operator::Diagonal(d) => d.len(),
            Operator::ChannelScale(d) => d.len(),
            Operator::Dense(m) => m.ncols(),
            Operator::Csr(m) => m.cols(),
            Operator::Selection(s) => s.ncols(),
            Operator::Conv(c) => c.ncols(),
            Operator::Kron(k) => k.ncols(),
            Operator::Softmax(j) => j.size(),
            Operator::MatMul(p) => p.ncols(),
            Operator::Transposed(a) => a.nrows(),
        }
    }

    /// Entries the operator stands for (the explicit nonzeros; `n` for
    /// identity; for the structured operators the multiply-adds of one
    /// application, which is what the cost model prices).
    pub fn nnz(&self) -> usize {
        match self {
            Operator::Identity(n) => *n,
            Operator::Diagonal(d) => d.len(),
            Operator::ChannelScale(d) => d.len(),
            Operator::Dense(m) => m.nrows() * m.ncols(),
            Operator::Csr(m) => m.nnz(),
            Operator::Selection(s) => s.cols().iter().filter(|&&c| c != Selection::ZERO).count(),
            Operator::Conv(c) => c.nnz(),
            Operator::Kron(k) => k.nrows() * k.weight().ncols(),
            Operator::Softmax(j) => 2 * j.size(),
            Operator::MatMul(p) => p.madds(),
            Operator::Transposed(a) => a.nnz(),
        }
    }

    /// Bytes the operator forms on its first products and keeps beside
    /// its storage, counting both precisions: a dense layer's or a
    /// convolution's f32 weights, and for a convolution taking the
    /// Winograd path its transformed kernel in f64 and f32 (16 values per
    /// channel pair and group).
    pub fn formed_bytes(&self) -> usize {
        match self {
            Operator::Dense(m) => m.nrows() * m.ncols() * std::mem::size_of::<f32>(),
            Operator::Conv(c) => c.formed_bytes(),
            // its products run through the f64 forward products
            Operator::Transposed(_)
            | Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_) => 0,
        }
    }

    /// Entries a reverse product through this operator with `k` adjoint
    /// rows holds beyond its input and output adjoints: for a convolution
    /// taking the Winograd path, its bands' transformed blocks (V and M),
    /// for as many bands as the current rayon pool runs at once.
    pub fn reverse_scratch(&self, k: usize) -> usize {
        match self {
            Operator::Conv(c) if c.winograd() => c.reverse_scratch(k),
            Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Dense(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Conv(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_)
            | Operator::Transposed(_) => 0,
        }
    }

    /// Bytes held by the operator's storage.
    pub fn bytes(&self) -> usize {
        let f = std::mem::size_of::<f64>();
        let u = std::mem::size_of::<usize>();
        match self {
            Operator::Identity(_) => 0,
            Operator::Diagonal(d) => d.len() * f,
            Operator::ChannelScale(d) => std::mem::size_of_val(d.values()),
            Operator::Dense(m) => m.nrows() * m.ncols() * f,
            Operator::Csr(m) => m.nnz() * (f + u) + (m.rows() + 1) * u,
            Operator::Selection(s) => std::mem::size_of_val(s.cols()),
            Operator::Conv(c) => std::mem::size_of_val(c.weight()),
            Operator::Kron(k) => k.weight().nrows() * k.weight().ncols() * f,
            Operator::Softmax(j) => j.size() * f,
            Operator::MatMul(p) => p.bytes(),
            Operator::Transposed(a) => a.bytes(),
        }
    }

    /// `A·x`.
    ///
    /// # Panics
    /// If `x.len() != self.ncols()` (a caller contract).
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        self.apply_with(x, Par::Seq)
    }

    /// `A·x`, the structured products (convolution, `I ⊗ W`, batched
    /// matrix products) spread over `par`.
    ///
    /// # Panics
    /// If `x.len() != self.ncols()` (a caller contract).
    pub fn apply_with(&self, x: &[f64], par: Par) -> Vec<f64> {
        assert_eq!(x.len(), self.ncols(), "operator apply: dimension mismatch");
        match self {
            Operator::Identity(_) => x.to_vec(),
            Operator::Diagonal(d) => d.iter().zip(x).map(|(a, b)| a * b).collect(),
            Operator::ChannelScale(d) => {
                let mut y = Vec::with_capacity(x.len());
                for (r, v) in d.blocks() {
                    y.extend(x[r].iter().map(|b| v * b));
                }
                y
            }
            Operator::Dense(m) => dense_forward(m, x),
            Operator::Csr(m) => {
                let (indptr, indices, data) = (m.indptr(), m.indices(), m.data());
                let indptr = indptr.raw_storage();
                (0..m.rows())
                    .map(|i| (indptr[i]..indptr[i + 1]).map(|k| data[k] * x[indices[k]]).sum())
                    .collect()
            }
            Operator::Selection(s) => {
                s.cols().iter().map(|&c| if c == Selection::ZERO { 0.0 } else { x[c] }).collect()
            }
            Operator::Conv(c) => c.forward(x, 1, par),
            Operator::Kron(k) => k.forward(x, 1, par),
            Operator::Softmax(j) => j.apply(x),
            Operator::MatMul(p) => p.forward(x, 1, par),
            Operator::Transposed(a) => {
                a.left_mul(&Block::from_col_major(1, x.len(), x.to_vec()), Par::Seq)
                    .into_col_major()
                    .2
            }
        }
    }

    /// `A·x` for `x` in `T`, in `T`: a dense layer's or a convolution's
    /// product reads its weights rounded to `T` once per model (as the
    /// reverse products read them) and sums in `T`; every other operator
    /// computes in `f64` from the widened `x` and its result is rounded to
    /// `T`. In `f64` this is [`Operator::apply_with`], the same bits. The
    /// forward pass of an instance compiled for `--precision f32` runs
    /// through it.
    ///
    /// # Panics
    /// If `x.len() != self.ncols()` (a caller contract).
    pub fn apply_t<T: Real>(&self, x: &[T], par: Par) -> Vec<T> {
        assert_eq!(x.len(), self.ncols(), "operator apply: dimension mismatch");
        match self {
            Operator::Dense(m) => {
                let m = T::matrix(m);
                crate::simd::dispatch(
                    #[inline(always)]
                    || dense_forward(m, x),
                )
            }
            Operator::Conv(c) => c.forward(x, 1, par),
            Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_)
            | Operator::Transposed(_) => T::narrow(self.apply_with(&T::widen_slice(x), par)),
        }
    }

    /// Forms what this operator's products in `T` read and keep (a dense
    /// layer's or a convolution's weights rounded to `f32`), which the
    /// first product would otherwise form. Nothing for `f64` or for
    /// operators that keep nothing.
    pub fn prepare<T: Real>(&self) {
        self.prepare_for::<T>(Stage::Reverse);
    }

    /// [`Operator::prepare`] of what the products of `stage` read:
    /// [`Stage::Forward`] leaves out what only the reverse products read
    /// (a convolution's Winograd kernel), so that a forward pass can start
    /// while that is formed beside it.
    pub fn prepare_for<T: Real>(&self, stage: Stage) {
        match self {
            Operator::Dense(w) => {
                T::matrix(w);
            }
            Operator::Conv(c) => c.prepare::<T>(stage),
            Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Transposed(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_) => {}
        }
    }

    /// `G·A` for a dense `G` of `k × nrows` that the caller gives up;
    /// returns `k × ncols`. Identity and diagonal factors work in `g`'s own
    /// buffer (no allocation; the same bits as [`Operator::left_mul`]).
    ///
    /// # Panics
    /// If `g.ncols() != self.nrows()`.
    pub fn left_mul_owned<T: Real>(&self, mut g: Block<T>, par: Par) -> Block<T> {
        assert_eq!(g.ncols(), self.nrows(), "left_mul: dimension mismatch");
        match self {
            Operator::Identity(_) => g,
            // the same products as `left_mul`, in `g`'s own buffer
            // Each column is contiguous, so one row is one elementwise
            // product (vectorized), and a channel's columns are one run.
            // Across threads for a large block when `par` has them: the
            // same products, so the same bits.
            Operator::Diagonal(d) => {
                let k = g.nrows();
                if k == 0 {
                    return g;
                }
                let scale = |data: &mut [T], d: &[f64]| {
                    if k == 1 {
                        for (v, &dj) in data.iter_mut().zip(d) {
                            *v *= T::of(dj);
                        }
                    } else {
                        for (col, &dj) in data.chunks_exact_mut(k).zip(d) {
                            let dj = T::of(dj);
                            for v in col {
                                *v *= dj;
                            }
                        }
                    }
                };
                let cols = PAR_ELEMENTS.div_ceil(k);
                if par.degree() > 1 && d.len() > 2 * cols {
                    use rayon::prelude::*;
                    g.as_mut_slice()
                        .par_chunks_mut(cols * k)
                        .zip(d.par_chunks(cols))
                        .for_each(|(data, d)| scale(data, d));
                } else {
                    scale(g.as_mut_slice(), d);
                }
                g
            }
            Operator::ChannelScale(d) => {
                let k = g.nrows();
                let run = d.spatial() * k;
                let scale = |data: &mut [T], v: f64| {
                    let v = T::of(v);
                    for x in data {
                        *x *= v;
                    }
                };
                if par.degree() > 1 && run > 0 && d.len() * k > 2 * PAR_ELEMENTS {
                    use rayon::prelude::*;
                    g.as_mut_slice()
                        .par_chunks_mut(run)
                        .with_min_len(PAR_ELEMENTS.div_ceil(run))
                        .zip(d.values().par_iter())
                        .for_each(|(data, &v)| scale(data, v));
                } else {
                    for (r, v) in d.blocks() {
                        scale(&mut g.as_mut_slice()[r.start * k..r.end * k], v);
                    }
                }
                g
            }
            Operator::Dense(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Conv(_)
            | Operator::Transposed(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_) => self.left_mul(&g, par),
        }
    }

    /// Whether [`Operator::left_mul`] of an adjoint with `nonzero` nonzero
    /// columns takes a kernel that skips the zero ones (a convolution's
    /// active or sparse kernel): stacking adjoints with different zero
    /// columns would then cost more than their products one by one.
    pub fn skips_zero_columns(&self, nonzero: usize) -> bool {
        match self {
            Operator::Conv(c) => c.prefers_active(nonzero) || conv_prefers_sparse(c, nonzero),
            Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Dense(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_)
            | Operator::Transposed(_) => false,
        }
    }

    /// `G·A` for a dense `G` of `k × nrows`; returns `k × ncols`.
    ///
    /// # Panics
    /// If `g.ncols() != self.nrows()`.
    pub fn left_mul<T: Real>(&self, g: &Block<T>, par: Par) -> Block<T> {
        assert_eq!(g.ncols(), self.nrows(), "left_mul: dimension mismatch");
        let k = g.nrows();
        match self {
            Operator::Identity(_) => g.clone(),
            Operator::Diagonal(_) | Operator::ChannelScale(_) => {
                self.left_mul_owned(g.clone(), par)
            }
            // skip the rows of A that zero columns of G would multiply
            Operator::Dense(a) if a.prefers_tiled::<T>() => a.left_mul_tiled(g),
            Operator::Dense(a) => match sparse_columns(g, DENSE_SKIP_BELOW) {
                Some(nz) => a.left_mul_rows(g, &nz, par),
                None => a.left_mul(g, par),
            },
            Operator::Csr(a) => {
                // (G·A)[:, j] += A[i, j] · G[:, i] for every stored (i, j).
                let mut out = Block::zeros(k, a.cols());
                let (indptr, indices, data) = (a.indptr(), a.indices(), a.data());
                let indptr = indptr.raw_storage();
                for i in 0..a.rows() {
                    let gi = g.col_as_slice(i);
                    for p in indptr[i]..indptr[i + 1] {
                        let (j, aij) = (indices[p], T::of(data[p]));
                        for (o, &gv) in out.col_as_slice_mut(j).iter_mut().zip(gi) {
                            *o += aij * gv;
                        }
                    }
                }
                out
            }
            Operator::Selection(s) => {
                let mut out = Block::zeros(k, s.ncols);
                for (i, &c) in s.cols().iter().enumerate() {
                    if c == Selection::ZERO {
                        continue;
                    }
                    let gi = g.col_as_slice(i);
                    for (o, &gv) in out.col_as_slice_mut(c).iter_mut().zip(gi) {
                        *o += gv;
                    }
                }
                out
            }
            Operator::Conv(c) => {
                // Columns of G zeroed by a following 0/1 factor (inactive
                // units, max-pool positions not selected) cost nothing: when
                // many are zero, sum only the nonzero ones (the active
                // kernel), or scatter them where it is not eligible.
                if k == 0 {
                    return Block::zeros(0, c.ncols());
                }
                let flags = nonzero_columns(g.as_slice(), k);
                let count = flags.iter().filter(|&&f| f).count();
                if c.prefers_active(count) {
                    let w = c.backward_active_with(g.as_slice(), k, &flags);
                    return Block::from_col_major(k, c.ncols(), w);
                }
                if conv_prefers_sparse(c, count) {
                    let nz: Vec<usize> = (0..g.ncols()).filter(|&j| flags[j]).collect();
                    return c.backward_sparse(g, &nz);
                }
                Block::from_col_major(k, c.ncols(), c.backward_gemm(g.as_slice(), k, par))
            }
            Operator::Kron(op) => op.backward(g, par),
            Operator::Softmax(j) => j.backward(g),
            Operator::MatMul(p) => p.backward(g, par),
            Operator::Transposed(_) => T::transposed_left_mul(self, g, par),
        }
    }

    /// `G·A` for a transposed operator (`G·Aᵀ = (A·Gᵀ)ᵀ`), in `f64`.
    pub(crate) fn transposed_left_mul(&self, g: &Block, par: Par) -> Block {
        match self {
            Operator::Transposed(a) => a.right_mul(&g.transpose(), par).transpose(),
            Operator::Identity(_)
            | Operator::Diagonal(_)
            | Operator::ChannelScale(_)
            | Operator::Dense(_)
            | Operator::Csr(_)
            | Operator::Selection(_)
            | Operator::Conv(_)
            | Operator::Kron(_)
            | Operator::Softmax(_)
            | Operator::MatMul(_) => self.left_mul(g, par),
        }
    }

    /// `A·T` for a dense `T` of `ncols × k`; returns `nrows × k`.
    ///
    /// # Panics
    /// If `t.nrows() != self.ncols()`.
    pub fn right_mul(&self, t: &Block, par: Par) -> Block {
        assert_eq!(t.nrows(), self.ncols(), "right_mul: dimension mismatch");
        let k = t.ncols();
        match self {
            Operator::Identity(_) => t.clone(),
            Operator::Diagonal(d) => {
                let mut out = t.clone();
                for c in 0..k {
                    for (v, dj) in out.col_as_slice_mut(c).iter_mut().zip(d) {
                        *v *= dj;
                    }
                }
                out
            }
            Operator::ChannelScale(d) => {
                let mut out = t.clone();
                for c in 0..k {
                    let col = out.col_as_slice_mut(c);
                    for (r, v) in d.blocks() {
                        col[r].iter_mut().for_each(|x| *x *= v);
                    }
                }
                out
            }
            Operator::Dense(a) => {
                let mut out = Block::zeros(a.nrows(), k);
                faer::linalg::matmul::matmul(
                    out.as_mut(),
                    Accum::Replace,
                    a.as_ref(),
                    t.as_ref(),
                    1.0,
                    par,
                );
                out
            }
            Operator::Csr(a) => {
                let mut out = Block::zeros(a.rows(), k);
                let (indptr, indices, data) = (a.indptr(), a.indices(), a.data());
                let indptr = indptr.raw_storage();
                for c in 0..k {
                    let tc = t.col_as_slice(c);
                    let oc = out.col_as_slice_mut(c);
                    for i in 0..a.rows() {
                        oc[i] = (indptr[i]..indptr[i + 1]).map(|p| data[p] * tc[indices[p]]).sum();
                    }
                }
                out
            }
            Operator::Selection(s) => {
                let mut out = Block::zeros(s.cols().len(), k);
                for c in 0..k {
                    let tc = t.col_as_slice(c);
                    for (o, &src) in out.col_as_slice_mut(c).iter_mut().zip(&s.cols) {
                        *o = if src == Selection::ZERO { 0.0 } else { tc[src] };
                    }
                }
                out
            }
            Operator::Conv(c) => {
                Block::from_col_major(c.nrows(), k, c.forward(t.as_slice(), k, par))
            }
            Operator::Kron(op) => {
                Block::from_col_major(op.nrows(), k, op.forward(t.as_slice(), k, par))
            }
            Operator::Softmax(j) => {
                let n = j.size();
                let mut out = Vec::with_capacity(n * k);
                for c in 0..k {
                    out.extend(j.apply(t.col_as_slice(c)));
                }
                Block::from_col_major(n, k, out)
            }
            Operator::MatMul(p) => {
                Block::from_col_major(p.nrows(), k, p.forward(t.as_slice(), k, par))
            }
            // Aᵀ·T = (Tᵀ·A)ᵀ
            Operator::Transposed(a) => a.left_mul(&t.transpose(), par).transpose(),
        }
    }

    /// The operator as a dense matrix (tests and the dense baseline only).
    pub fn to_dense(&self) -> Block {
        let id = Block::identity(self.ncols(), self.ncols());
        self.right_mul(&id, Par::Seq)
    }

    /// A CSR operator built from (row, col, value) triplets; duplicates add.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn csr_from_triplets(
        nrows: usize,
        ncols: usize,
        triplets: &[(usize, usize, f64)],
    ) -> Operator {
        let mut tri = sprs::TriMat::new((nrows, ncols));
        for &(i, j, v) in triplets {
            tri.add_triplet(i, j, v);
        }
        Operator::Csr(tri.to_csr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConvGeometry, FixedFactor};
    use proptest::prelude::*;

    fn dense_ref(a: &Block, b: &Block) -> Block {
        let mut out = Block::zeros(a.nrows(), b.ncols());
        for i in 0..a.nrows() {
            for j in 0..b.ncols() {
                let mut s = 0.0;
                for k in 0..a.ncols() {
                    s += a[(i, k)] * b[(k, j)];
                }
                out[(i, j)] = s;
            }
        }
        out
    }

    fn close(a: &Block, b: &Block) -> bool {
        a.nrows() == b.nrows()
            && a.ncols() == b.ncols()
            && (0..a.nrows()).all(|i| (0..a.ncols()).all(|j| (a[(i, j)] - b[(i, j)]).abs() < 1e-12))
    }

    fn op_strategy() -> impl Strategy<Value = Operator> {
        (1usize..9, 1usize..9, any::<u64>()).prop_map(|(r, c, seed)| {
            let mut s = seed;
            let mut rnd = move || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            };
            match seed % 9 {
                8 => {
                    let w = Mat::from_fn(r, c, |_, _| rnd());
                    Operator::Transposed(Box::new(Operator::Dense(w.into())))
                }
                5 => {
                    // I ⊗ W with r blocks of a c × (seed-sized) matrix
                    let inner = 1 + (seed / 8 % 4) as usize;
                    let w = Mat::from_fn(c, inner, |_, _| rnd());
                    Operator::Kron(KronOp::new(r, std::sync::Arc::new(w)).unwrap())
                }
                6 => {
                    let (outer, len, inner) = (1 + r % 3, c, 1 + (seed / 8 % 3) as usize);
                    let raw: Vec<f64> = (0..outer * len * inner).map(|_| rnd().exp()).collect();
                    // normalized along the axis, as probabilities are
                    let mut s = raw.clone();
                    for o in 0..outer {
                        for t in 0..inner {
                            let z: f64 = (0..len).map(|a| raw[(o * len + a) * inner + t]).sum();
                            for a in 0..len {
                                s[(o * len + a) * inner + t] /= z;
                            }
                        }
                    }
                    Operator::Softmax(
                        SoftmaxJac::new(outer, len, inner, s, seed / 24 % 2 == 1).unwrap(),
                    )
                }
                7 => {
                    let (b, m, k, n) = (
                        1 + r % 3,
                        1 + c % 4,
                        1 + (seed / 8 % 4) as usize,
                        1 + (seed / 32 % 4) as usize,
                    );
                    let fixed =
                        if seed / 128 % 2 == 0 { FixedFactor::Left } else { FixedFactor::Right };
                    let len = if fixed == FixedFactor::Left { b * m * k } else { b * k * n };
                    let f: Vec<f64> = (0..len).map(|_| rnd()).collect();
                    Operator::MatMul(MatMulOp::new((b, m, k, n), fixed, f.into()).unwrap())
                }
                0 => Operator::Identity(c),
                1 if seed / 16 % 2 == 0 => Operator::Diagonal((0..c).map(|_| rnd()).collect()),
                1 => {
                    // c blocks of 1 + r % 3 elements
                    let spatial = 1 + r % 3;
                    let values = (0..c).map(|_| rnd()).collect();
                    Operator::ChannelScale(ChannelScale::new(values, spatial).unwrap())
                }
                2 => Operator::Dense(Mat::from_fn(r, c, |_, _| rnd()).into()),
                3 => {
                    let tri: Vec<_> = (0..r * c / 2 + 1)
                        .map(|_| {
                            let i = ((rnd() + 1.0) / 2.0 * r as f64) as usize % r;
                            let j = ((rnd() + 1.0) / 2.0 * c as f64) as usize % c;
                            (i, j, rnd())
                        })
                        .collect();
                    Operator::csr_from_triplets(r, c, &tri)
                }
                _ => Operator::Selection(
                    Selection::new(
                        c,
                        (0..r).map(|_| ((rnd() + 1.0) / 2.0 * c as f64) as usize % c).collect(),
                    )
                    .expect("indices within the input"),
                ),
            }
        })
    }

    /// Diagonal and channel-scale adjoint products over blocks large
    /// enough to run across threads: each entry `G[r, j]·d_j`, the same
    /// bits sequential and parallel, f64 and f32, rows 1 to 3.
    #[test]
    fn elementwise_adjoint_products_across_threads_keep_the_bits() {
        fn check<T: Real>(op: &Operator, scale: impl Fn(usize) -> f64) {
            for k in 1..4 {
                let n = op.nrows();
                let g = Block::<T>::from_fn(k, n, |i, j| {
                    T::of(((i * 31 + j * 7) % 97) as f64 / 13.0 - 3.0)
                });
                let seq = op.left_mul_owned(g.clone(), Par::Seq);
                let par = op.left_mul_owned(g.clone(), Par::rayon(2));
                assert_eq!(seq, par);
                for j in (0..n).step_by(997) {
                    for i in 0..k {
                        assert_eq!(seq[(i, j)], g[(i, j)] * T::of(scale(j)));
                    }
                }
            }
        }
        let d: Vec<f64> = (0..150_001).map(|j| (j % 11) as f64 / 7.0 - 0.5).collect();
        let diag = Operator::Diagonal(d.clone());
        check::<f64>(&diag, |j| d[j]);
        check::<f32>(&diag, |j| d[j]);
        let (channels, spatial) = (61, 2_003);
        let v: Vec<f64> = (0..channels).map(|c| c as f64 / 5.0 - 2.0).collect();
        let cs = Operator::ChannelScale(ChannelScale::new(v.clone(), spatial).unwrap());
        check::<f64>(&cs, |j| v[j / spatial]);
        check::<f32>(&cs, |j| v[j / spatial]);
    }

    #[test]
    fn selection_new_checks_every_index() {
        assert!(Selection::new(3, vec![2, Selection::ZERO, 0]).is_ok());
        let e = Selection::new(3, vec![0, 3]).unwrap_err();
        assert_eq!(e.to_string(), "selection row 1 reads input 3 of 3");
        assert!(Selection::new(0, vec![Selection::ZERO]).is_ok());
    }

    proptest! {
        #[test]
        fn products_match_dense_reference(op in op_strategy(), k in 1usize..5) {
            let a = op.to_dense();
            // to_dense itself must agree with apply on unit vectors
            for j in 0..op.ncols() {
                let mut e = vec![0.0; op.ncols()];
                e[j] = 1.0;
                let col = op.apply(&e);
                for i in 0..op.nrows() { prop_assert!((col[i] - a[(i, j)]).abs() < 1e-15); }
            }
            let g = Block::from_fn(k, op.nrows(), |i, j| (i * 7 + j * 3) as f64 * 0.1 - 0.4);
            let t = Block::from_fn(op.ncols(), k, |i, j| (i * 5 + j * 2) as f64 * 0.2 - 0.3);
            prop_assert!(close(&op.left_mul(&g, Par::Seq), &dense_ref(&g, &a)));
            prop_assert!(close(&op.right_mul(&t, Par::Seq), &dense_ref(&a, &t)));
            // taking the adjoint over gives the same bits
            prop_assert_eq!(op.left_mul_owned(g.clone(), Par::Seq), op.left_mul(&g, Par::Seq));
            // the forward product in f64 is `apply`'s; in f32 within
            // (inner + 2)·ε32 of |A|·|x| (x and the weights rounded, then
            // sums in f32 for a dense layer; in f64 for the others, the
            // result rounded)
            let x: Vec<f64> = (0..op.ncols()).map(|j| (j * 5 + 3) as f64 * 0.2 - 0.7).collect();
            let want = op.apply(&x);
            prop_assert_eq!(op.apply_t::<f64>(&x, Par::Seq), want.clone());
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let got = f32::widen(op.apply_t::<f32>(&x32, Par::Seq));
            let gamma = (op.ncols() as f64 + 2.0) * f64::from(f32::EPSILON);
            for i in 0..op.nrows() {
                let mag: f64 = (0..op.ncols()).map(|j| (a[(i, j)] * x[j]).abs()).sum();
                prop_assert!((got[i] - want[i]).abs() <= gamma * mag + 1e-30, "apply_t::<f32> row {i}");
            }
            // what `prepare` forms is what the first f32 product forms
            let prepared = op.clone();
            prepared.prepare::<f32>();
            prepared.prepare::<f64>();
            prop_assert_eq!(prepared.left_mul(&g.cast::<f32>(), Par::Seq), op.clone().left_mul(&g.cast::<f32>(), Par::Seq));
            // in f32: within (inner + 2)·ε32 of |G|·|A| entry by entry (G
            // and A rounded to f32, then a sum of `inner` products)
            let got = op.left_mul(&g.cast::<f32>(), Par::Seq);
            let want = dense_ref(&g, &a);
            let abs = |b: &Block| Block::from_fn(b.nrows(), b.ncols(), |i, j| b[(i, j)].abs());
            let mag = dense_ref(&abs(&g), &abs(&a));
            let gamma = (op.nrows() as f64 + 2.0) * f64::from(f32::EPSILON);
            for i in 0..want.nrows() {
                for j in 0..want.ncols() {
                    let e = (f64::from(got[(i, j)]) - want[(i, j)]).abs();
                    prop_assert!(e <= gamma * mag[(i, j)] + 1e-30, "({i}, {j}): {e:e}");
                }
            }
        }
    }

    /// The three reverse products of a convolution, as `left_mul` chooses
    /// them by the density of `G`'s nonzero columns: with 72 im2col rows
    /// and 48 output channels the active kernel below a third (at least 4
    /// channels a position), with 36 im2col rows (too few for it) the
    /// scatter below 15 %, the GEMM above; each against the dense Toeplitz
    /// product, in f64 and f32, for 1 to 10 adjoint rows.
    #[test]
    fn conv_reverse_paths_by_density_match_the_toeplitz_product() {
        for c_in in [8, 4] {
            let geom = ConvGeometry {
                c_in,
                c_out: 48,
                groups: 1,
                ih: 7,
                iw: 7,
                kh: 3,
                kw: 3,
                stride: (1, 1),
                dilation: (1, 1),
                pad: (1, 1),
                oh: 7,
                ow: 7,
            };
            let weight: Vec<f64> =
                (0..48 * c_in * 9).map(|i| ((i * 37 % 101) as f64) / 50.0 - 1.0).collect();
            let conv = ConvOp::new(geom, std::sync::Arc::new(weight)).unwrap();
            let dense = Operator::Csr(conv.to_csr()).to_dense();
            // no rows: an empty product, whatever the path
            let empty = Operator::Conv(conv.clone())
                .left_mul(&Block::<f64>::zeros(0, conv.nrows()), Par::Seq);
            assert_eq!((empty.nrows(), empty.ncols()), (0, conv.ncols()));
            assert!(conv.backward_active::<f64>(&[], 0).is_empty());
            // (5 %: 2.4 channels a position, too few for the active kernel)
            for (rows, percent, active) in [
                (10, 10, true),
                (10, 25, true),
                (10, 60, false),
                (3, 10, true),
                (1, 20, true),
                (10, 5, false),
            ]
            .map(|(r, p, a)| (r, p, a && c_in == 8))
            {
                let on = |j: usize| ((j * 2_654_435_761) >> 5) % 100 < percent;
                let g = Block::from_fn(rows, conv.nrows(), |i, j| {
                    if on(j) { ((i * 7 + j) % 13) as f64 / 6.0 - 1.0 } else { 0.0 }
                });
                let count = (0..conv.nrows()).filter(|&j| on(j)).count();
                assert_eq!(conv.prefers_active(count), active, "{rows} rows at {percent} %");
                let want = dense_ref(&g, &dense);
                let got = Operator::Conv(conv.clone()).left_mul(&g, Par::Seq);
                assert!(close(&got, &want), "{rows} rows at {percent} %");
                // the thread count changes neither the path nor the bits
                assert_eq!(Operator::Conv(conv.clone()).left_mul(&g, Par::rayon(2)), got);
                // nor does asking for fewer rows (other register tile widths)
                for keep in [vec![0], vec![rows - 1, 0]] {
                    let sub = Block::from_fn(keep.len(), conv.nrows(), |i, j| g[(keep[i], j)]);
                    let part = Operator::Conv(conv.clone()).left_mul(&sub, Par::Seq);
                    for (i, &r) in keep.iter().enumerate() {
                        for j in 0..conv.ncols() {
                            assert_eq!(
                                part[(i, j)].to_bits(),
                                got[(r, j)].to_bits(),
                                "row {r} of {rows}"
                            );
                        }
                    }
                }
                let g32: Block<f32> = g.cast();
                let got = Operator::Conv(conv.clone()).left_mul(&g32, Par::Seq);
                for i in 0..rows {
                    for j in 0..conv.ncols() {
                        let e = (f64::from(got[(i, j)]) - want[(i, j)]).abs();
                        assert!(e < 1e-4 * (1.0 + want[(i, j)].abs()), "f32 ({i}, {j}): {e:e}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn conv_and_dense_products_skip_zero_columns_exactly(
            c_in in 1usize..4, c_out in 1usize..4, hw in 2usize..7, k in 1usize..4, pad in 0usize..2,
            rows in 1usize..4, keep in 1usize..5, seed in any::<u64>(),
        ) {
            prop_assume!(hw + 2 * pad >= k);
            let o = hw + 2 * pad - k + 1;
            let n = c_out * c_in * k * k;
            let weight: Vec<f64> = (0..n).map(|i| (((i as u64 * 2654435761) ^ seed) % 1000) as f64 / 500.0 - 1.0).collect();
            let conv = ConvOp::new(ConvGeometry {
                c_in, c_out, groups: 1, ih: hw, iw: hw, kh: k, kw: k, stride: (1, 1), dilation: (1, 1),
                pad: (pad, pad), oh: o, ow: o,
            }, std::sync::Arc::new(weight)).unwrap();
            // G with most columns zero, as after inactive units / max-pool
            let g = Block::from_fn(rows, conv.nrows(), |i, j| if j % 5 < keep.min(1) || (j * 7 + i) % 11 == 0 { (i + j) as f64 * 0.1 - 1.0 } else { 0.0 });
            let reference = dense_ref(&g, &Operator::Csr(conv.to_csr()).to_dense());
            prop_assert!(close(&Operator::Conv(conv.clone()).left_mul(&g, Par::Seq), &reference));
            let nz: Vec<usize> = (0..conv.nrows()).filter(|&j| g.col_as_slice(j).iter().any(|&v| v != 0.0)).collect();
            prop_assert!(close(&conv.backward_sparse(&g, &nz), &reference));
            let a = Block::from_fn(conv.nrows(), 5, |i, j| ((i * 3 + j) % 7) as f64 - 3.0);
            prop_assert!(close(&Operator::Dense(a.to_mat().into()).left_mul(&g, Par::Seq), &dense_ref(&g, &a)));
        }
    }

    proptest! {
        /// The dense reverse product's register tiles: against the plain
        /// loops in f64 (1e-12) and within `(m + 2)·ε32·Σ|g·w|` in f32, for
        /// row counts across several row blocks and column counts across
        /// several column tiles, the adjoint with zero columns and signed
        /// zeros; and each row alone has exactly its bits in the block.
        #[test]
        fn dense_tiles_match_the_loops_row_by_row(
            k in 1usize..40, m in 1usize..30, n in 1usize..20, seed in any::<u64>(),
        ) {
            let mut next = crate::xorshift(seed);
            let w = Block::from_fn(m, n, |_, _| (next() % 2001) as f64 / 1000.0 - 1.0);
            let weights = Weights::from(w.to_mat());
            let pick = [0.0, -0.0, 0.75, -1.5, 0.03125];
            let g = Block::from_fn(k, m, |_, j| if j % 3 == 1 { 0.0 } else { pick[(next() % 5) as usize] });
            let want = dense_ref(&g, &w);
            let got = weights.left_mul_tiled(&g);
            prop_assert!(close(&got, &want));
            let g32 = g.cast::<f32>();
            let got32 = weights.left_mul_tiled(&g32);
            for i in 0..k {
                for j in 0..n {
                    let mag: f64 = (0..m).map(|t| (g[(i, t)] * w[(t, j)]).abs()).sum();
                    let gamma = (m + 2) as f64 * f64::from(f32::EPSILON);
                    let v = f64::from(got32.col_as_slice(j)[i]);
                    prop_assert!((v - want[(i, j)]).abs() <= gamma * mag + 1e-30, "f32 {} vs {}", v, want[(i, j)]);
                }
            }
            for r in [0, k / 2, k - 1] {
                let row = Block::from_fn(1, m, |_, t| g[(r, t)]);
                let alone = weights.left_mul_tiled(&row);
                let alone32 = weights.left_mul_tiled(&row.cast::<f32>());
                for j in 0..n {
                    prop_assert_eq!(alone.col_as_slice(j)[0].to_bits(), got.col_as_slice(j)[r].to_bits());
                    prop_assert_eq!(alone32.col_as_slice(j)[0].to_bits(), got32.col_as_slice(j)[r].to_bits());
                }
            }
        }
    }

    proptest! {
        /// A selection (with repeats or without, zero rows included) and a
        /// diagonal after it, pushed back as nonzero columns: the bits of the two
        /// products and the nonzero test, for every row count (the fixed
        /// ones to 16 and the general one), in f64 and f32.
        #[test]
        fn selection_pushed_through_has_the_products_bits(
            k in 0usize..19, n in 1usize..30, rows in 0usize..40, distinct in any::<bool>(), seed in any::<u64>(),
        ) {
            let mut next = crate::xorshift(seed);
            let mut cols: Vec<usize> = (0..rows)
                .map(|_| if next().is_multiple_of(7) { Selection::ZERO } else { (next() % n as u64) as usize })
                .collect();
            if distinct {
                // no input selected twice (a pool whose windows do not
                // overlap): a shuffled subset, zero rows kept
                let mut free: Vec<usize> = (0..n).collect();
                for c in cols.iter_mut().filter(|c| **c != Selection::ZERO) {
                    *c = if free.is_empty() {
                        Selection::ZERO
                    } else {
                        free.swap_remove((next() % free.len() as u64) as usize)
                    };
                }
            }
            let sel = Selection::new(n, cols).unwrap();
            // slopes with zeros, negatives and ones; an adjoint with zero
            // columns, signed zeros and one non-finite entry at times
            let d: Vec<f64> = (0..n).map(|_| [0.0, 1.0, -0.25, 2.5][(next() % 4) as usize]).collect();
            let pick = [0.0, -0.0, 1.5, -3.0, 0.125, f64::INFINITY];
            let g = Block::from_fn(k, rows, |_, j| {
                let v = next();
                if j % 3 == 0 { 0.0 } else { pick[(v % if v.is_multiple_of(50) { 6 } else { 5 }) as usize] }
            });
            fn check<T: Real>(sel: &Selection, g: &Block<T>, d: &[f64]) -> Result<(), TestCaseError> {
                let k = g.nrows();
                let full = Operator::Diagonal(d.to_vec())
                    .left_mul_owned(Operator::Selection(sel.clone()).left_mul(g, Par::Seq), Par::Seq);
                let flags = crate::nonzero_columns(full.as_slice(), k);
                let want: Vec<usize> = (0..sel.ncols()).filter(|&j| k > 0 && flags[j]).collect();
                let (cols, vals) = sel.pushed_through(g, d);
                prop_assert_eq!(&cols, &want);
                prop_assert_eq!(vals.len(), cols.len() * k);
                for (i, &j) in cols.iter().enumerate() {
                    for (a, b) in vals[i * k..(i + 1) * k].iter().zip(full.col_as_slice(j)) {
                        prop_assert_eq!(a.to_f64().to_bits(), b.to_f64().to_bits());
                    }
                }
                Ok(())
            }
            check(&sel, &g, &d)?;
            let g32 = Block::from_col_major(k, rows, g.as_slice().iter().map(|&v| v as f32).collect());
            check(&sel, &g32, &d)?;
        }
    }
}
