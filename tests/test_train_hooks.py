"""Methods' training hooks in the classifier trainer: mask tuning's L2 term and gradient dropout,
SaRA's progressive re-selection, and no-op defaults (SSF trains bit-identically without them)."""
import pytest
import torch
from test_train import image_root, tiny_config  # noqa: F401  (image_root is a fixture)

import petl_vision as pv
from petl_vision.core.registry import Method, MethodConfig
from petl_vision.methods import mask_tuning as mt
from petl_vision.methods import sara
from petl_vision.train import trainer
from petl_vision.train.trainer import MethodHooks, train

# 18 training images, batch 4: 5 optimizer steps per epoch, 10 in the 2-epoch runs.
STEPS_PER_EPOCH = 5


def trainable(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def scores(model) -> torch.Tensor:
    return torch.cat([m.score.detach().flatten() for _, m in mt.masks(model)])


def test_default_hooks_do_nothing():
    model, config = torch.nn.Linear(2, 2), MethodConfig()
    assert Method.extra_loss(model, config) is None and Method.epoch_metrics(model, config) == {}
    assert Method.owns_backward(config) is False and Method.on_step(model, config, None, 1, 10) is None
    ssf = pv.get_method("ssf")
    for hook in ("extra_loss", "owns_backward", "backward", "on_step", "epoch_metrics"):  # inherited, not overridden
        assert getattr(ssf, hook).__func__ is getattr(Method, hook).__func__, hook


def test_ssf_trains_bit_identically_with_the_hooks_bypassed(image_root, tmp_path, monkeypatch):  # noqa: F811
    with_hooks = train(tiny_config(image_root, tmp_path / "hooks", "method.name=ssf", "clip_grad_norm=1.0"))
    monkeypatch.setattr(trainer, "applied_methods", lambda model: [])  # MethodHooks sees no method
    bypassed = train(tiny_config(image_root, tmp_path / "bypassed", "method.name=ssf", "clip_grad_norm=1.0"))
    want, got = trainable(bypassed["model"]), trainable(with_hooks["model"])
    assert want.keys() == got.keys() and len(want) > 0
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [h["train_loss"] for h in with_hooks["history"]] == [h["train_loss"] for h in bypassed["history"]]
    assert with_hooks["history"][-1].keys() == bypassed["history"][-1].keys()  # no extra metrics


def test_mask_tuning_l2_term_is_in_the_classifier_loss(image_root, tmp_path):  # noqa: F811
    def run(name, *extra):
        cfg = tiny_config(image_root, tmp_path / name, "method.name=mask_tuning", "method.grad_dropout=false", *extra)
        return train(cfg)

    # lr 1e-30 (the config refuses 0): nothing moves, so the loss differs by exactly the penalty at the initial scores.
    frozen_on, frozen_off = run("on0", "optim.lr=1e-30", "method.reg_weight=0.5"), run("off0", "optim.lr=1e-30", "method.reg_weight=0")
    sizes = [m.score.numel() for _, m in mt.masks(frozen_on["model"])]
    penalty = 0.5 * sum(0.01 * n ** 0.5 for n in sizes)  # reg_weight x sum of ||score||_2, scores all 1e-2
    for on, off in zip(frozen_on["history"], frozen_off["history"]):
        assert on["train_loss"] - off["train_loss"] == pytest.approx(penalty, rel=1e-4)
        assert on["top1"] == off["top1"]
    # Training: the penalty pulls the scores down, masking more weights off.
    on, off = run("on", "optim.lr=2e-3", "method.reg_weight=1.0"), run("off", "optim.lr=2e-3", "method.reg_weight=0")
    assert scores(on["model"]).mean() < scores(off["model"]).mean() - 1e-4
    record = on["history"][-1]
    assert record["masked_fraction"] == mt.masked_fraction(on["model"])  # mask tuning's epoch_metrics hook
    assert record["masked_fraction"] > off["history"][-1]["masked_fraction"]


def test_gradient_dropout_runs_in_the_classifier_trainer(image_root, tmp_path):  # noqa: F811
    def final_scores(name, *extra):
        cfg = tiny_config(image_root, tmp_path / name, "method.name=mask_tuning", "optim.lr=1e-3", *extra)
        return scores(train(cfg)["model"])

    plain = final_scores("plain", "method.grad_dropout=false")
    keep_all = final_scores("lam0", "method.grad_dropout=true", "method.grad_dropout_lambda=0.0")
    dropout = final_scores("lam1", "method.grad_dropout=true", "method.grad_dropout_lambda=1.0")
    assert torch.equal(keep_all, plain)  # lambda 0 keeps the task gradient as it is
    assert not torch.equal(dropout, plain)
    assert (dropout != plain).float().mean() > 0.01


def test_sara_reselects_at_the_configured_step(image_root, tmp_path, monkeypatch, capsys):  # noqa: F811
    calls, real = [], sara.reselect

    def spy(model, optimizer=None):
        inner = optimizer.optimizer  # accelerate's wrapper around AdamW
        steps = {int(s["step"]) for s in inner.state.values()}
        totals = real(model, optimizer)
        values = [d.values for d in sara.sara_module(model).deltas().values()]
        in_optimizer = {id(p) for group in inner.param_groups for p in group["params"]}
        calls.append({"steps": steps, "values": [v.detach().clone() for v in values],
                      "consistent": all(id(v) in in_optimizer and v in inner.state for v in values), **totals})
        return totals

    monkeypatch.setattr(sara, "reselect", spy)
    # progressive_fraction 0.3 of 10 steps: after step 3.
    cfg = tiny_config(image_root, tmp_path / "sara", "method.name=sara", "method.fraction=0.1",
                      "method.progressive_fraction=0.3", "optim.lr=1e-2")
    result = train(cfg)
    assert len(calls) == 1 and calls[0]["steps"] == {3}
    assert calls[0]["consistent"] and calls[0]["selected"] > 0
    after = [d.values.detach() for d in sara.sara_module(result["model"]).deltas().values()]
    assert any(not torch.equal(a, b) for a, b in zip(after, calls[0]["values"]))  # the new values kept training
    assert calls[0]["fixed"] > 0  # lr 1e-2 moved trained entries out of the smallest 10%
    totals = {k: calls[0][k] for k in ("selected", "kept", "fixed")}
    assert f"step 3: sara {{'reselection': {totals}}}" in capsys.readouterr().out  # the loop reports it

    calls.clear()
    train(tiny_config(image_root, tmp_path / "fixed", "method.name=sara", "method.fraction=0.1", "method.progressive_step=7"))
    assert len(calls) == 1 and calls[0]["steps"] == {7}
    calls.clear()
    train(tiny_config(image_root, tmp_path / "never", "method.name=sara", "method.fraction=0.1", "method.progressive_fraction=null"))
    assert calls == []


def test_only_one_method_may_own_the_backward(monkeypatch):
    owner = (pv.get_method("mask_tuning"), pv.make_config("mask_tuning"))
    monkeypatch.setattr(trainer, "applied_methods", lambda model: [owner, owner])
    with pytest.raises(ValueError, match="compute the gradients themselves"):
        MethodHooks(torch.nn.Linear(2, 2), total_steps=10)
    monkeypatch.setattr(trainer, "applied_methods", lambda model: [owner])
    hooks = MethodHooks(torch.nn.Linear(2, 2), total_steps=10)
    assert hooks.owner == owner
    with pytest.raises(ValueError, match="needs the frozen model"):  # no reference model given
        hooks.backward(torch.zeros((), requires_grad=True), torch.zeros(1, 2), torch.zeros(1, 2), 0, lambda loss: None)
