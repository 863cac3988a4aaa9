"""The G-SGD step as tensor code: per-chain index plans and scratch memory, the eager step, the compiled
step and when the default uses it, the sharded (FSDP2) step, Adam in path space, the steps of tensors
outside chains, and the diagnostics readings taken off a step.

Entry points: :func:`.eager.eager_step` and :class:`.compiled.CompiledStep` (called by ``GSGD`` with the
same arguments), :class:`.sharded.ShardedStep` (row-sharded weights) and :func:`.adam.adam_step`
(``GAdam``). No optimizer class lives here and nothing reads Lightning.

May import: torch (``torch.distributed`` included) and :mod:`lightning_gsgd.topology`.
"""
