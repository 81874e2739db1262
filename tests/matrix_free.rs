//! W without forming it (`Model::operator`): `W·v` and `Wᵀ·u` equal the
//! products with the formed W to 1e-12, through every operator kind the
//! fixtures exercise (convolutions, pools, attention, transposed
//! convolutions, resizes, 3-D layers), and the matrix-free partial SVD
//! matches the dense SVD of the formed W.

use std::path::PathBuf;

use ndarray::ArrayD;
use ndarray_npy::read_npy;
use nnlin::{Mode, Model, Options, Rows};

fn fixture(dir: &str, name: &str) -> (Model, Vec<f64>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(dir);
    let m = Model::from_onnx_file(root.join(format!("{name}.onnx"))).unwrap();
    let xs: ArrayD<f64> = read_npy(root.join(format!("{name}.inputs.npy"))).unwrap();
    let x: Vec<f64> = xs.iter().copied().take(m.input_len()).collect();
    (m, x)
}

fn probe(n: usize, seed: usize) -> Vec<f64> {
    (0..n).map(|i| (((i + seed) * 2654435761) % 1000) as f64 / 500.0 - 1.0).collect()
}

#[test]
fn products_equal_the_formed_w() {
    for (dir, name) in [
        ("cnn", "resnet_small"),
        ("modern", "attention"),
        ("modern", "deconv"),
        ("modern", "resize"),
        ("modern", "volumetric"),
        ("zoo", "swin_t"),
    ] {
        let (m, x) = fixture(dir, name);
        for mode in [Mode::Tangent, Mode::Secant] {
            for rows in [Rows::All, Rows::Indices(vec![1, 0])] {
                let opts = Options::default().with_mode(mode).with_rows(rows.clone());
                let lin = m.linearize(&x, &opts).unwrap();
                let op = m.operator(&x, &opts).unwrap();
                let (r, n) = (op.nrows(), op.ncols());
                assert_eq!((r, n), lin.w.dim(), "{name}");
                let scale = lin.w.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
                let v = probe(n, 3);
                let wv = op.matvec(&v);
                let u = probe(r, 7);
                let wtu = op.rmatvec(&u);
                for i in 0..r {
                    let want: f64 = (0..n).map(|j| lin.w[(i, j)] * v[j]).sum();
                    assert!((wv[i] - want).abs() <= 1e-12 * scale * n as f64, "{name} W·v");
                }
                for j in 0..n {
                    let want: f64 = (0..r).map(|i| lin.w[(i, j)] * u[i]).sum();
                    assert!((wtu[j] - want).abs() <= 1e-12 * scale * r as f64, "{name} Wᵀ·u");
                }
            }
        }
    }
}

#[test]
fn partial_svd_matches_the_dense_svd() {
    let (m, x) = fixture("cnn", "resnet_small");
    let opts = Options::default();
    let w = m.linearize(&x, &opts).unwrap().w;
    let dense = faer::Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)]);
    let svd = dense.thin_svd().unwrap();
    let op = m.operator(&x, &opts).unwrap();
    let k = 3;
    let (s, v) = nnlin::matfree::top_singular(&op, k, faer::Par::Seq);
    assert_eq!(s.len(), k);
    for j in 0..k {
        let want = svd.S()[j];
        assert!((s[j] - want).abs() <= 1e-9 * svd.S()[0], "σ{j} = {}, dense {want}", s[j]);
        // the singular vector up to sign
        let dot: f64 = (0..w.ncols()).map(|i| v[(i, j)] * svd.V()[(i, j)]).sum();
        assert!((dot.abs() - 1.0).abs() <= 1e-6, "v{j}: |⟨v, v_dense⟩| = {}", dot.abs());
    }
}

mod common;

#[test]
fn krylov_path_matches_the_dense_svd() {
    use common::onnx::{floats, model, node};
    // 150 outputs: above GRAM_ROWS, so faer's Krylov–Schur partial SVD runs
    let (n, h, m) = (300usize, 200usize, 150usize);
    let w1: Vec<f32> = (0..n * h).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w2: Vec<f32> = (0..h * m).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
    let bytes = model(
        13,
        &[1, n as i64],
        vec![
            node("MatMul", &["x", "w1"], &["h"], vec![]),
            node("Relu", &["h"], &["r"], vec![]),
            node("MatMul", &["r", "w2"], &["y"], vec![]),
        ],
        vec![floats("w1", &[n as i64, h as i64], &w1), floats("w2", &[h as i64, m as i64], &w2)],
    );
    let model = Model::from_onnx_bytes("krylov", &bytes).unwrap();
    let x = probe(n, 11);
    let opts = Options::default();
    let w = model.linearize(&x, &opts).unwrap().w;
    let dense = faer::Mat::from_fn(m, n, |i, j| w[(i, j)]);
    let svd = dense.thin_svd().unwrap();
    let op = model.operator(&x, &opts).unwrap();
    assert!(op.nrows() > nnlin::matfree::GRAM_ROWS);
    let (s, _) = nnlin::matfree::top_singular(&op, 4, faer::Par::Seq);
    assert_eq!(s.len(), 4);
    for j in 0..4 {
        assert!(
            (s[j] - svd.S()[j]).abs() <= 1e-8 * svd.S()[0],
            "σ{j} = {}, dense {}",
            s[j],
            svd.S()[j]
        );
    }
}
