//! Composition strategies and their cost model.
//!
//! `W` is the product `E·A_L⋯A_1` (`E` selects the output rows) of sparse and
//! dense factors, and its cost depends on the order. Besides the two fixed
//! orders (reverse: a block of `m` rows pushed from the output; forward: a
//! block of `n` columns pushed from the input) a network whose nodes form a
//! chain admits any bracketing: [`chain_plan`] runs the matrix-chain dynamic
//! program over the explicit factors, where multiplying by a single explicit
//! factor costs its nonzeros times the other side's width and multiplying
//! two formed products costs a dense GEMM. A bottleneck (a narrow layer in
//! the middle) makes the split around it cheaper than either fixed order.
//! [`dense_accumulate`] is the paper-literal baseline: every factor a dense
//! matrix, multiplied in order.

use std::fmt::Write;
use std::sync::Arc;

use faer::Par;
use nnlin_linalg::{Block, Operator, Selection};

use crate::{CompileError, Direction, Instance, ValueId, accumulate};

/// Cost of one multiplication: multiply-adds by kernel kind and bytes moved.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Multiply-adds done by dense GEMMs.
    pub gemm: f64,
    /// Multiply-adds done by explicit sparse / structured kernels.
    pub sparse: f64,
    /// Bytes read and written (operator storage, input and output blocks).
    pub bytes: f64,
}

impl Cost {
    fn add(self, o: Cost) -> Cost {
        Cost {
            gemm: self.gemm + o.gemm,
            sparse: self.sparse + o.sparse,
            bytes: self.bytes + o.bytes,
        }
    }
    /// Total multiply-adds.
    pub fn flops(self) -> f64 {
        self.gemm + self.sparse
    }
    /// Predicted seconds: compute time at the measured throughputs, or the
    /// memory traffic at the measured bandwidth, whichever is larger.
    pub fn seconds(self, rates: &Rates) -> f64 {
        (self.gemm / rates.gemm + self.sparse / rates.sparse).max(self.bytes / rates.bandwidth)
    }
    /// Applying an operator that stores `storage` bytes and does `madds`
    /// multiply-adds per column to a block of `width` columns: the
    /// operator read once, `width·cols` values read and `width·rows`
    /// written. The one traffic model of the planner (fixed orders, the
    /// chain program's leaves and folds).
    fn apply(
        storage: usize,
        madds: usize,
        width: usize,
        (rows, cols): (usize, usize),
        gemm: bool,
    ) -> Cost {
        let f = std::mem::size_of::<f64>();
        let madds = (madds * width) as f64;
        let bytes = (storage + f * width * (rows + cols)) as f64;
        if gemm {
            Cost { gemm: madds, sparse: 0.0, bytes }
        } else {
            Cost { gemm: 0.0, sparse: madds, bytes }
        }
    }
    fn gemm(rows: usize, inner: usize, cols: usize) -> Cost {
        let f = std::mem::size_of::<f64>() as f64;
        Cost {
            gemm: (rows * inner * cols) as f64,
            sparse: 0.0,
            bytes: f * (rows * inner + inner * cols + rows * cols) as f64,
        }
    }
}

/// Kernel throughputs in multiply-adds per second, measured on the machine
/// (`nnlin calibrate`) rather than assumed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Dense GEMM (faer, f64).
    pub gemm: f64,
    /// Sparse and structured operator products.
    pub sparse: f64,
    /// Memory bandwidth, bytes per second (a large copy).
    pub bandwidth: f64,
}

impl Rates {
    /// Typical figures of one core of a current x86-64 machine with AVX-512
    /// (`nnlin calibrate` on the development machine: 1.5e10 GEMM and 9.2e8
    /// sparse multiply-adds per second, 1.15e10 bytes per second). Only
    /// their ratios steer the planner; pass measured ones for timings.
    pub const TYPICAL: Rates = Rates { gemm: 1.5e10, sparse: 9.2e8, bandwidth: 1.15e10 };

    /// Measures both throughputs with small kernels (about 0.1 s).
    pub fn measure() -> Rates {
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = std::time::Instant::now();
            let mut reps = 0;
            while t.elapsed().as_secs_f64() < 0.04 {
                f();
                reps += 1;
            }
            t.elapsed().as_secs_f64() / f64::from(reps)
        };
        let a =
            Operator::Dense(faer::Mat::from_fn(256, 256, |i, j| ((i * 7 + j) % 13) as f64).into());
        let g = Block::from_fn(64, 256, |i, j| ((i + j) % 5) as f64);
        let tg = time(&mut || {
            std::hint::black_box(a.left_mul(&g, Par::Seq));
        });
        let tri: Vec<(usize, usize, f64)> = (0..4096)
            .flat_map(|i| (0..8).map(move |k| (i, (i * 31 + k * 517) % 4096, 1.0)))
            .collect();
        let s = Operator::csr_from_triplets(4096, 4096, &tri);
        let g2 = Block::from_fn(16, 4096, |i, j| ((i + j) % 3) as f64);
        let ts = time(&mut || {
            std::hint::black_box(s.left_mul(&g2, Par::Seq));
        });
        let src = vec![1.0f64; 1 << 22];
        let mut dst = vec![0.0f64; 1 << 22];
        let tb = time(&mut || {
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
        });
        Rates {
            gemm: 64.0 * 256.0 * 256.0 / tg,
            sparse: (4096.0 * 8.0 * 16.0) / ts,
            bandwidth: 2.0 * 8.0 * f64::from(1u32 << 22) / tb,
        }
    }
}

