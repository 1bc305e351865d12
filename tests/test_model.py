import pickle
import sys
import types

import numpy as np
import pytest
import torch

import lifeiqa_fast

from helpers import assert_matches_reference, impl_params
from lifeiqa_fast.loss import router_loss
from lifeiqa_fast.ops._impl import choose

# A small Swin (stage maps 14x14x128 and 7x7x256 at 224) so that model tests run in seconds.
TINY = dict(backbone="swin_tiny_patch4_window7_224",
            backbone_kwargs=dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)))


def tiny(**kwargs):
    torch.manual_seed(0)
    return lifeiqa_fast.LifeIQA(**TINY, **kwargs)


def _images(batch=2, seed=0):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_forward_is_features_then_head():
    model = tiny().eval()
    x = _images()
    f3, f4 = model.forward_features(x)
    assert f3.shape == (2, 14, 14, 128) and f4.shape == (2, 7, 7, 256)  # NHWC, as timm emits them
    score, aux, z = model(x)
    assert score.shape == (2, 1) and aux.shape == () and z.shape == ()
    torch.testing.assert_close(model.forward_head(f3, f4), (score, aux, z))


@pytest.mark.parametrize(
    "config",
    [
        dict(num_experts=1),  # the plain GELU MLP head
        dict(num_experts=2, top_k=2, depth=2),  # k == E
        dict(num_experts=4, top_k=1),
        dict(num_experts=8, top_k=2),
        dict(num_experts=2, adjacency="learnable"),
    ],
    ids=["E1", "E2-k2-d2", "E4-k1", "E8-k2", "learnable-adjacency"],
)
def test_fused_model_equals_reference(config, impl="auto", strategy=None):
    chosen = {op: choose(op, "cpu", impl)[0] for op in ("grid_pool", "gcn", "cross_attention", "moe")}
    if "reference" in chosen.values():  # then the comparison would be the reference with itself
        pytest.skip(f"impl={impl!r} runs the reference on this CPU: {chosen} ({choose('gcn', 'cpu', impl)[1]})")
    reference = tiny(impl="reference", **config).eval()
    fused = tiny(impl=impl, **config).eval()
    fused.load_state_dict(reference.state_dict())
    fused.bunch_decoder.strategy = strategy
    x = _images(3)
    outputs = []
    for model in (reference, fused):
        score, aux, z = model(x)
        (score.sum() + router_loss(aux, z)).backward()
        # an expert no token chose has no gradient in the authors' loop and a zero one in the fused op
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
        outputs.append((score, aux, z, grads))
    (s0, a0, z0, g0), (s1, a1, z1, g1) = outputs
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((a1, z1), (a0, z0), atol=1e-5, rtol=1e-5)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-3, msg=name)


CPU_IMPLS = [p for p in impl_params("cross_attention") if p.id in ("native-cpu", "triton-cpu")]


@pytest.mark.parametrize("impl_device", CPU_IMPLS)
@pytest.mark.parametrize("strategy", ["kv", "memory"])
def test_decoder_strategies_equal_reference(impl_device, strategy):
    """Both ways the fused decoder attends (the single K/V GEMM with the fused cross_attention op, or
    the memory itself) give the reference model's outputs and gradients, with each CPU implementation
    (the model tests run on CPU; the ops' own tests cover CUDA)."""
    impl, _ = impl_device
    test_fused_model_equals_reference(dict(num_experts=2, depth=2, adjacency="learnable"), impl, strategy)


STACK_IMPLS = [p for p in impl_params("attend_memory") if p.values[0] == ("native", "cpu")]


