"""Log entry 12: the pure reference step (functional.gsgd_chain_step, written back through torch.where)
under torch.compile vs torch SGD, one thread. Usage, from the repository root::

    PYTHONPATH=$PWD python benchmarks/attempts/reference_step.py "cnn 4x conv64 16x16"
"""

import copy
import statistics
import sys
import time

import torch
from lightning_gsgd.step.hyper import Hyper
from lightning_gsgd.topology.index import build_layer_index
from tests.reference_step import gsgd_chain_step

from benchmarks._common import build, fixed_grads

torch.set_num_threads(1)

name = sys.argv[1]
model, topo, x, y = build(name)
grads = fixed_grads(model, x, y)
for p, g in zip(model.parameters(), grads):
    p.grad = g.clone()
chain = topo.chains[0]
layers = chain.layers
L = len(layers)
index = [
    build_layer_index(l_.n_out, l_.n_in, l_.centre, hidden_out=l < L - 1, hidden_in=l > 0, device=torch.device("cpu"))
    for l, l_ in enumerate(layers)
]
ws = [l_.weight3d() for l_ in layers]
gs = [l_.weight3d(l_.weight.grad) for l_ in layers]
bs = [l_.bias for l_ in layers[:-1]] + [None]
gbs = [None if b is None else b.grad for b in bs]
bufw = [torch.zeros_like(w) for w in ws]
bufb = [None if b is None else torch.zeros_like(b) for b in bs]


def step(lr):
    hp = Hyper(lr=lr, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False)
    res = gsgd_chain_step(ws, gs, bs, gbs, bufw, bufb, index, [hp] * L, [None if b is None else hp for b in bs], 0.01)
    ok = torch.isfinite(torch.cat([g.flatten() for g in gs])).all()
    for l in range(L):
        ws[l].copy_(torch.where(ok, res.weights[l], ws[l]))
        bufw[l].copy_(torch.where(ok, res.weight_bufs[l], bufw[l]))
        if bs[l] is not None:
            bs[l].copy_(torch.where(ok, res.biases[l], bs[l]))
            bufb[l].copy_(torch.where(ok, res.bias_bufs[l], bufb[l]))
    return res.guard_hits


cstep = torch.compile(step)
t0 = time.perf_counter()
torch.no_grad()(cstep)(1e-6)
print("compile %.1f s" % (time.perf_counter() - t0))
with torch.no_grad():
    cstep(2e-6)
    sgd_m = copy.deepcopy(model)
    for p, g in zip(sgd_m.parameters(), grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(sgd_m.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
    T = {"comp": [], "sgd": []}
    for i in range(60):
        t0 = time.perf_counter()
        cstep(1e-6 * (1 + i % 3))
        T["comp"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        opt.step()
        T["sgd"].append(time.perf_counter() - t0)
print({k: "%.3f ms" % (1e3 * statistics.median(v[10:])) for k, v in T.items()})
print("graphs", torch._dynamo.utils.counters["stats"]["unique_graphs"])
