"""LST: no backbone in the backward pass, parameter counts, the ladder forward, pruned inits."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TOKEN_HOSTS, input_for, make_host

import petl_vision as pv
from petl_vision.core.state import host_modules
from petl_vision.hosts import token_host
from petl_vision.methods.lst import init_side_from_backbone, needs_data_init

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_backbone_out_of_backward(model, x):
    """Train step on `model`: no backbone module's backward hook fires, no backbone op saves a
    tensor for backward, no backbone parameter gets a gradient; every trainable parameter does."""
    backbone = [m for name, m in host_modules(model) if name]  # every host module but the root
    fired, saved, inside = [], [], [0]
    for m in backbone:
        m.register_full_backward_hook(lambda mod, gi, go: fired.append(type(mod).__name__))
    for block in token_host(model).blocks:  # mark the time spent inside backbone blocks
        block.register_forward_pre_hook(lambda mod, args: inside.__setitem__(0, inside[0] + 1))
        block.register_forward_hook(lambda mod, args, out: inside.__setitem__(0, inside[0] - 1))
    side = [0]  # and inside the side network's modules (which read each block's output in its hook)
    for m in model.petl.modules():
        m.register_forward_pre_hook(lambda mod, args: side.__setitem__(0, side[0] + 1))
        m.register_forward_hook(lambda mod, args, out: side.__setitem__(0, side[0] - 1))

    def pack(t):
        if inside[0] and not side[0]:
            saved.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.square().mean().backward()
    assert fired == [] and saved == []
    for name, p in model.named_parameters():
        if name.startswith("petl."):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    return out


@pytest.mark.parametrize("host", TOKEN_HOSTS)
def test_backbone_takes_no_part_in_backward(host):
    model = pv.apply(make_host(host), "lst")
    out = assert_backbone_out_of_backward(model, input_for(host))
    assert out.shape == (2, 5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_backward_hooks_do_fire_for_in_backbone_methods():
    """Control: the same check catches a method whose gradients pass through the backbone."""
    model = pv.apply(make_host("vit"), "ssf")
    with pytest.raises(AssertionError):
        assert_backbone_out_of_backward(model, input_for("vit"))


def lst_count(D, r, L, C, mlp_ratio=4, layers=None, E=None, head_bias=True):
    """Trainable parameters of LST written out: ladders, gates, side blocks, norm, upsample, head.
    E: the head's input width (D on timm ViTs, the embedding width on CLIP)."""
    d, h, E = D // r, D * mlp_ratio // r, E or D
    k = L if layers is None else layers
    ladders = (k + 1) * (D * d + d)
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    head = E * C + (C if head_bias else 0) if C else 0
    return ladders + k + k * block + 2 * d + (d * E + E) + head