/// Whether an operator's products run as GEMMs (dense weights read in
/// panels) rather than as sparse or structured loops.
fn gemm_kind(op: &Operator) -> bool {
    match op {
        Operator::Transposed(a) => gemm_kind(a),
        Operator::Dense(_) | Operator::Conv(_) | Operator::Kron(_) | Operator::MatMul(_) => true,
        Operator::Identity(_)
        | Operator::Diagonal(_)
        | Operator::ChannelScale(_)
        | Operator::Csr(_)
        | Operator::Selection(_)
        | Operator::Softmax(_) => false,
    }
}

fn op_cost(op: &Operator, width: usize) -> Cost {
    match op {
        Operator::Identity(_) => Cost::default(),
        Operator::Transposed(a) => op_cost(a, width),
        Operator::Diagonal(_)
        | Operator::ChannelScale(_)
        | Operator::Dense(_)
        | Operator::Csr(_)
        | Operator::Selection(_)
        | Operator::Conv(_)
        | Operator::Kron(_)
        | Operator::Softmax(_)
        | Operator::MatMul(_) => {
            Cost::apply(op.bytes(), op.nnz(), width, (op.nrows(), op.ncols()), gemm_kind(op))
        }
    }
}

/// `op_cost` of an explicit operator (a leaf or a folded pair of the chain
/// program) of `nnz` entries held as CSR (value and column index each).
fn explicit_cost(nnz: usize, width: usize, shape: (usize, usize), gemm: bool) -> Cost {
    let entry = std::mem::size_of::<f64>() + std::mem::size_of::<usize>();
    Cost::apply(entry * nnz, nnz, width, shape, gemm)
}

/// Predicted cost of reverse (`m` rows) or forward accumulation.
pub fn direction_cost(inst: &Instance, m: usize, dir: Direction) -> Cost {
    let width = match dir {
        Direction::Reverse => m,
        Direction::Forward => inst.input_len,
    };
    inst.layers
        .iter()
        .flat_map(|l| l.inputs.iter())
        .fold(Cost::default(), |c, (_, op)| c.add(op_cost(op, width)))
}

/// The cache a batch's stacked adjoints should fit: half the development
/// machine's 2 MiB L2 per core. A product whose input and output adjoints
/// (`width·m` rows) outgrow it while one instance's (`m` rows) fit pays
/// their traffic from memory ([`batch_seconds`]).
pub const CACHE_BYTES: usize = 1 << 20;

/// The widest batch [`batch_width`] considers.
pub const MAX_BATCH: usize = 64;

/// A GEMM call passes over its weights once (packing them for the
/// microkernel) whatever its row count, which costs about what multiplying
/// this many more rows does: a 784-2048-2048-10 perceptron's reverse pass
/// of 10 rows, 256 instances, 2 threads, ran 2.1× (f32) and 1.7× (f64)
/// faster with 80 rows per call (8 instances stacked) than with 10, as
/// `(10 + 16) / (10 + 16/8)` predicts.
pub const GEMM_CALL_ROWS: usize = 16;

/// An upper bound on each value's adjoint nonzero columns in reverse
/// accumulation at this instance: the output's are all nonzero; an
/// instance's own diagonal passes at most its nonzero entries' columns
/// and a selection at most the columns it selects; any other factor may
/// fill every column; fan-out adds.
fn adjoint_nonzeros(inst: &Instance) -> Vec<usize> {
    let mut nz = vec![0usize; inst.value_lens.len()];
    nz[inst.output_value.0] = inst.value_lens[inst.output_value.0];
    for l in inst.layers.iter().rev() {
        let out = nz[l.output.0];
        if out == 0 {
            continue;
        }
        for (v, op) in &l.inputs {
            let through = match &**op {
                Operator::Identity(_) => out,
                Operator::Diagonal(d) if l.per_instance => {
                    out.min(d.iter().filter(|&&x| x != 0.0).count())
                }
                Operator::Selection(s) if l.per_instance => {
                    let mut hit = vec![false; s.ncols()];
                    for &c in s.cols().iter().filter(|&&c| c != Selection::ZERO) {
                        hit[c] = true;
                    }
                    out.min(hit.into_iter().filter(|&h| h).count())
                }
                // fixed diagonals and selections are bounded only by
                // their shape, as any other factor
                Operator::Diagonal(_)
                | Operator::Selection(_)
                | Operator::ChannelScale(_)
                | Operator::Dense(_)
                | Operator::Csr(_)
                | Operator::Conv(_)
                | Operator::Kron(_)
                | Operator::Softmax(_)
                | Operator::MatMul(_)
                | Operator::Transposed(_) => op.ncols(),
            };
            nz[v.0] = (nz[v.0] + through).min(inst.value_lens[v.0]);
        }
    }
    nz
}

