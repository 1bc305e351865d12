"""The losses of Life-IQA: training_loss, what the authors' training minimises, and QualityLoss, a
differentiable Life-IQA quality loss, to optimise images towards higher quality
(restoration, enhancement), as LPIPS-style losses are used.

An image goes through the Scorer's preprocessing, differentiably: an optional resize, enlargement to
224 on the short side, the 224 crops of a deterministic grid, ImageNet normalisation; its score is the
mean of its crops' scores. The loss maps the score so that lower is always better, whatever the
direction of the training set's labels (lifeiqa_fast.scale).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convert import optimize
from .ops._impl import _check_impl, is_int
from .scale import DATASET_SCALES, scale_of, scale_of_model
from .pretrained import load_model
from .images import (CROP, FLOAT_SLACK, MAX_CROPS, MEAN, STD, _value_range, crop_corners, is_data_range, is_size,
                     target_size)
from .scorer import auto_resize

# The weights of the router's two losses in the authors' training objective (their main.py: alpha, beta).
AUX_WEIGHT = 0.01  # the load-balancing loss aux
Z_WEIGHT = 0.001  # the router z-loss z


def router_loss(aux: Tensor, z: Tensor) -> Tensor:
    """AUX_WEIGHT * aux + Z_WEIGHT * z: the router's share of the training objective."""
    return AUX_WEIGHT * aux + Z_WEIGHT * z


def training_loss(score: Tensor, mos: Tensor, aux: Tensor, z: Tensor) -> Tensor:
    """The authors' training objective for one batch of LifeIQA outputs (score (B, 1), aux (), z ()) and
    labels mos (B,) or (B, 1): smooth_l1(score, mos) (beta 1, the batch mean) + router_loss(aux, z).
    The smooth L1 term is computed in float32 whatever score's dtype (an autocast forward)."""
    if score.dim() != 2 or score.shape[1] != 1:
        raise ValueError(f"lifeiqa_fast.training_loss: score must be (B, 1), got {tuple(score.shape)}")
    if mos.numel() != score.shape[0]:
        raise ValueError(f"lifeiqa_fast.training_loss: mos must hold one label per score ({score.shape[0]}), "
                         f"got shape {tuple(mos.shape)}")
    return F.smooth_l1_loss(score.float(), mos.reshape(-1, 1).to(score.device, torch.float32)) + router_loss(aux, z)


REDUCTIONS = ("mean", "sum", "none")
WHERE = "lifeiqa_fast.QualityLoss"  # how its errors begin


def _resized(x: Tensor, size: tuple[int, int] | int) -> Tensor:
    """x (B, C, H, W) resized to size by resize_image's rule (target_size), bilinear with antialiasing;
    differentiable, x's dtype. The same size returns x itself (a bilinear resize to it is the identity)."""
    size = target_size(*x.shape[2:], size)
    return x if size == tuple(x.shape[2:]) else F.interpolate(x, size=size, mode="bilinear", antialias=True,
                                                               align_corners=False)


