//! MTCNN's trained PNet, RNet and ONet (fixtures/generate_mtcnn.py; real
//! weights from facenet-pytorch 2.6.0: PReLU, ceil-mode max-pool), every head
//! chosen by its graph output name, and ONet also from the default exporter
//! with its weights as external data: W equals `torch.func.jacrev` of a
//! float64 copy, and F its outputs (the probability head's logits: its
//! trailing softmax is skipped).

use std::path::PathBuf;

use ndarray::{Array2, Array3, ArrayD};
use ndarray_npy::read_npy;
use nnlin::{ImportOptions, Model, Options};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/mtcnn")
}

#[test]
fn every_head_matches_jacrev() {
    let nets: [(&str, &[&str], &[&str]); 3] = [
        ("pnet", &["pnet.onnx"], &["box", "prob"]),
        ("rnet", &["rnet.onnx"], &["box", "prob"]),
        ("onet", &["onet.onnx", "onet.default.onnx"], &["box", "landmarks", "prob"]),
    ];
    for (net, files, heads) in nets {
        let xs: ArrayD<f64> = read_npy(dir().join(format!("{net}.inputs.npy"))).unwrap();
        for file in files {
            // several outputs and no choice: refused with the list
            let e = Model::from_onnx_file(dir().join(file)).unwrap_err().to_string();
            assert!(e.contains("outputs") && e.contains("`box`"), "{e}");
            for head in heads {
                let out: Array2<f64> =
                    read_npy(dir().join(format!("{net}.{head}.out.npy"))).unwrap();
                let jac: Array3<f64> =
                    read_npy(dir().join(format!("{net}.{head}.jac.npy"))).unwrap();
                let opts = ImportOptions::default().with_output(*head);
                let m = Model::from_onnx_file_with(dir().join(file), &opts).unwrap();
                assert_eq!(m.info().skipped_softmax.is_some(), *head == "prob", "{file} {head}");
                let n = m.input_len();
                let flat = xs.view().into_shape_with_order((xs.shape()[0], n)).unwrap();
                let mut worst: f64 = 0.0;
                for (k, x) in flat.rows().into_iter().enumerate() {
                    let x = x.to_vec();
                    let lin = m.linearize(&x, &Options::default()).unwrap();
                    let f = m.forward_reference(&x);
                    let scale = jac
                        .index_axis(ndarray::Axis(0), k)
                        .iter()
                        .fold(1e-300f64, |a, v| a.max(v.abs()));
                    for i in 0..f.len() {
                        let want = out[(k, i)];
                        assert!(
                            (f[i] - want).abs() <= 1e-9 * want.abs().max(1.0),
                            "{file} {head}: F {} vs {want}",
                            f[i]
                        );
                        for j in 0..n {
                            worst = worst.max((lin.w[(i, j)] - jac[(k, i, j)]).abs() / scale);
                        }
                    }
                }
                eprintln!("{file} {head}: largest relative error of W against jacrev {worst:.1e}");
                assert!(worst <= 1e-9, "{file} {head}: {worst:e}");
            }
        }
    }
}
