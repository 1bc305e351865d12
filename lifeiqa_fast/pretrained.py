"""Models that travel: save_pretrained(model, dir) and from_pretrained(dir or Hugging Face repo id).

A pretrained directory holds two files:
  model.safetensors  the weights (safetensors: no code runs on loading, and the file is memory-mapped)
  config.json        every LifeIQA constructor argument, the training dataset and its score scale, and
                     the preprocessing the model expects (resize, crop size, normalisation, test crops)
config.json is written last, so a directory that has it is complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from safetensors import torch as storage
from torch import nn

from ._optional import require
from ._version import __version__
from .scale import dataset_of, scale_of

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
ALIASES = "lifeiqa_fast.aliases"  # the weights file's metadata key: {state-dict name: the name it is stored under}
FORMAT = "lifeiqa_fast/pretrained-1"


def _preprocessing(model: nn.Module, dataset: str | None) -> dict:
    """What a model expects of an image: the resize its training used (its checkpoint config's
    DATA.RESIZE, else the authors' protocol for its dataset), the crops, the normalisation."""
    from .checkpoint import config_value
    from .images import CROP, MEAN, RESIZED_DATASETS, STD
    from .train import PRESETS

    saved = getattr(model, "checkpoint_config", None) or {}
    resize = config_value(saved, "DATA.RESIZE")
    if resize is None:
        resize = RESIZED_DATASETS.get(dataset)
    patch_num = config_value(saved, "DATA.PATCH_NUM") or PRESETS.get(dataset, {}).get("patch_num")
    return {"input": "RGB, values in [0, 1] (uint8 / 255)", "resize": None if resize in (None, "none") else resize,
            "crop_size": CROP, "mean": list(MEAN), "std": list(STD),
            "official_test_crops": int(patch_num) if patch_num else None}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, dataset: str | None = None) -> Path:
    """Write model (a LifeIQA, or one wrapped by torch.compile or DistributedDataParallel) to directory
    as model.safetensors and config.json (see the module's docstring); returns the directory. dataset
    names its training set when the model does not record it (a model loaded from a checkpoint of
    lifeiqa_fast.train, of the authors' code with its config, or from_pretrained does). The directory is
    created; files of an earlier save are replaced, each by a rename (an interrupted save leaves the
    old file or the new one, never half of one)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    if not isinstance(getattr(model, "config", None), Mapping) or "backbone" not in model.config:
        raise TypeError(f"lifeiqa_fast.save_pretrained: model must be a lifeiqa_fast.LifeIQA (it records its "
                        f"constructor arguments), got {type(model).__name__}")
    dataset = str(dataset).lower() if dataset else dataset_of(model)
    config = {"format": FORMAT, "lifeiqa_fast_version": __version__, "model": _json_ready(model.config),
              "dataset": dataset, "score_scale": scale_of(dataset).as_dict(),
              "preprocessing": _preprocessing(model, dataset)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        tensors, aliases = _unshared(model.state_dict())
        storage.save_file(tensors, os.path.join(tmp, WEIGHTS_NAME),
                          metadata={"format": "pt", ALIASES: json.dumps(aliases)})
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
        os.replace(os.path.join(tmp, WEIGHTS_NAME), directory / WEIGHTS_NAME)
        os.replace(os.path.join(tmp, CONFIG_NAME), directory / CONFIG_NAME)
    return directory


def _unshared(state: Mapping) -> tuple[dict, dict]:
    """(tensors, aliases) of a state dict: each tensor once, contiguous (safetensors stores no views;
    a CNN backbone's weights are channels_last), and {name: the kept name} for each name of a tensor
    already kept (backbone_stages.* are pretrain_model's own modules, their keys a second name each)."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key], tensors[name] = name, t.contiguous()
    return tensors, aliases


def _json_ready(value):
    """value with tuples as lists (timm's backbone_kwargs hold tuples; JSON has lists)."""
    if isinstance(value, Mapping):
        return {k: _json_ready(v) for k, v in value.items()}
    return [_json_ready(v) for v in value] if isinstance(value, (tuple, list)) else value


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".pkl")  # a file's name, never a repo id


def is_repo_id(name: str) -> bool:
    """Whether name reads as a Hugging Face Hub repo id ("owner/name"), not a local path: two parts,
    nothing of that name here, no checkpoint file suffix."""
    parts = str(name).split("/")
    return (len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))
            and not str(name).lower().endswith(CHECKPOINT_SUFFIXES) and not os.path.exists(name))