class QualityLoss(nn.Module):
    """A differentiable no-reference quality loss: minimising it raises an image's Life-IQA quality.

    Args:
        model: a LifeIQA (or a module with the authors' layout), a checkpoint path, a save_pretrained
            folder or a Hugging Face Hub repo id (as Scorer takes).
            A module is deep-copied: the caller's model is left as it is. The copy is optimised with
            impl, put in eval mode (dropout off) and frozen; gradients flow only to the images.
        dataset: the training set whose label scale the scores are on (lifeiqa_fast.scale.DATASET_SCALES);
            None: the one the model records (its checkpoint config's DATA.DATASET).
        lower_better: for a model whose scale is unknown, whether a lower score is a better image
            (required there); with a known scale it may be given only if it agrees.
        reduction: "mean" or "sum" over the batch (a 0-d loss), or "none" ((B,) losses).
        data_range: the images' values lie in [0, data_range] (1.0 for float images, 255 for 0..255).
        resize: (H, W) or a short side (int), each >= 224, to resize every image to before cropping;
            "auto" (default): as Scorer's, what the model's training used (512 x 384 for KonIQ and SPAQ);
            None: no resize. Images under 224 on a side are enlarged (short side to 224, aspect kept) anyway.
        crops: "grid" (a deterministic grid spread evenly over the image, see crop_corners) or an int N
            (N random crops as Scorer(crops=N) places them, seeded with 0: the same crops on every call).
        max_crops: the most crops of a grid (crop_corners; default 20, as the Scorer's); None: a grid
            covering the image. It bounds memory: every crop's activations are kept for the backward.
        impl: the head's ops (lifeiqa_fast.ops); every implementation has a backward pass.

    The loss per image is 1 - scale.normalize(score, clip=False) for a known scale: 0 at the best end of
    the label range, 1 at the worst, linear in the score and unclipped (a score past either end keeps
    its gradient). For an unknown scale it is the raw score (lower_better) or its negation.
    loss(images): images (B, C, H, W) floating, C = 1 (grey, repeated to RGB) or 3, values in
    [0, data_range], on the model's device; computed in the model's dtype. Returns a 0-d tensor, or (B,)
    for reduction="none". score(images) gives the raw (B,) scores the loss is built on.
    """

    def __init__(self, model: nn.Module | str | os.PathLike, *, dataset: str | None = None,
                 lower_better: bool | None = None, reduction: str = "mean", data_range: float = 1.0,
                 resize: tuple[int, int] | int | str | None = "auto", crops: int | str = "grid",
                 max_crops: int | None = MAX_CROPS, impl: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{WHERE}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not is_data_range(data_range):
            raise ValueError(f"{WHERE}: data_range must be a finite number > 0 (1.0 for images in [0, 1], 255 for "
                             f"0..255), got {data_range!r}")
        if resize not in (None, "auto") and not is_size(resize):
            raise ValueError(f"{WHERE}: resize must be 'auto', None, (H, W) or a short side, each an int >= {CROP}, "
                             f"got {resize!r}")
        if crops != "grid" and not (is_int(crops) and crops >= 1):
            raise ValueError(f"{WHERE}: crops must be 'grid' or a positive int, got {crops!r}")
        if max_crops is not None and not (is_int(max_crops) and max_crops >= 1):
            raise ValueError(f"{WHERE}: max_crops must be a positive int or None, got {max_crops!r}")
        if lower_better is not None and not isinstance(lower_better, bool):
            raise ValueError(f"{WHERE}: lower_better must be None, True or False, got {lower_better!r}")
        if dataset is not None and str(dataset).lower() not in DATASET_SCALES:
            raise ValueError(f"{WHERE}: dataset must be one of {', '.join(DATASET_SCALES)} (or None: the model's "
                             f"record), got {dataset!r}")
        _check_impl(impl)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, map_location="cpu")
        elif isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        else:
            raise TypeError(f"{WHERE}: model must be a module or a checkpoint path, got {type(model).__name__}")

        scale = scale_of(dataset) if dataset is not None else scale_of_model(model)
        if scale.known and lower_better is not None and lower_better != scale.lower_better:
            raise ValueError(f"{WHERE}: lower_better={lower_better} contradicts the scale of the scores "
                             f"({scale.describe()}); leave lower_better out, or name the right dataset=")
        if not scale.known and lower_better is None:
            raise ValueError(f"{WHERE}: the direction of the model's scores is unknown ({scale.definition}): pass "
                             f"dataset= (its training set, one of {', '.join(DATASET_SCALES)}) or lower_better= "
                             f"(True if a lower score is a better image)")
        self.scale = scale
        self.lower_better = scale.lower_better if scale.known else lower_better
        self.reduction, self.data_range, self.crops, self.max_crops = reduction, data_range, crops, max_crops
        if resize == "auto":
            resize = auto_resize(model, scale.dataset, WHERE)
        self.resize = tuple(resize) if isinstance(resize, (tuple, list)) else resize
        self.model = optimize(model, impl).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> QualityLoss:
        """Sets this module's mode only: the model stays in eval mode (dropout off), so that the loss of
        an image is the same on every call, and inside a training loop's model.train() too."""
        super().train(mode)
        self.model.eval()
        return self

    def _checked(self, images: Tensor) -> None:
        """Raises TypeError or ValueError naming images and the expectation, unless it is a (B, C, H, W)
        floating batch, B >= 1, C in (1, 3), with pixels, on the model's device, its values in
        [0, data_range] (FLOAT_SLACK x data_range of rounding allowed; one host sync for the range)."""
        if not isinstance(images, Tensor):
            raise TypeError(f"{WHERE}: images must be a tensor (B, C, H, W), got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{WHERE}: images must be (B, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{WHERE}: images must be floating point (to carry a gradient), got {images.dtype}")
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise ValueError(f"{WHERE}: images must hold at least one image with pixels, got {tuple(images.shape)}")
        device = next(self.model.parameters()).device
        if images.device != device:
            raise ValueError(f"{WHERE}: images must be on the model's device {device}, got {images.device}")
        lo, hi = _value_range(images)
        slack = FLOAT_SLACK * self.data_range
        if not (-slack <= lo and hi <= self.data_range + slack):  # NaN fails here too
            in_255 = self.data_range == 1 and lo >= 0 and hi <= 255 * (1 + FLOAT_SLACK)
            raise ValueError(f"{WHERE}: images must hold values in [0, data_range] = [0, {self.data_range:g}], "
                             f"got min {lo:.6g}, max {hi:.6g}" + (" (images in 0..255 need data_range=255)"
                                                                 if in_255 else ""))

    def score(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> (B,) the model's raw score of each image (the mean over its crops), in
        the model's dtype, differentiable with respect to images."""
        self._checked(images)
        B = images.shape[0]
        x = images.to(next(self.model.parameters()).dtype) / self.data_range  # (B, C, H, W) in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        if self.resize is not None:
            x = _resized(x, self.resize)
        if min(x.shape[2:]) < CROP:  # too small to crop: short side to 224
            x = _resized(x, CROP)
        x = (x - x.new_tensor(MEAN).view(1, 3, 1, 1)) / x.new_tensor(STD).view(1, 3, 1, 1)
        h, w = x.shape[2:]
        corners = crop_corners(h, w, self.crops, 0, self.max_crops)
        crops = torch.stack([x[:, :, t:t + CROP, l:l + CROP] for t, l in corners], dim=1)  # (B, n, 3, 224, 224)
        scores = self.model(crops.flatten(0, 1))[0].view(B, len(corners))  # (B, n)
        return scores.mean(dim=1)  # (B,)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> the loss: 0-d for reduction "mean" and "sum", (B,) for "none"."""
        scores = self.score(images)  # (B,)
        if self.scale.known:
            loss = 1 - self.scale.normalize(scores, clip=False)
        else:
            loss = scores if self.lower_better else -scores
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()

    def extra_repr(self) -> str:
        direction = "lower" if self.lower_better else "higher"
        return (f"scale={self.scale.dataset or 'unknown'!r} ({direction} score is better), "
                f"reduction={self.reduction!r}, data_range={self.data_range:g}, resize={self.resize}, "
                f"crops={self.crops!r}, max_crops={self.max_crops}")


__all__ = ["QualityLoss"]