/// Predicted seconds per instance of reverse accumulation of `m` rows
/// with `width` instances sharing one pass ([`crate::batch`]): one
/// instance's products ([`direction_cost`]) plus each GEMM-kind product's
/// pass over its weights ([`GEMM_CALL_ROWS`] rows' worth), where a shared
/// product that runs on the whole stack reads its storage and makes that
/// pass once per batch (`1/width` per instance). A shared product whose
/// adjoint is sparse at this instance ([`Operator::skips_zero_columns`] of
/// an upper bound on its nonzero columns) runs instance by instance
/// instead, and it and the instance's own factors other than diagonals and
/// selections copy their rows out of the stack and back; a product whose
/// stacked adjoints outgrow [`CACHE_BYTES`] while one instance's fit moves
/// them through memory once more.
pub fn batch_seconds(inst: &Instance, m: usize, width: usize, rates: &Rates) -> f64 {
    let f = std::mem::size_of::<f64>();
    let width = width.max(1);
    let nz = adjoint_nonzeros(inst);
    let share = 1.0 / width as f64;
    let mut cost = direction_cost(inst, m, Direction::Reverse);
    let (mut calls, mut extra) = (0.0, 0.0);
    for l in &inst.layers {
        for (_, op) in &l.inputs {
            let stacked = !l.per_instance && !op.skips_zero_columns(nz[l.output.0]);
            let storage = op.bytes() as f64;
            let pass = if gemm_kind(op) { GEMM_CALL_ROWS as f64 * storage / f as f64 } else { 0.0 };
            if stacked {
                cost.bytes -= storage * (1.0 - share);
                calls += pass * share;
            } else {
                calls += pass;
            }
            if width == 1 {
                continue;
            }
            let rows = (f * m * (op.nrows() + op.ncols())) as f64;
            // what runs instance by instance copies its rows out and back,
            // but an instance's own diagonals and selections act in the stack
            if !(stacked || l.per_instance && crate::batch::in_stack(op)) {
                extra += 2.0 * rows;
            }
            if rows <= CACHE_BYTES as f64 && rows * width as f64 > CACHE_BYTES as f64 {
                extra += rows;
            }
        }
    }
    cost.seconds(rates) + calls / rates.gemm + extra / rates.bandwidth
}

/// Whether batching `m` rows could save 5 % of an instance's reverse
/// pass, judged from the compiler's shared operators alone (no instance
/// compiled): the most a batch saves, every shared GEMM-kind product's
/// pass over its weights ([`GEMM_CALL_ROWS`]) and its storage traffic,
/// against those products' own multiply-adds, a lower bound on the pass.
/// CIFAR ResNet-18 with 10 rows: 3 %, so no instance is compiled to price
/// a width; a perceptron's or LeNet-5's is priced.
pub fn batching_may_pay(compiler: &crate::Compiler, m: usize, rates: &Rates) -> bool {
    let f = std::mem::size_of::<f64>() as f64;
    let (mut most, mut least) = (0.0, 0.0);
    for op in compiler.shared_operators() {
        if gemm_kind(op) {
            let storage = op.bytes() as f64;
            most += GEMM_CALL_ROWS as f64 * storage / f / rates.gemm + storage / rates.bandwidth;
            least += (m * op.nnz()) as f64 / rates.gemm;
        }
    }
    most >= 0.05 * least
}

/// The batch width for `count` instances of reverse accumulation of `m`
/// rows on `threads` threads: the narrowest power of two up to
/// [`MAX_BATCH`] whose predicted seconds per instance ([`batch_seconds`]) are
/// within 10 % of the best width's, if at least 5 % below one at a time,
/// else 1 (a wider stack holds more memory for little gain). Never so wide
/// that fewer batches than threads remain, nor that `width` instances'
/// peak ([`peak_bytes`]) exceeds `budget`.
pub fn batch_width(
    inst: &Instance,
    m: usize,
    count: usize,
    threads: usize,
    rates: &Rates,
    budget: usize,
) -> usize {
    let peak = peak_bytes(inst, m, Choice::Reverse);
    let most = count.div_ceil(threads.max(1)).min(MAX_BATCH);
    let mut priced = vec![(1, batch_seconds(inst, m, 1, rates))];
    let mut width = 2;
    while width <= most && peak.saturating_mul(width) <= budget {
        priced.push((width, batch_seconds(inst, m, width, rates)));
        width *= 2;
    }
    let best = priced.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    if best >= 0.95 * priced[0].1 {
        return 1;
    }
    priced.iter().find(|p| p.1 <= 1.1 * best).map_or(1, |p| p.0)
}

