//! Streaming evaluation metrics: each batch updates running counts (a confusion matrix, sums of
//! errors, a loss and token count), so evaluation never holds all logits in memory.

use crate::error::{Result, TuneError};
use kiln_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A metric the Trainer can report (and select the best model by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of rows whose arg-max class is the label.
    Accuracy,
    /// Unweighted mean over classes of F1.
    MacroF1,
    /// Unweighted mean over classes of precision.
    Precision,
    /// Unweighted mean over classes of recall.
    Recall,
    /// Mean squared error (regression).
    Mse,
    /// Mean absolute error (regression).
    Mae,
    /// `exp(mean token loss)` (language modelling).
    Perplexity,
    /// The mean loss.
    Loss,
    /// Micro-averaged entity F1 over every entity type (token classification with an entity
    /// tag scheme; seqeval's `overall_f1`).
    EntityF1,
    /// Micro-averaged entity precision (seqeval's `overall_precision`).
    EntityPrecision,
    /// Micro-averaged entity recall (seqeval's `overall_recall`).
    EntityRecall,
}

impl Metric {
    /// The metric's name in logs and recipes (`accuracy`, `macro_f1`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::MacroF1 => "macro_f1",
            Metric::Precision => "precision",
            Metric::Recall => "recall",
            Metric::Mse => "mse",
            Metric::Mae => "mae",
            Metric::Perplexity => "perplexity",
            Metric::Loss => "loss",
            Metric::EntityF1 => "entity_f1",
            Metric::EntityPrecision => "entity_precision",
            Metric::EntityRecall => "entity_recall",
        }
    }

    /// True for the entity-level metrics, which only token classification reports.
    pub fn is_entity(self) -> bool {
        matches!(
            self,
            Metric::EntityF1 | Metric::EntityPrecision | Metric::EntityRecall
        )
    }

    /// True when larger values are better.
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::Accuracy
                | Metric::MacroF1
                | Metric::Precision
                | Metric::Recall
                | Metric::EntityF1
                | Metric::EntityPrecision
                | Metric::EntityRecall
        )
    }

    /// Parses a metric name (as written by [`Metric::name`]; `f1` is accepted for `macro_f1`).
    pub fn parse(name: &str) -> Result<Metric> {
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "accuracy" | "acc" => Metric::Accuracy,
            "macro_f1" | "f1" => Metric::MacroF1,
            "precision" => Metric::Precision,
            "recall" => Metric::Recall,
            "mse" => Metric::Mse,
            "mae" => Metric::Mae,
            "perplexity" | "ppl" => Metric::Perplexity,
            "loss" => Metric::Loss,
            "entity_f1" => Metric::EntityF1,
            "entity_precision" => Metric::EntityPrecision,
            "entity_recall" => Metric::EntityRecall,
            other => {
                return Err(TuneError::config(
                    "metric",
                    format!(
                        "unknown metric `{other}` (known: accuracy, macro_f1, precision, recall, \
                         mse, mae, perplexity, loss, entity_f1, entity_precision, entity_recall)"
                    ),
                ))
            }
        })
    }
}

/// Running counts for every metric of one evaluation pass.
#[derive(Clone, Debug)]
pub struct MetricState {
    classes: usize,
    /// `confusion[label * classes + predicted]`.
    confusion: Vec<u64>,
    rows: u64,
    loss_sum: f64,
    loss_count: f64,
    abs_err: f64,
    sq_err: f64,
    /// Entity counts (correct, predicted, true) when the evaluation decodes entities.
    entities: Option<[u64; 3]>,
}

/// Precision, recall and F1 from counts of correct, predicted and true items (seqeval's
/// conventions: 0 when a denominator is 0).
pub(crate) fn precision_recall_f1(correct: u64, predicted: u64, gold: u64) -> (f64, f64, f64) {
    let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (p, r) = (div(correct, predicted), div(correct, gold));
    let f1 = if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    };
    (p, r, f1)
}

impl MetricState {
    /// Empty counts for `classes` classes (0 for regression).
    pub fn new(classes: usize) -> Self {
        MetricState {
            classes,
            confusion: vec![0; classes * classes],
            rows: 0,
            loss_sum: 0.0,
            loss_count: 0.0,
            abs_err: 0.0,
            sq_err: 0.0,
            entities: None,
        }
    }

