//! Property tests over random fully connected networks: depth 1–6, widths
//! 1–64, every activation nnlin knows (named, PReLU, and exporter-style
//! decompositions), random inputs. In f64:
//! - W·x + b equals the reference interpreter's F(x);
//! - in tangent mode W equals the dual-number Jacobian;
//! - reverse and forward accumulation agree;
//! - secant mode equals a direct implementation of the paper's formula;
//! - piecewise-linear networks give identical W and b in both modes.

use nnlin::ir::{
    Activation, Affine, Binary, Dense, Dual, Expr, ExprNode, Layer, Network, Unary, ValueId,
    reference,
};
use nnlin::{Direction, Mode, accumulate};
use proptest::prelude::*;

mod common;
use common::Rng;

const N_ACTIVATIONS: usize = 21;

/// Activation `k` on a tensor of `numel` elements; (expr, homogeneous PWL?,
/// any PWL?)
fn activation(k: usize, numel: usize, rng: &mut Rng) -> (Expr, bool) {
    let named = |f| Expr::unary(f);
    let e = match k {
        0 => named(Unary::Relu),
        1 => named(Unary::LeakyRelu { alpha: 0.1 }),
        2 => named(Unary::Clip { min: 0.0, max: 6.0 }),
        3 => named(Unary::Clip { min: -1.0, max: 1.0 }),
        4 => named(Unary::Elu { alpha: 0.8 }),
        5 => named(Unary::Selu { alpha: 1.6732632423543772, gamma: 1.0507009873554805 }),
        6 => named(Unary::Celu { alpha: 0.5 }),
        7 => named(Unary::Gelu),
        8 => named(Unary::GeluTanh),
        9 => named(Unary::Softplus),
        10 => named(Unary::Sigmoid),
        11 => named(Unary::Tanh),
        12 => named(Unary::HardSigmoid { alpha: 1.0 / 6.0, beta: 0.5 }),
        13 => named(Unary::HardSwish),
        14 => named(Unary::Softsign),
        15 => {
            // PReLU, per-element slopes
            let mut e = Expr::var();
            let s = e.push_const((0..numel).map(|_| 0.3 * rng.next()).collect());
            e.push(ExprNode::Binary(Binary::PRelu, 0, s));
            e
        }
        16 => {
            // SiLU as exported: Mul(x, Sigmoid(x))
            let mut e = Expr::var();
            let s = e.push(ExprNode::Unary(Unary::Sigmoid, 0));
            e.push(ExprNode::Binary(Binary::Mul, 0, s));
            e
        }
        17 => {
            // Mish: x·tanh(softplus(x))
            let mut e = Expr::var();
            let s = e.push(ExprNode::Unary(Unary::Softplus, 0));
            let t = e.push(ExprNode::Unary(Unary::Tanh, s));
            e.push(ExprNode::Binary(Binary::Mul, 0, t));
            e
        }
        18 => {
            // GELU as the PyTorch exporter decomposes it: Div, Erf, Add, Mul, Mul
            let mut e = Expr::var();
            let r2 = e.push_const(vec![std::f64::consts::SQRT_2]);
            let d = e.push(ExprNode::Binary(Binary::Div, 0, r2));
            let er = e.push(ExprNode::Unary(Unary::Erf, d));
            let one = e.push_const(vec![1.0]);
            let a = e.push(ExprNode::Binary(Binary::Add, er, one));
            let m = e.push(ExprNode::Binary(Binary::Mul, 0, a));
            let half = e.push_const(vec![0.5]);
            e.push(ExprNode::Binary(Binary::Mul, m, half));
            e
        }
        19 => {
            // tanh-GELU with Pow(x, 3)
            let mut e = Expr::var();
            let three = e.push_const(vec![3.0]);
            let p = e.push(ExprNode::Binary(Binary::Pow, 0, three));
            let c = e.push_const(vec![0.044715]);
            let pc = e.push(ExprNode::Binary(Binary::Mul, p, c));
            let inner = e.push(ExprNode::Binary(Binary::Add, 0, pc));
            let k = e.push_const(vec![(2.0 / std::f64::consts::PI).sqrt()]);
            let ik = e.push(ExprNode::Binary(Binary::Mul, inner, k));
            let th = e.push(ExprNode::Unary(Unary::Tanh, ik));
            let one = e.push_const(vec![1.0]);
            let a = e.push(ExprNode::Binary(Binary::Add, th, one));
            let m = e.push(ExprNode::Binary(Binary::Mul, 0, a));
            let half = e.push_const(vec![0.5]);
            e.push(ExprNode::Binary(Binary::Mul, m, half));
            e
        }
        _ => named(Unary::Tanh),
    };
    let homogeneous = matches!(k, 0 | 1 | 15);
    (e, homogeneous)
}

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    widths: Vec<usize>,
    acts: Vec<usize>,
    normalize: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    case_with((0..N_ACTIVATIONS).collect())
}

