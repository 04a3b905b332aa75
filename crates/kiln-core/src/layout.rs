//! Layout: how a tensor's shape maps onto its storage (strides and a start offset).
//!
//! Views (permute, narrow, broadcast, reshape of contiguous data) only build a new layout over
//! the same storage. Kernels walk a layout either as one contiguous range (the fast path) or as
//! contiguous inner blocks, after merging dimensions that are laid out back to back.

use crate::shape::{DimVec, Shape};
use smallvec::smallvec;

/// Shape, strides (in elements) and offset of a view into a storage buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    strides: DimVec,
    offset: usize,
}

impl Layout {
    /// A row-major layout starting at offset 0.
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    /// A layout from its parts; the caller guarantees it stays inside its storage.
    pub fn new(shape: Shape, strides: DimVec, offset: usize) -> Self {
        assert_eq!(
            shape.rank(),
            strides.len(),
            "layout: rank of shape and strides differ"
        );
        Layout {
            shape,
            strides,
            offset,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dims.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The strides, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the first element in the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of elements in the view.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// True when the view is row-major without gaps (offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.dims().iter().zip(self.strides.iter()).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// The storage range when the view is contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous()
            .then(|| self.offset..self.offset + self.elem_count())
    }

    /// One past the largest storage index this view touches (0 when empty).
    pub fn required_len(&self) -> usize {
        if self.elem_count() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .dims()
                .iter()
                .zip(self.strides.iter())
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Dims and strides with size-1 dims dropped and back-to-back dims merged: the fewest
    /// (dim, stride) pairs that describe the same walk over storage.
    pub fn merged(&self) -> (DimVec, DimVec) {
        let mut dims: DimVec = DimVec::new();
        let mut strides: DimVec = DimVec::new();
        for (&d, &s) in self.shape.dims().iter().zip(self.strides.iter()) {
            if d == 1 {
                continue;
            }
            if let (Some(ld), Some(&ls)) = (dims.last_mut(), strides.last()) {
                if ls == s * d {
                    *ld *= d;
                    *strides.last_mut().unwrap() = s;
                    continue;
                }
            }
            dims.push(d);
            strides.push(s);
        }
        (dims, strides)
    }

    /// Storage offsets of every element, in row-major order.
    pub fn offsets(&self) -> StridedOffsets {
        let (dims, strides) = self.merged();
        StridedOffsets::new(dims, strides, self.offset, self.elem_count())
    }

    /// Calls `f(start, len, stride)` for each run of the view's elements along its innermost
    /// merged dim, in row-major order. Contiguous views yield a single run with stride 1.
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let n = self.elem_count();
        if n == 0 {
            return;
        }
        let (dims, strides) = self.merged();
        if dims.is_empty() {
            return f(self.offset, 1, 1);
        }
        let r = dims.len();
        let (inner, inner_stride) = (dims[r - 1], strides[r - 1]);
        if r == 1 {
            return f(self.offset, inner, inner_stride);
        }
        let outer = StridedOffsets::new(
            DimVec::from_slice(&dims[..r - 1]),
            DimVec::from_slice(&strides[..r - 1]),
            self.offset,
            n / inner,
        );
        for start in outer {
            f(start, inner, inner_stride);
        }
    }

    /// This layout broadcast to `target` (stride 0 along broadcast dims); panics naming `op`
    /// and both shapes when that is not a valid NumPy broadcast.
    pub fn broadcast_as(&self, target: &Shape, op: &str) -> Layout {
        let (r, rt) = (self.shape.rank(), target.rank());
        assert!(
            r <= rt,
            "{op}: cannot broadcast shape {} to {}",
            self.shape,
            target
        );
        let mut strides = DimVec::from_elem(0, rt);
        for i in 0..rt {
            if i < rt - r {
                continue;
            }
            let (d, s) = (self.shape.dims()[i + r - rt], self.strides[i + r - rt]);
            let t = target.dims()[i];
            if d == t {
                strides[i] = s;
            } else if d == 1 {
                strides[i] = 0;
            } else {
                panic!("{op}: cannot broadcast shape {} to {}", self.shape, target);
            }
        }
        Layout {
            shape: target.clone(),
            strides,
            offset: self.offset,
        }
    }

    /// The dims reordered by `perm` (a permutation of 0..rank).
    pub fn permute(&self, perm: &[usize]) -> Layout {
        let r = self.shape.rank();
        let mut seen = smallvec::SmallVec::<[bool; 6]>::from_elem(false, r);
        let valid = perm.len() == r
            && perm
                .iter()
                .all(|&p| p < r && !std::mem::replace(&mut seen[p], true));
        assert!(
            valid,
            "permute: {perm:?} is not a permutation of the dims of shape {}",
            self.shape
        );
        let dims: DimVec = perm.iter().map(|&p| self.shape.dims()[p]).collect();
        let strides: DimVec = perm.iter().map(|&p| self.strides[p]).collect();
        Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        }
    }

