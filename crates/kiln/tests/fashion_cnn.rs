//! The Fashion-MNIST CNN runs in the test suite on a reduced budget (one epoch over the first
//! 6,000 training images, evaluated on the first 2,000 official test images): the loss falls
//! within the epoch's report and the test accuracy clears 80%.

#[allow(dead_code)]
#[path = "../../../examples/fashion_cnn.rs"]
mod fashion_cnn;

#[test]
fn fashion_cnn_learns_on_a_reduced_budget() {
    let cfg = fashion_cnn::Config {
        epochs: 2,
        train_limit: Some(6_000),
        test_limit: Some(2_000),
        progress: false,
        verbose: false,
        ..Default::default()
    };
    let r = fashion_cnn::run(&cfg).expect("Fashion-MNIST loads (fetched by scripts/fetch_data.sh)");
    eprintln!(
        "fashion_cnn (reduced): train loss {:?}, test accuracy {:?}, {:.1} s",
        r.train_loss, r.test_accuracy, r.seconds
    );
    assert_eq!(r.sizes, (6_000, 2_000));
    assert!(
        r.train_loss[1] < r.train_loss[0],
        "train loss {:?}",
        r.train_loss
    );
    let acc = *r.test_accuracy.last().unwrap();
    assert!(acc >= 0.80, "test accuracy {acc} on the reduced budget");
}

#[test]
fn the_cnn_maps_images_to_ten_logits_and_has_the_expected_parameters() {
    use kiln::prelude::*;
    let cfg = fashion_cnn::Config::default();
    let net = fashion_cnn::model(&cfg);
    // conv1 + bn1 + conv2 + bn2 + fc1 + fc2 (weights and biases; BN buffers are not parameters).
    let expected = (32 * 9 + 32)
        + 2 * 32
        + (64 * 32 * 9 + 64)
        + 2 * 64
        + (64 * 49 * 128 + 128)
        + (128 * 10 + 10);
    assert_eq!(net.num_parameters(), expected);
    net.eval();
    assert_eq!(net.forward(&Tensor::zeros([3, 1, 28, 28])).dims(), &[3, 10]);
}
