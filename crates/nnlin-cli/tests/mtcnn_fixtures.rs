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
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/mtcnn")
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

#[test]
fn a_dynamic_size_detector_takes_the_inputs_shape() {
    let file = dir().join("pnet.dynamic.onnx");
    let e = Model::from_onnx_file(&file).unwrap_err().to_string();
    assert!(e.contains("dynamic dimension 2"), "{e}");
    let xs: ArrayD<f64> = read_npy(dir().join("pnet.dynamic.inputs.npy")).unwrap();
    for head in ["box", "prob"] {
        let jac: Array3<f64> =
            read_npy(dir().join(format!("pnet.dynamic.{head}.jac.npy"))).unwrap();
        // with the batch axis, and without it
        for shape in [xs.shape().to_vec(), xs.shape()[1..].to_vec()] {
            let opts = ImportOptions::default().with_output(head).with_input_shape(shape);
            let m = Model::from_onnx_file_with(&file, &opts).unwrap();
            assert_eq!(m.input_shape(), &[1, 3, 14, 16]);
            let x = xs.iter().copied().collect::<Vec<_>>();
            let lin = m.linearize(&x, &Options::default()).unwrap();
            let scale = jac.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
            for ((i, j), w) in lin.w.indexed_iter() {
                assert!((w - jac[(0, i, j)]).abs() <= 1e-9 * scale, "{head}: W[{i},{j}]");
            }
        }
    }
    // the CLI reads the shape from the input file; inspect takes --input-shape
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nnlin")).args(args).output().unwrap()
    };
    let input = dir().join("pnet.dynamic.inputs.npy");
    let o = run(&[
        "explain",
        file.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        "box",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w: Array3<f64> = read_npy(out.join("W.npy")).unwrap();
    assert_eq!(w.dim(), (1, 24, 672));
    let o = run(&["inspect", file.to_str().unwrap(), "--output", "box"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--input-shape"));
    let o =
        run(&["inspect", file.to_str().unwrap(), "--output", "box", "--input-shape", "1,3,14,16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// PyTorch exports a convolution's PReLU slope as `[C, 1, 1]`: numpy rules
/// align it at the right, so each channel's slope is stored once and read
/// over the channel's positions, not broadcast to every element.
#[test]
fn per_channel_prelu_slopes_are_stored_once_per_channel() {
    use nnlin::ir::{Binary, ExprNode, Layer};
    for net in ["pnet", "rnet", "onet"] {
        let opts = ImportOptions::default().with_output("prob");
        let m = Model::from_onnx_file_with(dir().join(format!("{net}.onnx")), &opts).unwrap();
        let mut slopes = 0;
        for node in m.network().nodes() {
            let Layer::Activation(a) = &node.layer else { continue };
            let shape = m.network().shape(node.output);
            for n in &a.expr.nodes {
                let ExprNode::Binary(Binary::PRelu, _, k) = n else { continue };
                let ExprNode::Const(c) = a.expr.nodes[*k] else { continue };
                let c = &a.expr.consts[c];
                let channels = shape[1];
                assert_eq!(c.values.len(), channels, "{net} {}: {shape:?}", node.name);
                assert_eq!(c.repeat, shape[2..].iter().product::<usize>(), "{net} {}", node.name);
                slopes += 1;
            }
        }
        assert!(slopes >= 3, "{net}: {slopes} PReLU layers");
    }
}
