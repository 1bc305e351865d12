"""lifeiqa_fast.Scorer: scores are the model's own (mean over 224 crops), whatever the input type,
batching or crop protocol; bad input fails loudly. Tiny Swin, real photographs (skimage.data).
dtype="fp32" is explicit wherever numbers are compared: "auto" picks bf16 on CPUs with AVX512-BF16."""
import contextlib
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lifeiqa_fast
from lifeiqa_fast import Scorer
from lifeiqa_fast.images import crop_corners, find_images, image_tensor, resize_image

from test_model import tiny

from skimage import data  # real photographs

# Most tests use a model that records no training dataset, on purpose: the warning that resize="auto" then
# does not resize is checked in test_scale.py.
pytestmark = pytest.mark.filterwarnings("ignore:lifeiqa_fast.Scorer. the model records no training dataset")

# Spelled out here (not imported from the scorer) so that a wrong constant there fails the tests.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model():
    return tiny(num_experts=4, depth=2).eval()


def photo(name: str, h: int | None = None, w: int | None = None) -> torch.Tensor:
    """An skimage.data RGB photograph as a (3, H, W) uint8 tensor, its top-left h x w."""
    return torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[:, :h, :w].contiguous()


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


@torch.no_grad()
def model_mean(model, crops: list[torch.Tensor]) -> torch.Tensor:
    """What the Scorer must return for an image with these uint8 224 crops: the model's mean score."""
    x = (torch.stack(crops).float() / 255 - MEAN) / STD
    return model(x)[0].mean().view(1)


def grid_crops(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[:, t:t + 224, l:l + 224] for t, l in crop_corners(x.shape[1], x.shape[2], "grid", 0)]


def assert_same(actual, expected, atol, msg=None):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def test_score_is_the_models_output(model):
    face = photo("astronaut")[:, 20:244, 150:374]  # exactly 224 x 224: one crop, the model's score itself
    assert_same(Scorer(model, dtype="fp32")(face), model_mean(model, [face]), 1e-5)
    cat = photo("chelsea")  # 300 x 451: a 2 x 3 grid, the mean of the model's 6 scores
    assert len(grid_crops(cat)) == 6
    assert_same(Scorer(model, dtype="fp32")(cat), model_mean(model, grid_crops(cat)), 1e-5)


def test_grid_covers_the_image():
    assert crop_corners(224, 224, "grid", 0) == [(0, 0)]
    assert crop_corners(512, 384, "grid", 0) == [(t, l) for t in (0, 144, 288) for l in (0, 160)]
    for h, w in [(225, 224), (300, 451), (448, 449), (1000, 667)]:
        corners = crop_corners(h, w, "grid", 0)
        for axis, side in ((0, h), (1, w)):
            starts = sorted({c[axis] for c in corners})
            assert len(starts) == math.ceil(side / 224) and starts[0] == 0 and starts[-1] == side - 224
            assert all(b - a <= 224 for a, b in zip(starts, starts[1:]))  # no gap between crops
        assert len(corners) == math.ceil(h / 224) * math.ceil(w / 224)


def test_random_crops_are_in_range_and_seeded():
    corners = crop_corners(512, 384, 25, seed=3)
    assert len(corners) == 25 and all(0 <= t <= 288 and 0 <= l <= 160 for t, l in corners)
    assert len(set(corners)) > 1  # really random
    assert corners == crop_corners(512, 384, 25, seed=3)
    assert corners != crop_corners(512, 384, 25, seed=4)


def test_deterministic_and_independent_of_batching(model):
    # 1 + 6 + 4 crops: with batch_size 3 the batches straddle images, with 32 all share one batch.
    images = [photo("astronaut", 224, 224), photo("chelsea"), photo("coffee", 260, 300)]
    scorer = Scorer(model, dtype="fp32", batch_size=3)
    together = scorer(images)
    assert torch.equal(scorer(images), together)  # bitwise, call after call
    alone = torch.cat([scorer(x) for x in images])
    assert_same(together, alone, 1e-5)
    assert_same(Scorer(model, dtype="fp32", batch_size=32)(images), alone, 1e-5)
    # The official protocol (N random crops, seeded): the same crops in every call and every instance.
    protocol = Scorer(model, dtype="fp32", crops=5, seed=1)
    random_scores = protocol(images)
    assert torch.equal(protocol(images), random_scores)
    assert torch.equal(Scorer(model, dtype="fp32", crops=5, seed=1)(images), random_scores)
    assert not torch.equal(Scorer(model, dtype="fp32", crops=5, seed=2)(images), random_scores)