/// The factors of a chain network, input side first, identities dropped;
/// `None` if the network is not a chain.
pub fn chain_factors(inst: &Instance) -> Option<Vec<Arc<Operator>>> {
    let mut v = ValueId(0);
    let mut out = vec![];
    for l in &inst.layers {
        if l.inputs.len() != 1 || l.inputs[0].0 != v {
            return None;
        }
        v = l.output;
        if !matches!(*l.inputs[0].1, Operator::Identity(_)) {
            out.push(Arc::clone(&l.inputs[0].1));
        }
    }
    (v == inst.output_value).then_some(out)
}

/// A bracketing of factors `lo..=hi` (input side first).
#[derive(Clone, Debug, PartialEq)]
pub enum Tree {
    /// One explicit factor.
    Leaf(usize),
    /// A diagonal or selection factor folded into its explicit neighbour:
    /// `(outer, inner)` = factors `inner + 1` and `inner`.
    Fold(usize, usize),
    /// `left · right`: `left` covers the later (output-side) factors.
    Product(Box<Tree>, Box<Tree>),
}

/// The longest chain the matrix-chain program brackets. The program takes
/// O(k³) time and O(k²) memory in the number of factors k: 256 factors plan
/// in milliseconds, while a 3 000-layer chain would take minutes and
/// gigabytes. Longer chains are accumulated in a fixed order instead.
pub const MAX_DP_FACTORS: usize = 256;

/// The cheapest bracketing of `factors` (input side first) and its cost.
///
/// Besides every split, the program may *fold* a diagonal or selection
/// factor into an explicit neighbour (one pass over the neighbour's
/// nonzeros), leaving a single explicit factor that later products use as
/// a leaf.
pub fn chain_plan(factors: &[Arc<Operator>], rates: &Rates) -> (Tree, Cost) {
    let k = factors.len();
    assert!(k > 0, "chain_plan: no factors");
    // dims[i] = columns of factor i = rows of factor i-1; dims[k] = rows of the last
    let mut dims = vec![factors[0].ncols()];
    dims.extend(factors.iter().map(|f| f.nrows()));
    // explicit-operator form: leaves and folded pairs, with their nnz
    let op_nnz = |i: usize, j: usize| -> Option<usize> {
        if i == j {
            Some(factors[i].nnz())
        } else if j == i + 1 && Operator::foldable(&factors[j], &factors[i]) {
            let explicit =
                if matches!(*factors[i], Operator::Dense(_) | Operator::Csr(_)) { i } else { j };
            Some(factors[explicit].nnz())
        } else {
            None
        }
    };
    let is_gemm_op = |i: usize, j: usize| {
        i == j && matches!(*factors[i], Operator::Dense(_) | Operator::Conv(_))
    };
    // best[i][j]: the cheapest way to form factors i..=j, and its cost
    let mut best: Vec<Vec<Option<(Cost, Split)>>> = vec![vec![None; k]; k];
    for i in 0..k {
        best[i][i] = Some((Cost::default(), Split::Leaf));
    }
    // factors i..=j are one explicit operator: a leaf or a folded pair
    let one_op =
        |b: Option<(Cost, Split)>| b.is_some_and(|b| matches!(b.1, Split::Leaf | Split::Fold));
    for len in 2..=k {
        for i in 0..=k - len {
            let j = i + len - 1;
            let mut choice: Option<(Cost, Split)> = None;
            let mut consider = |total: Cost, s: Split| {
                if choice.is_none_or(|(c, _)| total.seconds(rates) < c.seconds(rates)) {
                    choice = Some((total, s));
                }
            };
            if len == 2 && Operator::foldable(&factors[j], &factors[i]) {
                let nnz = op_nnz(i, j).expect("foldable pair");
                consider(
                    Cost { gemm: 0.0, sparse: nnz as f64, bytes: 24.0 * nnz as f64 },
                    Split::Fold,
                );
            }
            for s in i..j {
                // right = factors i..=s (input side), left = s+1..=j
                let (cr, cl) = (best[i][s].expect("filled").0, best[s + 1][j].expect("filled").0);
                let (rows, inner, cols) = (dims[j + 1], dims[s + 1], dims[i]);
                let left_op = op_nnz(s + 1, j).filter(|_| one_op(best[s + 1][j]));
                let right_op = op_nnz(i, s).filter(|_| one_op(best[i][s]));
                let mult = match (left_op, right_op) {
                    (Some(nl), _) => explicit_cost(nl, cols, (rows, inner), is_gemm_op(s + 1, j)),
                    (None, Some(nr)) => explicit_cost(nr, rows, (inner, cols), is_gemm_op(i, s)),
                    (None, None) => Cost::gemm(rows, inner, cols),
                };
                consider(cr.add(cl).add(mult), Split::At(s));
            }
            best[i][j] = choice;
        }
    }
    fn tree(best: &[Vec<Option<(Cost, Split)>>], i: usize, j: usize) -> Tree {
        match best[i][j].expect("filled").1 {
            Split::Leaf => Tree::Leaf(i),
            Split::Fold => Tree::Fold(j, i),
            Split::At(s) => {
                Tree::Product(Box::new(tree(best, s + 1, j)), Box::new(tree(best, i, s)))
            }
        }
    }
    (tree(&best, 0, k - 1), best[0][k - 1].expect("filled").0)
}

