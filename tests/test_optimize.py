"""lifeiqa_fast.optimize on a stand-in with the authors' module layout, and the optimised model under
torch.compile and torch.export."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import lifeiqa_fast
from lifeiqa_fast import reference

from test_model import TINY, _images, tiny


# A stand-in for the authors' Life_models (SPEC.md): their attribute names and state-dict keys, their
# forward written their way (UPP loop on NCHW, 1x1 conv then mean, per-layer MultiheadAttention on the
# memory, the per-expert MoE loop), and classes that lifeiqa_fast does not know.
class UPPLayer(nn.Module):
    def __init__(self, pool_size=7):
        super().__init__()
        self.pool_size = pool_size

    def forward(self, x):
        return reference.grid_pool_ref(x, self.pool_size)


class GraphConv(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(n_out))


class GCN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gcn1, self.gcn2 = GraphConv(dim, dim // 2), GraphConv(dim // 2, dim // 4)
        self.gcn3 = GraphConv(dim // 4, dim)

    def forward(self, x):
        adj = reference.fixed_adjacency(x.shape[1], x.dtype, x.device)
        h = F.relu(adj @ (x @ self.gcn1.weight) + self.gcn1.bias)
        h = F.relu(adj @ (h @ self.gcn2.weight) + self.gcn2.bias)
        return adj @ (h @ self.gcn3.weight) + self.gcn3.bias


class AuthorsDecoderLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.GCN = GCN(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_first = True

    def forward(self, x, memory):
        x = x + self.GCN(x)
        return x + self.multihead_attn(self.norm2(x), memory, memory, need_weights=False)[0]


class AuthorsDecoder(nn.Module):
    def __init__(self, depth, dim, heads):
        super().__init__()
        self.layers = nn.ModuleList(AuthorsDecoderLayer(dim, heads) for _ in range(depth))
        self.num_layers = depth

    def forward(self, x, memory):
        for layer in self.layers:
            x = layer(x, memory)
        return x


class Router(nn.Module):
    def __init__(self, dim, experts, top_k):
        super().__init__()
        self.top_k, self.linear = top_k, nn.Linear(dim, experts)


class AuthorsMoE(nn.Module):
    def __init__(self, dim, experts, top_k):
        super().__init__()
        self.n_exp, self.top_k = experts, top_k
        self.router = Router(dim, experts, top_k)
        self.experts = nn.ModuleList(nn.Module() for _ in range(experts))
        for e in self.experts:
            e.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))

    def forward(self, x):
        nets = [e.net for e in self.experts]
        out, aux, z = reference.moe_ref(x.reshape(-1, x.shape[-1]), self.router.linear.weight, self.router.linear.bias,
                                        [n[0].weight for n in nets], [n[0].bias for n in nets],
                                        [n[3].weight for n in nets], [n[3].bias for n in nets], self.top_k, 0.1,
                                        self.training)
        return out.view_as(x), aux, z


class AuthorsMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.1))

    def forward(self, x):
        return self.net(x), 0, 0


class AuthorsModel(nn.Module):
    def __init__(self, num_experts=8, top_k=2, depth=4, dim=384):
        super().__init__()
        self.pretrain_model = timm.create_model(TINY["backbone"], pretrained=False, **TINY["backbone_kwargs"])
        m = self.pretrain_model
        self.backbone_stages = nn.ModuleList([nn.Sequential(m.patch_embed, m.layers[0]), m.layers[1], m.layers[2],
                                              m.layers[3]])
        del m.norm, m.head
        chs = [i["num_chs"] for i in m.feature_info]
        self.UPP_layer3 = UPPLayer(7)
        self.proj_layer3 = nn.Linear(chs[2], dim)
        self.proj_layer4 = nn.Conv2d(chs[3], dim, kernel_size=1)
        self.bunch_decoder = AuthorsDecoder(depth, dim, 6)
        self.bunch_embedding = nn.Parameter(torch.randn(1, 6, dim))
        self.MOE = AuthorsMLP(dim) if num_experts == 1 else AuthorsMoE(dim, num_experts, top_k)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout3 = nn.Dropout(0.1)
        self.gamma = nn.Parameter(torch.tensor(0.1))
        self.fc = nn.Linear(dim, 1)

    def forward(self, x):
        B = x.shape[0]
        features = []
        for stage in self.backbone_stages:
            x = stage(x)
            features.append(x.permute(0, 3, 1, 2).contiguous())
        g = self.proj_layer4(features[3]).flatten(2).permute(0, 2, 1).mean(dim=1, keepdim=True)
        memory = self.proj_layer3(self.UPP_layer3(features[2]))
        out = self.bunch_decoder(self.bunch_embedding.expand(B, -1, -1) + g, memory)
        y = self.norm3(out)
        moe_out, aux, z = self.MOE(y)
        y = self.dropout3(y + self.gamma * moe_out)
        return self.fc(y).view(B, -1).mean(dim=1, keepdim=True), aux, z


def _loss_and_grads(model, x, target):
    """The authors' training loss and every parameter's gradient (zeros where none reached it: an
    expert no token chose has no gradient in the authors' loop and a zero one in the fused op)."""
    model.zero_grad()
    score, aux, z = model(x)
    loss = F.smooth_l1_loss(score, target) + 0.01 * aux + 0.001 * z
    loss.backward()
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
    aux, z = (float(torch.as_tensor(v).detach()) for v in (aux, z))  # the authors' E == 1 MLP returns ints
    return score.detach(), aux, z, loss.detach(), grads


@pytest.mark.parametrize("experts,depth", [(1, 4), (2, 2), (4, 4), (8, 2)], ids=lambda v: str(v))
def test_optimize_authors_layout(experts, depth):
    torch.manual_seed(1)
    authors = AuthorsModel(num_experts=experts, top_k=min(2, experts), depth=depth).eval()
    for p in authors.parameters():  # larger than the default init, so routing spreads over the experts
        p.data.add_(0.05 * torch.randn_like(p))
    plain = tiny(impl="reference", num_experts=experts, top_k=min(2, experts), depth=depth).eval()
    plain.load_state_dict(authors.state_dict())  # the stand-in really has the official keys
    x, target = _images(3), torch.randn(3, 1)
    expected = _loss_and_grads(authors, x, target)

    params = dict(authors.named_parameters())
    keys = list(authors.state_dict())
    fast = lifeiqa_fast.optimize(authors)
    assert fast is authors and isinstance(fast, AuthorsModel) and isinstance(fast, lifeiqa_fast.model.FusedForward)
    assert list(fast.state_dict()) == keys
    assert all(p is params[k] for k, p in fast.named_parameters())
    assert lifeiqa_fast.optimize(fast) is fast and type(fast) is type(lifeiqa_fast.optimize(fast))  # a no-op

    for got in (_loss_and_grads(fast, x, target), _loss_and_grads(plain, x, target)):
        torch.testing.assert_close(got[:4], expected[:4], atol=1e-5, rtol=1e-5)
        for name, g in expected[4].items():
            torch.testing.assert_close(got[4][name], g, atol=1e-5, rtol=1e-3, msg=name)


def test_optimized_authors_model_trains():
    torch.manual_seed(0)
    model = lifeiqa_fast.optimize(AuthorsModel(num_experts=4, depth=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.MOE.experts[0].net[0].weight.detach().clone()
    score, aux, z = model(_images(2))
    (score.sum() + 0.01 * aux + 0.001 * z).backward()
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
    broken = AuthorsModel(num_experts=2, depth=2)
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
    model = lifeiqa_fast.optimize(AuthorsModel(num_experts=4, depth=2)).eval()
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
    model = lifeiqa_fast.optimize(AuthorsModel(num_experts=2, depth=2)).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is type(model) and isinstance(loaded, AuthorsModel)
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert lifeiqa_fast.optimize(loaded, impl=None).impl is None  # impl None: the process-wide default
