//! Reduced torchvision classifiers (fixtures/generate_zoo.py): MobileNetV3,
//! EfficientNet, RegNet-Y, ShuffleNetV2, ConvNeXt, ViT and Swin, built from
//! torchvision's own classes at reduced width and 32×32, exported by the
//! legacy and the default exporter. W must equal `torch.func.jacrev` of a
//! float64 copy (for the default export, of the copy with batch-norm folded
//! into the convolutions in float32, as that exporter writes it) to 1e-9 of
//! its largest entry, and W·x + b = F(x) in both modes.

use std::path::PathBuf;

use ndarray::{Array3, ArrayD};
use ndarray_npy::read_npy;
use nnlin::{Mode, Model, Options};

const MODELS: [&str; 7] = [
    "convnext_tiny",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "regnet_y",
    "shufflenet_v2",
    "swin_t",
    "vit",
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/zoo")
}

#[test]
fn torchvision_architectures_match_jacrev_with_both_exporters() {
    let mut worst: f64 = 0.0;
    for name in MODELS {
        let xs: ArrayD<f64> = read_npy(dir().join(format!("{name}.inputs.npy"))).unwrap();
        for (file, reference) in [
            (format!("{name}.onnx"), format!("{name}.jac.npy")),
            (format!("{name}.default.onnx"), format!("{name}.default.jac.npy")),
        ] {
            let jac: Array3<f64> = read_npy(dir().join(&reference)).unwrap();
            let m =
                Model::from_onnx_file(dir().join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let x: Vec<f64> = xs.iter().copied().collect();
            let n = m.input_len();
            assert_eq!(n, x.len(), "{file}");
            let f = m.forward_reference(&x);
            let scale = jac.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
            let mut err: f64 = 0.0;
            for mode in [Mode::Tangent, Mode::Secant] {
                let lin = m.linearize(&x, &Options::default().with_mode(mode)).unwrap();
                for i in 0..f.len() {
                    let wx: f64 = (0..n).map(|j| lin.w[(i, j)] * x[j]).sum();
                    assert!(
                        (wx + lin.b[i] - f[i]).abs() <= 1e-11 * f[i].abs().max(1.0),
                        "{file} {mode:?}: W·x + b = {}, F = {}",
                        wx + lin.b[i],
                        f[i]
                    );
                    if mode == Mode::Tangent {
                        for j in 0..n {
                            err = err.max((lin.w[(i, j)] - jac[(0, i, j)]).abs() / scale);
                        }
                    }
                }
            }
            eprintln!("{file}: largest relative error of W against jacrev {err:.1e}");
            assert!(err <= 1e-9, "{file}: W differs from jacrev by {err:.1e} of its largest entry");
            worst = worst.max(err);
        }
    }
    eprintln!("largest relative error of W against jacrev: {worst:.1e}");
}