/// How the chain program forms factors `i..=j`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// One factor (`i == j`).
    Leaf,
    /// A diagonal or selection folded into its explicit neighbour.
    Fold,
    /// The product of `s+1..=j` and `i..=s`.
    At(usize),
}

enum Formed {
    Op(Arc<Operator>),
    Dense(Block),
}

fn eval(t: &Tree, f: &[Arc<Operator>], par: Par) -> Formed {
    match t {
        Tree::Leaf(i) => Formed::Op(Arc::clone(&f[*i])),
        Tree::Fold(outer, inner) => Formed::Op(Arc::new(
            Operator::fold(&f[*outer], &f[*inner]).expect("the program folds foldable pairs only"),
        )),
        Tree::Product(l, r) => {
            let (l, r) = (eval(l, f, par), eval(r, f, par));
            Formed::Dense(match (l, r) {
                (Formed::Op(a), Formed::Dense(b)) => a.right_mul(&b, par),
                (Formed::Dense(a), Formed::Op(b)) => b.left_mul(&a, par),
                (Formed::Op(a), Formed::Op(b)) => a.right_mul(&b.to_dense(), par),
                (Formed::Dense(a), Formed::Dense(b)) => {
                    let mut out = Block::zeros(a.nrows(), b.ncols());
                    faer::linalg::matmul::matmul(
                        out.as_mut(),
                        faer::Accum::Replace,
                        a.as_ref(),
                        b.as_ref(),
                        1.0,
                        par,
                    );
                    out
                }
            })
        }
    }
}

/// `W` (all rows of the last factor) by the bracketing `tree` of `factors`.
pub fn chain_accumulate_factors(
    inst: &Instance,
    factors: &[Arc<Operator>],
    tree: &Tree,
    par: Par,
) -> Block {
    if factors.is_empty() {
        return Block::identity(inst.input_len, inst.input_len);
    }
    match eval(tree, factors, par) {
        Formed::Op(op) => op.to_dense(),
        Formed::Dense(b) => b,
    }
}

/// The factors the matrix-chain program brackets: the chain's operators,
/// then the selection of `rows` as the last factor; `None` if the network
/// is not a chain, is empty, or is longer than [`MAX_DP_FACTORS`].
fn dp_factors(inst: &Instance, rows: Vec<usize>) -> Option<Vec<Arc<Operator>>> {
    let mut factors = chain_factors(inst).filter(|f| !f.is_empty() && f.len() < MAX_DP_FACTORS)?;
    factors.push(Arc::new(Operator::Selection(
        Selection::new(inst.output.len(), rows).expect("indices within the input"),
    )));
    Some(factors)
}

/// `W` and `b` of the selected rows by the matrix-chain DP (the row
/// selection is the last factor, so the program brackets it too); `None`
/// if the network is not a chain or is longer than [`MAX_DP_FACTORS`]. `b` is
/// the offsets pushed through the chain ([`Instance::offsets`]).
pub fn chain_accumulate(
    inst: &Instance,
    rows: &[usize],
    rates: &Rates,
    par: Par,
) -> Result<Option<(Block, Vec<f64>)>, CompileError> {
    crate::check_rows(inst, rows)?;
    let Some(factors) = dp_factors(inst, rows.to_vec()) else { return Ok(None) };
    let (tree, _) = chain_plan(&factors, rates);
    let w = chain_accumulate_factors(inst, &factors, &tree, par);
    let off = inst.offsets();
    Ok(Some((w, rows.iter().map(|&r| off[r]).collect())))
}

/// Bytes the dense baseline needs for its largest factor and product.
pub fn dense_bytes(inst: &Instance) -> usize {
    let mut most = 0;
    for l in &inst.layers {
        for (_, op) in &l.inputs {
            most = most.max(op.nrows() * op.ncols() + op.nrows() * inst.input_len);
        }
    }
    most * std::mem::size_of::<f64>()
}

/// The paper-literal baseline: every operator made a dense matrix, then
/// multiplied in order from the input side. Refuses when the dense factors
/// would exceed `max_bytes`.
pub fn dense_accumulate(
    inst: &Instance,
    rows: &[usize],
    max_bytes: usize,
    par: Par,
) -> Result<(Block, Vec<f64>), DenseError> {
    let need = dense_bytes(inst);
    if need > max_bytes {
        return Err(DenseError::TooLarge { need, max: max_bytes });
    }
    let mut dense = inst.clone();
    for l in &mut dense.layers {
        for (_, op) in &mut l.inputs {
            let d = op.to_dense();
            *op = Arc::new(Operator::Dense(d.to_mat().into()));
        }
    }
    accumulate(&dense, rows, Direction::Forward, par).map_err(DenseError::Compile)
}

/// Why the dense baseline refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DenseError {
    /// The dense factors do not fit.
    #[error(
        "the dense baseline needs {need} bytes for its largest factor and product, above the limit of {max}; use another strategy"
    )]
    TooLarge {
        /// Bytes needed.
        need: usize,
        /// The limit.
        max: usize,
    },
    /// A compile error.
    #[error(transparent)]
    Compile(CompileError),
}

