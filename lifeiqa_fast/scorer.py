"""Scorer: quality scores for images with a Life-IQA model, fast (lifeiqa_fast.Scorer).

An image is turned into 224 x 224 crops (a deterministic grid covering it, or the authors' test
protocol: N random crops, seeded), the crops of many images are batched through the optimised
model, and each image's score is the mean over its crops.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import config_value
from .convert import optimize
from .images import (CROP, MAX_CROPS, MEAN, RESIZED_DATASETS, STD, ImageError, _as_chw, _check_batch, _check_image,
                     _croppable, _unit_range, crop_corners, find_images, is_data_range, is_size, load_image,
                     resize_image)
from .pretrained import load_model
from .scale import DATASET_SCALES, ScoreScale, dataset_of, scale_of

DECODE_THREADS = min(4, os.cpu_count() or 1)  # files decoded ahead of the model, 2 per thread at most
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class FileScore:
    """One file's result: its score, or why it has none."""

    path: Path
    score: float | None
    error: str | None = None


def auto_resize(model: nn.Module, dataset: str | None, who: str = "lifeiqa_fast.Scorer"):
    """resize="auto" for a model trained on dataset: what its training used (its checkpoint config's
    DATA.RESIZE, written by lifeiqa_fast.train), else the authors' protocol for the dataset ((512, 384)
    for KonIQ and SPAQ), else None; a warning when the dataset is not known (a resize may be needed
    that nobody recorded)."""
    trained = config_value(getattr(model, "checkpoint_config", {}), "DATA.RESIZE")
    if trained is not None:
        return None if trained == "none" else trained
    if dataset is None:
        warnings.warn(f"{who}: the model records no training dataset, so resize='auto' does not resize (a KonIQ "
                      f"or SPAQ model expects its images resized to 512 x 384 first); pass dataset= or resize= to say "
                      f"which", stacklevel=3)
    return RESIZED_DATASETS.get(dataset)


