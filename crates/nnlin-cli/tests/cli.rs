//! The `nnlin explain` contract: output files and their shapes, and one test
//! per kind of bad input (each exits non-zero with a one-line reason and
//! leaves no output behind).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ndarray::{Array2, Array3, ArrayD, IxDyn};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use nnlin_onnx::proto;
use prost::Message;

#[path = "../../../tests/common/mod.rs"]
mod common;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nnlin"))
}
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/iris").join(name)
}
fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}
fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts failure with a one-line message containing `needle`, and that
/// `out` was not created.
fn assert_fails(out: &Output, needle: &str, dir: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "expected one line, got: {err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
    assert!(!dir.exists(), "partial output left at {}", dir.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.contains(".tmp-") || name.contains(".nnlin-")
        })
        .collect();
    assert!(leftovers.is_empty(), "staging directory left behind");
}

#[test]
fn explain_writes_the_contract_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let o = run(&[
        "explain",
        s(&fixture("gelu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = Array3::<f64>::read_npy(std::fs::File::open(out.join("W.npy")).unwrap()).unwrap();
    let b = Array2::<f64>::read_npy(std::fs::File::open(out.join("b.npy")).unwrap()).unwrap();
    assert_eq!(w.dim(), (8, 3, 4));
    assert_eq!(b.dim(), (8, 3));
    let sum: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for key in ["models", "mode", "precision", "strategy", "rows", "instances", "timing"] {
        assert!(sum.get(key).is_some(), "summary.json lacks `{key}`");
    }
    assert_eq!(sum["mode"], "tangent");
    assert_eq!(sum["precision"], "f64");
    assert!(sum["timing"]["linearize_seconds"].as_f64().unwrap() >= 0.0);
    let inst = &sum["instances"][0];
    for key in ["output", "wx", "b", "predicted", "residual"] {
        assert!(inst.get(key).is_some(), "instance lacks `{key}`");
    }
    assert!(inst["residual"].as_f64().unwrap() < 1e-12);
    assert_eq!(inst["output"].as_array().unwrap().len(), 3);

    // f32, top1, secant, an ensemble with weights, one instance without batch dim
    let one = tmp.path().join("one.npy");
    ndarray::arr1(&[5.1, 3.5, 1.4, 0.2]).write_npy(std::fs::File::create(&one).unwrap()).unwrap();
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        s(&fixture("silu.onnx")),
        "--weights",
        "0.5,-1.5",
        "--input",
        s(&one),
        "--out",
        s(&out),
        "--precision",
        "f32",
        "--rows",
        "top1",
        "--mode",
        "secant",
        "--strategy",
        "forward",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = Array3::<f32>::read_npy(std::fs::File::open(out.join("W.npy")).unwrap()).unwrap();
    assert_eq!(w.dim(), (1, 1, 4));
    let sum: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(sum["models"].as_array().unwrap().len(), 2);
    assert!(sum["instances"][0]["residual"].as_f64().unwrap() < 1e-4);
}

#[test]
fn trailing_softmax_is_noted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let o = run(&[
        "explain",
        s(&fixture("relu_softmax.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Softmax skipped"));
    let sum = std::fs::read_to_string(out.join("summary.json")).unwrap();
    assert!(sum.contains("W and b explain the logits"));
}

#[test]
fn missing_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let o = run(&[
        "explain",
        "/nonexistent/m.onnx",
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert_fails(&o, "cannot read `/nonexistent/m.onnx`", &out);
}

#[test]
fn missing_input_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        "/nonexistent/x.npy",
        "--out",
        s(&out),
    ]);
    assert_fails(&o, "cannot read input", &out);
}

#[test]
fn malformed_model_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.onnx");
    std::fs::write(&bad, b"\xff\xfe this is not protobuf \x00\x01").unwrap();
    let out = tmp.path().join("res");
    let o = run(&["explain", s(&bad), "--input", s(&fixture("inputs.npy")), "--out", s(&out)]);
    assert_fails(&o, "malformed ONNX file", &out);
}

#[test]
fn malformed_input_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("x.npy");
    std::fs::write(&bad, b"not an npy").unwrap();
    let out = tmp.path().join("res");
    let o = run(&["explain", s(&fixture("relu.onnx")), "--input", s(&bad), "--out", s(&out)]);
    assert_fails(&o, "is not a .npy file", &out);
}

