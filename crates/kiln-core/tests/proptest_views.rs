//! Property tests of the view rules: random chains of views over random shapes agree with a
//! naive row-major reference computed by index arithmetic, share storage with their source
//! when they should, copy out to the same values with `contiguous()`, and `cat(split(x))`
//! gives `x` back.

use kiln_core::{Shape, Tensor};
use proptest::prelude::*;

/// Row-major data and its shape: the reference model of a tensor.
#[derive(Clone, Debug)]
struct Reference {
    dims: Vec<usize>,
    data: Vec<f64>,
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        idx[d] = i % dims[d];
        i /= dims[d];
    }
    idx
}

fn ravel(idx: &[usize], dims: &[usize]) -> usize {
    idx.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
}

impl Reference {
    fn count(&self) -> usize {
        self.dims.iter().product()
    }

    /// A new reference of `dims` whose element at multi-index `i` is `self[source(i)]`.
    fn remap(&self, dims: Vec<usize>, source: impl Fn(&[usize]) -> Vec<usize>) -> Reference {
        let n: usize = dims.iter().product();
        let data = (0..n)
            .map(|k| self.data[ravel(&source(&unravel(k, &dims)), &self.dims)])
            .collect();
        Reference { dims, data }
    }

    fn with_dims(&self, dims: Vec<usize>) -> Reference {
        Reference {
            dims,
            data: self.data.clone(),
        }
    }
}

/// One step of a view chain, with raw random parameters interpreted against the current shape.
#[derive(Clone, Debug)]
enum Step {
    Permute(u64),
    Transpose(usize, usize),
    Narrow(usize, usize, usize),
    Reshape(u64),
    Unsqueeze(usize),
    Squeeze(usize),
    Broadcast(usize, usize, bool),
    Flatten(usize, usize),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        any::<u64>().prop_map(Step::Permute),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Step::Transpose(a, b)),
        (any::<usize>(), any::<usize>(), any::<usize>())
            .prop_map(|(a, b, c)| Step::Narrow(a, b, c)),
        any::<u64>().prop_map(Step::Reshape),
        any::<usize>().prop_map(Step::Unsqueeze),
        any::<usize>().prop_map(Step::Squeeze),
        (any::<usize>(), 2usize..4, any::<bool>()).prop_map(|(a, b, c)| Step::Broadcast(a, b, c)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Step::Flatten(a, b)),
    ]
}

const MAX_RANK: usize = 6;
const MAX_ELEMS: usize = 2048;

