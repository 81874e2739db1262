//! `nnlin neurons`: per-neuron maps (the paper's Fig. 7). For the predicted
//! class c and every activation layer, each neuron j has its own linear map
//! to the input (row j of that layer's W, from one forward-accumulation pass
//! over all layers) and a contribution `∂F_c/∂h_j · h_j` to the prediction
//! (the adjoint from one reverse pass). The `top` most positive and most
//! negative contributors per layer are reported and drawn.

use std::path::PathBuf;

use anyhow::{Result, bail};
use nnlin::Mode;
use serde_json::json;

use crate::{heatmap, io};
use nnlin_cli::plot;

pub struct Args {
    pub model: PathBuf,
    pub input: PathBuf,
    pub top: usize,
    pub out: PathBuf,
    pub limit: Option<usize>,
}

struct Pick {
    neuron: usize,
    contribution: f64,
    activation: f64,
    map: Vec<f64>,
}

/// The most neurons per sign and layer `--top` may ask for (each is a cell of
/// the grid image).
pub const MAX_TOP: usize = 64;

pub fn run(args: Args) -> Result<()> {
    crate::io::set_input_file(Some(&args.input));
    if !(1..=MAX_TOP).contains(&args.top) {
        bail!("--top must be between 1 and {MAX_TOP}, got {}", args.top);
    }
    let model = crate::io::load_model(&args.model, nnlin::ConvKernel::Auto)?;
    let xs = io::read_instances(&args.input, model.input_shape())?;
    {
        let (_, h, w) = heatmap::geometry(model.input_shape());
        let cell = (56 / h.max(w).max(1)).clamp(2, 16) as u64;
        let layers = model.network().nodes().len() as u64;
        heatmap::check_canvas(model.input_shape(), cell, 2 * args.top as u64, layers, (72, 34))?;
    }
    let count = args.limit.unwrap_or(xs.nrows()).min(xs.nrows());
    let n = model.input_len();
    let mut reports = vec![];
    let mut files = vec![];
    for k in 0..count {
        let x = xs.row(k).to_vec();
        let inst = model.compile_instance(&x, Mode::Tangent)?;
        let values = inst.values(&x);
        let c = nnlin::argmax(&inst.output);
        let adj = nnlin::adjoints(&inst, c, faer::Par::Seq)?;
        // one forward pass over all input columns: each activation layer's
        // output rows are its slopes times its input's tangent rows
        let mut maps: Vec<Option<faer::Mat<f64>>> = vec![None; inst.layers.len()];
        nnlin::region::forward_blocks(&inst, 0..n, faer::Par::Seq, |li, tans| {
            let li = li.0;
            let l = &inst.layers[li];
            if l.active.is_some()
                && let nnlin::linalg::Operator::Diagonal(slope) = &*l.inputs[0].1
            {
                let t = tans[0];
                maps[li] =
                    Some(faer::Mat::from_fn(t.nrows(), t.ncols(), |i, j| slope[i] * t[(i, j)]));
            }
        });
        let mut layers = vec![];
        let mut grid: Vec<(String, Vec<Pick>, Vec<Pick>)> = vec![];
        for (li, l) in inst.layers.iter().enumerate() {
            let Some(t) = &maps[li] else { continue };
            let h = &values[l.output.0];
            let Some(g) = &adj[l.output.0] else { continue };
            let mut order: Vec<(usize, f64)> =
                h.iter().zip(g).map(|(hv, gv)| hv * gv).enumerate().collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let pick = |&(j, contribution): &(usize, f64)| Pick {
                neuron: j,
                contribution,
                activation: h[j],
                map: (0..n).map(|col| t[(j, col)]).collect(),
            };
            let pos: Vec<Pick> =
                order.iter().take(args.top).filter(|p| p.1 > 0.0).map(pick).collect();
            let neg: Vec<Pick> =
                order.iter().rev().take(args.top).filter(|p| p.1 < 0.0).map(pick).collect();
            let as_json = |v: &[Pick]| {
                v.iter()
                    .map(|p| json!({"neuron": p.neuron, "contribution": p.contribution, "activation": p.activation}))
                    .collect::<Vec<_>>()
            };
            layers.push(json!({
                "layer": l.name,
                "units": h.len(),
                "total_contribution": order.iter().map(|p| p.1).sum::<f64>(),
                "positive": as_json(&pos),
                "negative": as_json(&neg),
            }));
            grid.push((l.name.clone(), pos, neg));
        }
        reports.push(json!({"index": k, "predicted": c, "output": inst.output, "layers": layers}));
        files.push((
            format!("neurons_{k}.png"),
            crate::output::Payload::Bytes(render(model.input_shape(), c, &grid, args.top)),
        ));
    }
    let report = json!({"model": args.model.display().to_string(), "instances": reports});
    let mut list: Vec<(&str, &crate::output::Payload)> =
        files.iter().map(|(n, p)| (n.as_str(), p)).collect();
    let rp = crate::output::Payload::Json(&report);
    list.push(("neurons.json", &rp));
    crate::output::write_files(&args.out, &list)?;
    outln!("nnlin: neuron maps for {count} instance(s) written to {}", args.out.display());
    Ok(())
}

/// Grid: one row per layer, `top` positive then `top` negative neurons.
fn render(
    shape: &[usize],
    class: usize,
    grid: &[(String, Vec<Pick>, Vec<Pick>)],
    top: usize,
) -> Vec<u8> {
    let (c, h, w) = heatmap::geometry(shape);
    let hw = h * w;
    let cell = (56 / h.max(w)).clamp(2, 16) as u32;
    let (mw, mh) = (w as u32 * cell, h as u32 * cell);
    let col = mw.max(60) + 12;
    let left = 10u32;
    let row_h = mh + 34;
    let width = left + col * (2 * top as u32) + 20;
    let height = 40 + grid.len() as u32 * row_h + 10;
    let mut img = plot::canvas(width, height);
    let black = [0, 0, 0];
    plot::text(
        &mut img,
        left,
        8,
        &format!("PREDICTED CLASS {class}: TOP {top} + AND - CONTRIBUTING NEURONS PER LAYER"),
        1,
        black,
    );
    plot::text(
        &mut img,
        left,
        22,
        "EACH MAP: THE NEURON'S ROW OF W (RED +, BLUE -); LABEL: NEURON / CONTRIBUTION",
        1,
        [90, 90, 90],
    );
    for (r, (name, pos, neg)) in grid.iter().enumerate() {
        let y = 40 + r as u32 * row_h;
        plot::text(&mut img, left, y, &name.to_uppercase(), 1, black);
        for (k, p) in pos.iter().enumerate() {
            draw(&mut img, left + k as u32 * col, y + 10, p, c, h, w, hw, cell);
        }
        for (k, p) in neg.iter().enumerate() {
            draw(&mut img, left + (top + k) as u32 * col, y + 10, p, c, h, w, hw, cell);
        }
    }
    plot::png(&img)
}

fn draw(
    img: &mut image::RgbImage,
    x: u32,
    y: u32,
    p: &Pick,
    c: usize,
    h: usize,
    w: usize,
    hw: usize,
    cell: u32,
) {
    let m = heatmap::per_pixel(&p.map, c, hw);
    let vmax = m.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    plot::map(img, x, y, h, w, &m, cell, |v| plot::diverging(v, vmax));
    let label = format!("{} {}", p.neuron, plot::format_num(p.contribution));
    plot::text(
        img,
        x,
        y + h as u32 * cell + 3,
        &label,
        1,
        if p.contribution >= 0.0 { [170, 0, 0] } else { [0, 0, 170] },
    );
}
