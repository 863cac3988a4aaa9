"""What G-SGD knows about a model: its ReLU chains, their layers, and what was left out.

A *chain* is a sequence of weight layers joined by positively homogeneous maps (ReLU, pooling,
dropout, flatten). Each layer's weight is seen as a 3-D tensor ``[n_out, n_in, taps]``: ``n_out``
nodes of this layer, ``n_in`` nodes of the previous one, and ``taps`` weights per node pair (kernel
taps for a convolution, spatial positions for a Linear after Flatten, 1 for a plain Linear).
The output nodes of every layer but the last are the chain's *hidden nodes*.

This module holds plain data and the human-readable summary; it imports nothing from Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_gsgd.topology.report import summary_text


class TopologyError(ValueError):
    """A model, topology or optimizer does not fit together (names the layer at fault).

    Attributes:
        topology: For a refusal after detection (no chain, coverage too low), the detected
            :class:`Topology` with every excluded parameter and its reason (the message is short:
            grouped reasons and examples); ``None`` otherwise.
    """

    def __init__(self, *args: object, topology: Topology | None = None) -> None:
        super().__init__(*args)
        self.topology = topology

    @property
    def excluded(self) -> tuple[Excluded, ...]:
        """Every parameter left to plain SGD, with its reason (empty without a topology)."""
        return () if self.topology is None else self.topology.excluded


@dataclass(frozen=True, eq=False)
class ChainLayer:
    """One weight layer of a chain.

    Attributes:
        name: Qualified module name in the model (``"features.3"``), used in messages.
        weight: The layer's weight parameter (Linear ``[out, in]`` or ConvNd ``[out, in, *k]``).
        bias: The bias parameter, or ``None``.
        n_out: Number of output nodes (features or channels).
        n_in: Number of input nodes (features or channels of the previous layer or input).
        taps: Weights per (output node, input node) pair.
        centre: Index in ``[0, taps)`` of the tap that carries the sigma/tau edges.
        tied: ``[n_out]`` parameters of other modules that add into this layer's nodes from outside the
            chain: the ``gamma``/``beta`` of the other BatchNorms of a residual stream (docs/math.md,
            "Residual streams"); each is a hidden bias, ``v = x F(b)``. Hidden layers only.
        tied_names: Qualified names of the ``tied`` parameters (``"layer1.1.bn2.weight"``).
    """

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    n_out: int
    n_in: int
    taps: int
    centre: int
    tied: tuple[nn.Parameter, ...] = ()
    tied_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weight.numel() != self.n_out * self.n_in * self.taps:
            raise TopologyError(
                f"layer '{self.name}': weight of shape {tuple(self.weight.shape)} does not hold "
                f"{self.n_out} x {self.n_in} x {self.taps} entries"
            )
        if not 0 <= self.centre < self.taps:
            raise TopologyError(f"layer '{self.name}': centre tap {self.centre} outside [0, {self.taps})")
        if self.bias is not None and self.bias.numel() != self.n_out:
            raise TopologyError(f"layer '{self.name}': bias has {self.bias.numel()} entries, expected {self.n_out}")
        if len(self.tied_names) != len(self.tied) or any(t.numel() != self.n_out for t in self.tied):
            raise TopologyError(f"layer '{self.name}': tied {self.tied_names} do not fit its {self.n_out} nodes")

    def weight3d(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """A ``[n_out, n_in, taps]`` view of ``tensor`` (default: the weight); never a copy."""
        t = self.weight if tensor is None else tensor
        return t.view(self.n_out, self.n_in, self.taps)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters in the layer (weight, bias and tied parameters)."""
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel()) + self.n_out * len(self.tied)

    def params(self) -> list[nn.Parameter]:
        """The weight, the bias (if any), the tied parameters."""
        return [self.weight, *([] if self.bias is None else [self.bias]), *self.tied]


@dataclass(frozen=True)
class Source:
    """A run of a chain layer's input nodes, in the order the layer reads them.

    Attributes:
        layer: Index in ``Chain.layers`` of the layer whose output nodes these are (an earlier
            layer), or ``-1`` for nodes from outside the chain (the model input, or units that are
            not rescalable), whose ``B`` is 1.
        nodes: Which of that layer's output nodes, in order (a ``range``: a slice, or a strided
            run after a channel shuffle); for ``layer == -1`` only its length counts.
    """

    layer: int
    nodes: range


