//! `DataLoader`: mini-batches `(x, y)` of a [`TensorDataset`], seeded-shuffled per epoch.

use crate::dataset::TensorDataset;
use kiln_core::{Rng, Tensor};

/// Iterates a dataset in mini-batches. Each call to [`DataLoader::iter`] is one epoch; with
/// shuffling on, epoch `e`'s order is fixed by `(seed, e)`, so runs are reproducible.
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: TensorDataset,
    batch_size: usize,
    shuffle_seed: Option<u64>,
    drop_last: bool,
    epoch: u64,
}

impl DataLoader {
    /// Batches of `batch_size` in dataset order, the last one possibly smaller; panics when
    /// `batch_size` is 0.
    pub fn new(dataset: TensorDataset, batch_size: usize) -> Self {
        assert!(
            batch_size > 0,
            "DataLoader::new: batch_size must be positive"
        );
        DataLoader {
            dataset,
            batch_size,
            shuffle_seed: None,
            drop_last: false,
            epoch: 0,
        }
    }

    /// Shuffles every epoch, with the order drawn from `seed` and the epoch number.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle_seed = Some(seed);
        self
    }

    /// Drops the last batch when it is smaller than `batch_size`.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// The dataset.
    pub fn dataset(&self) -> &TensorDataset {
        &self.dataset
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// True when an epoch yields no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next epoch's number (0 before the first [`DataLoader::iter`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The batches of the next epoch (and advances the epoch counter).
    pub fn iter(&mut self) -> Batches {
        let b = self.epoch_batches(self.epoch);
        self.epoch += 1;
        b
    }

    /// The batches of epoch `epoch`, without touching the counter: the same epoch always
    /// gives the same batches.
    pub fn epoch_batches(&self, epoch: u64) -> Batches {
        let order = self.shuffle_seed.map(|seed| {
            let mut perm: Vec<usize> = (0..self.dataset.len()).collect();
            // SplitMix64 inside Rng::new decorrelates neighbouring seeds.
            Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut perm);
            perm
        });
        Batches {
            dataset: self.dataset.clone(),
            order,
            batch_size: self.batch_size,
            next: 0,
            batches: self.len(),
        }
    }
}

impl IntoIterator for &mut DataLoader {
    type Item = (Tensor, Tensor);
    type IntoIter = Batches;

    fn into_iter(self) -> Batches {
        self.iter()
    }
}

/// The batches of one epoch: `(features, labels)` with `batch` rows each.
#[derive(Debug)]
pub struct Batches {
    dataset: TensorDataset,
    order: Option<Vec<usize>>,
    batch_size: usize,
    next: usize,
    batches: usize,
}

impl Iterator for Batches {
    type Item = (Tensor, Tensor);

    fn next(&mut self) -> Option<(Tensor, Tensor)> {
        if self.next >= self.batches {
            return None;
        }
        let start = self.next * self.batch_size;
        let len = self.batch_size.min(self.dataset.len() - start);
        self.next += 1;
        let part = match &self.order {
            // Gather the shuffled rows into fresh contiguous tensors.
            Some(order) => self.dataset.subset(&order[start..start + len]),
            // In order: contiguous views of the dataset, no copy.
            None => self.dataset.slice(start, len),
        };
        Some(part.into_parts())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.batches - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches {}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> TensorDataset {
        let x: Vec<f32> = (0..n * 3).map(|i| i as f32).collect();
        TensorDataset::new(
            Tensor::from_vec(x, [n, 1, 3]),
            Tensor::from_vec((0..n as i64).collect::<Vec<_>>(), [n]),
        )
    }

    fn labels(batches: Batches) -> Vec<Vec<i64>> {
        batches.map(|(_, y)| y.to_vec::<i64>()).collect()
    }

    #[test]
    fn in_order_batches_with_and_without_drop_last() {
        let mut dl = DataLoader::new(toy(7), 3);
        assert_eq!(dl.len(), 3);
        let batches: Vec<_> = dl.iter().collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[0].0.dims(), &[3, 1, 3]);
        assert_eq!(batches[2].0.dims(), &[1, 1, 3]);
        assert_eq!(batches[2].0.to_vec::<f32>(), vec![18., 19., 20.]);
        assert_eq!(
            labels(dl.iter()),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
        let mut dl = DataLoader::new(toy(7), 3).drop_last(true);
        assert_eq!(dl.len(), 2);
        assert_eq!(labels(dl.iter()), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        let it = dl.iter();
        assert_eq!(it.len(), 2);
    }

    #[test]
    fn shuffled_epochs_cover_everything_differ_and_repeat_by_seed() {
        let mut dl = DataLoader::new(toy(10), 4).shuffle(3);
        let e0 = labels(dl.iter());
        let e1 = labels(dl.iter());
        assert_eq!(dl.epoch(), 2);
        assert_eq!(e0.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        for e in [&e0, &e1] {
            let mut all: Vec<i64> = e.concat();
            all.sort();
            assert_eq!(all, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(e0, e1, "epochs should be shuffled differently");
        assert_ne!(e0.concat(), (0..10).collect::<Vec<_>>());
        // The same (seed, epoch) gives the same order; another seed another one.
        assert_eq!(labels(dl.epoch_batches(0)), e0);
        let mut again = DataLoader::new(toy(10), 4).shuffle(3);
        assert_eq!(labels(again.iter()), e0);
        let mut other = DataLoader::new(toy(10), 4).shuffle(4);
        assert_ne!(labels(other.iter()), e0);
        // Rows stay paired with their labels.
        for (x, y) in dl.epoch_batches(5) {
            let (x, y) = (x.to_vec::<f32>(), y.to_vec::<i64>());
            for (row, &l) in x.chunks(3).zip(&y) {
                assert_eq!(row[0], 3.0 * l as f32);
            }
        }
        let mut dl = DataLoader::new(toy(10), 4).shuffle(3).drop_last(true);
        assert!(labels(dl.iter()).iter().all(|b| b.len() == 4));
    }

    #[test]
    #[should_panic(expected = "DataLoader::new: batch_size must be positive")]
    fn zero_batch_size_panics() {
        DataLoader::new(toy(3), 0);
    }
}