    /// Sets the entity counts behind `entity_f1` / `entity_precision` / `entity_recall`:
    /// entities predicted exactly right, predicted, and true (all types together).
    pub fn set_entity_counts(&mut self, correct: u64, predicted: u64, gold: u64) {
        self.entities = Some([correct, predicted, gold]);
    }

    /// Adds a batch of class logits `[B, C]` and labels `[B]`.
    pub fn update_classification(&mut self, logits: &Tensor, labels: &Tensor) {
        let c = self.classes;
        assert_eq!(
            logits.dims(),
            &[labels.dims()[0], c],
            "MetricState: logits {} do not match labels {} and {c} classes",
            logits.shape(),
            labels.shape()
        );
        let pred: Vec<i64> = logits.argmax(-1, false).to_vec();
        let gold: Vec<i64> = labels.to_vec();
        for (p, g) in pred.iter().zip(&gold) {
            self.confusion[*g as usize * c + *p as usize] += 1;
        }
        self.rows += gold.len() as u64;
    }

    /// Adds a batch of regression predictions and targets (same number of elements).
    pub fn update_regression(&mut self, predictions: &Tensor, targets: &Tensor) {
        let p: Vec<f64> = predictions.to_dtype(kiln_core::DType::F64).to_vec();
        let t: Vec<f64> = targets.to_dtype(kiln_core::DType::F64).to_vec();
        assert_eq!(
            p.len(),
            t.len(),
            "MetricState: predictions and targets differ in size"
        );
        for (a, b) in p.iter().zip(&t) {
            self.abs_err += (a - b).abs();
            self.sq_err += (a - b) * (a - b);
        }
        self.rows += p.len() as u64;
    }

    /// Adds a summed loss over `count` items (rows or tokens).
    pub fn update_loss(&mut self, loss_sum: f64, count: f64) {
        self.loss_sum += loss_sum;
        self.loss_count += count;
    }

    /// Number of classes (0 for regression).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Rows seen.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The confusion matrix, `[label][predicted]`.
    pub fn confusion(&self) -> Vec<Vec<u64>> {
        self.confusion
            .chunks(self.classes.max(1))
            .map(|r| r.to_vec())
            .collect()
    }

    /// Per-class `(precision, recall, f1, support)`.
    pub fn per_class(&self) -> Vec<(f64, f64, f64, u64)> {
        let c = self.classes;
        (0..c)
            .map(|k| {
                let tp = self.confusion[k * c + k] as f64;
                let predicted: u64 = (0..c).map(|l| self.confusion[l * c + k]).sum();
                let support: u64 = (0..c).map(|p| self.confusion[k * c + p]).sum();
                let precision = if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                };
                let recall = if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                };
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                (precision, recall, f1, support)
            })
            .collect()
    }

    /// The value of `metric` (NaN when nothing it needs was seen).
    pub fn value(&self, metric: Metric) -> f64 {
        let rows = self.rows as f64;
        let macro_avg = |f: fn(&(f64, f64, f64, u64)) -> f64| {
            let pc = self.per_class();
            if pc.is_empty() {
                f64::NAN
            } else {
                pc.iter().map(f).sum::<f64>() / pc.len() as f64
            }
        };
        match metric {
            Metric::Accuracy => {
                let c = self.classes;
                let correct: u64 = (0..c).map(|k| self.confusion[k * c + k]).sum();
                correct as f64 / rows
            }
            Metric::MacroF1 => macro_avg(|x| x.2),
            Metric::Precision => macro_avg(|x| x.0),
            Metric::Recall => macro_avg(|x| x.1),
            Metric::Mse => self.sq_err / rows,
            Metric::Mae => self.abs_err / rows,
            Metric::Loss => self.loss_sum / self.loss_count,
            Metric::Perplexity => (self.loss_sum / self.loss_count).exp(),
            Metric::EntityF1 | Metric::EntityPrecision | Metric::EntityRecall => {
                let Some([c, p, g]) = self.entities else {
                    return f64::NAN;
                };
                let (precision, recall, f1) = precision_recall_f1(c, p, g);
                match metric {
                    Metric::EntityPrecision => precision,
                    Metric::EntityRecall => recall,
                    _ => f1,
                }
            }
        }
    }

    /// Every metric in `metrics` (and the loss) by name.
    pub fn report(&self, metrics: &[Metric]) -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = metrics
            .iter()
            .map(|m| (m.name().to_string(), self.value(*m)))
            .collect();
        if self.loss_count > 0.0 {
            out.insert("loss".into(), self.value(Metric::Loss));
        }
        out
    }

    /// The confusion matrix as an aligned text table with class names.
    pub fn confusion_table(&self, names: &[String]) -> String {
        confusion_table(names, &self.confusion())
    }
}