@pytest.mark.parametrize("config,layers", [({}, None), ({"layers": (1,)}, 1), ({"reduction": 4}, None)])
def test_trainable_count_tiny(config, layers):
    model = pv.apply(make_host("vit"), "lst", **config)
    r = config.get("reduction", 8)
    s = pv.summary(model)
    assert s.trainable == s.by_method["lst"] == lst_count(32, r, 2, 5, layers=layers)
    assert not any(p.requires_grad for p in model.head.parameters())  # the host's head is unused
    assert model.petl.lst.blocks[0].attn.qkv.weight.shape == (3 * 32 // r, 32 // r)


def test_trainable_count_vit_b():
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    pv.apply(model, "lst")
    assert pv.summary(model).trainable == lst_count(768, 8, 12, 0) == 2_376_492  # "about 2.4M"
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    pv.apply(model, "lst", layers=(0, 1, 2, 3, 5, 6, 7, 9, 10))  # 9 of 12 side layers
    assert pv.summary(model).trainable == lst_count(768, 8, 12, 100, layers=9)


def hidden_states(model, x):
    """Embedding output and every block output, computed by hand with timm's modules."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    out = [h]
    for block in model.blocks:
        h = block(h)
        out.append(h)
    return out


@pytest.mark.parametrize("host", ["vit", "vit_reg_avg"])
def test_forward_is_the_ladder_formula(host):
    model = pv.apply(make_host(host), "lst", layers=(1,), gate_init=0.3)
    side = model.petl.lst
    with torch.no_grad():
        side.upsample.weight.normal_()
    x = input_for(host)
    hs = hidden_states(model, x)
    g = torch.sigmoid(torch.tensor(0.3) / 0.1)
    h = side.ladders[0](hs[0])
    h = side.blocks[0](g * h + (1 - g) * side.ladders[1](hs[2]))  # block 1's output feeds side block 0
    h = side.norm(h)
    h = h[:, 0] if host == "vit" else h[:, model.num_prefix_tokens:].mean(1)
    expected = side.head(side.upsample(h))
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(side.head.weight, model.head.weight)  # the side head starts as the host's


def residual_keep(host, score, d):
    """The d residual channels of largest importance, summed over every block (the docstring's rule)."""
    total = 0
    for b in host.blocks:
        total = total + score(b.attn.qkv.weight).sum(0) + score(b.mlp.fc1.weight).sum(0) + score(b.attn.proj.weight).sum(1)
        total = total + score(b.mlp.fc2.weight).sum(1) + score(b.norm1.weight) + score(b.norm2.weight)
    return total.topk(d).indices.sort().values


def check_pruned_copy(model, host, score):
    side, d, hidden = model.petl.lst, 4, 16  # width 32 / 8, MLP 128 / 8
    keep = residual_keep(host, score, d)
    for src, dst in zip(host.blocks, side.blocks):
        assert dst.attn.qkv.weight.shape == (3 * d, d) and dst.mlp.fc1.weight.shape == (hidden, d)
        torch.testing.assert_close(dst.norm1.weight, src.norm1.weight[keep])
        torch.testing.assert_close(dst.norm2.bias, src.norm2.bias[keep])
        mlp = (score(src.mlp.fc1.weight).sum(1) + score(src.mlp.fc2.weight).sum(0)).topk(hidden).indices.sort().values
        torch.testing.assert_close(dst.mlp.fc1.weight, src.mlp.fc1.weight[mlp][:, keep])
        torch.testing.assert_close(dst.mlp.fc2.weight, src.mlp.fc2.weight[keep][:, mlp])
        torch.testing.assert_close(dst.mlp.fc1.bias, src.mlp.fc1.bias[mlp])
        # head 0 keeps 2 (= 16 / 8) of its 16 dims: q and k the rows of largest q + k score, v of v + proj score
        rows = score(src.attn.qkv.weight).sum(1)
        qk = (rows[:16] + rows[32:48]).topk(2).indices.sort().values
        v = (rows[64:80] + score(src.attn.proj.weight).sum(0)[:16]).topk(2).indices.sort().values
        torch.testing.assert_close(dst.attn.qkv.weight[0:2], src.attn.qkv.weight[qk][:, keep])  # query
        torch.testing.assert_close(dst.attn.qkv.weight[4:6], src.attn.qkv.weight[32 + qk][:, keep])  # key
        torch.testing.assert_close(dst.attn.qkv.weight[8:10], src.attn.qkv.weight[64 + v][:, keep])  # value
        torch.testing.assert_close(dst.attn.proj.weight[:, :2], src.attn.proj.weight[keep][:, v])
    torch.testing.assert_close(side.norm.weight, host.norm.weight[keep])


def randomized_host(seed=0):
    model = make_host("vit", seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # distinct norm weights and biases, so channel choices matter
                p.copy_(1 + torch.randn(p.shape, generator=g))
    return model


def test_magnitude_init_copies_the_largest_rows_and_columns():
    host = randomized_host()
    model = pv.apply(copy.deepcopy(host), "lst", init="magnitude")
    check_pruned_copy(model, host, lambda w: w.abs())
    assert not needs_data_init(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("petl."))


def test_fisher_init_ranks_by_squared_gradients():
    host = randomized_host()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    # the empirical Fisher computed by hand on the plain host: every sample of the first two batches alone
    reference = copy.deepcopy(host).eval()
    fisher = {id(p): torch.zeros_like(p) for p in reference.parameters()}
    for x, y in batches[:2]:
        for i in range(len(x)):
            reference.zero_grad()
            F.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]).backward()
            for p in reference.parameters():
                if p.grad is not None:
                    fisher[id(p)] += p.grad.pow(2)

    model = pv.apply(copy.deepcopy(host), "lst", init="fisher", fisher_batches=2)
    assert needs_data_init(model)
    params = {n: p for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=0.1)
    with pytest.warns(UserWarning, match="init_side_from_backbone"):
        model.train()(batches[0][0])
    init_side_from_backbone(model, loader=batches)
    assert not needs_data_init(model)
    check_pruned_copy(model, reference, lambda w: fisher[id(w)])
    assert all(params[n] is p for n, p in model.named_parameters())  # same tensors: the optimizer still fits
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("petl."))
    assert_backbone_out_of_backward(model, batches[0][0])


