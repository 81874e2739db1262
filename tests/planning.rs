//! The auto strategy without this machine's rates: a choice no plausible
//! rate can change is taken without measuring.

mod common;

use nnlin::plan::{self, Choice};
use nnlin::{Executed, Mode, Model, Options};

fn lenet() -> (Model, Vec<f64>) {
    let m = Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/cnn/lenet5.onnx"))
        .unwrap();
    let x = (0..784).map(|i| ((i * 37) % 255) as f64 / 255.0).collect();
    (m, x)
}

#[test]
fn a_clear_choice_does_not_depend_on_the_rates() {
    let (m, x) = lenet();
    let inst = m.compile_instance(&x, Mode::Tangent).unwrap();
    // 10 rows against 784 inputs: reverse under every rate in the box
    assert_eq!(plan::rate_independent(&inst, 10), Some(Choice::Reverse));
    // measured-when-needed rates then give the typical rates' result, bit for bit
    let typical = m.linearize(&x, &Options::new()).unwrap();
    let lazy = m.linearize(&x, &Options::new().with_measured_rates()).unwrap();
    assert_eq!(lazy.plans, vec![Executed::Reverse]);
    assert_eq!(lazy.w, typical.w);
    assert_eq!(lazy.b, typical.b);
}

#[test]
fn a_close_choice_is_left_to_measured_rates() {
    // the 256-256-2-256-256 chain with all 256 rows: the chain program wins
    // by a margin that the rates decide
    let (net, x) = common::bottleneck_chain();
    let m = Model::from_network("bottleneck", net);
    let inst = m.compile_instance(&x, Mode::Tangent).unwrap();
    assert_eq!(plan::rate_independent(&inst, 256), None);
    let lin = m.linearize(&x, &Options::new().with_measured_rates()).unwrap();
    let f = m.forward_reference(&x);
    assert!(lin.residual(&lin.wx(&x), &f) < 1e-10);
}
