//! Operators the importer rewrites into primitive ones (`expand.rs`):
//! `Upsample`, `Resize`, `Einsum`, `ReduceMax`/`ReduceMin` and 3-D pools,
//! each checked against values computed here by hand from the ONNX
//! definition (not through the rewrite), and each linearized exactly
//! (W·x + b = F). The PyTorch-exported forms are in
//! `tests/modern_fixtures.rs`; hostile sizes are refused with one line.

use nnlin::{ImportOptions, Model, Options};

mod common;
use common::onnx::{floats, int, int64s, ints, model, node, string};

fn xs(n: usize) -> Vec<f64> {
    (0..n).map(|i| ((i * 7) % 11) as f64 * 0.25 - 1.2).collect()
}

/// Imports, checks F against `want`, and W·x + b = F.
fn check(bytes: &[u8], want: &[f64]) {
    let m = Model::from_onnx_bytes("rewritten", bytes).unwrap_or_else(|e| panic!("{e}"));
    let x = xs(m.input_len());
    let f = m.forward_reference(&x);
    assert_eq!(f.len(), want.len(), "output length");
    for (i, (a, b)) in f.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-12, "F[{i}] = {a}, expected {b}");
    }
    let lin = m.linearize(&x, &Options::default()).unwrap();
    for i in 0..f.len() {
        let wx: f64 = (0..x.len()).map(|j| lin.w[(i, j)] * x[j]).sum();
        assert!((wx + lin.b[i] - f[i]).abs() <= 1e-12, "W·x + b != F at {i}");
    }
}

#[test]
fn upsample_and_resize_nearest_repeat_pixels() {
    let x = xs(4); // [1, 1, 2, 2]
    let want: Vec<f64> = (0..16).map(|k| x[(k / 4 / 2) * 2 + (k % 4) / 2]).collect::<Vec<_>>();
    // opset 9 Upsample: scales as an input
    let up = model(
        9,
        &[1, 1, 2, 2],
        vec![node("Upsample", &["x", "s"], &["y"], vec![string("mode", "nearest")])],
        vec![floats("s", &[4], &[1.0, 1.0, 2.0, 2.0])],
    );
    check(&up, &want);
    // opset 13 Resize with sizes (asymmetric, floor: PyTorch's nearest)
    let rs = model(
        13,
        &[1, 1, 2, 2],
        vec![node(
            "Resize",
            &["x", "", "", "sz"],
            &["y"],
            vec![
                string("mode", "nearest"),
                string("coordinate_transformation_mode", "asymmetric"),
                string("nearest_mode", "floor"),
            ],
        )],
        vec![int64s("sz", &[4], &[1, 1, 4, 4])],
    );
    check(&rs, &want);
}

#[test]
fn resize_linear_interpolates_with_clamped_edges() {
    // one row of 3 to 5, half_pixel: source (o + 0.5)·3/5 − 0.5
    let x = xs(3);
    let want: Vec<f64> = (0..5)
        .map(|o| {
            let s = ((o as f64 + 0.5) * 0.6 - 0.5).clamp(0.0, 2.0);
            let i0 = s.floor() as usize;
            let r = s - i0 as f64;
            x[i0] * (1.0 - r) + x[(i0 + 1).min(2)] * r
        })
        .collect();
    let rs = model(
        13,
        &[1, 1, 1, 3],
        vec![node("Resize", &["x", "", "", "sz"], &["y"], vec![string("mode", "linear")])],
        vec![int64s("sz", &[4], &[1, 1, 1, 5])],
    );
    check(&rs, &want);
    // align_corners: source o·(3 − 1)/(5 − 1)
    let want: Vec<f64> = (0..5)
        .map(|o| {
            let s = o as f64 * 0.5;
            let i0 = (s.floor() as usize).min(1);
            let r = s - i0 as f64;
            x[i0] * (1.0 - r) + x[i0 + 1] * r
        })
        .collect();
    let ac = model(
        13,
        &[1, 1, 1, 3],
        vec![node(
            "Resize",
            &["x", "", "", "sz"],
            &["y"],
            vec![
                string("mode", "linear"),
                string("coordinate_transformation_mode", "align_corners"),
            ],
        )],
        vec![int64s("sz", &[4], &[1, 1, 1, 5])],
    );
    check(&ac, &want);
}

