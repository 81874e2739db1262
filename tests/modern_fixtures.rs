//! Building blocks of current classifiers (fixtures/generate_modern.py):
//! squeeze-and-excitation gates, LayerNorm, GroupNorm and InstanceNorm, a
//! ShuffleNetV2 channel split and shuffle, a class token and single-head
//! attention, each exported by PyTorch's legacy exporter and by its default
//! exporter (weights as external data). W must equal `torch.func.jacrev` of a
//! float64 copy, and F its logits, to 1e-9; both modes give W·x + b = F.
//! (Measured: 1e-15 for every block but the SE gate, 1.4e-10, whose
//! Hardsigmoid backward PyTorch computes with a float32 1/6 even in float64,
//! as the iris hardsigmoid fixture documents.)

use std::path::PathBuf;

use ndarray::{Array2, Array3, ArrayD};
use ndarray_npy::read_npy;
use nnlin::{Mode, Model, Options};

const MODELS: [&str; 10] = [
    "attention",
    "deconv",
    "deconv1d",
    "einsum_reduce",
    "ln_mlp",
    "norms",
    "resize",
    "se",
    "shuffle",
    "volumetric",
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/modern")
}

#[test]
fn modern_blocks_match_jacrev_with_both_exporters() {
    let mut worst: f64 = 0.0;
    for name in MODELS {
        let xs: ArrayD<f64> = read_npy(dir().join(format!("{name}.inputs.npy"))).unwrap();
        let logits: Array2<f64> = read_npy(dir().join(format!("{name}.logits.npy"))).unwrap();
        let jac: Array3<f64> = read_npy(dir().join(format!("{name}.jac.npy"))).unwrap();
        for file in [format!("{name}.onnx"), format!("{name}.default.onnx")] {
            let before = worst;
            worst = 0.0;
            let m =
                Model::from_onnx_file(dir().join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let n = m.input_len();
            let flat = xs.view().into_shape_with_order((xs.shape()[0], n)).unwrap();
            for (k, x) in flat.rows().into_iter().enumerate() {
                let x = x.to_vec();
                let f = m.forward_reference(&x);
                let scale = jac
                    .index_axis(ndarray::Axis(0), k)
                    .iter()
                    .fold(1e-300f64, |a, v| a.max(v.abs()));
                for (i, (a, b)) in f.iter().zip(logits.row(k)).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                        "{file} #{k}: F[{i}] = {a}, torch {b}"
                    );
                }
                for mode in [Mode::Tangent, Mode::Secant] {
                    let lin = m.linearize(&x, &Options::default().with_mode(mode)).unwrap();
                    for i in 0..f.len() {
                        let wx: f64 = (0..n).map(|j| lin.w[(i, j)] * x[j]).sum();
                        assert!(
                            (wx + lin.b[i] - f[i]).abs() <= 1e-12 * f[i].abs().max(1.0),
                            "{file} {mode:?}: W·x + b != F"
                        );
                        if mode == Mode::Tangent {
                            for j in 0..n {
                                let err = (lin.w[(i, j)] - jac[(k, i, j)]).abs() / scale;
                                worst = worst.max(err);
                                assert!(
                                    err <= 1e-9,
                                    "{file} #{k}: W[{i},{j}] = {}, jacrev {}",
                                    lin.w[(i, j)],
                                    jac[(k, i, j)]
                                );
                            }
                        }
                    }
                }
            }
            eprintln!("{file}: largest relative error of W against jacrev {worst:.1e}");
            worst = worst.max(before);
        }
    }
    eprintln!("largest relative error of W against jacrev: {worst:.1e}");
}

/// Each block's fixture inputs through one batched reverse pass (gates,
/// attention and norms give per-instance factors that are neither diagonals
/// nor selections: they multiply copies of their rows) give what one at a
/// time does, in both modes, within rounding of W's scale.
#[test]
fn modern_blocks_batch_like_one_at_a_time() {
    use nnlin::{Batch, Linearize};
    for name in MODELS {
        let xs: ArrayD<f64> = read_npy(dir().join(format!("{name}.inputs.npy"))).unwrap();
        let m = Model::from_onnx_file(dir().join(format!("{name}.onnx"))).unwrap();
        let n = m.input_len();
        let flat = xs.view().into_shape_with_order((xs.shape()[0], n)).unwrap();
        for mode in [Mode::Tangent, Mode::Secant] {
            let opts = Options::new().with_mode(mode);
            let one = m.linearize_batch(flat, &opts.clone().with_batch(Batch::Width(1))).unwrap();
            let all =
                m.linearize_batch(flat, &opts.with_batch(Batch::Width(flat.nrows()))).unwrap();
            for (k, (a, b)) in one.iter().zip(&all).enumerate() {
                assert_eq!(b.batch, flat.nrows(), "{name}");
                let scale = a.w.iter().chain(&a.b).fold(1.0f64, |s, v| s.max(v.abs()));
                let dw =
                    (&a.w - &b.w).iter().chain(&(&a.b - &b.b)).fold(0.0f64, |s, v| s.max(v.abs()));
                assert!(dw <= 1e-12 * scale, "{name} {mode} #{k}: {dw} against {scale}");
            }
        }
    }
}
