"""``GSGD(compiled=True)`` replays the last step's arguments with new gradients (``_Replay`` in
:mod:`lightning_gsgd.step.compiled`) only while they are still valid.

Each case steps two copies of a model with the same gradients: one optimizer may replay, the
other always rebuilds its arguments. Between steps, a case changes something the arguments were
built from (the lr, momentum, the state, a buffer, which parameters have gradients, the topology);
both copies must stay bit for bit equal, and the replay must not be used on the step after a change
that invalidates it, and must be used again once the arguments were rebuilt.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch._dynamo

from lightning_gsgd import GSGD, detect_topology
from lightning_gsgd.step.graph import ChainGraphs
from tests.models import initialize, make

CHANGE_AT = 3  # the change is made before this step (steps 0 and 1 build the buffers and the replay)
STEPS = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lr(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    for g in opt.param_groups:
        g["lr"] *= 0.5


def _momentum(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    for g in opt.param_groups:
        g["momentum"], g["nesterov"] = 0.5, True


def _min_ratio(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    for g in opt.param_groups:
        g["min_ratio"] = 0.5


def _load_state(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    # new state tensors with the same values: a replay would keep updating the old buffers
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _replace_buffer(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    w = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"] * 0.5


def _clear_state(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    opt.state.clear()


def _rebind(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    opt.bind(detect_topology(model, x))


def _drop_head_bias_grad(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    list(model.parameters())[-1].grad = None


def _keep_grad_tensors(opt: GSGD, model: torch.nn.Module, x: torch.Tensor) -> None:
    pass  # with zero_grad(set_to_none=False) below: the same gradient tensors, new values


# name -> (change, invalidates the replay, zero_grad's set_to_none after the change)
CASES: dict[str, tuple[Callable[[GSGD, torch.nn.Module, torch.Tensor], None], bool, bool]] = {
    "nothing": (lambda opt, model, x: None, False, True),
    "lr": (_lr, True, True),
    "momentum": (_momentum, True, True),
    "min_ratio": (_min_ratio, True, True),
    "load_state_dict": (_load_state, True, True),
    "replaced_buffer": (_replace_buffer, True, True),
    "cleared_state": (_clear_state, True, True),
    "rebind": (_rebind, True, True),
    "head_bias_without_grad": (_drop_head_bias_grad, True, True),
    "same_grad_tensors": (_keep_grad_tensors, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_replay_is_used_only_while_its_arguments_are_valid(case):
    change, invalidates, set_to_none = CASES[case]
    model, x = make("cnn")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    twin = copy.deepcopy(model)
    h = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)
    opts = []
    for m in (model, twin):
        opt = GSGD(m.parameters(), topology=detect_topology(m, x), compiled=True, **h)
        opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
        opts.append(opt)
    replaying, rebuilding = opts
    rebuilding._graph_replay = lambda: False  # type: ignore[method-assign]
    used: list[bool] = []
    replay = replaying._graph_replay

    def recording() -> bool:
        used.append(replay())
        return used[-1]

    replaying._graph_replay = recording  # type: ignore[method-assign]
    for k in range(STEPS):
        for m, o in ((model, replaying), (twin, rebuilding)):
            if k == CHANGE_AT:
                change(o, m, x)
            # the head bias's gradient stays None once dropped (zero_grad does not bring it back)
            dropped = k > CHANGE_AT and list(m.parameters())[-1].grad is None
            o.zero_grad(set_to_none=set_to_none or k < CHANGE_AT)
            m(x).square().mean().backward()
            if dropped or (case == "head_bias_without_grad" and k == CHANGE_AT):
                list(m.parameters())[-1].grad = None
            o.step()
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(a, b), f"step {k}: {n}"
            ba, bb = replaying.state[a].get("momentum_buffer"), rebuilding.state[b].get("momentum_buffer")
            assert (ba is None) == (bb is None), f"step {k}: {n}"
            assert ba is None or torch.equal(ba, bb), f"step {k}: buffer of {n}"
        for counter in ("steps", "skipped_steps", "guard_hits"):
            assert int(getattr(replaying, counter)) == int(getattr(rebuilding, counter)), counter
    assert int(replaying.skipped_steps) == 0
    assert used[:CHANGE_AT] == [False, False, True], "no replay before the change: the case proves nothing"
    assert used[CHANGE_AT] is not invalidates, f"step {CHANGE_AT}: replay used {used[CHANGE_AT]}"
    assert used[-1], "the replay was not rebuilt after the change"


def test_a_tensor_lr_is_never_replayed():
    # a tensor lr may change in place, so its table is rebuilt on every step
    model, x = make("cnn")
    initialize(model, detect_topology(model, x), "skeleton_rescaled")
    lr = torch.tensor(1e-2, dtype=torch.float64)
    opt = GSGD(model.parameters(), lr=lr, momentum=0.9, topology=detect_topology(model, x), compiled=True)
    opt._graphs = ChainGraphs(backend="eager", fullgraph=True)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert opt._replay is None