#[test]
fn einsum_batched_products_transposes_and_sums() {
    // y[b, i, k] = Σ_j x[b, i, j] · x[b, j, k] with an ellipsis batch
    let x = xs(2 * 2 * 2);
    let at = |b: usize, i: usize, j: usize| x[(b * 2 + i) * 2 + j];
    let mut want = vec![];
    for b in 0..2 {
        for i in 0..2 {
            for k in 0..2 {
                want.push((0..2).map(|j| at(b, i, j) * at(b, j, k)).sum());
            }
        }
    }
    let mm = model(
        13,
        &[1, 2, 2, 2],
        vec![node("Einsum", &["x", "x"], &["y"], vec![string("equation", "...ij,...jk->...ik")])],
        vec![],
    );
    check(&mm, &want);
    // a transpose with a sum over one operand's own label: y[j] = Σ_i x[i, j]·c[j]
    let c = [0.5f32, -2.0, 1.5];
    let x = xs(6);
    let want: Vec<f64> = (0..3).map(|j| (x[j] + x[3 + j]) * f64::from(c[j])).collect();
    let sum = model(
        13,
        &[1, 2, 3],
        vec![
            node("Einsum", &["x"], &["t"], vec![string("equation", "bij->bj")]),
            node("Mul", &["t", "c"], &["y"], vec![]),
        ],
        vec![floats("c", &[3], &c)],
    );
    check(&sum, &want);
}

#[test]
fn reduce_max_and_min_pick_the_extremes() {
    let x = xs(12); // [1, 3, 4]
    let max_axis2: Vec<f64> =
        (0..3).map(|c| (0..4).map(|k| x[c * 4 + k]).fold(f64::NEG_INFINITY, f64::max)).collect();
    let mx = model(
        13,
        &[1, 3, 4],
        vec![node("ReduceMax", &["x"], &["y"], vec![ints("axes", &[2]), int("keepdims", 0)])],
        vec![],
    );
    check(&mx, &max_axis2);
    let min_axes01: Vec<f64> =
        (0..4).map(|k| (0..3).map(|c| x[c * 4 + k]).fold(f64::INFINITY, f64::min)).collect();
    let mn = model(
        18,
        &[1, 3, 4],
        vec![node("ReduceMin", &["x", "a"], &["y"], vec![])],
        vec![int64s("a", &[2], &[0, 1])],
    );
    check(&mn, &min_axes01);
}

#[test]
fn three_d_pools_are_box_maxima_and_means() {
    // [1, 1, 2, 2, 2]: a 2×2×2 box
    let x = xs(8);
    let mp = model(
        13,
        &[1, 1, 2, 2, 2],
        vec![node("MaxPool", &["x"], &["y"], vec![ints("kernel_shape", &[2, 2, 2])])],
        vec![],
    );
    check(&mp, &[x.iter().copied().fold(f64::NEG_INFINITY, f64::max)]);
    let ap = model(
        13,
        &[1, 1, 2, 2, 2],
        vec![node(
            "AveragePool",
            &["x"],
            &["y"],
            vec![ints("kernel_shape", &[2, 2, 2]), ints("pads", &[1, 0, 0, 0, 0, 0])],
        )],
        vec![],
    );
    // depth padded by one above: two windows, the first sees one real slice
    let slice = |d: usize| (0..4).map(|k| x[d * 4 + k]).sum::<f64>();
    check(&ap, &[slice(0) / 4.0, (slice(0) + slice(1)) / 8.0]);
}

#[test]
fn hostile_rewrites_are_refused_with_one_line() {
    let opts = ImportOptions::default().with_max_bytes(64 << 20);
    let refused = |bytes: &[u8], needle: &str| {
        let e = Model::from_onnx_bytes_with("hostile", bytes, &opts).map(|_| ()).unwrap_err();
        let e = e.to_string();
        assert!(e.contains(needle), "`{needle}` not in: {e}");
        assert!(!e.contains('\n'));
    };
    // a resize to 2^39 columns
    let huge = model(
        13,
        &[1, 1, 1, 3],
        vec![node("Resize", &["x", "", "", "sz"], &["y"], vec![string("mode", "linear")])],
        vec![int64s("sz", &[4], &[1, 1, 1, 1 << 39])],
    );
    refused(&huge, "memory budget");
    // a 3-D convolution over 50 000 depths with 4 depth taps
    let w = floats("w", &[1, 1, 4, 1, 1], &[1.0; 4]);
    let deep =
        model(13, &[1, 1, 50_000, 1, 1], vec![node("Conv", &["x", "w"], &["y"], vec![])], vec![w]);
    refused(&deep, "2-D convolutions");
    // an einsum with a diagonal
    let diag = model(
        13,
        &[1, 3, 3],
        vec![node("Einsum", &["x"], &["y"], vec![string("equation", "bii->bi")])],
        vec![],
    );
    refused(&diag, "diagonal");
}
