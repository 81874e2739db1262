//! Linear regions (Lemma 1) on random ReLU / LeakyReLU / PReLU MLPs and small
//! CNNs with max-pooling: the radii equal an independent computation from the
//! reference interpreter's dual numbers (every value's input gradient, the
//! boundaries enumerated here from the IR), to 1e-6 relative; sampled points
//! inside the ball keep the pattern and satisfy F = W·x' + b; the point just
//! past the binding boundary changes the pattern.

use nnlin::ir::{
    Activation, Binary, Conv, Dense, Dual, Expr, ExprNode, Layer, Network, Pool, PoolKind, Reshape,
    Unary, ValueId, Window, reference,
};
use nnlin::{Compiler, Mode};
use proptest::prelude::*;

mod common;
use common::Rng;

fn act(kind: usize, n: usize, rng: &mut Rng) -> Expr {
    match kind % 3 {
        0 => Expr::unary(Unary::Relu),
        1 => Expr::unary(Unary::LeakyRelu { alpha: 0.1 }),
        _ => {
            let mut e = Expr::var();
            let s = e.push_const(rng.vec(n, 0.3));
            e.push(ExprNode::Binary(Binary::PRelu, 0, s));
            e
        }
    }
}

fn mlp(seed: u64, n: usize, widths: &[usize], kind: usize) -> (Network, Vec<f64>) {
    let mut rng = Rng(seed);
    let mut net = Network::new(vec![1, n]);
    let (mut v, mut w_in) = (ValueId(0), n);
    for (i, &w) in widths.iter().enumerate() {
        let d = Dense {
            out_features: w,
            in_features: w_in,
            weight: rng.vec(w * w_in, 1.5 / (w_in as f64).sqrt()),
            bias: Some(rng.vec(w, 0.5)),
        };
        v = net.push(format!("fc{i}"), "Gemm", Layer::Dense(d), vec![v]).unwrap();
        let e = act(kind + i, w, &mut rng);
        v = net
            .push(format!("act{i}"), "act", Layer::Activation(Activation { expr: e }), vec![v])
            .unwrap();
        w_in = w;
    }
    let d = Dense {
        out_features: 3,
        in_features: w_in,
        weight: rng.vec(3 * w_in, 1.0),
        bias: Some(rng.vec(3, 0.1)),
    };
    net.push("out", "Gemm", Layer::Dense(d), vec![v]).unwrap();
    let x = rng.vec(n, 1.0);
    (net, x)
}

fn cnn(seed: u64, kind: usize) -> (Network, Vec<f64>) {
    let mut rng = Rng(seed);
    let (c, hw) = (2, 6);
    let mut net = Network::new(vec![1, c, hw, hw]);
    let window = Window::new((hw, hw), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), false).unwrap();
    let conv = Conv {
        window,
        c_in: c,
        c_out: 3,
        groups: 1,
        weight: std::sync::Arc::new(rng.vec(3 * c * 9, 0.5)),
        bias: Some(rng.vec(3, 0.3)),
        one_d: false,
    };
    let v = net.push("conv", "Conv", Layer::Conv(conv), vec![ValueId(0)]).unwrap();
    let e = act(kind, 3 * hw * hw, &mut rng);
    let v = net.push("act", "act", Layer::Activation(Activation { expr: e }), vec![v]).unwrap();
    let window = Window::new((hw, hw), (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), false).unwrap();
    let v = net
        .push(
            "pool",
            "MaxPool",
            Layer::Pool(Pool { window, channels: 3, kind: PoolKind::Max, one_d: false }),
            vec![v],
        )
        .unwrap();
    let v = net
        .push("flat", "Flatten", Layer::Reshape(Reshape { shape: vec![1, 27] }), vec![v])
        .unwrap();
    let d = Dense {
        out_features: 2,
        in_features: 27,
        weight: rng.vec(54, 0.3),
        bias: Some(rng.vec(2, 0.1)),
    };
    net.push("out", "Gemm", Layer::Dense(d), vec![v]).unwrap();
    let x = rng.vec(c * hw * hw, 1.0);
    (net, x)
}

