"""lifeiqa_fast.optimize on an independent stand-in for the authors' classes (tests/authors_lifeiqa.py),
and the optimised model under torch.compile and torch.export."""
import copy
import re

import pytest
import torch
from torch import nn

import lifeiqa_fast
from lifeiqa_fast.loss import router_loss, training_loss

from authors_lifeiqa import Life_models
from test_model import TINY, _images, tiny


def authors_model(num_experts=8, top_k=2, depth=4, seed=0):
    """The authors' Life_models (tests/authors_lifeiqa.py) on the tiny Swin, with trained-like head
    weights: non-zero biases, gamma away from its 0.1, decoder layers no longer copies of one another
    (theirs start as deep copies of one layer), router logits spread enough to use several experts."""
    torch.manual_seed(seed)
    model = Life_models(num_experts=num_experts, top_k=top_k, depth=depth, **TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("pretrain_model."):  # the backbone (also under backbone_stages.*) as built
                p.add_(0.05 * torch.randn_like(p))
        model.gamma.fill_(0.7)
    return model


def _without_dropout(model):
    """Training mode with every dropout and drop-path probability 0 (timm's Swin has stochastic depth):
    the step is deterministic, so the authors' model and ours, which draw their dropout masks
    differently, can be compared."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "drop_prob"):  # timm's DropPath
            m.drop_prob = 0.0
    return model.train()


def _training_step(model, x, target):
    """The authors' training loss and every parameter's gradient (zeros where none reached it)."""
    model.zero_grad()
    score, aux, z = model(x)
    loss = training_loss(score, target, aux, z)
    loss.backward()
    return loss.detach(), {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item() if b.abs().max() > 0 else a.abs().max().item()


CONFIGS = [(1, 1, d) for d in (2, 3, 4)] + [(e, k, d) for e in (2, 4, 8) for k in (1, 2) for d in (2, 3, 4)]


@pytest.mark.parametrize("experts,top_k,depth", CONFIGS, ids=lambda v: str(v))
def test_optimize_equals_authors_model(experts, top_k, depth):
    """optimize() on the authors' own classes: eval outputs within 1e-5, one training step's loss and
    every gradient within 0.2%."""
    authors = authors_model(experts, top_k, depth, seed=experts * 100 + top_k * 10 + depth)
    params = dict(authors.named_parameters())
    keys = list(authors.state_dict())
    fast = lifeiqa_fast.optimize(copy.deepcopy(authors))
    x, target = _images(2), torch.randn(2, 1)
    with torch.no_grad():
        expected = [torch.as_tensor(v, dtype=torch.float32) for v in authors.eval()(x)]  # E == 1: aux, z are ints
        got = fast.eval()(x)
    for name, g, e in zip(("score", "aux", "z"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)

    loss, grads = _training_step(_without_dropout(authors), x, target)
    fast_loss, fast_grads = _training_step(_without_dropout(fast), x, target)
    torch.testing.assert_close(fast_loss, loss, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert _relative_error(fast_grads[name], g) < 2e-3, name

    converted = lifeiqa_fast.optimize(authors)  # in place: the same parameters under the same keys
    assert converted is authors and isinstance(authors, Life_models)
    assert isinstance(authors, lifeiqa_fast.model.FusedForward)
    assert list(authors.state_dict()) == keys and all(p is params[k] for k, p in authors.named_parameters())
    assert all(layer.adj is None for layer in authors.bunch_decoder.layers)  # their graph is the fixed one
    assert lifeiqa_fast.optimize(authors) is authors and type(lifeiqa_fast.optimize(authors)) is type(authors)


def _eval_outputs_match(authors, x):
    fast = lifeiqa_fast.optimize(copy.deepcopy(authors)).eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), authors.eval()(x), atol=1e-5, rtol=1e-5)
    return fast


def _state(module: nn.Module) -> dict:
    """What a module's class sets on it beyond what every nn.Module holds: name -> the value's type."""
    every_module = set(vars(nn.Module()))
    return {k: type(v) for k, v in vars(module).items() if k not in every_module}


def test_optimize_gives_each_module_what_its_own_init_sets():
    """A converted module holds the same attributes as one its class builds (a new attribute set in a
    module's __init__ and not in its _init_state would leave converted models without it)."""
    authors, ours = lifeiqa_fast.optimize(authors_model(num_experts=2, depth=2)), tiny(num_experts=2, depth=2)
    for path in ("UPP_layer3", "bunch_decoder", "bunch_decoder.layers.0", "MOE"):
        converted, built = authors.get_submodule(path), ours.get_submodule(path)
        assert type(converted) is type(built)
        assert _state(built).items() <= _state(converted).items(), path


def test_optimize_keeps_an_edited_graph():
    """A graph the user set on a layer (adj_norm, which the authors' forward uses) is used as given, as a
    buffer outside the state dict that follows the model's dtype."""
    authors = authors_model(num_experts=2, depth=2)
    edited = torch.rand(6, 6, generator=torch.Generator().manual_seed(3))
    authors.bunch_decoder.layers[1].adj_norm = edited
    fast = _eval_outputs_match(authors, _images(2))
    assert fast.bunch_decoder.layers[0].adj is None
    torch.testing.assert_close(fast.bunch_decoder.layers[1].adj, edited)
    assert "bunch_decoder.layers.1.adj" not in fast.state_dict()
    assert fast.double().bunch_decoder.layers[1].adj.dtype == torch.float64


def test_optimize_routes_with_the_routers_k():
    """The authors' routing reads MOE.router.top_k; their SparseMoE.top_k is stored and never read."""
    authors = authors_model(num_experts=4, top_k=2, depth=2)
    authors.MOE.router.top_k = 1
    assert _eval_outputs_match(authors, _images(2)).MOE.top_k == 1


def test_optimize_refuses_what_it_cannot_compute():
    """Settings the authors' forward would honour and the fused head cannot: refused, each named."""
    edits = {
        "bunch_decoder.norm": lambda m: setattr(m.bunch_decoder, "norm", nn.LayerNorm(384)),
        "bunch_decoder.layers.1.dropout1": lambda m: setattr(m.bunch_decoder.layers[1].dropout1, "p", 0.1),
        "bunch_decoder.layers.0.multihead_attn.dropout": lambda m: setattr(m.bunch_decoder.layers[0].multihead_attn,
                                                                           "dropout", 0.1),
        "batch_first": lambda m: setattr(m.bunch_decoder.layers[0].multihead_attn, "batch_first", False),
        "MOE.n_exp": lambda m: setattr(m.MOE, "n_exp", 3),
        "MOE.router.top_k": lambda m: setattr(m.MOE.router, "top_k", 5),
        "MOE.experts.1.net is not": lambda m: m.MOE.experts[1].net.__setitem__(1, nn.GELU()),
        "bunch_decoder.layers.0.adj_norm": lambda m: setattr(m.bunch_decoder.layers[0], "adj_norm", torch.ones(5, 5)),
    }
    for what, edit in edits.items():
        model = authors_model(num_experts=2, depth=2)
        edit(model)
        with pytest.raises(ValueError, match=re.escape(what)):
            lifeiqa_fast.optimize(model)
        assert type(model) is Life_models  # nothing was changed


def test_optimized_authors_model_trains():
    torch.manual_seed(0)
    model = lifeiqa_fast.optimize(authors_model(num_experts=4, depth=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.MOE.experts[0].net[0].weight.detach().clone()
    score, aux, z = model(_images(2))
    (score.sum() + router_loss(aux, z)).backward()
    opt.step()
    assert not torch.equal(before, model.MOE.experts[0].net[0].weight)
    with torch.no_grad():  # the stacked expert weights follow the step
        model.eval()
        model(_images(1))


def test_optimize_reference_lifeiqa_and_back():
    model = tiny(impl="reference").eval()
    x = _images(2)
    expected = model(x)[0]
    assert lifeiqa_fast.optimize(model) is model and model.impl == "auto"
    torch.testing.assert_close(model(x)[0], expected, atol=1e-5, rtol=1e-5)
    lifeiqa_fast.optimize(model, impl="reference")
    assert model.impl == "reference"


def test_optimize_bad_arguments():
    with pytest.raises(ValueError, match="missing: .*bunch_decoder.layers.*MOE"):
        lifeiqa_fast.optimize(nn.Linear(2, 2))
    broken = authors_model(num_experts=2, depth=2)
    del broken.bunch_decoder.layers[1].norm2
    with pytest.raises(ValueError, match=r"bunch_decoder.layers.1.norm2"):
        lifeiqa_fast.optimize(broken)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        lifeiqa_fast.optimize("model.pth")
    with pytest.raises(ValueError, match="impl"):
        lifeiqa_fast.optimize(tiny(), impl="fastest")


def test_compile_fullgraph_and_export():
    """The optimised model (an authors'-layout stand-in, E=4) compiles with no graph break and exports."""
    torch.manual_seed(0)
    model = lifeiqa_fast.optimize(authors_model(num_experts=4, depth=2)).eval()
    x = _images(2)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        exported = torch.export.export(model, (x,)).module()(x)
    for got in (compiled, exported):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert copy.deepcopy(model)(x)[0].shape == (2, 1)


def test_optimized_authors_model_pickles():
    """torch.save of the whole optimised model: its class, made at run time, is rebuilt on loading."""
    import io
    model = lifeiqa_fast.optimize(authors_model(num_experts=2, depth=2)).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is type(model) and isinstance(loaded, Life_models)
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert lifeiqa_fast.optimize(loaded, impl=None).impl is None  # impl None: the process-wide default
