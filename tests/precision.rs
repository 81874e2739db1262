//! `--precision f32`: the forward pass computes convolutions and dense layers
//! in float32, and reverse accumulation runs every product in float32.
//! On every fixture (the legacy exports of fixtures/{cnn, modern, zoo,
//! iris}), the float32 W and b hold float32 values and agree with the
//! float64 ones within the bound ARCHITECTURE.md states: for a network of
//! `L` compiled layers, `max |W32 − W64| ≤ 2 · L · ε32 · max |W64|` (ε32 =
//! 2⁻²³), and `max |b32 − b64| ≤ 4 · L · ε32 · max(|b64|, |F(x)|, Σⱼ |W64ᵢⱼ xⱼ|)`
//! (b sums every layer's offset through its adjoint, and those terms cancel).

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ndarray_npy::read_npy;
use nnlin::{Executed, Linearize, Model, Options, Precision, Strategy};

fn fixtures() -> Vec<(PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut out = vec![];
    for dir in ["cnn", "modern", "zoo", "iris"] {
        let mut names: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let f = p.file_name().unwrap().to_string_lossy();
                f.ends_with(".onnx") && !f.ends_with(".default.onnx")
            })
            .collect();
        names.sort();
        for p in names {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let own = p.with_file_name(format!("{stem}.inputs.npy"));
            let shared = p.with_file_name("inputs.npy");
            let inputs = if own.exists() { own } else { shared };
            if inputs.exists() {
                out.push((p, inputs));
            }
        }
    }
    out
}

fn first_instance(path: &Path, n: usize) -> Vec<f64> {
    let xs: ArrayD<f64> = read_npy(path).unwrap();
    xs.iter().copied().take(n).collect()
}

#[test]
fn float32_reverse_agrees_with_float64_within_the_stated_bound() {
    let eps = f64::from(f32::EPSILON);
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (model, inputs) in fixtures() {
        let name = model.display().to_string();
        let Ok(m) = Model::from_onnx_file(&model) else { continue };
        let x = first_instance(&inputs, m.input_len());
        if x.len() != m.input_len() {
            continue;
        }
        let opts = Options::new().with_strategy(Strategy::Reverse);
        let w64 = m.linearize(&x, &opts).unwrap();
        let w32 = m.linearize(&x, &opts.clone().with_precision(Precision::F32)).unwrap();
        assert_eq!(w32.plans, vec![Executed::Reverse], "{name}");
        assert!(
            w32.w.iter().chain(&w32.b).all(|&v| f64::from(v as f32) == v),
            "{name}: float32 values"
        );
        let layers = m.network().nodes().len() as f64;
        let scale_w = w64.w.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
        let f = m.forward_reference(&x);
        // b = F(x) − W·x: its rounding scales with the terms of W·x
        let wx_terms = w64
            .w
            .rows()
            .into_iter()
            .map(|r| r.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum::<f64>())
            .fold(0.0f64, f64::max);
        let scale_b = w64.b.iter().chain(&f).fold(1e-300f64, |a, v| a.max(v.abs())).max(wx_terms);
        let ew = w64.w.iter().zip(&w32.w).fold(0.0f64, |a, (p, q)| a.max((p - q).abs()));
        let eb = w64.b.iter().zip(&w32.b).fold(0.0f64, |a, (p, q)| a.max((p - q).abs()));
        let (rw, rb) = (ew / scale_w, eb / scale_b);
        let bound_w = 2.0 * layers * eps;
        assert!(
            rw <= bound_w,
            "{name}: W off by {rw:.2e} of its largest entry, bound {bound_w:.2e}"
        );
        let bound_b = 4.0 * layers * eps;
        assert!(rb <= bound_b, "{name}: b off by {rb:.2e}, bound {bound_b:.2e}");
        worst = worst.max(rw / bound_w).max(rb / bound_b);
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} fixtures checked");
    eprintln!("{checked} fixtures; the worst error is {worst:.3} of its bound");
}

/// `Model::prepare` (which the batch entry points call before several
/// instances) forms the f32 weights and Winograd kernels ahead of the
/// products; it changes no bit of W or b, in either precision, on any
/// fixture, and a batch of two equals its instances one at a time. So does
/// one instance on two threads, whose Winograd kernels are formed beside
/// its forward pass (on an unprepared model).
#[test]
fn preparing_a_model_changes_no_bit() {
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let same = |got: &nnlin::Linearization, want: &nnlin::Linearization, name: &str| {
        let w = |l: &nnlin::Linearization| bits(l.w.as_slice_memory_order().unwrap());
        assert_eq!(w(got), w(want), "{name}: W");
        assert_eq!(bits(got.b.as_slice().unwrap()), bits(want.b.as_slice().unwrap()), "{name}: b");
    };
    let mut checked = 0;
    for (model, inputs) in fixtures() {
        let Ok(cold) = Model::from_onnx_file(&model) else { continue };
        let warm = Model::from_onnx_file(&model).unwrap();
        let xs: ArrayD<f64> = read_npy(&inputs).unwrap();
        let n = cold.input_len();
        let flat: Vec<f64> = xs.iter().copied().collect();
        if flat.len() < 2 * n {
            continue;
        }
        let two = ndarray::Array2::from_shape_vec((2, n), flat[..2 * n].to_vec()).unwrap();
        for precision in [Precision::F64, Precision::F32] {
            let opts = Options::new().with_strategy(Strategy::Reverse).with_precision(precision);
            warm.prepare(precision);
            let batch = cold.linearize_batch(two.view(), &opts).unwrap();
            for (k, got) in batch.iter().enumerate() {
                let want = warm.linearize(two.row(k).as_slice().unwrap(), &opts).unwrap();
                let name = format!("{} {precision:?} row {k}", model.display());
                same(got, &want, &name);
                // one instance, two threads, a model prepared by nothing
                let fresh = Model::from_onnx_file(&model).unwrap();
                let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
                let two_threads = opts.clone().with_par(faer::Par::rayon(2));
                let one = pool
                    .install(|| fresh.linearize(two.row(k).as_slice().unwrap(), &two_threads))
                    .unwrap();
                same(&one, &want, &format!("{name}, one instance on two threads"));
            }
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} fixtures checked");
}
