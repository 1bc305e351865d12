"""Training with the authors' protocol on the embedded synthetic set: a short CPU run learns, a resumed
run equals an uninterrupted one, two gloo processes train together, and eval reads the checkpoint."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import lifeiqa_fast
import lifeiqa_fast.train as training
from lifeiqa_fast.scale import dataset_of
from lifeiqa_fast.train import TrainConfig, lr_factor, param_groups, read_config_file, train

from test_model import TINY, tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """3 photographs x 9 distortions x 5 levels at 224 x 224: 2 groups train (90 images), 1 tests (45)."""
    from lifeiqa_fast.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), size=224, references=["astronaut", "chelsea", "coffee"])


def _config(root, out, **overrides) -> TrainConfig:
    settings = dict(out=str(out), epochs=2, patch_num=1, batch_size=8, workers=0, repeats=1, base_lr=1e-3,
                    warmup_epochs=0, backbone=TINY["backbone"], backbone_kwargs=TINY["backbone_kwargs"])
    return TrainConfig.preset("synthetic", root, **{**settings, **overrides})


@pytest.mark.slow
def test_short_run_learns_and_writes_its_files(synthetic, tmp_path):
    summary = train(_config(synthetic, tmp_path, epochs=3))
    run = summary["runs"][0]
    history = [json.loads(line) for line in (tmp_path / "synthetic" / "run0" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]  # the loss falls
    assert run["best"]["srcc"] > 0.2 and summary["median_best_srcc"] == run["best"]["srcc"]  # clearly positive
    checkpoint = torch.load(tmp_path / "synthetic" / "run0" / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "max_plcc", "config"} <= set(checkpoint)  # official keys
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["DATA"]["DATASET"] == "synthetic"
    split = (tmp_path / "synthetic" / "run0" / "split.csv").read_text()
    assert split.count(",train") == 90 and split.count(",test") == 45
    best = lifeiqa_fast.LifeIQA.from_pretrained(tmp_path / "synthetic" / "run0" / "best")  # the model that travels
    assert dataset_of(best) == "synthetic"
    if run["best"]["epoch"] == 2:  # the last epoch was the best: its weights are the checkpoint's
        assert all(torch.equal(best.state_dict()[k], v) for k, v in checkpoint["model"].items())


@pytest.mark.slow
def test_bf16_autocast_run_with_a_cnn_backbone(synthetic, tmp_path):
    """--amp bf16 on CPU (the fused head under autocast) with a ResNet: trains, and scores its test side."""
    summary = train(_config(synthetic, tmp_path, epochs=1, amp="bf16", backbone="resnet10t", backbone_kwargs={}))
    last = summary["runs"][0]["last"]
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["srcc"]) and last["unscored"] == 0
    saved = torch.load(tmp_path / "synthetic" / "run0" / "checkpoint.pth", weights_only=True)
    assert saved["config"]["LIFEIQA_FAST"]["backbone"] == "resnet10t"


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory):
    """A 2-epoch run that nothing interrupted: its summary and final checkpoint."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = train(_config(synthetic, out))
    return summary, torch.load(out / "synthetic" / "run0" / "checkpoint.pth", weights_only=True)


