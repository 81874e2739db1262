//! The linear region around an instance (Lemma 1 of the source paper): its
//! exact ℓ2 / ℓ∞ radius, the binding boundary, and sampled verification.

use std::time::Instant;

use nnlin_compile::region as reg;
use serde_json::{Value, json};

use crate::{Error, Mode, Model, Options, Result, Rows};

pub use nnlin_compile::region::{Binding, BoundaryKind, Region, forward_blocks};

/// The region of a compiled instance of `net` (see [`Model::region`]).
pub fn compute(
    net: &crate::ir::Network,
    inst: &crate::Instance,
    x: &[f64],
    input_box: Option<(f64, f64)>,
    block: usize,
) -> std::result::Result<Region, reg::RegionError> {
    reg::region(net, inst, x, input_box, block, faer::Par::Seq)
}

/// Outcome of sampling a region.
///
/// ```
/// let m = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// let x = [5.9, 3.0, 5.1, 1.8];
/// let r = m.region(&x, None, 256)?;
/// let v = m.verify_region(&x, &r, 20, 1)?;
/// assert_eq!((v.kept_pattern, v.exact), (20, 20));
/// # Ok::<(), nnlin::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Verification {
    /// Points drawn uniformly in the ℓ2 ball of radius `0.999·r` (`r` the
    /// radius over the boundaries not through `x`).
    pub samples: usize,
    /// Of those, points that keep the activation pattern (units at a kink
    /// excepted).
    pub kept_pattern: usize,
    /// Of those, points where `F(x') = W·x' + b` to `1e-9` relative.
    pub exact: usize,
    /// Largest `|F(x') − (W·x' + b)|` relative to `max |F(x')|` over the samples.
    pub max_error: f64,
    /// Whether `x + 1.001·r·d` (just past the binding boundary) changes the
    /// pattern; `None` when the binding boundary is the input box or there
    /// is none.
    pub beyond_changes_pattern: Option<bool>,
}

/// The linearization error of a smooth network along one direction.
///
/// ```
/// let m = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/tanh.onnx"))?;
/// let s = m.linearization_sweep(&[5.9, 3.0, 5.1, 1.8], &[1e-4, 1e-2], 1)?;
/// assert!(s[0].tangent_error < s[1].tangent_error);
/// # Ok::<(), nnlin::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    /// ‖θ‖₂.
    pub norm: f64,
    /// ‖F(x+θ) − (W·(x+θ) + b)‖₂ with tangent-mode W, b.
    pub tangent_error: f64,
    /// The same with secant-mode W, b.
    pub secant_error: f64,
}

/// A small deterministic generator (xorshift64*) for sampling.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn wx_b(w: &ndarray::Array2<f64>, b: &ndarray::Array1<f64>, x: &[f64]) -> Vec<f64> {
    w.rows()
        .into_iter()
        .zip(b)
        .map(|(r, bi)| r.iter().zip(x).map(|(p, q)| p * q).sum::<f64>() + bi)
        .collect()
}

impl Model {
    /// The linear region around `x` (tangent mode). `input_box` bounds every
    /// input element (e.g. pixels in `[0, 1]`); `block` input columns are
    /// processed per forward pass (memory).
    pub fn region(&self, x: &[f64], input_box: Option<(f64, f64)>, block: usize) -> Result<Region> {
        let inst = self.compile_instance(x, Mode::Tangent)?;
        reg::region(self.network(), &inst, x, input_box, block, faer::Par::Seq)
            .map_err(|source| Error::Region { model: self.name().to_string(), source })
    }