/// Piecewise-linear activations: ReLU, LeakyReLU, ReLU6, HardTanh,
/// HardSigmoid, PReLU.
const PWL: [usize; 6] = [0, 1, 2, 3, 12, 15];

fn case_with(acts: Vec<usize>) -> impl Strategy<Value = Case> {
    let pick = prop::sample::select(acts);
    (1usize..=64, prop::collection::vec((1usize..=64, pick), 1..=6), any::<bool>(), any::<u64>())
        .prop_map(|(n, layers, normalize, seed)| Case {
            n,
            widths: layers.iter().map(|l| l.0).collect(),
            acts: layers.iter().map(|l| l.1).collect(),
            normalize,
            seed,
        })
}

/// Builds the network; returns it, the input, and whether every activation
/// is ReLU/LeakyReLU/PReLU (for the secant formula) and whether all are
/// piecewise linear.
fn build(c: &Case) -> (Network, Vec<f64>, bool) {
    let mut rng = Rng(c.seed);
    let mut net = Network::new(vec![1, c.n]);
    let mut v = ValueId(0);
    if c.normalize {
        let scale = (0..c.n).map(|_| 1.0 + 0.5 * rng.next()).collect();
        let shift = (0..c.n).map(|_| rng.next()).collect();
        v = net
            .push("norm", "Sub+Div", Layer::Affine(Affine::per_element(scale, shift)), vec![v])
            .unwrap();
    }
    let mut width = c.n;
    let mut homogeneous = true;
    let outputs = 1 + (c.seed % 10) as usize;
    for (i, (&w, &a)) in c.widths.iter().zip(&c.acts).enumerate() {
        let gain = 2.0 / (width as f64).sqrt();
        let weight = (0..w * width).map(|_| gain * rng.next()).collect();
        let bias = Some((0..w).map(|_| 0.5 * rng.next()).collect());
        let d = Dense { out_features: w, in_features: width, weight, bias };
        v = net.push(format!("fc{i}"), "Gemm", Layer::Dense(d), vec![v]).unwrap();
        let (expr, h) = activation(a, w, &mut rng);
        homogeneous &= h;
        v = net
            .push(format!("act{i}"), "act", Layer::Activation(Activation { expr }), vec![v])
            .unwrap();
        width = w;
    }
    let weight = (0..outputs * width).map(|_| rng.next() / (width as f64).sqrt()).collect();
    let d =
        Dense { out_features: outputs, in_features: width, weight, bias: Some(vec![0.1; outputs]) };
    net.push("out", "Gemm", Layer::Dense(d), vec![v]).unwrap();
    let x = (0..c.n).map(|_| 2.0 * rng.next()).collect();
    (net, x, homogeneous)
}

fn linearize(net: &Network, x: &[f64], mode: Mode, dir: Direction) -> (Vec<Vec<f64>>, Vec<f64>) {
    let compiler = nnlin::Compiler::new(net);
    let inst = compiler.instance(x, mode).unwrap();
    let rows: Vec<usize> = (0..net.output_len()).collect();
    let (w, b) = accumulate(&inst, &rows, dir, faer::Par::Seq).unwrap();
    ((0..w.nrows()).map(|i| (0..w.ncols()).map(|j| w[(i, j)]).collect()).collect(), b)
}