@pytest.mark.parametrize("impl_device", STACK_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adjacency", ["fixed", "learnable"])
def test_decoder_memory_stack_in_inference(impl_device, dtype, adjacency):
    """Scoring without autograd at a few images on CPU, the "memory" decoder runs all its layers as one
    native decoder_memory call (gcn's and attend_memory's kernels in turn): the reference model's scores
    at one image and at three, with either graph (in bf16 no further from the fp32 scores than twice the
    reference's own bf16 error); with autograd recording it does not run."""
    reference = tiny(impl="reference", depth=2, num_experts=2, adjacency=adjacency).eval()
    fused = tiny(depth=2, num_experts=2, adjacency=adjacency).eval()
    fused.load_state_dict(reference.state_dict())
    fused.bunch_decoder.strategy = "memory"
    tol = (1e-5, 1e-5, 1.0) if dtype == torch.float32 else (1e-3, 0.0, 2.0)
    for batch in (1, 3):
        x = _images(batch)
        with torch.no_grad():
            truth = reference(x)[0].double()
            want = reference.to(dtype)(x.to(dtype))[0]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                got = fused.to(dtype)(x.to(dtype))[0]
        reference.float(), fused.float()
        assert "lifeiqa_fast::decoder_memory" in {e.key for e in prof.key_averages()}, "the stack op did not run"
        assert_matches_reference(got, want, truth, tol, f"decoder_memory {dtype} batch {batch}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused(x)[0].sum().backward()
    assert "lifeiqa_fast::decoder_memory" not in {e.key for e in prof.key_averages()}


def test_bad_decoder_strategy():
    with pytest.raises(ValueError, match="strategy must be None, 'kv' or 'memory', got 'fast'"):
        tiny(depth=1).bunch_decoder.strategy = "fast"


def test_single_expert_variant():
    model = tiny(num_experts=1)
    keys = {k for k in model.state_dict() if k.startswith("MOE.")}
    assert keys == {"MOE.net.0.weight", "MOE.net.0.bias", "MOE.net.2.weight", "MOE.net.2.bias"}
    _, aux, z = model.eval()(_images(1))
    assert aux.item() == 0 and z.item() == 0


def test_official_initialisation():
    model = tiny()
    assert model.gamma.item() == pytest.approx(0.1)
    assert 0.01 < model.bunch_embedding.std().item() < 0.03
    layer = model.bunch_decoder.layers[0]
    assert torch.all(layer.GCN.gcn1.bias == 0) and torch.all(layer.multihead_attn.in_proj_bias == 0)
    assert torch.all(layer.multihead_attn.out_proj.bias == 0)
    assert layer.GCN.gcn1.weight.shape == (384, 192)  # stored (in, out)
    assert layer.adj is None and not any("adj" in k for k in model.state_dict())  # the fixed graph


def test_learnable_adjacency():
    model = tiny(adjacency="learnable", depth=2)
    adj = model.bunch_decoder.layers[1].adj
    torch.testing.assert_close(adj.detach(), (torch.ones(6, 6) + torch.eye(6)) / 7)  # 2/7 diagonal, 1/7 elsewhere
    assert {"bunch_decoder.layers.0.adj", "bunch_decoder.layers.1.adj"} <= set(model.state_dict())
    score, aux, z = model.eval()(_images(1))
    (score.sum() + aux + z).backward()
    assert adj.grad is not None and adj.grad.abs().sum() > 0
    loaded = lifeiqa_fast.load_checkpoint(model.state_dict(), **TINY)
    assert loaded.config["adjacency"] == "learnable"
    with pytest.raises(ValueError, match="adjacency must be"):
        tiny(adjacency="dense")


def test_training_mode_runs_and_backpropagates():
    model = tiny().train()
    score, aux, z = model(_images())
    (score.sum() + router_loss(aux, z)).backward()
    assert torch.isfinite(score).all()
    assert model.MOE.router.linear.weight.grad is not None and model.gamma.grad is not None


def test_bad_image_batch():
    model = tiny()
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\), got \(1, 1, 224, 224\)"):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match=r"x holds no images, got shape \(0, 3, 224, 224\)"):
        model(torch.randn(0, 3, 224, 224))
    with pytest.raises(TypeError, match="floating tensor of ImageNet-normalised images, got torch.uint8"):
        model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    cnn = lifeiqa_fast.LifeIQA(backbone="resnet10t", depth=1, num_experts=2)  # any input size (Swin: 224 only)
    with pytest.raises(ValueError, match=r"images of 64x64 pixels give a stage-3 feature map of 4x4, smaller than "
                                         r"the 7x7 grid.*at least 112x112"):
        cnn(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=2, top_k=3), r"top_k must be in \[1, num_experts=2\], got 3"),
    (dict(num_experts=1, top_k=5), r"top_k must be in \[1, num_experts=1\], got 5"),
    (dict(top_k=True), "top_k must be a positive int, got True"),
    (dict(num_heads=0), "num_heads must be a positive int, got 0"),
    (dict(embed_dim=384.0), r"embed_dim must be a positive int, got 384\.0"),
    (dict(embed_dim=64, num_heads=6), "embed_dim must be divisible by num_heads and 4"),
    (dict(depth=0), "depth must be a positive int, got 0"),
    (dict(impl="cuda"), "impl must be one of"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_more_queries_than_the_kernels_hold():
    """num_queries=40 (the GCN kernels hold 32 tokens): auto runs the composite ops and equals the
    reference; the native kernels, asked for by name, say their limit."""
    model = tiny(num_queries=40, depth=1, num_experts=2).eval()
    reference = tiny(num_queries=40, depth=1, num_experts=2, impl="reference").eval()
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)
    model.impl = "native"
    with pytest.raises(ValueError, match=r"impl='native' cannot run this input: .* at most 32 tokens"):
        model(x)


