"""Log entry 12 (benchmarks/README.md): one compiled update kernel vs the five eager foreach passes vs torch SGD,
on three 1024x1024 layers, one thread. Usage: PYTHONPATH=$PWD python benchmarks/attempts/kernel_update.py"""

import statistics
import time

import torch

torch.set_num_threads(1)


def upd(ws, gs, bufs, rs, Fs, rhoinvs, hp):
    lr, mu, kd, wd = hp[0], hp[1], hp[2], hp[3]
    for w, g, buf, r, F, rhoinv in zip(ws, gs, bufs, rs, Fs, rhoinvs):
        d = r * g + wd * (F * w)
        nb = mu * buf + kd * d
        nw = (w - lr * r * nb) * rhoinv
        buf.copy_(nb)
        w.copy_(nw)


f = torch.compile(upd, fullgraph=True)
n = 1024
ws = [torch.randn(n, n, 1) for _ in range(3)]
gs = [torch.randn(n, n, 1) for _ in range(3)]
bufs = [torch.randn(n, n, 1) for _ in range(3)]
rs = [torch.rand(n, 1, 1) + 0.5 for _ in range(3)]
Fs = [1 / r for r in rs]
rh = [torch.ones(n, 1, 1) for _ in range(3)]
hp = torch.tensor([1e-6, 0.9, 1.0, 5e-4])
t0 = time.perf_counter()
f(ws, gs, bufs, rs, Fs, rh, hp)
print("compile %.1f s" % (time.perf_counter() - t0))
w2 = [w.clone() for w in ws]
b2 = [b.clone() for b in bufs]
f(ws, gs, bufs, rs, Fs, rh, hp)
upd(w2, gs, b2, rs, Fs, rh, hp)
print("diff", max((a - b).abs().max().item() for a, b in zip(ws, w2)))


def eager():
    torch._foreach_mul_(bufs, 0.9)
    torch._foreach_addcmul_(bufs, gs, rs, 1.0)
    torch._foreach_addcmul_(bufs, ws, Fs, 5e-4)
    torch._foreach_addcmul_(ws, bufs, rs, -1e-6)
    torch._foreach_mul_(ws, rh)


sgdp = [w.clone() for w in ws]
opt = torch.optim.SGD(sgdp, lr=1e-6, momentum=0.9, weight_decay=5e-4, foreach=False)
for p, g in zip(sgdp, gs):
    p.grad = g
opt.step()
T = {"comp": [], "eager": [], "sgd": []}
for _ in range(40):
    for k, fn in (("comp", lambda: f(ws, gs, bufs, rs, Fs, rh, hp)), ("eager", eager), ("sgd", opt.step)):
        t0 = time.perf_counter()
        fn()
        T[k].append(time.perf_counter() - t0)
for k in T:
    print(k, "%.3f ms per 3M" % (1e3 * statistics.median(T[k][5:])))
