//! Random CNN-, ResNet- and DenseNet-shaped graphs (conv, batch-norm
//! diagonals, activations, residual adds with identity or projection
//! shortcuts, channel concatenation, max/average pooling, flatten, dense): in
//! f64, W·x + b equals F(x) and, in tangent mode, W equals the dual-number
//! Jacobian to 1e-10, in both directions and with both conv representations.

use nnlin::ir::{
    Activation, Add, Affine, Concat, Conv, Dense, Expr, Layer, Network, Pool, PoolKind, Reshape,
    Unary, ValueId, Window, reference,
};
use nnlin::{Compiler, ConvKernel, Direction, Mode, accumulate};
use proptest::prelude::*;

mod common;
use common::Rng;

struct Builder {
    net: Network,
    rng: Rng,
    smooth: bool,
    count: usize,
}

impl Builder {
    fn name(&mut self, p: &str) -> String {
        self.count += 1;
        format!("{p}{}", self.count)
    }
    fn shape(&self, v: ValueId) -> Vec<usize> {
        self.net.shape(v).to_vec()
    }
    fn conv(&mut self, v: ValueId, c_out: usize, k: usize, stride: usize) -> ValueId {
        let s = self.shape(v);
        let pad = k / 2;
        let window = Window::new(
            (s[2], s[3]),
            (k, k),
            (stride, stride),
            (1, 1),
            (pad, pad, pad, pad),
            false,
        )
        .unwrap();
        let gain = 1.5 / ((s[1] * k * k) as f64).sqrt();
        let conv = Conv {
            window,
            c_in: s[1],
            c_out,
            groups: 1,
            weight: std::sync::Arc::new(self.rng.vec(c_out * s[1] * k * k, gain)),
            bias: (self.rng.next() > 0.0).then(|| self.rng.vec(c_out, 0.3)),
            one_d: false,
        };
        let name = self.name("conv");
        self.net.push(name, "Conv", Layer::Conv(conv), vec![v]).unwrap()
    }
    fn bn(&mut self, v: ValueId) -> ValueId {
        let n = self.net.numel(v);
        let s = self.shape(v);
        // one scale and shift per channel, read by its `spatial` positions
        let spatial = n / s[1];
        let scale: Vec<f64> = (0..s[1]).map(|_| 1.0 + 0.3 * self.rng.next()).collect();
        let shift: Vec<f64> = (0..s[1]).map(|_| 0.2 * self.rng.next()).collect();
        let name = self.name("bn");
        let layer = Layer::Affine(Affine { scale, shift, spatial });
        self.net.push(name, "BatchNormalization", layer, vec![v]).unwrap()
    }
    fn act(&mut self, v: ValueId) -> ValueId {
        let f = if self.smooth {
            [Unary::Gelu, Unary::Elu { alpha: 0.7 }, Unary::Tanh, Unary::Softplus, Unary::HardSwish]
                [self.rng.below(5)]
            .clone()
        } else {
            [Unary::Relu, Unary::LeakyRelu { alpha: 0.05 }, Unary::Clip { min: 0.0, max: 6.0 }]
                [self.rng.below(3)]
            .clone()
        };
        let name = self.name("act");
        self.net
            .push(name, "act", Layer::Activation(Activation { expr: Expr::unary(f) }), vec![v])
            .unwrap()
    }
    fn residual(&mut self, x: ValueId) -> ValueId {
        let s = self.shape(x);
        let stride = if s[2] >= 4 && self.rng.next() > 0.3 { 2 } else { 1 };
        let c_out = s[1] + self.rng.below(3);
        let y = self.conv(x, c_out, 3, stride);
        let y = self.bn(y);
        let y = self.act(y);
        let y = self.conv(y, c_out, 3, 1);
        let y = self.bn(y);
        let short = if stride == 1 && c_out == s[1] {
            x
        } else {
            let p = self.conv(x, c_out, 1, stride);
            self.bn(p)
        };
        let name = self.name("add");
        let sum = self
            .net
            .push(name, "Add", Layer::Add(Add { coeffs: vec![1.0, 1.0] }), vec![y, short])
            .unwrap();
        self.act(sum)
    }
    fn dense_layer(&mut self, x: ValueId) -> ValueId {
        let y = self.bn(x);
        let y = self.act(y);
        let growth = 1 + self.rng.below(3);
        let y = self.conv(y, growth, 3, 1);
        let name = self.name("cat");
        self.net.push(name, "Concat", Layer::Concat(Concat { axis: 1 }), vec![x, y]).unwrap()
    }
    fn pool(&mut self, x: ValueId) -> ValueId {
        let s = self.shape(x);
        if s[2] < 2 || s[3] < 2 {
            return x;
        }
        let kind = if self.rng.next() > 0.0 {
            PoolKind::Max
        } else {
            PoolKind::Average { count_include_pad: false }
        };
        let window =
            Window::new((s[2], s[3]), (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), false).unwrap();
        let name = self.name("pool");
        self.net
            .push(
                name,
                "Pool",
                Layer::Pool(Pool { window, channels: s[1], kind, one_d: false }),
                vec![x],
            )
            .unwrap()
    }
}

