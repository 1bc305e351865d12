"""lifeiqa_fast.export_onnx: the tiny model exported by torch.onnx's dynamo exporter and run in ONNX
Runtime on the CPU gives the PyTorch model's scores, with a dynamic or a fixed batch, and the file
says what its scores mean."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import lifeiqa_fast
from lifeiqa_fast.export import INPUT_CONTRACT, onnx_scores, onnx_session
from lifeiqa_fast.scale import scale_of
from lifeiqa_fast.images import MEAN, STD

from test_model import tiny
from test_optimize import authors_model

# fp32 throughout: the exported graph sums in other orders than PyTorch's kernels (seen: 5e-7 on the
# tiny model's scores, which are of order 1)
ATOL = 1e-4


def _crops(batch, seed=0):
    """(B, 3, 224, 224) RGB in [0, 1], the file's input."""
    return torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _pytorch_scores(model, crops):
    """The model's scores of crops normalised as lifeiqa_fast.Scorer does: (B,) numpy."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((crops - mean) / std)[0].view(-1).numpy()


def _snapshot(model):
    """What exporting must leave as it was: the model's impl and a copy of every parameter and buffer."""
    return getattr(model, "impl", None), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    impl, state = snapshot
    assert getattr(model, "impl", None) == impl
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), k


@pytest.fixture(scope="module")
def dynamic_export(tmp_path_factory):
    """(the tiny model, its snapshot before exporting, the file exported with a dynamic batch)."""
    model = tiny(num_experts=4, depth=2).eval()
    model.checkpoint_config = {"DATA": {"DATASET": "koniq"}}  # as load_checkpoint sets it
    snapshot = _snapshot(model)
    path = lifeiqa_fast.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, snapshot, path


@pytest.mark.parametrize("batch", [1, 3], ids=["one crop", "three crops"])
def test_dynamic_batch_matches_the_reference_model(dynamic_export, batch):
    model, _, path = dynamic_export
    reference = tiny(num_experts=4, depth=2, impl="reference").eval()
    reference.load_state_dict(model.state_dict())
    crops = _crops(batch)
    got = onnx_scores(path, crops)
    assert got.shape == (batch,) and got.dtype == np.float32
    np.testing.assert_allclose(got, _pytorch_scores(reference, crops), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, _pytorch_scores(model, crops), rtol=0, atol=ATOL)


def test_dynamic_batch_is_symbolic_in_the_graph(dynamic_export):
    graph = onnx.load(dynamic_export[2]).graph
    (crops,), (scores,) = graph.input, graph.output
    assert (crops.name, scores.name) == ("crops", "scores")
    dims = crops.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert scores.type.tensor_type.shape.dim[0].dim_param == dims[0].dim_param


def test_metadata_says_what_a_score_means(dynamic_export):
    model, _, path = dynamic_export
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["lifeiqa_fast.score_scale"]) == scale_of("koniq").as_dict()
    assert meta["lifeiqa_fast.input"] == INPUT_CONTRACT
    assert meta["lifeiqa_fast.version"] == lifeiqa_fast.__version__
    assert json.loads(meta["lifeiqa_fast.config"]) == json.loads(json.dumps(model.config))


def test_export_leaves_the_callers_model_as_it_was(dynamic_export):
    model, snapshot, _ = dynamic_export
    assert type(model) is lifeiqa_fast.LifeIQA and not model.training
    _assert_unchanged(model, snapshot)


def test_fixed_batch_from_a_checkpoint_refuses_another_batch(tmp_path):
    model = tiny(num_experts=4, depth=2).eval()
    checkpoint = tmp_path / "tiny.pth"
    lifeiqa_fast.save_checkpoint(model, checkpoint, config={"DATA": {"DATASET": "live"}})
    path = lifeiqa_fast.export_onnx(checkpoint, tmp_path / "fixed.onnx", batch=2)
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 224, 224]
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["lifeiqa_fast.score_scale"])["dataset"] == "live"  # read from the checkpoint
    session = onnx_session(path)
    crops = _crops(2)
    np.testing.assert_allclose(onnx_scores(session, crops), _pytorch_scores(model, crops), rtol=0, atol=ATOL)
    for batch in (1, 3):  # ONNX Runtime checks the input's shape against the file's before running
        with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument,
                           match=f"(?s)invalid dimensions for input: crops.*Got: {batch} Expected: 2"):
            onnx_scores(session, _crops(batch))


