"""Log entry 12: per-row sums of w * g, compiled (dynamic / static shapes) vs eager, linalg.vecdot and bmm,
on 1024x784 and 1024x1024 layers, one thread. Usage: PYTHONPATH=$PWD python benchmarks/attempts/row_sums.py"""

import statistics
import time

import torch

torch.set_num_threads(1)


def rs(ws, gs, outs):
    for w, g, o in zip(ws, gs, outs):
        o.copy_((w * g).sum((1, 2)))


n = 1024
ws = [torch.randn(n, 784, 1), torch.randn(n, n, 1)]
gs = [torch.randn_like(w) for w in ws]
outs = [torch.empty(n) for _ in ws]
fd = torch.compile(rs, fullgraph=True, dynamic=True)
fs = torch.compile(rs, fullgraph=True, dynamic=False)


def eager():
    for w, g, o in zip(ws, gs, outs):
        torch.sum(w * g, (1, 2), out=o)


def vd():
    for w, g, o in zip(ws, gs, outs):
        torch.linalg.vecdot(w.view(n, -1), g.view(n, -1), out=o)


def bmm():
    for w, g, o in zip(ws, gs, outs):
        torch.bmm(w.view(n, 1, -1), g.view(n, -1, 1), out=o.view(n, 1, 1))


for f in (fd, fs):
    f(ws, gs, outs)
T = {k: [] for k in ("dyn", "static", "eager", "vecdot", "bmm")}
F = {"dyn": lambda: fd(ws, gs, outs), "static": lambda: fs(ws, gs, outs), "eager": eager, "vecdot": vd, "bmm": bmm}
for _ in range(40):
    for k, f in F.items():
        t0 = time.perf_counter()
        f()
        T[k].append(time.perf_counter() - t0)
M = sum(w.numel() for w in ws) / 1e6
for k in T:
    print(k, "%.3f ms/M" % (1e3 * statistics.median(T[k][5:]) / M))
