//! Composition strategies: every strategy gives the same W and b; the chain
//! DP beats both fixed orders on a chain with a 2-unit bottleneck; results
//! do not depend on the thread count; `nnlin plan` prints a stable plan
//! (golden file).

use std::path::PathBuf;

use ndarray::{Array2, ArrayD};
use ndarray_npy::ReadNpyExt;
use nnlin::{Ensemble, Executed, Mode, Model, Options, Rows, Strategy};

#[path = "../../../tests/common/mod.rs"]
mod common;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("fixtures")
}

fn mnist(range: std::ops::Range<usize>) -> Array2<f64> {
    let gz = std::fs::read(root().join("data/mnist/t10k-images-idx3-ubyte.gz")).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut raw).unwrap();
    let n = range.len();
    Array2::from_shape_fn((n, 784), |(k, p)| {
        f64::from(raw[16 + (range.start + k) * 784 + p]) / 255.0
    })
}

fn same(a: &nnlin::Linearization, b: &nnlin::Linearization, what: &str) {
    let scale = a.w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (p, q) in a.w.iter().zip(&b.w) {
        assert!((p - q).abs() <= 1e-11 * scale, "{what}: W {p} vs {q}");
    }
    for (p, q) in a.b.iter().zip(&b.b) {
        assert!((p - q).abs() <= 1e-11 * scale.max(p.abs()), "{what}: b {p} vs {q}");
    }
}

#[test]
fn every_strategy_gives_the_same_w_and_b() {
    let xs = mnist(0..2);
    for name in ["lenet5", "lenet300", "resnet_small", "densenet_small"] {
        let m = Model::from_onnx_file(root().join(format!("cnn/{name}.onnx"))).unwrap();
        for k in 0..xs.nrows() {
            let x = xs.row(k).to_vec();
            let base =
                m.linearize(&x, &Options::default().with_strategy(Strategy::Reverse)).unwrap();
            // the dense baseline multiplies n × n-sized dense factors: only
            // on the fully connected network here (it is benchmarked, not
            // tested, on the CNNs)
            let dense: &[Strategy] = if name == "lenet300" { &[Strategy::Dense] } else { &[] };
            for &s in [Strategy::Forward, Strategy::Auto, Strategy::Dp].iter().chain(dense) {
                let opts =
                    Options::new().with_strategy(s).with_rows(Rows::All).with_mode(Mode::Tangent);
                match m.linearize(&x, &opts) {
                    Ok(l) => {
                        same(&base, &l, &format!("{name} {s:?}"));
                        // the plan reported is the plan that ran
                        let chain = !name.contains("net_small");
                        let ran = l.plans[0];
                        match s {
                            Strategy::Forward => assert_eq!(ran, Executed::Forward),
                            Strategy::Dense => assert_eq!(ran, Executed::Dense),
                            Strategy::Dp if chain => assert_eq!(ran, Executed::Dp),
                            // a DAG's dp runs the planner's pick
                            Strategy::Dp | Strategy::Auto => assert!(
                                !matches!(ran, Executed::Dense | Executed::Dp) || chain,
                                "{name} {s:?}: {ran}"
                            ),
                            Strategy::Reverse => unreachable!("the baseline"),
                        }
                        assert_eq!(l.plans.len(), 1);
                    }
                    Err(e) => {
                        // only dp may refuse, and only on branching networks
                        assert_eq!(s, Strategy::Dp, "{name} {s:?}: {e}");
                        assert!(
                            name.contains("net_small") && e.to_string().contains("chain"),
                            "{e}"
                        );
                    }
                }
            }
        }
    }
    let x: Vec<f64> =
        ArrayD::<f64>::read_npy(std::fs::File::open(root().join("iris/inputs.npy")).unwrap())
            .unwrap()
            .iter()
            .take(4)
            .copied()
            .collect();
    for name in ["relu", "gelu", "relu_matmul"] {
        let m = Model::from_onnx_file(root().join(format!("iris/{name}.onnx"))).unwrap();
        let base = m.linearize(&x, &Options::default().with_strategy(Strategy::Reverse)).unwrap();
        for s in [Strategy::Forward, Strategy::Dp, Strategy::Dense] {
            same(&base, &m.linearize(&x, &Options::default().with_strategy(s)).unwrap(), name);
        }
    }
}