/// A confusion matrix `[label][predicted]` as an aligned text table with class names.
pub fn confusion_table(names: &[String], matrix: &[Vec<u64>]) -> String {
    let w = names.iter().map(|n| n.len()).max().unwrap_or(4).max(6);
    let mut s = format!("{:>w$}  predicted →\n{:>w$}", "label ↓", "");
    for n in names {
        s.push_str(&format!(" {n:>w$}"));
    }
    for (k, row) in matrix.iter().enumerate() {
        s.push_str(&format!(
            "\n{:>w$}",
            names.get(k).map(String::as_str).unwrap_or("?")
        ));
        for v in row {
            s.push_str(&format!(" {v:>w$}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_metrics_match_hand_counts() {
        // labels 0,0,1,1,2 ; predictions 0,1,1,1,0
        let logits = Tensor::from_vec(
            vec![
                2.0f32, 1.0, 0.0, //
                0.0, 3.0, 1.0, //
                0.0, 1.0, 0.5, //
                -1.0, 2.0, 0.0, //
                5.0, 0.0, 4.0,
            ],
            [5, 3],
        );
        let labels = Tensor::from_vec(vec![0i64, 0, 1, 1, 2], [5]);
        let mut m = MetricState::new(3);
        // Two batches: streaming gives the same counts as one.
        m.update_classification(&logits.narrow(0, 0, 2), &labels.narrow(0, 0, 2));
        m.update_classification(&logits.narrow(0, 2, 3), &labels.narrow(0, 2, 3));
        assert_eq!(
            m.confusion(),
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 0]]
        );
        assert!((m.value(Metric::Accuracy) - 0.6).abs() < 1e-12);
        // class 0: p=1/2 r=1/2 f1=1/2; class 1: p=2/3 r=1 f1=0.8; class 2: 0.
        assert!((m.value(Metric::Precision) - (0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((m.value(Metric::Recall) - 0.5).abs() < 1e-12);
        assert!((m.value(Metric::MacroF1) - 1.3 / 3.0).abs() < 1e-12);
        let table = m.confusion_table(&["a".into(), "b".into(), "c".into()]);
        assert!(table.contains("predicted"), "{table}");
    }

    #[test]
    fn regression_and_loss_metrics() {
        let mut m = MetricState::new(0);
        m.update_regression(
            &Tensor::from_vec(vec![1.0f32, 2.0], [2]),
            &Tensor::from_vec(vec![0.0f32, 4.0], [2]),
        );
        assert_eq!(m.value(Metric::Mae), 1.5);
        assert_eq!(m.value(Metric::Mse), 2.5);
        m.update_loss(6.0, 3.0);
        assert_eq!(m.value(Metric::Loss), 2.0);
        assert!((m.value(Metric::Perplexity) - 2f64.exp()).abs() < 1e-12);
        assert_eq!(Metric::parse("F1").unwrap(), Metric::MacroF1);
        assert!(Metric::parse("bleu").is_err());
    }

    #[test]
    fn entity_metrics_come_from_the_entity_counts() {
        let mut m = MetricState::new(4);
        assert!(m.value(Metric::EntityF1).is_nan(), "no counts yet");
        // 3 of 4 predicted entities are right; there are 6 true ones.
        m.set_entity_counts(3, 4, 6);
        assert_eq!(m.value(Metric::EntityPrecision), 0.75);
        assert_eq!(m.value(Metric::EntityRecall), 0.5);
        assert!((m.value(Metric::EntityF1) - 0.6).abs() < 1e-12);
        m.set_entity_counts(0, 0, 2);
        assert_eq!(m.value(Metric::EntityF1), 0.0);
        for metric in [
            Metric::EntityF1,
            Metric::EntityPrecision,
            Metric::EntityRecall,
        ] {
            assert_eq!(Metric::parse(metric.name()).unwrap(), metric);
            assert!(metric.is_entity() && metric.higher_is_better());
        }
    }
}