/// The absolute chain of the output: the reference interpreter's forward
/// pass with every term replaced by its magnitude (`|A|·m + |c|` through an
/// affine layer; `|slope|·m + |σ(z)| + |σ'(z)·z|` through an activation,
/// the slope the larger of the tangent and the secant one). W·x + b and F
/// are sums over the same terms; where those cancel (a dead layer leaves
/// only the offsets' chain), their rounding scales with this, not with
/// |F| (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1).
fn absolute_chain(net: &Network, x: &[f64]) -> Vec<f64> {
    let values = reference::forward_values(net, x);
    let mut mag: Vec<Vec<f64>> = vec![Vec::new(); values.len()];
    mag[0] = x.iter().map(|v| v.abs()).collect();
    for node in net.nodes() {
        let m = &mag[node.inputs[0].0];
        let out = match &node.layer {
            Layer::Dense(d) => (0..d.out_features)
                .map(|i| {
                    let row = &d.weight[i * d.in_features..(i + 1) * d.in_features];
                    let c = d.bias.as_ref().map_or(0.0, |b| b[i].abs());
                    row.iter().zip(m).map(|(w, m)| w.abs() * m).sum::<f64>() + c
                })
                .collect(),
            Layer::Affine(a) => {
                let (scale, shift) = a.expanded();
                m.iter()
                    .zip(scale.iter().zip(&shift))
                    .map(|(m, (s, t))| s.abs() * m + t.abs())
                    .collect()
            }
            Layer::Activation(a) => {
                let z = &values[node.inputs[0].0];
                let (v, d) = a.expr.values_and_slopes(z);
                (0..z.len())
                    .map(|i| {
                        let secant = if z[i] != 0.0 { (v[i] / z[i]).abs() } else { 0.0 };
                        d[i].abs().max(secant) * m[i] + v[i].abs() + (d[i] * z[i]).abs()
                    })
                    .collect()
            }
            other => panic!("random networks build no {} layer", other.kind()),
        };
        mag[node.output.0] = out;
    }
    mag.pop().expect("the output's magnitudes")
}

fn max_abs(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, |a, b| a.max(b.abs()))
}

/// The paper's secant formula, directly, with a rigorous tolerance for the
/// comparison with the compiled path.
struct PaperSecant {
    w: Vec<Vec<f64>>,
    b: Vec<f64>,
    /// first-order bounds on |W_compiled − W_paper| and |b_compiled − b_paper|
    w_tol: Vec<Vec<f64>>,
    b_tol: Vec<f64>,
}

