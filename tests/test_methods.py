"""Every registered method x every tiny host: apply, gradients, save/load, merge."""

import pytest
import torch
from conftest import HOSTS, input_for, make_host, perturb_trainable

import petl_vision as pv


def pairs():
    """Every image method x every host; a method is tested here the moment it registers."""
    return [(m, h) for m in pv.list_methods() if pv.get_method(m).input_kind == "image" for h in sorted(HOSTS)]


def test_every_config_is_exported():
    for name in pv.list_methods():
        config_class = pv.get_config_class(name)
        assert getattr(pv, config_class.__name__) is config_class and config_class.name == name


def supported(method, host):
    return pv.get_method(method).supports(make_host(host))


@pytest.mark.parametrize("method,host", pairs())
def test_apply_forward_and_gradients(method, host):
    model = make_host(host)
    if not supported(method, host):
        with pytest.raises(pv.UnsupportedHostError, match=method):
            pv.apply(model, method)
        assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())
        return
    pv.apply(model, method)
    model.train()
    out = model(input_for(host))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"trainable {name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    s = pv.summary(model)
    assert s.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s.by_method[method] == s.trainable
    assert 0 < s.trainable <= s.total


@pytest.mark.parametrize("method,host", [p for p in pairs() if p[1] in ("vit", "resnet", "swin", "vit_reg_avg")])
def test_save_load_identical_outputs(method, host, tmp_path):
    model = make_host(host)
    if not supported(method, host):
        pytest.skip(f"{method} does not run on {host}")
    pv.apply(model, method)
    perturb_trainable(model)
    model.eval()
    x = input_for(host)
    expected = model(x)
    pv.save_adapter(model, tmp_path / "a")
    fresh = pv.load_adapter(make_host(host), tmp_path / "a")
    assert torch.equal(fresh(x), expected)
    assert pv.summary(fresh).trainable == pv.summary(model).trainable


@pytest.mark.parametrize("method,host", pairs())
def test_merge(method, host):
    model = make_host(host)
    if not supported(method, host):
        pytest.skip(f"{method} does not run on {host}")
    original_keys = list(model.state_dict())
    pv.apply(model, method)
    perturb_trainable(model)
    x = input_for(host)
    before = model(x)
    if not pv.get_method(method).mergeable:
        with pytest.raises(pv.MergeError, match=method):
            pv.merge(model)
        assert torch.equal(model(x), before)  # refused before changing anything
        return
    merged = pv.merge(model)
    assert type(merged) is type(make_host(host))
    assert not hasattr(merged, "petl")
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)
    if host != "swin":  # Swin's bias-free PatchMerging.reduction gains a bias under SSF merge
        assert list(merged.state_dict()) == original_keys
        plain = make_host(host)
        plain.load_state_dict(merged.state_dict())
        torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=1e-5)