fn build(seed: u64, smooth: bool) -> (Network, Vec<f64>) {
    let mut rng = Rng(seed);
    let c0 = 1 + rng.below(3);
    let (h, w) = (4 + rng.below(5), 4 + rng.below(5));
    let mut b = Builder { net: Network::new(vec![1, c0, h, w]), rng, smooth, count: 0 };
    let c1 = 2 + b.rng.below(3);
    let mut v = b.conv(ValueId(0), c1, 3, 1);
    v = b.bn(v);
    v = b.act(v);
    for _ in 0..1 + b.rng.below(3) {
        v = match b.rng.below(3) {
            0 => b.residual(v),
            1 => b.dense_layer(v),
            _ => b.pool(v),
        };
    }
    let n = b.net.numel(v);
    v = b
        .net
        .push("flatten", "Flatten", Layer::Reshape(Reshape { shape: vec![1, n] }), vec![v])
        .unwrap();
    let outs = 1 + b.rng.below(5);
    let d = Dense {
        out_features: outs,
        in_features: n,
        weight: b.rng.vec(outs * n, 1.0 / (n as f64).sqrt()),
        bias: Some(b.rng.vec(outs, 0.1)),
    };
    b.net.push("fc", "Gemm", Layer::Dense(d), vec![v]).unwrap();
    let x = (0..b.net.input_len()).map(|_| b.rng.next()).collect();
    (b.net, x)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_cnn_graphs_are_exact(seed in any::<u64>(), smooth in any::<bool>()) {
        let (net, x) = build(seed, smooth);
        let (f, jac) = reference::jacobian(&net, &x);
        let n = x.len();
        let jscale = jac.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
        let rows: Vec<usize> = (0..f.len()).collect();
        for kernel in [ConvKernel::Csr, ConvKernel::Structured] {
            let compiler = Compiler::with_conv_kernel(&net, kernel);
            for mode in [Mode::Tangent, Mode::Secant] {
                let inst = compiler.instance(&x, mode).unwrap();
                let (wr, br) = accumulate(&inst, &rows, Direction::Reverse, faer::Par::Seq).unwrap();
                let (wf, bf) = accumulate(&inst, &rows, Direction::Forward, faer::Par::Seq).unwrap();
                // secant slopes σ(z)/z can be large (softplus near 0): compare
                // the two directions relative to W's own scale
                let wscale = (0..wr.nrows())
                    .flat_map(|i| (0..wr.ncols()).map(move |j| (i, j)))
                    .fold(1.0f64, |a, (i, j)| a.max(wr[(i, j)].abs()));
                for i in 0..f.len() {
                    let mut wx = br[i];
                    let mut scale = br[i].abs() + f[i].abs();
                    for j in 0..n {
                        wx += wr[(i, j)] * x[j];
                        scale += (wr[(i, j)] * x[j]).abs();
                        prop_assert!((wr[(i, j)] - wf[(i, j)]).abs() <= 1e-10 * wscale);
                        if mode == Mode::Tangent {
                            prop_assert!((wr[(i, j)] - jac[i * n + j]).abs() <= 1e-10 * jscale,
                                "W[{i},{j}] = {} vs Jacobian {}", wr[(i, j)], jac[i * n + j]);
                        }
                    }
                    prop_assert!((wx - f[i]).abs() <= 1e-10 * scale, "W·x + b = {wx} vs F = {}", f[i]);
                    prop_assert!((br[i] - bf[i]).abs() <= 1e-10 * scale);
                }
            }
        }
    }
}

