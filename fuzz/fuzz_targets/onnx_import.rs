//! ONNX import, what `inspect` prints, then compile and linearize at a fixed
//! input: `Ok` or `Err`,
//! never a panic, a hang or an allocation past the 64 MiB budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nnlin::{ImportOptions, Model, Options, Rows, Strategy};

const BUDGET: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let opts = ImportOptions::default().with_max_bytes(BUDGET);
    let Ok(model) = Model::from_onnx_bytes_with("fuzz", data, &opts) else { return };
    // what inspect prints: layer kinds and fused expressions
    for node in model.network().nodes() {
        if let nnlin::ir::Layer::Activation(a) = &node.layer {
            let _ = a.expr.to_string();
        }
    }
    let n = model.input_len();
    let x: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
    let _ = model.forward_reference(&x);
    let lin = Options::new()
                .with_rows(Rows::Top(1))
                .with_strategy(Strategy::Reverse)
                .with_max_memory(BUDGET);
    let _ = model.linearize(&x, &lin);
});
