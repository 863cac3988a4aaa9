"""Detection of BatchNorm segments (``bn_mode="exact"``, the default): S1 units, S2 rows, what stays out.

The expected segments are written by hand: ``spec()`` of tests/bn_models.py (the models the math is
tested on) and ``CHAINS``/``ALONE`` of tests/bn_detect_models.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gsgd import detect_topology
from lightning_gsgd.topology.types import Chain, ChainLayer, Topology
from tests import bn_detect_models as bm
from tests.bn_models import BN_MODELS, make_bn


def _layer(layer: ChainLayer) -> tuple:
    bias = None if layer.bias is None else id(layer.bias)
    return (layer.name, id(layer.weight), bias, layer.n_out, layer.n_in, layer.taps, layer.centre)


def _chain(chain: Chain) -> tuple:
    sources = tuple(tuple((s.layer, s.nodes) for s in srcs) for srcs in chain.sources)
    return tuple(_layer(layer) for layer in chain.layers), sources


def _names(topo: Topology) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    return [
        (tuple(layer.name for layer in c.layers), tuple(c.layers[l].name for l in c.normalized)) for c in topo.chains
    ]


@pytest.mark.parametrize("name", [n for n in BN_MODELS if n != "basic_skip"])  # basic_skip: a coarser spec
def test_detection_reproduces_the_hand_written_segments(name):
    model, x = make_bn(name)
    spec = model.spec()
    topo = detect_topology(model, x)
    assert [_chain(c) for c in topo.chains] == [_chain(c) for c in spec.topology.chains]
    s2 = {layer.name for layer in spec.s2}
    for c in topo.chains:
        assert {c.layers[l].name for l in c.normalized} == {layer.name for layer in c.layers} & s2, c.name
    in_chain = {layer.name for c in spec.topology.chains for layer in c.layers}
    alone = [layer for layer in spec.s2 if layer.name not in in_chain]
    assert sorted(map(_layer, topo.normalized)) == sorted(map(_layer, alone))
    # the spec leaves the layers alone out of its topology; detection covers them
    alone_ids = {id(p) for layer in alone for p in (layer.weight, layer.bias) if p is not None}
    names = {n for n, p in model.named_parameters() if id(p) not in alone_ids}
    assert {e.name for e in topo.excluded} == {e.name for e in spec.topology.excluded} & names
    assert topo.s2_rows == sum(layer.n_out for layer in spec.s2)
    assert topo.s1_units == sum(
        layer.n_out for c in spec.topology.chains for layer in c.layers if layer.weight.dim() == 1
    )


MODELS = {
    "resnet_basic": (bm.ResNetBasic, (2, 3, 8, 8)),
    "resnet_bottleneck": (bm.ResNetBottleneck, (2, 3, 8, 8)),
    "vgg_mlp": (bm.VggMlp, (4, 3, 6, 6)),
    "dense_bn": (bm.DenseBn, (2, 3, 6, 6)),
    "shuffle_bn": (bm.ShuffleBn, (2, 3, 6, 6)),
}


def _build(cls, shape, seed=0):
    torch.manual_seed(seed)
    model = bm.randomize_bn(cls().double())
    return model, torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", list(MODELS))
def test_segments_of_torchvision_style_models(name):
    cls, shape = MODELS[name]
    model, x = _build(cls, shape)
    topo = detect_topology(model, x)
    assert _names(topo) == cls.CHAINS
    assert sorted(layer.name for layer in topo.normalized) == sorted(cls.ALONE)
    # every layer alone is read as [n_out, in / groups, taps]
    for layer in topo.normalized:
        mod = model.get_submodule(layer.name)
        assert layer.weight is mod.weight and (layer.n_out, layer.n_in) == tuple(mod.weight.shape[:2])
    # what is in no segment is named, with a reason
    covered = {id(p) for p in topo.chain_params() + topo.normalized_params()}
    assert {e.name for e in topo.excluded} == {n for n, p in model.named_parameters() if id(p) not in covered}
    assert all(e.reason for e in topo.excluded)
    # residual streams: the BatchNorms that add into one stream, tied to the first
    tied = {layer.name: layer.tied_names for c in topo.chains for layer in c.layers if layer.tied}
    want = getattr(cls, "TIED", {})
    assert tied == {k: tuple(f"{m}.{w}" for m in v for w in ("weight", "bias")) for k, v in want.items()}


def test_resnet_residual_streams_are_units():
    """The BatchNorms that add into a stream scale together (one unit per channel): the stem's with the
    first block's bn2 and the projection's with the second block's, so the classifier is covered."""
    model, x = _build(bm.ResNetBasic, (2, 3, 8, 8))
    topo = detect_topology(model, x)
    assert topo.coverage == 1.0 and not topo.excluded
    text = topo.summary()
    assert "BatchNorm segments: 20 BatchNorm channels as units (S1)" in text
    assert "residual streams: 10 of those channels are written by 4 BatchNorms together (2 stream(s)" in text
    assert "bn1: 4+bias (4 <- 1 nodes x 1 taps) hidden, residual stream with layer.0.bn2" in text


