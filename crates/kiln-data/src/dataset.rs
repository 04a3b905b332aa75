//! `TensorDataset` (features + labels, row `i` is example `i`), seeded splits and `Normalize`.

use kiln_core::alloc::Buffer;
use kiln_core::{Rng, Tensor};

/// Examples stored as two tensors whose first dimension is the example index: features
/// (`[N, ...]`, e.g. `[N, 784]` or `[N, 1, 28, 28]`) and labels (`[N]` or `[N, ...]`).
#[derive(Clone, Debug)]
pub struct TensorDataset {
    features: Tensor,
    labels: Tensor,
}

/// An i64 index tensor `[len]` holding `idx`.
fn index_tensor(idx: &[usize]) -> Tensor {
    let buf = Buffer::from_fn(idx.len(), |i| idx[i] as i64);
    Tensor::from_buffer(buf, [idx.len()])
}

impl TensorDataset {
    /// Pairs `features` and `labels`; panics unless both have rank ≥ 1 and the same first
    /// dimension.
    pub fn new(features: Tensor, labels: Tensor) -> Self {
        assert!(
            features.rank() >= 1 && labels.rank() >= 1 && features.dims()[0] == labels.dims()[0],
            "TensorDataset::new: features {} and labels {} must have the same first dimension",
            features.shape(),
            labels.shape()
        );
        TensorDataset { features, labels }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.features.dims()[0]
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The features tensor `[N, ...]`.
    pub fn features(&self) -> &Tensor {
        &self.features
    }

    /// The labels tensor `[N, ...]`.
    pub fn labels(&self) -> &Tensor {
        &self.labels
    }

    /// Consumes the dataset into `(features, labels)`.
    pub fn into_parts(self) -> (Tensor, Tensor) {
        (self.features, self.labels)
    }

    /// The examples at `indices` (in that order), gathered with `index_select`; panics naming
    /// the index and the length when one is out of range.
    pub fn subset(&self, indices: &[usize]) -> TensorDataset {
        let n = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            panic!("TensorDataset::subset: index {bad} out of range for {n} examples");
        }
        let idx = index_tensor(indices);
        TensorDataset {
            features: self.features.index_select(0, &idx),
            labels: self.labels.index_select(0, &idx),
        }
    }

    /// Examples `start..start + len` as views (no copy); panics when out of range.
    pub fn slice(&self, start: usize, len: usize) -> TensorDataset {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len()),
            "TensorDataset::slice: {start}..{start}+{len} out of range for {} examples",
            self.len()
        );
        TensorDataset {
            features: self.features.narrow(0, start, len),
            labels: self.labels.narrow(0, start, len),
        }
    }

    /// A seeded random split: the first dataset gets `round(train_fraction · N)` examples, the
    /// second the rest; the same seed gives the same split. Panics unless `train_fraction` is
    /// in `[0, 1]`.
    pub fn train_test_split(
        &self,
        train_fraction: f64,
        seed: u64,
    ) -> (TensorDataset, TensorDataset) {
        assert!(
            (0.0..=1.0).contains(&train_fraction),
            "train_test_split: train_fraction must be in [0, 1], got {train_fraction}"
        );
        let n = self.len();
        let n_train = ((n as f64) * train_fraction).round() as usize;
        let mut perm: Vec<usize> = (0..n).collect();
        Rng::new(seed).shuffle(&mut perm);
        (self.subset(&perm[..n_train]), self.subset(&perm[n_train..]))
    }

    /// The features flattened to `[N, rest]` (e.g. `[N, 1, 28, 28]` to `[N, 784]`).
    pub fn flatten(&self) -> TensorDataset {
        let n = self.len();
        let rest = self.features.dims()[1..].iter().product::<usize>();
        TensorDataset {
            features: self.features.contiguous().reshape([n, rest]),
            labels: self.labels.clone(),
        }
    }

    /// The dataset with `norm` applied to its features.
    pub fn normalized(&self, norm: &Normalize) -> TensorDataset {
        TensorDataset {
            features: norm.apply(&self.features),
            labels: self.labels.clone(),
        }
    }
}