def test_input_types_agree(model, tmp_path):
    scorer = Scorer(model, dtype="fp32")
    x, other = photo("coffee", 260, 300), photo("chelsea", 230, 240)
    Image.fromarray(hwc(x)).save(tmp_path / "coffee.png")
    expected = scorer(x)
    inputs = {"float": x.float() / 255, "pil": Image.fromarray(hwc(x)), "numpy": hwc(x),
              "path": tmp_path / "coffee.png", "str": str(tmp_path / "coffee.png"), "list": [x]}
    for name, image in inputs.items():
        assert_same(scorer(image), expected, 1e-6, msg=name)
    assert_same(scorer(torch.stack([x, x])), expected.repeat(2), 1e-6)  # a (B, 3, H, W) batch
    mixed = scorer([x.float() / 255, other])  # float and uint8 crops sharing one batch
    assert_same(mixed, torch.cat([expected, scorer(other)]), 1e-6)
    gray = data.camera()[:230, :240]  # (H, W): the same as its three-channel copy
    assert_same(scorer(gray), scorer(torch.from_numpy(gray).expand(3, -1, -1)), 1e-6)
    # A folder: recursive, sorted by path (not by creation), other suffixes skipped; a glob.
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for name, image in (("b.png", other), ("sub/c.png", x), ("a.png", x[:, :, :224])):
        Image.fromarray(hwc(image)).save(tmp_path / "dir" / name)
    (tmp_path / "dir" / "readme.txt").write_text("not an image")
    parts = [scorer(x[:, :, :224]), scorer(other), expected]
    assert_same(scorer(tmp_path / "dir"), torch.cat(parts), 1e-6)
    assert_same(scorer(str(tmp_path / "dir" / "*.png")), torch.cat(parts[:2]), 1e-6)
    # in a list too: paths, folders and globs expand in place, beside in-memory images
    assert_same(scorer([x, tmp_path / "dir", str(tmp_path / "dir" / "*.png")]),
                torch.cat([expected, *parts, *parts[:2]]), 1e-6)
    # a 16-bit grey PNG is scaled to 8 bits, not clipped to white
    gray16 = gray.astype(np.uint16) * 257
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert_same(scorer(tmp_path / "gray16.png"), scorer(gray), 1e-6)


def test_unreadable_files_get_nan_and_a_reason(model, tmp_path):
    scorer = Scorer(model, dtype="fp32")
    good = photo("chelsea", 224, 224)
    Image.fromarray(hwc(good)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "notes.jpg").write_text("meeting notes, not a photograph")
    with pytest.warns(UserWarning) as record:
        scores = scorer(tmp_path)  # sorted: bad.jpg, good.png, notes.jpg
    assert math.isnan(scores[0]) and math.isnan(scores[2])
    assert_same(scores[1:2], scorer(good), 1e-6)
    messages = " | ".join(str(w.message) for w in record)
    assert "bad.jpg" in messages and "notes.jpg" in messages, messages
    results = scorer.score_files(tmp_path)
    assert [(r.path.name, r.score is None) for r in results] == [("bad.jpg", True), ("good.png", False),
                                                                  ("notes.jpg", True)]
    assert results[1].error is None and results[1].score == pytest.approx(scores[1].item())
    for r in (results[0], results[2]):
        assert r.path.name in r.error and "cannot read" in r.error, r.error


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(crops="random"), "crops must be 'grid', 'official' or a positive int, got 'random'"),
    (dict(crops=0), "crops must be 'grid', 'official' or a positive int, got 0"),
    (dict(crops=True), "crops must be 'grid', 'official' or a positive int, got True"),
    (dict(resize="512x384"), r"resize must be 'auto', None, \(H, W\) or a short side"),
    (dict(resize=(512, 100)), r"each >= 224, got \(512, 100\)"),
    (dict(resize=100), r"each >= 224, got 100"),
    (dict(dtype="int8"), "dtype must be .* got 'int8'"),
    (dict(dtype="fp16"), "fp16 is for CUDA"),
    (dict(max_crops=0), "max_crops must be a positive int or None, got 0"),
    (dict(data_range=0), "data_range must be a positive number"),
    (dict(data_range=math.inf), "data_range must be a positive number"),
    (dict(errors="skip"), "errors must be 'nan' or 'raise', got 'skip'"),
    (dict(dataset="imagenet"), "dataset must be one of live, csiq, .* got 'imagenet'"),
    (dict(normalize=True), r"normalize=True needs the model's score scale, which is unknown"),
    (dict(crops="official"), "crops='official' is the authors' protocol for the model's dataset, which is not recorded"),
    (dict(crops="official", dataset="koniq", dtype="bf16"), "crops='official' runs in fp32"),
    (dict(crops="official", dataset="koniq", resize=None), "crops='official' runs in fp32 with the authors' resize"),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Scorer(model, device="cpu", **kwargs)