def test_single_expert_keeps_the_authors_default_top_k():
    """num_experts=1 is an MLP, top_k unused: the authors' configs keep TOP_K: 2 beside it."""
    assert tiny(num_experts=1, top_k=2).config["top_k"] == 2


def _official_checkpoint(model, path):
    """Save like the authors' code: the yacs config object and a numpy max_plcc beside the weights."""
    yacs = types.ModuleType("yacs")
    yacs.config = types.ModuleType("yacs.config")

    class CfgNode(dict):
        """As yacs's: a dict whose instance attributes (a set among them) pickle beside its items."""

        def __init__(self, **items):
            super().__init__(**items)
            self.__dict__.update(__immutable__=True, __deprecated_keys__=set(), __renamed_keys__={},
                                 __new_allowed__=False)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs.config.CfgNode = CfgNode
    sys.modules.update({"yacs": yacs, "yacs.config": yacs.config})
    try:
        config = CfgNode(MODEL=CfgNode(SWIN=CfgNode(NUM_EXPERTS=4, TOP_K=1)), DATA=CfgNode(DATASET="koniq"))
        torch.save({"model": model.state_dict(), "optimizer": {"state": {}}, "lr_scheduler": {},
                    "max_plcc": np.float64(0.93), "epoch": 3, "config": config}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]  # loading must not need the authors' packages