/// Feature standardisation `(x − mean) / std`, as torchvision's `Normalize`: one statistic for
/// all elements, or one per channel (dim 1 of `[N, C, ...]`, the column of `[N, C]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// The mean per channel (one value: all elements share it).
    pub mean: Vec<f32>,
    /// The standard deviation per channel.
    pub std: Vec<f32>,
}

impl Normalize {
    /// Given statistics; panics unless `mean` and `std` have the same non-zero length and every
    /// std is positive.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Self {
        assert!(
            !mean.is_empty() && mean.len() == std.len(),
            "Normalize::new: mean has {} values, std has {}",
            mean.len(),
            std.len()
        );
        assert!(
            std.iter().all(|&s| s > 0.0),
            "Normalize::new: every std must be positive, got {std:?}"
        );
        Normalize { mean, std }
    }

    /// The mean and (population) standard deviation of all elements of `x`, e.g. of a training
    /// set. A constant `x` gets std 1.
    pub fn fit_global(x: &Tensor) -> Self {
        let v = x.to_f64_vec();
        let (m, s) = mean_std(v.iter().copied());
        Normalize::new(vec![m as f32], vec![s as f32])
    }

    /// Per-channel mean and standard deviation over every dim but 1 of `x` (`[N, C, ...]`);
    /// constant channels get std 1. Panics for rank < 2.
    pub fn fit_channels(x: &Tensor) -> Self {
        assert!(
            x.rank() >= 2,
            "Normalize::fit_channels: need [N, C, ...], got shape {}",
            x.shape()
        );
        let (c, inner) = (x.dims()[1], x.dims()[2..].iter().product::<usize>());
        let v = x.contiguous().to_f64_vec();
        let (mut mean, mut std) = (Vec::with_capacity(c), Vec::with_capacity(c));
        for ch in 0..c {
            let vals = v
                .chunks_exact(c * inner)
                .flat_map(|row| row[ch * inner..(ch + 1) * inner].iter().copied());
            let (m, s) = mean_std(vals);
            mean.push(m as f32);
            std.push(s as f32);
        }
        Normalize::new(mean, std)
    }

    /// `(x − mean) / std`, broadcasting per channel along dim 1. Panics when the channel count
    /// does not match.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let c = self.mean.len();
        if c == 1 {
            return x
                .sub_scalar(self.mean[0] as f64)
                .div_scalar(self.std[0] as f64);
        }
        assert!(
            x.rank() >= 2 && x.dims()[1] == c,
            "Normalize::apply: statistics for {c} channels, input shape {}",
            x.shape()
        );
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        let dtype = x.dtype();
        let mean = Tensor::from_slice(&self.mean, shape.clone()).to_dtype(dtype);
        let std = Tensor::from_slice(&self.std, shape).to_dtype(dtype);
        x.sub(&mean).div(&std)
    }
}

