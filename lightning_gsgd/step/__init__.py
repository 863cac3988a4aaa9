"""The G-SGD step as tensor code: per-chain index plans and scratch memory, the eager step, the compiled
step, the steps of tensors outside chains, and the diagnostics readings taken off a step.

Entry points: :func:`.eager.eager_step` and :class:`.compiled.CompiledStep`, called by the optimizers
with the same arguments. No optimizer class lives here and nothing reads Lightning.

May import: torch and :mod:`lightning_gsgd.topology`.
"""
