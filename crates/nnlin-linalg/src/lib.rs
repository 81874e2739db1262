//! Linear operators and their products: the vocabulary the instance compiler
//! emits and the accumulator multiplies. It knows no neural networks.
//!
//! Every operator `A` (`nrows × ncols`) supports [`Operator::apply`] (`A·x`),
//! [`Operator::left_mul`] (`G·A` for a dense block `G`: reverse accumulation)
//! and [`Operator::right_mul`] (`A·T` for a dense block `T`: forward
//! accumulation). Dense blocks are `faer::Mat<f64>` (column-major). The
//! explicit structure is never densified except by [`Operator::to_dense`],
//! which exists for tests and the dense baseline.

use faer::Par;

mod block;
mod conv;
mod fold;
mod operator;
mod real;
mod simd;
mod structured;
mod winograd;
pub use block::Block;
pub use conv::{
    ACTIVE_MIN_CHANNELS, ACTIVE_MIN_TAPS, ACTIVE_TAPS, CONV_ACTIVE_BELOW, DIRECT_MAX_CHANNELS,
};
pub use conv::{ConvGeometry, ConvOp};
pub use operator::{
    AffineOp, CONV_GEMM_MIN_CHANNELS, CONV_SPARSE_BELOW, CONV_SPARSE_BELOW_FEW_CHANNELS,
    ChannelScale, DENSE_SKIP_BELOW, Operator, Selection, Stage, conv_takes_scatter,
};
pub use real::{DENSE_TILE_COLUMNS, DENSE_TILED_MAX, Real, Weights};
pub use structured::{FixedFactor, KronOp, MatMulOp, ShapeError, SoftmaxJac};

/// `n` zeros, written. `vec![0; n]` asks the allocator for zeroed memory,
/// which for a large block is fresh pages mapped to the kernel's shared
/// zero page: a kernel that accumulates into them (`+=`) reads each page
/// first and then takes a second, copy-on-write fault with a TLB flush on
/// every thread's CPU. Written zeros fault each page once. ONet, 2
/// instances on 2 threads: half the samples were such faults.
pub(crate) fn written_zeros<T: Real>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, T::ZERO);
    v
}

/// [`written_zeros`], written across threads when `par` has them and
/// there are at least [`PAR_ELEMENTS`] (each thread faults in its own
/// pages).
pub(crate) fn written_zeros_par<T: Real>(n: usize, par: Par) -> Vec<T> {
    if par.degree() > 1 && n >= PAR_ELEMENTS {
        use rayon::prelude::*;
        let mut v = Vec::with_capacity(n);
        v.par_extend(rayon::iter::repeat_n(T::ZERO, n));
        v
    } else {
        written_zeros(n)
    }
}

/// Elements per task of a parallel elementwise pass (zeroing, scaling an
/// adjoint): below this a task costs more to hand to a thread than to run.
pub(crate) const PAR_ELEMENTS: usize = 1 << 15;

/// `f(start, chunk)` over `y` in chunks of `chunk` elements (as tasks when
/// `par` has threads and there are more than two; each chunk's work is the
/// same whichever task runs it): whether it returned `true` on every
/// chunk. A pass that works on a chunk while it is in cache.
pub fn for_chunks<T: Send>(
    y: &mut [T],
    chunk: usize,
    par: Par,
    f: impl Fn(usize, &mut [T]) -> bool + Sync,
) -> bool {
    let chunk = chunk.max(1);
    if par.degree() > 1 && y.len() > 2 * chunk {
        use rayon::prelude::*;
        y.par_chunks_mut(chunk)
            .enumerate()
            .map(|(k, c)| f(k * chunk, c))
            .reduce(|| true, |a, b| a & b)
    } else {
        y.chunks_mut(chunk).enumerate().fold(true, |a, (k, c)| a & f(k * chunk, c))
    }
}

/// Per column of a column-major block with `k` rows (`g.len() / k`
/// columns): whether it has a nonzero entry. One pass, vectorized for the
/// row counts up to 16 (a classifier's W has 10): each column's values
/// are or-ed as sign-free bits, within the column (a float comparison
/// per value vectorizes across columns instead, as strided gathers: twice
/// the time for 10 rows of `f32`).
pub fn nonzero_columns<T: Real>(g: &[T], k: usize) -> Vec<bool> {
    #[inline(always)]
    fn fixed<T: Real, const K: usize>(g: &[T]) -> Vec<bool> {
        g.chunks_exact(K).map(|c| c.iter().fold(0, |a, &v| a | v.magnitude_bits()) != 0).collect()
    }
    macro_rules! by_rows {
        ($($n:literal)*) => {
            match k {
                0 => vec![],
                $($n => simd::dispatch(#[inline(always)] || fixed::<T, $n>(g)),)*
                _ => g.chunks_exact(k).map(|c| c.iter().any(|&v| v != T::ZERO)).collect(),
            }
        };
    }
    by_rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
}

/// The crate's tests' pseudo-random stream: xorshift64 from `seed` (made
/// odd, so never the all-zero state).
#[cfg(test)]
pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// Per column, any entry `!= 0.0` (so `-0.0` is zero, NaN and the
        /// smallest subnormal are not), for every row count, in f64 and f32.
        #[test]
        fn nonzero_columns_tests_each_entry_against_zero(k in 0usize..20, cols in 0usize..40, seed in any::<u64>()) {
            let pick = [0.0, -0.0, 1.0, -2.5, f64::NAN, f64::MIN_POSITIVE, 5e-324, f64::INFINITY];
            let mut next = super::xorshift(seed);
            let g: Vec<f64> = (0..k * cols)
                .map(|_| {
                    let s = next();
                    // mostly zeros, so that whole columns are zero
                    if s.is_multiple_of(4) { pick[(s / 4 % 8) as usize] } else { [0.0, -0.0][(s / 4 % 2) as usize] }
                })
                .collect();
            let want: Vec<bool> = if k == 0 { vec![] } else { g.chunks_exact(k).map(|c| c.iter().any(|&v| v != 0.0)).collect() };
            prop_assert_eq!(super::nonzero_columns(&g, k), want.clone());
            let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            let want32: Vec<bool> = if k == 0 { vec![] } else { g32.chunks_exact(k).map(|c| c.iter().any(|&v| v != 0.0)).collect() };
            prop_assert_eq!(super::nonzero_columns(&g32, k), want32);
        }
    }
}
