"""Cost of the ``gsgd/`` diagnostics on a logging step, against one optimizer step (issue 5).

MLP 784-1024x3-10, batch 128, float32, on the CPU. Interleaved in every round: forward+backward,
``torch.optim.SGD.step`` and ``GSGD.step`` (both momentum 0.9, lr 0 so the weights stay put), and
``PathDiagnostics.before_step() + after_step()`` (the diagnostics' own, independent computation),
and ``before_step(gsgd) + GSGD.step + after_step(gsgd)`` (what ``GSGDCallback`` runs on a logging
step: the step produces the metrics as by-products); each as the median process CPU time of
``--n`` calls. The cost of the diagnostics on a logging step is the last minus ``GSGD.step``.
``--trainer`` also times whole Lightning steps with the diagnostics logged on every step against the same fit with
``GSGDCallback(diagnostics=False)`` (process CPU time, median over steps). Run it alone (other jobs
distort the timings); it prints the load average with every round::

    PYTHONPATH=$PWD python benchmarks/diagnostics_bench.py --rounds 5 [--threads 1] [--trainer]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_gsgd import GSGD, detect_topology, init_skeleton_
from lightning_gsgd.diagnostics.metrics import PathDiagnostics

log = logging.getLogger("diagnostics_bench")


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(784, 1024), nn.ReLU()]
    for _ in range(2):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1024, 10))


def median_ms(fn: Callable[[], object], n: int) -> float:
    """Median CPU time of one call (process CPU time: less distorted by other jobs than wall time)."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * statistics.median(times)


def kernels(rounds: int, n: int) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    topology = detect_topology(model, x)
    init_skeleton_(topology)
    gsgd = GSGD(model.parameters(), lr=0.0, momentum=0.9, topology=topology)  # lr 0: the weights stay put
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    diag = PathDiagnostics(topology)

    def fwd_bwd() -> None:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    def diagnostics() -> None:
        metrics = diag.before_step()
        metrics.update(diag.after_step(gsgd))

    def logged_step() -> None:  # what GSGDCallback runs on a logging step: the step makes the by-products
        metrics = diag.before_step(gsgd)
        gsgd.step()
        metrics.update(diag.after_step(gsgd))

    fwd_bwd()
    ratios_gsgd, ratios_sgd, ratios_logged = [], [], []
    for r in range(rounds):
        t = {
            "fwd+bwd": median_ms(fwd_bwd, n),
            "SGD.step": median_ms(sgd.step, n),
            "GSGD.step": median_ms(gsgd.step, n),
            "diagnostics": median_ms(diagnostics, n),
            "logged GSGD.step": median_ms(logged_step, n),
        }
        ratios_gsgd.append(t["diagnostics"] / t["GSGD.step"])
        ratios_sgd.append(t["diagnostics"] / t["SGD.step"])
        ratios_logged.append((t["logged GSGD.step"] - t["GSGD.step"]) / t["GSGD.step"])
        cells = "  ".join(f"{k} {v:6.2f} ms" for k, v in t.items())
        log.info(
            "round %d  load %.2f  %s  diag/GSGD %.2f  diag/SGD %.2f  (logged - GSGD)/GSGD %.2f",
            r,
            os.getloadavg()[0],
            cells,
            ratios_gsgd[-1],
            ratios_sgd[-1],
            ratios_logged[-1],
        )
    log.info(
        "median over rounds: independent diagnostics / GSGD.step = %.2f, / SGD.step = %.2f; "
        "by-products: (logged GSGD.step - GSGD.step) / GSGD.step = %.2f",
        statistics.median(ratios_gsgd),
        statistics.median(ratios_sgd),
        statistics.median(ratios_logged),
    )


def trainer_steps(rounds: int, steps: int) -> None:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gsgd import GSGDCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # after Lightning set up its own logger

    class Net(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()
            self.example_input_array = torch.zeros(2, 784)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128 * steps, 784, generator=g), torch.randint(0, 10, (128 * steps,), generator=g))

    class Timer(GSGDCallback):
        def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
            self.t0 = time.process_time()

        def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
            super().on_train_batch_end(trainer, *args)
            self.times.append(time.process_time() - self.t0)

    per_step: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for on in (True, False):
            torch.manual_seed(0)
            cb = Timer(diagnostics=on)
            cb.times = []
            with tempfile.TemporaryDirectory() as root:
                trainer = Trainer(
                    accelerator="cpu",
                    max_steps=steps,
                    log_every_n_steps=1,
                    logger=CSVLogger(root),
                    callbacks=[cb],
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    enable_checkpointing=False,
                )
                trainer.fit(Net(), DataLoader(data, batch_size=128))
            per_step[on].append(1e3 * statistics.median(cb.times[2:]))
        log.info(
            "round %d  load %.2f  Lightning step with diagnostics %.2f ms, without %.2f ms",
            r,
            os.getloadavg()[0],
            per_step[True][-1],
            per_step[False][-1],
        )
    extra = [a - b for a, b in zip(per_step[True], per_step[False])]
    log.info("median extra time of a logging step in a Trainer: %.2f ms", statistics.median(extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trainer", action="store_true", help="also time whole Lightning steps")
    parser.add_argument("--trainer-steps", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    log.info("torch %s, %d thread(s)", torch.__version__, torch.get_num_threads())
    kernels(args.rounds, args.n)
    if args.trainer:
        trainer_steps(args.rounds, args.trainer_steps)


if __name__ == "__main__":
    main()