/// The largest `|a − b|` over two instances' `W` and `b`, and the largest
/// `|W|`, `|b|` of `a`.
fn gap(a: &(nnlin::Block, Vec<f64>), b: &(nnlin::Block, Vec<f64>)) -> (f64, f64) {
    let (wa, wb) = (a.0.as_slice(), b.0.as_slice());
    let diff = wa.iter().zip(wb).chain(a.1.iter().zip(&b.1)).map(|(x, y)| (x - y).abs());
    let scale = wa.iter().chain(&a.1).fold(1e-300f64, |s, v| s.max(v.abs()));
    (diff.fold(0.0, f64::max), scale)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A batch of instances through one stacked reverse pass gives each
    /// instance's W and b as its own reverse pass does, within rounding
    /// (`8·depth·ε` of the largest entry), in f64 and f32, both modes and
    /// both conv representations; each instance selects its own rows.
    #[test]
    fn batched_reverse_matches_one_at_a_time(
        seed in any::<u64>(),
        smooth in any::<bool>(),
        width in 2usize..6,
    ) {
        use nnlin::batch::accumulate_reverse_batch;
        use nnlin::plan::Plan;
        let (net, x) = build(seed, smooth);
        let mut rng = Rng(seed ^ 0x9e37_79b9);
        let xs: Vec<Vec<f64>> = (0..width)
            .map(|b| if b == 0 { x.clone() } else { x.iter().map(|_| rng.next()).collect() })
            .collect();
        let outs = net.output_len();
        let m = 1 + rng.below(outs);
        let rows: Vec<Vec<usize>> = (0..width)
            .map(|_| (0..m).map(|_| rng.below(outs)).collect())
            .collect();
        let rowrefs: Vec<&[usize]> = rows.iter().map(Vec::as_slice).collect();
        let depth = net.nodes().len() as f64;
        for kernel in [ConvKernel::Csr, ConvKernel::Structured] {
            let compiler = Compiler::with_conv_kernel(&net, kernel);
            for mode in [Mode::Tangent, Mode::Secant] {
                let insts: Vec<_> = xs.iter().map(|x| compiler.instance(x, mode).unwrap()).collect();
                let refs: Vec<&nnlin::Instance> = insts.iter().collect();
                let alone = |prec32: bool| -> Vec<(nnlin::Block, Vec<f64>)> {
                    insts.iter().zip(&rows).map(|(inst, r)| {
                        let (w, b, _) = if prec32 {
                            Plan::Reverse.execute::<f32>(inst, r, faer::Par::Seq)
                        } else {
                            Plan::Reverse.execute::<f64>(inst, r, faer::Par::Seq)
                        }.unwrap();
                        (w, b)
                    }).collect()
                };
                let b64 = accumulate_reverse_batch::<f64>(&refs, &rowrefs, faer::Par::Seq).unwrap();
                for (one, got) in alone(false).iter().zip(&b64) {
                    let (d, s) = gap(one, got);
                    prop_assert!(d <= 8.0 * depth * f64::EPSILON * s, "f64: {d} against {s}");
                }
                let b32 = accumulate_reverse_batch::<f32>(&refs, &rowrefs, faer::Par::Seq).unwrap();
                for (one, (w, b)) in alone(true).iter().zip(b32) {
                    let got = (w.cast::<f64>(), b.iter().map(|&v| f64::from(v)).collect());
                    let (d, s) = gap(one, &got);
                    prop_assert!(d <= 8.0 * depth * f64::from(f32::EPSILON) * s, "f32: {d} against {s}");
                }
            }
        }
    }
}
