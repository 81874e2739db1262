//! Import of real exports: external data (read only inside the model's
//! folder), graphs with several outputs, a softmax followed by shape ops, and
//! the activation pattern of LeakyReLU/PReLU layers.

use std::path::{Path, PathBuf};

use nnlin::{ImportOptions, Model, Options};
use nnlin_onnx::proto;
use prost::Message;

fn iris(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/iris").join(name)
}
fn x() -> Vec<f64> {
    vec![5.9, 3.0, 5.1, 1.8]
}
fn w_of(m: &Model) -> ndarray::Array2<f64> {
    m.linearize(&x(), &Options::default()).unwrap().w
}
fn decode(path: &Path) -> proto::ModelProto {
    proto::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}
fn entry(k: &str, v: &str) -> proto::StringStringEntryProto {
    proto::StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) }
}

/// Moves every initializer's data into `dir/data_name` (as PyTorch's default
/// exporter does) and writes the model as `dir/model.onnx`.
fn externalize(src: &Path, dir: &Path, data_name: &str) -> (PathBuf, proto::ModelProto) {
    let mut m = decode(src);
    let mut data = vec![];
    for t in &mut m.graph.as_mut().unwrap().initializer {
        let raw: Vec<u8> = if let Some(r) = t.raw_data.take().filter(|r| !r.is_empty()) {
            r
        } else {
            t.float_data.drain(..).flat_map(f32::to_le_bytes).collect()
        };
        let offset = data.len();
        data.extend(&raw);
        data.resize(data.len().next_multiple_of(64), 0);
        t.data_location = Some(1);
        t.external_data = vec![
            entry("location", data_name),
            entry("offset", &offset.to_string()),
            entry("length", &raw.len().to_string()),
        ];
    }
    std::fs::write(dir.join(data_name), &data).unwrap();
    let path = dir.join("model.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    (path, m)
}

#[test]
fn external_data_is_read_from_the_models_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, m) = externalize(&iris("relu.onnx"), tmp.path(), "model.onnx.data");
    let original = Model::from_onnx_file(iris("relu.onnx")).unwrap();
    let external = Model::from_onnx_file(&path).unwrap();
    assert_eq!(w_of(&original), w_of(&external));
    // the bytes API needs a resolver
    let e = Model::from_onnx_bytes("m", &m.encode_to_vec()).unwrap_err().to_string();
    assert!(e.contains("external file `model.onnx.data`"), "{e}");
}

#[test]
fn external_data_cannot_escape_the_folder_or_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = tmp.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    let (path, m) = externalize(&iris("relu.onnx"), &inner, "w.bin");
    std::fs::copy(inner.join("w.bin"), tmp.path().join("outside.bin")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(tmp.path().join("outside.bin"), inner.join("link.bin")).unwrap();
    let outside = tmp.path().join("outside.bin").display().to_string();
    for (location, needle) in [
        ("../outside.bin", "must be a relative path inside the model's folder"),
        (outside.as_str(), "must be a relative path inside the model's folder"),
        ("link.bin", "leads out of the model's folder"),
        ("missing.bin", "cannot open external data `missing.bin`"),
    ] {
        let mut bad = m.clone();
        for t in &mut bad.graph.as_mut().unwrap().initializer {
            t.external_data[0] = entry("location", location);
        }
        std::fs::write(&path, bad.encode_to_vec()).unwrap();
        let e = Model::from_onnx_file(&path).unwrap_err().to_string();
        assert!(e.contains(needle), "{location}: {e}");
    }
    // offsets and lengths past the end of the file, and overflowing ones
    for (offset, length, needle) in [
        ("999999999", "16", "past the end of the file"),
        ("0", "18446744073709551615", "past the end of the file"),
        ("18446744073709551615", "2", "past the end of the file"),
        ("0", "-1", "is not a byte count"),
    ] {
        let mut bad = m.clone();
        let t = &mut bad.graph.as_mut().unwrap().initializer[0];
        t.external_data[1] = entry("offset", offset);
        t.external_data[2] = entry("length", length);
        std::fs::write(&path, bad.encode_to_vec()).unwrap();
        let e = Model::from_onnx_file(&path).unwrap_err().to_string();
        assert!(e.contains(needle), "{offset}/{length}: {e}");
    }
}

