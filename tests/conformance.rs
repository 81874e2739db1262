//! ONNX's own conformance data (`fixtures/conformance.py` copies the cases
//! of the `onnx` wheel's `pytorch-converted` and `pytorch-operator` suites
//! whose ops nnlin supports): per instance, W·x + b and the reference
//! interpreter both reproduce the expected output (float32 data, so 1e-5
//! relative to the output's scale).

use std::path::PathBuf;

use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use nnlin::{Model, Options, Strategy};

#[test]
fn conformance_cases_pass() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/conformance");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["kept"].as_object().unwrap();
    assert!(cases.len() >= 50, "only {} conformance cases", cases.len());
    let mut failures = vec![];
    let mut worst: f64 = 0.0;
    for case in cases.keys() {
        let d = dir.join(case);
        let model = match Model::from_onnx_file(d.join("model.onnx")) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{case}: {e}"));
                continue;
            }
        };
        let read =
            |f: &str| ArrayD::<f64>::read_npy(std::fs::File::open(d.join(f)).unwrap()).unwrap();
        let (x, y) = (read("input.npy"), read("output.npy"));
        let n = model.input_len();
        let count = x.len() / n;
        let xs = x.into_shape_with_order((count, n)).unwrap();
        let ys = y.into_shape_with_order((count, model.output_len())).unwrap();
        for strategy in [Strategy::Reverse, Strategy::Forward] {
            for k in 0..count {
                let xk = xs.row(k).to_vec();
                let lin = match model.linearize(&xk, &Options::default().with_strategy(strategy)) {
                    Ok(l) => l,
                    Err(e) => {
                        failures.push(format!("{case}: {e}"));
                        break;
                    }
                };
                let f = model.forward_reference(&xk);
                let scale = ys.row(k).iter().fold(1.0f64, |a, v| a.max(v.abs()));
                for (i, &r) in lin.rows.iter().enumerate() {
                    let wx: f64 =
                        lin.w.row(i).iter().zip(&xk).map(|(a, b)| a * b).sum::<f64>() + lin.b[i];
                    let e = (wx - ys[(k, r)]).abs().max((f[r] - ys[(k, r)]).abs()) / scale;
                    worst = worst.max(e);
                    if e > 1e-5 {
                        failures.push(format!("{case} instance {k} output {r}: W·x + b = {wx}, reference {}, expected {}", f[r], ys[(k, r)]));
                        break;
                    }
                }
            }
        }
    }
    eprintln!("{} conformance cases, largest relative error {worst:e}", cases.len());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