def test_a_stream_that_reaches_a_nonhomogeneous_op_is_no_unit():
    """When one route of a stream fails (here the stream feeds a sigmoid gate as well), none of its
    BatchNorms is a unit: every one of them gets that route's reason."""
    model, x = _build(bm.ResNetBasic, (2, 3, 8, 8))

    class Gated(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner.layer[0](F.relu(self.inner.bn1(self.inner.conv1(x))))
            gate = torch.sigmoid(h).mean((1, 2, 3)).unsqueeze(1)  # the first stream also meets a sigmoid
            return self.inner.fc(self.inner.layer[1](h).mean((2, 3))) * gate

    topo = detect_topology(Gated(model), x)
    reasons = {e.name: e.reason for e in topo.excluded}
    for name in ("inner.bn1.weight", "inner.layer.0.bn2.weight", "inner.layer.0.bn2.bias"):
        assert "sigmoid" in reasons[name], name
    # the second stream is not affected
    assert "inner.layer.1.bn2.weight" not in reasons


def test_densenet_stem_feeds_several_batchnorms():
    model, x = _build(bm.DenseBn, (2, 3, 6, 6))
    topo = detect_topology(model, x, self_check=False)
    assert [layer.name for layer in topo.normalized] == ["stem"]
    # the stem's rows reach block.0.norm1, block.1.norm1, block.2.norm1 and trans_norm: with one of
    # them replaced by a non-BatchNorm op, the stem has no S2 rows
    model.block[1].norm1 = nn.Identity()
    topo = detect_topology(model, x, self_check=False, allow_empty=True)
    assert "stem" not in [layer.name for layer in topo.normalized]
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "'stem' is in no ReLU chain" in reasons["stem.weight"]


@pytest.mark.parametrize(
    "norm,words",
    [
        ("group", "GroupNorm 'norm' mixes units (it normalizes across them; segments ending at it are not supported"),
        ("layer", "LayerNorm 'norm' mixes units"),
        ("instance", "InstanceNorm2d 'norm' normalizes each channel"),
    ],
)
def test_other_norms_are_refused_by_name(norm, words):
    torch.manual_seed(0)
    model = bm.randomize_bn(bm.NormAfter(norm).double())
    topo = detect_topology(model, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    reasons = {e.name: (e.reason, e.group) for e in topo.excluded}
    assert words in reasons["conv1.weight"][0]
    assert "not supported yet" in reasons["conv1.weight"][0] + reasons["conv1.weight"][1]
    assert f"parameter of {type(model.norm).__name__}" in reasons["norm.weight"][0]
    # the segments after it are found
    assert _names(topo) == [(("bn2", "fc"), ())]
    assert [layer.name for layer in topo.normalized] == ["conv2"]


def test_batchnorm_without_affine_normalizes_but_has_no_units():
    torch.manual_seed(0)
    model = bm.randomize_bn(bm.NormAfter("bn_no_affine").double())
    topo = detect_topology(model, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    assert _names(topo) == [(("bn2", "fc"), ())]
    assert [layer.name for layer in topo.normalized] == ["conv1", "conv2"]
    assert topo.coverage == 1.0


def test_relu6_and_silu_after_batchnorm_leave_s2_rows():
    torch.manual_seed(0)
    model = bm.randomize_bn(bm.SmoothAfterBn().double())
    topo = detect_topology(model, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    assert not topo.chains and topo.s1_units == 0
    assert [layer.name for layer in topo.normalized] == ["conv1", "dw", "conv2"]
    assert topo.normalized[1].n_in == 1 and topo.normalized[1].taps == 9  # depthwise: [4, 1, 9]
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "relu6 is not positively homogeneous" in reasons["bn1.weight"]
    assert "relu6 is not positively homogeneous" in reasons["bn_dw.bias"]
    assert "silu is not positively homogeneous" in reasons["bn2.weight"]
    assert "model output" in reasons["fc.weight"]


def test_batchnorm_feeding_the_model_output():
    torch.manual_seed(0)
    model = bm.randomize_bn(bm.BnOutput().double())
    topo = detect_topology(model, torch.randn(3, 3, 6, 6, dtype=torch.float64))
    assert _names(topo) == [(("bn1", "conv2"), ("conv2",))]
    assert [layer.name for layer in topo.normalized] == ["conv1"]
    reasons = {e.name: e.reason for e in topo.excluded}
    assert set(reasons) == {"bn2.weight", "bn2.bias"}
    assert "model output" in reasons["bn2.weight"]


def test_a_frozen_batchnorm_makes_no_s2_rows():
    model, x = make_bn("stack")
    model.train()
    model.bn1.eval()  # frozen statistics while the model trains: an affine map
    topo = detect_topology(model, x)
    assert _names(topo) == [(("bn0", "c1"), ()), (("bn1", "c2"), ("c2",)), (("bn2", "fc"), ())]
    # its affine still makes units (S1 holds in both modes); the rows before it are no S2 rows
    assert "c1.weight" not in {e.name for e in topo.excluded}
    model.eval()  # a model detected in eval mode is taken to train its BatchNorms
    assert _names(detect_topology(model, x))[0] == (("bn0", "c1"), ("c1",))


def test_patterns_name_batchnorms_too():
    model, x = make_bn("stack")
    topo = detect_topology(model, x, exclude=["bn0"])
    reasons = {e.name: e.reason for e in topo.excluded}
    assert set(reasons) == {"bn0.weight", "bn0.bias"} and "excluded by exclude=" in reasons["bn0.weight"]
    # bn0 still normalizes c0's rows; c1 now reads bn0's channels from outside: both are S2 layers alone
    assert [layer.name for layer in topo.normalized] == ["c0", "c1"]
    topo = detect_topology(model, x, include=["c*", "fc"])
    assert not topo.chains
    assert [layer.name for layer in topo.normalized] == ["c0", "c1", "c2"]
    assert "not named in include=" in {e.name: e.reason for e in topo.excluded}["bn2.weight"]


@pytest.fixture
def tanh_is_homogeneous(monkeypatch):
    """Simulate a detector bug: tanh passes as positively homogeneous, so only the S2 self-check can
    catch the rows before it that reach a BatchNorm through it."""
    import lightning_gsgd.topology.detect as det

    real = det.transition
    monkeypatch.setattr(
        det, "transition", lambda op, layout, shape: layout if op.name == "tanh" else real(op, layout, shape)
    )


def _twin_state(model: nn.Module) -> tuple:
    return (
        [(n, b.clone()) for n, b in model.named_buffers()],
        [(n, p.clone()) for n, p in model.named_parameters()],
        [m.training for m in model.modules()],
    )


def test_the_s2_self_check_drops_a_wrong_claim(tanh_is_homogeneous, caplog):
    torch.manual_seed(0)
    model = bm.randomize_bn(bm.TanhBeforeBn().double()).train()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    unchecked = detect_topology(model, x, self_check=False)
    assert _names(unchecked)[0] == (("bn0", "conv1"), ("conv1",))
    assert [layer.name for layer in unchecked.normalized] == ["conv0", "conv2"]
    before = _twin_state(model)
    with caplog.at_level(logging.WARNING, logger="lightning_gsgd"):
        topo = detect_topology(model, x)
    after = _twin_state(model)
    # the user's parameters, running statistics and modes are untouched
    assert [n for n, _ in before[0]] == [n for n, _ in after[0]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before[0] + before[1], after[0] + after[1]))
    assert before[2] == after[2]
    # conv1 stays its chain's output layer, without the S2 mark; conv2 leaves with the measured change
    assert _names(topo)[0] == (("bn0", "conv1"), ())
    assert [layer.name for layer in topo.normalized] == ["conv0"]
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "the S2 self-check found that rescaling the rows of 'conv2'" in reasons["conv2.weight"]
    assert "conv2.bias" in reasons
    assert any("rows of 'conv1'" in r.getMessage() for r in caplog.records)


def test_the_s2_self_check_passes_on_true_claims(caplog):
    for cls, shape in MODELS.values():
        model, x = _build(cls, shape)
        with caplog.at_level(logging.WARNING, logger="lightning_gsgd"):
            checked = detect_topology(model, x)
            unchecked = detect_topology(model, x, self_check=False)
        assert _names(checked) == _names(unchecked)
        assert [layer.name for layer in checked.normalized] == [layer.name for layer in unchecked.normalized]
    assert not [r for r in caplog.records if "S2" in r.getMessage()]


def test_the_s2_self_check_that_cannot_run_keeps_the_claims(caplog):
    """A BatchNorm1d over one sample cannot run in training mode: the claims rest on the rule, with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)).double()
    with caplog.at_level(logging.WARNING, logger="lightning_gsgd"):
        topo = detect_topology(model, torch.randn(1, 4, dtype=torch.float64))
    assert _names(topo) == [(("1", "3"), ())]
    assert [layer.name for layer in topo.normalized] == ["0"]
    assert any("S2 self-check could not run" in r.getMessage() for r in caplog.records)


def _bn_free_models():
    from tests.dag_detect_models import DAG_MODELS, image
    from tests.models import MODELS as SEQ
    from tests.zoo import ZOO
    from tests.zoo import make as make_zoo

    for name, (build, shape) in SEQ.items():
        torch.manual_seed(0)
        yield f"models.{name}", build().double(), torch.randn(*shape, dtype=torch.float64)
    for name, build in DAG_MODELS.items():
        torch.manual_seed(0)
        yield f"dag.{name}", build().double(), image()
    for name in ZOO:
        if not name.endswith("_bn"):
            yield (f"zoo.{name}", *make_zoo(name))


def test_bn_free_models_are_detected_as_before():
    seen = 0
    for label, model, x in _bn_free_models():
        old = detect_topology(model, x, bn_mode="sgd", allow_empty=True)
        new = detect_topology(model, x, allow_empty=True)
        assert [_chain(c) for c in new.chains] == [_chain(c) for c in old.chains], label
        assert [c.normalized for c in new.chains] == [()] * len(new.chains), label
        assert not new.normalized, label
        assert [(e.name, e.reason, e.group) for e in new.excluded] == [
            (e.name, e.reason, e.group) for e in old.excluded
        ], label
        assert new.untested == old.untested, label
        seen += 1
    assert seen > 20


def test_sgd_mode_still_leaves_batchnorm_to_sgd():
    model, x = make_bn("basic")
    topo = detect_topology(model, x, bn_mode="sgd", allow_empty=True)
    assert not topo.chains[:-1] and not topo.normalized
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "BatchNorm2d 'bn_s' normalizes its outputs (see bn_mode)" in reasons["stem.weight"]


def test_bn_mode_is_validated():
    model, x = make_bn("stack")
    with pytest.raises(ValueError, match="'exact', 'sgd', 'authors_heuristic'"):
        detect_topology(model, x, bn_mode="heuristic")


def test_functional_batch_norm_is_not_an_s2_normalizer():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
            self.register_buffer("mean", torch.zeros(4))
            self.register_buffer("var", torch.ones(4))

        def forward(self, x):
            h = F.batch_norm(self.conv(x), self.mean, self.var, training=True)
            return self.fc(F.relu(h).mean((2, 3)))

    torch.manual_seed(0)
    topo = detect_topology(Functional().double(), torch.randn(3, 3, 6, 6, dtype=torch.float64), allow_empty=True)
    assert not topo.normalized
    assert "batch_norm" in {e.name: e.reason for e in topo.excluded}["conv.weight"]


def test_a_batchnorm_that_feeds_only_batchnorms_says_so():
    """DenseNet's first BatchNorm: its channels reach only the dense layers' BatchNorms (through the cats)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn0, self.bn1, self.fc = (
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.BatchNorm2d(4),
                nn.Linear(4, 2),
            )

        def forward(self, x):
            return self.fc(F.relu(self.bn1(F.relu(self.bn0(self.conv(x))))).mean((2, 3)))

    torch.manual_seed(0)
    topo = detect_topology(Twice().double(), torch.randn(3, 3, 6, 6, dtype=torch.float64))
    reasons = {e.name: e.reason for e in topo.excluded}
    assert "its units go only into BatchNorms" in reasons["bn0.weight"]
    assert _names(topo) == [(("bn1", "fc"), ())] and [layer.name for layer in topo.normalized] == ["conv"]


def test_s2_check_with_a_constant_example_input_keeps_the_claims(caplog):
    """A constant example input (Lightning users often pass zeros) gives BatchNorm channels without
    variance, where BatchNorm divides rounding noise by sqrt(eps): the S2 check says it cannot test
    the claims (a warning naming the BatchNorm) instead of dropping true ones."""
    from tests.lightning_models import BNModule

    torch.manual_seed(0)
    model = BNModule()
    with caplog.at_level(logging.WARNING):
        topo = detect_topology(model, torch.zeros(2, 4))
    assert topo.s2_rows == 16 and topo.coverage == 1.0
    assert "without variance" in caplog.text and "net.1" in caplog.text
    assert detect_topology(model, torch.randn(4, 4)).s2_rows == 16
