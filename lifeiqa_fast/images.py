"""Images for Life-IQA: finding image files, decoding and checking them, resizing, and the geometry of
the 224 x 224 crops a model scores (the Scorer, QualityLoss and training all crop through here)."""
from __future__ import annotations

import glob
import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .ops._impl import is_int

CROP = 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet, as the authors' Normalize
STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})
# Datasets whose images the authors resize to (H, W) before cropping (torchvision Resize((512, 384))).
RESIZED_DATASETS = {"koniq": (512, 384), "spaq": (512, 384)}
# A float image is in [0, 1]; this much past either end is accepted as rounding (a float resize or
# colour conversion overshoots by a few ulps), and clipped.
FLOAT_SLACK = 1e-3
FLOAT_KIND = "a float image (RGB or grey, not normalised; uint8 holds 0..255)"
MAX_CROPS = 20  # the default cap of a grid's crops (crop_corners): a 12-megapixel photograph would have 252
# What a path that is not a regular file is, for the message that reports it (load_image).
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class ImageError(ValueError):
    """A file that cannot be read as an image; the message names it and says why. (An in-memory
    input of the wrong kind raises TypeError or ValueError instead: that is a bug in the caller.)"""


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The image files that paths, folders and glob patterns name, in the order given.

    A path named directly or matched by a glob is kept whatever it is: a file of any suffix, a broken
    link, a link loop, a FIFO, a device (load_image reports those that are not images; none is opened
    or followed here). A folder is searched recursively for the entries named with IMAGE_SUFFIXES,
    sorted, whatever they are (a broken link named like an image is reported, not dropped); other
    names are not taken for images and left out. A path that does not exist and matches nothing
    raises FileNotFoundError naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        # lexists, not exists: a broken link or a loop is an entry of its folder, and a glob of its
        # name would match it again and again
        names = [item] if os.path.lexists(item) else sorted(glob.glob(os.fspath(item), recursive=True))
        if not names:
            raise FileNotFoundError(f"lifeiqa_fast: no such file, folder or glob match: {item}")
        for name in names:
            path = Path(name)
            if path.is_dir():  # (rglob does not descend into linked folders, so a loop of them ends)
                files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            else:
                files.append(path)
    return files


# The grey PIL modes that PIL's convert("RGB") would clip to 0..255: (scale, what the mode holds).
GREY_SCALES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535,
               "I": 65535,  # 32-bit integers: read as 16-bit grey, what 16-bit PNGs and TIFFs open as
               "F": 1}  # float: [0, 1], as float tensors


def _rgb(image: Image.Image) -> Image.Image:
    """An RGB PIL image: 16-bit and 32-bit integer grey scaled from 0..65535 and float grey from [0, 1]
    to 8 bits (PIL's convert would clip them); values past those ends (only rounding, once
    _pil_problem has passed) are clipped."""
    if image.mode in GREY_SCALES:
        grey = np.asarray(image, dtype=np.float32)
        return Image.fromarray(np.clip(grey / GREY_SCALES[image.mode] * 255 + 0.5, 0, 255).astype(np.uint8)
                               ).convert("RGB")
    return image.convert("RGB")


def _size_problem(h: int, w: int) -> str | None:
    """Why an image of h x w pixels cannot be scored, or None: it needs a pixel to enlarge to 224."""
    return f"has no pixels (H x W = {h} x {w})" if h == 0 or w == 0 else None


def _range_problem(lo: float, hi: float, kind: str, top: float, slack: float = 0) -> str | None:
    """Why an image whose values span lo..hi cannot be scored as kind, whose values are in [0, top], or
    None: they may pass either end by slack. NaN fails (no comparison with it holds)."""
    if -slack <= lo and hi <= top + slack:
        return None
    return f"is {kind}, so its values must be in [0, {top:g}], got min {lo:.6g}, max {hi:.6g}"


def _pil_problem(image: Image.Image) -> str | None:
    """Why a PIL image (in memory or just opened) cannot be scored, or None: no pixels, or values of
    an integer (I) or float (F) grey mode outside the range _rgb scales from, which would be
    mis-scaled silently."""
    why = _size_problem(image.height, image.width)
    if why is None and image.mode in ("I", "F"):
        lo, hi = image.getextrema()
        kind = ("a float (mode F) PIL image" if image.mode == "F"
                else "a 32-bit integer (mode I) PIL image, read as 16-bit grey")
        why = _range_problem(float(lo), float(hi), kind, GREY_SCALES[image.mode],
                             FLOAT_SLACK if image.mode == "F" else 0)
    return why


def _float_problem(lo: float, hi: float, data_range: float) -> str | None:
    """_range_problem of a float tensor or array whose values span lo..hi, against data_range."""
    why = _range_problem(lo, hi, FLOAT_KIND, data_range, FLOAT_SLACK * data_range)
    if why and data_range == 1 and lo >= 0 and 1 < hi <= 255 * (1 + FLOAT_SLACK):
        why += " (a float image in 0..255 needs data_range=255)"
    return why


