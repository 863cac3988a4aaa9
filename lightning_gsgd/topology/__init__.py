"""What the model is: its op graph, its ReLU chains, and the checks and weight tools built on them.

Capturing the data flow (:mod:`.graph`, :mod:`.graph_fx`, :mod:`.graph_record`), the per-op rules
(:mod:`.rules`, with the reason texts in :mod:`.reasons`; :mod:`.units` for concatenation, chunk and
shuffles), following every route of a layer's units (:mod:`.dag`) and grouping them into chains
(:mod:`.assemble`), detection (:mod:`.detect`, the per-parameter
reasons in :mod:`.exclusions`, the short refusals in :mod:`.report`), the data classes (:mod:`.types`),
the sigma/tau index (:mod:`.index`), the self-check (:mod:`.selfcheck`), what detection keeps when it
fails (:mod:`.prove`) and which layers it cannot test (:mod:`.untested`), skeleton initialisation and
rescaling (:mod:`.skeleton`), and re-pointing a topology at ``fully_shard``-ed parameters (:mod:`.shard`).

May import: torch only (no other subpackage of ``lightning_gsgd``, no Lightning).
"""
