"""What the model is: its op graph, its ReLU chains, and the checks and weight tools built on them.

Capturing the data flow (:mod:`.graph`, :mod:`.graph_fx`, :mod:`.graph_record`), the per-op rules
(:mod:`.rules`), detection (:mod:`.detect`), the data classes (:mod:`.types`), the sigma/tau index
(:mod:`.index`), the self-check (:mod:`.selfcheck`), what detection keeps when it fails
(:mod:`.prove`) and which layers it cannot test (:mod:`.untested`), and skeleton initialisation and
rescaling (:mod:`.skeleton`).

May import: torch only (no other subpackage of ``lightning_gsgd``, no Lightning).
"""
