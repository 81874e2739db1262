//! `explain --heatmap`: each selected row of W reshaped to the input, and
//! W⊙x (per-pixel contribution), beside the input, one grid per instance.

use nnlin_cli::plot;

/// The input's picture geometry: channels, height, width.
pub fn geometry(shape: &[usize]) -> (usize, usize, usize) {
    let dims: Vec<usize> = shape.iter().copied().skip(1).collect(); // drop the batch dim
    match dims.as_slice() {
        [c, h, w] => (*c, *h, *w),
        [h, w] => (1, *h, *w),
        [n] => {
            let s = (*n as f64).sqrt().round() as usize;
            if s * s == *n && s > 1 { (1, s, s) } else { (1, 1, *n) }
        }
        _ => (1, 1, dims.iter().product()),
    }
}

/// Checks that an image of `cells_w × cells_h` input-sized maps (each
/// `pad_w`/`pad_h` pixels of margin, at `cell` pixels per input pixel) fits
/// the memory budget and `u32` coordinates, before anything is drawn.
pub fn check_canvas(
    shape: &[usize],
    cell: u64,
    cells_w: u64,
    cells_h: u64,
    pad: (u64, u64),
) -> anyhow::Result<()> {
    let (_, h, w) = geometry(shape);
    let width = (w as u64)
        .saturating_mul(cell)
        .saturating_add(pad.0)
        .saturating_mul(cells_w)
        .saturating_add(200);
    let height = (h as u64)
        .saturating_mul(cell)
        .saturating_add(pad.1)
        .saturating_mul(cells_h)
        .saturating_add(100);
    let bytes = width.saturating_mul(height).saturating_mul(3);
    if width > u64::from(u32::MAX) || height > u64::from(u32::MAX) {
        anyhow::bail!("a {width}×{height} image is too large to draw");
    }
    crate::io::check_budget(
        &format!("a {width}×{height} image"),
        usize::try_from(bytes.div_ceil(8)).ok(),
    )?;
    Ok(())
}

/// Sums a `c × h × w` vector over channels.
pub fn per_pixel(v: &[f64], c: usize, hw: usize) -> Vec<f64> {
    (0..hw).map(|p| (0..c).map(|ch| v[ch * hw + p]).sum()).collect()
}

/// One instance's grid as PNG bytes. `rows`: (class index, W row, F, W·x, b).
pub fn render(
    shape: &[usize],
    x: &[f64],
    rows: &[(usize, Vec<f64>, f64, f64, f64)],
    title: &str,
) -> Vec<u8> {
    let labeled: Vec<(String, &[f64])> = rows
        .iter()
        .map(|(class, wrow, f, wx, b)| {
            let label = format!(
                "CLASS {class}: F={} W*X={} B={}",
                plot::format_num(*f),
                plot::format_num(*wx),
                plot::format_num(*b)
            );
            (label, wrow.as_slice())
        })
        .collect();
    render_labeled(shape, x, &labeled, title, ["W (ROW)", "W*X"])
}

/// The grid for any rows over the input (`rows`: label, vector): the input,
/// each vector and its product with the input, under `headers`.
pub fn render_labeled(
    shape: &[usize],
    x: &[f64],
    rows: &[(String, &[f64])],
    title: &str,
    headers: [&str; 2],
) -> Vec<u8> {
    let (c, h, w) = geometry(shape);
    let hw = h * w;
    let cell = (112 / h.max(w)).clamp(2, 32) as u32;
    let (mw, mh) = (w as u32 * cell, h as u32 * cell);
    let gap = 16u32;
    let bar = 60u32;
    let label_h = 12u32;
    let col_w = [mw + gap, mw + bar + gap, mw + bar + gap];
    let width = 10 + col_w.iter().sum::<u32>() + 10;
    let row_h = mh + label_h + 14;
    let height = 30 + 14 + rows.len() as u32 * row_h + 10;
    let mut img = plot::canvas(width.max(plot::text_width(title, 1) + 20), height);
    let black = [0, 0, 0];
    plot::text(&mut img, 10, 8, title, 1, black);
    let xs = [10, 10 + col_w[0], 10 + col_w[0] + col_w[1]];
    plot::text(&mut img, xs[0], 28, "INPUT", 1, black);
    plot::text(&mut img, xs[1], 28, headers[0], 1, black);
    plot::text(&mut img, xs[2], 28, headers[1], 1, black);
    let (lo, hi) =
        x.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    for (r, (label, wrow)) in rows.iter().enumerate() {
        let y = 44 + r as u32 * row_h;
        plot::text(&mut img, xs[0], y, label, 1, black);
        let y = y + label_h;
        // input
        if c == 3 {
            let px: Vec<[u8; 3]> = (0..hw)
                .map(|p| {
                    let g = |ch: usize| plot::gray(x[ch * hw + p], lo, hi)[0];
                    [g(0), g(1), g(2)]
                })
                .collect();
            let idx: Vec<f64> = (0..hw).map(|p| p as f64).collect();
            plot::map(&mut img, xs[0], y, h, w, &idx, cell, |i| px[i as usize]);
        } else {
            let g = per_pixel(x, c, hw).iter().map(|v| v / c as f64).collect::<Vec<_>>();
            plot::map(&mut img, xs[0], y, h, w, &g, cell, |v| plot::gray(v, lo, hi));
        }
        let wmap = per_pixel(wrow, c, hw);
        let contrib: Vec<f64> =
            per_pixel(&wrow.iter().zip(x).map(|(a, b)| a * b).collect::<Vec<_>>(), c, hw);
        for (k, m) in [(1usize, &wmap), (2, &contrib)] {
            let vmax = m.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            plot::map(&mut img, xs[k], y, h, w, m, cell, |v| plot::diverging(v, vmax));
            plot::colorbar(&mut img, xs[k] + mw + 6, y, mh.max(40), vmax);
        }
    }
    plot::png(&img)
}
