//! Every input the fuzz campaigns (`fuzz/`) crashed on, replayed on the
//! stable toolchain: ONNX files through import + linearize, `.npy` and IDX
//! files and option strings through the CLI. Each must give `Ok` or one
//! error line, never a panic (exit 101) or an abort.

use std::path::{Path, PathBuf};
use std::process::Command;

use nnlin::{ImportOptions, Model, Options, Rows, Strategy};

fn inputs(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions").join(kind);
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs the CLI and checks it ended with success or one error line.
fn no_panic(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_nnlin")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{args:?}: {:?}\n{err}", o.status);
    if !o.status.success() {
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn onnx_findings() {
    for path in inputs("onnx") {
        let bytes = std::fs::read(&path).unwrap();
        let opts = ImportOptions::default().with_max_bytes(64 << 20);
        if let Ok(m) = Model::from_onnx_bytes_with("finding", &bytes, &opts) {
            let x: Vec<f64> =
                (0..m.input_len()).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
            let _ = m.forward_reference(&x);
            let lin = Options::new()
                .with_rows(Rows::Top(1))
                .with_strategy(Strategy::Reverse)
                .with_max_memory(64 << 20);
            let _ = m.linearize(&x, &lin);
        }
    }
}

#[test]
fn input_file_findings() {
    let model =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/iris/relu.onnx");
    let tmp = tempfile::tempdir().unwrap();
    for (kind, name) in [("npy", "x.npy"), ("idx", "x-idx3-ubyte.gz")] {
        for path in inputs(kind) {
            let x = tmp.path().join(name);
            std::fs::copy(&path, &x).unwrap();
            let out = tmp.path().join("out");
            no_panic(&[
                "explain",
                model.to_str().unwrap(),
                "--input",
                x.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--max-memory",
                "64M",
            ]);
            let labels = tmp.path().join(if kind == "npy" { "y.npy" } else { "y-idx1-ubyte.gz" });
            std::fs::copy(&path, &labels).unwrap();
            let data = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .join("fixtures/iris/inputs.npy");
            no_panic(&[
                "decompose",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--labels",
                labels.to_str().unwrap(),
                "--max-memory",
                "64M",
            ]);
        }
    }
}

#[test]
fn option_findings() {
    let model =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/iris/relu.onnx");
    let data =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures/iris/inputs.npy");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for path in inputs("options") {
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        let (m, d, o) = (model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
        no_panic(&["explain", m, "--input", d, "--out", o, "--rows", &text]);
        no_panic(&["explain", m, m, "--input", d, "--out", o, "--weights", &text]);
        no_panic(&["explain", m, "--input", &format!("{d}{text}"), "--out", o]);
        no_panic(&["explain", m, "--input", d, "--out", o, "--max-memory", &text]);
    }
}