    /// Elements `start..start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Layout {
        let d = self.shape.dims()[dim];
        assert!(
            start.checked_add(len).is_some_and(|end| end <= d),
            "narrow: range {start}..{} out of bounds for dim {dim} of shape {}",
            start.saturating_add(len),
            self.shape
        );
        let mut dims = self.shape.0.clone();
        dims[dim] = len;
        Layout {
            shape: Shape(dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        }
    }

    /// A new size-1 dim inserted at `dim` (0..=rank).
    pub fn unsqueeze(&self, dim: usize) -> Layout {
        let mut dims = self.shape.0.clone();
        let mut strides = self.strides.clone();
        let s = if dim < dims.len() {
            dims[dim] * strides[dim]
        } else {
            1
        };
        dims.insert(dim, 1);
        strides.insert(dim, s);
        Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        }
    }

    /// The size-1 dim `dim` removed.
    pub fn squeeze(&self, dim: usize) -> Layout {
        assert!(
            self.shape.dims()[dim] == 1,
            "squeeze: dim {dim} of shape {} has size {}, not 1",
            self.shape,
            self.shape.dims()[dim]
        );
        let mut dims = self.shape.0.clone();
        let mut strides = self.strides.clone();
        dims.remove(dim);
        strides.remove(dim);
        Layout {
            shape: Shape(dims),
            strides,
            offset: self.offset,
        }
    }

    /// The same elements viewed with shape `shape` without copying, when the strides allow it
    /// (always for contiguous views); `None` when a copy is needed.
    pub fn reshape(&self, shape: &Shape) -> Option<Layout> {
        if shape.elem_count() != self.elem_count() {
            return None;
        }
        if self.is_contiguous() {
            return Some(Layout {
                shape: shape.clone(),
                strides: shape.contiguous_strides(),
                offset: self.offset,
            });
        }
        // Split/merge groups of dims that are contiguous among themselves (as PyTorch's view).
        let (old_dims, old_strides) = self.merged();
        let new_dims = shape.dims();
        let mut strides: DimVec = smallvec![0; new_dims.len()];
        let mut oi = 0;
        let mut ni = 0;
        while ni < new_dims.len() {
            if new_dims[ni] == 1 {
                strides[ni] = 1;
                ni += 1;
                continue;
            }
            if oi >= old_dims.len() {
                return None;
            }
            // Take new dims whose product equals the current merged old dim.
            let (od, os) = (old_dims[oi], old_strides[oi]);
            let mut prod = 1;
            let start = ni;
            while ni < new_dims.len() && prod < od {
                prod *= new_dims[ni];
                ni += 1;
            }
            if prod != od {
                return None;
            }
            let mut acc = os;
            for j in (start..ni).rev() {
                strides[j] = acc;
                acc *= new_dims[j];
            }
            oi += 1;
        }
        (oi == old_dims.len()).then(|| Layout {
            shape: shape.clone(),
            strides,
            offset: self.offset,
        })
    }
}

/// Iterator over the storage offsets of a strided view, row-major.
pub struct StridedOffsets {
    dims: DimVec,
    strides: DimVec,
    index: DimVec,
    next: usize,
    remaining: usize,
}

impl StridedOffsets {
    fn new(dims: DimVec, strides: DimVec, offset: usize, count: usize) -> Self {
        let index = DimVec::from_elem(0, dims.len());
        StridedOffsets {
            dims,
            strides,
            index,
            next: offset,
            remaining: count,
        }
    }
}

impl Iterator for StridedOffsets {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let current = self.next;
        for d in (0..self.dims.len()).rev() {
            self.index[d] += 1;
            self.next += self.strides[d];
            if self.index[d] < self.dims[d] {
                break;
            }
            self.next -= self.strides[d] * self.dims[d];
            self.index[d] = 0;
        }
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedOffsets {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_offsets_walk_columns() {
        let l = Layout::contiguous([2, 3]).permute(&[1, 0]);
        assert!(!l.is_contiguous());
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn narrow_then_runs() {
        let l = Layout::contiguous([3, 4]).narrow(1, 1, 2);
        let mut runs = vec![];
        l.for_each_run(|s, n, st| runs.push((s, n, st)));
        assert_eq!(runs, vec![(1, 2, 1), (5, 2, 1), (9, 2, 1)]);
    }

    #[test]
    fn reshape_of_a_permuted_view_needs_a_copy_only_when_dims_mix() {
        let l = Layout::contiguous([2, 3, 4]).permute(&[1, 0, 2]); // [3, 2, 4]
        assert!(l.reshape(&Shape::from([3, 8])).is_none());
        let r = l.reshape(&Shape::from([3, 2, 2, 2])).unwrap();
        assert_eq!(
            r.offsets().collect::<Vec<_>>(),
            l.offsets().collect::<Vec<_>>()
        );
    }

    #[test]
    fn broadcast_gives_zero_strides() {
        let l = Layout::contiguous([3]).broadcast_as(&Shape::from([2, 3]), "add");
        assert_eq!(l.strides(), &[0, 1]);
        assert_eq!(l.offsets().collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2]);
    }
}
