use super::*;
use kiln_core::gradcheck::{gradcheck, randn_f64};
use kiln_core::DType;

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

fn ids(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape)
}

/// Uniform f64 values in `[lo, hi)`.
fn uniform_f64(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::uniform(shape, lo, hi, seed).to_dtype(DType::F64)
}

/// Random class indices in `0..c` with every `ignore_every`-th one set to -100.
fn random_targets(shape: &[usize], c: usize, ignore_every: usize, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = kiln_core::Rng::new(seed);
    let v: Vec<i64> = (0..n)
        .map(|i| {
            if ignore_every > 0 && i % ignore_every == 1 {
                -100
            } else {
                rng.below(c as u64) as i64
            }
        })
        .collect();
    ids(&v, shape)
}

/// `target` with its -100 entries replaced by `ignore_index`.
fn with_ignore_index(target: &Tensor, ignore_index: i64) -> Tensor {
    let v: Vec<i64> = target
        .to_vec::<i64>()
        .into_iter()
        .map(|t| if t == -100 { ignore_index } else { t })
        .collect();
    ids(&v, target.dims())
}

/// Cross-entropy on class indices composed from differentiable ops (log_softmax, gather,
/// masks): the reference for the fused kernel.
fn composed_cross_entropy(
    x: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    eps: f64,
) -> Tensor {
    let c = x.dims()[1];
    let dt = x.dtype();
    let keep = target.ne_scalar(-100.0).to_dtype(dt);
    let safe = target
        .to_f64_vec()
        .iter()
        .map(|&v| v.max(0.0) as i64)
        .collect::<Vec<_>>();
    let safe = Tensor::from_vec(safe, target.dims());
    let w = weight
        .cloned()
        .unwrap_or_else(|| Tensor::ones([c]))
        .to_dtype(dt);
    let logp = x.log_softmax(1);
    let picked = logp.gather(1, &safe.unsqueeze(1)).squeeze(1).neg();
    let wy = w
        .index_select(0, &safe.flatten(0, -1))
        .reshape(target.dims());
    let wy = wy.mul(&keep);
    let mut per = picked.mul(&wy).mul_scalar(1.0 - eps);
    if eps > 0.0 {
        let mut wshape = vec![1; x.rank()];
        wshape[1] = c;
        let smooth = logp.mul(&w.reshape(wshape)).sum(1, false).neg().mul(&keep);
        per = per.add(&smooth.mul_scalar(eps / c as f64));
    }
    match reduction {
        Reduction::None => per,
        Reduction::Sum => per.sum_all(),
        Reduction::Mean => per.sum_all().div(&wy.sum_all()),
    }
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (g, w)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}, element {i}: {g} vs {w}"
        );
    }
}

// ---------------------------------------------------------------------- gradchecks

#[test]
fn gradcheck_cross_entropy_fused_kernel() {
    let w5 = uniform_f64(&[5], 0.3, 2.0, 1);
    let w3 = uniform_f64(&[3], 0.3, 2.0, 2);
    let rows = random_targets(&[6], 5, 4, 3);
    let spatial = random_targets(&[2, 2, 3], 3, 5, 4);
    let cases: Vec<(Vec<usize>, Tensor, Option<Tensor>)> = vec![
        (vec![6, 5], rows.clone(), None),
        (vec![6, 5], rows, Some(w5.clone())),
        (vec![2, 3, 2, 3], spatial.clone(), None),
        (vec![2, 3, 2, 3], spatial, Some(w3)),
        (vec![5], ids(&[2], &[]), Some(w5)),
    ];
    for (k, (shape, target, weight)) in cases.into_iter().enumerate() {
        for reduction in REDUCTIONS {
            for (ignore_index, eps) in [(-100, 0.0), (-100, 0.2), (1, 0.0), (1, 0.1)] {
                let x = randn_f64(&shape, 10 + k as u64)
                    .mul_scalar(2.0)
                    .requires_grad();
                let target = with_ignore_index(&target, ignore_index);
                let f = |x: &[Tensor]| {
                    let out = cross_entropy(
                        &x[0],
                        &target,
                        weight.as_ref(),
                        ignore_index,
                        reduction,
                        eps,
                    );
                    if x[0].tracks_grad() {
                        // The fused kernel's own backward, not a composition.
                        assert_eq!(out.grad_fn_name(), Some("cross_entropy"));
                    }
                    out
                };
                gradcheck(f, &[x]).unwrap_or_else(|e| {
                    panic!("case {k} {reduction:?} ignore {ignore_index} eps {eps}: {e}")
                });
            }
        }
    }
}

