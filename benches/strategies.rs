//! Composition strategies (reverse, forward, chain DP, dense baseline, auto)
//! on the fixture models — LeNet-5 and LeNet-300-100 on MNIST test digits,
//! the small ResNet and DenseNet on Fashion-MNIST — and on a synthetic chain
//! 256-256-2-256-256 with a 2-unit bottleneck. Each figure is the time to
//! compile one instance and form its full W (10 × 784, or 256 × 256) and b,
//! one thread. The dense baseline is run where its n × n-sized factors are
//! affordable (LeNet-300-100, LeNet-5, the chain). See docs/PERFORMANCE.md.

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nnlin::{Model, Options, Strategy};

#[path = "../tests/common/mod.rs"]
mod common;

fn idx_images(file: &str, k: usize) -> Vec<f64> {
    let gz =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file)).expect("test data");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut raw)
        .expect("gzip");
    raw[16 + k * 784..16 + (k + 1) * 784].iter().map(|&v| f64::from(v) / 255.0).collect()
}

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let load = |f: &str| Model::from_onnx_file(root.join(f)).expect("fixture");
    let mnist = idx_images("fixtures/data/mnist/t10k-images-idx3-ubyte.gz", 0);
    let fashion = idx_images("fixtures/data/fashion/t10k-images-idx3-ubyte.gz", 0);
    let (net, xc) = common::bottleneck_chain();
    let chain = Model::from_network("bottleneck", net);
    let cases: Vec<(&str, Model, Vec<f64>, bool)> = vec![
        ("lenet300", load("fixtures/cnn/lenet300.onnx"), mnist.clone(), true),
        ("lenet5", load("fixtures/cnn/lenet5.onnx"), mnist, true),
        ("resnet_small", load("fixtures/cnn/resnet_small.onnx"), fashion.clone(), false),
        ("densenet_small", load("fixtures/cnn/densenet_small.onnx"), fashion, false),
        ("bottleneck_chain", chain, xc, true),
    ];
    // this machine's kernel rates, measured once, for the auto and dp plans
    let rates = nnlin::plan::Rates::measure();
    let mut group = c.benchmark_group("strategy");
    group.sample_size(10);
    for (name, model, x, dense_ok) in &cases {
        let is_chain = model.network().chain().is_some();
        let mut strategies = vec![Strategy::Reverse, Strategy::Forward, Strategy::Auto];
        if is_chain {
            strategies.push(Strategy::Dp);
        }
        if *dense_ok {
            strategies.push(Strategy::Dense);
        }
        for s in strategies {
            let opts = Options::default().with_strategy(s).with_rates(rates);
            group.bench_with_input(
                BenchmarkId::new(*name, format!("{s:?}").to_lowercase()),
                x,
                |b, x| b.iter(|| model.linearize(x, &opts).expect("linearize")),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
