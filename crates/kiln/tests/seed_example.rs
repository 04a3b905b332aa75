//! The seed example runs in the test suite: autograd's first-step gradients equal the closed
//! form, and SGD recovers w and b to within 1e-3.

#[allow(dead_code)]
#[path = "../../../examples/linear_regression.rs"]
mod linear_regression;

#[test]
fn linear_regression_matches_closed_form_and_recovers_parameters() {
    let r = linear_regression::run(500, 0.1, false);
    assert!(
        (r.autograd_grads.0 - r.closed_form_grads.0).abs() < 1e-5,
        "dL/dw {:?}",
        (r.autograd_grads, r.closed_form_grads)
    );
    assert!(
        (r.autograd_grads.1 - r.closed_form_grads.1).abs() < 1e-5,
        "dL/db {:?}",
        (r.autograd_grads, r.closed_form_grads)
    );
    assert!(
        (r.learned.0 - r.truth.0).abs() < 1e-3,
        "w = {}",
        r.learned.0
    );
    assert!(
        (r.learned.1 - r.truth.1).abs() < 1e-3,
        "b = {}",
        r.learned.1
    );
    assert!(r.final_loss < 1e-6, "final loss {}", r.final_loss);
}