def test_bad_model(tmp_path):
    with pytest.raises(TypeError, match="model must be a module, a checkpoint path, .* got int"):
        Scorer(42)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Scorer(tmp_path / "missing.pth")


@pytest.mark.parametrize("images, error, match", [
    (torch.zeros(0, 3, 224, 224, dtype=torch.uint8), ValueError, "batch is empty"),
    ([], ValueError, "no images given"),
    (torch.zeros(4, 224, 224), ValueError, r"\(3, H, W\) or \(1, H, W\), got \(4, 224, 224\)"),  # a caller's bug: raised, not NaN
    (torch.zeros(3, 224, 224, dtype=torch.int64), ValueError, "uint8 or floating point, got torch.int64"),
    (np.zeros((2, 224, 224, 3), np.uint8), ValueError, r"\(H, W\) or \(H, W, 1, 3 or 4\)"),  # a batch as an array
    ([object()], TypeError, "path, PIL image, numpy array or tensor, got object"),
    ("no/such/photo.png", FileNotFoundError, "no/such/photo.png"),
    (["no/such/photo.png"], FileNotFoundError, "no/such/photo.png"),
], ids=["empty-batch", "empty-list", "4-channels", "int64", "array-batch", "object", "missing-path",
        "missing-path-in-list"])
def test_bad_images(model, images, error, match):
    with pytest.raises(error, match=match):
        Scorer(model, dtype="fp32")(images)


def test_small_images_are_enlarged(model):
    small = photo("chelsea", 100, 150)  # short side to 224, aspect kept: 224 x 336, a 1 x 2 grid
    score = Scorer(model, dtype="fp32")(small)
    assert torch.isfinite(score).all()
    enlarged = F.interpolate(small[None].float(), size=(224, 336), mode="bilinear", antialias=True)
    enlarged = enlarged[0].round().clamp(0, 255).to(torch.uint8)
    assert_same(score, model_mean(model, grid_crops(enlarged)), 1e-5)


def test_resize_before_cropping(model):
    image = Image.fromarray(data.coffee())  # 400 x 600 -> 512 x 384: rows 0 144 288, columns 0 160
    resized = torch.from_numpy(np.array(image.resize((384, 512), Image.BILINEAR))).permute(2, 0, 1)
    crops = [resized[:, t:t + 224, l:l + 224] for t in (0, 144, 288) for l in (0, 160)]
    assert_same(Scorer(model, dtype="fp32", resize=(512, 384))(image), model_mean(model, crops), 1e-5)
    # an int: the short side, the aspect kept: 400 x 600 -> 256 x 384, rows 0 32, columns 0 160
    kept = torch.from_numpy(np.array(image.resize((384, 256), Image.BILINEAR))).permute(2, 0, 1)
    crops = [kept[:, t:t + 224, l:l + 224] for t in (0, 32) for l in (0, 160)]
    assert_same(Scorer(model, dtype="fp32", resize=256)(image), model_mean(model, crops), 1e-5)