#[test]
fn gradcheck_cross_entropy_probability_targets() {
    let w4 = uniform_f64(&[4], 0.3, 2.0, 5);
    for shape in [vec![3, 4], vec![2, 4, 3], vec![4]] {
        for reduction in REDUCTIONS {
            for (weight, eps) in [(None, 0.0), (Some(&w4), 0.15)] {
                let x = randn_f64(&shape, 6).requires_grad();
                let t = randn_f64(&shape, 7)
                    .softmax(if shape.len() == 1 { 0 } else { 1 })
                    .requires_grad();
                gradcheck(
                    |v| cross_entropy(&v[0], &v[1], weight, -100, reduction, eps),
                    &[x, t],
                )
                .unwrap_or_else(|e| panic!("{shape:?} {reduction:?} eps {eps}: {e}"));
            }
        }
    }
}

#[test]
fn gradcheck_nll_loss() {
    let w4 = uniform_f64(&[4], 0.3, 2.0, 8);
    for (shape, target) in [
        (vec![5, 4], random_targets(&[5], 4, 3, 9)),
        (vec![2, 4, 3], random_targets(&[2, 3], 4, 4, 10)),
        (vec![4], ids(&[3], &[])),
    ] {
        for reduction in REDUCTIONS {
            for (weight, ignore_index) in [(None, -100), (Some(&w4), -100), (Some(&w4), 0)] {
                let x = randn_f64(&shape, 11).requires_grad();
                let target = with_ignore_index(&target, ignore_index);
                gradcheck(
                    |v| nll_loss(&v[0], &target, weight, ignore_index, reduction),
                    &[x],
                )
                .unwrap_or_else(|e| panic!("{shape:?} {reduction:?}: {e}"));
            }
        }
    }
}

/// Gradchecks an elementwise loss in the input and the target for every reduction.
fn gradcheck_pointwise(
    name: &str,
    x: &Tensor,
    t: &Tensor,
    f: impl Fn(&Tensor, &Tensor, Reduction) -> Tensor,
) {
    for reduction in REDUCTIONS {
        let (x, t) = (x.detach().requires_grad(), t.detach().requires_grad());
        gradcheck(|v| f(&v[0], &v[1], reduction), &[x, t])
            .unwrap_or_else(|e| panic!("{name} {reduction:?}: {e}"));
    }
}

#[test]
fn gradcheck_regression_losses() {
    let x = randn_f64(&[3, 5], 12).mul_scalar(2.0);
    let t = randn_f64(&[3, 5], 13);
    gradcheck_pointwise("mse", &x, &t, mse_loss);
    gradcheck_pointwise("l1", &x, &t, l1_loss);
    for delta in [0.5, 1.0, 3.0] {
        gradcheck_pointwise("huber", &x, &t, |a, b, r| huber_loss(a, b, delta, r));
    }
    for beta in [0.0, 0.5, 1.0] {
        gradcheck_pointwise("smooth_l1", &x, &t, |a, b, r| smooth_l1_loss(a, b, beta, r));
    }
    // Non-contiguous operands.
    let xt = randn_f64(&[5, 3], 14).t();
    gradcheck_pointwise("mse transposed", &xt, &t, |a, b, r| {
        mse_loss(&a.t().t(), b, r)
    });
}

#[test]
fn gradcheck_binary_cross_entropy() {
    let x = uniform_f64(&[3, 4], 0.05, 0.95, 15);
    let t = uniform_f64(&[3, 4], 0.0, 1.0, 16);
    let w = uniform_f64(&[4], 0.5, 2.0, 17);
    gradcheck_pointwise("bce", &x, &t, |a, b, r| binary_cross_entropy(a, b, None, r));
    gradcheck_pointwise("bce weight", &x, &t, |a, b, r| {
        binary_cross_entropy(a, b, Some(&w), r)
    });
}

