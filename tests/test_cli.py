"""The lifeiqa-fast command end to end, on photographs that ship with scikit-image."""
import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import lifeiqa_fast

from test_model import tiny

from skimage import data  # real photographs


def _cli(*args, cwd=None, timeout=600):
    exe = shutil.which("lifeiqa-fast")
    assert exe is not None, "pip install installs the lifeiqa-fast script (pyproject [project.scripts])"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of photographs (one in a subfolder, one grayscale), one corrupt JPEG and one text file;
    and a checkpoint of a tiny model written by save_checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "photos"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg", quality=90)
    Image.fromarray(data.camera()).save(folder / "more" / "camera.bmp")
    (folder / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "notes.txt").write_text("not an image")
    model = tiny(num_experts=4, depth=2)
    lifeiqa_fast.save_checkpoint(model, root / "ckpt.pth")
    return root, folder, model


def test_score_folder_reports_and_skips_the_corrupt_file(photos):
    root, folder, model = photos
    out = root / "scores.json"
    result = _cli("score", folder, "--checkpoint", root / "ckpt.pth", "--dtype", "fp32", "--device", "cpu",
                  "--batch-size", "4", "--json", out)
    assert result.returncode == 1, result.stderr  # a file was skipped
    assert "broken.jpg" in result.stderr and "1 of 4 files skipped" in result.stderr
    report = json.loads(out.read_text())
    rows = report["scores"]
    names = [r["path"].split("/")[-1] for r in rows]
    assert names == ["astronaut.png", "broken.jpg", "coffee.jpg", "camera.bmp"]  # sorted, recursive, no .txt
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 3 and rows[1]["score"] is None and "cannot read" in rows[1]["error"]
    for r in good:  # the table on the terminal shows each score
        assert f"{r['score']:8.4f}" in result.stdout
    scorer = lifeiqa_fast.Scorer(model, device="cpu", dtype="fp32", batch_size=4, resize=None)  # as the CLI: in-process
    expected = scorer([r["path"] for r in good])
    torch.testing.assert_close(torch.tensor([r["score"] for r in good]), expected, atol=1e-5, rtol=1e-5)


def test_score_files_and_glob_to_csv(photos):
    root, folder, _ = photos
    out = root / "scores.csv"
    result = _cli("score", folder / "astronaut.png", str(folder / "**" / "*.bmp"), "--checkpoint",
                  root / "ckpt.pth", "--crops", "3", "--csv", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"].split("/")[-1] for r in rows] == ["astronaut.png", "camera.bmp"]
    assert all(np.isfinite(float(r["score"])) and r["error"] == "" for r in rows)


def test_score_without_checkpoint_explains(photos):
    _, folder, _ = photos
    result = _cli("score", folder)
    assert result.returncode == 2
    assert "-m/--model is required" in result.stderr and "trained weights" in result.stderr
    assert "save_pretrained" in result.stderr and "lifeiqa-fast train writes" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["missing_dir/*.png"], "no such file, folder or glob match: missing_dir/*.png"),
    (["{folder}", "--crops", "0"], "--crops"),
    (["{folder}", "--resize", "512by384"], "--resize"),
    (["{folder}", "--batch-size", "0"], "--batch-size must be positive"),
], ids=["missing-path", "bad-crops", "bad-resize", "bad-batch-size"])
def test_score_bad_arguments(photos, args, message):
    root, folder, _ = photos
    args = [a.format(folder=folder) for a in args]
    result = _cli("score", *args, "--checkpoint", root / "ckpt.pth", cwd=root)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_bad_checkpoint(photos):
    root, folder, _ = photos
    bad = root / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = _cli("score", folder, "--checkpoint", bad)
    assert result.returncode == 2 and "cannot read" in result.stderr and "bad.pth" in result.stderr


