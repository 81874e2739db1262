//! The linear region around an instance (Lemma 1 of the source paper): its
//! exact ℓ2 / ℓ∞ radius, the binding boundary, and sampled verification.

use nnlin_compile::region as reg;

use crate::{Error, Mode, Model, Options, Result, Rows};

pub use nnlin_compile::region::{Binding, BoundaryKind, Region, forward_blocks};

/// The region of a compiled instance of `net` (see [`Model::region`]).
pub fn compute(
    net: &crate::ir::Network,
    inst: &crate::Instance,
    x: &[f64],
    input_box: Option<(f64, f64)>,
    block: usize,
) -> Result<Region> {
    reg::region(net, inst, x, input_box, block, faer::Par::Seq)
        .map_err(|e| Error::Input(e.to_string()))
}

/// Outcome of sampling a region.
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
            .map_err(|e| Error::Input(format!("{}: {e}", self.name())))
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
