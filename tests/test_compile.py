"""torch.compile on adapted models (issue #14): same outputs and gradients as eager, graph breaks counted.

1. one tiny host per method (and a CNN for the layer-wise methods), in train mode: the `aot_eager`
   backend traces forward and backward through dynamo and AOTAutograd exactly as inductor would see
   them, without generating kernels, so the suite stays fast on CPU;
2. every method x tiny host pair of test_autocast's grid: one graph, the eager forward exactly.
"""
import pytest
import torch
import torch._dynamo
from test_autocast import CASES, build, inputs, method_args, perturb, run

import petl_vision as pv

pytestmark = pytest.mark.usefixtures("one_thread")

# Hosts tried per method: a ViT (or the method's only host kind) and a CNN for the layer-wise methods.
PREFERRED = ("vit", "vit_deep", "point_mae", "unet")
LAYERWISE_CNN = {"ssf": "resnet", "lora": "resnet", "mask_tuning": "convnext", "bitfit": "resnet"}


def _cases() -> list[tuple[str, str]]:
    by_method: dict[str, list[str]] = {}
    for method, host in CASES:
        by_method.setdefault(method, []).append(host)
    cases = []
    for method, hosts in sorted(by_method.items()):
        cases.append((method, next((h for h in PREFERRED if h in hosts), hosts[0])))
        if LAYERWISE_CNN.get(method) in hosts:
            cases.append((method, LAYERWISE_CNN[method]))
    return cases


# Graph breaks of the whole model's forward in train mode. 0 for every method whose forward has no
# data-dependent Python; an entry here is a known break, to be brought to 0.
MAX_GRAPH_BREAKS = {"p2p": 1}


def graph_breaks(model, x) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(*x).graph_break_count


@pytest.mark.parametrize("method,host", _cases())
def test_compiled_matches_eager(method, host):
    kind = pv.get_method(method).input_kind
    model = build(host, kind)
    pv.apply(model, method, **method_args(method, model))
    perturb(model, scale=0.03 if method == "p2p" else 0.3)
    model.train()
    x = inputs(kind, host)
    breaks = graph_breaks(model, x)
    assert breaks <= MAX_GRAPH_BREAKS.get(method, 0), f"{method} on {host}: {breaks} graph breaks"

    # Eval mode for a deterministic comparison (dropout, drop-path, random prompts off); the backward
    # runs through the compiled graph too.
    model.eval()
    torch.manual_seed(0)
    ref = run(model, x)
    ref.float().square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(0)
    out = run(compiled, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads, f"{method}: compiled backward reached other parameters"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{method} {n}: {m}")


@pytest.mark.parametrize("method,host", CASES)
def test_every_pair_compiles_in_one_graph(method, host):
    """Every method x tiny host that runs eagerly traces into one graph (fullgraph: no break; P2P's
    point-to-image pre-hook is its one known break) and gives the eager forward exactly (dynamo's
    `eager` backend: tracing only, cheap enough for the whole grid)."""
    kind = pv.get_method(method).input_kind
    model = build(host, kind)
    pv.apply(model, method, **method_args(method, model))
    model.eval()
    x = inputs(kind, host)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=MAX_GRAPH_BREAKS.get(method, 0) == 0)
    with torch.no_grad():
        assert torch.equal(run(compiled, x), run(model, x)), f"{method} on {host}"