/// How `W` and `b` are formed, with what running it needs: the one entry
/// point to every composition strategy ([`Plan::execute`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Plan {
    /// Reverse accumulation ([`crate::accumulate_reverse`]).
    Reverse,
    /// Forward accumulation.
    Forward,
    /// Forward up to this cut value, reverse down to it
    /// ([`crate::accumulate_split`]).
    Split(ValueId),
    /// The matrix-chain program's bracketing under these rates
    /// ([`chain_accumulate`]); on a network that is not a chain, or one too
    /// long for the program, the cheapest of reverse, forward and a cut
    /// split under them ([`candidates`]).
    Dp(Rates),
    /// The dense baseline ([`dense_accumulate`]), refused above this many
    /// bytes.
    Dense {
        /// The limit.
        max_bytes: usize,
    },
}

/// Why a plan did not run.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PlanError {
    /// The instance refused it (a row out of range).
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The dense baseline refused.
    #[error(transparent)]
    Dense(#[from] DenseError),
}

/// Which plan ran (a [`Plan::Dp`] on a network that is not a chain runs
/// another).
///
/// ```
/// use nnlin_compile::plan::Executed;
/// assert_eq!(Executed::Split(nnlin_compile::ValueId(7)).to_string(), "split@7");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executed {
    /// Reverse accumulation.
    Reverse,
    /// Forward accumulation.
    Forward,
    /// The matrix-chain program's bracketing (chains).
    Dp,
    /// Forward up to this cut value, reverse down to it (DAGs).
    Split(ValueId),
    /// The dense baseline.
    Dense,
}

impl From<Choice> for Executed {
    fn from(c: Choice) -> Self {
        match c {
            Choice::Reverse => Executed::Reverse,
            Choice::Forward => Executed::Forward,
            Choice::Dp => Executed::Dp,
            Choice::Split(v) => Executed::Split(v),
        }
    }
}

impl std::fmt::Display for Executed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Executed::Reverse => f.write_str("reverse"),
            Executed::Forward => f.write_str("forward"),
            Executed::Dp => f.write_str("dp"),
            Executed::Split(v) => write!(f, "split@{}", v.0),
            Executed::Dense => f.write_str("dense"),
        }
    }
}

impl Plan {
    /// The plan of a planner's choice, under the rates it was made with
    /// (which a chain program brackets by).
    pub fn of(choice: Choice, rates: Rates) -> Self {
        match choice {
            Choice::Reverse => Plan::Reverse,
            Choice::Forward => Plan::Forward,
            Choice::Dp => Plan::Dp(rates),
            Choice::Split(v) => Plan::Split(v),
        }
    }

    /// The planner's choice it carries out (`None` for the dense
    /// baseline, which the planner never picks): what [`peak_bytes`]
    /// prices.
    pub fn choice(&self) -> Option<Choice> {
        match *self {
            Plan::Reverse => Some(Choice::Reverse),
            Plan::Forward => Some(Choice::Forward),
            Plan::Split(v) => Some(Choice::Split(v)),
            Plan::Dp(_) => Some(Choice::Dp),
            Plan::Dense { .. } => None,
        }
    }

    /// `W` (`rows.len() × n`) and `b` of the selected output rows, and
    /// which plan ran. Reverse accumulation runs every product in `T`
    /// (`f32` or `f64`); the other plans run in `f64`. W and b come back
    /// in `f64` (exactly, from `f32`).
    pub fn execute<T: nnlin_linalg::Real>(
        &self,
        inst: &Instance,
        rows: &[usize],
        par: Par,
    ) -> Result<(Block, Vec<f64>, Executed), PlanError> {
        Ok(match *self {
            Plan::Reverse => {
                let (w, b) = crate::accumulate_reverse::<T>(inst, rows, par)?;
                // widened without a copy in f64
                let (r, c, data) = w.into_col_major();
                (Block::from_col_major(r, c, T::widen(data)), T::widen(b), Executed::Reverse)
            }
            Plan::Forward => {
                let (w, b) = accumulate(inst, rows, Direction::Forward, par)?;
                (w, b, Executed::Forward)
            }
            Plan::Split(v) => {
                let (w, b) = crate::accumulate_split(inst, rows, v, par)?;
                (w, b, Executed::Split(v))
            }
            Plan::Dp(rates) => match chain_accumulate(inst, rows, &rates, par)? {
                Some((w, b)) => (w, b, Executed::Dp),
                // not a chain: no candidate is the program, so this
                // recursion ends
                None => match candidates(inst, rows.len(), &rates).2 {
                    Choice::Dp => Plan::Reverse.execute::<T>(inst, rows, par)?,
                    other => Plan::of(other, rates).execute::<T>(inst, rows, par)?,
                },
            },
            Plan::Dense { max_bytes } => {
                let (w, b) = dense_accumulate(inst, rows, max_bytes, par)?;
                (w, b, Executed::Dense)
            }
        })
    }
}

