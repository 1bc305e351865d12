"""A small synthetic IQA dataset in the KADID-10k layout, made on the spot from the colour photographs
that ship with scikit-image: training and evaluation demos and tests run on a CPU with no download.

Layout under root (KADID-10k's names, so the KADID-10k loader reads it unchanged)::

    reference_images/I01.png ...        the pristine photographs, size x size RGB
    distorted_images/I01_01_01.png ...  reference I01, distortion type 01, level 1 (1..5, 5 = worst)
    dmos.csv                            header dist_img,ref_img,dmos; one row per distorted image
    synthetic.json                      the parameters it was made with; written last

Sources (reference id: scikit-image function), all in scikit-image's own distribution (no pooch, no
network); each is center-cropped to a square and resized (Lanczos) to size x size::

    I01 astronaut  I02 chelsea  I03 coffee  I04 rocket  I05 immunohistochemistry  I06 retina
    I07 motorcycle (the left image of stereo_motorcycle)

(`cat` is `chelsea`; `colorwheel` and `logo` are drawings, not photographs; the others are grey but
hubble_deep_field, mostly black sky, which a model trained on the rest scored as badly under-exposed.)
The default size, 288, is the largest square that every source holds without upscaling (chelsea is
300 x 451) and leaves the model's 224 crops some room.

Distortions (type id: name, the parameter of levels 1..5), numpy and PIL only, on 8-bit RGB::

    01 gaussian_blur   sigma in pixels             0.6  1.2  2.0  3.2  5.0
    02 gaussian_noise  sigma in 8-bit steps        6    12   20   32   50
    03 jpeg            PIL quality                 50   25   12   6    3
    04 contrast        factor towards the mean     0.7  0.5  0.35 0.22 0.12
    05 saturation      factor towards luma         0.7  0.5  0.3  0.15 0.0 (grey)
    06 color_shift     warm cast (R up, B down)    0.1  0.2  0.32 0.46 0.65
    07 overexposure    gain (clipped at 255)       1.3  1.6  2.0  2.6  3.5
    08 underexposure   gain                        0.7  0.5  0.35 0.22 0.12
    09 pixelate        block side in pixels        2    3    4    6    9

The noise is the only random part: one standard-normal field per (seed, reference), scaled by the
level's sigma, so a given seed gives the same files, and a subset of references gives exactly those
references' files of the full set.

The label (the dataset's definition): dmos = round(1 + 4 * clip(SSIM(distorted, reference), 0, 1), 4),
on KADID-10k's scale (1 worst, 5 best), where SSIM is the mean structural similarity of Wang et al.
(2004) over the three RGB channels and every position of the valid region: 11-tap Gaussian window
with sigma 1.5, population (co)variances, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, computed on the
8-bit images as written (`ssim` below; equal to skimage.metrics.structural_similarity with
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1).
The levels are calibrated so that the label is strictly decreasing with the level for every
(reference, type); generation checks it and raises if not. The label is an objective measure, not a
human opinion: SSIM barely sees colour, so the colour types (05, 06) stay mild (>= 3.7 at level 5)
while noise and under-exposure reach ~1.3; equal levels are not equally bad across types.

The numbers at the default size (SYNTHETIC_INFO): 7 references, 9 types x 5 levels = 315 distorted
images of 288 x 288, 322 PNGs in ~33 MB; labels span 1.28..4.98; made in ~14 s on one CPU core. The
80/20 split by reference trains on 6 references and tests on 1 (45 images). Files are the same bit
for bit for a given seed with the same Pillow (its zlib and libjpeg).
"""
from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import re

import numpy as np
from PIL import Image

from .._optional import require

_PHOTOGRAPHS = ("skimage.data", "scikit-image", "data", "the synthetic dataset (its reference photographs)")

SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina", "motorcycle")  # I01..I07
DEFAULT_SIZE = 288
MIN_SIZE = 48  # the label decreases strictly at every size checked, 48..512; at 32 rocket's pixelate 1 < 2
LEVELS = 5