def test_score_reports_links_fifos_and_devices(photos, tmp_path):
    """Broken links, link loops, FIFOs and devices, in a folder or named directly, are unreadable files:
    reported and skipped (exit 1), never followed or opened; the other files are scored."""
    root, folder, _ = photos
    special = tmp_path / "special"
    special.mkdir()
    shutil.copy(folder / "astronaut.png", special / "astronaut.png")
    (special / "broken.png").symlink_to(special / "nowhere.png")
    (special / "loop_a.jpg").symlink_to(special / "loop_b.jpg")
    (special / "loop_b.jpg").symlink_to(special / "loop_a.jpg")
    os.mkfifo(special / "fifo.png")  # opened, it would wait for a writer: the timeout below fails the test
    (tmp_path / "link.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "scores.csv"
    result = _cli("score", special, tmp_path / "link.png", "/dev/null", "--checkpoint", root / "ckpt.pth",
                  "--dtype", "fp32", "--device", "cpu", "--csv", out, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "6 of 7 files skipped" in result.stderr, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["path"].split("/")[-1] for r in rows] == ["astronaut.png", "broken.png", "fifo.png", "loop_a.jpg",
                                                        "loop_b.jpg", "link.png", "null"]
    assert rows[0]["error"] == "" and np.isfinite(float(rows[0]["score"]))
    for r, why in zip(rows[1:], ["broken symbolic link", "a FIFO", "symbolic links", "symbolic links",
                                 "broken symbolic link", "a character device"]):
        assert r["score"] == "" and why in r["error"] and r["path"] in result.stderr, r
    assert os.listdir(out.parent) == ["scores.csv"]  # written to a temporary file and renamed: none left


@pytest.mark.parametrize("option, where, why", [
    ("--json", "missing/scores.json", "does not exist"),
    ("--csv", "missing/scores.csv", "does not exist"),
    ("--json", ".", "is a folder"),
    ("--csv", "notes.txt/scores.csv", "is not a folder"),
    ("--json", "/proc/scores.json", "cannot create a file in /proc"),  # not writable, even for root
    ("--csv", "read-only/scores.csv", "cannot create a file in"),
], ids=["json-missing-folder", "csv-missing-folder", "json-folder", "csv-under-a-file", "json-unwritable",
        "csv-read-only-folder"])
def test_score_checks_the_output_path_before_scoring(photos, tmp_path, option, where, why):
    root, folder, _ = photos
    if where.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("needs Linux's /proc")
    if where.startswith("read-only"):
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "read-only").mkdir(mode=0o500)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    result = _cli("score", folder / "astronaut.png", "--checkpoint", root / "ckpt.pth", "--device", "cpu",
                  option, where, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "scoring" not in result.stderr  # failed before any scoring
    message = [line for line in result.stderr.splitlines() if line.startswith("lifeiqa-fast score:")]
    assert len(message) == 1 and message[0].startswith(f"lifeiqa-fast score: {option} {where}: "), result.stderr
    assert why in message[0] and "Traceback" not in result.stderr, result.stderr


def test_score_writes_into_a_pipe_in_place(photos, tmp_path):
    """An output that is a pipe (bash's --json >(jq .), /dev/stdout) is written as it is, not replaced by
    a new file as a regular output file is."""
    root, folder, _ = photos
    fifo = tmp_path / "scores.json"
    os.mkfifo(fifo)
    got = {}
    reader = threading.Thread(target=lambda: got.update(text=fifo.read_text()), daemon=True)
    reader.start()
    result = _cli("score", folder / "astronaut.png", "--checkpoint", root / "ckpt.pth", "--device", "cpu",
                  "--json", fifo, timeout=300)
    reader.join(60)
    if reader.is_alive():  # the command never opened the pipe: a writer lets the reader end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(got["text"])["scores"][0]["path"].endswith("astronaut.png")


def test_info_prints_what_the_module_prints():
    result = _cli("info")
    module = subprocess.run([sys.executable, "-m", "lifeiqa_fast.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == module.stdout and "grid_pool" in result.stdout


@pytest.mark.slow
def test_two_gloo_processes_share_the_files_and_rank_0_writes(photos, tmp_path):
    """torchrun --nproc-per-node 2 -m lifeiqa_fast.cli score: each process scores every other file; one
    output, in input order, with the scores one process gives."""
    root, folder, model = photos
    out = tmp_path / "scores.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "lifeiqa_fast.cli", "score", str(folder), "-m", str(root / "ckpt.pth"), "--dtype", "fp32", "--device", "cpu",
         "-o", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # broken.jpg is skipped (the exit status says so)
    assert os.listdir(tmp_path) == ["scores.json"]  # one output, no temporary file left
    report = json.loads(out.read_text())
    assert report["scores"] and "2 processes" in result.stdout
    alone = lifeiqa_fast.Scorer(root / "ckpt.pth", dtype="fp32", device="cpu", resize=None).score_files(folder)
    assert [r["path"] for r in report["scores"]] == [str(r.path) for r in alone]
    for row, r in zip(report["scores"], alone):
        assert (row["score"] is None) == (r.score is None)
        if r.score is not None:
            assert row["score"] == pytest.approx(r.score, abs=1e-5)
    assert result.stdout.count("mean score") == 1  # rank 0 alone prints
