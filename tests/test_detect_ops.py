"""Which ops a chain passes through, and which end it (one op between two Linear/Conv layers)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import TopologyError, detect_topology


class Between(nn.Module):
    """fc1 -> op -> fc2 -> relu -> fc3: fc1 joins the chain exactly when ``op`` is allowed."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module, mid: int = 6) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, mid), nn.Linear(mid, 5), nn.Linear(5, 2)
        self.op = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.op(h) if self.op is not None else self.fn(h)
        return self.fc3(F.relu(self.fc2(h)))


def _chain_names(topo) -> list[tuple[str, ...]]:
    return [tuple(layer.name for layer in c.layers) for c in topo.chains]


def _chains(model: nn.Module, x, **kw) -> list[tuple[str, ...]]:
    return _chain_names(detect_topology(model, x, allow_empty=True, **kw))


def _between(op: Callable[[torch.Tensor], torch.Tensor] | nn.Module) -> tuple[Between, torch.Tensor]:
    """A float64 ``Between(op)`` and a 3-sample input, both from seed 0."""
    torch.manual_seed(0)
    return Between(op).double(), torch.randn(3, 4, dtype=torch.float64)


PASS = {
    "nn.ReLU(inplace)": lambda: nn.ReLU(inplace=True),
    "F.relu inplace": lambda: lambda h: F.relu(h, inplace=True),
    "Tensor.relu_": lambda: lambda h: h.relu_(),
    "torch.relu": lambda: torch.relu,
    "LeakyReLU": lambda: nn.LeakyReLU(0.3),
    "PReLU per unit": lambda: nn.PReLU(6),
    "RReLU": lambda: nn.RReLU(),
    "clamp(min=0)": lambda: lambda h: torch.clamp(h, min=0),
    "Dropout": lambda: nn.Dropout(0.5),
    "F.dropout": lambda: lambda h: F.dropout(h, 0.2, False),
    "Identity": lambda: nn.Identity(),
    "view no-op": lambda: lambda h: h.view(h.shape[0], -1),
    "relu then dropout": lambda: nn.Sequential(nn.ReLU(), nn.Dropout(0.1)),
}
STOP = {
    "GELU": lambda: nn.GELU(),
    "SiLU": lambda: nn.SiLU(),
    "tanh": lambda: torch.tanh,
    "sigmoid": lambda: torch.sigmoid,
    "softmax": lambda: lambda h: F.softmax(h, dim=-1),
    "LayerNorm": lambda: nn.LayerNorm(6),
    "ReLU6 (clips)": lambda: nn.ReLU6(),
    "Hardtanh": lambda: nn.Hardtanh(),
    "AlphaDropout (affine in training)": lambda: nn.AlphaDropout(0.2),
    "ELU": lambda: nn.ELU(),
    "times a constant": lambda: lambda h: h * 2.0,
    "add a constant": lambda: lambda h: h + 1.0,
    "flip units": lambda: lambda h: h.flip(-1),
    "clamp(min=0.1)": lambda: lambda h: torch.clamp(h, min=0.1),
}


@pytest.mark.parametrize("method", ["auto", "record"])
@pytest.mark.parametrize("label", list(PASS))
def test_homogeneous_ops_keep_the_chain(label, method):
    model, x = _between(PASS[label]())
    assert _chains(model, x, method=method) == [("fc1", "fc2", "fc3")]


@pytest.mark.parametrize("method", ["auto", "record"])
@pytest.mark.parametrize("label", list(STOP))
def test_other_ops_end_the_chain(label, method):
    model, x = _between(STOP[label]())
    topo = detect_topology(model, x, allow_empty=True, method=method)
    assert _chain_names(topo) == [("fc2", "fc3")]
    reason = {e.name: e.reason for e in topo.excluded}["fc1.weight"]
    assert "'fc1' is in no ReLU chain (after it:" in reason


