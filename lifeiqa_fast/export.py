"""ONNX export of a Life-IQA model: one .onnx file that turns 224 x 224 crops into scores, for ONNX
Runtime and other ONNX consumers (lifeiqa_fast.export_onnx).

The model is exported through its composite head (impl="composite": ATen ops only, no host
synchronisation, static shapes), which torch.onnx's dynamo exporter traces whole; the native and Triton
kernels are custom ops that ONNX has no counterpart for. The file holds the ImageNet normalisation, so
its input is plain RGB in [0, 1], and says in its metadata what a score means (lifeiqa_fast.scale).
onnx, onnxscript and onnxruntime are imported only here, when used (the [onnx] extra).
"""
from __future__ import annotations

import copy
import json
import os
import pathlib

import torch
from torch import Tensor, nn

from ._optional import require
from ._version import __version__
from .convert import optimize
from .pretrained import _preprocessing, load_model
from .scale import scale_of_model
from .images import CROP, MEAN, STD

# The lowest opset torch.onnx's dynamo exporter writes (its torchlib functions are opset 18).
MIN_OPSET = 18
INPUT_CONTRACT = (f"crops: (B, 3, {CROP}, {CROP}) float32, RGB in [0, 1], not normalised (the file normalises "
                  f"with ImageNet mean {MEAN} and std {STD}); scores: (B,) float32, one per crop, on the "
                  f"scale of lifeiqa_fast.score_scale (an image's score: the mean over its crops, as "
                  f"lifeiqa_fast.Scorer takes it)")


class ScoreCrops(nn.Module):
    """What the ONNX file computes: crops (B, 3, 224, 224) float32 RGB in [0, 1] -> scores (B,) float32,
    model((crops - MEAN) / STD)[0], as lifeiqa_fast.Scorer normalises."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, crops: Tensor) -> Tensor:
        return self.model((crops - self.mean) / self.std)[0].view(-1)  # (B,)


def _load(model) -> nn.Module:
    """The module to export: model itself, or the model that a checkpoint file, a save_pretrained
    folder or a Hub repo id names (lifeiqa_fast.pretrained.load_model)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, map_location="cpu")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lifeiqa_fast.export_onnx: model must be a torch.nn.Module, a checkpoint path, a "
                        f"save_pretrained folder or a Hub repo id, got {type(model).__name__}")
    return model


def export_onnx(model, path, batch="dynamic", opset: int | None = None) -> pathlib.Path:
    """Write a Life-IQA model to `path` as one ONNX file and return its path.

    model: a LifeIQA, a module with the authors' layout (lifeiqa_fast.optimize's model argument), a
    checkpoint path, a save_pretrained folder or a Hub repo id. It is deep-copied and the copy switched to the composite head, eval mode, float32,
    CPU; the caller's model is not changed. The file's input "crops" is (B, 3, 224, 224) float32 RGB in
    [0, 1] (not normalised: the file applies ImageNet's mean and std), its output "scores" (B,) float32.
    batch: "dynamic" (any B >= 1) or a positive int B (ONNX Runtime then refuses another batch size).
    opset: the ONNX opset, None for the exporter's default (at least 18).

    The file's metadata_props hold lifeiqa_fast.score_scale (ScoreScale.as_dict() as JSON: the
    training dataset, label, range and direction of the scores), lifeiqa_fast.input (the input contract
    above), lifeiqa_fast.preprocessing (what an image goes through before its crops: resize, crop size,
    normalisation, as save_pretrained's config.json), lifeiqa_fast.config (LifeIQA's arguments, if the
    model has them) and lifeiqa_fast.version.
    Weights are stored inside the file (Swin-B: 387 MiB); above 1.5 GB the exporter writes them to
    <path>.data beside it. The result passes onnx.checker.
    """
    if batch != "dynamic" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"lifeiqa_fast.export_onnx: batch must be 'dynamic' or a positive int, got {batch!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        raise ValueError(f"lifeiqa_fast.export_onnx: opset must be None (the exporter's default) or an int >= "
                         f"{MIN_OPSET} (the lowest torch.onnx's dynamo exporter writes), got {opset!r}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"lifeiqa_fast.export_onnx: path must name a file, got the folder {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"lifeiqa_fast.export_onnx: the folder of path does not exist: {path.parent} "
                                f"(create it first)")
    feature = "lifeiqa_fast.export_onnx"
    onnx = require("onnx", "onnx", "onnx", feature)
    require("onnxscript", "onnxscript", "onnx", feature)  # torch.onnx's dynamo exporter translates with it

    model = _load(model)
    scale = scale_of_model(model)
    config = getattr(model, "config", None)
    fast = optimize(copy.deepcopy(model), "composite").eval().float().to("cpu")
    wrapper = ScoreCrops(fast).eval()
    example = torch.rand(2 if batch == "dynamic" else batch, 3, CROP, CROP)
    # min=1: the graph must hold for one crop too; torch.export otherwise assumes B >= 2, and a branch on
    # B == 1 would go unnoticed instead of failing the export
    dynamic = {"crops": {0: torch.export.Dim("batch", min=1)}} if batch == "dynamic" else None
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["crops"], output_names=["scores"],
                                    dynamic_shapes=dynamic, opset_version=opset, verbose=False)
    program.model.metadata_props.update({
        "lifeiqa_fast.score_scale": json.dumps(scale.as_dict()),
        "lifeiqa_fast.input": INPUT_CONTRACT,
        "lifeiqa_fast.preprocessing": json.dumps(_preprocessing(model, scale.dataset)),
        "lifeiqa_fast.version": __version__,
        **({"lifeiqa_fast.config": json.dumps(config, default=str)} if isinstance(config, dict) else {}),
    })
    program.save(path, external_data=False)
    onnx.checker.check_model(os.fspath(path))  # by path: reads a <path>.data of large weights too
    return path


def onnx_session(path, threads: int | None = None):
    """An onnxruntime.InferenceSession of an exported file on the CPU (CPUExecutionProvider); threads:
    its intra-op threads, None for onnxruntime's default (one per physical core)."""
    ort = require("onnxruntime", "onnxruntime", "onnx", "lifeiqa_fast.onnx_session")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def onnx_scores(session_or_path, crops):
    """Scores (B,) float32 numpy of crops (B, 3, 224, 224), a float numpy array or tensor, RGB in [0, 1],
    run by an exported file in ONNX Runtime on the CPU: a session from onnx_session, or a file's path
    (a session is made for this call)."""
    import numpy as np

    tensor = isinstance(crops, Tensor)
    crops = crops if tensor else np.asarray(crops)
    floating = crops.is_floating_point() if tensor else crops.dtype.kind == "f"
    if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, CROP, CROP) or not floating:
        raise ValueError(f"lifeiqa_fast.onnx_scores: crops must be a float array of shape (B, 3, {CROP}, {CROP}), "
                         f"RGB in [0, 1], got {crops.dtype} {tuple(crops.shape)}")
    # float32, contiguous, on the CPU: no copy when it already is
    crops = crops.detach().to("cpu", torch.float32).contiguous().numpy() if tensor else np.ascontiguousarray(
        crops, dtype=np.float32)
    is_path = isinstance(session_or_path, (str, os.PathLike))
    session = onnx_session(session_or_path) if is_path else session_or_path
    return session.run(["scores"], {"crops": crops})[0]


__all__ = ["INPUT_CONTRACT", "ScoreCrops", "export_onnx", "onnx_scores", "onnx_session"]
