//! One property test per operator: a network holding that layer, with random
//! shapes, strides, pads, dilations, groups and `ceil_mode`, compiled at a
//! random input and compared with the reference interpreter: the compiled
//! forward pass equals F(x), and W equals the dual-number Jacobian, in both
//! accumulation directions and with convolutions both as explicit CSR and as
//! structured operators.

use nnlin::ir::{
    Activation, Affine, Concat, Conv, Expr, Layer, Lrn, MatMul, Network, Pad, PadMode, Pool,
    PoolKind, Product, Select, Softmax, Transpose, Unary, ValueId, Window, reference,
};
use nnlin::{Compiler, ConvKernel, Direction, Mode, accumulate};
use proptest::prelude::*;

mod common;
use common::Rng;

/// Checks the compiled network against the reference at `x`.
fn check(net: &Network, x: &[f64], mode: Mode) -> Result<(), TestCaseError> {
    let (f, jac) = reference::jacobian(net, x);
    let n = x.len();
    let fscale = f.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
    let jscale = jac.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
    let rows: Vec<usize> = (0..f.len()).collect();
    for kernel in [ConvKernel::Csr, ConvKernel::Structured] {
        let inst = Compiler::with_conv_kernel(net, kernel).instance(x, mode).unwrap();
        for (a, b) in inst.output.iter().zip(&f) {
            prop_assert!((a - b).abs() <= 1e-12 * fscale, "compiled F {a} vs reference {b}");
        }
        for dir in [Direction::Reverse, Direction::Forward] {
            let (w, b) = accumulate(&inst, &rows, dir, faer::Par::Seq).unwrap();
            for i in 0..f.len() {
                let mut wx = b[i];
                for j in 0..n {
                    if mode == Mode::Tangent {
                        let (wij, r) = (w[(i, j)], jac[i * n + j]);
                        prop_assert!(
                            (wij - r).abs() <= 1e-12 * jscale,
                            "{kernel:?} {dir:?} W[{i},{j}] = {wij}, Jacobian {r}"
                        );
                    }
                    wx += w[(i, j)] * x[j];
                }
                prop_assert!(
                    (wx - f[i]).abs() <= 1e-11 * fscale.max(1.0),
                    "{kernel:?} {dir:?} W·x + b = {wx}, F = {}",
                    f[i]
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct ConvProblem {
    c_in_g: usize,
    groups: usize,
    c_out_g: usize,
    hw: (usize, usize),
    k: (usize, usize),
    s: (usize, usize),
    d: (usize, usize),
    p: (usize, usize, usize, usize),
    one_d: bool,
    bias: bool,
    seed: u64,
}

fn conv_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..4, 1usize..4, 1usize..4),
        ((1usize..10, 1usize..10), (1usize..5, 1usize..5)),
        ((1usize..4, 1usize..4), (1usize..4, 1usize..4)),
        (0usize..4, 0usize..4, 0usize..4, 0usize..4),
        (any::<bool>(), any::<bool>(), any::<u64>()),
    )
        .prop_map(|((c_in_g, groups, c_out_g), (hw, k), (s, d), p, (one_d, bias, seed))| {
            ConvProblem { c_in_g, groups, c_out_g, hw, k, s, d, p, one_d, bias, seed }
        })
}

impl ConvProblem {
    fn network(&self) -> Option<(Network, Vec<f64>)> {
        let (mut hw, mut k, mut s, mut d, mut p) = (self.hw, self.k, self.s, self.d, self.p);
        if self.one_d {
            (hw.0, k.0, s.0, d.0, p.0, p.2) = (1, 1, 1, 1, 0, 0);
        }
        let window = Window::new(hw, k, s, d, p, false)?;
        let mut rng = Rng(self.seed);
        let (c_in, c_out) = (self.c_in_g * self.groups, self.c_out_g * self.groups);
        let conv = Conv {
            window,
            c_in,
            c_out,
            groups: self.groups,
            weight: std::sync::Arc::new(rng.vec(c_out * self.c_in_g * k.0 * k.1, 1.0)),
            bias: self.bias.then(|| rng.vec(c_out, 1.0)),
            one_d: self.one_d,
        };
        let shape = if self.one_d { vec![1, c_in, hw.1] } else { vec![1, c_in, hw.0, hw.1] };
        let mut net = Network::new(shape);
        net.push("conv", "Conv", Layer::Conv(conv), vec![ValueId(0)]).ok()?;
        let x = rng.vec(net.input_len(), 1.0);
        Some((net, x))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn conv_matches_reference(p in conv_problem()) {
        let Some((net, x)) = p.network() else { return Ok(()) };
        check(&net, &x, Mode::Tangent)?;
    }

    #[test]
    fn pool_matches_reference(
        c in 1usize..4, hw in (1usize..10, 1usize..10), k in (1usize..4, 1usize..4),
        s in (1usize..4, 1usize..4), d in (1usize..3, 1usize..3), p in (0usize..2, 0usize..2, 0usize..2, 0usize..2),
        kind in 0usize..3, ceil in any::<bool>(), ties in any::<bool>(), seed in any::<u64>(),
    ) {
        let p = (p.0.min(k.0 / 2), p.1.min(k.1 / 2), p.2.min(k.0 / 2), p.3.min(k.1 / 2));
        let Some(window) = Window::new(hw, k, s, d, p, ceil) else { return Ok(()) };
        let fully_padded = (0..window.oh).any(|oy| (0..window.ow).any(|ox| window.taps_in_input(oy, ox) == 0));
        prop_assume!(!fully_padded);
        let kind = match kind {
            0 => PoolKind::Max,
            1 => PoolKind::Average { count_include_pad: true },
            _ => PoolKind::Average { count_include_pad: false },
        };
        let mut net = Network::new(vec![1, c, hw.0, hw.1]);
        net.push("pool", "Pool", Layer::Pool(Pool { window, channels: c, kind, one_d: false }), vec![ValueId(0)]).unwrap();
        let mut rng = Rng(seed);
        // with `ties`, inputs take few distinct values so windows tie often
        let x: Vec<f64> = (0..net.input_len()).map(|_| if ties { (rng.next() * 2.0).round() } else { rng.next() }).collect();
        check(&net, &x, Mode::Tangent)?;
    }

    #[test]
    fn pad_and_transpose_match_reference(
        shape in prop::collection::vec(1usize..5, 1..5), pads in prop::collection::vec((0usize..3, 0usize..3), 4),
        mode in 0usize..3, perm_seed in any::<u64>(), seed in any::<u64>(),
    ) {
        let rank = shape.len();
        let mut rng = Rng(seed);
        let (begin, end): (Vec<usize>, Vec<usize>) = pads[..rank].iter().copied().unzip();
        let mode = match mode { 0 => PadMode::Constant(rng.next()), 1 => PadMode::Edge, _ => PadMode::Reflect };
        let (begin, end) = if mode == PadMode::Reflect {
            (begin.iter().zip(&shape).map(|(b, d)| *b.min(&(d - 1))).collect(), end.iter().zip(&shape).map(|(e, d)| *e.min(&(d - 1))).collect())
        } else { (begin, end) };
        let mut net = Network::new(shape.clone());
        let v = net.push("pad", "Pad", Layer::Pad(Pad { begin, end, mode }), vec![ValueId(0)]).unwrap();
        // a random permutation of the padded tensor
        let mut perm: Vec<usize> = (0..rank).collect();
        let mut s = perm_seed;
        for i in (1..rank).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            perm.swap(i, (s >> 33) as usize % (i + 1));
        }
        net.push("transpose", "Transpose", Layer::Transpose(Transpose { perm }), vec![v]).unwrap();
        let x = rng.vec(net.input_len(), 1.0);
        check(&net, &x, Mode::Tangent)?;
    }

    #[test]
    fn concat_and_add_over_branches_match_reference(c in 1usize..4, hw in 1usize..5, axis in 1usize..4, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let mut net = Network::new(vec![1, c, hw, hw]);
        let n = net.input_len();
        // one scale and shift per channel, as a batch-norm's
        let a = net.push("affine", "Mul", Layer::Affine(Affine { scale: rng.vec(c, 1.0), shift: rng.vec(c, 1.0), spatial: hw * hw }), vec![ValueId(0)]).unwrap();
        let r = net.push("tanh", "Tanh", Layer::Activation(Activation { expr: Expr::unary(Unary::Tanh) }), vec![a]).unwrap();
        let s = net.push("add", "Add", Layer::Add(nnlin::ir::Add { coeffs: vec![1.0, -0.5] }), vec![r, ValueId(0)]).unwrap();
        net.push("concat", "Concat", Layer::Concat(Concat { axis }), vec![ValueId(0), s, r]).unwrap();
        let x = rng.vec(n, 1.0);
        check(&net, &x, Mode::Tangent)?;
        check(&net, &x, Mode::Secant)?;
    }

    #[test]
    fn lrn_matches_reference(c in 1usize..7, hw in 1usize..4, size in 1usize..6, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let lrn = Lrn { size, alpha: 1e-2 + 0.5 * rng.next().abs(), beta: 0.75 + 0.2 * rng.next(), bias: 1.0 + rng.next().abs() };
        let mut net = Network::new(vec![1, c, hw, hw]);
        net.push("lrn", "LRN", Layer::Lrn(lrn), vec![ValueId(0)]).unwrap();
        let x = rng.vec(net.input_len(), 1.0);
        check(&net, &x, Mode::Tangent)?;
        check(&net, &x, Mode::Secant)?;
    }

    #[test]
    fn select_matches_reference(
        shape in prop::collection::vec(1usize..5, 1..4), out_len in 1usize..40,
        picks in prop::collection::vec((any::<u32>(), 0u8..4), 40), seed in any::<u64>(),
    ) {
        // a smooth layer before and after, so W depends on the selection
        let mut rng = Rng(seed);
        let mut net = Network::new(shape.clone());
        let n = net.input_len();
        let t = net.push("tanh", "Tanh", Layer::Activation(Activation { expr: Expr::unary(Unary::Tanh) }), vec![ValueId(0)]).unwrap();
        let src: Vec<Option<usize>> = picks[..out_len]
            .iter()
            .map(|&(j, c)| if c == 0 { None } else { Some(j as usize % n) })
            .collect();
        let fill = if src.iter().any(Option::is_none) {
            src.iter().map(|s| if s.is_none() { rng.next() } else { 0.0 }).collect()
        } else {
            vec![]
        };
        let s = net.push("select", "Slice", Layer::Select(Select { shape: vec![1, out_len], src, fill }), vec![t]).unwrap();
        net.push("sig", "Sigmoid", Layer::Activation(Activation { expr: Expr::unary(Unary::Sigmoid) }), vec![s]).unwrap();
        let x = rng.vec(n, 1.0);
        check(&net, &x, Mode::Tangent)?;
        check(&net, &x, Mode::Secant)?;
    }

    #[test]
    fn product_matches_reference(
        shape in prop::collection::vec(1usize..4, 1..4), ones in prop::collection::vec(any::<bool>(), 4),
        swap in any::<bool>(), seed in any::<u64>(),
    ) {
        // a = tanh(x), g = sigmoid(affine(x)) reduced to the gate's shape by
        // a selection, y = a ⊙ broadcast(g), then softplus
        let mut rng = Rng(seed);
        let mut net = Network::new(shape.clone());
        let n = net.input_len();
        let gate: Vec<usize> = shape.iter().zip(&ones).map(|(&d, &o)| if o { 1 } else { d }).collect();
        let a = net.push("tanh", "Tanh", Layer::Activation(Activation { expr: Expr::unary(Unary::Tanh) }), vec![ValueId(0)]).unwrap();
        let aff = net.push("affine", "Mul", Layer::Affine(Affine::per_element(rng.vec(n, 1.0), rng.vec(n, 0.5))), vec![ValueId(0)]).unwrap();
        let s = net.push("sigmoid", "Sigmoid", Layer::Activation(Activation { expr: Expr::unary(Unary::Sigmoid) }), vec![aff]).unwrap();
        let gn: usize = gate.iter().product();
        let src = (0..gn).map(|k| Some((k * 7 + 3) % n)).collect();
        let g = net.push("gate", "Slice", Layer::Select(Select { shape: gate.clone(), src, fill: vec![] }), vec![s]).unwrap();
        let inputs = if swap && gate == shape { vec![g, a] } else { vec![a, g] };
        let p = net.push("product", "Mul", Layer::Product(Product {}), inputs).unwrap();
        net.push("softplus", "Softplus", Layer::Activation(Activation { expr: Expr::unary(Unary::Softplus) }), vec![p]).unwrap();
        let x = rng.vec(n, 1.0);
        check(&net, &x, Mode::Tangent)?;
        check(&net, &x, Mode::Secant)?;
    }

    #[test]
    fn softmax_matches_reference(
        shape in prop::collection::vec(1usize..5, 1..4), axis_seed in any::<usize>(), log in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let mut net = Network::new(shape.clone());
        let n = net.input_len();
        let axis = axis_seed % shape.len();
        let a = net.push("affine", "Mul", Layer::Affine(Affine::per_element(rng.vec(n, 2.0), rng.vec(n, 1.0))), vec![ValueId(0)]).unwrap();
        net.push("softmax", "Softmax", Layer::Softmax(Softmax { axis, log }), vec![a]).unwrap();
        let x = rng.vec(n, 1.0);
        check(&net, &x, Mode::Tangent)?;
        check(&net, &x, Mode::Secant)?;
    }

    #[test]
    fn matmul_of_two_tensors_matches_reference(
        batch in prop::collection::vec(1usize..3, 0..2), m in 1usize..4, k in 1usize..4, nn in 1usize..4, seed in any::<u64>(),
    ) {
        // A = tanh(x)[..., m, k] selected from x, B = sigmoid(x) selected as [..., k, n]
        let mut rng = Rng(seed);
        let mut sa = batch.clone();
        sa.extend([m, k]);
        let mut sb = batch.clone();
        sb.extend([k, nn]);
        let (la, lb): (usize, usize) = (sa.iter().product(), sb.iter().product());
        let mut net = Network::new(vec![1, la + lb]);
        let t = net.push("tanh", "Tanh", Layer::Activation(Activation { expr: Expr::unary(Unary::Tanh) }), vec![ValueId(0)]).unwrap();
        let s = net.push("sig", "Sigmoid", Layer::Activation(Activation { expr: Expr::unary(Unary::Sigmoid) }), vec![ValueId(0)]).unwrap();
        let a = net.push("a", "Slice", Layer::Select(Select { shape: sa, src: (0..la).map(Some).collect(), fill: vec![] }), vec![t]).unwrap();
        let b = net.push("b", "Slice", Layer::Select(Select { shape: sb, src: (la..la + lb).map(Some).collect(), fill: vec![] }), vec![s]).unwrap();
        net.push("matmul", "MatMul", Layer::MatMul(MatMul {}), vec![a, b]).unwrap();
        let x = rng.vec(la + lb, 1.0);
        check(&net, &x, Mode::Tangent)?;
        check(&net, &x, Mode::Secant)?;
    }
}
