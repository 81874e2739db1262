//! Parametric t-SNE on iris (the source paper's Fig. 8), explained.
//!
//! ```text
//! cargo run --release --example tsne_figure [OUT.png]
//! ```
//!
//! The pipeline `tsne ∘ encoder` (fixtures/tsne, made by
//! fixtures/generate_tsne.py) maps each flower's four features to 2-D. The
//! left panel is the embedding of all 150 flowers coloured by species with
//! six marked samples; on the right, for each marked sample, its 2×4 W (from
//! `Pipeline::linearize`): how much each feature moves each coordinate.

use std::path::PathBuf;

use nnlin::{Ensemble, Model, Options, Pipeline};
use nnlin_cli::plot;

const FEATURES: [&str; 4] = ["SEPAL L", "SEPAL W", "PETAL L", "PETAL W"];
const FEATURE_COLORS: [[u8; 3]; 4] =
    [[230, 159, 0], [86, 180, 233], [0, 158, 115], [204, 121, 167]];
const SPECIES: [&str; 3] = ["SETOSA", "VERSICOLOR", "VIRGINICA"];
const SPECIES_COLORS: [[u8; 3]; 3] = [[213, 94, 0], [0, 114, 178], [0, 150, 80]];
const MARKED: [usize; 6] = [10, 40, 60, 85, 110, 140];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let out =
        std::env::args().nth(1).map_or_else(|| root.join("docs/img/tsne_iris.png"), PathBuf::from);
    let encoder = Model::from_onnx_file(root.join("fixtures/tsne/encoder.onnx"))?;
    let tsne = Model::from_onnx_file(root.join("fixtures/tsne/tsne.onnx"))?;
    let pipe = Pipeline::new(Ensemble::single(encoder), vec![tsne])?;
    let text = std::fs::read_to_string(root.join("fixtures/data/iris.csv"))?;
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap_or(0.0)).collect())
        .collect();
    let emb: Vec<Vec<f64>> = rows.iter().map(|r| pipe.forward_reference(&r[..4])).collect();

    let (pw, ph) = (520u32, 520u32);
    let (bw, bh) = (250u32, 150u32);
    let mut img = plot::canvas(pw + 30 + 2 * (bw + 20) + 10, ph.max(3 * (bh + 40)) + 80);
    let black = [0, 0, 0];
    plot::text(
        &mut img,
        10,
        8,
        "PARAMETRIC T-SNE OF IRIS: EMBEDDING (LEFT) AND W OF SIX SAMPLES (RIGHT)",
        1,
        black,
    );
    // scatter
    let (x0, y0) = (20u32, 40u32);
    let lim = |k: usize| {
        let v: Vec<f64> = emb.iter().map(|e| e[k]).collect();
        let (lo, hi) =
            v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &t| (a.min(t), b.max(t)));
        let pad = 0.08 * (hi - lo);
        (lo - pad, hi + pad)
    };
    let ((ax, bx), (ay, by)) = (lim(0), lim(1));
    let to_px = |e: &[f64]| {
        (
            x0 + ((e[0] - ax) / (bx - ax) * f64::from(pw)) as u32,
            y0 + ((by - e[1]) / (by - ay) * f64::from(ph)) as u32,
        )
    };
    plot::fill(&mut img, x0 - 1, y0 - 1, pw + 2, ph + 2, [150, 150, 150]);
    plot::fill(&mut img, x0, y0, pw, ph, [252, 252, 252]);
    for (r, e) in rows.iter().zip(&emb) {
        let (px, py) = to_px(e);
        plot::fill(
            &mut img,
            px.saturating_sub(3),
            py.saturating_sub(3),
            7,
            7,
            SPECIES_COLORS[r[4] as usize],
        );
    }
    for (k, &i) in MARKED.iter().enumerate() {
        let (px, py) = to_px(&emb[i]);
        for (dx, dy, w, h) in
            [(-6i32, -6i32, 13u32, 2u32), (-6, 5, 13, 2), (-6, -6, 2, 13), (5, -6, 2, 13)]
        {
            plot::fill(&mut img, (px as i32 + dx) as u32, (py as i32 + dy) as u32, w, h, black);
        }
        plot::text(&mut img, px + 9, py.saturating_sub(4), &format!("{}", k + 1), 1, black);
    }
    for (s, name) in SPECIES.iter().enumerate() {
        let y = y0 + ph + 12 + s as u32 * 12;
        plot::fill(&mut img, x0, y, 8, 8, SPECIES_COLORS[s]);
        plot::text(&mut img, x0 + 14, y, name, 1, black);
    }
    // bar charts of W (2 x 4) per marked sample
    for (k, &i) in MARKED.iter().enumerate() {
        let lin = pipe.linearize(&rows[i][..4], &Options::default())?;
        let residual = (0..2)
            .map(|o| {
                (lin.w.row(o).iter().zip(&rows[i][..4]).map(|(a, b)| a * b).sum::<f64>() + lin.b[o]
                    - emb[i][o])
                    .abs()
            })
            .fold(0.0, f64::max);
        assert!(residual < 1e-9, "W·x + b = F(x) for sample {i}: {residual}");
        let (cx, cy) = (x0 + pw + 30 + (k as u32 % 2) * (bw + 20), 40 + (k as u32 / 2) * (bh + 40));
        let species = SPECIES[rows[i][4] as usize];
        plot::text(&mut img, cx, cy, &format!("{} FLOWER {i} ({species})", k + 1), 1, black);
        let vmax = lin.w.iter().fold(0.0f64, |a, v| a.max(v.abs())).max(1e-12);
        let top = cy + 14;
        let mid = top + bh / 2;
        plot::fill(&mut img, cx, mid, bw, 1, [120, 120, 120]);
        for o in 0..2 {
            let gx = cx + o as u32 * (bw / 2);
            plot::text(&mut img, gx + 30, top + bh + 2, if o == 0 { "Y1" } else { "Y2" }, 1, black);
            for f in 0..4 {
                let v = lin.w[(o, f)];
                let hgt = (v.abs() / vmax * f64::from(bh / 2 - 4)) as u32;
                let bx = gx + 8 + f as u32 * 25;
                if v >= 0.0 {
                    plot::fill(&mut img, bx, mid - hgt, 18, hgt, FEATURE_COLORS[f]);
                } else {
                    plot::fill(&mut img, bx, mid + 1, 18, hgt, FEATURE_COLORS[f]);
                }
            }
        }
        plot::text(
            &mut img,
            cx + bw - 60,
            top,
            &format!("+-{}", plot::format_num(vmax)),
            1,
            [90, 90, 90],
        );
    }
    let ly = 40 + 3 * (bh + 40);
    for (f, name) in FEATURES.iter().enumerate() {
        let lx = x0 + pw + 30 + f as u32 * 120;
        plot::fill(&mut img, lx, ly, 8, 8, FEATURE_COLORS[f]);
        plot::text(&mut img, lx + 12, ly, name, 1, black);
    }
    plot::text(
        &mut img,
        x0 + pw + 30,
        ly + 16,
        "BARS: W[Y, FEATURE] = HOW EACH FEATURE MOVES EACH COORDINATE",
        1,
        [90, 90, 90],
    );
    std::fs::write(&out, plot::png(&img))?;
    println!("wrote {}", out.display());
    Ok(())
}