def test_errors():
    with pytest.raises(pv.UnsupportedHostError, match="lst.*token-based host.*ResNet"):
        pv.apply(make_host("resnet"), "lst")
    with pytest.raises(ValueError, match="reduction=3 must divide the host width 32"):
        pv.apply(make_host("vit"), "lst", reduction=3)
    with pytest.raises(ValueError, match="layers must be increasing block indices in \\[0, 2\\)"):
        pv.apply(make_host("vit"), "lst", layers=(0, 2))
    with pytest.raises(ValueError, match="init must be one of"):
        pv.LSTConfig(init="pruned")
    with pytest.raises(ValueError, match="apply 'lst' alone"):
        pv.apply(pv.apply(make_host("vit"), "ssf"), "lst")
    with pytest.raises(ValueError, match="needs `loader`"):
        init_side_from_backbone(pv.apply(make_host("vit"), "lst"), "fisher")
    model = pv.apply(make_host("vit"), "lst")
    model.blocks[0].norm1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="backbone parameter of shape \\(32,\\) requires grad"):
        model(input_for("vit"))
    with pytest.raises(pv.MergeError, match="side network"):
        pv.merge(pv.apply(make_host("vit"), "lst"))


def test_eval_and_input_requiring_grad():
    model = pv.apply(make_host("vit"), "lst").eval()
    x = input_for("vit").requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert x.grad is None  # the input is detached: the backbone records no graph
    with torch.no_grad():
        torch.testing.assert_close(model(x), out)


def test_on_the_clip_classifier():
    from test_clip import CLASSES, images, tiny_clip

    from petl_vision.clip import CLIPClassifier

    clf = pv.apply(CLIPClassifier(tiny_clip(), CLASSES), "lst")
    out = assert_backbone_out_of_backward(clf, images())
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # width 32, 2 blocks, MLP ratio 2; the upsample maps to the embedding width 16; bias-free zero-shot head
    assert pv.summary(clf).trainable == lst_count(32, 8, 2, 3, mlp_ratio=2, E=16, head_bias=False)
    head = clf.get_classifier()
    torch.testing.assert_close(clf.petl.lst.head.weight, head.weight * head.logit_scale.exp())
    with pytest.raises(pv.UnsupportedHostError, match="needs a classifier with a head"):
        pv.apply(tiny_clip().visual, "lst")


@pytest.mark.parametrize("method,config", [("lst", {"layers": (1,)}), ("unipt", {})])
def test_hidden_states_are_projected_as_their_block_finishes(method, config):
    """The side network keeps its narrow projection of each hidden state (LST's ladder, UniPT's layer),
    not the backbone's (B, N, D) fp32 state, while the backbone runs; LST drops unused layers'."""
    model = pv.apply(make_host("vit"), method, **config).train()
    side = getattr(model.petl, method)
    kept = []
    token_host(model).blocks[-1].register_forward_hook(lambda m, a, o: kept.append([None if t is None else tuple(t.shape) for t in side._captured]))
    x = input_for("vit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    width = 32 // 8 if method == "lst" else 32 // 2  # D / reduction
    expected = [(2, n, width), None, (2, n, width)] if method == "lst" else [(2, n, width)] * 3
    assert kept == [expected]
    assert out.dtype == torch.bfloat16 and side._captured == []
