"""PathSGD: brute-force path enumeration, the conv per-node claim, equivariance, plain-SGD fallback, errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_gsgd import (
    PathSGD,
    TopologyError,
    detect_topology,
    init_skeleton_,
    random_unit_factors,
    rescale_hidden_units_,
    skeleton_sgd,
)
from lightning_gsgd.optim.path_sgd import path_scales
from tests.models import MODELS, make


def _tiny_mlp(bias: bool, seed: int = 0) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 4, bias=bias), nn.ReLU(), nn.Linear(4, 3, bias=bias), nn.ReLU(), nn.Linear(3, 2, bias=bias)
    ).double()
    with torch.no_grad():  # order-one weights so that no product is negligible
        for p in model.parameters():
            p.copy_((torch.rand_like(p) + 0.5) * torch.sign(torch.randn_like(p)))
    return model, torch.randn(5, 3, dtype=torch.float64)


def _enumerated_gammas(ws: list[torch.Tensor], bs: list[torch.Tensor | None]) -> dict[tuple, float]:
    """gamma_e = sum over all paths through e of the product of the squared other weights on the path.

    Paths start at an input node, or at the constant node of a bias (edge ("b", l, j) into node j of
    layer l's output), and end at an output node. Written with explicit loops over node sequences.
    """
    L = len(ws)
    widths = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    paths: list[list[tuple]] = []
    for start in range(L):  # level at which the path enters: 0 = input nodes, s > 0 = bias of layer s - 1
        if start > 0 and bs[start - 1] is None:
            continue
        for nodes in itertools.product(*[range(widths[k]) for k in range(start, L + 1)]):
            edges: list[tuple] = [] if start == 0 else [("b", start - 1, nodes[0])]
            for k in range(len(nodes) - 1):
                l = start + k
                edges.append(("w", l, nodes[k + 1], nodes[k]))
            paths.append(edges)
    if bs[L - 1] is not None:  # the output bias: a path of one edge
        paths += [[("b", L - 1, j)] for j in range(widths[L])]

    def value(e: tuple) -> float:
        return float(ws[e[1]][e[2], e[3]]) if e[0] == "w" else float(bs[e[1]][e[2]])  # type: ignore[index]

    gamma: dict[tuple, float] = {}
    for edges in paths:
        for i, e in enumerate(edges):
            others = math.prod(value(o) ** 2 for j, o in enumerate(edges) if j != i)
            gamma[e] = gamma.get(e, 0.0) + others
    return gamma


@pytest.mark.parametrize("bias", [True, False])
def test_gamma_is_the_sum_over_paths_through_the_edge(bias):
    model, x = _tiny_mlp(bias)
    topo = detect_topology(model, x)
    (chain,) = topo.chains
    ws = [layer.weight.detach() for layer in chain.layers]
    bs = [None if layer.bias is None else layer.bias.detach() for layer in chain.layers]
    ref = _enumerated_gammas(ws, bs)
    gw, gb = path_scales([layer.weight3d().detach() for layer in chain.layers], bs)
    count = 0
    for l, g in enumerate(gw):
        for r, c in itertools.product(range(g.shape[0]), range(g.shape[1])):
            assert g[r, c, 0].item() == pytest.approx(ref[("w", l, r, c)], rel=1e-13)
            count += 1
        if bias:
            for j in range(gb[l].shape[0]):
                assert gb[l][j].item() == pytest.approx(ref[("b", l, j)], rel=1e-13)
                count += 1
    assert count == len(ref)  # every edge checked, none left over
    if bias:  # the output bias has gamma 1: plain SGD
        assert torch.equal(gb[-1], torch.ones(2, dtype=torch.float64))


def _mse_target(model, x):
    return torch.randn(x.shape[0], model(x).shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", [True, False])
def test_steps_equal_brute_force_path_scaling(bias):
    """3 steps with momentum and weight decay equal the update written with enumerated gammas."""
    model, x = _tiny_mlp(bias)
    y = _mse_target(model, x)
    lr, mu, wd = 1e-3, 0.9, 0.01
    ours = copy.deepcopy(model)
    opt = PathSGD(ours.parameters(), lr=lr, momentum=mu, weight_decay=wd, topology=detect_topology(ours, x))
    ref = copy.deepcopy(model)
    lin = [m for m in ref if isinstance(m, nn.Linear)]
    bufs: dict[tuple, float] = {}
    for _ in range(3):
        opt.zero_grad()
        ((ours(x) - y) ** 2).mean().backward()
        opt.step()
        ref.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        with torch.no_grad():
            gam = _enumerated_gammas([m.weight for m in lin], [m.bias for m in lin])
            for e, gamma in gam.items():
                p = lin[e[1]].weight if e[0] == "w" else lin[e[1]].bias
                i = e[2:]
                d = p.grad[i].item() / gamma + wd * p[i].item()
                bufs[e] = d if e not in bufs else mu * bufs[e] + d
                p[i] -= lr * bufs[e]
    moved = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.parameters()))
    assert moved > 1e-4
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def _squared_network_gradients(model: nn.Sequential, length: int) -> dict[str, torch.Tensor]:
    """d phi / d(theta**2) of the *unrolled* net: phi = sum of outputs of the squared net on all-ones input."""
    sq = {n: p.detach().square().requires_grad_(True) for n, p in model.named_parameters()}
    phi = functional_call(model, sq, (torch.ones(1, model[0].in_channels, length, dtype=torch.float64),)).sum()
    phi.backward()
    return {n: t.grad for n, t in sq.items()}


def _conv_chain(padding_mode: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Conv1d(3, 4, 3, padding=1, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6, 5),
    ).double()


def test_conv_per_node_gamma_is_the_unrolled_path_norm_derivative_with_circular_padding():
    model = _conv_chain("circular")
    topo = detect_topology(model, torch.zeros(1, 2, 6, dtype=torch.float64))
    (chain,) = topo.chains
    layers = chain.layers
    gw, gb = path_scales([layer.weight3d().detach() for layer in layers], [layer.bias.detach() for layer in layers])
    ref = _squared_network_gradients(model, 6)
    for layer, g, b in zip(layers, gw, gb):
        torch.testing.assert_close(g.reshape(layer.weight.shape), ref[layer.name + ".weight"], rtol=1e-12, atol=0)
        torch.testing.assert_close(b, ref[layer.name + ".bias"], rtol=1e-12, atol=0)
    # With zero padding the border positions have fewer paths: the unrolled derivative differs.
    zero = _conv_chain("zeros")
    ref0 = _squared_network_gradients(zero, 6)
    assert not torch.allclose(gw[0].reshape(layers[0].weight.shape), ref0["0.weight"], rtol=1e-3)


def _run(model, x, y, opt, steps: int):
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model(x).detach()


HYPER = [dict(momentum=0.9, weight_decay=0.01), dict(momentum=0.5, dampening=0.2), dict(momentum=0.9, nesterov=True)]


@pytest.mark.parametrize("hyper", HYPER, ids=["mom_wd", "damp", "nesterov"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equivariant_under_hidden_unit_rescaling(name, hyper):
    """20 steps from w and from g_c(w) give the same function; torch SGD does not (negative control)."""
    model, x = make(name)
    y = _mse_target(model, x)
    topo = detect_topology(model, x)
    scaled = copy.deepcopy(model)
    rescale_hidden_units_(detect_topology(scaled, x), random_unit_factors(topo, 1.0, torch.Generator().manual_seed(5)))
    out0 = model(x).detach()
    torch.testing.assert_close(scaled(x), out0, rtol=1e-12, atol=1e-12)  # same function to start with

    def path(m):
        return _run(m, x, y, PathSGD(m.parameters(), lr=1e-3, topology=detect_topology(m, x), **hyper), 20)

    a, b = path(copy.deepcopy(model)), path(copy.deepcopy(scaled))
    assert (a - out0).abs().max() / out0.abs().max() > 1e-3, "training did not move the outputs"
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-9

    def sgd(m):
        return _run(m, x, y, torch.optim.SGD(m.parameters(), lr=1e-3, **hyper), 20)

    sa, sb = sgd(copy.deepcopy(model)), sgd(copy.deepcopy(scaled))
    assert ((sa - sb).abs().max() / sa.abs().max()).item() > 1e-4


def test_parameters_outside_chains_get_torch_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.LayerNorm(3), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)
    ).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    topo = detect_topology(model, x)
    chain_ids = {id(p) for p in topo.chain_params()}
    outside = [n for n, p in model.named_parameters() if id(p) not in chain_ids]
    assert outside == ["3.weight", "3.bias"]
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = PathSGD(ours.parameters(), topology=detect_topology(ours, x), **hyper)
    sgd = torch.optim.SGD(ref.parameters(), **hyper)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # the same injected gradients for both
        for p, q in zip(ours.parameters(), ref.parameters()):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    params = dict(ours.named_parameters())
    output_biases = ["2.bias", "6.bias"]  # gamma = 1: SGD too (up to rounding: a different op order)
    for n, q in ref.named_parameters():
        if n in outside + output_biases:
            torch.testing.assert_close(params[n], q, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert not torch.allclose(params[n], q), n  # chain parameters are preconditioned


def test_resume_from_state_dict_is_bit_identical():
    model, x = make("mlp_unequal")
    y = _mse_target(model, x)
    hyper = dict(lr=1e-3, momentum=0.9, weight_decay=0.01)
    full = copy.deepcopy(model)
    _run(full, x, y, PathSGD(full.parameters(), topology=detect_topology(full, x), **hyper), 6)
    part = copy.deepcopy(model)
    opt = PathSGD(part.parameters(), topology=detect_topology(part, x), **hyper)
    _run(part, x, y, opt, 3)
    saved_w, saved_o = copy.deepcopy(part.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_w)
    opt2 = PathSGD(resumed.parameters(), topology=detect_topology(resumed, x), **hyper)
    opt2.load_state_dict(saved_o)
    _run(resumed, x, y, opt2, 3)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_closure_is_run_and_its_loss_returned_and_lr_scheduler_applies():
    model, x = make("mlp_equal")
    y = _mse_target(model, x)
    opt = PathSGD(model.parameters(), lr=1e-3, topology=detect_topology(model, x))

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)  # sets lr to 0 at construction
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(dampening=1.5), "dampening"),
        (dict(nesterov=True), "nesterov"),
        (dict(eps=0.0), "eps"),
        (dict(lr=torch.tensor([0.1, 0.2])), "one element"),
    ],
)
def test_invalid_hyper_parameters_are_refused(kwargs, match):
    model, _ = make("mlp_equal")
    with pytest.raises(ValueError, match=match):
        PathSGD(model.parameters(), **kwargs)


def test_binding_errors_name_the_layer():
    model, x = make("mlp_equal")
    topo = detect_topology(model, x)
    with pytest.raises(TopologyError, match=r"weight of layer '0'"):
        PathSGD(list(model.parameters())[2:], topology=topo)
    other, _ = make("mlp_equal")
    with pytest.raises(TopologyError, match="different model"):
        PathSGD(other.parameters(), topology=topo)
    model[2].bias.requires_grad_(False)
    with pytest.raises(TopologyError, match=r"bias of layer '2' is frozen"):
        PathSGD(model.parameters(), topology=topo)


def test_unbound_step_says_how_to_bind():
    model, x = make("mlp_equal")
    opt = PathSGD(model.parameters(), lr=0.1)
    assert not opt.is_bound
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"bind\(topology\)"):
        opt.step()
    assert opt.bind(detect_topology(model, x)) is opt and opt.is_bound
    opt.step()


def test_skeleton_sgd_is_init_skeleton_then_torch_sgd():
    model, x = make("cnn")
    expected = copy.deepcopy(model)
    init_skeleton_(detect_topology(expected, x))
    opt = skeleton_sgd(model, x, lr=0.1, momentum=0.9)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(make("cnn")[0].parameters(), model.parameters()))
    with pytest.raises(ValueError, match="example_input"):
        skeleton_sgd(model, lr=0.1)


def test_tensor_lr_gives_the_same_steps_as_a_float_lr():
    model, x = make("cnn1d")
    y = _mse_target(model, x)
    hyper = dict(momentum=0.9, weight_decay=0.01)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    out_a = _run(a, x, y, PathSGD(a.parameters(), lr=1e-3, topology=detect_topology(a, x), **hyper), 3)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    out_b = _run(b, x, y, PathSGD(b.parameters(), lr=lr, topology=detect_topology(b, x), **hyper), 3)
    assert not torch.equal(out_a, model(x))
    torch.testing.assert_close(out_a, out_b, rtol=1e-14, atol=0)