_FORMAT = "lifeiqa_fast.data.synthetic"
_VERSION = 2  # 2: seven references (1: the first six)
_MARKER = "synthetic.json"             # written last: its presence means the dataset is complete
_PARTIAL = "synthetic.incomplete.json"  # written first, removed last: an interrupted run of ours
_OWN_PNG = re.compile(r"I\d\d(_\d\d_\d\d)?\.png")


# ---------------------------------------------------------------------------------------------------
# Distortions: (H, W, 3) uint8 in, (H, W, 3) uint8 out; `noise` is the reference's (H, W, 3) float64
# standard-normal field (used by gaussian_noise only).

def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gaussian_taps(sigma: float, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable correlation of x (H, W, ...) with taps w along axes 0 and 1, valid region only:
    (H, W, ...) -> (H - k + 1, W - k + 1, ...), k = len(w)."""
    k = len(w)
    h, wd = x.shape[0] - k + 1, x.shape[1] - k + 1
    x = sum(w[i] * x[i:i + h] for i in range(k))       # (h, W, ...)
    return sum(w[i] * x[:, i:i + wd] for i in range(k))  # (h, wd, ...)


def gaussian_blur(img: np.ndarray, sigma: float, noise=None) -> np.ndarray:
    w = _gaussian_taps(sigma)
    r = len(w) // 2
    x = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")  # (H + 2r, W + 2r, 3)
    return _to_uint8(_filter_valid(x, w))                                         # (H, W, 3)


def gaussian_noise(img: np.ndarray, sigma: float, noise: np.ndarray) -> np.ndarray:
    return _to_uint8(img + sigma * noise)


def jpeg(img: np.ndarray, quality: int, noise=None) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def contrast(img: np.ndarray, factor: float, noise=None) -> np.ndarray:
    x = img.astype(np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)  # (1, 1, 3): each channel towards its own mean
    return _to_uint8(mean + factor * (x - mean))


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114])[:, None]  # (H, W, 1), ITU-R BT.601


def saturation(img: np.ndarray, factor: float, noise=None) -> np.ndarray:
    x = img.astype(np.float64)
    y = _luma(x)
    return _to_uint8(y + factor * (x - y))


def color_shift(img: np.ndarray, amount: float, noise=None) -> np.ndarray:
    gain = np.array([1.0 + amount, 1.0, 1.0 - amount])  # a warm white-balance error
    return _to_uint8(img * gain)


def exposure(img: np.ndarray, gain: float, noise=None) -> np.ndarray:
    return _to_uint8(img * float(gain))  # gain > 1 clips the highlights, gain < 1 crushes the shadows


def pixelate(img: np.ndarray, block: int, noise=None) -> np.ndarray:
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((-(-w // block), -(-h // block)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))


# type id = position + 1; the name, the function, the parameter of levels 1..5 (severity increasing)
DISTORTIONS = (
    ("gaussian_blur", gaussian_blur, (0.6, 1.2, 2.0, 3.2, 5.0)),
    ("gaussian_noise", gaussian_noise, (6, 12, 20, 32, 50)),
    ("jpeg", jpeg, (50, 25, 12, 6, 3)),
    ("contrast", contrast, (0.7, 0.5, 0.35, 0.22, 0.12)),
    ("saturation", saturation, (0.7, 0.5, 0.3, 0.15, 0.0)),
    ("color_shift", color_shift, (0.1, 0.2, 0.32, 0.46, 0.65)),
    ("overexposure", exposure, (1.3, 1.6, 2.0, 2.6, 3.5)),
    ("underexposure", exposure, (0.7, 0.5, 0.35, 0.22, 0.12)),
    ("pixelate", pixelate, (2, 3, 4, 6, 9)),
)

SYNTHETIC_INFO = {
    "references": len(SOURCES),
    "distortion_types": len(DISTORTIONS),
    "levels": LEVELS,
    "distorted_images": len(SOURCES) * len(DISTORTIONS) * LEVELS,  # 7 x 9 x 5 = 315
    "default_size": DEFAULT_SIZE,
    "label": "dmos = round(1 + 4 * clip(SSIM, 0, 1), 4); 5 = best",
    "label_range": (1.0, 5.0),
}


# ---------------------------------------------------------------------------------------------------
# The label

def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of two (H, W, 3) uint8 images, H, W >= 11: over the RGB channels
    and the valid region of an 11-tap Gaussian window (sigma 1.5), population statistics,
    C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2. 1.0 for identical images."""
    if x.shape != y.shape or x.ndim != 3 or x.shape[2] != 3 or min(x.shape[:2]) < 11:
        raise ValueError(f"lifeiqa_fast.data.synthetic.ssim: x and y must be (H, W, 3) with H, W >= 11 and "
                         f"the same shape, got {x.shape} and {y.shape}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    w = _gaussian_taps(1.5)                           # 11 taps
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter_valid(x, w), _filter_valid(y, w)  # (H - 10, W - 10, 3)
    sxx = _filter_valid(x * x, w) - mx * mx
    syy = _filter_valid(y * y, w) - my * my
    sxy = _filter_valid(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def dmos_from_ssim(s: float) -> float:
    """The dataset's label: 1 + 4 * clip(SSIM, 0, 1), rounded to 4 decimals (5 = the reference)."""
    return round(1.0 + 4.0 * min(max(s, 0.0), 1.0), 4)


# ---------------------------------------------------------------------------------------------------
# Generation

def load_reference(name: str, size: int) -> np.ndarray:
    """A scikit-image photograph (one of SOURCES), center-cropped to a square and resized (Lanczos)
    to (size, size, 3) uint8."""
    data = require(*_PHOTOGRAPHS)  # imported here: the module itself needs numpy and PIL only
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = np.asarray(img)[..., :3]  # (H, W, 3) uint8
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    im = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
    if side != size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im.convert("RGB"))


def _params(size: int, seed: int, references: tuple[str, ...]) -> dict:
    return {"format": _FORMAT, "version": _VERSION, "size": size, "seed": seed,
            "references": {f"I{SOURCES.index(r) + 1:02d}": r for r in references},
            "distortions": {f"{t + 1:02d}": [name, list(levels)] for t, (name, _, levels) in enumerate(DISTORTIONS)},
            "images": len(references) * len(DISTORTIONS) * LEVELS}


def _check_args(size, seed, references) -> tuple[int, int, tuple[str, ...]]:
    size = DEFAULT_SIZE if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"lifeiqa_fast.data.make_synthetic: size must be None or an int >= {MIN_SIZE}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"lifeiqa_fast.data.make_synthetic: seed must be a non-negative int, got {seed!r}")
    refs = SOURCES if references is None else tuple(references)
    unknown = [r for r in refs if r not in SOURCES]
    if not refs or unknown or len(set(refs)) != len(refs):
        raise ValueError(f"lifeiqa_fast.data.make_synthetic: references must be distinct names from {SOURCES}, "
                         f"got {references!r}")
    return int(size), int(seed), tuple(sorted(refs, key=SOURCES.index))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _existing(root: pathlib.Path, params: dict) -> bool:
    """True if root holds a complete dataset made with params; False if root is absent, empty or an
    interrupted run of ours (whose PNGs it removes); raises if root holds anything else."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise FileExistsError(f"lifeiqa_fast.data.make_synthetic: root {str(root)!r} exists and is not a directory")
    marker = root / _MARKER
    if marker.exists():
        try:
            found = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FileExistsError(f"lifeiqa_fast.data.make_synthetic: root {str(root)!r} has an unreadable "
                                  f"{_MARKER} ({e})") from e
        if found != params:
            raise FileExistsError(f"lifeiqa_fast.data.make_synthetic: root {str(root)!r} holds a synthetic dataset "
                                  f"made with other parameters ({_MARKER}); use another root or delete it")
        missing = [p for p in _files(params) if not (root / p).is_file()]
        if missing:
            raise FileExistsError(f"lifeiqa_fast.data.make_synthetic: root {str(root)!r} is a damaged synthetic "
                                  f"dataset: {len(missing)} files missing, e.g. {missing[0]}; delete it")
        return True
    if (root / _PARTIAL).exists():  # an interrupted run of ours: start over
        for sub in ("reference_images", "distorted_images"):
            for p in (root / sub).glob("*.png"):
                if _OWN_PNG.fullmatch(p.name):
                    p.unlink()
        return False
    if any(root.iterdir()):
        raise FileExistsError(f"lifeiqa_fast.data.make_synthetic: root {str(root)!r} is not empty and holds no "
                              f"synthetic dataset ({_MARKER}); use an empty or new directory")
    return False


def _files(params: dict) -> list[str]:
    out = ["dmos.csv"]
    for ref in params["references"]:
        out.append(f"reference_images/{ref}.png")
        out += [f"distorted_images/{ref}_{t}_{lv:02d}.png" for t in params["distortions"]
                for lv in range(1, LEVELS + 1)]
    return out


def make_synthetic(root, size: int | None = None, seed: int = 0, progress: bool = False,
                   references=None) -> pathlib.Path:
    """Writes the synthetic dataset (see the module docstring) under root and returns root as a Path.

    size: the side of every (square) image, default DEFAULT_SIZE (288). seed: the noise field's seed.
    references: names from SOURCES (default all seven); a reference keeps its id (astronaut is I01
    whatever the subset). progress: a progress bar over references (tqdm).

    If root already holds a complete dataset made with the same parameters it is returned untouched;
    if it holds anything else (another dataset, other parameters, other files) FileExistsError names
    it. root may be absent or empty; a root left by an interrupted run is made again. synthetic.json is
    written last, so a run cut short is never taken for a complete dataset.
    """
    size, seed, refs = _check_args(size, seed, references)
    root = pathlib.Path(root)
    params = _params(size, seed, refs)
    if _existing(root, params):
        return root
    require(*_PHOTOGRAPHS)  # before any folder is made
    from tqdm.auto import tqdm

    (root / "reference_images").mkdir(parents=True, exist_ok=True)
    (root / "distorted_images").mkdir(exist_ok=True)
    _write_atomic(root / _PARTIAL, json.dumps(params, indent=1))
    rows = []
    for ref in tqdm(refs, desc="synthetic", unit="ref", disable=not progress):
        idx = SOURCES.index(ref) + 1
        ref_img = load_reference(ref, size)  # (size, size, 3) uint8
        Image.fromarray(ref_img).save(root / "reference_images" / f"I{idx:02d}.png")
        noise = np.random.default_rng([seed, idx]).standard_normal(ref_img.shape)  # (size, size, 3)
        for t, (name, fn, levels) in enumerate(DISTORTIONS, start=1):
            labels = []
            for lv, p in enumerate(levels, start=1):
                dist = fn(ref_img, p, noise=noise)
                dist_name = f"I{idx:02d}_{t:02d}_{lv:02d}.png"
                Image.fromarray(dist).save(root / "distorted_images" / dist_name)
                labels.append(dmos_from_ssim(ssim(dist, ref_img)))
                rows.append((dist_name, f"I{idx:02d}.png", labels[-1]))
            if any(a <= b for a, b in zip(labels, labels[1:])):
                raise RuntimeError(f"lifeiqa_fast.data.make_synthetic: the label of I{idx:02d} ({ref}) under {name} is "
                                   f"not strictly decreasing with the level at size {size}: {labels}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("dist_img", "ref_img", "dmos"))
    writer.writerows((d, r, f"{q:.4f}") for d, r, q in rows)
    _write_atomic(root / "dmos.csv", buf.getvalue())
    _write_atomic(root / _MARKER, json.dumps(params, indent=1))
    (root / _PARTIAL).unlink()
    return root