#[test]
fn gradcheck_binary_cross_entropy_with_logits() {
    let x = randn_f64(&[2, 3, 4], 18).mul_scalar(3.0);
    let t = uniform_f64(&[2, 3, 4], 0.0, 1.0, 19);
    let w = uniform_f64(&[3, 1], 0.5, 2.0, 20);
    let pw = uniform_f64(&[4], 0.2, 3.0, 21);
    gradcheck_pointwise("bce_logits", &x, &t, |a, b, r| {
        binary_cross_entropy_with_logits(a, b, None, None, r)
    });
    gradcheck_pointwise("bce_logits weights", &x, &t, |a, b, r| {
        binary_cross_entropy_with_logits(a, b, Some(&w), Some(&pw), r)
    });
    gradcheck_pointwise("bce_logits pos_weight", &x, &t, |a, b, r| {
        binary_cross_entropy_with_logits(a, b, None, Some(&pw), r)
    });
}

#[test]
fn gradcheck_kl_div() {
    let x = randn_f64(&[3, 5], 22).log_softmax(1);
    let t = randn_f64(&[3, 5], 23).softmax(1);
    for log_target in [false, true] {
        let t = if log_target { t.log() } else { t.clone() };
        for reduction in [
            KlReduction::Mean,
            KlReduction::Sum,
            KlReduction::None,
            KlReduction::BatchMean,
        ] {
            let (x, t) = (x.detach().requires_grad(), t.detach().requires_grad());
            gradcheck(|v| kl_div(&v[0], &v[1], reduction, log_target), &[x, t])
                .unwrap_or_else(|e| panic!("kl_div {reduction:?} log_target {log_target}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------- semantics

#[test]
fn fused_cross_entropy_matches_composed_ops_on_large_inputs() {
    // Large enough for the threaded paths, rows past the 256-element tiles, strided classes.
    let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![70, 1100], vec![70]),
        (vec![3, 7, 60, 70], vec![3, 60, 70]),
        (vec![2, 300, 5, 30], vec![2, 5, 30]),
    ];
    for (k, (shape, tshape)) in cases.into_iter().enumerate() {
        let c = shape[1];
        let target = random_targets(&tshape, c, 7, 30 + k as u64);
        let weight = Tensor::uniform([c], 0.5, 2.0, 40);
        for dtype in [DType::F32, DType::F64] {
            for (reduction, eps, w) in [
                (Reduction::Mean, 0.0, None),
                (Reduction::Mean, 0.1, Some(&weight)),
                (Reduction::None, 0.05, Some(&weight)),
                (Reduction::Sum, 0.0, None),
            ] {
                let x = Tensor::randn(shape.as_slice(), 50 + k as u64)
                    .mul_scalar(3.0)
                    .to_dtype(dtype);
                let (xa, xb) = (x.detach().requires_grad(), x.detach().requires_grad());
                let got = cross_entropy(&xa, &target, w, -100, reduction, eps);
                let want = composed_cross_entropy(&xb, &target, w, reduction, eps);
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-11 };
                let what = format!("{shape:?} {dtype} {reduction:?} eps {eps}");
                assert_close(&got, &want, tol, &format!("{what}: value"));
                let g = Tensor::randn(got.dims(), 60).to_dtype(dtype);
                got.backward_with_grad(&g);
                want.backward_with_grad(&g);
                assert_close(
                    &xa.grad().unwrap(),
                    &xb.grad().unwrap(),
                    tol,
                    &format!("{what}: grad"),
                );
            }
        }
    }
}

#[test]
fn non_contiguous_logits_and_targets() {
    let x = randn_f64(&[5, 4], 70).t(); // [4, 5] view
    let t = ids(&[1, 0, 4, 2, 3, 3, 0, 1], &[4, 2])
        .narrow(1, 0, 1)
        .squeeze(1);
    let got = cross_entropy(&x, &t, None, -100, Reduction::None, 0.0);
    let want = composed_cross_entropy(&x.contiguous(), &t.contiguous(), None, Reduction::None, 0.0);
    assert_close(&got, &want, 1e-12, "transposed logits");
    let x = x.detach().requires_grad();
    gradcheck(
        |v| cross_entropy(&v[0].t(), &t, None, -100, Reduction::Mean, 0.1),
        &[randn_f64(&[5, 4], 71).requires_grad()],
    )
    .unwrap();
    drop(x);
}

#[test]
fn ignored_targets_and_all_ignored_mean() {
    let x = randn_f64(&[3, 4], 72).requires_grad();
    let t = ids(&[2, -100, 1], &[3]);
    let per = cross_entropy(&x, &t, None, -100, Reduction::None, 0.0);
    assert_eq!(per.to_f64_vec()[1], 0.0);
    let mean = cross_entropy(&x, &t, None, -100, Reduction::Mean, 0.0);
    let v = per.to_f64_vec();
    assert!((mean.item() - (v[0] + v[2]) / 2.0).abs() < 1e-12);
    mean.backward();
    let g = x.grad().unwrap().to_f64_vec();
    assert!(
        g[4..8].iter().all(|&v| v == 0.0),
        "ignored row gets no gradient"
    );
    // Every target ignored: the mean is 0/0 = NaN, as in torch; the sum is 0.
    let all = ids(&[-100, -100, -100], &[3]);
    assert!(cross_entropy(&x, &all, None, -100, Reduction::Mean, 0.0)
        .item()
        .is_nan());
    assert_eq!(nll_loss(&x, &all, None, -100, Reduction::Sum).item(), 0.0);
}

#[test]
fn cross_entropy_is_log_softmax_then_nll() {
    let x = randn_f64(&[2, 5, 3], 73);
    let t = random_targets(&[2, 3], 5, 4, 74);
    let w = uniform_f64(&[5], 0.5, 2.0, 75);
    for reduction in REDUCTIONS {
        let a = cross_entropy(&x, &t, Some(&w), -100, reduction, 0.0);
        let b = nll_loss(&x.log_softmax(1), &t, Some(&w), -100, reduction);
        assert_close(&a, &b, 1e-12, &format!("{reduction:?}"));
    }
    // Label smoothing 1 with probability targets equals the uniform target.
    let p = randn_f64(&[2, 5, 3], 76).softmax(1);
    let u = Tensor::full([2, 5, 3], 0.2f64);
    assert_close(
        &cross_entropy(&x, &p, None, -100, Reduction::Mean, 1.0),
        &cross_entropy(&x, &u, None, -100, Reduction::Mean, 0.0),
        1e-12,
        "smoothing 1",
    );
}

#[test]
fn kl_div_batchmean_divides_the_sum_by_the_batch() {
    let x = randn_f64(&[4, 3], 77).log_softmax(1);
    let t = randn_f64(&[4, 3], 78).softmax(1);
    let sum = kl_div(&x, &t, KlReduction::Sum, false).item();
    let bm = kl_div(&x, &t, KlReduction::BatchMean, false).item();
    let mean = kl_div(&x, &t, KlReduction::Mean, false).item();
    assert!((bm - sum / 4.0).abs() < 1e-12 && (mean - sum / 12.0).abs() < 1e-12);
    // Same divergence with log-probability targets.
    let lt = kl_div(&x, &t.log(), KlReduction::Sum, true).item();
    assert!((lt - sum).abs() < 1e-12);
    // Zero target probabilities contribute 0 and a zero target gradient.
    let t0 = Tensor::from_slice(&[0.0f64, 0.5, 0.5], [1, 3]).requires_grad();
    let x0 = Tensor::from_slice(&[-1.0f64, -1.0, -1.5], [1, 3]);
    let v = kl_div(&x0, &t0, KlReduction::Sum, false);
    assert!((v.item() - (0.5 * (0.5f64.ln() + 1.0) + 0.5 * (0.5f64.ln() + 1.5))).abs() < 1e-12);
    v.backward();
    assert_eq!(t0.grad().unwrap().to_f64_vec()[0], 0.0);
}

#[test]
fn bce_clamps_logs_and_with_logits_is_stable() {
    let x = Tensor::from_slice(&[0.0f32, 1.0, 0.5], [3]);
    let t = Tensor::from_slice(&[1.0f32, 0.0, 1.0], [3]);
    let v = binary_cross_entropy(&x, &t, None, Reduction::None).to_vec::<f32>();
    assert_eq!(v[..2], [100.0, 100.0]);
    assert!((v[2] - std::f32::consts::LN_2).abs() < 1e-7);
    let z = Tensor::from_slice(&[200.0f32, -200.0], [2]);
    let y = Tensor::from_slice(&[0.0f32, 1.0], [2]);
    let v = binary_cross_entropy_with_logits(&z, &y, None, None, Reduction::None);
    assert_eq!(v.to_vec::<f32>(), vec![200.0, 200.0]);
    // With logits, the loss equals BCE on the sigmoid where both are well-conditioned.
    let z = randn_f64(&[3, 4], 79);
    let y = uniform_f64(&[3, 4], 0.0, 1.0, 80);
    assert_close(
        &binary_cross_entropy_with_logits(&z, &y, None, None, Reduction::Mean),
        &binary_cross_entropy(&z.sigmoid(), &y, None, Reduction::Mean),
        1e-12,
        "bce vs logits",
    );
}

#[test]
fn config_structs_match_functions_and_work_as_trait_objects() {
    let x = randn_f64(&[4, 3], 81);
    let t = ids(&[0, 2, -100, 1], &[4]);
    let w = uniform_f64(&[3], 0.5, 2.0, 82);
    let ce = CrossEntropyLoss {
        weight: Some(w.clone()),
        label_smoothing: 0.1,
        ..Default::default()
    };
    assert_eq!(
        ce.forward(&x, &t).item(),
        cross_entropy(&x, &t, Some(&w), -100, Reduction::Mean, 0.1).item()
    );
    assert_eq!(
        NllLoss::new().forward(&x, &t).item(),
        nll_loss(&x, &t, None, -100, Reduction::Mean).item()
    );
    let y = randn_f64(&[4, 3], 83);
    let p = uniform_f64(&[4, 3], 0.1, 0.9, 84);
    let losses: Vec<(Box<dyn Loss>, Tensor, Tensor)> = vec![
        (
            Box::new(MseLoss::default()),
            mse_loss(&x, &y, Reduction::Mean),
            x.clone(),
        ),
        (
            Box::new(L1Loss::new(Reduction::Sum)),
            l1_loss(&x, &y, Reduction::Sum),
            x.clone(),
        ),
        (
            Box::new(HuberLoss::default()),
            huber_loss(&x, &y, 1.0, Reduction::Mean),
            x.clone(),
        ),
        (
            Box::new(SmoothL1Loss::default()),
            smooth_l1_loss(&x, &y, 1.0, Reduction::Mean),
            x.clone(),
        ),
        (
            Box::new(BceWithLogitsLoss::default()),
            binary_cross_entropy_with_logits(&x, &y, None, None, Reduction::Mean),
            x.clone(),
        ),
        (
            Box::new(KlDivLoss {
                reduction: KlReduction::BatchMean,
                log_target: true,
            }),
            kl_div(&x, &y, KlReduction::BatchMean, true),
            x.clone(),
        ),
        (
            Box::new(BceLoss::default()),
            binary_cross_entropy(&p, &p, None, Reduction::Mean),
            p.clone(),
        ),
    ];
    for (i, (loss, want, input)) in losses.iter().enumerate() {
        let target = if i == losses.len() - 1 { &p } else { &y };
        assert_eq!(loss.forward(input, target).item(), want.item(), "loss {i}");
    }
}

#[test]
fn f32_losses_keep_the_dtype() {
    let x = Tensor::randn([4, 3], 85).requires_grad();
    let t = ids(&[0, 2, 1, 1], &[4]);
    let l = cross_entropy(&x, &t, None, -100, Reduction::Mean, 0.0);
    assert_eq!(l.dtype(), DType::F32);
    assert_eq!(l.rank(), 0);
    l.backward();
    assert_eq!(x.grad().unwrap().dtype(), DType::F32);
    let y = Tensor::randn([4, 3], 86);
    let m = mse_loss(&x, &y, Reduction::None);
    assert_eq!((m.dtype(), m.dims()), (DType::F32, &[4usize, 3][..]));
}

// ---------------------------------------------------------------------- bad inputs

#[test]
#[should_panic(
    expected = "cross_entropy: target shape [3] does not match input shape [4, 5] (class-index targets must have shape [4])"
)]
fn cross_entropy_target_shape_mismatch_panics() {
    cross_entropy(
        &Tensor::zeros([4, 5]),
        &ids(&[0, 1, 2], &[3]),
        None,
        -100,
        Reduction::Mean,
        0.0,
    );
}

