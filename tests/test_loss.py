"""lifeiqa_fast.QualityLoss: its gradient with respect to the images is the true one (central finite
differences in fp64) and the same with every impl; minimising it raises the score (or lowers it, for a
lower-better label); its preprocessing is the Scorer's; bad arguments fail loudly, naming themselves.
Tiny Swin with random weights, real photographs (skimage.data)."""
import math

import pytest
import torch

import lifeiqa_fast
from lifeiqa_fast import QualityLoss, Scorer

from test_model import tiny

from skimage import data, filters  # real photographs

KONIQ = {"DATA": {"DATASET": "koniq"}}  # MOS 1..100, higher is better

# Directional derivatives against central differences, fp64. eps = 1e-6: the truncation error
# (eps^2 f''') is far below the rounding error (~1e-16 / eps = 1e-10 on a loss of order 1), and a step
# this short does not cross the model's kinks (ReLU, top-k routing) along these directions, which
# eps = 1e-4 and 1e-5 did (errors of 1e-3 .. 1.5e-2 on one direction). The derivatives are 1e-4 .. 1e-2.
FD = dict(eps=1e-6, rtol=1e-6, atol=1e-9)


def koniq_model(dtype=torch.float32):
    model = tiny(num_experts=4, depth=2).to(dtype)
    model.checkpoint_config = KONIQ
    return model


@pytest.fixture(scope="module")
def model():
    return koniq_model()


def photo(name: str, top: int, left: int, h: int = 224, w: int = 224) -> torch.Tensor:
    """An skimage.data RGB photograph's h x w window as a (1, 3, h, w) float tensor in [0, 1]."""
    x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[:, top:top + h, left:left + w]
    return (x.float() / 255)[None].contiguous()