#[test]
fn wrong_input_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let x = tmp.path().join("x.npy");
    Array2::<f64>::zeros((2, 5)).write_npy(std::fs::File::create(&x).unwrap()).unwrap();
    let out = tmp.path().join("res");
    let o = run(&["explain", s(&fixture("relu.onnx")), "--input", s(&x), "--out", s(&out)]);
    assert_fails(&o, "has shape [2, 5]; the model expects [1, 4]", &out);
}

#[test]
fn nan_and_inf_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    for v in [f64::NAN, f64::INFINITY] {
        let x = tmp.path().join("x.npy");
        let mut a = ArrayD::<f64>::zeros(IxDyn(&[3, 4]));
        a[[1, 2]] = v;
        a.write_npy(std::fs::File::create(&x).unwrap()).unwrap();
        let out = tmp.path().join("res");
        let o = run(&["explain", s(&fixture("relu.onnx")), "--input", s(&x), "--out", s(&out)]);
        assert_fails(&o, "non-finite value (NaN or Inf) at flat index 6", &out);
    }
}

fn write_model(path: &Path, op: &str) {
    let vi = common::onnx::value_info;
    let model = proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            node: vec![proto::NodeProto {
                input: vec!["x".into()],
                output: vec!["y".into()],
                name: Some("my_lstm_node".into()),
                op_type: Some(op.into()),
                ..Default::default()
            }],
            input: vec![vi("x", &[1, 4])],
            output: vec![vi("y", &[1, 4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

#[test]
fn unsupported_op_names_node_and_op_type() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.onnx");
    write_model(&m, "LSTM");
    let out = tmp.path().join("res");
    let o = run(&["explain", s(&m), "--input", s(&fixture("inputs.npy")), "--out", s(&out)]);
    assert_fails(&o, "node `my_lstm_node` has op type `LSTM`; supported ops: Abs", &out);
    // a supported op on a hand-made model works end to end
    write_model(&m, "Tanh");
    let o = run(&["explain", s(&m), "--input", s(&fixture("inputs.npy")), "--out", s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn weights_that_do_not_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        s(&fixture("gelu.onnx")),
        "--weights",
        "1,2,3",
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert_fails(&o, "--weights has 3 values for 2 models", &out);
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--weights",
        "nan",
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert_fails(&o, "is not finite", &out);
    // members whose shapes differ
    let m = tmp.path().join("m.onnx");
    write_model(&m, "Tanh"); // 4 -> 4, the iris models are 4 -> 3
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        s(&m),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert_fails(&o, "ensemble:", &out);
}

#[test]
fn bad_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
        "--rows",
        "0,7",
    ]);
    assert_fails(&o, "row 7 out of range", &out);
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
        "--rows",
        "top9",
    ]);
    assert_fails(&o, "top9", &out);
}

#[test]
fn unwritable_output() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"keep me").unwrap();
    // the output path is an existing file
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&file),
    ]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // the output is below a file
    let out = file.join("res");
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.trim_end().lines().count(), 1);
    assert!(err.contains("cannot write output directory"), "{err}");
}

#[test]
fn failed_run_keeps_previous_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("res");
    let ok = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert!(ok.status.success());
    let before = std::fs::read(out.join("W.npy")).unwrap();
    let bad = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        "/nonexistent.npy",
        "--out",
        s(&out),
    ]);
    assert!(!bad.status.success());
    assert_eq!(std::fs::read(out.join("W.npy")).unwrap(), before);
}