def test_resize_auto_follows_the_checkpoint_dataset(model, tmp_path):
    for dataset, size in (("koniq", (512, 384)), ("livec", None)):
        path = tmp_path / f"{dataset}.pth"
        lifeiqa_fast.save_checkpoint(model, path, config={"DATA": {"DATASET": dataset}})
        assert Scorer(path, dtype="fp32").resize == size
    assert Scorer(model, dtype="fp32").resize is None  # no saved config
    assert Scorer(tmp_path / "koniq.pth", resize=None).resize is None  # the caller's choice wins
    face = photo("astronaut", 224, 224)  # the loaded model is the saved one
    assert_same(Scorer(tmp_path / "livec.pth", dtype="fp32")(face), model_mean(model, [face]), 1e-5)


def test_bf16_is_close_and_the_callers_model_untouched():
    caller = tiny(num_experts=4, depth=2, impl="reference")  # training mode, reference ops
    cls, state = type(caller), {k: v.clone() for k, v in caller.state_dict().items()}
    images = [photo("astronaut", 300, 300), photo("coffee", 300, 300), photo("chelsea"), data.camera()[:300, :300]]
    fp32 = Scorer(caller, dtype="fp32")(images)
    bf16_scorer = Scorer(caller, dtype="bf16")
    bf16 = bf16_scorer(images)
    assert next(bf16_scorer.model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(bf16).all() and not torch.equal(bf16, fp32)  # it really ran in bf16
    assert_same(bf16, fp32, 0.05)
    assert type(caller) is cls and caller.impl == "reference" and caller.training
    assert all(p.dtype == torch.float32 and p.requires_grad for p in caller.parameters())
    torch.testing.assert_close(caller.state_dict(), state, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_matches_eager(model):
    # 1 + 4 crops with batch_size 4: a full batch, then one crop padded to the compiled shape.
    images = [photo("astronaut", 224, 224), photo("coffee", 260, 300)]
    eager = Scorer(model, dtype="fp32", batch_size=4)(images)
    assert_same(Scorer(model, dtype="fp32", batch_size=4, compile=True)(images), eager, 1e-4)


def test_damaged_png_and_16_bit_pil_image(model, tmp_path):
    """A PNG with damaged bytes (PIL raises SyntaxError on it) gets NaN like any unreadable file; a
    16-bit PIL image in memory is scaled to 8 bits as a 16-bit file is."""
    scorer = Scorer(model, dtype="fp32")
    Image.fromarray(hwc(photo("coffee", 224, 224))).save(tmp_path / "coffee.png")
    damaged = bytearray((tmp_path / "coffee.png").read_bytes())
    damaged[40:45] = b"\xff\x00\xff\x00\xff"
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="damaged.png"):
        assert math.isnan(scorer(tmp_path / "damaged.png")[0])
    gray = data.camera()[:230, :240]
    assert_same(scorer(Image.fromarray(gray.astype(np.uint16) * 257)), scorer(gray), 1e-6)


def test_resize_auto_follows_the_training(model, tmp_path):
    path = tmp_path / "koniq-aspect.pth"  # trained on KonIQ with --resize aspect: the short side to 384
    lifeiqa_fast.save_checkpoint(model, path, config={"DATA": {"DATASET": "koniq", "RESIZE": 384}})
    assert Scorer(path, dtype="fp32").resize == 384
    lifeiqa_fast.save_checkpoint(model, path, config={"DATA": {"DATASET": "koniq", "RESIZE": "none"}})
    assert Scorer(path, dtype="fp32").resize is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_scores(model):
    """Replayed graphs (the native kernels capture; batches of 2 and a padded last one) score as eagerly."""
    images = [photo("astronaut", 224, 224), photo("coffee", 224, 224), photo("chelsea", 224, 224)]
    eager = Scorer(model, device="cuda", dtype="fp32", batch_size=2, cuda_graphs=False, impl="native")(images)
    graphed = Scorer(model, device="cuda", dtype="fp32", batch_size=2, impl="native")
    assert_same(graphed(images), eager, 1e-4)
    assert graphed.cuda_graphs and graphed._graph is not None  # captured, not fallen back to eager


@contextlib.contextmanager
def fails_if_a_fifo_is_opened(fifo, seconds: float = 60):
    """Fails the block if something opened fifo for reading: such an open waits for a writer forever.
    After seconds a writer comes (and goes), so that the waiting thread ends and the test fails rather
    than hangs."""
    opened = threading.Event()

    def writer():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO unless a reader waits
            opened.set()
        except OSError:
            pass

    timer = threading.Timer(seconds, writer)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        writer()  # a reader still waiting now is a failure too
    assert not opened.is_set(), f"{fifo} was opened: a FIFO must be reported, never read"


def special_files(folder):
    """Entries of folder that are named like images but are not readable regular files, by what they
    are: a broken link, a link loop (a -> b -> a), a FIFO, a link to a character device."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.png").symlink_to(folder / "nowhere.png")
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    os.mkfifo(folder / "fifo.png")
    (folder / "null.bmp").symlink_to("/dev/null")
    return {"broken": folder / "broken.png", "loop": folder / "loop_a.jpg", "fifo": folder / "fifo.png",
            "device": folder / "null.bmp"}


def test_find_images_keeps_special_files_without_following_them(tmp_path):
    special = special_files(tmp_path / "dir")
    Image.fromarray(hwc(photo("chelsea", 224, 224))).save(tmp_path / "dir" / "good.png")
    os.mkfifo(tmp_path / "dir" / "pipe")  # not named like an image: left out, as notes.txt is
    (tmp_path / "dir" / "notes.txt").write_text("not an image")
    for path in [*special.values(), "/dev/null"]:  # named directly: kept, for reading to report
        assert find_images(path) == [Path(path)], path
        assert find_images(str(path)) == [Path(path)], path
    assert [p.name for p in find_images(tmp_path / "dir")] == ["broken.png", "fifo.png", "good.png", "loop_a.jpg",
                                                                "loop_b.jpg", "null.bmp"]
    assert [p.name for p in find_images(str(tmp_path / "dir" / "*.png"))] == ["broken.png", "fifo.png", "good.png"]


def test_special_files_get_nan_and_a_reason(model, tmp_path):
    special = special_files(tmp_path / "dir")
    good = photo("chelsea", 224, 224)
    Image.fromarray(hwc(good)).save(tmp_path / "dir" / "good.png")
    scorer = Scorer(model, dtype="fp32")
    reasons = {"broken": "broken symbolic link", "loop": "Too many levels of symbolic links",
               "fifo": "a FIFO", "device": "a character device"}
    with fails_if_a_fifo_is_opened(special["fifo"]):
        results = scorer.score_files([tmp_path / "dir", *special.values(), "/dev/null"])
        with pytest.warns(UserWarning) as record:
            scores = scorer([good, special["fifo"], "/dev/null", tmp_path / "dir" / "good.png"])
    by_name = {r.path.name: r for r in results[:6]}
    assert list(by_name) == ["broken.png", "fifo.png", "good.png", "loop_a.jpg", "loop_b.jpg", "null.bmp"]
    assert by_name["good.png"].error is None
    assert by_name["good.png"].score == pytest.approx(scorer(good).item(), abs=1e-6)
    assert [r.score is None for r in by_name.values()] == [True, True, False, True, True, True]
    for kind, path in special.items():  # in the folder and named directly
        for r in (by_name[path.name], results[6 + list(special).index(kind)]):
            assert r.score is None and str(path) in r.error and "cannot read" in r.error, r.error
            assert reasons[kind] in r.error, r.error
    assert results[-1].score is None and "/dev/null" in results[-1].error and "a character device" in results[-1].error
    assert math.isnan(scores[1]) and math.isnan(scores[2])
    assert_same(scores[[0, 3]], scorer(good).repeat(2), 1e-6)
    messages = " | ".join(str(w.message) for w in record)
    assert "fifo.png" in messages and "/dev/null" in messages, messages


@pytest.mark.parametrize("images, match", [
    (torch.full((3, 224, 224), 255.0), r"images is a float image .* must be in \[0, 1\], got min 255, max 255"),
    (torch.linspace(-1, 1, 3 * 224 * 224).view(3, 224, 224), r"must be in \[0, 1\], got min -1, max 1"),
    (torch.full((2, 3, 224, 224), 0.5).index_fill_(0, torch.tensor([1]), 2.0),  # the batch's second image
     r"images\[1\] is a float image .* got min 2, max 2"),
    ([torch.rand(3, 224, 224), np.full((224, 224, 3), 128.0, np.float32)], r"images\[1\] .* got min 128, max 128"),
    ([torch.full((3, 224, 224), math.nan)], r"images\[0\] .* got min nan, max nan"),
    (torch.full((3, 224, 224), 1.5, dtype=torch.bfloat16), r"got min 1.5, max 1.5"),
    (Image.fromarray(np.full((224, 224), 200.0, np.float32)), r"images is a float \(mode F\) PIL image, .* must be "
                                                              r"in \[0, 1\], got min 200, max 200"),
    (Image.fromarray(np.full((224, 224), -5, np.int32)), r"mode I\) PIL image, .* must be in \[0, 65535\], got min -5"),
], ids=["0-255", "-1-1", "batch", "numpy-in-list", "nan", "bf16", "pil-F", "pil-I"])
def test_out_of_range_images_fail_before_scoring(model, images, match):
    scorer = Scorer(model, dtype="fp32", batch_size=1)  # a batch per crop: a good first image would run at once
    calls = []
    scorer._forward = lambda x: calls.append(x) or scorer.model(x)
    with pytest.raises(ValueError, match=match):
        scorer(images)
    assert not calls  # checked at the boundary: nothing was scored first


def test_float_rounding_past_0_and_1_is_accepted(model):
    x = photo("coffee", 224, 224).float() / 255
    scorer = Scorer(model, dtype="fp32")
    nudged = x.clone()
    nudged[0, 0, 0], nudged[1, 0, 0] = -5e-4, 1 + 5e-4  # what a float resize overshoots by
    assert_same(scorer(nudged), scorer(nudged.clamp(0, 1)), 1e-4)
    gray = Image.fromarray(data.camera()[:224, :224].astype(np.float32) / 255)  # mode F in [0, 1]
    assert_same(scorer(gray), scorer(data.camera()[:224, :224]), 1e-5)


@pytest.mark.parametrize("image, size", [
    (torch.zeros(3, 0, 0), "0 x 0"),
    (torch.zeros(3, 0, 300, dtype=torch.uint8), "0 x 300"),  # no rows
    (np.zeros((5, 0, 3), np.uint8), "5 x 0"),  # no columns
    (np.zeros((0, 0), np.float32), "0 x 0"),
    (Image.new("RGB", (0, 0)), "0 x 0"),
    (Image.new("RGB", (300, 0)), "0 x 300"),
], ids=["tensor", "tensor-no-rows", "array-no-columns", "grey-array", "pil", "pil-no-rows"])
def test_empty_images_are_named(model, image, size):
    with pytest.raises(ValueError, match=rf"images has no pixels \(H x W = {size}\)"):
        Scorer(model, dtype="fp32")(image)
    with pytest.raises(ValueError, match=rf"image has no pixels \(H x W = {size}\)"):
        image_tensor(image, resize=(512, 384))
    with pytest.raises(ValueError, match=r"resize_image: the image has no pixels \(H x W = 0 x 5\)"):
        resize_image(None, torch.zeros(3, 0, 5), 224)


def test_an_empty_image_file_is_reported(model, tmp_path, monkeypatch):
    """Pillow refuses to open most empty image files itself ("cannot identify"); one that a decoder
    does open as 0 x 0 is reported like any unreadable file, beside the others' scores."""
    good = photo("chelsea", 224, 224)
    Image.fromarray(hwc(good)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"decoded as 0 x 0 below")
    (tmp_path / "zero.ppm").write_bytes(b"P6\n0 0\n255\n")  # a 0 x 0 PPM header, as Pillow meets it
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args, **kwargs: Image.new("RGB", (0, 0))
                        if Path(path).name == "empty.png" else real_open(path, *args, **kwargs))
    scorer = Scorer(model, dtype="fp32")
    for resize in (None, (512, 384)):  # decoded, then resized, in the worker threads
        scorer.resize = resize
        results = scorer.score_files(tmp_path)
        assert [r.path.name for r in results] == ["empty.png", "good.png", "zero.ppm"]
        assert "empty.png" in results[0].error and "has no pixels (H x W = 0 x 0)" in results[0].error
        assert "zero.ppm" in results[2].error and "cannot read" in results[2].error
        assert results[1].score == pytest.approx(scorer(good).item(), abs=1e-5)