    /// Samples `k` points in the region's ball and one just past its binding
    /// boundary.
    pub fn verify_region(
        &self,
        x: &[f64],
        region: &Region,
        k: usize,
        seed: u64,
    ) -> Result<Verification> {
        let base = self.compile_instance(x, Mode::Tangent)?;
        let lin = self.linearize(x, &Options::default().with_rows(Rows::All))?;
        let n = x.len();
        let r = 0.999 * region.radius_l2_excluding_kinks;
        let mut rng = Rng(seed | 1);
        let (mut kept, mut exact, mut max_error) = (0, 0, 0.0f64);
        for _ in 0..k {
            let mut d: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let norm = d.iter().map(|v| v * v).sum::<f64>().sqrt();
            let radius = if r.is_finite() { r } else { 1.0 } * rng.uniform().powf(1.0 / n as f64);
            d.iter_mut().for_each(|v| *v *= radius / norm);
            let xp: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
            let inst = self.compile_instance(&xp, Mode::Tangent)?;
            if reg::same_pattern(&base, &inst, &region.kinks) {
                kept += 1;
            }
            let f = self.forward_reference(&xp);
            let g = wx_b(&lin.w, &lin.b, &xp);
            let scale = f.iter().fold(1e-300f64, |a, v| a.max(v.abs()));
            let e = f.iter().zip(&g).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max) / scale;
            max_error = max_error.max(e);
            if e <= 1e-9 {
                exact += 1;
            }
        }
        let beyond = match &region.binding_l2 {
            Some(b)
                if !matches!(b.kind, BoundaryKind::Box { .. })
                    && region.radius_l2_excluding_kinks.is_finite() =>
            {
                let step = 1.001 * region.radius_l2_excluding_kinks;
                let xp: Vec<f64> =
                    x.iter().zip(&region.direction_l2).map(|(a, d)| a + step * d).collect();
                let inst = self.compile_instance(&xp, Mode::Tangent)?;
                Some(!reg::same_pattern(&base, &inst, &region.kinks))
            }
            _ => None,
        };
        Ok(Verification {
            samples: k,
            kept_pattern: kept,
            exact,
            max_error,
            beyond_changes_pattern: beyond,
        })
    }

    /// For smooth networks: the linearization error along a random direction
    /// at each of `norms`.
    pub fn linearization_sweep(
        &self,
        x: &[f64],
        norms: &[f64],
        seed: u64,
    ) -> Result<Vec<SweepPoint>> {
        let t = self.linearize(x, &Options::default())?;
        let s = self.linearize(x, &Options::default().with_mode(Mode::Secant))?;
        let mut rng = Rng(seed | 1);
        let mut u: Vec<f64> = (0..x.len()).map(|_| rng.normal()).collect();
        let nu = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.iter_mut().for_each(|v| *v /= nu);
        norms
            .iter()
            .map(|&h| {
                let xp: Vec<f64> = x.iter().zip(&u).map(|(a, b)| a + h * b).collect();
                let f = self.forward_reference(&xp);
                let err = |lin: &crate::Linearization| {
                    let g = wx_b(&lin.w, &lin.b, &xp);
                    f.iter().zip(&g).map(|(p, q)| (p - q).powi(2)).sum::<f64>().sqrt()
                };
                Ok(SweepPoint { norm: h, tangent_error: err(&t), secant_error: err(&s) })
            })
            .collect()
    }
}

/// The norms a region report gives radii in.
///
/// ```
/// use nnlin::region::Norm;
/// assert_eq!("linf".parse::<Norm>(), Ok(Norm::Linf));
/// assert_eq!(Norm::default().to_string(), "both");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Norm {
    /// The ℓ2 radius.
    L2,
    /// The ℓ∞ radius.
    Linf,
    /// Both.
    #[default]
    Both,
}

impl std::fmt::Display for Norm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Norm::L2 => "l2",
            Norm::Linf => "linf",
            Norm::Both => "both",
        })
    }
}

impl std::str::FromStr for Norm {
    type Err = String;
    /// `l2`, `linf` or `both`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "l2" => Ok(Norm::L2),
            "linf" => Ok(Norm::Linf),
            "both" => Ok(Norm::Both),
            other => Err(format!("norm: l2, linf or both, got {other:?}")),
        }
    }
}

/// What a [`Model::region_report`] measures.
///
/// ```
/// use nnlin::region::{Norm, ReportOptions};
/// let o = ReportOptions::new().with_norm(Norm::L2).with_verify(100).with_box(0.0, 1.0);
/// assert_eq!(o.verify, 100);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ReportOptions {
    /// The radii to report.
    pub norm: Norm,
    /// Points to sample inside the region (0: none); at most
    /// [`MAX_VERIFY`].
    pub verify: usize,
    /// Bounds on every input element, `lo < hi`.
    pub input_box: Option<(f64, f64)>,
}