#[test]
fn decompose_reports_exactly_the_table_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures");
    let j = tmp.path().join("t.json");
    let md = tmp.path().join("t.md");
    let o = run(&[
        "decompose",
        s(&root.join("cnn/lenet300.onnx")),
        "--data",
        s(&root.join("data/mnist/t10k-images-idx3-ubyte.gz")),
        "--labels",
        s(&root.join("data/mnist/t10k-labels-idx1-ubyte.gz")),
        "--limit",
        "200",
        "--json",
        s(&j),
        "--markdown",
        s(&md),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["accuracy", "b_accuracy", "b_lfr", "n", "wx_accuracy", "wx_lfr"]);
    assert_eq!(v["n"], 200);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "LeNet-300-100 accuracy {acc}");
    // W·x predicts almost what F predicts
    assert!(v["wx_lfr"].as_f64().unwrap() < 0.05);
    assert!(std::fs::read_to_string(&md).unwrap().contains("| lenet300.onnx | 200 |"));
}

#[test]
fn region_writes_report_and_directions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reg");
    let j = tmp.path().join("r.json");
    let o = run(&[
        "region",
        s(&fixture("relu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--verify",
        "5",
        "--out",
        s(&out),
        "--json",
        s(&j),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    let inst = &v["instances"][0];
    for key in ["radius_l2", "radius_linf", "binding", "verify", "pattern", "units_at_kink"] {
        assert!(inst.get(key).is_some(), "missing {key}");
    }
    assert_eq!(inst["verify"]["kept_pattern"], 5);
    let d =
        Array2::<f64>::read_npy(std::fs::File::open(out.join("direction.npy")).unwrap()).unwrap();
    assert_eq!(d.dim(), (8, 4));
    let norm: f64 = d.row(0).iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-12);
    // smooth model: a sweep instead of a radius
    let o = run(&[
        "region",
        s(&fixture("gelu.onnx")),
        "--input",
        s(&fixture("inputs.npy")),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("region.json")).unwrap()).unwrap();
    assert_eq!(v["instances"][0]["smooth"], true);
    assert!(v["instances"][0]["sweep"].as_array().unwrap().len() >= 5);
}

#[test]
fn heatmaps_and_other_input_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures");
    let out = tmp.path().join("res");
    let digits = root.join("data/mnist/t10k-images-idx3-ubyte.gz[2..5]");
    let o = run(&[
        "explain",
        s(&root.join("cnn/lenet5.onnx")),
        "--input",
        s(&digits),
        "--heatmap",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = Array3::<f64>::read_npy(std::fs::File::open(out.join("W.npy")).unwrap()).unwrap();
    assert_eq!(w.dim(), (3, 10, 784));
    for k in 0..3 {
        let png = std::fs::read(out.join(format!("heatmaps/instance_{k}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    // a PNG input: a digit written as an image reads back as the same instance
    let img = tmp.path().join("digit.png");
    let gz = std::fs::read(root.join("data/mnist/t10k-images-idx3-ubyte.gz")).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut raw).unwrap();
    let pixels = raw[16 + 2 * 784..16 + 3 * 784].to_vec();
    image::GrayImage::from_raw(28, 28, pixels).unwrap().save(&img).unwrap();
    let out2 = tmp.path().join("res2");
    let o =
        run(&["explain", s(&root.join("cnn/lenet5.onnx")), "--input", s(&img), "--out", s(&out2)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w2 = Array3::<f64>::read_npy(std::fs::File::open(out2.join("W.npy")).unwrap()).unwrap();
    assert_eq!(w2.index_axis(ndarray::Axis(0), 0), w.index_axis(ndarray::Axis(0), 0));
    // wrong image size without --resize is an error; with it, fine
    let big = tmp.path().join("big.png");
    image::GrayImage::new(40, 30).save(&big).unwrap();
    let o =
        run(&["explain", s(&root.join("cnn/lenet5.onnx")), "--input", s(&big), "--out", s(&out2)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resize"));
    let o = run(&[
        "explain",
        s(&root.join("cnn/lenet5.onnx")),
        "--input",
        s(&big),
        "--resize",
        "--out",
        s(&out2),
    ]);
    assert!(o.status.success());
    // CSV rows (the label column ignored) and a range
    let o = run(&[
        "explain",
        s(&fixture("relu.onnx")),
        "--input",
        s(&root.join("data/iris.csv[10..14]")),
        "--out",
        s(&out2),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = Array2::<f64>::read_npy(std::fs::File::open(out2.join("b.npy")).unwrap()).unwrap();
    assert_eq!(b.dim(), (4, 3));
}

#[test]
fn neurons_contributions_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures");
    let out = tmp.path().join("nr");
    let digits = root.join("data/mnist/t10k-images-idx3-ubyte.gz[0..2]");
    let o = run(&[
        "neurons",
        s(&root.join("cnn/lenet5.onnx")),
        "--input",
        s(&digits),
        "--top",
        "3",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("neurons.json")).unwrap()).unwrap();
    for inst in v["instances"].as_array().unwrap() {
        let c = inst["predicted"].as_u64().unwrap() as usize;
        let f = inst["output"][c].as_f64().unwrap();
        let layers = inst["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 4, "LeNet-5 has four ReLU layers");
        // the first layer's contributions add up to W·x (the convolutions have no bias),
        // the last one's to F minus the last dense bias: both within |F|
        for l in layers {
            assert!(l["positive"].as_array().unwrap().len() <= 3);
            let first = l["positive"][0]["contribution"].as_f64().unwrap();
            assert!(first > 0.0 && first <= l["total_contribution"].as_f64().unwrap() + 1e-9);
        }
        assert!((layers[3]["total_contribution"].as_f64().unwrap() - f).abs() < 0.2 * f.abs());
    }
    assert_eq!(&std::fs::read(out.join("neurons_0.png")).unwrap()[..4], b"\x89PNG");
}

#[test]
fn svd_writes_the_top_singular_directions_without_w() {
    let tmp = std::env::temp_dir().join(format!("nnlin-svd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let cnn = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/cnn");
    let (model, input) = (cnn.join("resnet_small.onnx"), cnn.join("resnet_small.inputs.npy"));
    let full = tmp.join("full");
    let o = run(&["explain", s(&model), "--input", s(&input), "--out", s(&full)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svd = tmp.join("svd");
    let o = run(&[
        "explain",
        s(&model),
        "--input",
        s(&input),
        "--out",
        s(&svd),
        "--svd",
        "3",
        "--heatmap",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!svd.join("W.npy").exists(), "--svd must not write W");
    assert!(svd.join("svd/instance_0.png").exists());
    let w = Array3::<f64>::read_npy(std::fs::File::open(full.join("W.npy")).unwrap()).unwrap();
    let b = Array2::<f64>::read_npy(std::fs::File::open(full.join("b.npy")).unwrap()).unwrap();
    let vals =
        Array2::<f64>::read_npy(std::fs::File::open(svd.join("singular_values.npy")).unwrap())
            .unwrap();
    let vecs =
        Array3::<f64>::read_npy(std::fs::File::open(svd.join("singular_vectors.npy")).unwrap())
            .unwrap();
    let b_svd = Array2::<f64>::read_npy(std::fs::File::open(svd.join("b.npy")).unwrap()).unwrap();
    assert_eq!(vals.dim(), (w.dim().0, 3));
    assert_eq!(vecs.dim(), (w.dim().0, 3, w.dim().2));
    for k in 0..w.dim().0 {
        let (m, n) = (w.dim().1, w.dim().2);
        let dense = faer::Mat::from_fn(m, n, |i, j| w[(k, i, j)]);
        let svd_k = dense.thin_svd().unwrap();
        for j in 0..3 {
            let want = svd_k.S()[j];
            assert!((vals[(k, j)] - want).abs() <= 1e-9 * svd_k.S()[0], "σ{j}");
            // W·v = σ·u: ‖W·v‖ = σ
            let wv: f64 = (0..m)
                .map(|i| (0..n).map(|c| w[(k, i, c)] * vecs[(k, j, c)]).sum::<f64>().powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((wv - want).abs() <= 1e-9 * svd_k.S()[0], "‖W·v{j}‖ = {wv}, σ = {want}");
        }
        for i in 0..w.dim().1 {
            assert!((b[(k, i)] - b_svd[(k, i)]).abs() <= 1e-12, "b");
        }
    }
    let o = run(&[
        "explain",
        s(&model),
        "--input",
        s(&input),
        "--out",
        s(&tmp.join("x")),
        "--svd",
        "0",
    ]);
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&tmp);
}