#[test]
fn several_outputs_are_chosen_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = decode(&iris("relu.onnx"));
    let g = m.graph.as_mut().unwrap();
    let main = g.output[0].name.clone().unwrap();
    // a second head: the output of the first node
    let hidden = g.node[0].output[0].clone();
    let mut second = g.output[0].clone();
    second.name = Some(hidden.clone());
    g.output.push(second);
    let path = tmp.path().join("two.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let e = Model::from_onnx_file(&path).unwrap_err().to_string();
    assert!(
        e.contains("2 outputs") && e.contains(&format!("`{main}`")) && e.contains("--output"),
        "{e}"
    );
    let opts = ImportOptions::default().with_output(main.clone());
    let chosen = Model::from_onnx_file_with(&path, &opts).unwrap();
    assert_eq!(w_of(&chosen), w_of(&Model::from_onnx_file(iris("relu.onnx")).unwrap()));
    assert_eq!(chosen.info().output_name, main);
    let head =
        Model::from_onnx_file_with(&path, &ImportOptions::default().with_output(hidden)).unwrap();
    assert_ne!(head.output_len(), chosen.output_len());
    let e = Model::from_onnx_file_with(&path, &ImportOptions::default().with_output("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no output `nope`"), "{e}");
    // the CLI: --output NAME, and the error listing the outputs
    let out = tmp.path().join("res");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            path.to_str().unwrap(),
            "--input",
            iris("inputs.npy").to_str().unwrap().to_string().leak(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_nnlin")).args(&args).output().unwrap()
    };
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("choose one (--output NAME)"));
    let o = run(&["--output", &main]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_softmax_before_shape_ops_is_trailing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = decode(&iris("relu.onnx"));
    let g = m.graph.as_mut().unwrap();
    let logits = g.output[0].name.clone().unwrap();
    let node = |op: &str, i: Vec<&str>, o: &str| proto::NodeProto {
        input: i.into_iter().map(String::from).collect(),
        output: vec![o.into()],
        name: Some(format!("{op}_n")),
        op_type: Some(op.into()),
        ..Default::default()
    };
    g.node.push(node("Softmax", vec![&logits], "probs"));
    g.node.push(node("Reshape", vec!["probs", "shape"], "probs2"));
    g.node.push(node("Identity", vec!["probs2"], "out"));
    g.initializer.push(proto::TensorProto {
        name: Some("shape".into()),
        dims: vec![2],
        data_type: Some(7),
        int64_data: vec![1, -1],
        ..Default::default()
    });
    g.output[0].name = Some("out".into());
    let path = tmp.path().join("sm.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let model = Model::from_onnx_file(&path).unwrap();
    assert_eq!(model.info().skipped_softmax.as_deref(), Some("Softmax"));
    assert_eq!(w_of(&model), w_of(&Model::from_onnx_file(iris("relu.onnx")).unwrap()));
}

#[test]
fn leaky_and_parametric_relu_report_their_pieces() {
    for name in ["leaky_relu.onnx", "prelu.onnx"] {
        let m = Model::from_onnx_file(iris(name)).unwrap();
        let xs = ndarray_npy::read_npy::<_, ndarray::Array2<f64>>(iris("inputs.npy")).unwrap();
        let mut below = 0;
        for x in xs.rows() {
            let lin = m.linearize(x.as_slice().unwrap(), &Options::default()).unwrap();
            for p in &lin.pattern {
                assert_eq!(p.active, p.mask.iter().filter(|&&b| b).count());
                below += p.total - p.active;
            }
        }
        assert!(below > 0, "{name}: every unit reported on the positive piece");
    }
}
