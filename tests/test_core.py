"""The core contract: API errors, composition, frozen eval mode, VPT token layout."""
import pytest
import torch
from conftest import input_for, make_host

import petl_vision as pv


def test_list_methods_and_configs():
    assert {"ssf", "vpt", "linear", "full", "bitfit", "lora"} <= set(pv.list_methods())
    assert pv.make_config("vpt", num_prompts=3) == pv.VPTConfig(num_prompts=3)
    assert pv.get_config_class("ssf") is pv.SSFConfig


def test_unknown_method_and_field_errors():
    model = make_host("vit")
    with pytest.raises(pv.UnknownMethodError, match="registered methods: .*ssf"):
        pv.apply(model, "ssff")
    with pytest.raises(TypeError, match="VPTConfig has no field.*'prompts'"):
        pv.apply(model, "vpt", prompts=3)
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        pv.apply(model, "vpt", num_prompts=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pv.apply("not a model", "ssf")
    assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())


def test_apply_twice_is_an_error():
    model = pv.apply(make_host("vit"), "ssf")
    with pytest.raises(ValueError, match="'ssf' is already applied"):
        pv.apply(model, "ssf")


def test_unsupported_host_names_supported_families():
    with pytest.raises(pv.UnsupportedHostError, match="needs a token-based host; got ResNet.*VisionTransformer"):
        pv.apply(make_host("resnet"), "vpt")


def test_container_hosts_are_refused_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(pv.UnsupportedHostError, match="Sequential runs .*every child.*wrap it"):
        pv.apply(model, "bitfit")
    assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_summary_is_printable_with_attributes():
    s = pv.summary(pv.apply(make_host("vit"), "ssf"))
    assert s.trainable == s.by_method["ssf"] and s.total > s.trainable
    assert "ssf" in str(s) and f"{s.trainable:,}" in str(s)
    assert 0 < s.trainable_percent < 100


def test_compose_ssf_and_vpt():
    model = make_host("vit")
    pv.apply(model, "ssf")
    pv.apply(model, "vpt", num_prompts=2)
    s = pv.summary(model)
    assert s.added["vpt"] == 2 * 2 * 32 and s.added["ssf"] > 0
    head = sum(p.numel() for p in model.head.parameters())
    assert s.trainable == s.added["ssf"] + s.added["vpt"] + head
    model(input_for("vit")).sum().backward()
    assert model.petl.vpt.prompts.grad is not None
    assert model.blocks[0].norm1.scale.grad is not None


def test_compose_ssf_then_lora_merges_exactly():
    model = make_host("vit")
    pv.apply(model, "ssf")
    pv.apply(model, "lora", r=2)
    assert model.blocks[0].norm1.scale.requires_grad  # peft did not freeze SSF
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "scale" in name:
                p.add_(0.2 * torch.randn_like(p))
    x = input_for("vit")
    before = model(x)
    pv.merge(model)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_lora_then_ssf_is_refused():
    model = pv.apply(make_host("vit"), "lora")
    with pytest.raises(pv.UnsupportedHostError, match="apply 'ssf' before 'lora'"):
        pv.apply(model, "ssf")


def test_frozen_modules_stay_in_eval_mode():
    model = pv.apply(make_host("vit"), "vpt")
    model.train()
    model(input_for("vit"))
    assert model.training and model.head.training and model.petl.vpt.dropout.training
    assert not any(m.training for m in model.blocks.modules())
    assert not model.norm.training
    model.eval()
    assert not model.petl.vpt.training


def test_frozen_batchnorm_statistics_do_not_move():
    model = pv.apply(make_host("resnet"), "ssf")
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(input_for("resnet")).sum().backward()
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert stats.keys() == after.keys() and all(torch.equal(stats[k], after[k]) for k in stats)


def test_full_finetuning_trains_batchnorm_statistics_and_saves_them(tmp_path):
    model = pv.apply(make_host("resnet"), "full")
    model.train()
    model(input_for("resnet"))
    model.eval()
    expected = model(input_for("resnet"))
    pv.save_adapter(model, tmp_path)
    fresh = pv.load_adapter(make_host("resnet"), tmp_path)
    assert torch.equal(fresh(input_for("resnet")), expected)


@pytest.mark.parametrize("host", ["vit", "vit_reg_avg", "deit_distilled"])
@pytest.mark.parametrize("deep", [True, False])
def test_vpt_token_layout(host, deep):
    model = pv.apply(make_host(host), "vpt", num_prompts=3, deep=deep)
    prompts = model.petl.vpt.prompts
    n = model.num_prefix_tokens
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
    features = model.forward_features(input_for(host))
    num_patches = model.patch_embed.num_patches
    assert features.shape[1] == n + num_patches  # prompts dropped after the last block
    for i, x in seen.items():
        assert x.shape[1] == n + 3 + num_patches
        if i == 0 or deep:
            assert torch.equal(x[0, n:n + 3], prompts[i if deep else 0])
        else:
            assert not torch.equal(x[0, n:n + 3], prompts[0])  # shallow: prompts pass through the block


def test_vpt_projection_and_dropout():
    model = pv.apply(make_host("vit"), "vpt", num_prompts=4, project_dim=8, dropout=0.5)
    vpt = model.petl.vpt
    assert vpt.prompts.shape == (2, 4, 8) and vpt.proj.weight.shape == (32, 8)
    model.train()
    a, b = vpt.layer_prompts(0, 1), vpt.layer_prompts(0, 1)
    assert not torch.equal(a, b)  # dropout is active in training
    model.eval()
    assert torch.equal(vpt.layer_prompts(0, 1), vpt.layer_prompts(0, 1))


