//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod onnx;

/// A small seeded generator (LCG) for test weights and inputs.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) / 2.0 * n as f64) as usize % n
    }
    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

/// The synthetic chain 256 → 256 → 2 → 256 → 256 (dense + LeakyReLU, seeded
/// weights) with its input: reverse pushes 256 rows through the wide
/// layers, forward 256 columns, and the split at the 2-unit bottleneck is far
/// cheaper than either. Shared by `tests/strategies.rs` and
/// `benches/strategies.rs`.
pub fn bottleneck_chain() -> (nnlin::ir::Network, Vec<f64>) {
    use nnlin::ir::{Activation, Dense, Expr, Layer, Network, Unary, ValueId};
    let widths = [256usize, 256, 2, 256, 256];
    let mut net = Network::new(vec![1, widths[0]]);
    let mut v = ValueId(0);
    let mut rng = Rng(1);
    for i in 1..widths.len() {
        let (a, b) = (widths[i - 1], widths[i]);
        let weight = (0..a * b).map(|_| rng.next() / 2.0 / (a as f64).sqrt()).collect();
        let bias = Some((0..b).map(|_| rng.next() / 2.0).collect());
        let d = Dense { out_features: b, in_features: a, weight, bias };
        v = net.push(format!("fc{i}"), "Gemm", Layer::Dense(d), vec![v]).expect("valid layer");
        let act = Activation { expr: Expr::unary(Unary::LeakyRelu { alpha: 0.1 }) };
        v = net
            .push(format!("act{i}"), "LeakyRelu", Layer::Activation(act), vec![v])
            .expect("valid layer");
    }
    (net, (0..256).map(|i| (i as f64 * 0.37).sin()).collect())
}
