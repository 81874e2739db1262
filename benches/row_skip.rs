//! The thresholds of the reverse products, measured: below which fraction
//! of nonzero adjoint columns (units a following ReLU or max-pool left
//! active) a convolution sums only the active channels per position
//! (`ConvOp::backward_active`, f64 and f32) or scatters only those columns
//! (`ConvOp::backward_sparse`) instead of the im2col GEMM over all of them
//! (`ConvOp::backward_gemm`, f64 and f32), and a dense layer multiplies only
//! the rows of its weight those columns select (a gather and a smaller GEMM)
//! instead of the full GEMM. 10 adjoint rows (a classifier's full W), one
//! thread; nonzero columns spread over the block as an activation pattern is.
//!
//! `cargo bench -p nnlin --bench row_skip`; the crossovers are in
//! docs/PERFORMANCE.md and set `nnlin_linalg::{CONV_ACTIVE_BELOW,
//! ACTIVE_MIN_TAPS, ACTIVE_MIN_CHANNELS, CONV_SPARSE_BELOW, DENSE_SKIP_BELOW}`.

mod common;

use common::workload_convs;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use faer::{Mat, Par};
use nnlin::Block;
use nnlin::linalg::Weights;

const ROWS: usize = 10;
const FRACTIONS: [usize; 7] = [5, 10, 20, 33, 50, 75, 100];

/// A `ROWS × cols` adjoint whose columns are nonzero with `percent` %
/// probability (a fixed hash, so every run draws the same pattern).
fn adjoint(cols: usize, percent: usize) -> (Block, Vec<usize>) {
    let on = |j: usize| (j.wrapping_mul(2_654_435_761) >> 7) % 100 < percent;
    let g = Block::from_fn(ROWS, cols, |i, j| if on(j) { ((i + j) % 7) as f64 - 3.0 } else { 0.0 });
    (g, (0..cols).filter(|&j| on(j)).collect())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("row_skip");
    group.sample_size(10);
    for (name, op) in workload_convs() {
        for percent in FRACTIONS {
            let (g, nz) = adjoint(op.nrows(), percent);
            let g32: Vec<f32> = g.as_slice().iter().map(|&v| v as f32).collect();
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/active"), percent),
                &g,
                |b, g| b.iter(|| op.backward_active(g.as_slice(), ROWS)),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/active_f32"), percent),
                &g32,
                |b, g| b.iter(|| op.backward_active(g, ROWS)),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/gemm_f32"), percent),
                &g32,
                |b, g| b.iter(|| op.backward_gemm(g, ROWS, Par::Seq)),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/sparse"), percent),
                &(&g, &nz),
                |b, (g, nz)| b.iter(|| op.backward_sparse(g, nz)),
            );
            let g32b = Block::from_col_major(ROWS, op.nrows(), g32.clone());
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/sparse_f32"), percent),
                &(&g32b, &nz),
                |b, (g, nz)| b.iter(|| op.backward_sparse(g, nz)),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/gemm"), percent),
                &g,
                |b, g| b.iter(|| op.backward_gemm(g.as_slice(), ROWS, Par::Seq)),
            );
        }
    }
    for (name, out, inp) in
        [("lenet5_fc1", 120usize, 400usize), ("fc_1024", 1024, 1024), ("vgg_fc", 4096, 4096)]
    {
        let a = Weights::from(Mat::<f64>::from_fn(out, inp, |i, j| {
            ((i * 31 + j * 7) % 13) as f64 - 6.0
        }));
        for percent in FRACTIONS {
            let (g, nz) = adjoint(out, percent);
            // the two paths of the dense reverse product, as Operator::Dense runs them
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/skip"), percent),
                &(&g, &nz),
                |b, (g, nz)| b.iter(|| a.left_mul_rows(g, nz, Par::Seq)),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/full"), percent),
                &g,
                |b, g| b.iter(|| a.left_mul(g, Par::Seq)),
            );
            // and the register tiles, f64 and f32 (against the GEMM in f32)
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/tiled"), percent),
                &g,
                |b, g| b.iter(|| a.left_mul_tiled(g)),
            );
            let g32 = g.cast::<f32>();
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/tiled_f32"), percent),
                &g32,
                |b, g| b.iter(|| a.left_mul_tiled(g)),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/full_f32"), percent),
                &g32,
                |b, g| b.iter(|| a.left_mul(g, Par::Seq)),
            );
        }
    }
    group.finish();
    // a 2 × 2 max-pool's selection after a ReLU, pushed back in one step
    // (`Selection::pushed_through`), f32: LeNet-5's two pools
    let mut group = c.benchmark_group("pool_push");
    group.sample_size(20);
    for (name, ch, side) in [("lenet5_pool1", 6usize, 28usize), ("lenet5_pool2", 16, 10)] {
        let half = side / 2;
        let cols: Vec<usize> = (0..ch * half * half)
            .map(|i| {
                let (c, oy, ox) = (i / (half * half), i / half % half, i % half);
                let pick = (i.wrapping_mul(2_654_435_761) >> 5) % 4;
                c * side * side + (2 * oy + pick / 2) * side + 2 * ox + pick % 2
            })
            .collect();
        let sel = nnlin::linalg::Selection::new(ch * side * side, cols.clone()).expect("valid");
        // 64 activation patterns in turn (a third of the units off), as
        // `explain` sees a new one per instance: with one pattern the
        // branch predictors would learn it
        let ds: Vec<Vec<f64>> = (0..64u64)
            .map(|s| {
                (0..ch * side * side)
                    .map(|j| {
                        let h = (j as u64 ^ s << 20).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                        if h.is_multiple_of(3) { 0.0 } else { 1.0 }
                    })
                    .collect()
            })
            .collect();
        let g = Block::from_fn(ROWS, cols.len(), |i, j| ((i + j) % 7) as f64 - 3.0).cast::<f32>();
        let mut turn = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                turn = (turn + 1) % ds.len();
                sel.pushed_through(&g, &ds[turn])
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
