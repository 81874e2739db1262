//! `nnlin region`: the linear region around each instance.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use ndarray::Array2;
use nnlin::Model;
use nnlin::region::Binding;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::NormArg;

pub struct Args {
    pub model: PathBuf,
    pub input: PathBuf,
    pub norm: NormArg,
    pub verify: usize,
    pub input_box: Option<Vec<f64>>,
    pub json: Option<PathBuf>,
    pub out: PathBuf,
    pub limit: Option<usize>,
    pub threads: Option<usize>,
}

fn binding_json(b: &Option<Binding>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => {
            let kind = match &b.kind {
                nnlin::region::BoundaryKind::Unit { index, at } => {
                    json!({"type": "unit", "index": index, "breakpoint": at})
                }
                nnlin::region::BoundaryKind::PoolTie { output, selected, other } => {
                    json!({"type": "maxpool", "output": output, "selected": selected, "other": other})
                }
                nnlin::region::BoundaryKind::Box { index } => {
                    json!({"type": "box", "index": index})
                }
            };
            json!({"layer": b.layer, "distance": b.distance, "boundary": kind})
        }
    }
}

const BLOCK: usize = 256;

/// Per layer: active / inactive units (with the inactive indices), for
/// two-breakpoint functions (Clip, HardTanh, HardSigmoid) how many units are
/// below, between and above their breakpoints, and every max-pool window's
/// argmax (flat input index).
fn pattern_json(model: &Model, inst: &nnlin::Instance, x: &[f64]) -> Value {
    let values = inst.values(x);
    let mut out = vec![];
    for (node, l) in model.network().nodes().iter().zip(&inst.layers) {
        match &node.layer {
            nnlin::ir::Layer::Activation(a) => {
                let Some(m) = &l.active else { continue };
                let active = m.iter().filter(|&&b| b).count();
                let inactive: Vec<usize> =
                    m.iter().enumerate().filter(|(_, b)| !**b).map(|(i, _)| i).collect();
                let mut e = json!({"layer": l.name, "kind": "activation", "active": active, "inactive": m.len() - active, "inactive_units": inactive});
                if let Some(bp) = a.expr.breakpoints(0).filter(|b| b.len() == 2) {
                    let z = &values[node.inputs[0].0];
                    let (lo, hi) = (bp[0].min(bp[1]), bp[0].max(bp[1]));
                    e["below"] = json!(z.iter().filter(|&&v| v <= lo).count());
                    e["between"] = json!(z.iter().filter(|&&v| v > lo && v < hi).count());
                    e["above"] = json!(z.iter().filter(|&&v| v >= hi).count());
                }
                out.push(e);
            }
            nnlin::ir::Layer::Pool(p) if p.kind == nnlin::ir::PoolKind::Max => {
                if let nnlin::linalg::Operator::Selection(sel) = &*l.inputs[0].1 {
                    out.push(json!({"layer": l.name, "kind": "maxpool", "argmax": sel.cols}));
                }
            }
            _ => {}
        }
    }
    Value::Array(out)
}

/// The most points `--verify` may sample per instance.
pub const MAX_VERIFY: usize = 100_000;

pub fn run(args: Args) -> Result<()> {
    crate::io::set_input_file(Some(&args.input));
    let model = crate::io::load_model(&args.model, nnlin::ConvKernel::Auto)?;
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
    let pool = crate::io::thread_pool(args.threads)?;
    let smooth = model
        .network()
        .nodes()
        .iter()
        .find(|n| {
            matches!(&n.layer, nnlin::ir::Layer::Activation(a) if !a.is_piecewise_linear())
                || matches!(n.layer, nnlin::ir::Layer::Lrn(_))
        })
        .map(|n| n.name.clone());
    let (n_inst, n) = xs.dim();
    let rows: Vec<Vec<f64>> = xs.rows().into_iter().map(|r| r.to_vec()).collect();
    let start = Instant::now();
    type Row = Result<(Value, Vec<f64>, Vec<f64>)>;
    let results: Vec<Row> = pool.install(|| {
        rows.par_iter()
            .enumerate()
            .map(|(k, x)| -> Result<(Value, Vec<f64>, Vec<f64>)> {
                if let Some(layer) = &smooth {
                    let norms: Vec<f64> = (0..7).map(|i| 10f64.powi(i - 6)).collect();
                    let sweep = model.linearization_sweep(x, &norms, 1 + k as u64)?;
                    let v = json!({
                        "index": k,
                        "smooth": true,
                        "note": format!("layer `{layer}` is smooth: no linear region; the linearization error ‖F(x+θ) − (W·(x+θ) + b)‖₂ along a random direction is reported instead"),
                        "sweep": sweep.iter().map(|s| json!({"norm": s.norm, "tangent_error": s.tangent_error, "secant_error": s.secant_error})).collect::<Vec<_>>(),
                    });
                    return Ok((v, vec![0.0; x.len()], vec![0.0; x.len()]));
                }
                let t0 = Instant::now();
                let r = model.region(x, input_box, BLOCK)?;
                let seconds = t0.elapsed().as_secs_f64();
                let mut v = json!({
                    "index": k,
                    "units_at_kink": r.units_at_kink,
                    "boundaries": r.boundaries,
                    "seconds": seconds,
                });
                if args.norm != NormArg::Linf {
                    v["radius_l2"] = json!(r.radius_l2);
                    v["radius_l2_excluding_kinks"] = json!(r.radius_l2_excluding_kinks);
                    v["binding"] = binding_json(&r.binding_l2);
                }
                if args.norm != NormArg::L2 {
                    v["radius_linf"] = json!(r.radius_linf);
                    v["radius_linf_excluding_kinks"] = json!(r.radius_linf_excluding_kinks);
                    v["binding_linf"] = binding_json(&r.binding_linf);
                }
                let inst = model.compile_instance(x, nnlin::Mode::Tangent)?;
                v["pattern"] = pattern_json(&model, &inst, x);
                if args.verify > 0 {
                    let ver = model.verify_region(x, &r, args.verify, 7 + k as u64)?;
                    v["verify"] = json!({
                        "samples": ver.samples,
                        "radius_used": 0.999 * r.radius_l2_excluding_kinks,
                        "kept_pattern": ver.kept_pattern,
                        "exact": ver.exact,
                        "max_relative_error": ver.max_error,
                        "beyond_changes_pattern": ver.beyond_changes_pattern,
                    });
                }
                Ok((v, r.direction_l2, r.direction_linf))
            })
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut instances = Vec::with_capacity(n_inst);
    let mut dir = Array2::<f64>::zeros((n_inst, n));
    let mut dir_inf = Array2::<f64>::zeros((n_inst, n));
    for (k, r) in results.into_iter().enumerate() {
        let (v, d2, d1) = r?;
        dir.row_mut(k).assign(&ndarray::Array1::from(d2));
        dir_inf.row_mut(k).assign(&ndarray::Array1::from(d1));
        instances.push(v);
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
            println!(
                "instance {}: smooth network, no linear region (sweep in region.json)",
                v["index"]
            );
        } else {
            println!(
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
    println!("nnlin: {n_inst} instance(s) in {seconds:.3} s; wrote {}", args.out.display());
    Ok(())
}