def resolve(name_or_dir: str | os.PathLike, revision: str | None = None, cache_dir=None) -> Path:
    """The local directory of a pretrained model: name_or_dir itself, or a Hub repo's snapshot (its
    config.json and model.safetensors only), downloaded or, with HF_HUB_OFFLINE=1, from the cache."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if not is_repo_id(os.fspath(name_or_dir)):
        raise FileNotFoundError(f"lifeiqa_fast.from_pretrained: {name_or_dir} is neither a folder nor a Hugging Face "
                                f"Hub repo id (owner/name)")
    hub = require("huggingface_hub", "huggingface_hub", "hub", "Loading a model from the Hugging Face Hub")
    try:
        return Path(hub.snapshot_download(os.fspath(name_or_dir), revision=revision, cache_dir=cache_dir,
                                          allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as exc:  # offline and not cached, no such repo, no network, ...
        offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise FileNotFoundError(f"lifeiqa_fast.from_pretrained: no local folder {name_or_dir}, and cannot get it "
                                f"from the Hugging Face Hub{offline}: {type(exc).__name__}: {exc}") from exc


def read_config(directory: str | os.PathLike) -> dict:
    """A pretrained directory's config.json, checked: ValueError naming the file and what is wrong."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"lifeiqa_fast.from_pretrained: {directory} has no {CONFIG_NAME}: not a "
                                f"save_pretrained folder (or one whose save did not finish)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"lifeiqa_fast.from_pretrained: {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise ValueError(f"lifeiqa_fast.from_pretrained: {path} is not a lifeiqa_fast config (its 'format' must be "
                         f"{FORMAT!r} and its 'model' the LifeIQA arguments)")
    return config


def from_pretrained(name_or_dir: str | os.PathLike, revision: str | None = None, cache_dir=None,
                    map_location="cpu", **overrides):
    """The LifeIQA saved by save_pretrained in a local directory, or in a Hugging Face Hub repo
    (name_or_dir "owner/name"; huggingface_hub needed; HF_HUB_OFFLINE=1 reads the local cache only).
    overrides: LifeIQA arguments to change (impl, ...). The weights load strictly; config.json may set
    the model's shape and backbone only, never a file to read (as load_checkpoint's configs).
    model.checkpoint_config records the dataset and resize for Scorer, model.pretrained_config the file."""
    from .checkpoint import _saved_arguments
    from .model import LifeIQA

    directory = resolve(name_or_dir, revision, cache_dir)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"lifeiqa_fast.from_pretrained: {directory} has no {WEIGHTS_NAME}")
    arguments = {**_saved_arguments(config["model"], f"{directory / CONFIG_NAME}"), **overrides}
    try:
        model = LifeIQA(**arguments)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"lifeiqa_fast.from_pretrained: {directory}: LifeIQA({arguments}): {exc}") from exc
    try:
        with storage.safe_open(weights, "pt") as f:  # memory-mapped
            aliases = json.loads((f.metadata() or {}).get(ALIASES, "{}"))
        tensors = storage.load_file(weights)
        tensors.update((name, tensors[kept]) for name, kept in aliases.items())
        model.load_state_dict(tensors)  # strict: a missing or unexpected key, a size mismatch raise
    except Exception as exc:  # a damaged file too
        raise ValueError(f"lifeiqa_fast.from_pretrained: cannot load {weights} into LifeIQA({arguments}): "
                         f"{type(exc).__name__}: {exc}") from exc
    resize = (config.get("preprocessing") or {}).get("resize")
    patch_num = (config.get("preprocessing") or {}).get("official_test_crops")
    model.checkpoint_config = {"DATA": {"DATASET": config.get("dataset"), "RESIZE": resize if resize else "none",
                                        **({"PATCH_NUM": patch_num} if patch_num else {})},
                               "LIFEIQA_FAST": dict(config["model"])}
    model.pretrained_config = config
    return model.to(map_location)


def load_model(source, **kwargs):
    """A LifeIQA from any source a user names: a save_pretrained folder or Hub repo id
    (from_pretrained), else a checkpoint file (load_checkpoint: the authors' .pth, ours, a state dict)."""
    from .checkpoint import load_checkpoint

    if isinstance(source, Mapping):
        return load_checkpoint(source, **kwargs)
    if Path(source).name in (CONFIG_NAME, WEIGHTS_NAME) and (Path(source).parent / CONFIG_NAME).is_file():
        source = Path(source).parent  # a file of a save_pretrained folder: the folder
    if Path(source).is_dir() or is_repo_id(os.fspath(source)):
        return from_pretrained(source, **kwargs)
    return load_checkpoint(source, **kwargs)

