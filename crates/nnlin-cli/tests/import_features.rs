//! Import of real exports: external data (read only inside the model's
//! folder), graphs with several outputs, a softmax followed by shape ops, and
//! the activation pattern of LeakyReLU/PReLU layers.

use std::path::{Path, PathBuf};

use nnlin::{ImportOptions, Model, Options};
use nnlin_onnx::proto;
use prost::Message;

fn iris(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/iris").join(name)
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
            r.to_vec()
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

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::onnx::{floats, int, int64s, ints, model, node};

/// Imports `bytes` (input x of 6 elements through Tanh, then the op under
/// test) and checks F(x) and W against the expected selection: output i is
/// tanh(x[src[i]]), or the constant `fill[i]` where `src[i]` is `None`.
fn check_select(bytes: &[u8], src: &[Option<usize>], fill: &[f64]) {
    let m = Model::from_onnx_bytes("select", bytes).unwrap();
    let x = [0.3, -0.7, 1.1, 0.05, -1.3, 0.6];
    let f = m.forward_reference(&x);
    assert_eq!(f.len(), src.len());
    let lin = m.linearize(&x, &Options::default()).unwrap();
    for (i, s) in src.iter().enumerate() {
        let want = match s {
            Some(j) => x[*j].tanh(),
            None => fill[i],
        };
        assert!((f[i] - want).abs() < 1e-15, "F[{i}] = {}, want {want}", f[i]);
        for j in 0..6 {
            let dw = if *s == Some(j) { 1.0 - x[j].tanh().powi(2) } else { 0.0 };
            assert!(
                (lin.w[(i, j)] - dw).abs() < 1e-15,
                "W[{i},{j}] = {}, want {dw}",
                lin.w[(i, j)]
            );
        }
        let wx: f64 = (0..6).map(|j| lin.w[(i, j)] * x[j]).sum();
        assert!((wx + lin.b[i] - f[i]).abs() < 1e-14);
    }
}

fn tanh_then(
    nodes: Vec<nnlin_onnx::proto::NodeProto>,
    inits: Vec<nnlin_onnx::proto::TensorProto>,
    input: &[i64],
) -> Vec<u8> {
    let mut all = vec![node("Tanh", &["x"], &["t"], vec![])];
    all.extend(nodes);
    model(17, input, all, inits)
}

#[test]
fn slices_of_activations_are_selections() {
    // t[:, 1:6:2] and a negative step t[:, 4:0:-3]
    let b = tanh_then(
        vec![node("Slice", &["t", "s", "e", "a", "st"], &["y"], vec![])],
        vec![
            int64s("s", &[1], &[1]),
            int64s("e", &[1], &[6]),
            int64s("a", &[1], &[1]),
            int64s("st", &[1], &[2]),
        ],
        &[1, 6],
    );
    check_select(&b, &[Some(1), Some(3), Some(5)], &[]);
    let b = tanh_then(
        vec![node("Slice", &["t", "s", "e", "a", "st"], &["y"], vec![])],
        vec![
            int64s("s", &[1], &[4]),
            int64s("e", &[1], &[0]),
            int64s("a", &[1], &[-1]),
            int64s("st", &[1], &[-3]),
        ],
        &[1, 6],
    );
    check_select(&b, &[Some(4), Some(1)], &[]);
}

#[test]
fn splits_gathers_expands_and_tiles_are_selections() {
    // Split [1, 6] along axis 1 into 2 + 4: the second part
    let b = tanh_then(
        vec![node("Split", &["t", "sp"], &["a", "y"], vec![int("axis", 1)])],
        vec![int64s("sp", &[2], &[2, 4])],
        &[1, 6],
    );
    check_select(&b, &[Some(2), Some(3), Some(4), Some(5)], &[]);
    // Gather on axis 1 of [1, 2, 3] with indices [[2, 0], [-1, 1]]
    let b = tanh_then(
        vec![node("Gather", &["t", "i"], &["y"], vec![int("axis", 2)])],
        vec![int64s("i", &[2, 2], &[2, 0, -1, 1])],
        &[1, 2, 3],
    );
    check_select(
        &b,
        &[Some(2), Some(0), Some(2), Some(1), Some(5), Some(3), Some(5), Some(4)],
        &[],
    );
    // Expand [1, 2, 3] to [2, 2, 3]
    let b = tanh_then(
        vec![node("Expand", &["t", "sh"], &["y"], vec![])],
        vec![int64s("sh", &[3], &[2, 1, 3])],
        &[1, 2, 3],
    );
    let twice: Vec<Option<usize>> = (0..12).map(|k| Some(k % 6)).collect();
    check_select(&b, &twice, &[]);
    // Tile [1, 2, 3] by [1, 1, 2]
    let b = tanh_then(
        vec![node("Tile", &["t", "r"], &["y"], vec![])],
        vec![int64s("r", &[3], &[1, 1, 2])],
        &[1, 2, 3],
    );
    let tiled = [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5].map(Some);
    check_select(&b, &tiled, &[]);
}

#[test]
fn concats_and_wheres_with_constants_are_selections() {
    // a class token: Concat(const [1, 1, 3], t [1, 2, 3]) on axis 1
    let b = tanh_then(
        vec![node("Concat", &["c", "t"], &["y"], vec![int("axis", 1)])],
        vec![floats("c", &[1, 1, 3], &[0.5, -0.25, 2.0])],
        &[1, 2, 3],
    );
    let mut src = vec![None, None, None];
    src.extend((0..6).map(Some));
    check_select(&b, &src, &[0.5, -0.25, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // Where(const cond, t, 7)
    let cond = nnlin_onnx::proto::TensorProto {
        name: Some("cond".into()),
        dims: vec![1, 6],
        data_type: Some(9),
        int32_data: vec![1, 0, 0, 1, 1, 0],
        ..Default::default()
    };
    let b = tanh_then(
        vec![node("Where", &["cond", "t", "seven"], &["y"], vec![])],
        vec![cond, floats("seven", &[], &[7.0])],
        &[1, 6],
    );
    check_select(
        &b,
        &[Some(0), None, None, Some(3), Some(4), None],
        &[0.0, 7.0, 7.0, 0.0, 0.0, 7.0],
    );
    // a condition that depends on the input is refused with one line
    let b = tanh_then(
        vec![node("Where", &["t", "t", "seven"], &["y"], vec![])],
        vec![floats("seven", &[], &[7.0])],
        &[1, 6],
    );
    let e = Model::from_onnx_bytes("w", &b).unwrap_err().to_string();
    assert!(e.contains("input 0 must be a constant"), "{e}");
    let _ = ints; // (shared builders)
}

#[test]
fn gates_and_divisions_are_products() {
    use nnlin::ir::reference;
    // squeeze-and-excitation: y = tanh(x) ⊙ sigmoid(mean over space of x)
    let se = model(
        17,
        &[1, 2, 2, 2],
        vec![
            node("Tanh", &["x"], &["t"], vec![]),
            node("GlobalAveragePool", &["x"], &["p"], vec![]),
            node("Sigmoid", &["p"], &["s"], vec![]),
            node("Mul", &["s", "t"], &["y"], vec![]),
        ],
        vec![],
    );
    // a division by an activation: y = tanh(x) / (1 + sigmoid(x))
    let div = model(
        17,
        &[1, 8],
        vec![
            node("Tanh", &["x"], &["t"], vec![]),
            node("Sigmoid", &["x"], &["s"], vec![]),
            node("Add", &["s", "one"], &["d"], vec![]),
            node("Relu", &["d"], &["r"], vec![]),
            node("Div", &["t", "r"], &["y"], vec![]),
        ],
        vec![floats("one", &[], &[1.0])],
    );
    let x = [0.3, -0.7, 1.1, 0.05, -1.3, 0.6, 0.2, -0.4];
    for bytes in [se, div] {
        let m = Model::from_onnx_bytes("gate", &bytes).unwrap();
        let (f, jac) = reference::jacobian(m.network(), &x);
        for mode in [nnlin::Mode::Tangent, nnlin::Mode::Secant] {
            let lin = m.linearize(&x, &Options::default().with_mode(mode)).unwrap();
            for i in 0..f.len() {
                let wx: f64 = (0..8).map(|j| lin.w[(i, j)] * x[j]).sum();
                assert!((wx + lin.b[i] - f[i]).abs() < 1e-14, "{mode:?}: W·x + b != F");
                for j in 0..8 {
                    if mode == nnlin::Mode::Tangent {
                        assert!(
                            (lin.w[(i, j)] - jac[i * 8 + j]).abs() < 1e-14,
                            "W is not the Jacobian"
                        );
                    }
                }
            }
        }
        // F itself, independently: the SE output at element 0 and the quotient
        let f0 = if m.network().input_shape().len() == 4 {
            let mean = (x[0] + x[1] + x[2] + x[3]) / 4.0;
            x[0].tanh() / (1.0 + (-mean).exp())
        } else {
            x[0].tanh() / (1.0 + 1.0 / (1.0 + (-x[0]).exp()))
        };
        assert!((f[0] - f0).abs() < 1e-15);
    }
}

/// Imports, checks F against `expected`, W against the dual Jacobian
/// (tangent) and W·x + b = F (both modes).
fn check_model(bytes: &[u8], x: &[f64], expected: &[f64]) {
    use nnlin::ir::reference;
    let m = Model::from_onnx_bytes("m", bytes).unwrap();
    let (f, jac) = reference::jacobian(m.network(), x);
    assert_eq!(f.len(), expected.len());
    for (a, b) in f.iter().zip(expected) {
        assert!((a - b).abs() < 1e-12, "F = {a}, expected {b}");
    }
    let n = x.len();
    for mode in [nnlin::Mode::Tangent, nnlin::Mode::Secant] {
        let lin = m.linearize(x, &Options::default().with_mode(mode)).unwrap();
        for i in 0..f.len() {
            let wx: f64 = (0..n).map(|j| lin.w[(i, j)] * x[j]).sum();
            assert!((wx + lin.b[i] - f[i]).abs() < 1e-12, "{mode:?}: W·x + b != F");
            if mode == nnlin::Mode::Tangent {
                for j in 0..n {
                    assert!(
                        (lin.w[(i, j)] - jac[i * n + j]).abs() < 1e-12,
                        "W is not the Jacobian"
                    );
                }
            }
        }
    }
}

/// (v − mean) / √(var + ε) of one group.
fn normalized(v: &[f64], eps: f64) -> Vec<f64> {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
    v.iter().map(|a| (a - mean) / (var + eps).sqrt()).collect()
}

#[test]
fn normalizations_are_exact() {
    let x: Vec<f64> = (0..12).map(|k| ((k * 7 % 12) as f64 - 5.5) / 3.0).collect();
    // LayerNormalization over the last axis of [1, 3, 4], scale and bias per feature
    let ln = model(
        17,
        &[1, 3, 4],
        vec![node("LayerNormalization", &["x", "g", "b"], &["y"], vec![int("axis", -1)])],
        vec![
            floats("g", &[4], &[1.0, 2.0, -0.5, 0.25]),
            floats("b", &[4], &[0.125, 0.0, -0.25, 0.375]),
        ],
    );
    let (g, b) = ([1.0, 2.0, -0.5, 0.25], [0.125, 0.0, -0.25, 0.375]);
    let want: Vec<f64> = x
        .chunks(4)
        .flat_map(|row| {
            normalized(row, 1e-5)
                .into_iter()
                .enumerate()
                .map(|(k, v)| v * g[k] + b[k])
                .collect::<Vec<_>>()
        })
        .collect();
    check_model(&ln, &x, &want);
    // the same, decomposed as exporters write it
    let decomposed = model(
        17,
        &[1, 3, 4],
        vec![
            node("ReduceMean", &["x", "ax"], &["m"], vec![]),
            node("Sub", &["x", "m"], &["c"], vec![]),
            node("Pow", &["c", "two"], &["c2"], vec![]),
            node("ReduceMean", &["c2", "ax"], &["v"], vec![]),
            node("Add", &["v", "eps"], &["ve"], vec![]),
            node("Sqrt", &["ve"], &["sd"], vec![]),
            node("Div", &["c", "sd"], &["n"], vec![]),
            node("Mul", &["n", "g"], &["ng"], vec![]),
            node("Add", &["ng", "b"], &["y"], vec![]),
        ],
        vec![
            int64s("ax", &[1], &[-1]),
            floats("two", &[], &[2.0]),
            floats("eps", &[], &[1e-5]),
            floats("g", &[4], &[1.0, 2.0, -0.5, 0.25]),
            floats("b", &[4], &[0.125, 0.0, -0.25, 0.375]),
        ],
    );
    let m = Model::from_onnx_bytes("d", &decomposed).unwrap();
    let fd = m.forward_reference(&x);
    for (a, w) in fd.iter().zip(&want) {
        // eps was written as a float32 literal
        assert!((a - w).abs() < 1e-6, "{a} vs {w}");
    }
    check_model(&decomposed, &x, &fd);
    // InstanceNormalization on [1, 3, 2, 2]: per channel over space
    let inorm = model(
        17,
        &[1, 3, 2, 2],
        vec![node("InstanceNormalization", &["x", "g", "b"], &["y"], vec![])],
        vec![floats("g", &[3], &[1.0, -2.0, 0.5]), floats("b", &[3], &[0.0, 1.0, -1.0])],
    );
    let want: Vec<f64> = x
        .chunks(4)
        .enumerate()
        .flat_map(|(c, ch)| {
            let (g, b) = ([1.0, -2.0, 0.5][c], [0.0, 1.0, -1.0][c]);
            normalized(ch, 1e-5).into_iter().map(move |v| v * g + b)
        })
        .collect();
    check_model(&inorm, &x, &want);
    // GroupNormalization: 4 channels in 2 groups, per-channel scale (opset 21)
    let x16: Vec<f64> = (0..16).map(|k| ((k * 5 % 16) as f64 - 7.5) / 4.0).collect();
    let gn = model(
        21,
        &[1, 4, 2, 2],
        vec![node("GroupNormalization", &["x", "g", "b"], &["y"], vec![int("num_groups", 2)])],
        vec![floats("g", &[4], &[1.0, 2.0, 3.0, 4.0]), floats("b", &[4], &[0.5, 0.0, 0.0, -0.5])],
    );
    let want: Vec<f64> = x16
        .chunks(8)
        .flat_map(|grp| normalized(grp, 1e-5))
        .enumerate()
        .map(|(i, v)| v * [1.0, 2.0, 3.0, 4.0][i / 4] + [0.5, 0.0, 0.0, -0.5][i / 4])
        .collect();
    check_model(&gn, &x16, &want);
}

#[test]
fn reductions_over_any_axes() {
    let x: Vec<f64> = (0..24).map(|k| k as f64 * 0.1 - 1.0).collect();
    // ReduceSum over axis 1 of [2, 3, 4] (keepdims 0) → [2, 4]; the batch axis
    // is fixed to 1 only for rank ≥ 2 inputs, so use [1, 6, 4] as [1, 2·3, 4]
    let rs = model(
        17,
        &[1, 6, 4],
        vec![node("ReduceSum", &["x", "ax"], &["y"], vec![int("keepdims", 0)])],
        vec![int64s("ax", &[1], &[1])],
    );
    let want: Vec<f64> = (0..4).map(|c| (0..6).map(|r| x[r * 4 + c]).sum()).collect();
    check_model(&rs, &x, &want);
    let rm = model(
        17,
        &[1, 6, 4],
        vec![node("ReduceMean", &["x"], &["y"], vec![ints("axes", &[1, 2])])],
        vec![],
    );
    check_model(&rm, &x, &[x.iter().sum::<f64>() / 24.0]);
}

#[test]
fn attention_is_exact() {
    // one head over 4 tokens of width 3: softmax(Q·Kᵀ/√3)·V, Q = x·Wq, …
    let wq = [0.5f32, -0.25, 0.125, 0.75, 0.5, -0.5, 0.25, 0.0, 1.0];
    let wk = [0.25f32, 0.5, -0.75, 0.0, 1.0, 0.5, -0.25, 0.125, 0.5];
    let wv = [1.0f32, 0.0, 0.5, -0.5, 0.25, 0.0, 0.125, 0.75, -1.0];
    let attn = model(
        17,
        &[1, 4, 3],
        vec![
            node("MatMul", &["x", "wq"], &["q"], vec![]),
            node("MatMul", &["x", "wk"], &["k"], vec![]),
            node("MatMul", &["x", "wv"], &["v"], vec![]),
            node("Transpose", &["k"], &["kt"], vec![ints("perm", &[0, 2, 1])]),
            node("MatMul", &["q", "kt"], &["s"], vec![]),
            node("Div", &["s", "scale"], &["ss"], vec![]),
            node("Softmax", &["ss"], &["p"], vec![int("axis", -1)]),
            node("MatMul", &["p", "v"], &["o"], vec![]),
            node("Tanh", &["o"], &["y"], vec![]),
        ],
        vec![
            floats("wq", &[3, 3], &wq),
            floats("wk", &[3, 3], &wk),
            floats("wv", &[3, 3], &wv),
            floats("scale", &[], &[2.0]),
        ],
    );
    let x: Vec<f64> = (0..12).map(|k| ((k * 5 % 12) as f64 - 5.5) / 4.0).collect();
    let mm = |a: &[f64], w: &[f32]| -> Vec<f64> {
        (0..4)
            .flat_map(|t| {
                (0..3).map(move |j| {
                    (0..3).map(|q| a[t * 3 + q] * f64::from(w[q * 3 + j])).sum::<f64>()
                })
            })
            .collect()
    };
    let (q, k, v) = (mm(&x, &wq), mm(&x, &wk), mm(&x, &wv));
    let mut want = vec![];
    for t in 0..4 {
        let s: Vec<f64> = (0..4)
            .map(|u| (0..3).map(|d| q[t * 3 + d] * k[u * 3 + d]).sum::<f64>() / 2.0)
            .collect();
        let top = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - top).exp()).collect();
        let sum: f64 = e.iter().sum();
        for d in 0..3 {
            want.push((0..4).map(|u| e[u] / sum * v[u * 3 + d]).sum::<f64>().tanh());
        }
    }
    check_model(&attn, &x, &want);
    // the same softmax is still skipped where it is the graph output
    let m = Model::from_onnx_bytes("a", &attn).unwrap();
    assert!(m.info().skipped_softmax.is_none());
}