@dataclass(frozen=True, eq=False)
class Chain:
    """Weight layers joined by positively homogeneous maps: a sequence, or a DAG.

    Layer ``l`` reads the nodes listed by ``sources[l]`` (concatenated in order, ``n_in`` in all),
    each from an earlier layer or from outside the chain. A layer whose nodes some later layer
    reads is a *hidden* layer: its nodes are the chain's rescalable units, and every one of them
    must be read somewhere in the chain (fan-out to several layers is allowed). The other layers
    are *output* layers. Without ``sources`` the chain is a sequence: layer 0 reads the chain's
    input and layer ``l`` reads every node of layer ``l - 1`` (docs/math.md, "DAG chains").

    ``normalized`` lists the output layers whose every row goes only into a training-mode
    BatchNorm (*S2 rows*: their scale is free; docs/math.md, "BatchNorm segments: S1 and S2"). A
    BatchNorm affine is a chain layer of its own: ``ChainLayer(name, bn.weight, bn.bias, C, 1, 1,
    0)`` reading one node from outside the chain (``Source(-1, range(1))``).
    """

    layers: tuple[ChainLayer, ...]
    sources: tuple[tuple[Source, ...], ...] = ()
    normalized: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.layers) < 2:
            raise TopologyError("a chain needs at least two weight layers (one hidden layer)")
        if not self.sources:
            for prev, nxt in zip(self.layers[:-1], self.layers[1:]):
                if prev.n_out != nxt.n_in:
                    raise TopologyError(f"layer '{nxt.name}' reads {nxt.n_in} nodes but '{prev.name}' has {prev.n_out}")
            seq = ((Source(-1, range(self.layers[0].n_in)),),)
            seq += tuple((Source(l, range(self.layers[l].n_out)),) for l in range(len(self.layers) - 1))
            object.__setattr__(self, "sources", seq)
        hidden = self._check_sources()
        object.__setattr__(self, "hidden", hidden)
        for layer, h in zip(self.layers, hidden):
            if layer.tied and not h:
                raise TopologyError(f"layer '{layer.name}' has tied parameters but is an output layer of its chain")
        for l in self.normalized:
            if not 0 <= l < len(self.layers) or hidden[l]:
                raise TopologyError(
                    f"chain: normalized layer {l} is not an output layer (S2 rows are rows no chain layer reads)"
                )
        object.__setattr__(
            self,
            "is_sequence",
            all(h == (l < len(self.layers) - 1) for l, h in enumerate(hidden))
            and all(
                len(srcs) == 1
                and srcs[0].layer == l - 1
                and (l == 0 or srcs[0].nodes == range(self.layers[l - 1].n_out))
                for l, srcs in enumerate(self.sources)
            ),
        )

    def _check_sources(self) -> tuple[bool, ...]:
        if len(self.sources) != len(self.layers):
            raise TopologyError(f"chain: {len(self.sources)} source lists for {len(self.layers)} layers")
        read: list[set[int]] = [set() for _ in self.layers]
        for l, (layer, srcs) in enumerate(zip(self.layers, self.sources)):
            n = 0
            for src in srcs:
                if src.layer >= l or src.layer < -1:
                    raise TopologyError(f"layer '{layer.name}' reads layer {src.layer}, which does not come before it")
                if src.layer >= 0:
                    prod = self.layers[src.layer]
                    if len(src.nodes) and (min(src.nodes) < 0 or max(src.nodes) >= prod.n_out):
                        raise TopologyError(
                            f"layer '{layer.name}' reads nodes {src.nodes} of '{prod.name}', which has {prod.n_out}"
                        )
                    read[src.layer].update(src.nodes)
                n += len(src.nodes)
            if n != layer.n_in:
                raise TopologyError(f"layer '{layer.name}' has {layer.n_in} input nodes but its sources list {n}")
        if not any(read):
            raise TopologyError("a chain needs at least one hidden layer (a layer that another chain layer reads)")
        for layer, nodes in zip(self.layers, read):
            if nodes and len(nodes) != layer.n_out:
                raise TopologyError(
                    f"layer '{layer.name}': {layer.n_out - len(nodes)} of its {layer.n_out} nodes are read by no "
                    "chain layer (a hidden layer's nodes must all be read)"
                )
        return tuple(bool(nodes) for nodes in read)

    # Set in __post_init__ (derived from ``sources``):
    #   hidden: per layer, whether its nodes are hidden units (some later chain layer reads them);
    #   is_sequence: whether layer l reads exactly all of layer l - 1 and only the last is an output.
    hidden: tuple[bool, ...] = field(init=False, default=())
    is_sequence: bool = field(init=False, default=True)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """Indices of the hidden layers, in layer order (every layer but the last, for a sequence)."""
        return tuple(l for l, h in enumerate(self.hidden) if h)

    def readers(self, layer: int) -> list[tuple[int, int, range]]:
        """Where layer ``layer``'s nodes are read: ``(reading layer, its first input column, nodes)``
        per source run, in layer order (a sequence: ``[(layer + 1, 0, range(n_out))]``)."""
        out = []
        for m in range(layer + 1, len(self.layers)):
            col = 0
            for src in self.sources[m]:
                if src.layer == layer:
                    out.append((m, col, src.nodes))
                col += len(src.nodes)
        return out

    @property
    def affine_units(self) -> int:
        """Hidden nodes that are BatchNorm channels (S1 units: 1-D ``gamma`` weights)."""
        return sum(layer.n_out for layer, h in zip(self.layers, self.hidden) if h and layer.weight.dim() == 1)

    @property
    def normalized_rows(self) -> int:
        """Rows of the ``normalized`` output layers (S2 rows)."""
        return sum(self.layers[l].n_out for l in self.normalized)

    @property
    def widths(self) -> tuple[int, ...]:
        """Node counts: the first layer's inputs, then every layer's outputs in layer order."""
        return (self.layers[0].n_in,) + tuple(layer.n_out for layer in self.layers)

    @property
    def hidden_units(self) -> int:
        """Number of hidden nodes H (the rescalable units)."""
        return sum(layer.n_out for layer, h in zip(self.layers, self.hidden) if h)

    @property
    def num_params(self) -> int:
        """Parameters of the chain (weights and biases, output biases included)."""
        return sum(layer.num_params for layer in self.layers)

    @property
    def basis_paths(self) -> int:
        """Independent path values: weights plus hidden biases, minus hidden units.

        An output layer's bias is not a path value (it is already invariant) and is not counted.
        """
        hidden = [layer for layer, h in zip(self.layers, self.hidden) if h]
        hidden_bias = sum((len(layer.tied) + (layer.bias is not None)) * layer.n_out for layer in hidden)
        weights = sum(layer.weight.numel() for layer in self.layers)
        return weights + hidden_bias - self.hidden_units

    @property
    def name(self) -> str:
        """``first..last`` layer names."""
        return f"{self.layers[0].name}..{self.layers[-1].name}"


