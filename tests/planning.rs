//! The auto strategy without this machine's rates: a choice no plausible
//! rate can change is taken without measuring.

mod common;

use nnlin::plan::{self, Choice};
use nnlin::{Executed, Mode, Model, Options, Plan};

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

/// `Plan::execute` runs every plan to the same W and b (within rounding of
/// the other order) and names what ran: on a chain (LeNet-5) the program
/// runs as itself; on a DAG (a small ResNet) `dp` runs one of the others
/// and every cut's split runs as that split; reverse in f32 is reverse.
#[test]
fn every_plan_executes_to_the_same_w_and_says_what_ran() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/cnn/");
    for (file, chain) in [("lenet5.onnx", true), ("resnet_small.onnx", false)] {
        let m = Model::from_onnx_file(format!("{root}{file}")).unwrap();
        let x: Vec<f64> = (0..m.input_len()).map(|i| ((i * 37) % 255) as f64 / 255.0).collect();
        let inst = m.compile_instance(&x, Mode::Tangent).unwrap();
        let rows: Vec<usize> = (0..m.output_len()).collect();
        let (w0, b0, ran) = Plan::Reverse.execute::<f64>(&inst, &rows, nnlin::Par::Seq).unwrap();
        assert_eq!(ran, Executed::Reverse);
        let scale = w0.as_slice().iter().fold(1.0f64, |a, v| a.max(v.abs()));
        let close = |w: &nnlin::Block, b: &[f64], tol: f64, what: &str| {
            for (p, q) in w.as_slice().iter().zip(w0.as_slice()) {
                assert!((p - q).abs() <= tol * scale, "{file} {what}: W {p} vs {q}");
            }
            for (p, q) in b.iter().zip(&b0) {
                assert!((p - q).abs() <= tol * scale.max(q.abs()), "{file} {what}: b {p} vs {q}");
            }
        };
        let mut plans = vec![(Plan::Forward, Executed::Forward)];
        if chain {
            // (the DAG's dense factors are large: seconds)
            plans.push((Plan::Dense { max_bytes: usize::MAX }, Executed::Dense));
        }
        // the first and the last cut (each split forms a tangent of all
        // the inputs up to its cut)
        let cuts = plan::cut_values(&inst);
        for v in cuts.first().into_iter().chain(cuts.last()) {
            plans.push((Plan::Split(*v), Executed::Split(*v)));
        }
        for (p, want) in plans {
            let (w, b, ran) = p.execute::<f64>(&inst, &rows, nnlin::Par::Seq).unwrap();
            assert_eq!(ran, want, "{file}");
            close(&w, &b, 1e-10, &format!("{p:?}"));
        }
        let (w, b, ran) =
            Plan::Dp(plan::Rates::TYPICAL).execute::<f64>(&inst, &rows, nnlin::Par::Seq).unwrap();
        assert_eq!(ran == Executed::Dp, chain, "{file}: {ran}");
        close(&w, &b, 1e-10, "dp");
        let (w, b, ran) = Plan::Reverse.execute::<f32>(&inst, &rows, nnlin::Par::Seq).unwrap();
        assert_eq!(ran, Executed::Reverse);
        close(&w, &b, 1e-4, "reverse f32");
        let small = Plan::Dense { max_bytes: 1 };
        assert!(matches!(
            small.execute::<f64>(&inst, &rows, nnlin::Par::Seq),
            Err(plan::PlanError::Dense(_))
        ));
        assert!(matches!(
            Plan::Reverse.execute::<f64>(&inst, &[m.output_len()], nnlin::Par::Seq),
            Err(plan::PlanError::Compile(_))
        ));
    }
}
