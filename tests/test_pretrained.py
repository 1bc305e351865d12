"""save_pretrained / from_pretrained: a folder of model.safetensors and config.json that loads anywhere,
from a path or a Hugging Face Hub repo (tested offline, in a cache laid out as huggingface_hub lays it)."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from PIL import Image

import lifeiqa_fast
from lifeiqa_fast import Scorer
from lifeiqa_fast.pretrained import from_pretrained, save_pretrained

from test_cli import _cli
from test_model import tiny
from test_scorer import photo


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny KonIQ model (it records its dataset, as lifeiqa_fast.train's models do) and its folder."""
    model = tiny(num_experts=4, depth=2, adjacency="learnable").eval()
    model.checkpoint_config = {"DATA": {"DATASET": "koniq"}}
    folder = tmp_path_factory.mktemp("pretrained") / "koniq-tiny"
    assert model.save_pretrained(folder) == folder
    return model, folder


def test_the_folder_holds_weights_and_everything_else(saved):
    model, folder = saved
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]  # nothing left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == json.loads(json.dumps(model.config))  # every constructor argument
    assert config["dataset"] == "koniq"
    assert config["score_scale"]["score_range"] == [1.0, 100.0] and config["score_scale"]["lower_better"] is False
    pre = config["preprocessing"]
    assert pre["resize"] == [512, 384] and pre["crop_size"] == 224 and pre["official_test_crops"] == 40
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]


def test_from_pretrained_is_the_same_model(saved):
    model, folder = saved
    loaded = lifeiqa_fast.LifeIQA.from_pretrained(folder)
    assert json.dumps(loaded.config) == json.dumps(json.loads(json.dumps(model.config)))  # tuples: lists
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    scorer = Scorer(folder, dtype="fp32")  # a folder is a model source like a .pth
    assert (scorer.dataset, scorer.resize, scorer.lower_better) == ("koniq", (512, 384), False)
    face = photo("coffee")
    reference = Scorer(model, dtype="fp32")
    torch.testing.assert_close(scorer(face), reference(face), atol=0, rtol=0)
    assert Scorer(folder, crops="official").crops == 40


def test_a_save_replaces_the_files_and_names_what_is_wrong(saved, tmp_path):
    model, folder = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    save_pretrained(model, copy, dataset="spaq")  # the caller names the dataset: it wins
    assert json.loads((copy / "config.json").read_text())["dataset"] == "spaq"
    with pytest.raises(TypeError, match="model must be a lifeiqa_fast.LifeIQA"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    config = json.loads((copy / "config.json").read_text())
    config["model"]["backbone_kwargs"]["checkpoint_path"] = "/etc/passwd"  # a config never names a file to read
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="backbone_kwargs.checkpoint_path"):
        from_pretrained(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        from_pretrained(copy)
    (copy / "config.json").write_text(json.dumps({"format": "someone-else", "model": {}}))
    with pytest.raises(ValueError, match="is not a lifeiqa_fast config"):
        from_pretrained(copy)
    shutil.copy(folder / "config.json", copy / "config.json")
    (copy / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="cannot load .*model.safetensors"):
        from_pretrained(copy)
    os.remove(copy / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(copy)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hugging Face Hub repo id"):
        from_pretrained(tmp_path / "missing" / "deeper" / "folder")
    with pytest.raises(FileNotFoundError, match="no checkpoint file at runs/ckpt.pth"):
        Scorer("runs/ckpt.pth")  # two parts, but a checkpoint's name: not taken for a Hub repo


def _hub_cache(cache, folder, repo="lifeiqa/koniq-tiny"):
    """A Hugging Face Hub cache holding repo at one commit, as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)
    return repo


def test_from_the_hub_cache_offline(saved, tmp_path, monkeypatch):
    import huggingface_hub  # (conftest refuses to run the suite without it)

    model, folder = saved
    repo = _hub_cache(tmp_path / "hub", folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = from_pretrained(repo, cache_dir=tmp_path / "hub")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no local folder lifeiqa/other, and cannot get it from the Hugging Face Hub"):
        from_pretrained("lifeiqa/other", cache_dir=tmp_path / "hub")


def test_cli_scores_with_a_hub_repo_id_offline(saved, tmp_path):
    model, folder = saved
    repo = _hub_cache(tmp_path / "hub", folder)
    image = tmp_path / "coffee.png"
    Image.fromarray(photo("coffee").permute(1, 2, 0).numpy()).save(image)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([shutil.which("lifeiqa-fast"), "score", str(image), "-m", repo, "--dtype", "fp32",
                             "--device", "cpu", "-o", str(tmp_path / "out.json")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    expected = Scorer(folder, dtype="fp32")(image)
    assert report["dataset"] == "koniq" and report["scores"][0]["score"] == pytest.approx(expected.item(), abs=1e-5)


def test_cli_takes_a_folder_as_the_model(saved, tmp_path):
    _, folder = saved
    image = tmp_path / "face.png"
    Image.fromarray(photo("astronaut", 300, 300).permute(1, 2, 0).numpy()).save(image)
    result = _cli("score", image, "-m", folder, "--dtype", "fp32", "--device", "cpu")
    assert result.returncode == 0 and "koniq: MOS_zscore, 1..100, higher is better" in result.stdout, result.stderr