/// A chain 256 → 256 → 2 → 256 → 256 (dense, ReLU): reverse pushes 256 rows
/// through the wide layers, forward 256 columns; splitting at the 2-unit
/// bottleneck is far cheaper, and the DP finds it.
#[test]
fn dp_splits_at_a_bottleneck() {
    let (net, x) = common::bottleneck_chain();
    let m = Model::from_network("bottleneck", net);
    let inst = m.compile_instance(&x, Mode::Tangent).unwrap();
    let rates = nnlin::plan::Rates { gemm: 1e10, sparse: 1e9, bandwidth: 1e10 };
    let (text, best) = nnlin::plan::describe(&inst, 256, &rates);
    assert_eq!(best, "dp", "{text}");
    let r = nnlin::plan::direction_cost(&inst, 256, nnlin::Direction::Reverse).flops();
    let f = nnlin::plan::direction_cost(&inst, 256, nnlin::Direction::Forward).flops();
    let mut fac = nnlin::plan::chain_factors(&inst).unwrap();
    fac.push(std::sync::Arc::new(nnlin::linalg::Operator::Selection(
        nnlin::linalg::Selection::new(256, (0..256).collect()).expect("indices within the input"),
    )));
    let (tree, cost) = nnlin::plan::chain_plan(&fac, &rates);
    assert!(
        cost.flops() < 0.1 * r.min(f),
        "dp {} vs reverse {r} forward {f}: {}",
        cost.flops(),
        nnlin::plan::render(&tree)
    );
    let base = m.linearize(&x, &Options::default().with_strategy(Strategy::Reverse)).unwrap();
    same(
        &base,
        &m.linearize(&x, &Options::default().with_strategy(Strategy::Dp)).unwrap(),
        "bottleneck dp",
    );
}

/// On DAGs (ResNet, DenseNet) a split at any cut value — forward up to it,
/// reverse down to it — gives the same W and b.
#[test]
fn splits_at_every_cut_value_agree() {
    let xs = mnist(5..6);
    let x = xs.row(0).to_vec();
    for name in ["resnet_small", "densenet_small"] {
        let m = Model::from_onnx_file(root().join(format!("cnn/{name}.onnx"))).unwrap();
        let inst = m.compile_instance(&x, Mode::Tangent).unwrap();
        let rows: Vec<usize> = (0..10).collect();
        let (w0, b0) =
            nnlin::accumulate(&inst, &rows, nnlin::Direction::Reverse, faer::Par::Seq).unwrap();
        let cuts = nnlin::plan::cut_values(&inst);
        assert!(cuts.len() >= 3, "{name}: cuts {cuts:?}");
        let scale = (0..10)
            .flat_map(|i| (0..784).map(move |j| (i, j)))
            .fold(1.0f64, |a, (i, j)| a.max(w0[(i, j)].abs()));
        // the first, a middle and the last cut (forward up to a late cut costs
        // a full forward pass)
        for c in [cuts[0], cuts[cuts.len() / 2], cuts[cuts.len() - 1]] {
            let (w, b) = nnlin::accumulate_split(&inst, &rows, c, faer::Par::Seq).unwrap();
            for i in 0..10 {
                for j in 0..784 {
                    assert!((w[(i, j)] - w0[(i, j)]).abs() <= 1e-11 * scale, "{name} cut {c:?}");
                }
                assert!((b[i] - b0[i]).abs() <= 1e-11 * scale.max(b0[i].abs()), "{name} cut {c:?}");
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let xs = mnist(0..16);
    let ens = Ensemble::single(Model::from_onnx_file(root().join("cnn/lenet5.onnx")).unwrap());
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| ens.linearize_batch(xs.view(), &Options::default()).unwrap())
    };
    let (one, two) = (run(1), run(2));
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.w, b.w);
        assert_eq!(a.b, b.b);
    }
}

#[test]
fn plan_output_is_stable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nnlin"))
        .args([
            "plan",
            root().join("cnn/lenet5.onnx").to_str().unwrap(),
            "--input",
            root().join("data/mnist/t10k-images-idx3-ubyte.gz[0..8]").to_str().unwrap(),
            "--rates",
            "1e10,1e9,1e10",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/plan_lenet5.txt");
    if std::env::var_os("NNLIN_BLESS").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    assert_eq!(
        text,
        std::fs::read_to_string(&golden).unwrap(),
        "plan output changed; rerun with NNLIN_BLESS=1 if intended"
    );
}

/// One instance: its GEMMs run on the pool; the bits do not change with the
/// number of threads.
#[test]
fn single_instance_results_do_not_depend_on_the_thread_count() {
    let xs = mnist(7..8);
    for (name, strategy) in [
        ("resnet_small", Strategy::Forward),
        ("lenet300", Strategy::Reverse),
        ("lenet5", Strategy::Dp),
    ] {
        let ens = Ensemble::single(
            Model::from_onnx_file(root().join(format!("cnn/{name}.onnx"))).unwrap(),
        );
        let opts = Options::default().with_strategy(strategy);
        let run = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| ens.linearize_batch(xs.view(), &opts).unwrap())
        };
        let (one, two) = (run(1), run(2));
        assert_eq!(one[0].w, two[0].w, "{name}");
        assert_eq!(one[0].b, two[0].b, "{name}");
    }
}
