//! Convolution operators: the explicit CSR Toeplitz matrix against the
//! structured operator (im2col + faer GEMM), on the convolutions of the
//! LeNet-5 fixture (MNIST) and of a CIFAR-shaped ResNet stage, applied to a
//! dense block from the left (reverse accumulation: 1 and 10 rows) and from
//! the right (forward accumulation: 784 columns for LeNet-5). Reports the
//! time per product; `ConvKernel::Auto` is set from these figures
//! (docs/PERFORMANCE.md). The group `strided` times ResNet-50's stem
//! (7×7, stride 2, 224²) in f32, one thread: the forward product, and one
//! adjoint row back through it, dense and with 16 % of its columns
//! nonzero (after the max-pool and ReLU of a top-1 explanation).

mod common;

use common::{conv, strided_conv, workload_convs};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use faer::Par;
use nnlin::Block;
use nnlin::linalg::Operator;

fn bench(c: &mut Criterion) {
    let cases = [
        ("lenet5_conv1", conv(1, 6, 28, 5, 2)),
        ("lenet5_conv2", conv(6, 16, 14, 5, 0)),
        ("resnet_3x3_64ch_32px", conv(64, 64, 32, 3, 1)),
    ];
    let mut group = c.benchmark_group("conv");
    group.sample_size(10);
    for (name, op) in cases {
        let structured = Operator::Conv(op.clone());
        let csr = Operator::Csr(op.to_csr());
        for rows in [1usize, 10] {
            let g = Block::from_fn(rows, op.nrows(), |i, j| ((i + j) % 7) as f64 - 3.0);
            for (kind, o) in [("csr", &csr), ("structured", &structured)] {
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/left_mul{rows}"), kind),
                    &g,
                    |b, g| b.iter(|| o.left_mul(g, Par::Seq)),
                );
            }
        }
        if op.ncols() <= 1200 {
            let t = Block::from_fn(op.ncols(), 784, |i, j| ((i + 3 * j) % 5) as f64 - 2.0);
            for (kind, o) in [("csr", &csr), ("structured", &structured)] {
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/right_mul784"), kind),
                    &t,
                    |b, t| b.iter(|| o.right_mul(t, Par::Seq)),
                );
            }
        }
    }
    group.finish();
    // one instance's forward product, f32 and f64, one thread: the
    // crate's register-tiled kernel against im2col and faer's GEMM
    // (`ConvOp::prefers_direct` is set from these figures)
    let mut group = c.benchmark_group("forward");
    group.sample_size(20);
    let extra = [
        ("onet_conv4", conv(64, 128, 4, 2, 0)),
        ("resnet_3x3_16ch_32px", conv(16, 16, 32, 3, 1)),
        ("resnet_3x3_128ch_16px", conv(128, 128, 16, 3, 1)),
        ("pointwise_64_256_56px", conv(64, 256, 56, 1, 0)),
    ];
    for (name, op) in workload_convs().into_iter().chain(extra) {
        let x: Vec<f64> = (0..op.ncols()).map(|i| ((i * 31) % 17) as f64 / 17.0 - 0.5).collect();
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        group.bench_function(format!("{name}/f32/gemm"), |b| {
            b.iter(|| op.forward_gemm::<f32>(&x32, 1, Par::Seq))
        });
        group.bench_function(format!("{name}/f32/direct"), |b| {
            b.iter(|| op.forward_direct::<f32>(&x32, 1))
        });
        group.bench_function(format!("{name}/f64/gemm"), |b| {
            b.iter(|| op.forward_gemm::<f64>(&x, 1, Par::Seq))
        });
        group.bench_function(format!("{name}/f64/direct"), |b| {
            b.iter(|| op.forward_direct::<f64>(&x, 1))
        });
    }
    group.finish();
    // the last two stages of ResNet-50 at 224²: one band of Winograd
    // blocks, one f32 adjoint row (a top-1 explanation), 1 and 2 threads
    let mut group = c.benchmark_group("winograd_threads");
    group.sample_size(20);
    for (name, op) in
        [("3x3_256ch_14px", conv(256, 256, 14, 3, 1)), ("3x3_512ch_7px", conv(512, 512, 7, 3, 1))]
    {
        let o = Operator::Conv(op.clone());
        let g = Block::from_fn(1, op.nrows(), |i, j| ((i + j) % 7) as f64 - 3.0).cast::<f32>();
        for threads in [1usize, 2] {
            let par = if threads > 1 { Par::rayon(threads) } else { Par::Seq };
            group.bench_with_input(BenchmarkId::new(name, threads), &g, |b, g| {
                b.iter(|| o.left_mul(g, par))
            });
        }
    }
    group.finish();
    let mut group = c.benchmark_group("strided");
    group.sample_size(20);
    let stem = Operator::Conv(strided_conv(3, 64, 224, 7, 2, 3));
    let x: Vec<f64> = (0..stem.ncols()).map(|i| ((i * 31) % 17) as f64 / 17.0 - 0.5).collect();
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    group.bench_function("stem_7x7_s2/forward", |b| b.iter(|| stem.apply_t::<f32>(&x32, Par::Seq)));
    for (kind, percent) in [("dense", 100usize), ("active16", 16)] {
        let on = |j: usize| (j.wrapping_mul(2_654_435_761) >> 7) % 100 < percent;
        let g =
            Block::from_fn(1, stem.nrows(), |_, j| if on(j) { (j % 7) as f64 - 3.0 } else { 0.0 })
                .cast::<f32>();
        group.bench_with_input(BenchmarkId::new("stem_7x7_s2/left_mul1", kind), &g, |b, g| {
            b.iter(|| stem.left_mul(g, Par::Seq))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
