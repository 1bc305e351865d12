"""Checkpoint files: load_checkpoint builds a LifeIQA from an official (or our) checkpoint, reading its
configuration from the keys and the saved config, with weights-only unpickling; save_checkpoint writes
the authors' format."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor

from .model import LifeIQA


def _checkpoint_globals() -> dict[str, object]:
    """Every global beyond torch's own that a checkpoint file may name, exactly, with what each loads as.
    The authors' checkpoints hold a numpy float64 (max_plcc, from scipy) and their yacs config: numpy's
    scalar reconstructor (its module is numpy.core in numpy 1, numpy._core in numpy 2) and numpy.dtype
    load as themselves, they build data and call nothing else; the yacs CfgNode loads as an OrderedDict,
    its items and attributes as data, so no yacs code runs. Nothing is allowed by prefix."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return {"numpy.core.multiarray.scalar": core.multiarray.scalar,
            "numpy._core.multiarray.scalar": core.multiarray.scalar,
            "numpy.dtype": np.dtype,
            "yacs.config.CfgNode": OrderedDict}


def _load_weights_only(path, map_location):
    """torch.load(weights_only=True), and if the file names globals beyond torch's own, again with those
    of _checkpoint_globals allowed; pickle.UnpicklingError naming every other global it names (a pickle
    that calls os.system, numpy.savetxt or importlib.import_module is refused, not run)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        known = _checkpoint_globals()
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not named:  # refused for another reason
            raise
        refused = [name for name in named if name not in known]
        if refused:
            raise pickle.UnpicklingError(
                f"refused: it names {', '.join(refused)}, beyond the weights, tensors, numpy scalars and yacs "
                f"config a checkpoint holds; unpickling that could run code") from None
        import numpy as np

        # numpy.dtype(...) returns an instance of a DType class (np.dtypes.Float64DType, ...), which the
        # unpickler then sets the state of: those classes too (they only make dtypes)
        dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals([(known[name], name) for name in named] + dtypes):
            return torch.load(path, map_location=map_location, weights_only=True)


def _infer_config(state_dict: Mapping[str, Tensor]) -> dict:
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("bunch_decoder.layers.")}
    experts = {int(k.split(".")[2]) for k in state_dict if k.startswith("MOE.experts.")}
    if not layers or "bunch_embedding" not in state_dict:
        raise ValueError("lifeiqa_fast.load_checkpoint: not a Life-IQA state dict (no bunch_embedding or "
                         "bunch_decoder.layers.* keys)")
    cfg = dict(depth=max(layers) + 1, num_experts=max(experts) + 1 if experts else 1,
               adjacency="learnable" if "bunch_decoder.layers.0.adj" in state_dict else "fixed")
    _, cfg["num_queries"], cfg["embed_dim"] = state_dict["bunch_embedding"].shape
    return cfg


# The LifeIQA arguments a checkpoint's own config (save_checkpoint's LIFEIQA_FAST) sets: the model's shape
# and backbone. Not pretrained, nor a timm argument naming a file or a download: a checkpoint's weights
# are its state dict, and only the caller's arguments name files.
_SAVED_ARGUMENTS = ("num_experts", "top_k", "depth", "num_queries", "embed_dim", "num_heads", "backbone",
                    "backbone_kwargs", "adjacency")
_WEIGHT_SOURCES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _saved_arguments(saved, where: str) -> dict:
    """The LifeIQA arguments of a checkpoint's LIFEIQA_FAST config, checked: ValueError naming the checkpoint
    (where) and the key for anything but _SAVED_ARGUMENTS, or a backbone_kwargs key naming weights."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"lifeiqa_fast.load_checkpoint: {where}: its config's LIFEIQA_FAST must be a mapping of "
                         f"LifeIQA arguments, got {type(saved).__name__}")
    unknown = [key for key in saved if key not in _SAVED_ARGUMENTS]
    kwargs = saved.get("backbone_kwargs") or {}
    sources = [key for key in kwargs if key in _WEIGHT_SOURCES] if isinstance(kwargs, Mapping) else []
    if unknown or sources:
        raise ValueError(
            f"lifeiqa_fast.load_checkpoint: {where}: its config's LIFEIQA_FAST holds "
            f"{', '.join(map(repr, unknown + [f'backbone_kwargs.{k}' for k in sources]))}; a checkpoint may set "
            f"only {', '.join(_SAVED_ARGUMENTS)} (never where weights come from: they are its state dict; pass "
            f"other LifeIQA arguments to load_checkpoint yourself)")
    return dict(saved)


def config_value(config: Mapping, path: str):
    """config's value at a dotted path of the authors' yacs config ("DATA.DATASET"), or None."""
    for key in path.split("."):
        config = config.get(key) if isinstance(config, Mapping) else None
    return config