#[test]
#[should_panic(
    expected = "cross_entropy: target class 5 out of range for 5 classes (ignore_index -100; input shape [2, 5], target shape [2])"
)]
fn cross_entropy_class_out_of_range_panics() {
    cross_entropy(
        &Tensor::zeros([2, 5]),
        &ids(&[0, 5], &[2]),
        None,
        -100,
        Reduction::Mean,
        0.0,
    );
}

#[test]
#[should_panic(
    expected = "nll_loss: target class -1 out of range for 3 classes (ignore_index -100"
)]
fn nll_negative_class_that_is_not_ignore_index_panics() {
    nll_loss(
        &Tensor::zeros([2, 3]),
        &ids(&[-1, 0], &[2]),
        None,
        -100,
        Reduction::Mean,
    );
}

#[test]
#[should_panic(
    expected = "cross_entropy: float targets are class probabilities and must have the input's shape [4, 5] and dtype f32, got shape [4] and dtype f32"
)]
fn cross_entropy_float_class_indices_panic() {
    cross_entropy(
        &Tensor::zeros([4, 5]),
        &Tensor::zeros([4]),
        None,
        -100,
        Reduction::Mean,
        0.0,
    );
}

#[test]
#[should_panic(
    expected = "nll_loss: class-index targets must be i64 or u32, got f32 (input shape [4, 5], target shape [4])"
)]
fn nll_float_targets_panic() {
    nll_loss(
        &Tensor::zeros([4, 5]),
        &Tensor::zeros([4]),
        None,
        -100,
        Reduction::Mean,
    );
}