def _default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (else fp16) and on CPUs with native bf16 (AVX512-BF16 or AMX) where
    it is about twice as fast as fp32 (benchmarks/results/, scorer rows); fp32 elsewhere."""
    if device.type == "cuda":  # native bf16 from Ampere (sm_80) on; older GPUs would emulate it
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return torch.float32


class GraphCaptureError(RuntimeError):
    """The model cannot run as a CUDA graph."""


class CudaGraph:
    """fn replayed as one CUDA graph for one set of input shapes: warmed up on a side stream, then
    captured. fn takes tensors and returns a tensor or a tuple of them. Raises GraphCaptureError if fn
    cannot be captured (a host sync in it, for one)."""

    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], *examples: Tensor):
        self.inputs = tuple(x.clone() for x in examples)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # lazy inits, cached folded weights, kernel selection: none may be captured
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.output = fn(*self.inputs)
        except RuntimeError as exc:
            raise GraphCaptureError(str(exc)) from exc

    def __call__(self, *xs: Tensor) -> Tensor | tuple[Tensor, ...]:
        for static, x in zip(self.inputs, xs, strict=True):
            static.copy_(x)
        self.graph.replay()
        # clones: the next replay overwrites self.output
        return tuple(o.clone() for o in self.output) if isinstance(self.output, tuple) else self.output.clone()


class Scorer:
    """Scores images with a Life-IQA model: one float per image, the mean over its 224 crops.

    Args:
        model: a LifeIQA, a module with the authors' layout, or a checkpoint path (load_checkpoint,
            with model_kwargs). A module is copied: the caller's model is left as it is.
        device: "cpu", "cuda", ...; None: CUDA when available, else CPU.
        dtype: "auto" (bf16 on GPUs, fp16 on GPUs without bf16, bf16 on CPUs with native bf16
            support, else fp32), or "fp32", "bf16", "fp16" (fp16 on CUDA only). The whole model runs
            in it; see README for the score deviation from fp32.
        batch_size: crops per forward pass.
        crops: "grid" (default: a deterministic grid of crops spread evenly over the image, at most
            max_crops of them, see crop_corners), "official" (the authors' test protocol, the way to
            reproduce the paper's numbers: PATCH_NUM random crops for the model's dataset, seeded with
            seed, in fp32 (dtype "auto" or "fp32"), resized as the authors do (resize "auto")), or an int
            N (N random crops, seeded: the same image always gets the same crops).
        max_crops: the most crops of a grid (default MAX_CROPS = 20; None: a grid covering the image,
            252 crops for a 4000 x 3000 photograph).
        resize: (H, W) to resize every image to before cropping, or an int: its short side, the
            aspect ratio kept; "auto": what the checkpoint was trained with (its config's DATA.RESIZE,
            written by lifeiqa_fast.train), else (512, 384) when its dataset is KonIQ or SPAQ (the
            authors' protocol for them), else none, with a warning when the model records no dataset
            (it may need a resize nobody knows of); None: never. Images under 224 on a side are
            enlarged to 224 there, keeping the aspect ratio.
        dataset: the model's training set (lifeiqa_fast.scale.DATASET_SCALES), for a model that does
            not record it (a bare state dict, a module built in Python); it sets the score scale, the
            "auto" resize and the "official" crops. None: what the model records.
        normalize: return scores mapped to [0, 1], 1 the best (ScoreScale.normalize); needs a known
            scale. Raw scores are on the training set's label scale (scorer.scale says which).
        data_range: the values of a float image in memory span [0, data_range] (default 1.0; 255 for
            float images in 0..255). A float image outside it raises ValueError: scored as it is, it
            would give garbage. uint8 images are 0..255 whatever it is.
        errors: what an unreadable file gets: "nan" (default: a NaN score and a warning naming the
            file and why, so that one damaged file in a folder of thousands does not cost the others'
            scores; score_files reports why per file) or "raise" (ImageError at the first one).
        cuda_graphs: on CUDA, replay the model as a CUDA graph (captured on first use, batches padded
            to batch_size); where it cannot be captured, a warning and eager runs.
        compile: torch.compile the model (on CPU with weight freezing, which lets inductor prepack
            the oneDNN weights); a one-time compile (~10-45 s for Swin-B on 2 CPU cores), and batches
            are padded to batch_size so that one shape is compiled. It gains little on a CPU (the
            Benchmarks section of README.md has the figures).
        impl: the head's ops (see lifeiqa_fast.ops). progress: a progress bar over images.

    scorer(images) takes an image tensor batch (B, C, H, W) or one image (C, H, W) (C = 3 RGB or 1 grey,
    float in [0, data_range] or uint8, not normalised), or a list of tensors, PIL images, numpy arrays
    (H, W[, 1 or 3]) and paths, or a path, folder or glob; returns a float32 tensor of one score per
    image, on the input's device for a tensor input, else on the CPU. A file that cannot be read
    (find_images, load_image) gets NaN and a warning naming it (or raises, errors="raise"). An in-memory
    image that cannot be scored as it is (float outside [0, data_range], no pixels, a wrong shape or
    dtype) raises ValueError or TypeError naming it, images[i], before any image is scored: a bug in
    the caller. scorer.scale (and scorer.dataset, .score_range, .lower_better) says what a score means.
    """

    def __init__(self, model: nn.Module | str | os.PathLike, device=None, dtype="auto", batch_size: int = 32,
                 crops: int | str = "grid", seed: int = 0, resize="auto", cuda_graphs: bool = True,
                 compile: bool = False, impl: str = "auto", progress: bool = False, model_kwargs: dict | None = None,
                 dataset: str | None = None, normalize: bool = False, max_crops: int | None = MAX_CROPS,
                 data_range: float = 1.0, errors: str = "nan"):
        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not positive_int(batch_size):
            raise ValueError(f"lifeiqa_fast.Scorer: batch_size must be a positive int, got {batch_size!r}")
        if crops not in ("grid", "official") and not positive_int(crops):
            raise ValueError(f"lifeiqa_fast.Scorer: crops must be 'grid', 'official' or a positive int, got {crops!r}")
        if max_crops is not None and not positive_int(max_crops):
            raise ValueError(f"lifeiqa_fast.Scorer: max_crops must be a positive int or None, got {max_crops!r}")
        if not is_data_range(data_range):
            raise ValueError(f"lifeiqa_fast.Scorer: data_range must be a positive number (1.0 for images in [0, 1], "
                             f"255 for 0..255), got {data_range!r}")
        if errors not in ("nan", "raise"):
            raise ValueError(f"lifeiqa_fast.Scorer: errors must be 'nan' or 'raise', got {errors!r}")
        if dataset is not None and str(dataset).lower() not in DATASET_SCALES:
            raise ValueError(f"lifeiqa_fast.Scorer: dataset must be one of {', '.join(DATASET_SCALES)} or None, "
                             f"got {dataset!r}")
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"lifeiqa_fast.Scorer: device {str(self.device)!r} asked for, but no CUDA device is "
                             f"available")
        if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"lifeiqa_fast.Scorer: dtype must be 'auto', one of {sorted(DTYPES)} or a torch "
                             f"dtype, got {dtype!r}")
        if crops == "official" and dtype == "auto":
            dtype = "fp32"  # the authors' protocol: their test runs in fp32
        self.dtype = _default_dtype(self.device) if dtype == "auto" else DTYPES.get(dtype, dtype)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"lifeiqa_fast.Scorer: dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if self.dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("lifeiqa_fast.Scorer: dtype fp16 is for CUDA; on CPU use bf16 or fp32")
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, map_location="cpu", **(model_kwargs or {}))
        elif isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        else:
            raise TypeError(f"lifeiqa_fast.Scorer: model must be a module, a checkpoint path, a save_pretrained "
                            f"folder or a Hugging Face Hub repo id, got {type(model).__name__}")
        self.scale: ScoreScale = scale_of(dataset if dataset is not None else dataset_of(model))
        if normalize and not self.scale.known:
            raise ValueError(f"lifeiqa_fast.Scorer: normalize=True needs the model's score scale, which is unknown "
                             f"({self.scale.definition}); pass dataset=")
        if crops == "official":
            crops, resize = self._official(model, dtype, resize)
        if resize == "auto":
            resize = auto_resize(model, self.dataset)
        if resize is not None and not is_size(resize):
            raise ValueError(f"lifeiqa_fast.Scorer: resize must be 'auto', None, (H, W) or a short side, each >= "
                             f"{CROP}, got {resize!r}")
        self.resize = tuple(resize) if isinstance(resize, (tuple, list)) else resize
        self.model = optimize(model, impl).eval().requires_grad_(False).to(self.device, self.dtype)
        self.batch_size, self.crops, self.seed, self.progress = batch_size, crops, seed, progress
        self.max_crops, self.normalize, self.data_range, self.errors = max_crops, normalize, data_range, errors
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.compiled = compile
        self._forward = self.model
        if compile:  # freezing: the weights become constants, which lets inductor prepack them for oneDNN
            options = {"freezing": True} if self.device.type == "cpu" else None
            self._forward = torch.compile(self.model, fullgraph=True, options=options)
        self._graph: CudaGraph | None = None
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    @property
    def dataset(self) -> str | None:
        """The model's training set (None: not recorded): its labels' scale is scorer.scale."""
        return self.scale.dataset

    @property
    def score_range(self) -> tuple[float, float] | None:
        """(low, high) of the training set's label scale; None if unknown; (0, 1) with normalize."""
        return (0.0, 1.0) if self.normalize else self.scale.score_range

    @property
    def lower_better(self) -> bool | None:
        """Whether a lower score is a better image (DMOS labels); None if unknown; False with normalize."""
        return False if self.normalize else self.scale.lower_better

    def _official(self, model: nn.Module, dtype, resize) -> tuple[int, str]:
        """(crops, resize) of the authors' test protocol for the model's dataset: its PATCH_NUM (the
        checkpoint's DATA.PATCH_NUM, else the dataset's preset), resize "auto". ValueError if the dataset
        is unknown or dtype or resize asks for something else."""
        from .train import PRESETS  # (train imports this module)

        if self.dataset not in PRESETS:
            raise ValueError(f"lifeiqa_fast.Scorer: crops='official' is the authors' protocol for the model's dataset, "
                             f"which is {'not recorded' if self.dataset is None else 'unknown: ' + self.dataset}; "
                             f"pass dataset= (one of {', '.join(PRESETS)})")
        if self.dtype != torch.float32 or resize != "auto":
            raise ValueError(f"lifeiqa_fast.Scorer: crops='official' runs in fp32 with the authors' resize "
                             f"(dtype 'auto' or 'fp32', resize 'auto'), got dtype={dtype!r}, resize={resize!r}")
        patch_num = config_value(getattr(model, "checkpoint_config", {}), "DATA.PATCH_NUM")
        return int(patch_num or PRESETS[self.dataset]["patch_num"]), resize

    def _scores(self, x: Tensor) -> Tensor:
        """(n, 3, 224, 224) crops in [0, 1], float32 -> (n,) float32 scores."""
        x = ((x - self._mean) / self._std).to(self.dtype)
        return self._forward(x)[0].view(-1).float()

    def _run(self, batch: Tensor) -> Tensor:
        """Scores of a batch of crops already on the device."""
        n = batch.shape[0]
        if not (self.compiled or self.cuda_graphs):
            return self._scores(batch)
        # one shape: the last batch padded to batch_size (one compile; one graph and its memory pool)
        padded = F.pad(batch, (0, 0, 0, 0, 0, 0, 0, self.batch_size - n))
        if self.compiled:
            return self._scores(padded)[:n]
        with torch.cuda.device(self.device):
            if self._graph is None:
                try:
                    self._graph = CudaGraph(self._scores, padded)
                except GraphCaptureError as exc:
                    warnings.warn(f"lifeiqa_fast.Scorer: the model cannot run as a CUDA graph, running it eagerly "
                                  f"(impl={self.model.impl!r}; the reference ops, which impl='auto' runs on GPUs "
                                  f"until the kernels are validated there, synchronise with the host): {exc}")
                    self.cuda_graphs = False
                    return self._scores(batch)
            return self._graph(padded)[:n]

    def _crops(self, pil, chw: Tensor | None, resize) -> Tensor:
        """One image's crops, (n, 3, 224, 224), uint8 or float32 in [0, 1], on the CPU: of the PIL image
        pil or the (3, H, W) tensor chw (exactly one set, as _as_chw gives), resized to resize first."""
        chw = _croppable(pil, chw, resize)
        if chw.is_floating_point():
            chw = chw.float()
        h, w = chw.shape[1:]
        corners = crop_corners(h, w, self.crops, self.seed, self.max_crops)
        return torch.stack([chw[:, t:t + CROP, l:l + CROP] for t, l in corners])

    def _prepared(self, images: list) -> Iterator[tuple[Tensor | None, str | None]]:
        """(crops, None) or (None, why) per image, in order. Files are decoded (and resized) by worker
        threads ahead, in PIL only: a thread that ran ATen's parallel ops would start an OpenMP team of
        its own, whose spinning threads slowed the model's down by 12-55% per batch on 2 cores."""
        def decode(path):
            try:
                image = load_image(path)
                return (resize_image(image, None, self.resize)[0] if self.resize else image), None
            except ImageError as exc:
                return None, str(exc)

        pool = ThreadPoolExecutor(max_workers=DECODE_THREADS)
        try:
            pending = deque()

            def ready():
                item = pending.popleft()
                if not isinstance(item, Future):  # an in-memory image, already checked (_check_image)
                    return self._crops(*_as_chw(item), self.resize), None
                image, error = item.result()  # decoded to RGB and resized by decode
                return (None, error) if error else (self._crops(image, None, None), None)

            for image in images:
                pending.append(pool.submit(decode, image) if isinstance(image, (str, os.PathLike)) else image)
                if len(pending) > 2 * DECODE_THREADS:
                    yield ready()
            while pending:
                yield ready()
        finally:  # on an error or an interrupt, the decodes still queued are dropped, not waited for
            pool.shutdown(wait=False, cancel_futures=True)

    @torch.inference_mode()
    def _score_list(self, images: list) -> tuple[Tensor, list[str | None]]:
        """Mean crop score per image ((N,) float32, NaN for an image that could not be read) and the
        error of each. Crops of consecutive images share batches of exactly batch_size (the last
        may be smaller); the scores stay on the device until the end (this adds no host sync per batch)."""
        from tqdm.auto import tqdm

        errors: list[str | None] = [None] * len(images)
        scores, owners = [], []  # per batch: (n,) scores on the device, (n,) image index on the CPU
        crops, index = [], []  # crops waiting for a batch

        def run(final: bool):
            nonlocal crops, index
            as_float = any(c.is_floating_point() for c in crops)
            pending = torch.cat([c.float() / 255 if as_float and not c.is_floating_point() else c for c in crops])
            pending_index = torch.cat(index)
            end = pending.shape[0] if final else pending.shape[0] // self.batch_size * self.batch_size
            for start in range(0, end, self.batch_size):
                batch = pending[start:start + self.batch_size]
                if self.device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(self.device, non_blocking=True)
                scores.append(self._run(batch if as_float else batch.float() / 255))
                owners.append(pending_index[start:start + self.batch_size])
            crops, index = [pending[end:]], [pending_index[end:]]

        with tqdm(total=len(images), unit="img", disable=not self.progress, desc="scoring") as bar:
            for i, (image_crops, error) in enumerate(self._prepared(images)):
                if error is not None and self.errors == "raise":
                    raise ImageError(error)
                errors[i] = error
                if error is None:
                    crops.append(image_crops)
                    index.append(torch.full((image_crops.shape[0],), i))
                    if sum(c.shape[0] for c in crops) >= self.batch_size:
                        run(final=False)
                bar.update(1)
            if crops and sum(c.shape[0] for c in crops):
                run(final=True)
        sums = torch.zeros(len(images), dtype=torch.float64)
        counts = torch.zeros(len(images), dtype=torch.float64)
        if scores:
            owner = torch.cat(owners)
            sums.index_add_(0, owner, torch.cat(scores).cpu().double())
            counts.index_add_(0, owner, torch.ones_like(owner, dtype=torch.float64))
        scores = (sums / counts).float()
        return (self.scale.normalize(scores) if self.normalize else scores), errors

    def score_files(self, paths) -> list[FileScore]:
        """Each file of paths (files, folders, globs: find_images) with its score or why it has none
        (errors="raise": ImageError at the first unreadable file)."""
        files = find_images(paths)
        scores, errors = self._score_list(files)
        return [FileScore(p, None if e else float(s), e) for p, s, e in zip(files, scores.tolist(), errors)]

    def __call__(self, images) -> Tensor:
        output_device = images.device if isinstance(images, Tensor) else torch.device("cpu")
        batch = isinstance(images, Tensor) and images.dim() == 4
        if batch:
            _check_batch(images, self.data_range)
            images = list(images)
        named = ([(f"images[{i}]", image) for i, image in enumerate(images)] if isinstance(images, (list, tuple))
                 else [("images", images)])
        # paths, folders and globs expand to their files (a missing one raises FileNotFoundError); the
        # in-memory images are checked here, all before any is scored
        images = []
        for name, image in named:
            if isinstance(image, (str, os.PathLike)):
                images += find_images(image)
            else:
                if not batch:  # a batch's images were checked together
                    _check_image(image, name, self.data_range)
                images.append(_unit_range(image, self.data_range))
        if not images:
            raise ValueError("lifeiqa_fast.Scorer: no images given")
        scores, errors = self._score_list(list(images))
        for error in filter(None, errors):
            warnings.warn(f"{error}; its score is NaN", stacklevel=2)
        return scores.to(output_device)