def _check_image(image, name: str, data_range: float = 1.0) -> None:
    """Raises TypeError or ValueError, naming the argument name, unless image is an in-memory image
    that can be scored as it is: a PIL image; a numpy array (H, W) or (H, W, 1, 3 or 4), a tensor
    (1 or 3, H, W); uint8 (0..255) or float in [0, data_range] (FLOAT_SLACK of rounding allowed): a
    float image in 0..255 or normalised to [-1, 1] would otherwise be scored silently wrong; at least
    one pixel. Runs once per image, before any is scored (one pass over a float image for its range)."""
    if isinstance(image, Image.Image):
        why = _pil_problem(image)
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.ndim == 3 and image.shape[2] not in (1, 3, 4):
            raise ValueError(f"lifeiqa_fast: {name}: a numpy image must be (H, W) or (H, W, 1, 3 or 4), got "
                             f"{image.shape}")
        floating = np.issubdtype(image.dtype, np.floating)
        if image.dtype != np.uint8 and not floating:
            raise ValueError(f"lifeiqa_fast: {name}: an image (tensor or array) must be uint8 or floating point, "
                             f"got {image.dtype}")
        why = _size_problem(*image.shape[:2])
        if why is None and floating:
            pixels = image if image.ndim == 2 else image[:, :, :3]  # an alpha channel is dropped, unchecked
            why = _float_problem(float(pixels.min()), float(pixels.max()), data_range)
    elif isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"lifeiqa_fast: {name}: an image tensor must be (3, H, W) or (1, H, W), got "
                             f"{tuple(image.shape)}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"lifeiqa_fast: {name}: an image (tensor or array) must be uint8 or floating point, "
                             f"got {image.dtype}")
        why = _size_problem(*image.shape[1:])
        if why is None and image.is_floating_point():
            why = _float_problem(*_value_range(image), data_range)
    else:
        raise TypeError(f"lifeiqa_fast: {name}: an image must be a path, PIL image, numpy array or tensor, "
                        f"got {type(image).__name__}")
    if why is not None:
        raise ValueError(f"lifeiqa_fast: {name} {why}")


def _value_range(t: Tensor) -> tuple[float, float]:
    """(min, max) of a tensor's values, in one copy to the host."""
    return tuple(torch.stack(torch.aminmax(t.detach())).tolist())


def _check_batch(images: Tensor, data_range: float = 1.0) -> None:
    """_check_image for each image of a (B, 1 or 3, H, W) batch, B >= 1, with the values' range read for
    the whole batch at once (a host sync per image would stall a GPU): the image out of range is looked
    for, and named, only when the batch's range is."""
    if images.shape[0] == 0:
        raise ValueError("lifeiqa_fast.Scorer: the image batch is empty")
    _check_image(images[0], "images[0]", data_range)  # shape, dtype and size: the same for every image
    if images.is_floating_point() and _float_problem(*_value_range(images), data_range):
        for i, image in enumerate(images):
            _check_image(image, f"images[{i}]", data_range)


def _unit_range(image, data_range: float):
    """An in-memory float image (tensor or array) that _check_image passed, divided by data_range."""
    floating = isinstance(image, Tensor) and image.is_floating_point() or (
        isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating))
    return image / data_range if floating and data_range != 1 else image


def load_image(path: str | os.PathLike):
    """The file as an RGB PIL image, fully decoded; ImageError naming the file and saying why if it
    cannot be: not a regular file (a broken link, a link loop, a FIFO, a device, ...), not an image,
    damaged, no pixels, or grey values outside what its mode holds (_pil_problem). Only a regular file
    is opened: reading a FIFO waits for a writer forever, /dev/zero never ends."""
    cannot = f"lifeiqa_fast: cannot read {path} as an image"
    try:
        mode = os.stat(path).st_mode  # through links: ENOENT for a broken one, ELOOP for a loop
    except OSError as exc:
        broken = isinstance(exc, FileNotFoundError) and os.path.islink(path)
        why = f"a broken symbolic link (to {os.readlink(path)})" if broken else exc.strerror or str(exc)
        raise ImageError(f"{cannot}: {why}") from exc
    if not stat.S_ISREG(mode):
        kind = next((kind for is_kind, kind in FILE_KINDS if is_kind(mode)), "a special file")
        raise ImageError(f"{cannot}: it is {kind}, not a regular file")
    try:
        with Image.open(path) as image:
            why = _pil_problem(image)
            if why is None:
                return _rgb(image)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, EOFError, ... for damaged files
        raise ImageError(f"{cannot}: {exc}") from exc
    raise ImageError(f"{cannot}: it {why}")