/// Independent radii: every value and its input gradient by n dual passes,
/// boundaries enumerated from the IR: activation units at 0, max-pool
/// selected-vs-other pairs (skipping equal gradients).
fn independent(net: &Network, x: &[f64]) -> (f64, f64) {
    let n = x.len();
    let vals = reference::forward_values::<f64>(net, x);
    let grads: Vec<Vec<Vec<f64>>> = (0..n)
        .map(|j| {
            let xd: Vec<Dual> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| Dual::new(v, f64::from(u8::from(i == j))))
                .collect();
            reference::forward_values(net, &xd)
                .into_iter()
                .map(|v| v.into_iter().map(|d| d.d).collect())
                .collect()
        })
        .collect();
    let grad = |v: usize, i: usize| -> Vec<f64> { (0..n).map(|j| grads[j][v][i]).collect() };
    let (mut r2, mut r1) = (f64::INFINITY, f64::INFINITY);
    let mut consider = |s: f64, g: Vec<f64>| {
        let l2 = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        let l1 = g.iter().map(|v| v.abs()).sum::<f64>();
        if l2 > 0.0 {
            r2 = r2.min(s.abs() / l2);
            r1 = r1.min(s.abs() / l1);
        }
    };
    for node in net.nodes() {
        let v = node.inputs[0].0;
        match &node.layer {
            Layer::Activation(_) => {
                for i in 0..vals[v].len() {
                    consider(vals[v][i], grad(v, i));
                }
            }
            Layer::Pool(p) => {
                let w = &p.window;
                for ch in 0..p.channels {
                    for oy in 0..w.oh {
                        for ox in 0..w.ow {
                            let idx: Vec<usize> = (0..w.kh)
                                .flat_map(|ky| (0..w.kw).map(move |kx| (ky, kx)))
                                .map(|(ky, kx)| {
                                    (ch * w.ih + oy * w.sh + ky) * w.iw + ox * w.sw + kx
                                })
                                .collect();
                            // argmax, first on ties
                            let s = *idx
                                .iter()
                                .reduce(|a, b| if vals[v][*b] > vals[v][*a] { b } else { a })
                                .unwrap();
                            for &j in idx.iter().filter(|&&j| j != s) {
                                let g: Vec<f64> =
                                    grad(v, s).iter().zip(grad(v, j)).map(|(a, b)| a - b).collect();
                                consider(vals[v][s] - vals[v][j], g);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (r2, r1)
}

fn check(net: &Network, x: &[f64]) -> Result<(), TestCaseError> {
    let inst = Compiler::new(net).instance(x, Mode::Tangent).unwrap();
    let r = nnlin::region::compute(net, &inst, x, None, 5).unwrap();
    let (r2, r1) = independent(net, x);
    prop_assert_eq!(r.units_at_kink, 0);
    prop_assert!((r.radius_l2 - r2).abs() <= 1e-6 * r2, "l2 {} vs {}", r.radius_l2, r2);
    prop_assert!((r.radius_linf - r1).abs() <= 1e-6 * r1, "linf {} vs {}", r.radius_linf, r1);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mlp_radius_matches_independent_computation(seed in any::<u64>(), n in 1usize..12, widths in prop::collection::vec(1usize..12, 1..4), kind in 0usize..3) {
        let (net, x) = mlp(seed, n, &widths, kind);
        check(&net, &x)?;
    }

    #[test]
    fn cnn_radius_matches_independent_computation(seed in any::<u64>(), kind in 0usize..3) {
        let (net, x) = cnn(seed, kind);
        check(&net, &x)?;
    }
}

#[test]
fn sampled_points_keep_the_pattern_and_the_binding_boundary_is_tight() {
    for seed in 0..12u64 {
        let (net, x) = if seed % 2 == 0 {
            mlp(seed, 6, &[8, 5], seed as usize)
        } else {
            cnn(seed, seed as usize)
        };
        let model = nnlin::Model::from_network("random", net);
        let r = model.region(&x, None, 7).unwrap();
        let v = model.verify_region(&x, &r, 40, seed).unwrap();
        assert_eq!(v.kept_pattern, 40, "seed {seed}: {v:?}");
        assert_eq!(v.exact, 40, "seed {seed}: {v:?}");
        assert_eq!(v.beyond_changes_pattern, Some(true), "seed {seed}");
    }
}

/// `region` works on every piecewise-linear fixture; smooth ones are
/// refused with a clear reason and get a linearization-error sweep whose
/// tangent error shrinks quadratically.
#[test]
fn region_on_every_fixture() {
    use ndarray::ArrayD;
    use ndarray_npy::ReadNpyExt;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let iris = ArrayD::<f64>::read_npy(std::fs::File::open(root.join("iris/inputs.npy")).unwrap())
        .unwrap();
    let x_iris: Vec<f64> = iris.iter().take(4).copied().collect();
    for name in [
        "relu",
        "leaky_relu",
        "prelu",
        "relu6",
        "hardtanh",
        "hardsigmoid",
        "relu_matmul",
        "relu_dynamo",
    ] {
        let m = nnlin::Model::from_onnx_file(root.join(format!("iris/{name}.onnx"))).unwrap();
        let r = m.region(&x_iris, None, 64).unwrap();
        assert!(r.radius_l2 > 0.0 && r.radius_l2.is_finite(), "{name}: {}", r.radius_l2);
        let v = m.verify_region(&x_iris, &r, 20, 1).unwrap();
        assert_eq!((v.kept_pattern, v.exact), (20, 20), "{name}: {v:?}");
    }
    for name in [
        "lenet5",
        "lenet300",
        "lenet5_bn",
        "resnet_small",
        "densenet_small",
        "resnet_small_nobn",
        "densenet_small_nobn",
    ] {
        let xs = ArrayD::<f64>::read_npy(
            std::fs::File::open(root.join(format!("cnn/{name}.inputs.npy"))).unwrap(),
        )
        .unwrap();
        let x: Vec<f64> = xs.iter().take(784).copied().collect();
        let m = nnlin::Model::from_onnx_file(root.join(format!("cnn/{name}.onnx"))).unwrap();
        let r = m.region(&x, Some((0.0, 1.0)), 256).unwrap();
        assert!(r.radius_l2 >= 0.0 && r.radius_l2_excluding_kinks >= r.radius_l2, "{name}");
        assert!(r.boundaries > 0, "{name}");
    }
    let m = nnlin::Model::from_onnx_file(root.join("iris/gelu.onnx")).unwrap();
    let err = m.region(&x_iris, None, 64).unwrap_err().to_string();
    assert!(err.contains("smooth"), "{err}");
    let sweep = m.linearization_sweep(&x_iris, &[1e-3, 1e-2], 3).unwrap();
    let ratio = sweep[1].tangent_error / sweep[0].tangent_error;
    assert!(
        (50.0..200.0).contains(&ratio),
        "tangent error should grow quadratically: ratio {ratio}"
    );
}