@dataclass(frozen=True)
class Excluded:
    """A parameter left to plain SGD, with the reason.

    Attributes:
        name: The parameter's name in the model.
        numel: Its number of values.
        reason: Why, naming the modules involved.
        group: The same cause without names, by which short messages count the exclusions
            (empty: the reason is its own group).
    """

    name: str
    numel: int
    reason: str
    group: str = ""


@dataclass(eq=False)
class Topology:
    """The ReLU chains of a model that G-SGD treats exactly, and everything it leaves to plain SGD.

    Build it with :func:`lightning_gsgd.detect_topology`. ``chains`` hold references to the
    model's own parameters, so the topology stays valid when the model moves between devices.

    Attributes:
        chains: The detected chains, in forward order.
        excluded: Parameters outside every chain, each with the reason (they get plain SGD).
        bn_layers: Layers whose outputs are normalized by BatchNorm and that the optimizer updates
            with the G-SGD authors' heuristic (:mod:`lightning_gsgd.step.bn_heuristic`); only filled by
            ``detect_topology(..., bn_mode="authors_heuristic")``. Their biases get plain SGD and are
            listed in ``excluded``.
        normalized: Layers in no chain whose every row goes only into a training-mode BatchNorm
            (*S2 rows* alone: ``B = F = 1``, any ``groups``); their weights take the S2 step of
            docs/math.md, "BatchNorm segments: S1 and S2", their biases torch's SGD rule.
        method: How the data flow was read (``"fx"``, ``"record"``, or ``""`` if built by hand).
        untested: Names of the chain layers whose hidden units the self-check could not test on
            ``example_input``: scaling them, even without compensation, did not change the output
            (their contribution was zero there, e.g. behind a zero gain or dead after ReLU). They are
            claimed on the structural rule alone (plain ``nn.Linear``/``nn.ConvNd`` joined by
            homogeneous ops). Empty when the self-check did not run.
    """

    chains: tuple[Chain, ...]
    excluded: tuple[Excluded, ...] = ()
    bn_layers: tuple[ChainLayer, ...] = ()
    method: str = ""
    untested: tuple[str, ...] = ()
    normalized: tuple[ChainLayer, ...] = ()

    @property
    def hidden_units(self) -> int:
        """Hidden nodes H over all chains."""
        return sum(c.hidden_units for c in self.chains)

    @property
    def basis_paths(self) -> int:
        """Basis paths m - H over all chains."""
        return sum(c.basis_paths for c in self.chains)

    @property
    def covered_params(self) -> int:
        """Scalar parameters whose update commutes with every symmetry detected on them: chain
        weights and biases, and the :attr:`normalized` layers' weights and biases."""
        return sum(c.num_params for c in self.chains) + sum(layer.num_params for layer in self.normalized)

    @property
    def s1_units(self) -> int:
        """BatchNorm channels that are hidden units of a chain (S1)."""
        return sum(c.affine_units for c in self.chains)

    @property
    def s2_rows(self) -> int:
        """Rows whose scale BatchNorm frees (S2): chain output layers and layers alone."""
        return sum(layer.n_out for layer in self.s2_layers())

    def s2_layers(self) -> list[ChainLayer]:
        """Every layer with S2 rows: the chains' normalized output layers, then the layers alone."""
        return [c.layers[l] for c in self.chains for l in c.normalized] + list(self.normalized)

    def bn_segment_names(self) -> list[str]:
        """Names of the chains with BatchNorm units (S1) or S2 layers, then of the S2 layers alone: what a
        step without the exact BatchNorm rule must refuse."""
        return [c.name for c in self.chains if c.normalized or c.affine_units] + [x.name for x in self.normalized]

    @property
    def bn_heuristic_params(self) -> int:
        """Scalar weights of :attr:`bn_layers` (their biases are in ``excluded``)."""
        return sum(layer.weight.numel() for layer in self.bn_layers)

    @property
    def total_params(self) -> int:
        """Scalar parameters of the model (in chains, in BN-heuristic layers, and excluded)."""
        return self.covered_params + self.bn_heuristic_params + sum(e.numel for e in self.excluded)

    @property
    def coverage(self) -> float:
        """Share of the model's parameters updated by exact G-SGD (chains only), in [0, 1]."""
        total = self.total_params
        return self.covered_params / total if total else 0.0

    def chain_params(self) -> list[nn.Parameter]:
        """Every parameter that belongs to a chain."""
        return [p for chain in self.chains for layer in chain.layers for p in layer.params()]

    def normalized_params(self) -> list[nn.Parameter]:
        """Weights and biases of the :attr:`normalized` layers (S2 rows in no chain)."""
        return [p for layer in self.normalized for p in (layer.weight, layer.bias) if p is not None]

    def fingerprint(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every chain parameter, to check that saved state fits this model."""
        fp: list[tuple[str, tuple[int, ...]]] = []
        for chain in self.chains:
            for layer in chain.layers:
                fp.append((layer.name + ".weight", tuple(layer.weight.shape)))
                if layer.bias is not None:
                    fp.append((layer.name + ".bias", tuple(layer.bias.shape)))
                fp += [(n + " (tied)", tuple(t.shape)) for n, t in zip(layer.tied_names, layer.tied)]
        for chain in self.chains:
            if chain.normalized:
                fp.append((chain.name + " (S2 layers)", tuple(chain.normalized)))
        for layer in self.normalized:
            fp.append((layer.name + ".weight (S2)", tuple(layer.weight.shape)))
        for layer in self.bn_layers:
            fp.append((layer.name + ".weight (bn heuristic)", tuple(layer.weight.shape)))
        return fp

    def summary(self, verbose: bool = False) -> str:
        """A readable report: chains, layers, widths, units, basis paths, coverage, exclusions.

        Args:
            verbose: List every chain, layer and excluded parameter. By default the report stays
                short on a large model: at most 8 chains with their layers, and the excluded
                parameters one per line only up to 12 of them, else grouped by reason with a count
                and examples each.
        """
        return summary_text(self, verbose)

    def __repr__(self) -> str:
        return self.summary()
