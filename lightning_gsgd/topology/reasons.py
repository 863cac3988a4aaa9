"""Why a chain ends at an op, in words that are true and name the cause.

:func:`lightning_gsgd.topology.rules.transition` gives the layout after the ops a chain passes
through; every other op ends the chain, and :func:`op_stops` says why, by what the op is: an
activation that is not positively homogeneous (GELU, SiLU, tanh, ...), a normalization that mixes
units (LayerNorm, GroupNorm) or normalizes each channel, attention, a linear op that G-SGD does not
follow yet (ConvTranspose, permute, upsampling, scaling by a constant), a functional ``F.linear`` /
``F.conv2d`` call, or an op it does not know. Each reason is a :class:`Why`: the full text (with the
module's name) and its *group*, the same cause without names, by which error messages count them.
"""

from __future__ import annotations

from typing import Any


class Why(str):
    """A reason: the text itself (naming the module), with ``group``, the same cause without names."""

    group: str

    def __new__(cls, text: str, group: str | None = None) -> Why:
        obj = super().__new__(cls, text)
        obj.group = text if group is None else group
        return obj


def group_of(reason: str) -> str:
    """The group of a reason (a plain string is its own group)."""
    return reason.group if isinstance(reason, Why) else str(reason)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Element-wise maps with f(c x) != c f(x) for some c > 0 (saturating, smooth or exponential).
NOT_HOMOGENEOUS = _names(
    "GELU gelu SiLU silu Mish mish Tanh tanh Sigmoid sigmoid Softplus softplus ELU elu SELU selu CELU celu "
    "Hardswish hardswish Hardsigmoid hardsigmoid Hardtanh hardtanh ReLU6 relu6 Softsign softsign LogSigmoid "
    "logsigmoid Tanhshrink tanhshrink Softshrink softshrink Hardshrink hardshrink GLU glu exp log log1p expm1 "
    "sqrt rsqrt pow square sin cos erf sign reciprocal"
)
SOFTMAX = _names("Softmax softmax LogSoftmax log_softmax Softmin softmin Softmax2d")
AFFINE_DROPOUT = _names("AlphaDropout FeatureAlphaDropout alpha_dropout feature_alpha_dropout")
# Normalizations across units (the output for one unit depends on the others).
MIXING_NORMS = _names(
    "LayerNorm layer_norm GroupNorm group_norm RMSNorm rms_norm LocalResponseNorm local_response_norm "
    "CrossMapLRN2d normalize"
)
CHANNEL_NORMS = _names("InstanceNorm1d InstanceNorm2d InstanceNorm3d instance_norm")
ATTENTION = _names("MultiheadAttention scaled_dot_product_attention")
TRANSPOSED_CONVS = _names(
    "ConvTranspose1d ConvTranspose2d ConvTranspose3d conv_transpose1d conv_transpose2d conv_transpose3d"
)
FUNCTIONAL_LAYERS = _names("linear conv1d conv2d conv3d")
REORDER = _names(
    "permute transpose t swapaxes swapdims movedim flip roll ChannelShuffle channel_shuffle PixelShuffle "
    "PixelUnshuffle pixel_shuffle pixel_unshuffle"
)
RESAMPLE = _names(
    "Upsample UpsamplingNearest2d UpsamplingBilinear2d interpolate upsample upsample_nearest upsample_bilinear "
    "pad Fold Unfold fold unfold"
)
SCALE = _names("mul div truediv multiply divide rmul rtruediv")
SHIFT = _names("add sub rsub radd subtract")
CONCAT = _names("cat concat concatenate stack hstack vstack dstack")
PRODUCTS = _names("matmul bmm mm einsum baddbmm addmm addbmm bilinear Bilinear")
_KEPT = "a chain passes only ReLU-family activations, dropout, pooling, reshapes and reductions"

