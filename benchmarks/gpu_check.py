"""GPU check: the step-ratio table on CUDA (fp32 and bf16 parameters) and the no-synchronization check.

Usage (from the repository root, on a machine with a CUDA GPU)::

    PYTHONPATH=$PWD python benchmarks/gpu_check.py [--reps 50] [--warmup 10]

Part 1 prints the table of ``benchmarks/step_bench.py`` on ``cuda`` for float32 and bfloat16
parameters (CUDA-synchronized timing, interleaved rounds). Part 2 runs GSGD steps under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any call that makes the host wait for
the device (``.item()``, ``bool(tensor)``, blocking copies, ``nonzero``...): plain, momentum (first
step and later ones), Nesterov with weight decay, a tensor learning rate on the device, a gradient
with a NaN (the step must be skipped on the device, without reading the flag), the guard acting,
the compiled step, the default form (``compiled=None``) and GAdam / GAdamW.
It prints one line per case and exits non-zero if any case synchronized or misbehaved. Sized to
finish in well under five minutes on one GPU (a few seconds of GPU work; most of the time is
imports and CUDA start-up).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

from benchmarks._common import MODELS, build, fixed_grads, header, interleaved, median, paired_ratio
from benchmarks.step_bench import CONFIGS, LR, make_optimizers, validity
from lightning_gsgd import GSGD, GAdam, GAdamW, detect_topology


def ratio_table(reps: int, warmup: int) -> None:
    sync = torch.cuda.synchronize
    for dtype in (torch.float32, torch.bfloat16):
        print(header(f"optimizer step, cuda {dtype}, {torch.cuda.get_device_name()}, median of {reps}"))
        print(
            "| model | config | GSGD ms | GSGD compiled ms | SGD ms | SGD foreach ms | GSGD / best of SGD, SGD foreach "
            "| compiled / best | SGD fused ms | GSGD / SGD fused | valid |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        )
        for mname in MODELS:
            model, _, x, y = build(mname, device="cuda", dtype=dtype)
            grads = fixed_grads(model, x, y)
            for cname, hyper in CONFIGS.items():
                fns, opts = make_optimizers(model, x, grads, hyper, lr=LR)
                t = interleaved(fns, reps, warmup, sync)
                best = "sgd" if median(t["sgd"]) <= median(t["sgd_foreach"]) else "sgd_foreach"
                print(
                    f"| {mname} | {cname} | {1e3 * median(t['gsgd']):.3f} | {1e3 * median(t['gsgd_compiled']):.3f} | "
                    f"{1e3 * median(t['sgd']):.3f} | {1e3 * median(t['sgd_foreach']):.3f} | "
                    f"**{paired_ratio(t['gsgd'], t[best]):.2f}** | {paired_ratio(t['gsgd_compiled'], t[best]):.2f} | "
                    f"{1e3 * median(t['sgd_fused']):.3f} | {paired_ratio(t['gsgd'], t['sgd_fused']):.2f} | "
                    f"{validity(opts['gsgd'])} / {validity(opts['gsgd_compiled'])} |",
                    flush=True,
                )


CASES = {
    "plain": dict(lr=1e-3),
    "momentum": dict(lr=1e-3, momentum=0.9),
    "nesterov + wd": dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening": dict(lr=1e-3, momentum=0.5, dampening=0.3),
    "tensor lr": dict(lr="tensor", momentum=0.9),
    "guard (lr 30)": dict(lr=30.0, momentum=0.9),
    # compiled=True: two warm-up steps (the first momentum step and the compilation) run before the
    # checked ones, outside the sync-debug mode (compiling is allowed to synchronize)
    "plain, compiled": dict(lr=1e-3, compiled=True),
    "nesterov + wd, compiled": dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-2, compiled=True),
    "tensor lr, compiled": dict(lr="tensor", momentum=0.9, compiled=True),
    # the default form (compiled=None): compiled for these models when Triton is there, else eager
    "momentum, default form": dict(lr=1e-3, momentum=0.9, compiled=None),
    # Adam in path space (eager only)
    "GAdam": dict(opt="gadam", lr=1e-3),
    "GAdamW amsgrad": dict(opt="gadamw", lr=1e-3, amsgrad=True),
}
OPTIMIZERS = {"gsgd": GSGD, "gadam": GAdam, "gadamw": GAdamW}


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, poison: bool = False) -> None:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    if poison:
        with torch.no_grad():
            next(model.parameters()).grad.view(-1)[0] = float("nan")


def sync_check() -> bool:
    """Run GSGD steps with synchronizing calls turned into errors; True if every case passed."""
    print(f"\n## no host-device synchronization inside GSGD.step ({torch.cuda.get_device_name()})")
    ok_all = True
    for mname in MODELS:
        for dtype in (torch.float32, torch.bfloat16):
            for cname, hyper in CASES.items():
                model, _, x, y = build(mname, device="cuda", dtype=dtype)
                hyper = dict(hyper)
                cls = OPTIMIZERS[hyper.pop("opt", "gsgd")]
                if cls is GSGD:
                    hyper.setdefault("compiled", False)  # the eager cases stay eager whatever the default picks
                if hyper["lr"] == "tensor":
                    hyper["lr"] = torch.tensor(1e-3, device="cuda")
                opt = cls(model.parameters(), topology=detect_topology(model, x), **hyper)
                before = copy.deepcopy(model)
                status = "ok"
                warm = 2 if cls is GSGD and hyper["compiled"] is not False else 0
                try:
                    for step in range(warm + 4):
                        # checked step 2 has a NaN gradient: skipped
                        _grads(model, x, y, poison=step == warm + 2)
                        torch.cuda.synchronize()
                        if step >= warm:
                            torch.cuda.set_sync_debug_mode("error")
                        try:
                            opt.step()
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                    torch.cuda.synchronize()
                    counts = (int(opt.steps), int(opt.skipped_steps))
                    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
                    moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
                    if "guard" in cname:
                        # lr 30 may blow the loss up after the clamped step: later steps may skip too
                        if sum(counts) != warm + 4 or counts[1] < 1 or not finite:
                            status = f"WRONG: steps/skipped {counts}, finite {finite}"
                        elif int(opt.guard_hits) == 0:
                            status = "ok (but the guard did not act in this case)"
                    elif counts != (warm + 3, 1) or not finite or not moved:
                        status = f"WRONG: steps/skipped {counts}, finite {finite}, moved {moved}"
                except RuntimeError as err:
                    status = f"SYNCHRONIZED: {str(err).splitlines()[0]}"
                capture = getattr(getattr(opt, "_replay", None), "fn", None)
                if getattr(capture, "capture", None) is not None:  # the replays called the graph without Dynamo?
                    status += f" (graph called without Dynamo: {capture.capture.picks is not None})"
                ok_all &= status.startswith("ok")
                print(f"{mname} | {str(dtype).replace('torch.', '')} | {cname}: {status}", flush=True)
    return ok_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a machine with a GPU")
    t0 = time.time()
    ratio_table(args.reps, args.warmup)
    passed = sync_check()
    print(f"\ntotal {time.time() - t0:.0f} s; sync check {'PASSED' if passed else 'FAILED'}")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