def test_nondeterministic_eval_forward_is_reported():
    """Dropout hard-wired to training mode makes the self-check impossible: say so."""
    model, x = _between(lambda h: F.dropout(h, 0.5, True))
    with pytest.raises(TopologyError, match="differs between two identical forward passes"):
        detect_topology(model, x)
    assert _chains(model, x, self_check=False) == [("fc1", "fc2", "fc3")]


class TwoOutputs(nn.Module):
    """The hidden activation is also returned: two consumers, so no chain through it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x))
        return self.fc2(h), h


class Sequence3d(nn.Module):
    """Linear layers on ``[N, T, F]``: units on the last dim; a mean over T keeps them apart."""

    def __init__(self, pool_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)
        self.pool_dim = pool_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        h = h.mean(self.pool_dim) if self.pool_dim != 2 else h.amax(2, keepdim=True).expand(-1, -1, 5)
        return self.fc3(h)


class ConvHead(nn.Module):
    """conv -> relu -> reduce -> linear, with the reduction given."""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor], n_in: int) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(n_in, 2)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(self.reduce(h))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h, _ = self.attn(h, h, h)
        return self.fc2(F.relu(self.fc1(h)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn, self.conv2 = nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3)
        self.convt = nn.ConvTranspose2d(3, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convt(F.relu(self.conv2(F.relu(self.gn(self.conv1(x))))))


def test_tensor_with_two_consumers_ends_the_chain():
    torch.manual_seed(0)
    topo = detect_topology(TwoOutputs().double(), torch.randn(3, 4, dtype=torch.float64), allow_empty=True)
    assert not topo.chains
    assert "has 2 consumers" in {e.name: e.reason for e in topo.excluded}["fc1.weight"]


@pytest.mark.parametrize("pool_dim,chains", [(1, [("fc1", "fc2", "fc3")]), (2, [("fc1", "fc2")])])
def test_linear_on_sequences(pool_dim, chains):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    for method in ("auto", "record"):
        assert _chains(Sequence3d(pool_dim).double(), x, method=method) == chains


@pytest.mark.parametrize(
    "label,reduce,n_in,chain",
    [
        ("spatial mean", lambda h: h.mean((2, 3)), 4, ("conv1", "conv2", "fc")),
        (
            "adaptive max + flatten",
            lambda h: torch.flatten(F.adaptive_max_pool2d(h, 1), 1),
            4,
            ("conv1", "conv2", "fc"),
        ),
        ("flatten channel-major", lambda h: h.flatten(1), 4 * 4 * 4, ("conv1", "conv2", "fc")),
        (
            "reshape to [N, C, HW] then mean",
            lambda h: h.reshape(h.shape[0], 4, -1).mean(-1),
            4,
            ("conv1", "conv2", "fc"),
        ),
        ("mean over channels", lambda h: h.mean(1).flatten(1), 16, ("conv1", "conv2")),
        ("channel-last flatten", lambda h: h.permute(0, 2, 3, 1).reshape(h.shape[0], -1), 64, ("conv1", "conv2")),
        ("transpose", lambda h: h.transpose(2, 3).flatten(1), 64, ("conv1", "conv2")),
    ],
)
def test_conv_to_linear_transitions(label, reduce, n_in, chain):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    model = ConvHead(reduce, n_in).double()
    for method in ("auto", "record"):
        assert _chains(model, x, method=method) == [chain], (label, method)


def test_attention_embedding_groupnorm_convtranspose():
    torch.manual_seed(0)
    topo = detect_topology(Attention().double(), torch.randint(0, 10, (2, 5)))
    assert _chain_names(topo) == [("fc1", "fc2")]
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "Embedding 'emb'" in reasons["emb.weight"]
    assert "MultiheadAttention 'attn'" in reasons["attn.in_proj_weight"]
    topo = detect_topology(GroupNormNet().double(), torch.randn(2, 2, 8, 8, dtype=torch.float64), allow_empty=True)
    assert not topo.chains
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "GroupNorm 'gn'" in reasons["conv1.weight"]
    assert "ConvTranspose2d 'convt'" in reasons["conv2.weight"]
    assert "ConvTranspose2d 'convt'" in reasons["convt.weight"]