def test_read_only_array_scores_without_a_warning():
    """np.asarray of a PIL image is read-only: scored as any array, with no warning from torch."""
    import warnings

    model = tiny().eval()
    photo = np.asarray(Image.fromarray(data.astronaut()))
    assert not photo.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = Scorer(model, batch_size=1, crops=1, resize=None)([photo])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


# --- the tensor contract: data_range, grey images, the output's device, errors="raise", max_crops

def test_data_range_scales_float_images(model):
    face = photo("astronaut", 224, 260).float()
    unit = Scorer(model, dtype="fp32", resize=None)
    assert_same(Scorer(model, dtype="fp32", resize=None, data_range=255)(face), unit(face / 255), 1e-6)
    assert_same(Scorer(model, dtype="fp32", resize=None, data_range=255)([hwc(face)]), unit(face / 255), 1e-6)
    with pytest.raises(ValueError, match=r"got min 0, max 255 \(a float image in 0..255 needs data_range=255\)"):
        unit(face)
    with pytest.raises(ValueError, match=r"must be in \[0, 255\], got min 0, max 510"):
        Scorer(model, dtype="fp32", resize=None, data_range=255)(face * 2)


def test_grey_images_are_scored_as_rgb(model):
    grey = torch.from_numpy(data.camera())[:240, :300]  # (H, W) uint8
    rgb = grey.expand(3, -1, -1)
    scorer = Scorer(model, dtype="fp32", resize=None)
    expected = model_mean(model, grid_crops(rgb))
    for image in (grey[None], grey[None].float() / 255, grey.numpy()[:, :, None]):
        assert_same(scorer(image), expected, 1e-5)
    assert_same(scorer(torch.stack([grey[None], grey[None]])), expected.repeat(2), 1e-5)  # (B, 1, H, W)