def _as_chw(image) -> tuple[object, Tensor | None]:
    """(PIL image or None, (3, H, W) tensor or None), exactly one set, of a path or of an in-memory
    image that _check_image has passed: arrays (H, W) or (H, W, 1, 3 or 4) and (1, H, W) tensors become
    (3, H, W) tensors, PIL images RGB."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image), None
    if isinstance(image, Image.Image):
        return _rgb(image), None
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or image.shape[2] == 1:
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=2)
        rgb = np.ascontiguousarray(image[:, :, :3])
        # A read-only array (np.asarray of a PIL image, a memory map) is copied: torch shares memory with
        # the arrays it wraps and warns for one it may not write, though nothing here writes to it.
        image = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)
    return None, image.detach().cpu().expand(3, -1, -1)  # a grey (1, H, W) tensor as RGB


def is_size(size) -> bool:
    """Whether size names a resize: (H, W) or a short side, each an int >= 224 (Scorer's and
    QualityLoss's resize, past "auto" and None)."""
    sizes = [size] if is_int(size) else list(size) if isinstance(size, (tuple, list)) else []
    return len(sizes) == (1 if is_int(size) else 2) and all(is_int(v) and v >= CROP for v in sizes)


def is_data_range(value) -> bool:
    """Whether value can be a float image's data_range: a finite number > 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def target_size(h: int, w: int, size: tuple[int, int] | int) -> tuple[int, int]:
    """The (H, W) an h x w image is resized to for size: (H, W) itself, or an int: the short side, the
    aspect ratio kept, neither side under it."""
    if isinstance(size, int):
        scale = size / min(h, w)
        return max(size, round(h * scale)), max(size, round(w * scale))
    return tuple(size)

def resize_image(pil, chw: Tensor | None, size: tuple[int, int] | int):
    """(PIL image or None, (3, H, W) tensor or None), exactly one set, resized to size: (H, W), or an
    int: the short side, the aspect ratio kept. Bilinear with antialiasing (PIL's for PIL images, as
    the authors' torchvision Resize on PIL images does). ValueError for an image with no pixels."""
    h, w = (pil.height, pil.width) if pil is not None else tuple(chw.shape[1:])
    if h == 0 or w == 0:
        raise ValueError(f"lifeiqa_fast.resize_image: the image {_size_problem(h, w)}")
    size = target_size(h, w, size)
    if pil is not None:
        return pil.resize((size[1], size[0]), Image.BILINEAR), None
    x = F.interpolate(chw[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return None, (x.round().clamp(0, 255).to(torch.uint8) if chw.dtype == torch.uint8 else x)


def image_tensor(image, resize: tuple[int, int] | int | None = None) -> Tensor:
    """image (a path, PIL image, numpy array or (1 or 3, H, W) tensor) as a (3, H, W) tensor ready to crop:
    resized to resize (resize_image) if given, then enlarged if under 224 on a side (short side to
    224, aspect kept). uint8 stays uint8. ImageError for a file that cannot be read, TypeError or
    ValueError for an in-memory image that cannot be scored (_check_image)."""
    if not isinstance(image, (str, os.PathLike)):
        _check_image(image, "image")
    return _croppable(*_as_chw(image), resize)


def _croppable(pil, chw: Tensor | None, resize: tuple[int, int] | int | None) -> Tensor:
    """image_tensor of an image already through _as_chw (or load_image): exactly one of pil, chw set."""
    if resize is not None:
        pil, chw = resize_image(pil, chw, resize)
    if chw is None:
        chw = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # a copy: PIL's buffer is read-only
    if min(chw.shape[1:]) < CROP:  # too small to crop
        chw = resize_image(None, chw, CROP)[1]
    return chw


def crop_corners(height: int, width: int, crops: int | str, seed: int,
                 max_crops: int | None = None) -> list[tuple[int, int]]:
    """(top, left) of each 224 crop of an image at least 224 on each side.

    "grid": ceil(side / 224) crops per axis, evenly spaced from edge to edge (the first at 0, the last
    at side - 224), so that they cover the image: 512 x 384 -> rows 0 144 288, columns 0 160. A side of
    exactly 224 has one crop. With max_crops, an axis with more crops than the other loses one until
    rows x columns <= max_crops: the crops stay evenly spread from edge to edge but no longer cover
    the image (a 4000 x 3000 photograph: 18 x 14 = 252 crops, with max_crops=20 5 x 4).
    An int N: N crops placed as torchvision's RandomCrop does (top uniform in [0, H - 224]), drawn from
    a generator seeded with seed, so the same image always gets the same crops (max_crops unused).
    """
    if crops == "grid":
        def axis(side, n):
            return [round(i * (side - CROP) / (n - 1)) for i in range(n)] if n > 1 else [0]

        rows, columns = -(-height // CROP), -(-width // CROP)
        while max_crops is not None and rows * columns > max_crops:
            if rows >= columns:
                rows -= 1
            else:
                columns -= 1
        return [(top, left) for top in axis(height, rows) for left in axis(width, columns)]
    gen = torch.Generator().manual_seed(seed)
    tops = torch.randint(0, height - CROP + 1, (crops,), generator=gen)
    lefts = torch.randint(0, width - CROP + 1, (crops,), generator=gen)
    return list(zip(tops.tolist(), lefts.tolist()))