/// W' = Π diag(λ_i)·A_i with λ = σ(z)/z from the reference interpreter's
/// values (σ'(0) at z = 0, where σ(0) is the offset), and
/// b = Σ_i (W'_n⋯W'_{i+1})·b'_i + b'_n, in plain loops over dense matrices.
///
/// The compiled path computes the same quantities with its own rounding, so
/// the two differ by (a) the two products' association and (b) the slopes
/// λ, which are formed from pre-activations z that each path rounds on its
/// own. The tolerance bounds both, by running-error analysis (Higham,
/// "Accuracy and Stability of Numerical Algorithms", §3.1 and §3.5):
/// - each path's z carries |δz| ≤ γ_k·(|A|·|h| + |c|) + |A|·|δh|, with k the
///   inner dimension and δh the input's error (σ'(z)·δz through an
///   activation); the two paths differ by at most twice that;
/// - a slope moves by |δλ| ≤ |σ'(z) − λ|/(|z| − |δz|)·|δz| + 4ε|λ|; where
///   |z| ≤ 2|δz| the rounding alone can move λ arbitrarily (σ(0) ≠ 0), and
///   the entries it reaches are not bounded (infinite tolerance);
/// - a chain product in any association is within γ_K·Π|F_i| of the exact
///   one, K the sum of the inner dimensions; twice that for two paths;
/// - the slopes' movement reaches W through Σ_l S_l·|δΛ_l|·P_{l−1} and b
///   through Σ_l S_l·|δΛ_l|·pb_{l−1}, with S, P and pb the absolute suffix,
///   prefix and prefix-bias chains.
fn paper_secant(net: &Network, x: &[f64]) -> PaperSecant {
    let eps = f64::EPSILON;
    let gamma = |k: usize| k as f64 * eps / (1.0 - k as f64 * eps);
    let values = reference::forward_values::<f64>(net, x);
    // per value: magnitude |h| and the bound on the two paths' difference
    let mut mag: Vec<Vec<f64>> = vec![vec![]; values.len()];
    let mut err: Vec<Vec<f64>> = vec![vec![]; values.len()];
    mag[0] = x.iter().map(|v| v.abs()).collect();
    err[0] = vec![0.0; x.len()];
    // per layer: dense matrix A, offset c, and the bound on A's slopes' motion
    type Factor = (Vec<Vec<f64>>, Vec<f64>, Option<Vec<f64>>);
    let mut factors: Vec<Factor> = vec![];
    let mut inner = 0usize;
    let diag = |d: &[f64]| -> Vec<Vec<f64>> {
        (0..d.len())
            .map(|i| (0..d.len()).map(|j| if i == j { d[i] } else { 0.0 }).collect())
            .collect()
    };
    for node in net.nodes() {
        let (vi, vo) = (node.inputs[0].0, node.output.0);
        let z = &values[vi];
        let y = &values[vo];
        let nz = z.len();
        let (hm, he) = (mag[vi].clone(), err[vi].clone());
        // a linear layer: z = A·h + c rounded with inner dimension k
        let linear = |a: &Vec<Vec<f64>>, c: &[f64], k: usize| -> (Vec<f64>, Vec<f64>) {
            let m: Vec<f64> = a
                .iter()
                .zip(c)
                .map(|(r, ci)| r.iter().zip(&hm).map(|(p, q)| p.abs() * q).sum::<f64>() + ci.abs())
                .collect();
            let e = a
                .iter()
                .zip(&m)
                .map(|(r, mi)| {
                    2.0 * gamma(k) * mi + r.iter().zip(&he).map(|(p, q)| p.abs() * q).sum::<f64>()
                })
                .collect();
            (m, e)
        };
        let (a, c, dl) = match &node.layer {
            Layer::Dense(d) => {
                let a: Vec<Vec<f64>> = (0..d.out_features)
                    .map(|o| d.weight[o * d.in_features..(o + 1) * d.in_features].to_vec())
                    .collect();
                let c = d.bias.clone().unwrap_or_else(|| vec![0.0; d.out_features]);
                (mag[vo], err[vo]) = linear(&a, &c, d.in_features + 1);
                inner += d.in_features + 1;
                (a, c, None)
            }
            Layer::Affine(af) => {
                let (scale, shift) = af.expanded();
                let a = diag(&scale);
                (mag[vo], err[vo]) = linear(&a, &shift, 2);
                inner += 2;
                (a, shift, None)
            }
            Layer::Activation(act) => {
                let mut lam = vec![0.0; nz];
                let mut off = vec![0.0; nz];
                let mut dlam = vec![0.0; nz];
                let mut ye = vec![0.0; nz];
                for i in 0..nz {
                    let d = act.expr.eval(i, Dual::var(z[i]), &mut vec![]);
                    if z[i] != 0.0 {
                        lam[i] = y[i] / z[i];
                    } else {
                        lam[i] = d.d;
                        off[i] = d.v;
                    }
                    let ez = he[i];
                    ye[i] = d.d.abs() * ez + 4.0 * eps * y[i].abs();
                    dlam[i] = if ez == 0.0 {
                        4.0 * eps * lam[i].abs()
                    } else if z[i].abs() > 2.0 * ez {
                        (d.d - lam[i]).abs() / (z[i].abs() - ez) * ez + 4.0 * eps * lam[i].abs()
                    } else {
                        f64::INFINITY
                    };
                }
                mag[vo] = y.iter().map(|v| v.abs()).collect();
                err[vo] = ye;
                inner += 1;
                (diag(&lam), off, Some(dlam))
            }
            Layer::Reshape(_) => {
                mag[vo] = hm;
                err[vo] = he;
                (diag(&vec![1.0; nz]), vec![0.0; nz], None)
            }
            other => panic!("MLP test network has no {} layer", other.kind()),
        };
        factors.push((a, c, dl));
    }
    // 0·∞ is 0 here: an entry no unbounded slope reaches stays bounded
    let matmul = |a: &Vec<Vec<f64>>, b: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        (0..a.len())
            .map(|i| {
                (0..b[0].len())
                    .map(|j| {
                        (0..b.len())
                            .filter(|&k| a[i][k] != 0.0 && b[k][j] != 0.0)
                            .map(|k| a[i][k] * b[k][j])
                            .sum()
                    })
                    .collect()
            })
            .collect()
    };
    let matvec = |a: &Vec<Vec<f64>>, v: &[f64]| -> Vec<f64> {
        a.iter()
            .map(|r| {
                r.iter().zip(v).filter(|(p, q)| **p != 0.0 && **q != 0.0).map(|(p, q)| p * q).sum()
            })
            .collect()
    };
    let abs = |a: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        a.iter().map(|r| r.iter().map(|v| v.abs()).collect()).collect()
    };
    let add = |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(a, b)| a + b).collect() };
    // suffix products W'_n⋯W'_{i+1}
    let n_layers = factors.len();
    let mut w = factors[n_layers - 1].0.clone();
    let mut b = factors[n_layers - 1].1.clone();
    for i in (0..n_layers - 1).rev() {
        b = add(&b, &matvec(&w, &factors[i].1));
        w = matmul(&w, &factors[i].0);
    }
    // absolute prefix chains P_l, pb_l (P_0 = I, pb_0 = 0) ...
    let mut prefix = vec![(diag(&vec![1.0; x.len()]), vec![0.0; x.len()])];
    for (a, c, _) in &factors {
        let (p, pb) = prefix.last().unwrap();
        let a = abs(a);
        let ca: Vec<f64> = c.iter().map(|v| v.abs()).collect();
        prefix.push((matmul(&a, p), add(&matvec(&a, pb), &ca)));
    }
    let (wabs, babs) = prefix.last().unwrap().clone();
    let g = 2.0 * gamma(inner + n_layers);
    let mut w_tol: Vec<Vec<f64>> = wabs.iter().map(|r| r.iter().map(|v| g * v).collect()).collect();
    let mut b_tol: Vec<f64> = babs.iter().map(|v| g * v).collect();
    // ... and suffix chains S_l, walking back: S·|δΛ_l|·P_{l−1}
    let mut suffix = diag(&vec![1.0; w.len()]);
    for l in (0..n_layers).rev() {
        if let Some(dl) = &factors[l].2 {
            let sd = matmul(&suffix, &diag(dl));
            let (p, pb) = &prefix[l];
            for (t, u) in w_tol.iter_mut().zip(matmul(&sd, p)) {
                *t = add(t, &u);
            }
            b_tol = add(&b_tol, &matvec(&sd, pb));
        }
        suffix = matmul(&suffix, &abs(&factors[l].0));
    }
    PaperSecant { w, b, w_tol, b_tol }
}