def images(batch=2, h=224, w=240, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def input_grad(loss: QualityLoss, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss(x).sum().backward()  # (the sum of a reduction="none" loss)
    return x.grad


def test_gradient_is_finite_and_nonzero(model):
    g = input_grad(QualityLoss(model, resize=None), images())  # two images of 224 x 240: two crops each
    assert g.shape == (2, 3, 224, 240) and torch.isfinite(g).all()
    assert (g.flatten(1).abs().sum(1) > 0).all()  # each image gets a gradient
    # the columns 0..15 lie in the first crop only, 224..239 in the second only: both crops are scored
    assert g[..., :16].abs().sum() > 0 and g[..., 224:].abs().sum() > 0


@pytest.mark.parametrize("size", [
    (224, 240),  # two crops, no resize
    (200, 230),  # enlarged to 224 x 258 first (the resize is differentiated too), then two crops
])
def test_gradient_matches_finite_differences(size):
    loss = QualityLoss(koniq_model(torch.float64), resize=None)  # the default impl (native on CPU) computes fp64
    x = images(1, *size, seed=1, dtype=torch.float64) * 0.8 + 0.1  # x +- eps v stays in [0, 1]
    g = input_grad(loss, x)
    for seed in (0, 1):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            numeric = (loss(x + FD["eps"] * v) - loss(x - FD["eps"] * v)) / (2 * FD["eps"])
        torch.testing.assert_close((g * v).sum(), numeric, rtol=FD["rtol"], atol=FD["atol"])


def test_default_impl_gradient_matches_reference():
    # fp32 gradients, each against the fp64 reference's. The fused ops sum in other orders than the
    # reference, so they differ from it by fp32 rounding, not by a fixed bound: their error must stay
    # within a small factor of the reference's own fp32 error (measured: 7.8e-11 vs 6.4e-11, on
    # gradients up to 1.0e-4; they differ from each other by 9.5e-11, 1e-6 of the largest). The factor
    # 3 and the 1e-5 relative bound leave room for other CPUs' summation orders.
    x = images(1, seed=2, dtype=torch.float64)
    truth = input_grad(QualityLoss(koniq_model(torch.float64), impl="reference", resize=None), x)
    fused = input_grad(QualityLoss(koniq_model(), resize=None), x.float()).double()
    reference = input_grad(QualityLoss(koniq_model(), impl="reference", resize=None), x.float()).double()
    assert lifeiqa_fast.ops._impl.choose("moe", "cpu")[0] != "reference"  # the comparison compares something
    fused_error, reference_error = (fused - truth).abs().max(), (reference - truth).abs().max()
    assert fused_error <= 3 * reference_error, (fused_error, reference_error)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5 * truth.abs().max().item())


def test_gradient_descent_raises_the_score(model):
    sharp = photo("astronaut", 20, 150)  # the face, 224 x 224: one crop
    blurred = torch.from_numpy(filters.gaussian(sharp[0].permute(1, 2, 0).numpy(), sigma=2, channel_axis=-1))
    noise = 0.05 * torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0))
    degraded = (blurred.permute(2, 0, 1)[None].float() + noise).clamp(0, 1)
    loss = QualityLoss(model, resize=None)  # (the default would resize a KonIQ model's images to 512 x 384)
    x = degraded.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.01)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        value = loss(x)
        value.backward()
        losses.append(value.item())
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    with torch.no_grad():
        before, after = loss.score(degraded), loss.score(x)
        losses.append(loss(x).item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # every step lowers the loss
    assert after > before  # KonIQ: a higher score is better
    assert x.grad is not None and all(p.grad is None for p in loss.parameters())  # the model is frozen


@pytest.mark.parametrize("dataset, lower_better", [("live", True), ("csiq", True), ("koniq", False),
                                                   ("tid2013", False)])
def test_loss_follows_the_labels_direction(model, dataset, lower_better):
    loss = QualityLoss(model, dataset=dataset, reduction="none", resize=None)  # dataset= overrides the model's KonIQ
    assert loss.scale.dataset == dataset and loss.lower_better is lower_better
    x = torch.cat([images(2, 224, 224, seed=3), photo("chelsea", 0, 0), photo("coffee", 100, 200)])
    with torch.no_grad():
        scores, losses = loss.score(x), loss(x)
    low, high = loss.scale.score_range
    # 0 at the best end of the label range, 1 at the worst, linear and not clipped (the random model
    # scores near -0.6, below KonIQ's and LIVE's ranges: losses past 1 and below 0 stay as they are)
    expected = (scores - low) / (high - low) if lower_better else (high - scores) / (high - low)
    torch.testing.assert_close(losses, expected)
    assert len(set(scores.tolist())) == 4  # the images score differently, so the order below means something
    order = scores.argsort()
    assert (losses[order].diff() > 0).all() if lower_better else (losses[order].diff() < 0).all()


def test_unknown_scale_needs_a_direction():
    bare = tiny(num_experts=4, depth=2)  # no checkpoint config: no dataset recorded
    with pytest.raises(ValueError, match=r"records no training dataset.*dataset=.*lower_better="):
        QualityLoss(bare)
    x = images(2, 224, 224)
    lower, higher = (QualityLoss(bare, lower_better=b, reduction="none", resize=None) for b in (True, False))
    assert not lower.scale.known and lower.lower_better and not higher.lower_better
    with torch.no_grad():
        scores = lower.score(x)
        torch.testing.assert_close(lower(x), scores)
        torch.testing.assert_close(higher(x), -scores)
    bare.checkpoint_config = {"DATA": {"DATASET": "pipal"}}  # recorded, but with no known scale
    with pytest.raises(ValueError, match=r"no label scale is known for dataset 'pipal'.*lower_better="):
        QualityLoss(bare)


def test_lower_better_must_agree_with_a_known_scale(model):
    assert QualityLoss(model, lower_better=False).lower_better is False  # KonIQ: agrees
    with pytest.raises(ValueError, match=r"lower_better=True contradicts .*koniq.*higher is better"):
        QualityLoss(model, lower_better=True)


def test_reductions_agree(model):
    x = images(3, 224, 224, seed=4)
    with torch.no_grad():
        per_image = QualityLoss(model, reduction="none")(x)
        total, mean = QualityLoss(model, reduction="sum")(x), QualityLoss(model)(x)
    assert per_image.shape == (3,) and total.shape == () and mean.shape == ()
    torch.testing.assert_close(total, per_image.sum())
    torch.testing.assert_close(mean, per_image.mean())


def test_grey_images_are_repeated_to_rgb(model):
    grey = images(2, 224, 240, seed=5)[:, :1]  # (2, 1, 224, 240)
    loss = QualityLoss(model, reduction="none")
    g = input_grad(loss, grey)
    assert g.shape == grey.shape and (g.flatten(1).abs().sum(1) > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(loss(grey), loss(grey.repeat(1, 3, 1, 1)), rtol=0, atol=0)


def test_data_range_scales_the_input(model):
    x = images(2, 224, 224, seed=6)
    loss_1, loss_255 = QualityLoss(model), QualityLoss(model, data_range=255)
    torch.testing.assert_close(loss_255(x * 255), loss_1(x))
    # d loss / d (255 x) = (d loss / d x) / 255
    torch.testing.assert_close(input_grad(loss_255, x * 255) * 255, input_grad(loss_1, x), rtol=1e-4,
                               atol=1e-9)


def test_scores_are_the_scorers(model):
    # the same resize, crops, normalisation and mean per image as Scorer: "auto" resizes a KonIQ model's
    # images to 512 x 384 in both
    cat = photo("chelsea", 0, 0, 300, 451)  # a 2 x 3 grid
    small = photo("coffee", 0, 0, 200, 230)  # enlarged to 224 x 258 first
    with torch.no_grad():
        assert QualityLoss(model).resize == (512, 384)
        torch.testing.assert_close(QualityLoss(model).score(cat), Scorer(model, dtype="fp32")(cat), rtol=0, atol=1e-5)
        loss, scorer = QualityLoss(model, resize=None), Scorer(model, dtype="fp32", resize=None)
        for x in (cat, small):
            torch.testing.assert_close(loss.score(x), scorer(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(QualityLoss(model, crops=5, resize=None).score(cat),
                                   Scorer(model, dtype="fp32", resize=None, crops=5)(cat), rtol=0, atol=1e-5)
        # grey images and data_range are the Scorer's too
        grey = small[:, :1] * 255
        torch.testing.assert_close(QualityLoss(model, data_range=255, resize=None).score(grey),
                                   Scorer(model, dtype="fp32", resize=None, data_range=255)(grey), rtol=0, atol=1e-5)
        # and resize=
        torch.testing.assert_close(QualityLoss(model, resize=(256, 320)).score(small),
                                   Scorer(model, dtype="fp32", resize=(256, 320))(small), rtol=0, atol=1e-5)


def test_max_crops_bounds_the_batch(model):
    loss = QualityLoss(model, max_crops=3, resize=None)
    x = images(2, 224, 1120)  # a grid of 1 x 5 crops each, capped to 1 x 3
    batches = []
    handle = loss.model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            scores = loss.score(x)
    finally:
        handle.remove()
    assert batches == [2 * 3]
    with torch.no_grad():  # the Scorer's crops under the same cap
        torch.testing.assert_close(scores, Scorer(model, dtype="fp32", resize=None, max_crops=3)(x), rtol=0,
                                   atol=1e-5)


def test_checkpoint_path(model, tmp_path):
    path = tmp_path / "live.pth"
    lifeiqa_fast.save_checkpoint(model, path, config={"DATA": {"DATASET": "live"}})
    loss = QualityLoss(path)
    assert loss.scale.dataset == "live"
    x = images(1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loss(x), QualityLoss(model, dataset="live")(x), rtol=0, atol=1e-6)


def test_callers_model_is_unchanged(model):
    model.impl = "composite"
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss = QualityLoss(model, impl="reference")
        x = images(1, 224, 224).requires_grad_(True)
        loss(x).backward()
        assert model.impl == "composite" and model.training
        assert all(p.requires_grad and p.grad is None for p in model.parameters())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert loss.model.impl == "reference" and not loss.model.training
        assert not any(p.requires_grad for p in loss.model.parameters())
    finally:
        model.impl = "auto"


def test_train_mode_keeps_the_model_in_eval(model):
    loss = QualityLoss(model).train()  # as a training loop's model.train() would reach it
    assert loss.training and not loss.model.training
    assert not any(m.training for m in loss.model.modules())
    x = images(1, 224, 224)
    with torch.no_grad():
        assert torch.equal(loss(x), loss(x))  # dropout off: the same loss on every call


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(data_range=0), ValueError, r"data_range must be a finite number > 0"),
    (dict(data_range=-1.0), ValueError, r"data_range must be"),
    (dict(data_range=math.inf), ValueError, r"data_range must be"),
    (dict(data_range="255"), ValueError, r"data_range must be"),
    (dict(resize=100), ValueError, r"resize must be 'auto', None, \(H, W\) or a short side, each an int >= 224, got 100"),
    (dict(resize=(256,)), ValueError, r"resize must be"),
    (dict(crops=0), ValueError, r"crops must be 'grid' or a positive int, got 0"),
    (dict(crops="random"), ValueError, r"crops must be"),
    (dict(max_crops=0), ValueError, r"max_crops must be a positive int or None, got 0"),
    (dict(max_crops=True), ValueError, r"max_crops must be"),
    (dict(lower_better="yes"), ValueError, r"lower_better must be None, True or False, got 'yes'"),
    (dict(dataset="konIQ10k"), ValueError, r"dataset must be one of live, csiq, .*got 'konIQ10k'"),
    (dict(impl="fast"), ValueError, r"impl must be one of"),
])
def test_bad_arguments_name_themselves(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        QualityLoss(model, **kwargs)


def test_model_must_be_a_module_or_a_path(tmp_path):
    with pytest.raises(TypeError, match=r"model must be a module or a checkpoint path, got int"):
        QualityLoss(3, dataset="koniq")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        QualityLoss(tmp_path / "missing.pth", dataset="koniq")


@pytest.mark.parametrize("x, error, match", [
    (images(2) * 255, ValueError, r"values in \[0, data_range\] = \[0, 1\], got min .*max 2\d\d.*data_range=255"),
    (images(2) - 0.5, ValueError, r"data_range\] = \[0, 1\], got min -0.4\d*, max 0.4\d*$"),  # normalised
    (images(2).index_fill(3, torch.tensor([5]), math.nan), ValueError, r"data_range.*nan"),
    (images(2)[0], ValueError, r"images must be \(B, C, H, W\) with C = 1 or 3, got \(3, 224, 240\)"),
    (images(2)[:, :2], ValueError, r"C = 1 or 3, got \(2, 2, 224, 240\)"),
    ((images(2) * 255).to(torch.uint8), ValueError, r"images must be floating point .*torch.uint8"),
    (images(2)[:0], ValueError, r"at least one image with pixels, got \(0, 3, 224, 240\)"),
    (images(2)[:, :, :0], ValueError, r"at least one image with pixels"),
    (images(2).to("meta"), ValueError, r"images must be on the model's device cpu, got meta"),
    (images(2).numpy(), TypeError, r"images must be a tensor \(B, C, H, W\), got ndarray"),
])
def test_bad_images_fail_loudly(model, x, error, match):
    with pytest.raises(error, match=match):
        QualityLoss(model)(x)


def test_slack_for_rounding(model):
    x = images(1, 224, 224)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -1e-4, 1 + 1e-4  # a float resize overshoots by this much: accepted
    QualityLoss(model)(x)