def test_ssf_placement_on_vit():
    model = pv.apply(make_host("vit"), "ssf")
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, pv.methods.ssf.SSFLayer))
    block = ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2", "norm1", "norm2"]
    assert wrapped == sorted(["norm", "patch_embed.proj"] + [f"blocks.{i}.{n}" for i in range(2) for n in block])
    assert model.patch_embed.proj.channel_dim == 1 and model.blocks[0].attn.qkv.channel_dim == -1
    assert model.blocks[0].attn.qkv.in_features == 32  # wrapper forwards attribute lookups to base


def test_ssf_init_statistics():
    torch.manual_seed(0)
    import timm

    model = pv.apply(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0), "ssf")
    scales = torch.cat([m.scale for m in model.modules() if isinstance(m, pv.methods.ssf.SSFLayer)])
    shifts = torch.cat([m.shift for m in model.modules() if isinstance(m, pv.methods.ssf.SSFLayer)])
    assert scales.mean().item() == pytest.approx(1.0, abs=2e-3) and scales.std().item() == pytest.approx(0.02, rel=0.05)
    assert shifts.mean().item() == pytest.approx(0.0, abs=2e-3) and shifts.std().item() == pytest.approx(0.02, rel=0.05)


def test_ssf_target_modules_pattern():
    model = pv.apply(make_host("vit"), "ssf", target_modules=r"norm")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, pv.methods.ssf.SSFLayer)}
    assert wrapped == {"norm", "blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2"}
    model = make_host("vit")
    with pytest.raises(pv.UnsupportedHostError, match="matches no eligible layer"):
        pv.apply(model, "ssf", target_modules="nothing_here")
    assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())  # rolled back


def test_merge_without_methods_is_an_error():
    with pytest.raises(pv.MergeError, match="no petl_vision method"):
        pv.merge(make_host("vit"))


def _saved_bytes(model, x):
    """Bytes of distinct storages autograd keeps for backward during one forward."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def test_ssf_save_output_matches_plain_gradients_and_saves_less():
    x = input_for("vit")
    models = {}
    for save_output in (True, False):
        model = pv.apply(make_host("vit"), "ssf", save_output=save_output)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, pv.methods.ssf.SSFLayer):
                    m.scale.normal_(1.0, 0.3)
        model(x).square().sum().backward()
        models[save_output] = model
    grads = {k: {n: p.grad for n, p in m.named_parameters() if p.requires_grad} for k, m in models.items()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-5)
    assert _saved_bytes(models[True], x) < _saved_bytes(models[False], x)


def test_scale_shift_gradcheck():
    x = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    scale = (1 + 0.1 * torch.randn(4, dtype=torch.double)).requires_grad_()
    shift = torch.randn(4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(pv.methods.ssf.ScaleShift.apply, (x, scale, shift))


def test_method_modules_follow_the_model_mode():
    model = make_host("vit").eval()
    pv.apply(model, "vpt", dropout=0.5)
    assert not model.petl.vpt.dropout.training


@pytest.mark.parametrize("method, field, value, expected", [
    ("vpt", "num_prompts", "abc", "an integer"),
    ("lora", "r", "x", "an integer"),
    ("lora", "r", 2.5, "an integer"),
    ("lora", "train_head", "abc", "true or false"),
    ("lora", "alpha", None, r"a number \(or a string such as \"1e-3\"\)"),
    ("lora", "target_modules", 3, "a string or None"),
    ("hst", "widths", [32, "a"], "a list of integers"),
])
def test_wrong_value_types_name_method_field_and_type(method, field, value, expected):
    model = make_host("vit")
    with pytest.raises(pv.ConfigError, match=rf"method '{method}': field '{field}' must be {expected}, got {value!r}".replace("[", r"\[")):
        pv.apply(model, method, **{field: value})
    assert not hasattr(model, "petl") and all(p.requires_grad for p in model.parameters())
    assert issubclass(pv.ConfigError, TypeError) and issubclass(pv.ConfigError, ValueError)


def test_values_are_converted_to_the_field_types():
    config = pv.make_config("lora", r=8.0, alpha="1e-3", dropout=0)
    assert (config.r, type(config.r), config.alpha, config.dropout) == (8, int, 1e-3, 0)
    assert pv.make_config("vpt", num_prompts="4").num_prompts == 4
    assert pv.make_config("hst", widths=[32, 48, 64, 72]).widths == (32, 48, 64, 72)
    assert pv.make_config("sara", module_types=["Linear"], fraction="0.5") == pv.SaRAConfig(module_types=("Linear",), fraction=0.5)
    # a config object goes through the same checks
    assert pv.make_config(pv.LoRAConfig(r=4), alpha="2").alpha == 2.0


@pytest.mark.parametrize("method", ["ssf", "lora", "bitfit", "full", "vpt"])
def test_a_bare_layer_is_refused_with_our_error(method):
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(pv.UnsupportedHostError, match=f"method '{method}': Linear is a single layer with no submodules.*wrap it"):
        pv.apply(layer, method)
    assert not hasattr(layer, "petl") and layer.weight.requires_grad