def test_authors_layout_model_exports_and_stays_the_authors(tmp_path):
    model = authors_model(num_experts=4, top_k=2, depth=2).eval()
    cls, snapshot = type(model), _snapshot(model)
    path = lifeiqa_fast.export_onnx(model, tmp_path / "authors.onnx", batch=1)  # fixed: a faster export
    crops = _crops(1, seed=1)
    np.testing.assert_allclose(onnx_scores(path, crops), _pytorch_scores(model, crops), rtol=0, atol=ATOL)
    # optimize() would have retyped the model and its head modules in place: the copy was converted
    assert type(model) is cls and not isinstance(model, lifeiqa_fast.model.FusedForward)
    assert type(model.MOE).__name__ == "SparseMoE" and type(model.MOE).__module__ == "authors_lifeiqa"
    assert all(hasattr(layer, "adj_norm") for layer in model.bunch_decoder.layers)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("batch", [0, -2, 2.0, True, "fixed", None],
                         ids=["zero", "negative", "float", "bool", "word", "None"])
def test_bad_batch_is_refused_naming_it(tmp_path, batch):
    with pytest.raises(ValueError, match=r"export_onnx: batch must be 'dynamic' or a positive int, got"):
        lifeiqa_fast.export_onnx(torch.nn.Linear(1, 1), tmp_path / "x.onnx", batch=batch)


@pytest.mark.parametrize("opset", [17, "20", 20.0], ids=["below 18", "str", "float"])
def test_bad_opset_is_refused_naming_it(tmp_path, opset):
    with pytest.raises(ValueError, match=r"export_onnx: opset must be None .* or an int >= 18"):
        lifeiqa_fast.export_onnx(torch.nn.Linear(1, 1), tmp_path / "x.onnx", opset=opset)


def test_missing_folder_and_folder_path_are_refused_naming_them(tmp_path):
    missing = tmp_path / "not here" / "x.onnx"
    with pytest.raises(FileNotFoundError, match=f"the folder of path does not exist: {missing.parent}"):
        lifeiqa_fast.export_onnx(torch.nn.Linear(1, 1), missing)
    with pytest.raises(IsADirectoryError, match=f"path must name a file, got the folder {tmp_path}"):
        lifeiqa_fast.export_onnx(torch.nn.Linear(1, 1), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_model_of_another_kind_is_refused(tmp_path):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, a checkpoint path, .* got dict"):
        lifeiqa_fast.export_onnx({}, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="does not have the authors' Life-IQA layout"):
        lifeiqa_fast.export_onnx(torch.nn.Linear(1, 1), tmp_path / "x.onnx")


@pytest.mark.parametrize("module, package", [("onnx", "onnx"), ("onnxscript", "onnxscript")])
def test_missing_package_names_it_and_the_extra(tmp_path, monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import then raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=rf"export_onnx needs the package {package}.*\[onnx\] extra"):
        lifeiqa_fast.export_onnx(torch.nn.Linear(1, 1), tmp_path / "x.onnx")


def test_onnx_scores_refuses_crops_of_another_shape_or_kind(dynamic_export):
    path = dynamic_export[2]
    for crops in (np.zeros((2, 224, 224, 3), np.float32), np.zeros((1, 3, 224, 224), np.uint8)):
        with pytest.raises(ValueError, match=r"onnx_scores: crops must be a float array of shape \(B, 3, 224, 224\)"):
            onnx_scores(path, crops)


def test_importing_lifeiqa_fast_imports_no_onnx_package():
    code = ("import sys, lifeiqa_fast; lifeiqa_fast.export_onnx; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


def test_cli_exports_a_pretrained_folder(tmp_path):
    """lifeiqa-fast export -m FOLDER --onnx OUT: the folder's model, its scale and preprocessing in the file."""
    model = tiny(num_experts=2, depth=1).eval()
    lifeiqa_fast.save_pretrained(model, tmp_path / "spaq", dataset="spaq")
    out = tmp_path / "spaq.onnx"
    result = subprocess.run([sys.executable, "-m", "lifeiqa_fast.cli", "export", "-m", str(tmp_path / "spaq"),
                             "--onnx", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and f"wrote {out}" in result.stdout, result.stderr[-3000:]
    crops = _crops(2, seed=5)
    np.testing.assert_allclose(onnx_scores(out, crops), _pytorch_scores(model, crops), atol=ATOL, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(meta["lifeiqa_fast.score_scale"])["dataset"] == "spaq"
    assert json.loads(meta["lifeiqa_fast.preprocessing"])["resize"] == [512, 384]
    bad = subprocess.run([sys.executable, "-m", "lifeiqa_fast.cli", "export", "-m", str(tmp_path / "spaq"), "--onnx",
                          str(out), "--batch", "two"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "batch must be 'dynamic' or a positive int, got 'two'" in bad.stderr
