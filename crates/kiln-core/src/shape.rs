//! Shapes, dimension arguments (negative dims count from the end) and NumPy broadcasting.

use smallvec::SmallVec;
use std::fmt;

/// Inline storage for dims and strides: no heap allocation up to rank 6.
pub type DimVec = SmallVec<[usize; 6]>;

/// The extent of a tensor along each dimension.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub(crate) DimVec);

impl Shape {
    /// The shape of a scalar (rank 0).
    pub fn scalar() -> Self {
        Shape(DimVec::new())
    }

    /// The dims as a slice.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dims.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Row-major (C-contiguous) strides for this shape.
    pub fn contiguous_strides(&self) -> DimVec {
        let mut strides = DimVec::from_elem(0, self.0.len());
        let mut acc = 1;
        for (s, &d) in strides.iter_mut().zip(self.0.iter()).rev() {
            *s = acc;
            acc *= d;
        }
        strides
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(DimVec::from_slice(d))
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(DimVec::from_slice(&d))
    }
}
impl<const N: usize> From<&[usize; N]> for Shape {
    fn from(d: &[usize; N]) -> Self {
        Shape(DimVec::from_slice(d))
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(DimVec::from_vec(d))
    }
}
impl From<&Vec<usize>> for Shape {
    fn from(d: &Vec<usize>) -> Self {
        Shape(DimVec::from_slice(d))
    }
}
impl From<DimVec> for Shape {
    fn from(d: DimVec) -> Self {
        Shape(d)
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(smallvec::smallvec![d])
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape::scalar()
    }
}

/// One dimension argument: a `usize`, or a signed integer where `-1` is the last dim.
pub trait Dim: Copy {
    /// The dim as an index into a shape of rank `rank`; panics naming `op` when out of range.
    fn resolve(self, rank: usize, op: &str) -> usize;
}

impl Dim for usize {
    fn resolve(self, rank: usize, op: &str) -> usize {
        assert!(
            self < rank,
            "{op}: dim {self} out of range for a tensor of rank {rank}"
        );
        self
    }
}

macro_rules! signed_dim {
    ($($t:ty),*) => {$(
        impl Dim for $t {
            fn resolve(self, rank: usize, op: &str) -> usize {
                let r = rank as i64;
                let d = self as i64;
                let idx = if d < 0 { d + r } else { d };
                assert!(
                    (0..r).contains(&idx),
                    "{op}: dim {self} out of range for a tensor of rank {rank}"
                );
                idx as usize
            }
        }
    )*};
}
signed_dim!(i32, i64, isize);

/// A set of dimension arguments (for reductions): one dim, an array or slice of dims, or `()`
/// meaning every dim.
pub trait Dims {
    /// The dims as sorted, de-duplicated indices; `()` yields all dims.
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec;
}

fn sorted_unique(mut v: DimVec, op: &str) -> DimVec {
    v.sort_unstable();
    let n = v.len();
    v.dedup();
    assert!(v.len() == n, "{op}: a dim appears twice in {v:?}");
    v
}

impl Dims for () {
    fn resolve_all(&self, rank: usize, _op: &str) -> DimVec {
        (0..rank).collect()
    }
}
impl<D: Dim> Dims for D {
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec {
        smallvec::smallvec![self.resolve(rank, op)]
    }
}
impl<D: Dim> Dims for [D] {
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec {
        sorted_unique(self.iter().map(|d| d.resolve(rank, op)).collect(), op)
    }
}
impl<D: Dim, const N: usize> Dims for [D; N] {
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec {
        self[..].resolve_all(rank, op)
    }
}
impl<D: Dim> Dims for Vec<D> {
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec {
        self[..].resolve_all(rank, op)
    }
}
impl<D: Dim> Dims for &[D] {
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec {
        (**self).resolve_all(rank, op)
    }
}
impl<D: Dim, const N: usize> Dims for &[D; N] {
    fn resolve_all(&self, rank: usize, op: &str) -> DimVec {
        self[..].resolve_all(rank, op)
    }
}

/// The NumPy broadcast of two shapes; panics naming `op` and both shapes when incompatible.
pub fn broadcast_shape(a: &Shape, b: &Shape, op: &str) -> Shape {
    let (ra, rb) = (a.rank(), b.rank());
    let r = ra.max(rb);
    let mut out = DimVec::from_elem(0, r);
    for i in 0..r {
        let da = if i + ra >= r { a.0[i + ra - r] } else { 1 };
        let db = if i + rb >= r { b.0[i + rb - r] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            panic!("{op}: shapes {a} and {b} cannot be broadcast together");
        };
    }
    Shape(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        let s = |d: &[usize]| Shape::from(d);
        assert_eq!(broadcast_shape(&s(&[2, 3]), &s(&[3]), "add"), s(&[2, 3]));
        assert_eq!(
            broadcast_shape(&s(&[4, 1, 3]), &s(&[5, 1]), "add"),
            s(&[4, 5, 3])
        );
        assert_eq!(broadcast_shape(&s(&[]), &s(&[2]), "add"), s(&[2]));
    }

    #[test]
    #[should_panic(expected = "add: shapes [2, 3] and [4] cannot be broadcast together")]
    fn incompatible_shapes_name_op_and_shapes() {
        broadcast_shape(&Shape::from([2, 3]), &Shape::from([4]), "add");
    }

    #[test]
    fn negative_dims_count_from_the_end() {
        assert_eq!((-1i32).resolve(3, "sum"), 2);
        assert_eq!([-1i32, 0].resolve_all(3, "sum").as_slice(), &[0, 2]);
        assert_eq!(().resolve_all(2, "sum").as_slice(), &[0, 1]);
    }
}