impl ReportOptions {
    /// Both norms, no sampling, no box.
    pub fn new() -> Self {
        Self::default()
    }
    /// With `norm`.
    pub fn with_norm(mut self, norm: Norm) -> Self {
        self.norm = norm;
        self
    }
    /// With `k` sampled points.
    pub fn with_verify(mut self, k: usize) -> Self {
        self.verify = k;
        self
    }
    /// With every input element in `[lo, hi]`.
    pub fn with_box(mut self, lo: f64, hi: f64) -> Self {
        self.input_box = Some((lo, hi));
        self
    }
}

/// The most points a report may sample per instance.
pub const MAX_VERIFY: usize = 100_000;

/// Input columns per forward pass of the region computation (memory).
const BLOCK: usize = 256;

/// One instance's region report: the JSON `nnlin region --json` writes per
/// instance, and the directions of the binding boundaries.
///
/// ```
/// let m = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx"))?;
/// let r = m.region_report(&[5.9, 3.0, 5.1, 1.8], 0, &Default::default())?;
/// let d: f64 = r.direction_l2.iter().map(|v| v * v).sum();
/// assert!((d - 1.0).abs() < 1e-12); // a unit direction to the binding boundary
/// # Ok::<(), nnlin::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The instance's entry of `region.json`.
    pub json: Value,
    /// Unit direction to the binding ℓ2 boundary (zeros where there is none
    /// or the network is smooth).
    pub direction_l2: Vec<f64>,
    /// Direction (±1 entries) to the binding ℓ∞ boundary.
    pub direction_linf: Vec<f64>,
}

fn binding_json(b: &Option<Binding>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => {
            let kind = match &b.kind {
                BoundaryKind::Unit { index, at } => {
                    json!({"type": "unit", "index": index, "breakpoint": at})
                }
                BoundaryKind::PoolTie { output, selected, other } => {
                    json!({"type": "maxpool", "output": output, "selected": selected, "other": other})
                }
                BoundaryKind::Box { index } => json!({"type": "box", "index": index}),
            };
            json!({"layer": b.layer, "distance": b.distance, "boundary": kind})
        }
    }
}