def _why_unreadable(path: str, exc: Exception) -> str:
    """What a file that torch.load refused looks like, for an error message a user can act on (torch's own
    message can be a bare number: a text file gives "101")."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        what = "a zip archive, as torch.save writes, but damaged or cut short"
    elif head.startswith(b"\x80"):
        what = "a pickle, but damaged or cut short"
    elif head[:1] == b"{" or head[8:9] == b"{":
        what = "possibly a safetensors or JSON file, not a torch.save file"
    else:
        what = "not a torch.save file (neither a zip archive nor a pickle)"
    return f"{what} ({type(exc).__name__}: {exc})"


def load_checkpoint(path_or_dict, map_location="cpu", **overrides) -> LifeIQA:
    """Build a LifeIQA from an official checkpoint and load its weights strictly.

    path_or_dict: a file saved by the authors' code ({'model': state_dict, 'optimizer': ..., ...}), a
    bare state dict, or either already loaded. num_experts, depth, num_queries and embed_dim are read
    from the keys, top_k from the authors' config saved beside them (MODEL.SWIN.TOP_K; default 2);
    any LifeIQA argument can be overridden; a file written by save_checkpoint also carries the
    LifeIQA arguments it was built with (backbone included). The saved config, as nested dicts ({}
    if none), is kept as model.checkpoint_config (the Scorer reads its DATA.DATASET). Files load with
    weights_only=True plus exactly the numpy and yacs globals of the authors' files
    (_checkpoint_globals): a file naming any other global is refused, naming it. The saved config sets
    only the model's shape and backbone (_saved_arguments), never a file to read. A key mismatch
    raises an error listing the missing and unexpected keys.
    """
    if isinstance(path_or_dict, Mapping):
        checkpoint, where = path_or_dict, "the checkpoint given"
    else:
        path = os.fspath(path_or_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"lifeiqa_fast.load_checkpoint: no checkpoint file at {path}")
        where = f"checkpoint {path}"
        try:
            checkpoint = _load_weights_only(path, map_location)
        except Exception as exc:
            raise ValueError(f"lifeiqa_fast.load_checkpoint: cannot read {path} as a torch checkpoint (a file "
                             f"written by torch.save, as the authors' training writes them): {_why_unreadable(path, exc)}"
                             ) from exc
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping):
        raise ValueError("lifeiqa_fast.load_checkpoint: expected a state dict or a dict with a 'model' state dict")
    saved = checkpoint.get("config") if "model" in checkpoint else None
    saved = saved if isinstance(saved, Mapping) else {}
    top_k = config_value(saved, "MODEL.SWIN.TOP_K")
    ours = _saved_arguments(config_value(saved, "LIFEIQA_FAST") or {}, where)
    config = {**_infer_config(state_dict), **({"top_k": int(top_k)} if top_k else {}), **ours, **overrides}
    try:
        model = LifeIQA(**config)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"lifeiqa_fast.load_checkpoint: {where}: LifeIQA({config}): {exc}") from exc
    model.checkpoint_config = saved
    # A state dict records the head's sizes (read above) but not which backbone made its stage maps.
    hint = "" if "backbone" in config else (
        "\n  If the model was trained with another backbone than Swin-B, name it: load_checkpoint(..., "
        "backbone=\"resnet50\") (any timm name; a bare state dict or the authors' config does not record it)")
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # a size mismatch
        raise ValueError(f"lifeiqa_fast.load_checkpoint: {where} does not match LifeIQA({config}): {exc}{hint}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"lifeiqa_fast.load_checkpoint: {where} does not match LifeIQA({config}):\n"
            f"  missing keys ({len(result.missing_keys)}): {result.missing_keys}\n"
            f"  unexpected keys ({len(result.unexpected_keys)}): {result.unexpected_keys}{hint}"
        )
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model



def save_checkpoint(model: LifeIQA, path, **extra) -> None:
    """Write model (a LifeIQA, or one wrapped by torch.compile or DistributedDataParallel) in the
    authors' checkpoint format, atomically (a temporary file, then a rename):
    {'model': state dict, 'config': {'MODEL': {'SWIN': {'NUM_EXPERTS', 'TOP_K', 'DEPTH', 'EMBED_DIM',
    'JUERY_NUMS'}}, 'LIFEIQA_FAST': model.config}, **extra} (extra: 'optimizer', 'lr_scheduler',
    'epoch', 'max_plcc', ...; a 'config' mapping there is merged). load_checkpoint rebuilds the
    model from it, backbone included; the authors' code reads its 'model'."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel's
    c = model.config
    swin = dict(NUM_EXPERTS=c["num_experts"], TOP_K=c["top_k"], DEPTH=c["depth"], EMBED_DIM=c["embed_dim"],
                JUERY_NUMS=c["num_queries"])
    given = dict(extra.pop("config", None) or {})
    config = {**given, "MODEL": {**dict(given.get("MODEL", {})), "SWIN": swin}, "LIFEIQA_FAST": dict(c)}
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save({"model": model.state_dict(), "config": config, **extra}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