/// Mean and population standard deviation (1 when it is 0) of `vals`, in f64.
fn mean_std(vals: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0);
    for v in vals.clone() {
        n += 1;
        sum += v;
    }
    let mean = sum / n.max(1) as f64;
    let var = vals.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n.max(1) as f64;
    let std = var.sqrt();
    (mean, if std > 0.0 { std } else { 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> TensorDataset {
        let x: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
        let y: Vec<i64> = (0..n as i64).collect();
        TensorDataset::new(Tensor::from_vec(x, [n, 2]), Tensor::from_vec(y, [n]))
    }

    #[test]
    fn subset_and_slice_pick_rows() {
        let d = toy(5);
        let s = d.subset(&[4, 0, 2]);
        assert_eq!(s.features().to_vec::<f32>(), vec![8., 9., 0., 1., 4., 5.]);
        assert_eq!(s.labels().to_vec::<i64>(), vec![4, 0, 2]);
        let s = d.slice(1, 2);
        assert_eq!(s.features().to_vec::<f32>(), vec![2., 3., 4., 5.]);
        assert_eq!(s.labels().to_vec::<i64>(), vec![1, 2]);
        assert_eq!(d.len(), 5);
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let d = toy(10);
        let (a, b) = d.train_test_split(0.8, 7);
        assert_eq!((a.len(), b.len()), (8, 2));
        let mut all: Vec<i64> = a.labels().to_vec();
        all.extend(b.labels().to_vec::<i64>());
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(all, sorted, "a seeded shuffle should move something");
        // Features stay paired with their labels.
        let (x, y) = (a.features().to_vec::<f32>(), a.labels().to_vec::<i64>());
        for (row, &label) in x.chunks(2).zip(&y) {
            assert_eq!(row, [2.0 * label as f32, 2.0 * label as f32 + 1.0]);
        }
        let (a2, _) = d.train_test_split(0.8, 7);
        assert_eq!(a2.labels().to_vec::<i64>(), y);
        let (a3, _) = d.train_test_split(0.8, 8);
        assert_ne!(a3.labels().to_vec::<i64>(), y);
        let (all_train, none) = d.train_test_split(1.0, 0);
        assert_eq!((all_train.len(), none.len()), (10, 0));
    }

    #[test]
    fn flatten_and_normalize() {
        let x = Tensor::from_vec((0..12).map(|i| i as f32).collect::<Vec<_>>(), [3, 2, 2]);
        let d = TensorDataset::new(x.clone(), Tensor::from_vec(vec![0i64, 1, 2], [3]));
        assert_eq!(d.flatten().features().dims(), &[3, 4]);

        let g = Normalize::fit_global(&x);
        let n = 12.0f64;
        let mean = 66.0 / n;
        let var = (0..12).map(|i| (i as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((g.mean[0] as f64 - mean).abs() < 1e-6);
        assert!((g.std[0] as f64 - var.sqrt()).abs() < 1e-6);
        let z = d.normalized(&g).features().to_vec::<f32>();
        for (i, v) in z.iter().enumerate() {
            let expect = (i as f64 - mean) / var.sqrt();
            assert!((*v as f64 - expect).abs() < 1e-5, "{v} vs {expect}");
        }

        // Channel 0 holds elements {0,1, 4,5, 8,9}, channel 1 {2,3, 6,7, 10,11}.
        let c = Normalize::fit_channels(&x);
        let z = c.apply(&x).to_vec::<f32>();
        for ch in 0..2 {
            let vals: Vec<f64> = (0..12)
                .filter(|i| (i / 2) % 2 == ch)
                .map(|i| i as f64)
                .collect();
            let m = vals.iter().sum::<f64>() / 6.0;
            let s = (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 6.0).sqrt();
            assert!((c.mean[ch] as f64 - m).abs() < 1e-6, "{:?}", c.mean);
            assert!((c.std[ch] as f64 - s).abs() < 1e-6, "{:?}", c.std);
            for i in (0..12).filter(|i| (i / 2) % 2 == ch) {
                assert!((z[i] as f64 - (i as f64 - m) / s).abs() < 1e-5);
            }
        }
        // Constant channels keep std 1.
        let k = Normalize::fit_channels(&Tensor::ones([4, 3]));
        assert_eq!((k.mean, k.std), (vec![1.0; 3], vec![1.0; 3]));
    }

    #[test]
    #[should_panic(
        expected = "TensorDataset::new: features [3, 2] and labels [4] must have the same first dimension"
    )]
    fn mismatched_lengths_panic() {
        TensorDataset::new(Tensor::zeros([3, 2]), Tensor::zeros([4]));
    }

    #[test]
    #[should_panic(expected = "TensorDataset::subset: index 5 out of range for 5 examples")]
    fn subset_out_of_range_panics() {
        toy(5).subset(&[0, 5]);
    }

    #[test]
    #[should_panic(expected = "train_test_split: train_fraction must be in [0, 1], got 1.5")]
    fn bad_fraction_panics() {
        toy(5).train_test_split(1.5, 0);
    }

    #[test]
    #[should_panic(expected = "Normalize::apply: statistics for 2 channels, input shape [3, 5]")]
    fn channel_mismatch_panics() {
        Normalize::new(vec![0.0, 0.0], vec![1.0, 1.0]).apply(&Tensor::zeros([3, 5]));
    }
}