/// Per layer: active / inactive units (with the inactive indices), for
/// two-breakpoint functions (Clip, HardTanh, HardSigmoid) how many units are
/// below, between and above their breakpoints, and every max-pool window's
/// argmax (flat input index).
fn pattern_json(model: &Model, inst: &crate::Instance, x: &[f64]) -> Value {
    use crate::ir::{Layer, PoolKind};
    let values = inst.values(x);
    let mut out = vec![];
    for (node, l) in model.network().nodes().iter().zip(&inst.layers) {
        match &node.layer {
            Layer::Activation(a) => {
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
            Layer::Pool(p) => match p.kind {
                PoolKind::Max => {
                    if let crate::linalg::Operator::Selection(sel) = &*l.inputs[0].1 {
                        out.push(json!({"layer": l.name, "kind": "maxpool", "argmax": sel.cols()}));
                    }
                }
                PoolKind::Average { .. } => {}
            },
            // no pattern: fixed operators, and the smooth layers (no region)
            Layer::Dense(_)
            | Layer::Affine(_)
            | Layer::Reshape(_)
            | Layer::Conv(_)
            | Layer::ConvTranspose(_)
            | Layer::Add(_)
            | Layer::Concat(_)
            | Layer::Pad(_)
            | Layer::Transpose(_)
            | Layer::Lrn(_)
            | Layer::Select(_)
            | Layer::Product(_)
            | Layer::Reduce(_)
            | Layer::Softmax(_)
            | Layer::MatMul(_) => {}
        }
    }
    Value::Array(out)
}

impl Model {
    /// The first smooth layer (a smooth activation, LRN, softmax, or a
    /// product of two branches), which leaves the network no linear region.
    pub fn smooth_layer(&self) -> Option<&str> {
        self.network()
            .nodes()
            .iter()
            .find(|n| {
                use crate::ir::Layer;
                match &n.layer {
                    Layer::Activation(a) => !a.is_piecewise_linear(),
                    // curved: products of branches (gates, attention,
                    // normalizations), softmax and LRN
                    Layer::Lrn(_) | Layer::Product(_) | Layer::Softmax(_) | Layer::MatMul(_) => {
                        true
                    }
                    Layer::Dense(_)
                    | Layer::Affine(_)
                    | Layer::Reshape(_)
                    | Layer::Conv(_)
                    | Layer::ConvTranspose(_)
                    | Layer::Pool(_)
                    | Layer::Add(_)
                    | Layer::Concat(_)
                    | Layer::Pad(_)
                    | Layer::Transpose(_)
                    | Layer::Select(_)
                    | Layer::Reduce(_) => false,
                }
            })
            .map(|n| n.name.as_str())
    }

    /// Instance `index` of a region report at `x`: the radii, the binding
    /// boundaries, the activation pattern and the sampled verification that
    /// `nnlin region` reports, or for a smooth network the linearization
    /// error along a random direction. Seeds derive from `index`, so a
    /// report does not depend on the order instances are computed in.
    ///
    /// ```
    /// # let model = nnlin::Model::from_onnx_file(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/iris/relu.onnx")).unwrap();
    /// use nnlin::region::ReportOptions;
    /// let r = model.region_report(&[5.9, 3.0, 5.1, 1.8], 0, &ReportOptions::new().with_verify(10))?;
    /// assert!(r.json["radius_l2"].as_f64().unwrap() > 0.0);
    /// assert_eq!(r.json["verify"]["samples"], 10);
    /// # Ok::<(), nnlin::Error>(())
    /// ```
    ///
    /// # Errors
    /// If `x` fails to compile, lies outside the box, or `verify` is above
    /// [`MAX_VERIFY`].
    pub fn region_report(&self, x: &[f64], index: usize, opts: &ReportOptions) -> Result<Report> {
        if opts.verify > MAX_VERIFY {
            return Err(Error::Verify { samples: opts.verify, max: MAX_VERIFY });
        }
        if let Some((lo, hi)) = opts.input_box {
            if lo.partial_cmp(&hi) != Some(std::cmp::Ordering::Less) {
                return Err(Error::Box { lo, hi, index: None });
            }
            if let Some(i) = x.iter().position(|&v| v < lo || v > hi) {
                return Err(Error::Box { lo, hi, index: Some((i, x[i])) });
            }
        }
        if x.len() != self.input_len() {
            return Err(Error::InputLength { expected: self.input_len(), got: x.len() });
        }
        let n = x.len();
        if let Some(layer) = self.smooth_layer() {
            let norms: Vec<f64> = (0..7).map(|i| 10f64.powi(i - 6)).collect();
            let sweep = self.linearization_sweep(x, &norms, 1 + index as u64)?;
            let json = json!({
                "index": index,
                "smooth": true,
                "note": format!("layer `{layer}` is smooth: no linear region; the linearization error ‖F(x+θ) − (W·(x+θ) + b)‖₂ along a random direction is reported instead"),
                "sweep": sweep.iter().map(|s| json!({"norm": s.norm, "tangent_error": s.tangent_error, "secant_error": s.secant_error})).collect::<Vec<_>>(),
            });
            return Ok(Report { json, direction_l2: vec![0.0; n], direction_linf: vec![0.0; n] });
        }
        let t0 = Instant::now();
        let r = self.region(x, opts.input_box, BLOCK)?;
        let seconds = t0.elapsed().as_secs_f64();
        let mut v = json!({
            "index": index,
            "units_at_kink": r.units_at_kink,
            "boundaries": r.boundaries,
            "seconds": seconds,
        });
        if opts.norm != Norm::Linf {
            v["radius_l2"] = json!(r.radius_l2);
            v["radius_l2_excluding_kinks"] = json!(r.radius_l2_excluding_kinks);
            v["binding"] = binding_json(&r.binding_l2);
        }
        if opts.norm != Norm::L2 {
            v["radius_linf"] = json!(r.radius_linf);
            v["radius_linf_excluding_kinks"] = json!(r.radius_linf_excluding_kinks);
            v["binding_linf"] = binding_json(&r.binding_linf);
        }
        let inst = self.compile_instance(x, Mode::Tangent)?;
        v["pattern"] = pattern_json(self, &inst, x);
        if opts.verify > 0 {
            let ver = self.verify_region(x, &r, opts.verify, 7 + index as u64)?;
            v["verify"] = json!({
                "samples": ver.samples,
                "radius_used": 0.999 * r.radius_l2_excluding_kinks,
                "kept_pattern": ver.kept_pattern,
                "exact": ver.exact,
                "max_relative_error": ver.max_error,
                "beyond_changes_pattern": ver.beyond_changes_pattern,
            });
        }
        Ok(Report { json: v, direction_l2: r.direction_l2, direction_linf: r.direction_linf })
    }
}