/// W·x + b equals F, in tangent mode W equals the dual-number Jacobian,
/// and reverse and forward accumulation agree, each within `1e-12` of its
/// terms' magnitudes.
fn wx_plus_b_is_f(c: &Case) -> Result<(), TestCaseError> {
    let (net, x, _) = build(c);
    let (f, jac) = reference::jacobian(&net, &x);
    let n = x.len();
    let jscale = max_abs(jac.iter().copied()).max(1e-300);
    let chain = absolute_chain(&net, &x);
    for mode in [Mode::Tangent, Mode::Secant] {
        let (wr, br) = linearize(&net, &x, mode, Direction::Reverse);
        let (wf, bf) = linearize(&net, &x, mode, Direction::Forward);
        for i in 0..f.len() {
            let wx: f64 = (0..n).map(|j| wr[i][j] * x[j]).sum();
            let scale = (0..n).map(|j| (wr[i][j] * x[j]).abs()).sum::<f64>()
                + br[i].abs()
                + f[i].abs()
                + chain[i];
            prop_assert!(
                (wx + br[i] - f[i]).abs() <= 1e-12 * scale.max(1e-300),
                "{mode:?} row {i}: W·x + b = {} but F = {}",
                wx + br[i],
                f[i]
            );
            let rscale = max_abs(wr[i].iter().copied()).max(br[i].abs()).max(1e-300);
            for j in 0..n {
                prop_assert!((wr[i][j] - wf[i][j]).abs() <= 1e-12 * rscale);
                if mode == Mode::Tangent {
                    prop_assert!(
                        (wr[i][j] - jac[i * n + j]).abs() <= 1e-12 * jscale,
                        "W[{i},{j}] = {} but the dual Jacobian is {}",
                        wr[i][j],
                        jac[i * n + j]
                    );
                }
            }
            prop_assert!((br[i] - bf[i]).abs() <= 1e-12 * scale.max(1e-300));
        }
    }
    Ok(())
}