/// What a plan does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Reverse accumulation.
    Reverse,
    /// Forward accumulation.
    Forward,
    /// The chain DP's bracketing (chains).
    Dp,
    /// Forward up to this cut value, reverse down to it, one GEMM (DAGs).
    Split(ValueId),
}

/// Values every input-to-output path passes through (no later node reads
/// an earlier value), other than the input and the output.
pub fn cut_values(inst: &Instance) -> Vec<ValueId> {
    let nvalues = inst.value_lens.len();
    // min_after[v]: the smallest input index read by any node producing a value > v
    let mut min_after = vec![usize::MAX; nvalues + 1];
    for l in inst.layers.iter().rev() {
        let lo = l.inputs.iter().map(|(v, _)| v.0).min().unwrap_or(usize::MAX);
        min_after[l.output.0 - 1] = min_after[l.output.0].min(lo);
    }
    for v in (0..nvalues.saturating_sub(1)).rev() {
        min_after[v] = min_after[v].min(min_after[v + 1]);
    }
    (1..inst.output_value.0).filter(|&v| min_after[v] >= v).map(ValueId).collect()
}

/// Predicted cost of splitting at `cut`.
pub fn split_cost(inst: &Instance, m: usize, cut: ValueId) -> Cost {
    OpCosts::new(inst, m).split(inst, m, cut)
}

/// Every operator's predicted cost at the two widths a plan applies it
/// to (`n` columns before a cut, `m` rows after), priced once: pricing
/// is O(nnz) for a selection, and the split program prices every cut.
struct OpCosts {
    /// Per operator, in layer order: the value its layer produces, its
    /// cost at width `n` and at width `m`.
    ops: Vec<(ValueId, Cost, Cost)>,
}

impl OpCosts {
    fn new(inst: &Instance, m: usize) -> Self {
        let n = inst.input_len;
        let ops = inst
            .layers
            .iter()
            .flat_map(|l| l.inputs.iter().map(move |(_, op)| (l.output, op)))
            .map(|(out, op)| (out, op_cost(op, n), op_cost(op, m)))
            .collect();
        OpCosts { ops }
    }

    /// [`split_cost`] at `cut`, the operators summed in layer order.
    fn split(&self, inst: &Instance, m: usize, cut: ValueId) -> Cost {
        let c = Cost::gemm(m, inst.value_lens[cut.0], inst.input_len);
        self.ops.iter().fold(c, |c, &(out, at_n, at_m)| c.add(if out <= cut { at_n } else { at_m }))
    }
}

/// The auto choice for `m` rows when it does not depend on the machine:
/// the same under [`Rates::TYPICAL`] and under every corner of a box around
/// it (each rate 4× lower or higher, so any ratio between two rates up to
/// 16× off; machines measured so far sit within 2× of it), and not a chain
/// program (whose
/// bracketing would still follow the rates). `None` when the rates could
/// change the choice, and for networks of more than 512 layers, where
/// pricing nine scenarios costs more than measuring.
pub fn rate_independent(inst: &Instance, m: usize) -> Option<Choice> {
    if inst.layers.len() > 512 {
        return None;
    }
    let t = Rates::TYPICAL;
    let mut scenarios = vec![t];
    for k in 0..8u32 {
        let f = |bit: u32| if k >> bit & 1 == 1 { 4.0 } else { 0.25 };
        scenarios.push(Rates {
            gemm: t.gemm * f(0),
            sparse: t.sparse * f(1),
            bandwidth: t.bandwidth * f(2),
        });
    }
    let priced = Priced::new(inst, m);
    let mut choices = scenarios.iter().map(|r| priced.candidates(r).2);
    let first = choices.next()?;
    (first != Choice::Dp && choices.all(|c| c == first)).then_some(first)
}

/// The candidates' predicted costs (reverse, forward; the chain DP on
/// chains, the best cut split on DAGs) and the chosen one: reverse unless
/// another is predicted at least 5 % faster.
pub fn candidates(
    inst: &Instance,
    m: usize,
    rates: &Rates,
) -> (Vec<(String, Cost, Choice)>, Option<Tree>, Choice) {
    Priced::new(inst, m).candidates(rates)
}

/// What [`candidates`] prices without the rates: the fixed orders, each
/// cut's split and the chain's factors.
struct Priced {
    rev: Cost,
    fwd: Cost,
    /// The chain program's factors, on a chain.
    chain: Option<Vec<Arc<Operator>>>,
    /// Each cut value and its split's cost, on a DAG.
    cuts: Vec<(ValueId, Cost)>,
}

impl Priced {
    fn new(inst: &Instance, m: usize) -> Self {
        let rev = direction_cost(inst, m, Direction::Reverse);
        let fwd = direction_cost(inst, m, Direction::Forward);
        let chain = dp_factors(inst, (0..m).collect());
        let cuts = if chain.is_some() {
            vec![]
        } else {
            let ops = OpCosts::new(inst, m);
            cut_values(inst).into_iter().map(|v| (v, ops.split(inst, m, v))).collect()
        };
        Priced { rev, fwd, chain, cuts }
    }