def _assert_same_run(out, uninterrupted):
    """The run in out ended where the uninterrupted one did: every weight and every epoch's numbers."""
    _, whole = uninterrupted
    saved = torch.load(out / "synthetic" / "run0" / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == whole["epoch"]
    for a, b in zip(saved["history"], whole["history"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert all(torch.equal(saved["model"][k], v) for k, v in whole["model"].items())


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_equals_uninterrupted(synthetic, tmp_path, monkeypatch, uninterrupted, workers):
    """Interrupted in epoch 2 and resumed, with or without data-loading workers (persistent workers once
    drew their seed from the global generator: a resumed run's dropout then differed)."""
    calls = {"n": 0}
    evaluate = training.correlations

    def interrupted(*args):  # the second epoch's evaluation is interrupted, after its training
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(training, "correlations", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_config(synthetic, tmp_path, workers=workers))
    monkeypatch.setattr(training, "correlations", evaluate)
    resumed = train(_config(synthetic, tmp_path, workers=workers), resume=True)
    for key in ("srcc", "plcc", "krcc", "train_loss"):
        assert resumed["runs"][0]["last"][key] == uninterrupted[0]["runs"][0]["last"][key], key
    _assert_same_run(tmp_path, uninterrupted)
    lines = [json.loads(line) for line in (tmp_path / "synthetic" / "run0" / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and lines[0]["run_id"] != lines[1]["run_id"] != ""


# A training process that SIGKILLs itself at the n-th call of one point: data (a training sample read),
# step (just after an optimizer step, before the scheduler's) or save (a checkpoint half written).
KILLED_CHILD = """
import json, os, signal, sys
import torch
import lifeiqa_fast.checkpoint
import lifeiqa_fast
import lifeiqa_fast.train as training
from lifeiqa_fast.scale import dataset_of
from lifeiqa_fast.train import TrainConfig, train

root, settings, point, n = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
calls = [0]

def dies(fn, after):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = fn(*args, **kwargs)
        if calls[0] == n and after:
            if point == "save":
                size = os.path.getsize(args[1])
                with open(args[1], "r+b") as f:
                    f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper

if point == "data":
    training.TrainCrops.__getitem__ = dies(training.TrainCrops.__getitem__, after=False)
elif point == "step":
    torch.optim.AdamW.step = dies(torch.optim.AdamW.step, after=True)
elif point == "save":
    lifeiqa_fast.checkpoint.torch.save = dies(torch.save, after=True)
train(TrainConfig.preset("synthetic", root, **settings), resume=True)
"""


@pytest.mark.slow
def test_killed_at_random_points_then_resumed_equals_uninterrupted(synthetic, tmp_path, uninterrupted):
    """kill -9 while reading data, just after an optimizer step and halfway through a checkpoint write,
    each at a random call, then resumed to the end: the same weights and numbers as the uninterrupted
    run (no checkpoint half written is read; a stale temporary file is removed)."""
    import random

    draw = random.Random(15)
    settings = {k: v for k, v in vars(_config(synthetic, tmp_path)).items() if k not in ("dataset", "root")}
    # the threads of this process: another count sums the GEMMs in another order
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # 90 samples and 11 steps an epoch, 2 epochs; points in order, each process resuming the last one's
    kills = [("data", draw.randint(1, 80), 0), ("step", draw.randint(1, 11), 1), ("save", 1, 1)]
    for point, n, workers in [*kills, (None, 0, 1)]:
        result = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(synthetic),
                                 json.dumps({**settings, "workers": workers}), str(point), str(n)],
                                capture_output=True, text=True, timeout=600, env=env)
        expected = -9 if point else 0
        assert result.returncode == expected, (point, n, result.stderr[-3000:])
    _assert_same_run(tmp_path, uninterrupted)
    assert not list((tmp_path / "synthetic" / "run0").glob("*.tmp*"))


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_epoch(synthetic, tmp_path, uninterrupted):
    out = tmp_path / "synthetic" / "run0"
    train(_config(synthetic, tmp_path))
    latest = out / "checkpoint.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match=rf"{latest} cannot be read \(RuntimeError: .*resuming from "
                                         rf"{out / 'checkpoint.prev.pth'} \(epoch 1\) instead \(the damaged "
                                         rf"file kept as checkpoint.pth.damaged\)"):
        train(_config(synthetic, tmp_path), resume=True)  # epoch 2 again, from epoch 1's checkpoint
    _assert_same_run(tmp_path, uninterrupted)
    # the rotation after epoch 2 moved the good checkpoint to the fallback, not the damaged one
    assert torch.load(out / "checkpoint.prev.pth", weights_only=True)["epoch"] == 0
    assert (out / "checkpoint.pth.damaged").stat().st_size == 1000
    for path in (latest, out / "checkpoint.prev.pth"):
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"cannot resume: {latest} cannot be read \(EOFError.*\); "
                                         rf"{out / 'checkpoint.prev.pth'} cannot be read"):
        train(_config(synthetic, tmp_path), resume=True)


def test_resume_with_other_model_settings_names_them(synthetic, tmp_path):
    train(_config(synthetic, tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint.pth: .*other settings.*'depth': \(2, 1\)"):
        train(_config(synthetic, tmp_path, epochs=2, depth=1), resume=True)


def test_finished_run_is_not_overwritten(synthetic, tmp_path):
    """A new run into a non-empty output folder is refused; --overwrite replaces it; a run into a
    folder another run is writing to fails at once."""
    train(_config(synthetic, tmp_path, epochs=1))
    out = tmp_path / "synthetic"
    before = (out / "run0" / "checkpoint.pth").read_bytes()
    with pytest.raises(FileExistsError, match=rf"{out} holds a previous training's files .*--resume.*--overwrite"):
        train(_config(synthetic, tmp_path, epochs=1))
    assert (out / "run0" / "checkpoint.pth").read_bytes() == before
    with training._locked(out):  # as another process's run would hold it
        with pytest.raises(BlockingIOError, match=rf"{out} is in use by another training run \(pid {os.getpid()}"):
            train(_config(synthetic, tmp_path, epochs=1), overwrite=True)
    (out / "run0" / "stale.txt").write_text("from before")
    train(_config(synthetic, tmp_path, epochs=1), overwrite=True)
    assert not (out / "run0" / "stale.txt").exists()
    assert len((out / "run0" / "log.jsonl").read_text().splitlines()) == 1


def test_a_second_process_fails_at_once_while_a_run_holds_the_folder(synthetic, tmp_path):
    """Two processes: the second `lifeiqa-fast train` into the same --out exits 2 naming the first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib; import lifeiqa_fast.train as t\n"
                               "with t._locked(pathlib.Path(sys.argv[1])): print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / "synthetic")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = subprocess.run([sys.executable, "-m", "lifeiqa_fast.cli", "train", "--dataset", "synthetic", "--root",
                                 str(synthetic), "--out", str(tmp_path), "--overwrite"],
                                capture_output=True, text=True, timeout=120, env=env)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and f"in use by another training run (pid {holder.pid}" in result.stderr


@pytest.mark.slow
def test_two_gloo_processes_then_eval(synthetic, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"backbone": TINY["backbone"], "backbone_kwargs": TINY["backbone_kwargs"],
                                  "patch_num": 1, "batch_size": 4, "warmup_epochs": 0, "repeats": 1}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lifeiqa_fast.cli", "train",
         "--dataset", "synthetic", "--root", str(synthetic), "--config", str(config), "--epochs", "1",
         "--workers", "0", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "synthetic" / "run0"
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes
    last = json.loads((tmp_path / "out" / "synthetic" / "summary.json").read_text())["runs"][0]["last"]
    assert math.isfinite(last["srcc"]) and "median over runs: best SRCC" in result.stdout
    # eval scores the checkpoint on the test side of the run's split: the numbers training logged
    result = subprocess.run(
        [sys.executable, "-m", "lifeiqa_fast.cli", "eval", "--checkpoint", str(run / "checkpoint.pth"),
         "--dataset", "synthetic", "--root", str(synthetic), "--split", str(run / "split.csv")],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # to 1e-3: batches of other images round the scores otherwise (1e-7), which may swap two near-equal
    # ones (an adjacent swap moves SRCC by 1.3e-4 over 45 images)
    words = result.stdout.split()
    assert words[:3] == ["45", "images:", "SRCC"], result.stdout
    assert abs(float(words[3]) - last["srcc"]) < 1e-3 and abs(float(words[5]) - last["plcc"]) < 1e-3, result.stdout


def test_learning_rate_schedules():
    config = TrainConfig.preset("koniq", "unused")  # step: warm-up 2 epochs from 2e-7, x0.1 every 10
    f = lr_factor(config, steps_per_epoch=100)
    lr = [config.base_lr * f(t) for t in (0, 100, 200, 999, 1000, 2000, 2999)]
    assert lr == pytest.approx([2e-7, 1.01e-5, 2e-5, 2e-5, 2e-6, 2e-7, 2e-7])
    config = TrainConfig.preset("livec", "unused")  # cosine from base_lr to min_lr over all 30 epochs
    f = lr_factor(config, steps_per_epoch=10)
    assert config.base_lr * f(150) == pytest.approx(1e-6 + 0.5 * (3e-5 - 1e-6))
    assert config.base_lr * f(300) == pytest.approx(1e-6)


# The parameters of tiny(num_experts=2, depth=2) that the authors' AdamW groups decay, written out: every
# 2-D and higher weight and the 0-d gamma; not the biases, the norms' weights, in_proj_bias or Swin's
# relative position bias tables (2-D, but excluded by name).
DECAYED = {"bunch_embedding", "gamma", "pretrain_model.patch_embed.proj.weight", "proj_layer3.weight",
           "proj_layer4.weight", "MOE.router.linear.weight", "fc.weight"}
DECAYED |= {f"pretrain_model.layers.{s}.blocks.0.{w}.weight" for s in range(4)
            for w in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
DECAYED |= {f"pretrain_model.layers.{s}.downsample.reduction.weight" for s in (1, 2, 3)}
DECAYED |= {f"bunch_decoder.layers.{i}.{w}" for i in (0, 1)
            for w in ("multihead_attn.in_proj_weight", "multihead_attn.out_proj.weight", "GCN.gcn1.weight",
                      "GCN.gcn2.weight", "GCN.gcn3.weight")}
DECAYED |= {f"MOE.experts.{e}.net.{j}.weight" for e in (0, 1) for j in (0, 3)}


def test_weight_decay_groups_are_the_authors():
    model = tiny(num_experts=2, depth=2)
    groups = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, plain = ({names[id(p)] for p in g["params"]} for g in groups)
    assert decayed == DECAYED
    assert plain == set(names.values()) - DECAYED and len(plain) == len(names) - len(DECAYED)
    assert {"pretrain_model.layers.2.blocks.0.attn.relative_position_bias_table", "norm3.weight",
            "bunch_decoder.layers.1.multihead_attn.in_proj_bias", "bunch_decoder.layers.0.norm2.weight"} <= plain


def test_config_files_and_bad_settings(tmp_path):
    authors = tmp_path / "swin_koniq.yaml"
    authors.write_text("DATA:\n  BATCH_SIZE: 64\n  PATCH_NUM: 10\nMODEL:\n  SWIN:\n    NUM_EXPERTS: 4\n"
                       "TRAIN:\n  BASE_LR: 1.0e-4\n  LR_SCHEDULER:\n    NAME: cosine\n")
    assert read_config_file(authors) == dict(batch_size=64, patch_num=10, num_experts=4, base_lr=1e-4,
                                             scheduler="cosine")
    with pytest.raises(ValueError, match="no preset for dataset 'imagenet'"):
        TrainConfig.preset("imagenet", "root")
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        TrainConfig.preset("koniq", "root", learning_rate=1)
    with pytest.raises(ValueError, match="scheduler must be step or cosine"):
        TrainConfig.preset("koniq", "root", scheduler="linear")
    for name, value in (("batch_size", 0), ("epochs", 0), ("repeats", -1), ("patch_num", 2.5), ("limit", 0),
                        ("workers", -1), ("depth", True)):
        with pytest.raises(ValueError, match=rf"{name} must be an int >= \d, got {value!r}"):
            TrainConfig.preset("koniq", "root", **{name: value})
    with pytest.raises(ValueError, match="base_lr must be a finite number"):
        TrainConfig.preset("koniq", "root", base_lr=float("nan"))


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs"])
def test_cli_train_refuses_zero(tmp_path, capsys, flag):
    from lifeiqa_fast.cli import main

    assert main(["train", "--dataset", "koniq", "--root", str(tmp_path), "--out", str(tmp_path), flag, "0"]) == 2
    name = flag[2:].replace("-", "_")
    assert f"lifeiqa-fast train: lifeiqa_fast.train: {name} must be an int >= 1, got 0" in capsys.readouterr().err


def test_resize_settings():
    assert TrainConfig.preset("koniq", "r").image_resize() == (512, 384)  # the authors' squash
    assert TrainConfig.preset("spaq", "r", resize="aspect").image_resize() == 384  # short side, aspect kept
    assert TrainConfig.preset("koniq", "r", resize="none").image_resize() is None
    assert TrainConfig.preset("livec", "r").image_resize() is None
    with pytest.raises(ValueError, match="resize must be auto, aspect or none"):
        TrainConfig.preset("koniq", "r", resize="squash")


def test_unreadable_training_image_is_reported_once_and_skipped(synthetic, tmp_path):
    from lifeiqa_fast.data import Record
    from lifeiqa_fast.train import TrainCrops, skip_unreadable

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    good = next((synthetic / "distorted_images").iterdir())
    crops = TrainCrops([Record(bad, 1.0, "a"), Record(good, 2.0, "b")], patch_num=2, resize=None)
    with pytest.warns(UserWarning, match="bad.png") as record:
        samples = [crops[(i, 0)] for i in range(len(crops))]
    assert len(record) == 1 and samples[0] is None and samples[1] is None  # warned once, for both its samples
    x, y = skip_unreadable(samples)
    assert x.shape == (2, 3, 224, 224) and y.tolist() == [2.0, 2.0]
    assert skip_unreadable([None, None]) is None