#[test]
#[should_panic(
    expected = "cross_entropy: weight must be a float tensor of shape [5] (one per class), got f32 of shape [4]"
)]
fn cross_entropy_weight_shape_panics() {
    cross_entropy(
        &Tensor::zeros([2, 5]),
        &ids(&[0, 1], &[2]),
        Some(&Tensor::ones([4])),
        -100,
        Reduction::Mean,
        0.0,
    );
}

#[test]
#[should_panic(expected = "cross_entropy: input must be f32 or f64 logits, got i64")]
fn cross_entropy_integer_logits_panic() {
    cross_entropy(
        &ids(&[0, 1], &[1, 2]),
        &ids(&[0], &[1]),
        None,
        -100,
        Reduction::Mean,
        0.0,
    );
}

#[test]
#[should_panic(expected = "cross_entropy: label_smoothing must be in [0, 1], got 1.5")]
fn cross_entropy_bad_smoothing_panics() {
    cross_entropy(
        &Tensor::zeros([1, 2]),
        &ids(&[0], &[1]),
        None,
        -100,
        Reduction::Mean,
        1.5,
    );
}

#[test]
#[should_panic(expected = "mse_loss: target shape [2, 4] differs from input shape [2, 3]")]
fn mse_shape_mismatch_panics() {
    mse_loss(
        &Tensor::zeros([2, 3]),
        &Tensor::zeros([2, 4]),
        Reduction::Mean,
    );
}