def test_scores_of_a_tensor_are_on_its_device(model, tmp_path):
    scorer = Scorer(model, dtype="fp32", device="cpu")
    face = photo("astronaut", 224, 224)
    assert scorer(face).device == face.device and scorer(face[None]).device == face.device
    if torch.cuda.is_available():  # a GPU caller gets GPU scores whatever device the model runs on
        assert scorer(face.cuda()).device.type == "cuda"


def test_errors_raise_stops_at_the_unreadable_file(model, tmp_path):
    Image.fromarray(hwc(photo("chelsea", 224, 224))).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(lifeiqa_fast.images.ImageError, match="cannot read .*b.jpg"):
        Scorer(model, dtype="fp32", errors="raise")(tmp_path)
    with pytest.raises(lifeiqa_fast.images.ImageError, match="b.jpg"):
        Scorer(model, dtype="fp32", errors="raise").score_files(tmp_path)


def test_grid_crops_are_capped_and_spread(model):
    assert len(crop_corners(3000, 4000, "grid", 0)) == 14 * 18  # no cap: the grid covers the photograph
    capped = crop_corners(3000, 4000, "grid", 0, max_crops=20)
    tops, lefts = sorted({t for t, _ in capped}), sorted({l for _, l in capped})
    assert len(capped) <= 20 and len(tops) * len(lefts) == len(capped) and len(capped) >= 16
    assert tops[0] == 0 and tops[-1] == 3000 - 224 and lefts[0] == 0 and lefts[-1] == 4000 - 224  # edge to edge
    steps = np.diff(lefts)
    assert steps.max() - steps.min() <= 1  # evenly
    big = torch.zeros(3, 3000, 4000, dtype=torch.uint8)
    assert Scorer(model, dtype="fp32", resize=None)._crops(None, big, None).shape[0] == len(capped)
    assert Scorer(model, dtype="fp32", resize=None, max_crops=None)._crops(None, big, None).shape[0] == 252
    assert crop_corners(512, 384, "grid", 0, max_crops=20) == crop_corners(512, 384, "grid", 0)  # under the cap
