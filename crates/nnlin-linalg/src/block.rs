//! [`Block`]: the dense column-major blocks that products take and give.

use faer::Mat;

use crate::{Real, written_zeros};

/// A dense column-major block with contiguous columns: the adjoint blocks of
/// reverse accumulation and the tangent blocks of forward accumulation.
/// Column access is a plain slice (no per-call stride arithmetic), and faer
/// sees it as a zero-copy `MatRef`/`MatMut` for GEMMs.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Block<T: Real = f64> {
    nrows: usize,
    ncols: usize,
    data: Vec<T>,
}

impl<T: Real> Block<T> {
    /// An `nrows × ncols` block of zeros.
    pub fn zeros(nrows: usize, ncols: usize) -> Self {
        Self { nrows, ncols, data: written_zeros(nrows * ncols) }
    }
    /// The identity (or its leading `nrows × ncols` part).
    pub fn identity(nrows: usize, ncols: usize) -> Self {
        Self::from_fn(nrows, ncols, |i, j| if i == j { T::ONE } else { T::ZERO })
    }
    /// A block with entries `f(i, j)`.
    pub fn from_fn(nrows: usize, ncols: usize, mut f: impl FnMut(usize, usize) -> T) -> Self {
        let mut data = Vec::with_capacity(nrows * ncols);
        for j in 0..ncols {
            for i in 0..nrows {
                data.push(f(i, j));
            }
        }
        Self { nrows, ncols, data }
    }
    /// A block over column-major `data`.
    ///
    /// # Panics
    /// If `data.len() != nrows * ncols`.
    pub fn from_col_major(nrows: usize, ncols: usize, data: Vec<T>) -> Self {
        assert_eq!(data.len(), nrows * ncols, "Block::from_col_major: length");
        Self { nrows, ncols, data }
    }
    /// Rows.
    pub fn nrows(&self) -> usize {
        self.nrows
    }
    /// Columns.
    pub fn ncols(&self) -> usize {
        self.ncols
    }
    /// Column `j`.
    #[inline]
    pub fn col_as_slice(&self, j: usize) -> &[T] {
        &self.data[j * self.nrows..(j + 1) * self.nrows]
    }
    /// Column `j`, mutable.
    #[inline]
    pub fn col_as_slice_mut(&mut self, j: usize) -> &mut [T] {
        &mut self.data[j * self.nrows..(j + 1) * self.nrows]
    }
    /// All entries, column-major.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    /// All entries, column-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }
    /// The shape and the column-major entries, without a copy.
    pub fn into_col_major(self) -> (usize, usize, Vec<T>) {
        (self.nrows, self.ncols, self.data)
    }
    /// A faer view (no copy).
    pub fn as_ref(&self) -> faer::MatRef<'_, T> {
        faer::MatRef::from_column_major_slice(&self.data, self.nrows, self.ncols)
    }
    /// A mutable faer view (no copy).
    pub fn as_mut(&mut self) -> faer::MatMut<'_, T> {
        faer::MatMut::from_column_major_slice_mut(&mut self.data, self.nrows, self.ncols)
    }
    /// A faer matrix (a copy).
    pub fn to_mat(&self) -> Mat<T> {
        Mat::from_fn(self.nrows, self.ncols, |i, j| self[(i, j)])
    }
    /// The transpose, as a new block.
    pub fn transpose(&self) -> Block<T> {
        let (r, c) = (self.nrows(), self.ncols());
        let mut out = vec![T::ZERO; r * c];
        for j in 0..c {
            for (i, &v) in self.col_as_slice(j).iter().enumerate() {
                out[i * c + j] = v;
            }
        }
        Block::from_col_major(c, r, out)
    }
    /// The entries converted to another scalar type.
    pub fn cast<U: Real>(&self) -> Block<U> {
        let data = self.data.iter().map(|&v| U::of(v.to_f64())).collect();
        Block { nrows: self.nrows, ncols: self.ncols, data }
    }

    /// `self += other`.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn add_assign(&mut self, other: &Block<T>) {
        assert_eq!(
            (self.nrows, self.ncols),
            (other.nrows, other.ncols),
            "Block::add_assign: shape"
        );
        for (a, &b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }
}

impl<T: Real> std::ops::Index<(usize, usize)> for Block<T> {
    type Output = T;
    #[inline]
    fn index(&self, (i, j): (usize, usize)) -> &T {
        debug_assert!(i < self.nrows && j < self.ncols);
        &self.data[j * self.nrows + i]
    }
}

impl<T: Real> std::ops::IndexMut<(usize, usize)> for Block<T> {
    #[inline]
    fn index_mut(&mut self, (i, j): (usize, usize)) -> &mut T {
        debug_assert!(i < self.nrows && j < self.ncols);
        &mut self.data[j * self.nrows + i]
    }
}
