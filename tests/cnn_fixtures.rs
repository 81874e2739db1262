//! CNN fixtures trained on MNIST / Fashion-MNIST (`fixtures/generate_cnn.py`)
//! against their PyTorch references: logits and `torch.func.jacrev` of a
//! float64 copy, for both the unfused export (BatchNormalization kept) and
//! the default (dynamo) exporter, in both accumulation directions and with
//! convolutions as explicit CSR and as structured operators.

use std::path::PathBuf;

use ndarray::{Array2, Array3, ArrayD, Axis};
use ndarray_npy::ReadNpyExt;
use nnlin::{ConvKernel, Ensemble, Model, Options, Strategy};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/cnn")
}

/// (model, whether it has batch-norm)
fn models() -> Vec<(String, bool)> {
    let text = std::fs::read_to_string(dir().join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let obj = manifest.as_object().unwrap();
    obj.iter().map(|(k, v)| (k.clone(), v["batch_norm"].as_bool().unwrap())).collect()
}

/// Largest relative error of W against jacrev and of W·x + b and of the
/// reference interpreter against the logits; asserts each is within `tol`.
fn check(
    name: &str,
    file: &str,
    kernel: ConvKernel,
    strategy: Strategy,
    tol: f64,
    f32_round: bool,
) -> f64 {
    let read = |f: String| std::fs::File::open(dir().join(f)).unwrap();
    let xs = ArrayD::<f64>::read_npy(read(format!("{name}.inputs.npy"))).unwrap();
    let k = xs.shape()[0];
    let xs = xs.into_shape_with_order((k, 784)).unwrap();
    let logits = Array2::<f64>::read_npy(read(format!("{name}.logits.npy"))).unwrap();
    let jac = Array3::<f64>::read_npy(read(format!("{name}.jac.npy"))).unwrap();
    let model = Model::from_onnx_file(dir().join(file)).unwrap().with_conv_kernel(kernel);
    let opts = Options::default().with_strategy(strategy);
    let lins = Ensemble::single(model.clone()).linearize_batch(xs.view(), &opts).unwrap();
    let r = |v: f64| if f32_round { f64::from(v as f32) } else { v };
    let mut worst: f64 = 0.0;
    for (i, lin) in lins.iter().enumerate() {
        let j = jac.index_axis(Axis(0), i);
        let jscale = j.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let lscale = logits.row(i).iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let f = model.forward_reference(xs.row(i).as_slice().unwrap());
        for o in 0..10 {
            let mut wx = r(lin.b[o]);
            for p in 0..784 {
                let w = r(lin.w[(o, p)]);
                let e = (w - j[(o, p)]).abs() / jscale;
                assert!(
                    e <= tol,
                    "{file} {kernel:?} {strategy:?} instance {i}: W[{o},{p}] = {w}, jacrev {}",
                    j[(o, p)]
                );
                worst = worst.max(e);
                wx += w * xs[(i, p)];
            }
            let e = (wx - logits[(i, o)]).abs() / lscale;
            assert!(e <= tol, "{file} instance {i}: W·x + b = {wx}, logit {}", logits[(i, o)]);
            let e2 = (f[o] - logits[(i, o)]).abs() / lscale;
            assert!(
                e2 <= tol,
                "{file}: reference interpreter {} vs logit {}",
                f[o],
                logits[(i, o)]
            );
            worst = worst.max(e).max(e2);
        }
    }
    worst
}

#[test]
fn cnn_fixtures_match_jacrev_in_f64() {
    let names = models();
    assert!(names.len() >= 5, "expected the CNN fixtures, found {names:?}");
    let mut worst: f64 = 0.0;
    for (name, bn) in &names {
        // The default (dynamo) exporter folds batch-norm into the convolution
        // weights in float32: that model differs from the float64 PyTorch
        // model by the rounding of the folded parameters (~1e-7 relative).
        let default_tol = if *bn { 1e-6 } else { 1e-9 };
        for (file, tol) in
            [(format!("{name}.onnx"), 1e-9), (format!("{name}.default.onnx"), default_tol)]
        {
            for (kernel, strategy) in [
                (ConvKernel::Csr, Strategy::Reverse),
                (ConvKernel::Structured, Strategy::Reverse),
                (ConvKernel::Structured, Strategy::Forward),
            ] {
                let e = check(name, &file, kernel, strategy, tol, false);
                if tol == 1e-9 {
                    worst = worst.max(e);
                }
            }
        }
    }
    eprintln!("largest relative error over the CNN fixtures (f64, exact exports): {worst:e}");
}

#[test]
fn cnn_fixtures_match_in_f32() {
    for (name, _) in models() {
        check(&name, &format!("{name}.onnx"), ConvKernel::Auto, Strategy::Auto, 1e-4, true);
    }
}

#[test]
fn unfused_export_keeps_batch_norm_as_a_diagonal() {
    let m = Model::from_onnx_file(dir().join("lenet5_bn.onnx")).unwrap();
    let sources: Vec<_> = m.network().nodes().iter().map(|n| n.source.clone()).collect();
    assert!(sources.iter().any(|s| s.contains("BatchNormalization")), "{sources:?}");
    let affine = m.network().nodes().iter().filter(|n| n.layer.kind() == "affine").count();
    assert_eq!(affine, 2, "one diagonal per BatchNormalization: {sources:?}");
}
