"""Training and evaluation of Life-IQA with the authors' protocol (docs/training.md).

`lifeiqa-fast train` and `lifeiqa-fast eval` call train() and evaluate_checkpoint(). One run trains on
the train side of a split and evaluates the test side after every epoch; `repeats` runs use the
splits of seeds split_seed, split_seed + 1, ... and the summary gives the median over runs.

What follows the authors' code (their main.py and configs/swin/*.yaml): the loss
(lifeiqa_fast.loss.training_loss) SmoothL1(score, mos) + 0.01 aux + 0.001 z; AdamW (betas 0.9/0.999, eps
1e-8) with no weight decay on 1-D parameters and biases; the learning rate stepped per iteration, linear
warm-up from WARMUP_LR over the first WARMUP_EPOCHS, then x0.1 every DECAY_EPOCHS (counted from the
first iteration) or cosine to MIN_LR; grad-norm clip 5; fp16 autocast with loss scaling on CUDA; each
training image seen PATCH_NUM times an epoch, each time a random horizontal flip then a random 224 crop;
KonIQ and SPAQ images resized to (512, 384) first; the best epoch is the one of the highest test SRCC
(ties: the later), and max_plcc is their running maximum of PLCC taken at such epochs. Checkpoints have
their keys {'model', 'optimizer', 'lr_scheduler', 'epoch', 'max_plcc', 'config'}.

What differs, on purpose: test images are scored on a deterministic grid of crops by default (the
authors: PATCH_NUM random crops, `test_crops="official"`); every epoch's checkpoint is written
atomically and a run resumes from it exactly (the random streams of an epoch are seeded by (seed,
run, epoch)); the last epoch's numbers are reported beside the best epoch's; each run's best epoch is
also saved as run<r>/best/ (save_pretrained: model.safetensors and config.json with the dataset, its
score scale and the preprocessing), which `lifeiqa-fast score -m` and Scorer take as they are.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .metrics import evaluate as correlations
from .distributed import join, local_device, sharded
from .loss import training_loss
from .checkpoint import save_checkpoint
from .model import LifeIQA
from .pretrained import load_model, save_pretrained
from .scale import dataset_of
from .images import CROP, MEAN, STD, RESIZED_DATASETS, ImageError, image_tensor
from .scorer import Scorer

# The authors' configs/swin/<dataset>.yaml; every run: 30 epochs, 2 warm-up, weight decay 0.01, top-2.
PRESETS = {
    "live": dict(batch_size=16, patch_num=35, num_experts=8, depth=4, base_lr=2e-5, warmup_lr=2e-7, min_lr=2e-6),
    "csiq": dict(batch_size=128, patch_num=35, num_experts=8, depth=4, base_lr=2e-4, warmup_lr=2e-4, min_lr=2e-6),
    "tid2013": dict(batch_size=128, patch_num=25, num_experts=8, depth=4, base_lr=2e-4, warmup_lr=2e-4, min_lr=2e-6),
    "kadid": dict(batch_size=128, patch_num=35, num_experts=8, depth=4, base_lr=2e-5, warmup_lr=2e-4, min_lr=2e-6),
    "livec": dict(batch_size=64, patch_num=50, num_experts=2, depth=2, base_lr=3e-5, warmup_lr=2e-7, min_lr=1e-6,
                  scheduler="cosine", decay_epochs=20),
    "koniq": dict(batch_size=128, patch_num=40, num_experts=2, depth=4, base_lr=2e-5, warmup_lr=2e-7, min_lr=2e-6),
    "spaq": dict(batch_size=128, patch_num=40, num_experts=8, depth=4, base_lr=2e-5, warmup_lr=2e-7, min_lr=2e-6),
    "livefb": dict(batch_size=128, patch_num=40, num_experts=2, depth=4, base_lr=2e-5, warmup_lr=2e-6, min_lr=2e-6),
    # ours: the embedded synthetic set (lifeiqa_fast.data.synthetic) and a ResNet-10-T trained from scratch
    # (no pretrained weights offline; from scratch a small Swin reached a test SRCC of 0.3-0.5 here and a
    # ResNet-18 ~0.8, both learning the fine-scale distortions (blur, JPEG, pixelation) slowly), sized for
    # a 2-core CPU
    "synthetic": dict(batch_size=16, patch_num=4, num_experts=2, depth=2, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-6,
                      epochs=16, warmup_epochs=1, scheduler="cosine", repeats=1, pretrained="none", workers=2,
                      backbone="resnet10t"),
}


# The authors' yacs keys (configs/swin/*.yaml) -> TrainConfig fields, for --config files in their format.
AUTHORS_KEYS = {"DATA.BATCH_SIZE": "batch_size", "DATA.PATCH_NUM": "patch_num", "MODEL.SWIN.NUM_EXPERTS": "num_experts",
                "MODEL.SWIN.TOP_K": "top_k", "MODEL.SWIN.DEPTH": "depth", "TRAIN.EPOCHS": "epochs",
                "TRAIN.WARMUP_EPOCHS": "warmup_epochs", "TRAIN.WEIGHT_DECAY": "weight_decay",
                "TRAIN.BASE_LR": "base_lr", "TRAIN.WARMUP_LR": "warmup_lr", "TRAIN.MIN_LR": "min_lr",
                "TRAIN.LR_SCHEDULER.NAME": "scheduler", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": "decay_epochs",
                "TRAIN.CLIP_GRAD": "clip_grad"}


def read_config_file(path) -> dict:
    """TrainConfig overrides from a JSON or YAML file: our field names, or the authors' config layout
    (DATA.BATCH_SIZE, TRAIN.BASE_LR, ...: AUTHORS_KEYS)."""
    import yaml  # a dependency of timm's

    from .checkpoint import config_value

    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"lifeiqa_fast.train: {path} must hold a mapping of settings")
    if any(k in data for k in ("DATA", "MODEL", "TRAIN")):
        data = {ours: config_value(data, theirs) for theirs, ours in AUTHORS_KEYS.items()
                if config_value(data, theirs) is not None}
    return data


# Seeds derived from the configured seed, strided so that they do not collide: run r of a repeated
# training seeds with seed + RUN_SEED_STRIDE * r; its epoch e's sampling order with run seed *
# EPOCH_SEED_STRIDE + e (distinct for fewer than 1000 epochs); each sample i's flip and crop with epoch
# seed * SAMPLE_SEED_STRIDE + i (a prime above any dataset's count of samples times crops).
RUN_SEED_STRIDE = 1000
EPOCH_SEED_STRIDE = 1000
SAMPLE_SEED_STRIDE = 1_000_003

# The int settings and their least value (limit: None, or at least 1).
INT_SETTINGS = dict(batch_size=1, patch_num=1, num_experts=1, top_k=1, depth=1, decay_epochs=1, epochs=1,
                         warmup_epochs=0, repeats=1, split_seed=0, seed=0, workers=0, limit=1)


@dataclass
class TrainConfig:
    """Everything a training run depends on; PRESETS[dataset] fills what is not given."""

    dataset: str
    root: str
    out: str = "runs"
    batch_size: int = 128
    patch_num: int = 40
    num_experts: int = 8
    top_k: int = 2
    depth: int = 4
    base_lr: float = 2e-5
    warmup_lr: float = 2e-7
    min_lr: float = 2e-6
    scheduler: str = "step"
    decay_epochs: int = 10
    epochs: int = 30
    warmup_epochs: int = 2
    weight_decay: float = 0.01
    clip_grad: float = 5.0
    amp: str = "auto"  # auto: fp16 with loss scaling on CUDA, none on CPU; or "fp16", "bf16", "none"
    repeats: int = 10
    split_seed: int = 0
    split: str | None = None  # a CSV written by lifeiqa_fast.data.save_split: one run on it
    seed: int = 0
    backbone: str = "swin_base_patch4_window7_224"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: str = "auto"  # auto: timm's ImageNet weights (needs them cached or a network); none; a path
    impl: str = "auto"
    test_crops: str = "grid"  # or "official": patch_num random crops per test image
    resize: str = "auto"  # KonIQ/SPAQ: "auto", the authors' (512, 384) squash; "aspect", short side to 384; "none"
    workers: int = 4
    device: str | None = None
    limit: int | None = None  # only the first `limit` records of the dataset (smoke runs)

    @classmethod
    def preset(cls, dataset: str, root: str, **overrides) -> TrainConfig:
        if dataset not in PRESETS:
            raise ValueError(f"lifeiqa_fast.train: no preset for dataset {dataset!r}; choose from {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"lifeiqa_fast.train: unknown settings {sorted(unknown)}")
        values = {**PRESETS[dataset], **{k: v for k, v in overrides.items() if v is not None}}
        config = cls(dataset=dataset, root=str(root), **values)
        if config.scheduler not in ("step", "cosine") or config.amp not in ("auto", "fp16", "bf16", "none"):
            raise ValueError(f"lifeiqa_fast.train: scheduler must be step or cosine and amp auto, fp16, bf16 or "
                             f"none, got {config.scheduler!r}, {config.amp!r}")
        if config.resize not in ("auto", "aspect", "none") or config.test_crops not in ("grid", "official"):
            raise ValueError(f"lifeiqa_fast.train: resize must be auto, aspect or none and test_crops grid or "
                             f"official, got {config.resize!r}, {config.test_crops!r}")
        for name, least in INT_SETTINGS.items():
            value = getattr(config, name)
            if (value is not None or name != "limit") and (type(value) is not int or value < least):
                raise ValueError(f"lifeiqa_fast.train: {name} must be an int >= {least}, got {value!r}")
        for name in ("base_lr", "warmup_lr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(config, name)
            if type(value) not in (int, float) or not 0 <= value < math.inf or name == "base_lr" and value == 0:
                raise ValueError(f"lifeiqa_fast.train: {name} must be a finite number >= 0 (base_lr > 0), "
                                 f"got {value!r}")
        return config

    def image_resize(self) -> tuple[int, int] | int | None:
        """What images are resized to before cropping (see resize_image)."""
        size = RESIZED_DATASETS.get(self.dataset)
        if size is None or self.resize == "none":
            return None
        return size if self.resize == "auto" else min(size)


class TrainCrops(Dataset):
    """The authors' training samples: each record `patch_num` times an epoch; each sample a random
    horizontal flip then a random 224 crop of the (resized) image, ImageNet-normalised, (3, 224, 224)
    float32, with its label. A decoded image is kept in memory while the process's cache has room
    (cache_bytes), so its next crops do not decode it again. An unreadable image gives None (warned
    once per process; `skip_unreadable` drops it from the batch)."""

    def __init__(self, records, patch_num: int, resize: tuple[int, int] | None, cache_bytes: int = 2**30):
        self.records, self.patch_num, self.resize = list(records), patch_num, resize
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        self.cache, self.cache_left, self.reported = {}, cache_bytes, set()

    def __len__(self) -> int:
        return len(self.records) * self.patch_num

    def image(self, path) -> torch.Tensor:
        """(3, H, W) uint8, resized, at least 224 on a side."""
        if path in self.cache:
            return self.cache[path]
        x = image_tensor(path, self.resize)
        if x.numel() <= self.cache_left:
            self.cache[path], self.cache_left = x, self.cache_left - x.numel()
        return x

    def __getitem__(self, key: tuple[int, int]):
        """key: (sample index, the epoch's seed): the sample's flip and crop come from a generator seeded
        by both, so they do not depend on which worker draws them or on earlier epochs."""
        i, seed = key
        gen = torch.Generator().manual_seed((seed * SAMPLE_SEED_STRIDE + i) % 2**63)
        record = self.records[i // self.patch_num]
        try:
            x = self.image(record.path)
        except ImageError as exc:
            if record.path not in self.reported:
                self.reported.add(record.path)
                warnings.warn(f"{exc}; skipped")
            return None
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        top = int(torch.randint(0, x.shape[1] - CROP + 1, (), generator=gen))
        left = int(torch.randint(0, x.shape[2] - CROP + 1, (), generator=gen))
        x = x[:, top:top + CROP, left:left + CROP].float() / 255
        x = (x - self.mean) / self.std
        return x, torch.tensor(record.label, dtype=torch.float32)


class EpochShuffle(torch.utils.data.Sampler):
    """A new random order every epoch, split between the processes of a distributed run (each takes
    every world-th sample of it, the order cut to a multiple of world); yields (index, epoch seed) for
    TrainCrops. The order depends only on (seed, epoch), so a resumed run draws what it would have."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_seed(self) -> int:
        return self.seed * EPOCH_SEED_STRIDE + self.epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        seed = self.epoch_seed()
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        return iter([(int(i), seed) for i in order[: len(self) * self.world][self.rank::self.world]])


def skip_unreadable(batch):
    """default_collate of the samples that could be read (None: could not)."""
    batch = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(batch) if batch else None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The authors' AdamW groups: no weight decay on 1-D parameters and biases (and on Swin's relative
    position bias tables), weight_decay on every other parameter (a 0-d gamma included)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.dim() == 1 or name.endswith(".bias") or "relative_position_bias_table" in name
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(config: TrainConfig, steps_per_epoch: int):
    """The learning rate at iteration t as a factor of base_lr: linear warm-up from warmup_lr over
    warmup_epochs, then x0.1 every decay_epochs, or cosine from base_lr to min_lr over all epochs
    (timm's schedulers as the authors build them, t counted from the first iteration)."""
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    decay = max(1, config.decay_epochs * steps_per_epoch)

    def factor(t: int) -> float:
        if t < warmup:
            lr = config.warmup_lr + (config.base_lr - config.warmup_lr) * t / warmup
        elif config.scheduler == "step":
            lr = config.base_lr * 0.1 ** (t // decay)
        else:
            lr = config.min_lr + 0.5 * (config.base_lr - config.min_lr) * (1 + math.cos(math.pi * t / max(1, total)))
        return lr / config.base_lr

    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _score(model, records, config: TrainConfig, device, resize) -> torch.Tensor:
    """Scores of records, each process scoring its share; every process gets all of them, in order.
    The grid covers each image (max_crops=None): the figures of every run stay comparable."""
    crops = "grid" if config.test_crops == "grid" else config.patch_num
    dtype = {"fp16": "fp16", "bf16": "bf16"}.get(_amp_dtype(config, device), "fp32")
    scorer = Scorer(model, device=device, dtype=dtype, batch_size=config.batch_size, crops=crops,
                    seed=config.seed, resize=resize, cuda_graphs=False, impl=config.impl, max_crops=None)
    return torch.tensor(sharded([r.path for r in records], lambda paths: scorer(paths).tolist() if paths else []))


def _amp_dtype(config: TrainConfig, device: torch.device) -> str:
    if config.amp == "auto":
        return "fp16" if device.type == "cuda" else "none"
    return config.amp


def train_run(config: TrainConfig, train_records, test_records, run_dir: Path, run: int, resume: bool,
              run_id: str = "") -> dict:
    """One run: train, evaluate every epoch, checkpoint every epoch; returns its history and summary.
    run_id marks the lines this call appends to the run's log.jsonl (a resumed run's are another's)."""
    from tqdm.auto import tqdm

    rank, world = join()
    device = torch.device(config.device) if config.device else local_device()
    resize = config.image_resize()
    run_seed = config.seed + RUN_SEED_STRIDE * run
    _seed_everything(run_seed)
    pretrained = {"auto": True, "none": False}.get(config.pretrained, config.pretrained)
    model = LifeIQA(num_experts=config.num_experts, top_k=config.top_k, depth=config.depth, backbone=config.backbone,
                    backbone_kwargs=config.backbone_kwargs, pretrained=pretrained, impl=config.impl).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.base_lr, betas=(0.9, 0.999),
                                  eps=1e-8)
    dataset = TrainCrops(train_records, config.patch_num, resize)
    steps_per_epoch = len(dataset) // world // config.batch_size  # drop_last, as the authors' loader
    if steps_per_epoch == 0:
        raise ValueError(f"lifeiqa_fast.train: batch_size {config.batch_size} exceeds the {len(dataset)} training "
                         f"samples ({len(train_records)} images x patch_num {config.patch_num}) per process")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
    amp = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    history, start = [], 0
    checkpoint = run_dir / CHECKPOINT
    if resume:
        saved = _resume_from(run_dir, model.config, device, tidy=rank == 0)
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["lr_scheduler"])
            scaler.load_state_dict(saved["scaler"])
            history, start = saved["history"], saved["epoch"] + 1
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log = run_dir / "log.jsonl"
    sampler = EpochShuffle(len(dataset), run_seed, rank, world)
    # Workers live as long as the run, keeping the images they decoded (TrainCrops' cache).
    # Its own generator: a loader draws its workers' base seed when it makes an iterator, from the global
    # generator if given none, and persistent workers make theirs once per process, so that a resumed
    # run's first epoch would draw where the uninterrupted run did not, shifting its dropout.
    loader = DataLoader(dataset, config.batch_size, sampler=sampler, num_workers=config.workers,
                        collate_fn=skip_unreadable, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=config.workers > 0, generator=torch.Generator().manual_seed(run_seed))
    for epoch in range(start, config.epochs):
        sampler.set_epoch(epoch)
        _seed_everything(sampler.epoch_seed() + rank)  # dropout: the same streams when resumed
        net.train()
        losses, t0 = [], time.perf_counter()
        bar = tqdm(loader, desc=f"run {run} epoch {epoch + 1}/{config.epochs}", disable=rank != 0, leave=False)
        for batch in bar:
            if batch is None:
                continue
            x, y = (t.to(device, non_blocking=True) for t in batch)
            with torch.autocast(device.type, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp, torch.float32),
                                enabled=amp != "none"):
                score, aux, z = net(x)
            loss = training_loss(score, y, aux, z)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.detach())
            bar.set_postfix(loss=f"{losses[-1].item():.4f}")
        train_loss = torch.stack(losses).mean().item() if losses else float("nan")
        net.eval()
        with torch.no_grad():
            scores = _score(model, test_records, config, device, resize)
        metrics = _correlations(scores, test_records)
        history.append({"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - t0, **metrics})
        if rank == 0:
            best = _best(history)
            if checkpoint.exists():  # the last two epochs' checkpoints are kept: a damaged one has a fallback
                os.replace(checkpoint, run_dir / PREVIOUS_CHECKPOINT)
            saved = {"DATA": {"DATASET": config.dataset, "PATCH_NUM": config.patch_num,
                              "BATCH_SIZE": config.batch_size, "RESIZE": resize or "none"},
                     "TRAIN": {"EPOCHS": config.epochs, "BASE_LR": config.base_lr}}
            if best["best"] is history[-1]:  # the best epoch so far: the model to score with, as it travels
                model.checkpoint_config = saved
                save_pretrained(model, run_dir / BEST_MODEL)
            save_checkpoint(model, checkpoint, optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict(), epoch=epoch, max_plcc=best["max_plcc"], history=history,
                            config=saved)
            with log.open("a") as f:
                f.write(json.dumps({"run_id": run_id, **history[-1]}) + "\n")
    return {"run": run, "history": history, **_best(history), "last": history[-1] if history else None}


CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pth", "checkpoint.prev.pth"
BEST_MODEL = "best"  # run<r>/best/: save_pretrained's folder of the run's best epoch (lifeiqa-fast score -m)


def _resume_from(run_dir: Path, model_config: dict, device, tidy: bool = True) -> dict | None:
    """The newest readable checkpoint of run_dir (CHECKPOINT, else PREVIOUS_CHECKPOINT, saying why with a
    warning), loaded; None if the run wrote none. ValueError naming each file and its cause if none can
    be read, or naming the file and the settings if it was written by a model built otherwise. tidy
    (the process that writes): a damaged CHECKPOINT passed over is renamed <name>.damaged, so that the
    next epoch's rotation does not make it the fallback; killed writes' temporary files are removed."""
    if tidy:
        for stale in run_dir.glob(f"{CHECKPOINT}.tmp*"):  # a write that was killed before its rename
            stale.unlink(missing_ok=True)
    problems = []
    for path in (run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT):
        if not path.exists():
            continue
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(saved, dict) or not {"model", "optimizer", "history", "epoch"} <= set(saved):
                raise ValueError("not a checkpoint written by lifeiqa_fast.train")
        except Exception as exc:  # truncated: PytorchStreamReader's RuntimeError; empty: EOFError; ...
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'}"
            problems.append(f"{path} cannot be read ({cause})")
            continue
        theirs = (saved.get("config") or {}).get("LIFEIQA_FAST", {})
        differ = {k: (theirs.get(k), v) for k, v in model_config.items() if theirs.get(k) != v}
        if differ:
            raise ValueError(f"lifeiqa_fast.train: cannot resume from {path}: it holds a model built with other "
                             f"settings (saved, now): {differ}; resume with the settings of the run, or start "
                             f"another --out")
        if problems:
            damaged = run_dir / CHECKPOINT
            if tidy and damaged.exists():
                os.replace(damaged, damaged.with_name(f"{CHECKPOINT}.damaged"))
            warnings.warn(f"lifeiqa_fast.train: {problems[0]}; resuming from {path} (epoch {saved['epoch'] + 1}) "
                          f"instead{f' (the damaged file kept as {CHECKPOINT}.damaged)' if tidy else ''}",
                          stacklevel=2)
        return saved
    if problems:
        raise ValueError("lifeiqa_fast.train: cannot resume: " + "; ".join(problems))
    return None


def _correlations(scores: torch.Tensor, records) -> dict:
    """SRCC/PLCC/KRCC over the images that have a score (an unreadable one has NaN and was reported)."""
    labels = torch.tensor([r.label for r in records], dtype=torch.float64)
    scored = torch.isfinite(scores)
    return {**correlations(scores[scored], labels[scored]), "unscored": int((~scored).sum())}


def _best(history: list[dict]) -> dict:
    """The authors' bookkeeping: the best epoch is the last one of the highest SRCC; max_plcc is the
    running maximum of PLCC over such epochs."""
    best, max_srcc, max_plcc = None, -math.inf, 0.0
    for h in history:
        if h["srcc"] >= max_srcc:
            best, max_srcc, max_plcc = h, h["srcc"], max(max_plcc, h["plcc"])
    return {"best": best, "max_srcc": max_srcc if best else None, "max_plcc": max_plcc}


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """config.repeats runs (or one on config.split); writes OUT/<dataset>/run<r>/{checkpoint.pth,
    checkpoint.prev.pth, log.jsonl, split.csv} and OUT/<dataset>/summary.json; returns the summary: per
    run the best and last epochs' SRCC/PLCC/KRCC, and their medians over runs.

    OUT/<dataset> must be empty or absent unless resume (continue its runs from their checkpoints) or
    overwrite (delete what it holds first); FileExistsError otherwise, so that a finished run is never
    replaced by mistake. The folder is locked while training: a second train() into it fails at once
    with BlockingIOError. Each log line carries run_id, this call's id (time and process)."""
    if resume and overwrite:
        raise ValueError("lifeiqa_fast.train: resume and overwrite exclude each other")
    rank, _ = join()
    out = Path(config.out) / config.dataset
    if rank != 0:
        return _train(config, out, resume, "")
    with _locked(out):
        previous = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if previous and not (resume or overwrite):
            raise FileExistsError(f"lifeiqa_fast.train: {out} holds a previous training's files "
                                  f"({', '.join(previous[:4])}{', ...' if len(previous) > 4 else ''}): resume it "
                                  f"(--resume), replace it (--overwrite), or choose another --out")
        if overwrite:
            for name in previous:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        return _train(config, out, resume, run_id)


LOCK = ".lock"


@contextlib.contextmanager
def _locked(out: Path):
    """out, created if need be, locked for this process (an flock on out/.lock, which the system
    releases when the process ends, killed or not); BlockingIOError naming the process holding it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise BlockingIOError(f"lifeiqa_fast.train: {out} is in use by another training run ({holder}): wait "
                                  f"for it to end, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield out
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train(config: TrainConfig, out: Path, resume: bool, run_id: str) -> dict:
    """train()'s work, in out (locked by rank 0)."""
    from .data import load_split, make_synthetic, read_dataset, repeated_splits, save_split

    rank, _ = join()
    if config.dataset == "synthetic" and not (Path(config.root) / "dmos.csv").is_file():
        if rank == 0:  # made here on first use (a few seconds), the others wait for it
            make_synthetic(config.root, progress=True)
        if dist.is_initialized():
            dist.barrier()
    records = read_dataset(config.dataset, config.root)[: config.limit]
    if config.split:
        splits = [load_split(config.split, root=config.root)]
    else:
        splits = list(repeated_splits(records, config.repeats, config.split_seed))
    if rank == 0:  # (out made by _locked)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    runs = []
    for run, (train_records, test_records) in enumerate(splits):
        run_dir = out / f"run{run}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            save_split(run_dir / "split.csv", train_records, test_records, root=config.root)
        runs.append(train_run(config, train_records, test_records, run_dir, run, resume, run_id))
    summary = {"run_id": run_id, "config": asdict(config),
               "runs": [{k: v for k, v in r.items() if k != "history"} for r in runs]}
    # the authors' numbers (their "Max SRCC", "Max PLCC"), then the last epoch's, each a median over runs
    summary["median_best_srcc"] = statistics.median(r["max_srcc"] for r in runs)
    summary["median_best_plcc"] = statistics.median(r["max_plcc"] for r in runs)
    for key in ("srcc", "plcc", "krcc"):
        summary[f"median_last_{key}"] = statistics.median(r["last"][key] for r in runs)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def evaluate_checkpoint(checkpoint, dataset: str, root, split=None, crops="grid", batch_size: int = 32,
                        device=None, limit: int | None = None) -> dict:
    """SRCC, PLCC and KRCC of a model (a checkpoint file, a save_pretrained folder or Hub repo id) on a
    dataset: the test side of split (a CSV written by
    save_split), or every image; scored by Scorer (crops: "grid" or N random crops)."""
    from .data import load_split, read_dataset

    records = load_split(split, root=root)[1] if split else read_dataset(dataset, root)[:limit]
    # resized as it was trained (its config), else as the dataset's protocol; the grid covers each image
    model = load_model(checkpoint)
    scorer = Scorer(model, device=device, dtype="fp32", batch_size=batch_size, crops=crops, progress=True,
                    dataset=None if dataset_of(model) else dataset, max_crops=None)
    return {"images": len(records), **_correlations(scorer([r.path for r in records]), records)}
