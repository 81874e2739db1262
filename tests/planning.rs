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

fn fixture(name: &str) -> Model {
    Model::from_onnx_file(format!("{}/fixtures/cnn/{name}.onnx", env!("CARGO_MANIFEST_DIR")))
        .unwrap()
}

/// `count` seeded inputs of length `n` in [0, 1).
fn inputs(count: usize, n: usize) -> ndarray::Array2<f64> {
    let mut rng = common::Rng(7);
    ndarray::Array2::from_shape_fn((count, n), |_| (rng.next() + 1.0) / 2.0)
}

#[test]
fn the_planner_batches_a_perceptron_and_not_a_sparse_cnn() {
    // LeNet-300-100's reverse products are 10-row GEMMs against its weights:
    // stacking instances amortizes each call's pass over them. LeNet-5's
    // time is in its convolutions' sparse kernels, which a stack would lose.
    let rates = plan::Rates::TYPICAL;
    let mlp = fixture("lenet300");
    let x = inputs(1, 784).row(0).to_vec();
    let inst = mlp.compile_instance(&x, Mode::Tangent).unwrap();
    let w = plan::batch_width(&inst, 10, 1000, 2, &rates, usize::MAX);
    assert!(w > 1, "width {w}");
    assert!(plan::batch_seconds(&inst, 10, w, &rates) < plan::batch_seconds(&inst, 10, 1, &rates));
    // never more batches than instances allow per thread, nor past the budget
    assert_eq!(plan::batch_width(&inst, 10, 3, 2, &rates, usize::MAX), 2);
    assert_eq!(plan::batch_width(&inst, 10, 1000, 2, &rates, 0), 1);
    let (cnn, x) = lenet();
    let inst = cnn.compile_instance(&x, Mode::Tangent).unwrap();
    assert_eq!(plan::batch_width(&inst, 10, 1000, 2, &rates, usize::MAX), 1);
    // before compiling an instance: worth pricing for the perceptron, not
    // for a wide convolution whose products dwarf its weights
    assert!(plan::batching_may_pay(&nnlin::Compiler::new(mlp.network()), 10, &rates));
    use nnlin::ir::{Conv, Layer, Network, ValueId, Window};
    let mut net = Network::new(vec![1, 64, 32, 32]);
    let window = Window::new((32, 32), (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), false).unwrap();
    let conv = Conv {
        window,
        c_in: 64,
        c_out: 64,
        groups: 1,
        weight: std::sync::Arc::new(vec![0.01; 64 * 64 * 9]),
        bias: None,
        one_d: false,
    };
    net.push("conv", "Conv", Layer::Conv(conv), vec![ValueId(0)]).unwrap();
    assert!(!plan::batching_may_pay(&nnlin::Compiler::new(&net), 10, &rates));
}

#[test]
fn batched_instances_agree_with_one_at_a_time_and_say_so() {
    use nnlin::{Batch, Linearize, Precision, Rows};
    let xs = inputs(7, 784);
    for (name, precision, tol) in [
        ("lenet300", Precision::F64, 1e-12),
        ("lenet5", Precision::F64, 1e-12),
        ("lenet5", Precision::F32, 1e-5),
    ] {
        let m = fixture(name);
        for rows in [Rows::All, Rows::Top(1)] {
            let opts = Options::new().with_precision(precision).with_rows(rows.clone());
            let one =
                m.linearize_batch(xs.view(), &opts.clone().with_batch(Batch::Width(1))).unwrap();
            let three = m.linearize_batch(xs.view(), &opts.with_batch(Batch::Width(3))).unwrap();
            for (k, (a, b)) in one.iter().zip(&three).enumerate() {
                assert_eq!(a.batch, 1);
                // 7 instances in batches of 3: the last one alone
                assert_eq!(b.batch, if k < 6 { 3 } else { 1 }, "{name} instance {k}");
                assert_eq!(a.rows, b.rows);
                assert_eq!(a.output, b.output);
                assert_eq!(b.plans, vec![Executed::Reverse]);
                let scale = a.w.iter().fold(1.0f64, |s, v| s.max(v.abs()));
                let dw = (&a.w - &b.w).iter().fold(0.0f64, |s, v| s.max(v.abs()));
                let db = (&a.b - &b.b).iter().fold(0.0f64, |s, v| s.max(v.abs()));
                assert!(dw <= tol * scale && db <= tol * scale, "{name} {precision}: {dw} {db}");
                if precision == Precision::F32 {
                    assert!(b.w.iter().all(|&v| f64::from(v as f32) == v));
                }
            }
            // streaming hands over the same instances, each once
            let seen = std::sync::Mutex::new(vec![0usize; xs.nrows()]);
            m.linearize_batch_with(xs.view(), &opts_for(precision, &rows), &|k, lin| {
                assert_eq!(lin.w, three[k].w);
                seen.lock().unwrap()[k] += 1;
                Ok(())
            })
            .unwrap();
            assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
        }
    }
    // other plans and ensembles run one at a time
    let m = fixture("lenet300");
    let fwd = Options::new().with_strategy(nnlin::Strategy::Forward).with_batch(Batch::Width(4));
    assert!(m.linearize_batch(xs.view(), &fwd).unwrap().iter().all(|l| l.batch == 1));
    let pair = nnlin::Ensemble::new(vec![(m.clone(), 0.5), (m, 0.5)]).unwrap();
    let opts = Options::new().with_batch(Batch::Width(4));
    assert!(pair.linearize_batch(xs.view(), &opts).unwrap().iter().all(|l| l.batch == 1));
}

fn opts_for(precision: nnlin::Precision, rows: &nnlin::Rows) -> Options {
    Options::new()
        .with_precision(precision)
        .with_rows(rows.clone())
        .with_batch(nnlin::Batch::Width(3))
}

#[test]
fn a_batch_refuses_instances_it_cannot_stack() {
    use nnlin::batch::accumulate_reverse_batch;
    let (a, x) = lenet();
    let b = fixture("lenet300");
    let ia = a.compile_instance(&x, Mode::Tangent).unwrap();
    let ib = b.compile_instance(&x, Mode::Tangent).unwrap();
    let err = accumulate_reverse_batch::<f64>(&[&ia, &ib], &[&[0], &[0]], faer::Par::Seq);
    assert!(matches!(err, Err(nnlin::CompileError::Batch { .. })), "{err:?}");
    let ia2 = a.compile_instance(&x, Mode::Tangent).unwrap();
    let err = accumulate_reverse_batch::<f64>(&[&ia, &ia2], &[&[0, 1], &[0]], faer::Par::Seq);
    assert!(matches!(err, Err(nnlin::CompileError::Batch { .. })), "{err:?}");
    let err = accumulate_reverse_batch::<f64>(&[&ia, &ia2], &[&[0], &[10]], faer::Par::Seq);
    assert!(matches!(err, Err(nnlin::CompileError::RowOutOfRange { row: 10, .. })), "{err:?}");
    assert!(accumulate_reverse_batch::<f64>(&[], &[], faer::Par::Seq).unwrap().is_empty());
}
