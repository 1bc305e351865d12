#!/usr/bin/env python
"""How far the Scorer's low-precision scores are from fp32, on real photographs.

The weights are the golden case's official-format state dict (tests/data/golden_e8k2d4.json, filled by
the rule of tests/golden.py: weights of trained-like scale, not trained). The images are the colour
photographs of scikit-image, each also blurred, noised and JPEG-compressed, so that the scores spread.
Prints, per dtype: the largest and the mean |score - fp32 score|, beside the spread (std) of the fp32
scores, and the Spearman correlation of the scores with fp32's (what an SRCC would see).

    python benchmarks/precision.py [--dtype bf16] [--device cpu] [--crops grid]
"""
from __future__ import annotations

import argparse
import io
import pathlib
import sys

import numpy as np
import torch
from PIL import Image, ImageFilter

import lifeiqa_fast

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from golden import load_spec, make_state_dict  # noqa: E402 - the test helpers that rebuild the golden weights

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")


def images() -> list[Image.Image]:
    """Each photograph as it is, Gaussian-blurred, with Gaussian noise and JPEG-compressed at quality 10."""
    from skimage import data

    out, rng = [], np.random.default_rng(0)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        noisy = np.asarray(photo, dtype=np.float32) + rng.normal(0, 25, (photo.height, photo.width, 3))
        jpeg = io.BytesIO()
        photo.save(jpeg, "JPEG", quality=10)
        noisy = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        out += [photo, photo.filter(ImageFilter.GaussianBlur(3)), noisy, Image.open(io.BytesIO(jpeg.getvalue()))]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default=None, help="bf16, fp16 (default: bf16, and fp16 on CUDA)")
    p.add_argument("--device", default=None)
    p.add_argument("--crops", default="grid")
    args = p.parse_args()
    spec = load_spec("e8k2d4")
    model = lifeiqa_fast.LifeIQA(**{k: spec["config"][k] for k in ("num_experts", "top_k", "depth")})
    model.load_state_dict(make_state_dict(spec, spec["golden"]["state_seed"]))
    crops = args.crops if args.crops == "grid" else int(args.crops)
    photos = images()
    scorer = lifeiqa_fast.Scorer(model, device=args.device, dtype="fp32", crops=crops, progress=True)
    truth = scorer(photos)
    dtypes = [args.dtype] if args.dtype else ["bf16"] + (["fp16"] if scorer.device.type == "cuda" else [])
    print(f"{len(photos)} images, {scorer.device.type}, crops {crops}: fp32 scores mean {truth.mean():.4f}, "
          f"std {truth.std():.4f}, range [{truth.min():.4f}, {truth.max():.4f}]")
    for dtype in dtypes:
        low = lifeiqa_fast.Scorer(model, device=args.device, dtype=dtype, crops=crops, progress=True)(photos)
        err = (low - truth).abs()
        print(f"{dtype}: |score - fp32| max {err.max():.4f}, mean {err.mean():.4f} "
              f"({err.max() / truth.std():.1%} of the fp32 std); Spearman with fp32 {spearman(low, truth):.4f}")


if __name__ == "__main__":
    main()