/// Applies `step` to both the tensor and its reference. Returns whether the tensor is still
/// expected to share storage with its source (only a reshape that cannot be a view copies).
fn apply(t: &Tensor, r: &Reference, step: &Step) -> Option<(Tensor, Reference, bool)> {
    let rank = r.dims.len();
    let dims = r.dims.clone();
    Some(match *step {
        Step::Permute(seed) => {
            if rank == 0 {
                return None;
            }
            // A Fisher-Yates shuffle driven by the seed.
            let mut perm: Vec<usize> = (0..rank).collect();
            let mut s = seed;
            for i in (1..rank).rev() {
                let j = (s % (i as u64 + 1)) as usize;
                s /= i as u64 + 1;
                perm.swap(i, j);
            }
            let new_dims: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
            let reference = r.remap(new_dims, |i| {
                let mut src = vec![0; rank];
                for (k, &p) in perm.iter().enumerate() {
                    src[p] = i[k];
                }
                src
            });
            (t.permute(&perm), reference, true)
        }
        Step::Transpose(a, b) => {
            if rank == 0 {
                return None;
            }
            let (a, b) = (a % rank, b % rank);
            let mut new_dims = dims.clone();
            new_dims.swap(a, b);
            let reference = r.remap(new_dims, |i| {
                let mut src = i.to_vec();
                src.swap(a, b);
                src
            });
            // Exercise negative dims too.
            let view = t.transpose(a as i64 - rank as i64, b);
            (view, reference, true)
        }
        Step::Narrow(d, s, l) => {
            if rank == 0 {
                return None;
            }
            let d = d % rank;
            let start = s % dims[d];
            let len = 1 + l % (dims[d] - start);
            let mut new_dims = dims.clone();
            new_dims[d] = len;
            let reference = r.remap(new_dims, |i| {
                let mut src = i.to_vec();
                src[d] += start;
                src
            });
            (t.narrow(d, start, len), reference, true)
        }
        Step::Reshape(seed) => {
            // A random factorisation of the element count into up to MAX_RANK dims.
            let n = r.count();
            let mut rest = n;
            let mut new_dims = Vec::new();
            let mut s = seed;
            while rest > 1 && new_dims.len() + 1 < MAX_RANK {
                let divisors: Vec<usize> = (1..=rest).filter(|&k| rest.is_multiple_of(k)).collect();
                let k = divisors[(s % divisors.len() as u64) as usize];
                s /= divisors.len() as u64;
                if k == rest {
                    break;
                }
                new_dims.push(k);
                rest /= k;
            }
            new_dims.push(rest);
            let shape = Shape::from(new_dims.clone());
            let viewable = t.layout().reshape(&shape).is_some() || t.shape() == &shape;
            (t.reshape(shape), r.with_dims(new_dims), viewable)
        }
        Step::Unsqueeze(d) => {
            if rank >= MAX_RANK {
                return None;
            }
            let d = d % (rank + 1);
            let mut new_dims = dims.clone();
            new_dims.insert(d, 1);
            (t.unsqueeze(d), r.with_dims(new_dims), true)
        }
        Step::Squeeze(d) => {
            let ones: Vec<usize> = (0..rank).filter(|&k| dims[k] == 1).collect();
            if ones.is_empty() || rank == 1 {
                return None;
            }
            let d = ones[d % ones.len()];
            let mut new_dims = dims.clone();
            new_dims.remove(d);
            (
                t.squeeze(d as i32 - rank as i32),
                r.with_dims(new_dims),
                true,
            )
        }
        Step::Broadcast(d, size, prepend) => {
            // Expand a size-1 dim to `size`, or prepend a new dim of `size`.
            if r.count() * size > MAX_ELEMS {
                return None;
            }
            let ones: Vec<usize> = (0..rank).filter(|&k| dims[k] == 1).collect();
            if prepend || ones.is_empty() {
                if rank >= MAX_RANK {
                    return None;
                }
                let mut new_dims = vec![size];
                new_dims.extend_from_slice(&dims);
                let reference = r.remap(new_dims.clone(), |i| i[1..].to_vec());
                (t.broadcast_as(new_dims), reference, true)
            } else {
                let d = ones[d % ones.len()];
                let mut new_dims = dims.clone();
                new_dims[d] = size;
                let reference = r.remap(new_dims.clone(), |i| {
                    let mut src = i.to_vec();
                    src[d] = 0;
                    src
                });
                (t.broadcast_as(new_dims), reference, true)
            }
        }
        Step::Flatten(a, b) => {
            if rank == 0 {
                return None;
            }
            let (a, b) = (a % rank, b % rank);
            let (s, e) = (a.min(b), a.max(b));
            let mut new_dims = dims[..s].to_vec();
            new_dims.push(dims[s..=e].iter().product());
            new_dims.extend_from_slice(&dims[e + 1..]);
            let shape = Shape::from(new_dims.clone());
            let viewable = t.layout().reshape(&shape).is_some() || t.shape() == &shape;
            (t.flatten(s, e), r.with_dims(new_dims), viewable)
        }
    })
}

fn base_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..5, 1..=5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn view_chains_match_the_index_reference(
        dims in base_strategy(),
        steps in prop::collection::vec(step_strategy(), 0..8),
        split_params in (any::<usize>(), any::<usize>()),
    ) {
        let n: usize = dims.iter().product();
        let data: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 3.0).collect();
        let base = Tensor::from_slice(&data, dims.clone());
        let mut t = base.clone();
        let mut r = Reference { dims, data };
        let mut shares = true;
        for step in &steps {
            if let Some((nt, nr, view)) = apply(&t, &r, step) {
                prop_assert_eq!(nt.dims(), &nr.dims[..], "after {:?}", step);
                prop_assert_eq!(nt.to_vec::<f64>(), nr.data.clone(), "after {:?}", step);
                shares &= view;
                prop_assert_eq!(nt.same_storage(&base), shares, "after {:?}", step);
                t = nt;
                r = nr;
            }
        }
        let c = t.contiguous();
        prop_assert!(c.is_contiguous());
        prop_assert_eq!(c.dims(), &r.dims[..]);
        prop_assert_eq!(c.to_vec::<f64>(), r.data.clone());
        prop_assert_eq!(c.same_storage(&t), t.is_contiguous());

        // cat(split(x)) == x along any dim, for any piece size; split pieces are views.
        if !r.dims.is_empty() {
            let dim = split_params.0 % r.dims.len();
            let size = 1 + split_params.1 % (r.dims[dim] + 1);
            let pieces = t.split(size, dim);
            prop_assert!(pieces.iter().all(|p| p.same_storage(&t)));
            prop_assert_eq!(pieces.len(), r.dims[dim].div_ceil(size));
            let back = Tensor::cat(&pieces, dim);
            prop_assert_eq!(back.dims(), &r.dims[..]);
            prop_assert_eq!(back.to_vec::<f64>(), r.data.clone());
            let chunks = t.chunk(1 + split_params.1 % 4, dim);
            prop_assert_eq!(Tensor::cat(&chunks, dim).to_vec::<f64>(), r.data.clone());
        }
    }
}