# (names, text, group): {d} is the op with its module name, {n} the op's name alone.
_STOPS: tuple[tuple[frozenset[str], str, str], ...] = (
    (
        NOT_HOMOGENEOUS,
        "{d} is not positively homogeneous (f(c x) != c f(x) for c > 0)",
        "{n} is not positively homogeneous",
    ),
    (SOFTMAX, "{d} is not positively homogeneous and mixes units", "{n} is not positively homogeneous"),
    (AFFINE_DROPOUT, "{d} is affine in training, not positively homogeneous", "{n} is not positively homogeneous"),
    (
        MIXING_NORMS,
        "{d} mixes units (it normalizes across them; segments ending at it are not supported yet)",
        "{n} mixes units (not supported yet)",
    ),
    (
        CHANNEL_NORMS,
        "{d} normalizes each channel, so its output does not scale with the unit (segments ending at it are not "
        "supported yet)",
        "{n} normalizes each channel (not supported yet)",
    ),
    (
        ATTENTION,
        "{d} is attention (products of activations, softmax): not positively homogeneous",
        "{n} (attention) is not positively homogeneous",
    ),
    (
        TRANSPOSED_CONVS,
        "{d} is not supported yet (a transposed convolution is never a chain layer)",
        "{n} is not supported yet",
    ),
    (
        FUNCTIONAL_LAYERS,
        "a functional '{n}' call is not a chain layer (only nn.Linear/nn.ConvNd modules are)",
        "a functional '{n}' call is not a chain layer",
    ),
    (REORDER, "{d} reorders the entries (not supported yet)", "{n} is not supported yet"),
    (RESAMPLE, "{d} resamples or pads (not supported yet)", "{n} is not supported yet"),
    (SCALE, "{d} by a constant or a parameter is not supported yet", "{n} by a constant is not supported yet"),
    (
        SHIFT,
        "{d} shifts it by a constant or a parameter, which is not positively homogeneous",
        "{n} of a constant is not positively homogeneous",
    ),
)
_COMBINES: tuple[tuple[frozenset[str], str, str], ...] = (
    (
        SHIFT,
        "{d} sums it with another tensor (e.g. a residual connection); a chain ends at a sum",
        "{n} sums it with another tensor (e.g. a residual)",
    ),
    (CONCAT, "{d} concatenates it with other tensors (not supported yet)", "{n} concatenates it (not supported yet)"),
    (
        SCALE,
        "{d} multiplies it by another tensor (a gate or a scale, e.g. squeeze-excitation); not supported",
        "{n} multiplies it by another tensor (a gate)",
    ),
    (
        PRODUCTS | ATTENTION,
        "{d} multiplies it with another activation (matmul/attention); not supported",
        "{n} multiplies it with another activation (matmul/attention)",
    ),
)


def _pick(op: Any, table: tuple[tuple[frozenset[str], str, str], ...]) -> Why | None:
    for names, text, group in table:
        if op.name in names:
            return Why(text.format(d=op.describe(), n=op.name), group.format(n=op.name))
    return None


def known_stop(op: Any) -> Why | None:
    """Why ``op`` ends a chain, if it is of a kind listed here (an activation, a norm, attention, ...)."""
    return _pick(op, _STOPS)


def op_stops(op: Any) -> Why:
    """Why the single-input op ``op`` (one that :func:`~lightning_gsgd.topology.rules.transition` does
    not pass) ends a chain, by what the op is."""
    found = known_stop(op)
    if found is not None:
        return found
    name, d = op.name, op.describe()
    if name in ("clamp", "clamp_min"):
        lo = op.kwargs.get("min", op.args[1] if len(op.args) > 1 else None)
        hi = None if name == "clamp_min" else op.kwargs.get("max", op.args[2] if len(op.args) > 2 else None)
        if lo in (0, None) and hi in (0, None):
            return Why(f"{d}(min={lo}, max={hi}) is not supported here", f"{name} is not supported here")
        return Why(f"{d}(min={lo}, max={hi}) is not positively homogeneous", f"{name} is not positively homogeneous")
    return Why(
        f"{d} is not an op G-SGD knows to be positively homogeneous per unit ({_KEPT})",
        f"{name} is not a known positively homogeneous op",
    )


def combines(op: Any) -> Why:
    """Why an op that reads the chain's tensor together with another tensor ends the chain."""
    found = _pick(op, _COMBINES)
    if found is not None:
        return found
    return Why(
        f"{op.describe()} combines it with another tensor (not supported)", f"{op.name} combines it with another tensor"
    )
