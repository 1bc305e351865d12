"""What a checkpoint file can make load_checkpoint do: read data, nothing else. Malicious pickles
(a command, a file write, an import) are refused naming the global, before any of them runs; a
checkpoint's config cannot name a file to read or arguments LifeIQA does not have."""
import importlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import lifeiqa_fast

from test_model import TINY, _official_checkpoint, tiny


class Payload:
    """Unpickles as fn(*args): what a malicious checkpoint's config object would reduce to."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _malicious(path, payload):
    state = tiny(num_experts=2, depth=2).state_dict()
    torch.save({"model": state, "epoch": 1, "config": {"MODEL": {"SWIN": {"TOP_K": 2}}, "x": payload}}, path)


@pytest.mark.parametrize("make, named", [
    (lambda tmp: Payload(os.system, f"touch {tmp / 'ran'}"), "system"),
    # (pickle protocol 2 names subprocess.call by its Python 2 module)
    (lambda tmp: Payload(subprocess.call, ["touch", str(tmp / "ran")]), "call"),
    (lambda tmp: Payload(np.savetxt, str(tmp / "ran"), [1.0]), "numpy.savetxt"),
    (lambda tmp: Payload(np.save, str(tmp / "ran"), [1.0]), "numpy.save"),
    (lambda tmp: Payload(importlib.import_module, "this"), "importlib.import_module"),
    (lambda tmp: Payload(eval, f"open({str(tmp / 'ran')!r}, 'w')"), "builtins.eval"),
], ids=["os.system", "subprocess", "numpy.savetxt", "numpy.save", "import", "eval"])
def test_malicious_checkpoint_is_refused(tmp_path, make, named):
    path = tmp_path / "evil.pth"
    _malicious(path, make(tmp_path))
    imported = "this" in sys.modules
    for load in (lambda: lifeiqa_fast.load_checkpoint(path, **TINY), lambda: lifeiqa_fast.Scorer(str(path))):
        with pytest.raises(ValueError, match=rf"cannot read {path}.*refused: it names \S*{named}"):
            load()
    assert not (tmp_path / "ran").exists(), "the payload ran"
    assert ("this" in sys.modules) == imported, "the payload imported a module"


def test_official_checkpoint_still_loads_its_numpy_and_yacs_objects(tmp_path):
    """The allow-list's purpose: the authors' numpy max_plcc and yacs config (attributes and all) load
    as data."""
    path = tmp_path / "ckpt.pth"
    _official_checkpoint(tiny(num_experts=4, top_k=1, depth=2), path)
    model = lifeiqa_fast.load_checkpoint(path, **TINY)
    assert model.config["top_k"] == 1 and model.checkpoint_config["DATA"]["DATASET"] == "koniq"
    assert type(model.checkpoint_config).__module__ == "collections"  # no yacs class, no yacs code
    scorer = lifeiqa_fast.Scorer(path, dtype="fp32", model_kwargs=TINY)  # their config says what a score means
    assert (scorer.dataset, scorer.score_range, scorer.lower_better, scorer.resize) == ("koniq", (1.0, 100.0), False,
                                                                                       (512, 384))


@pytest.mark.parametrize("saved, message", [
    (dict(pretrained="/etc/hostname"), "holds 'pretrained'"),
    (dict(backbone_kwargs=dict(checkpoint_path="/etc/hostname")), "holds 'backbone_kwargs.checkpoint_path'"),
    (dict(backbone_kwargs=dict(pretrained_cfg_overlay=dict(file="/etc/hostname"))),
     "holds 'backbone_kwargs.pretrained_cfg_overlay'"),
    (dict(no_such_argument=1), "holds 'no_such_argument'"),
])
def test_checkpoint_config_cannot_name_files_or_unknown_arguments(tmp_path, monkeypatch, saved, message):
    path = tmp_path / "ckpt.pth"
    model = tiny(num_experts=2, depth=2)
    lifeiqa_fast.save_checkpoint(model, path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["LIFEIQA_FAST"].update(saved)
    torch.save(checkpoint, path)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(os.fspath(f)) or real_open(f, *a, **k))
    with pytest.raises(ValueError, match=rf"checkpoint {path}: its config's LIFEIQA_FAST {message}"):
        lifeiqa_fast.load_checkpoint(path)
    assert "/etc/hostname" not in opened


def test_bad_config_value_names_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pth"
    lifeiqa_fast.save_checkpoint(tiny(num_experts=2, depth=2), path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["LIFEIQA_FAST"]["num_heads"] = 0
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=rf"checkpoint {path}: LifeIQA\(.*\): .*num_heads must be a positive int"):
        lifeiqa_fast.load_checkpoint(path)


def test_refusal_is_not_the_fallback_of_plain_pickle_errors(tmp_path):
    """A file torch cannot unpickle for another reason keeps torch's own message."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2)[:-1])  # no STOP
    with pytest.raises(ValueError, match=rf"cannot read {path} as a torch checkpoint"):
        lifeiqa_fast.load_checkpoint(path)


@pytest.mark.parametrize("content, says", [
    (b"hello world\n", "not a torch.save file"),  # torch's own message: "101"
    (b"", "the file is empty"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\": 1}", "safetensors"),
])
def test_unreadable_checkpoint_says_what_the_file_is(tmp_path, content, says):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read {path} as a torch checkpoint .*{says}"):
        lifeiqa_fast.load_checkpoint(path)


def test_truncated_checkpoint_says_it_is_damaged(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.zeros(100)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="zip archive, as torch.save writes, but damaged or cut short"):
        lifeiqa_fast.load_checkpoint(path)


def test_state_dict_of_another_backbone_hints_at_backbone():
    """A bare state dict records the head's sizes but not the backbone: a mismatch says to name it."""
    state_dict = lifeiqa_fast.LifeIQA(backbone="resnet10t", depth=1, num_experts=2).state_dict()
    with pytest.raises(ValueError, match=r'does not match LifeIQA(.|\n)*name it: load_checkpoint\(\.\.\., backbone='):
        lifeiqa_fast.load_checkpoint(state_dict)
    assert lifeiqa_fast.load_checkpoint(state_dict, backbone="resnet10t") is not None
