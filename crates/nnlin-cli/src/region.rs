//! `nnlin region`: the linear region around each instance.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use ndarray::Array2;
use nnlin::region::{MAX_VERIFY, Norm, ReportOptions};
use rayon::prelude::*;
use serde_json::json;

pub struct Args {
    pub model: PathBuf,
    pub input: PathBuf,
    pub norm: Norm,
    pub verify: usize,
    pub input_box: Option<Vec<f64>>,
    pub json: Option<PathBuf>,
    pub out: PathBuf,
    pub limit: Option<usize>,
    pub threads: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    crate::io::set_input_file(Some(&args.input));
    // the import decodes its tensors on these threads too
    let pool = crate::io::thread_pool(args.threads)?;
    let model = pool.install(|| crate::io::load_model(&args.model, nnlin::ConvKernel::Auto))?;
    let mut xs = crate::io::read_instances(&args.input, model.input_shape())?;
    if let Some(l) = args.limit {
        let l = l.min(xs.nrows());
        xs = xs.select(ndarray::Axis(0), &(0..l).collect::<Vec<_>>());
    }
    if args.verify > MAX_VERIFY {
        bail!("--verify {} is above the limit of {MAX_VERIFY} samples per instance", args.verify);
    }
    let input_box = match args.input_box.as_deref() {
        None => None,
        Some([lo, hi]) if lo < hi => Some((*lo, *hi)),
        Some(v) => bail!("--box takes lo,hi with lo < hi, got {v:?}"),
    };
    if let Some((lo, hi)) = input_box
        && let Some((k, i, v)) = xs
            .rows()
            .into_iter()
            .enumerate()
            .find_map(|(k, r)| r.iter().position(|&v| v < lo || v > hi).map(|i| (k, i, r[i])))
    {
        bail!(
            "instance {k} lies outside --box {lo},{hi} (element {i} is {v}); no region around it is inside the box"
        );
    }
    let (n_inst, n) = xs.dim();
    let mut opts = ReportOptions::new().with_norm(args.norm).with_verify(args.verify);
    opts.input_box = input_box;
    let start = Instant::now();
    let results: Vec<nnlin::Result<nnlin::region::Report>> = pool.install(|| {
        (0..n_inst)
            .into_par_iter()
            .map(|k| model.region_report(&xs.row(k).to_vec(), k, &opts))
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut instances = Vec::with_capacity(n_inst);
    let mut dir = Array2::<f64>::zeros((n_inst, n));
    let mut dir_inf = Array2::<f64>::zeros((n_inst, n));
    for (k, r) in results.into_iter().enumerate() {
        let r = r?;
        dir.row_mut(k).assign(&ndarray::Array1::from(r.direction_l2));
        dir_inf.row_mut(k).assign(&ndarray::Array1::from(r.direction_linf));
        instances.push(r.json);
    }
    let report = json!({
        "model": args.model.display().to_string(),
        "input": args.input.display().to_string(),
        "box": input_box.map(|(a, b)| vec![a, b]),
        "rules": {
            "kinks": "a unit exactly on a breakpoint (or a max-pool tie between values that move differently) puts x on a boundary: radius_* is then 0; radius_*_excluding_kinks is the radius over the other boundaries",
            "skipped": "boundaries whose gradient is zero are never crossed and are skipped (e.g. ties among inactive max-pool inputs: crossing them leaves the linear map unchanged)",
        },
        "timing": {"seconds": seconds, "per_instance": seconds / n_inst.max(1) as f64},
        "instances": instances,
    });
    use crate::output::{Payload, Target};
    let (rj, d2, d1) = (Payload::Json(&report), Payload::Npy2(&dir), Payload::Npy2(&dir_inf));
    let mut targets = vec![Target::Dir(
        &args.out,
        vec![("region.json", &rj), ("direction.npy", &d2), ("direction_linf.npy", &d1)],
    )];
    if let Some(path) = &args.json {
        targets.push(Target::File(path, &rj));
    }
    crate::output::commit(&targets)?;
    for v in report["instances"].as_array().expect("array") {
        if v.get("smooth").is_some() {
            outln!(
                "instance {}: smooth network, no linear region (sweep in region.json)",
                v["index"]
            );
        } else {
            outln!(
                "instance {}: radius l2 {} linf {} (excluding {} kink units: l2 {} linf {})",
                v["index"],
                v["radius_l2"],
                v["radius_linf"],
                v["units_at_kink"],
                v["radius_l2_excluding_kinks"],
                v["radius_linf_excluding_kinks"]
            );
        }
    }
    outln!("nnlin: {n_inst} instance(s) in {seconds:.3} s; wrote {}", args.out.display());
    Ok(())
}