def test_load_official_checkpoint_file(tmp_path):
    model = tiny(num_experts=4, top_k=1, depth=2)
    path = tmp_path / "ckpt_epoch_3.pth"
    _official_checkpoint(model, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the file really holds non-tensor classes
    loaded = lifeiqa_fast.load_checkpoint(path, **TINY)  # top_k from the saved config's MODEL.SWIN.TOP_K
    assert (loaded.config["num_experts"], loaded.config["top_k"], loaded.config["depth"]) == (4, 1, 2)
    assert loaded.checkpoint_config["DATA"]["DATASET"] == "koniq"  # as plain data, for the Scorer
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def test_save_checkpoint_round_trip(tmp_path):
    """save_checkpoint writes the authors' format plus our config: load_checkpoint needs no arguments."""
    model = tiny(num_experts=4, top_k=1, depth=2, adjacency="learnable").eval()
    path = tmp_path / "ckpt.pth"
    lifeiqa_fast.save_checkpoint(model, path, epoch=7, max_plcc=0.9, config={"DATA": {"DATASET": "spaq"}})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left behind
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 7 and saved["config"]["MODEL"]["SWIN"]["TOP_K"] == 1
    loaded = lifeiqa_fast.load_checkpoint(path).eval()
    assert loaded.config == model.config and loaded.checkpoint_config["DATA"]["DATASET"] == "spaq"
    x = _images(1)
    torch.testing.assert_close(loaded(x), model(x))


def test_load_bare_state_dict_file(tmp_path):
    model = tiny(num_experts=2, top_k=2)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    loaded = lifeiqa_fast.load_checkpoint(tmp_path / "weights.pth", **TINY)
    x = _images(1)
    torch.testing.assert_close(loaded.eval()(x)[0], model.eval()(x)[0])


def test_load_checkpoint_mismatch_lists_keys():
    state = tiny(num_experts=2).state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['fc.bias'\][\s\S]*unexpected keys \(1\): \['extra.weight'\]"):
        lifeiqa_fast.load_checkpoint(state, **TINY)


def test_load_checkpoint_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        lifeiqa_fast.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*corrupt.pth"):
        lifeiqa_fast.load_checkpoint(tmp_path / "corrupt.pth")
    with pytest.raises(ValueError, match="not a Life-IQA state dict"):
        lifeiqa_fast.load_checkpoint({"model": {"weight": torch.zeros(1)}})


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_pretrained_backbone(tmp_path, suffix):
    import timm

    source = timm.create_model(TINY["backbone"], **TINY["backbone_kwargs"])
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = lifeiqa_fast.LifeIQA(**TINY, pretrained=path)
    for key, value in source.state_dict().items():
        if not key.startswith(("head", "norm")):
            torch.testing.assert_close(model.pretrain_model.state_dict()[key], value, msg=key)
    with pytest.raises(FileNotFoundError, match="pretrained backbone weights not found"):
        lifeiqa_fast.LifeIQA(**TINY, pretrained=tmp_path / "nope.pth")


def test_decoder_folded_weights_follow_parameter_changes():
    """At inference the stacked K/V weight and folded biases are built once; a changed parameter (in
    place or replaced) rebuilds them, so the fused model never reads stale weights."""
    model = tiny(depth=2).eval()
    decoder = model.bunch_decoder
    with torch.no_grad():
        first = decoder.folded()
        assert decoder.folded()[0] is first[0]  # reused
        decoder.layers[1].multihead_attn.in_proj_weight[-1, 0] += 1.0  # in place: its version moves
        rebuilt = decoder.folded()
        assert rebuilt[0] is not first[0] and rebuilt[0][-1, 0] == first[0][-1, 0] + 1.0
        model.double()  # replaced
        assert decoder.folded()[0].dtype == torch.float64
    D = model.config["embed_dim"]
    attns = [layer.multihead_attn for layer in decoder.layers]
    weight, biases = decoder.folded()
    assert weight.grad_fn is not None  # training: rebuilt with autograd
    torch.testing.assert_close(weight, torch.cat([a.in_proj_weight[D:] for a in attns]))
    for a, b in zip(attns, biases):
        torch.testing.assert_close(b, a.out_proj.bias + a.out_proj.weight @ a.in_proj_bias[2 * D:])


def test_save_checkpoint_unwraps_compiled_model(tmp_path):
    model = tiny(num_experts=2, depth=2)
    lifeiqa_fast.save_checkpoint(torch.compile(model), tmp_path / "c.pth")
    assert set(torch.load(tmp_path / "c.pth", weights_only=True)["model"]) == set(model.state_dict())


@pytest.mark.parametrize("backbone", ["resnet10t", "convnext_atto"])
def test_cnn_backbone(backbone, tmp_path):
    """A ResNet or ConvNeXt backbone: its stage 3 and 4 maps (timm's own forward_intermediates) reach
    the head as NHWC; the fused head equals the reference; a checkpoint rebuilds the backbone."""
    torch.manual_seed(0)
    model = lifeiqa_fast.LifeIQA(num_experts=2, depth=2, backbone=backbone, impl="reference").eval()
    x = _images(2)
    f3, f4 = model.forward_features(x)
    expected = model.pretrain_model.forward_intermediates(x, indices=2, intermediates_only=True)  # NCHW
    torch.testing.assert_close((f3, f4), tuple(e.permute(0, 2, 3, 1) for e in expected))
    assert f3.shape[1:3] == (14, 14) and f4.shape[1:3] == (7, 7)
    path = tmp_path / "cnn.pth"
    lifeiqa_fast.save_checkpoint(model, path)
    fused = lifeiqa_fast.load_checkpoint(path, impl="auto").eval()
    assert fused.config["backbone"] == backbone
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_unsupported_backbone():
    with pytest.raises(ValueError, match="Swin transformer, ResNet or ConvNeXt with 4 stages, got 'vit_tiny_patch16_224'"):
        lifeiqa_fast.LifeIQA(backbone="vit_tiny_patch16_224")


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_autocast(impl):
    """Under CPU bf16 autocast (training's --amp bf16) both paths run forward and backward and stay
    near fp32, following autocast op by op: the head's linear layers in bf16 (the score too), each fused
    op in fp32 (its autocast rule), the reference's ops as autocast casts them."""
    model = tiny(num_experts=2, depth=2, impl=impl).eval()
    x = _images(2)
    expected = model(x)[0]
    with torch.autocast("cpu", torch.bfloat16):
        score, aux, z = model(x)
    assert score.dtype == torch.bfloat16
    torch.testing.assert_close(score.float(), expected, rtol=0, atol=0.03)
    (score.float().sum() + router_loss(aux, z)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.fc.parameters())
