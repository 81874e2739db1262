//! `nnlin explain --svd K`: W's top K singular values and right singular
//! vectors per instance, matrix-free (`Model::operator`): W is never formed,
//! so it runs where W itself would not fit (a 1000-class 224×224 model's W
//! is 1.2 GB). The right singular vectors are the input patterns the
//! selected outputs are most sensitive to; for image inputs they are drawn.

use anyhow::{Result, bail};
use ndarray::{Array2, Array3};
use serde_json::json;

use crate::output::{self, Payload};
use crate::{heatmap, io};
use nnlin::{Model, Options};

/// What `--svd` needs of `explain`'s arguments.
pub struct Args<'a> {
    pub model: &'a Model,
    pub xs: &'a Array2<f64>,
    pub opts: &'a Options,
    pub k: usize,
    pub heatmap: bool,
    pub f32_out: bool,
    pub threads: usize,
    pub out: &'a std::path::Path,
    pub input: &'a std::path::Path,
    pub pool: &'a rayon::ThreadPool,
}

pub fn run(a: Args<'_>) -> Result<()> {
    let (n_inst, n) = a.xs.dim();
    let m = a.opts.rows.count(a.model.output_len())?;
    let k = a.k.min(m).min(n);
    io::check_budget(
        &format!("{k} singular vectors of length {n} for {n_inst} instance(s)"),
        nnlin::ir::checked_numel(&[n_inst, k.max(1), n, 2]),
    )?;
    let start = std::time::Instant::now();
    let mut values = Array2::<f64>::zeros((n_inst, k));
    let mut vectors = Array3::<f64>::zeros((n_inst, k, n));
    let mut b = Array2::<f64>::zeros((n_inst, m));
    let mut instances = Vec::with_capacity(n_inst);
    let par = if a.threads > 1 { faer::Par::rayon(a.threads) } else { faer::Par::Seq };
    for i in 0..n_inst {
        let x = a.xs.row(i).to_vec();
        let op = a.model.operator(&x, a.opts)?;
        let (s, v) = a.pool.install(|| nnlin::matfree::top_singular(&op, k, par));
        if s.len() < k {
            bail!("instance {i}: only {} of {k} singular values converged", s.len());
        }
        if s.iter().chain(v.col_iter().flat_map(|c| c.iter())).any(|t| !t.is_finite()) {
            bail!("instance {i}: a singular value or vector is not finite; nothing was written");
        }
        for j in 0..k {
            values[(i, j)] = s[j];
            for c in 0..n {
                vectors[(i, j, c)] = v[(c, j)];
            }
        }
        // b and the residual W·x + b − F(x), matrix-free as well
        let inst = op.instance();
        let (wx_all, b_all) = inst.wx_and_b(&x);
        let f = a.model.forward_reference(&x);
        let mut residual: f64 = 0.0;
        for (r, &row) in op.rows().iter().enumerate() {
            b[(i, r)] = b_all[row];
            residual = residual.max((wx_all[row] + b_all[row] - f[row]).abs());
        }
        let predicted = (!f.is_empty()).then(|| nnlin::argmax(&f));
        instances.push(json!({
            "index": i,
            "output": f,
            "predicted": predicted,
            "rows": op.rows(),
            "singular_values": s,
            "residual": residual,
        }));
    }
    let seconds = start.elapsed().as_secs_f64();
    let summary = json!({
        "nnlin_version": env!("CARGO_PKG_VERSION"),
        "model": a.model.name(),
        "input": a.input.display().to_string(),
        "input_shape": a.model.input_shape(),
        "n": n,
        "m": m,
        "svd": k,
        "instances_count": n_inst,
        "mode": format!("{:?}", a.opts.mode).to_lowercase(),
        "threads": a.threads,
        "timing": { "svd_seconds": seconds },
        "instances": instances,
    });
    let mut extra = vec![];
    if a.heatmap {
        let shape = a.model.input_shape();
        let (_, img_h, img_w) = heatmap::geometry(shape);
        let cell = (112 / img_h.max(img_w).max(1)).clamp(2, 32) as u64;
        heatmap::check_canvas(shape, cell, 3, k as u64, (80, 26))?;
        for i in 0..n_inst {
            let x = a.xs.row(i).to_vec();
            let vecs: Vec<Vec<f64>> =
                (0..k).map(|j| (0..n).map(|c| vectors[(i, j, c)]).collect()).collect();
            let rows: Vec<(String, &[f64])> = vecs
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    (
                        format!("SINGULAR {j}: S={}", nnlin_cli::plot::format_num(values[(i, j)])),
                        v.as_slice(),
                    )
                })
                .collect();
            let title = format!("INSTANCE {i}  TOP {k} RIGHT SINGULAR VECTORS OF W");
            let png = heatmap::render_labeled(shape, &x, &rows, &title, ["V (VECTOR)", "V*X"]);
            extra.push((format!("svd/instance_{i}.png"), Payload::Bytes(png)));
        }
    }
    let (vp, sp, bp) = if a.f32_out {
        (Payload::Npy3F32(&vectors), Payload::Npy2F32(&values), Payload::Npy2F32(&b))
    } else {
        (Payload::Npy3(&vectors), Payload::Npy2(&values), Payload::Npy2(&b))
    };
    let js = Payload::Json(&summary);
    let mut files: Vec<(&str, &Payload)> = vec![
        ("singular_values.npy", &sp),
        ("singular_vectors.npy", &vp),
        ("b.npy", &bp),
        ("summary.json", &js),
    ];
    files.extend(extra.iter().map(|(name, p)| (name.as_str(), p)));
    output::write_files(a.out, &files)?;
    let worst =
        (0..n_inst).map(|i| instances[i]["residual"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max);
    outln!(
        "nnlin: {n_inst} instance(s), top {k} singular values of W ({m}×{n}, never formed), max |W·x + b − F(x)| = {worst:.3e}, {seconds:.4} s; wrote {}",
        a.out.display()
    );
    Ok(())
}
