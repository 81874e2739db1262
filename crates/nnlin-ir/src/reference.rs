//! The reference interpreter: plain loops over the IR, generic over
//! [`Scalar`] (`f32`, `f64`, [`Dual`]). It is the oracle the compiled path is
//! tested against; the compiled path never calls it.

use crate::network::{Layer, Network, ValueId};
use crate::scalar::{Dual, Scalar};

/// Evaluates every value of the network at `x` (flattened input).
///
/// # Panics
/// If `x.len()` is not the network's input size (a caller contract).
pub fn forward_values<S: Scalar>(net: &Network, x: &[S]) -> Vec<Vec<S>> {
    assert_eq!(x.len(), net.input_len(), "reference: input length");
    let mut values: Vec<Vec<S>> = vec![x.to_vec()];
    let mut scratch = Vec::new();
    for node in net.nodes() {
        let u = &values[node.inputs[0].0];
        let y = match &node.layer {
            Layer::Dense(d) => {
                let rows = u.len() / d.in_features;
                let mut y = Vec::with_capacity(rows * d.out_features);
                for r in 0..rows {
                    let ur = &u[r * d.in_features..(r + 1) * d.in_features];
                    for o in 0..d.out_features {
                        let mut acc = S::from_f64(0.0);
                        for k in 0..d.in_features {
                            acc = acc + S::from_f64(d.weight[o * d.in_features + k]) * ur[k];
                        }
                        if let Some(b) = &d.bias {
                            acc = acc + S::from_f64(b[o]);
                        }
                        y.push(acc);
                    }
                }
                y
            }
            Layer::Affine(a) => u
                .iter()
                .enumerate()
                .map(|(i, &t)| S::from_f64(a.scale[i]) * t + S::from_f64(a.shift[i]))
                .collect(),
            Layer::Activation(a) => {
                u.iter().enumerate().map(|(i, &t)| a.expr.eval(i, t, &mut scratch)).collect()
            }
            Layer::Reshape(_) => u.clone(),
        };
        values.push(y);
    }
    values
}

/// Evaluates the network's output at `x`.
pub fn forward<S: Scalar>(net: &Network, x: &[S]) -> Vec<S> {
    let out: ValueId = net.output();
    forward_values(net, x).swap_remove(out.0)
}

/// The output `F(x)` and the Jacobian `∂F/∂x` (row-major, `m × n`) by
/// forward-mode dual numbers: one pass per input element.
pub fn jacobian(net: &Network, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = x.len();
    let m = net.output_len();
    let mut jac = vec![0.0; m * n];
    let mut out = forward::<f64>(net, x);
    for j in 0..n {
        let xd: Vec<Dual> =
            x.iter().enumerate().map(|(i, &v)| Dual::new(v, f64::from(u8::from(i == j)))).collect();
        let y = forward(net, &xd);
        for (i, yi) in y.iter().enumerate() {
            jac[i * n + j] = yi.d;
        }
        if j == 0 {
            out = y.iter().map(|t| t.v).collect();
        }
    }
    (out, jac)
}