/// A dead first layer (W = 0): b is the chain of the later offsets alone.
/// In row 7 it cancels to 2.8e-3 from terms whose magnitudes sum to 2.8e6
/// times that, and the secant b and F differ by 3e-12 relative to |F|; the
/// check's scale must count those terms (found by the proptest below).
#[test]
fn a_dead_first_layer_leaves_b_to_the_offsets_chain() {
    let c = Case {
        n: 57,
        widths: vec![1, 7, 24, 28, 7],
        acts: vec![0, 3, 10, 7, 17],
        normalize: false,
        seed: 8635190134507688717,
    };
    wx_plus_b_is_f(&c).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn wx_plus_b_is_f_and_w_is_the_jacobian(c in case()) {
        wx_plus_b_is_f(&c)?;
    }

    #[test]
    fn secant_is_the_papers_formula(c in case_with((4..N_ACTIVATIONS).filter(|&k| k != 12).chain([0, 1, 15]).collect())) {
        let (net, x, _) = build(&c);
        let (w, b) = linearize(&net, &x, Mode::Secant, Direction::Reverse);
        let p = paper_secant(&net, &x);
        let all_smooth_or_homogeneous = net.nodes().iter().all(|nd| match &nd.layer {
            Layer::Activation(a) => !a.is_piecewise_linear()
                || matches!(a.expr.nodes.last(), Some(ExprNode::Unary(Unary::Relu | Unary::LeakyRelu { .. }, _)) | Some(ExprNode::Binary(Binary::PRelu, _, _))),
            _ => true,
        });
        prop_assert!(all_smooth_or_homogeneous);
        // the bound is first order; a factor of 2 covers the second-order
        // terms (a seeded case at 1.35e-11 of max|W, b|, 39 ε of |b|'s
        // absolute chain, is in the regressions file)
        for i in 0..w.len() {
            for j in 0..x.len() {
                prop_assert!((w[i][j] - p.w[i][j]).abs() <= 2.0 * p.w_tol[i][j],
                    "W[{i},{j}] {} vs {} tolerance {}", w[i][j], p.w[i][j], p.w_tol[i][j]);
            }
            prop_assert!((b[i] - p.b[i]).abs() <= 2.0 * p.b_tol[i],
                "b[{i}] {} vs {} tolerance {}", b[i], p.b[i], p.b_tol[i]);
        }
    }

    #[test]
    fn piecewise_linear_networks_agree_in_both_modes(c in case_with(PWL.to_vec())) {
        let (net, x, _) = build(&c);
        let all_pwl = net.nodes().iter().all(|nd| match &nd.layer {
            Layer::Activation(a) => a.is_piecewise_linear(),
            _ => true,
        });
        prop_assert!(all_pwl);
        let t = linearize(&net, &x, Mode::Tangent, Direction::Reverse);
        let s = linearize(&net, &x, Mode::Secant, Direction::Reverse);
        prop_assert_eq!(t, s);
    }
}

/// Pre-activations exactly 0 (bias-free layer at x = 0, as on MNIST's blank
/// background): ReLU'(0) = 0 in W, and W·x + b = F(x) still.
#[test]
fn zero_preactivations_follow_relu_prime_zero() {
    let mut net = Network::new(vec![1, 3]);
    let d = Dense {
        out_features: 2,
        in_features: 3,
        weight: vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0],
        bias: None,
    };
    let v = net.push("fc", "Gemm", Layer::Dense(d), vec![ValueId(0)]).unwrap();
    let v = net
        .push(
            "relu",
            "Relu",
            Layer::Activation(Activation { expr: Expr::unary(Unary::Relu) }),
            vec![v],
        )
        .unwrap();
    let d =
        Dense { out_features: 1, in_features: 2, weight: vec![1.0, 1.0], bias: Some(vec![0.25]) };
    net.push("out", "Gemm", Layer::Dense(d), vec![v]).unwrap();
    for mode in [Mode::Tangent, Mode::Secant] {
        let (w, b) = linearize(&net, &[0.0, 0.0, 0.0], mode, Direction::Reverse);
        assert_eq!(w, vec![vec![0.0, 0.0, 0.0]]);
        assert_eq!(b, vec![0.25]);
    }
}