    /// [`candidates`] under `rates`.
    fn candidates(&self, rates: &Rates) -> (Vec<(String, Cost, Choice)>, Option<Tree>, Choice) {
        let (rev, fwd) = (self.rev, self.fwd);
        let mut cands = vec![
            ("reverse".to_string(), rev, Choice::Reverse),
            ("forward".to_string(), fwd, Choice::Forward),
        ];
        let mut tree = None;
        if let Some(f) = &self.chain {
            let (t, cost) = chain_plan(f, rates);
            tree = Some(t);
            cands.push(("dp".to_string(), cost, Choice::Dp));
        } else if let Some(&(v, cost)) =
            self.cuts.iter().min_by(|a, b| a.1.seconds(rates).total_cmp(&b.1.seconds(rates)))
        {
            cands.push((format!("split@{}", v.0), cost, Choice::Split(v)));
        }
        let base = rev.seconds(rates);
        let best = cands
            .iter()
            .filter(|c| c.1.seconds(rates) < 0.95 * base)
            .min_by(|a, b| a.1.seconds(rates).total_cmp(&b.1.seconds(rates)))
            .map_or(Choice::Reverse, |c| c.2);
        (cands, tree, best)
    }
}

/// Bytes a plan must hold at its peak, estimated: every operator with
/// what its products form and keep (f32 weights, Winograd kernels), the
/// result W, and the two largest blocks alive at once (the block being
/// formed and the one it is formed from), plus, in reverse, the largest
/// product's own scratch (a Winograd convolution's transformed blocks).
pub fn peak_bytes(inst: &Instance, m: usize, choice: Choice) -> usize {
    let f = std::mem::size_of::<f64>();
    let all_ops = || inst.layers.iter().flat_map(|l| l.inputs.iter()).map(|(_, op)| op);
    let ops: usize = all_ops().map(|op| op.bytes() + op.formed_bytes()).sum();
    let scratch = match choice {
        Choice::Reverse | Choice::Split(_) => {
            all_ops().map(|op| op.reverse_scratch(m)).max().unwrap_or(0)
        }
        Choice::Forward | Choice::Dp => 0,
    };
    let n = inst.input_len;
    let widest = |vals: &mut dyn Iterator<Item = usize>| vals.max().unwrap_or(0);
    let blocks = match choice {
        Choice::Reverse => m * widest(&mut inst.value_lens.iter().copied()) * 2,
        Choice::Forward => n * widest(&mut inst.value_lens.iter().copied()) * 2,
        Choice::Dp => {
            // formed products are at most (widest value)² in a chain, bounded by n and m
            let w = widest(&mut inst.value_lens.iter().copied());
            w * n.max(m) * 2
        }
        Choice::Split(v) => {
            let before = widest(&mut inst.value_lens[..=v.0].iter().copied()) * n;
            let after = widest(&mut inst.value_lens[v.0..].iter().copied()) * m;
            before.max(after) * 2 + inst.value_lens[v.0] * n
        }
    };
    ops + (blocks + scratch + m * n) * f
}

/// A stable text description of the candidate plans and their predicted
/// costs (the `nnlin plan` output).
pub fn describe(inst: &Instance, m: usize, rates: &Rates) -> (String, String) {
    let mut s = String::new();
    let _ = writeln!(s, "factors (input side first): {}", inst.layers.len());
    for (k, l) in inst.layers.iter().enumerate() {
        for (v, op) in &l.inputs {
            let _ = writeln!(
                s,
                "  {k:>3} {:<10} {:<9} {:>7} x {:<7} nnz {:>10}  from value {}",
                l.layer_kind,
                op.kind(),
                op.nrows(),
                op.ncols(),
                op.nnz(),
                v.0
            );
        }
    }
    let (cands, tree, best) = candidates(inst, m, rates);
    match &tree {
        Some(t) => {
            let _ = writeln!(s, "chain bracketing: {}", render(t));
        }
        None => {
            let cuts = cut_values(inst);
            let _ =
                writeln!(s, "chain bracketing: none (the network is a DAG); cut values: {cuts:?}");
        }
    }
    let _ =
        writeln!(s, "candidates (multiply-adds: gemm + sparse; bytes moved; predicted seconds):");
    let mut chosen = String::new();
    for (name, c, choice) in &cands {
        if *choice == best {
            chosen.clone_from(name);
        }
        let _ = writeln!(
            s,
            "  {:<8} {:>14.0} + {:>14.0}  {:>8.1} MB moved  {:.3e} s  peak ~{:.1} MB{}",
            name,
            c.gemm,
            c.sparse,
            c.bytes / 1e6,
            c.seconds(rates),
            peak_bytes(inst, m, *choice) as f64 / 1e6,
            if *choice == best { "  <- chosen" } else { "" }
        );
    }
    (s, chosen)
}

/// `((2 1) 0)`-style rendering of a bracketing (factor 0 is the input side).
pub fn render(t: &Tree) -> String {
    match t {
        Tree::Leaf(i) => i.to_string(),
        Tree::Fold(o, i) => format!("[{o}{i}]"),
        Tree::Product(l, r) => format!("({} {})", render(l), render(r)),
    }
}