#[test]
#[should_panic(
    expected = "huber_loss: target dtype i64 differs from input dtype f32 (input shape [2], target shape [2])"
)]
fn huber_integer_target_panics() {
    huber_loss(
        &Tensor::zeros([2]),
        &ids(&[0, 1], &[2]),
        1.0,
        Reduction::Mean,
    );
}

#[test]
#[should_panic(
    expected = "binary_cross_entropy: every input must be a probability in [0, 1], got 1.5"
)]
fn bce_input_out_of_range_panics() {
    binary_cross_entropy(
        &Tensor::from_slice(&[0.5f32, 1.5], [2]),
        &Tensor::zeros([2]),
        None,
        Reduction::Mean,
    );
}

#[test]
#[should_panic(
    expected = "binary_cross_entropy_with_logits: pos_weight must be a float tensor that broadcasts to the input shape [2, 3], got f32 of shape [2]"
)]
fn bce_logits_bad_pos_weight_panics() {
    binary_cross_entropy_with_logits(
        &Tensor::zeros([2, 3]),
        &Tensor::zeros([2, 3]),
        None,
        Some(&Tensor::ones([2])),
        Reduction::Mean,
    );
}

#[test]
#[should_panic(expected = "kl_div: target shape [3] differs from input shape [2, 3]")]
fn kl_div_shape_mismatch_panics() {
    kl_div(
        &Tensor::zeros([2, 3]),
        &Tensor::zeros([3]),
        KlReduction::BatchMean,
        false,
    );
}
