//! Sliding-window geometry shared by convolution and pooling.
//!
//! Everything is 2-D: a 1-D layer is a 2-D one with height 1 (kernel 1,
//! stride 1, no padding along it), so one set of loops serves both.

/// Geometry of a 2-D sliding window over an `ih × iw` input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Input height.
    pub ih: usize,
    /// Input width.
    pub iw: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Vertical stride.
    pub sh: usize,
    /// Horizontal stride.
    pub sw: usize,
    /// Vertical dilation.
    pub dh: usize,
    /// Horizontal dilation.
    pub dw: usize,
    /// Padding above.
    pub pt: usize,
    /// Padding left.
    pub pl: usize,
    /// Padding below.
    pub pb: usize,
    /// Padding right.
    pub pr: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

fn out_len(
    input: usize,
    k: usize,
    s: usize,
    d: usize,
    p0: usize,
    p1: usize,
    ceil: bool,
) -> Option<usize> {
    // every size here comes from a file: checked arithmetic throughout
    let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let total = input.checked_add(p0)?.checked_add(p1)?;
    if total < span || s == 0 {
        return None;
    }
    let num = total - span;
    let mut out = if ceil { num.div_ceil(s) + 1 } else { num / s + 1 };
    // PyTorch (and ONNX since opset 19): the last window must start inside
    // the input or the leading padding.
    if ceil && (out - 1) * s >= input + p0 {
        out -= 1;
    }
    Some(out)
}

impl Window {
    /// Builds a window, computing the output size; `None` if the kernel does
    /// not fit, a stride/dilation/kernel is zero, or a size overflows.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (ih, iw): (usize, usize),
        (kh, kw): (usize, usize),
        (sh, sw): (usize, usize),
        (dh, dw): (usize, usize),
        (pt, pl, pb, pr): (usize, usize, usize, usize),
        ceil_mode: bool,
    ) -> Option<Self> {
        if [kh, kw, sh, sw, dh, dw].contains(&0) {
            return None;
        }
        let oh = out_len(ih, kh, sh, dh, pt, pb, ceil_mode)?;
        let ow = out_len(iw, kw, sw, dw, pl, pr, ceil_mode)?;
        // the largest input coordinate any tap reaches must be representable
        let reach = |o: usize, s: usize, k: usize, d: usize| {
            (o - 1).checked_mul(s)?.checked_add((k - 1).checked_mul(d)?)
        };
        reach(oh, sh, kh, dh)?;
        reach(ow, sw, kw, dw)?;
        oh.checked_mul(ow)?;
        Some(Self { ih, iw, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, oh, ow })
    }

    /// Input row of kernel row `ky` at output row `oy`, if inside the input.
    #[inline]
    pub fn iy(&self, oy: usize, ky: usize) -> Option<usize> {
        let y = (oy * self.sh + ky * self.dh).checked_sub(self.pt)?;
        (y < self.ih).then_some(y)
    }

    /// Input column of kernel column `kx` at output column `ox`, if inside.
    #[inline]
    pub fn ix(&self, ox: usize, kx: usize) -> Option<usize> {
        let x = (ox * self.sw + kx * self.dw).checked_sub(self.pl)?;
        (x < self.iw).then_some(x)
    }

    /// Number of kernel taps at `(oy, ox)` that fall inside the padded input
    /// (not past the trailing padding, which `ceil_mode` can overrun).
    pub fn taps_in_padded(&self, oy: usize, ox: usize) -> usize {
        let rows = (0..self.kh)
            .filter(|&ky| oy * self.sh + ky * self.dh < self.ih + self.pt + self.pb)
            .count();
        let cols = (0..self.kw)
            .filter(|&kx| ox * self.sw + kx * self.dw < self.iw + self.pl + self.pr)
            .count();
        rows * cols
    }

    /// Number of kernel taps at `(oy, ox)` inside the input.
    pub fn taps_in_input(&self, oy: usize, ox: usize) -> usize {
        let rows = (0..self.kh).filter(|&ky| self.iy(oy, ky).is_some()).count();
        let cols = (0..self.kw).filter(|&kx| self.ix(ox, kx).is_some()).count();
        rows * cols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_match_pytorch() {
        // nn.MaxPool2d(3, 2, ceil_mode=True) on 6: floor((6-3)/2)+1 = 2, ceil -> 3
        let w = Window::new((6, 6), (3, 3), (2, 2), (1, 1), (0, 0, 0, 0), true).unwrap();
        assert_eq!((w.oh, w.ow), (3, 3));
        // ceil with padding: the last window would start in the trailing pad
        let w = Window::new((5, 5), (2, 2), (2, 2), (1, 1), (1, 1, 1, 1), true).unwrap();
        assert_eq!(w.oh, 3);
        let w = Window::new((28, 28), (5, 5), (1, 1), (1, 1), (2, 2, 2, 2), false).unwrap();
        assert_eq!((w.oh, w.ow), (28, 28));
        assert!(Window::new((2, 2), (3, 3), (1, 1), (1, 1), (0, 0, 0, 0), false).is_none());
    }

    #[test]
    fn hostile_sizes_are_refused_not_wrapped() {
        let big = usize::MAX / 2;
        assert!(Window::new((4, 4), (2, 2), (1, 1), (1, 1), (big, big, big, big), false).is_none());
        assert!(
            Window::new((4, 4), (usize::MAX, 2), (1, 1), (2, 1), (0, 0, 0, 0), false).is_none()
        );
        assert!(Window::new((4, 4), (2, 2), (0, 1), (1, 1), (0, 0, 0, 0), false).is_none());
    }
}
