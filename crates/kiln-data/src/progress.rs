//! Progress bars for training loops (feature `progress`, built on indicatif).

pub use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `batches` steps labelled `label` (e.g. `"epoch 3/10"`), with elapsed time, rate
/// and a message slot for the running loss. Draws to stderr, and nothing when stderr is not a
/// terminal.
pub fn batch_bar(batches: u64, label: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(batches);
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos:>4}/{len:4} {elapsed_precise} {per_sec:>10} {msg}",
    )
    .expect("the progress template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.into());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_counts_batches() {
        let bar = batch_bar(5, "epoch 1/2");
        bar.inc(3);
        bar.set_message("loss 0.5");
        assert_eq!((bar.position(), bar.length()), (3, Some(5)));
        assert_eq!(bar.prefix(), "epoch 1/2");
        bar.finish_and_clear();
    }
}
