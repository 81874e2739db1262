//! The number types the reference interpreter runs on: `f32`, `f64` and [`Dual`].
//!
//! Every function with a kink is written once here, with PyTorch autograd's
//! one-sided derivative conventions (see `docs/ARCHITECTURE.md`, "Kink
//! conventions"): the kink tests compare `value()` with the breakpoint and pick
//! one branch, so a [`Dual`] evaluated exactly at a kink carries the derivative
//! of the branch PyTorch differentiates.

use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// A real number type the reference interpreter is generic over.
pub trait Scalar:
    Copy
    + Send
    + Sync
    + Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// Converts a constant (weights, attributes) into this type; a constant
    /// has zero derivative.
    fn from_f64(v: f64) -> Self;
    /// The primal value, widened to `f64` (used for kink decisions).
    fn value(self) -> f64;
    /// `e^self`.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// Gauss error function.
    fn erf(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `self^c` for a constant exponent `c`.
    fn powf(self, c: f64) -> Self;
    /// The reference's convolution at `u`, when this scalar has a faster
    /// kernel than the plain loops: `f64` answers with its own im2col and
    /// GEMM ([`crate::reference::conv_gemm`]); the others (`f32`, [`Dual`])
    /// return `None` and run the loops.
    fn conv_fast(_c: &crate::network::Conv, _u: &[Self]) -> Option<Vec<Self>> {
        None
    }
    /// `y[i] = y[i] + w·x[i]` over `y.len()` elements: a product, then a
    /// sum, each rounded (never fused), as the definition's loops.
    #[inline]
    fn axpy(y: &mut [Self], x: &[Self], w: Self) {
        for (yv, &xv) in y.iter_mut().zip(x) {
            *yv = *yv + w * xv;
        }
    }
    /// `ln(1 + e^self)`, evaluated without overflow.
    fn ln_1p_exp(self) -> Self {
        // softplus(x) = max(x, 0) + ln(1 + e^{-|x|})
        if self.value() > 0.0 {
            self + ((-self).exp() + Self::from_f64(1.0)).ln()
        } else {
            (self.exp() + Self::from_f64(1.0)).ln()
        }
    }
    /// Logistic sigmoid `1 / (1 + e^-self)`, evaluated without overflow.
    fn sigmoid(self) -> Self {
        let one = Self::from_f64(1.0);
        if self.value() >= 0.0 {
            one / (one + (-self).exp())
        } else {
            let e = self.exp();
            e / (one + e)
        }
    }
}

/// [`Scalar::axpy`] in `f64`, compiled for the widest vector unit the CPU
/// has (pulp's runtime dispatch; the baseline build uses SSE2 only). Rust
/// never contracts a product and a sum into one fused multiply-add, so the
/// bits are those of the plain loop.
struct Axpy<'a> {
    y: &'a mut [f64],
    x: &'a [f64],
    w: f64,
}

impl pulp::WithSimd for Axpy<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (yv, &xv) in self.y.iter_mut().zip(self.x) {
            *yv += self.w * xv;
        }
    }
}

impl Scalar for f64 {
    fn conv_fast(c: &crate::network::Conv, u: &[Self]) -> Option<Vec<Self>> {
        Some(crate::reference::conv_gemm(c, u))
    }
    fn axpy(y: &mut [Self], x: &[Self], w: Self) {
        pulp::Arch::new().dispatch(Axpy { y, x, w });
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn value(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn powf(self, c: f64) -> Self {
        f64::powf(self, c)
    }
}

impl Scalar for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn value(self) -> f64 {
        f64::from(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn powf(self, c: f64) -> Self {
        f32::powf(self, c as f32)
    }
}

/// A forward-mode dual number `v + d·ε` with `ε² = 0`: evaluating a function
/// on `Dual { v: x, d: 1 }` yields `f(x)` and `f'(x)` exactly (up to rounding).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Dual {
    /// Primal value.
    pub v: f64,
    /// Tangent (derivative) part.
    pub d: f64,
}

impl Dual {
    /// A dual number with the given value and tangent.
    pub fn new(v: f64, d: f64) -> Self {
        Self { v, d }
    }
    /// A variable: tangent 1.
    pub fn var(v: f64) -> Self {
        Self { v, d: 1.0 }
    }
}

impl Add for Dual {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self::new(self.v + o.v, self.d + o.d)
    }
}
impl Sub for Dual {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self::new(self.v - o.v, self.d - o.d)
    }
}
impl Mul for Dual {
    type Output = Self;
    fn mul(self, o: Self) -> Self {
        Self::new(self.v * o.v, self.d * o.v + self.v * o.d)
    }
}
impl Div for Dual {
    type Output = Self;
    fn div(self, o: Self) -> Self {
        let q = self.v / o.v;
        Self::new(q, (self.d - q * o.d) / o.v)
    }
}
impl Neg for Dual {
    type Output = Self;
    fn neg(self) -> Self {
        Self::new(-self.v, -self.d)
    }
}

impl Scalar for Dual {
    fn from_f64(v: f64) -> Self {
        Self::new(v, 0.0)
    }
    fn value(self) -> f64 {
        self.v
    }
    fn exp(self) -> Self {
        let e = self.v.exp();
        Self::new(e, e * self.d)
    }
    fn ln(self) -> Self {
        Self::new(self.v.ln(), self.d / self.v)
    }
    fn tanh(self) -> Self {
        let t = self.v.tanh();
        Self::new(t, (1.0 - t * t) * self.d)
    }
    fn erf(self) -> Self {
        let g = std::f64::consts::FRAC_2_SQRT_PI * (-self.v * self.v).exp();
        Self::new(libm::erf(self.v), g * self.d)
    }
    fn sqrt(self) -> Self {
        let s = self.v.sqrt();
        Self::new(s, self.d / (2.0 * s))
    }
    fn powf(self, c: f64) -> Self {
        let d = if c == 0.0 { 0.0 } else { c * self.v.powf(c - 1.0) };
        Self::new(self.v.powf(c), d * self.d)
    }
}
