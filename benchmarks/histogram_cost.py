"""Cost of HistogramLogger: the extra time of one sampled step, and the amortised cost at a cadence.

A benchmark, not a test. Every variant trains with a ``TensorBoardLogger`` (so the baseline pays
Lightning's own logging too); variants are interleaved (A B C ... A B C ...) so that drift of the
machine hits all alike. A run's cost is the wall time of ``trainer.fit`` over its steps; the cost of
one sampled step is ``(t[every_n_steps=1] - t[bare]) / steps``, and the amortised overhead at a
cadence N is that cost over N bare steps.

Run: ``python -m benchmarks.histogram_cost [--repeats 3] [--steps 100]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks.nan_guard_cost import Workload, _loader
from lightning_sentinel.checks.histograms import HistogramLogger

VARIANTS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": list,
    "HistogramLogger(every_n_steps=1)": lambda: [HistogramLogger(every_n_steps=1)],
    "HistogramLogger() (default cadence)": lambda: [HistogramLogger()],
}


def time_variant(kind: str, name: str, steps: int) -> float:
    """Seconds per training step of one run of ``name`` on workload ``kind`` (whole ``fit``)."""
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            callbacks=VARIANTS[name](),
            logger=TensorBoardLogger(root, name="tb"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=50,
        )
        start = time.perf_counter()
        trainer.fit(Workload(kind), _loader(kind, steps))
        return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    """Print a markdown table: ms/step of each variant, the sampled-step cost, amortised overheads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}")
    print("| workload | variant | ms/step (median of runs) |")
    print("|---|---|---|")
    for kind in args.workloads:
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name in VARIANTS:
                samples[name].append(time_variant(kind, name, args.steps))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        for name, value in medians.items():
            print(f"| {kind} | {name} | {value * 1e3:.3f} |")
        bare = medians["bare"]
        sampled = medians["HistogramLogger(every_n_steps=1)"] - bare
        overheads = ", ".join(f"every {n}: {sampled / (n * bare):.2%}" for n in (10, 50, 200, 1000))
        print(
            f"| {kind} | one sampled step | +{sampled * 1e3:.3f} ms ({sampled / bare:.2f} steps); {overheads} |"
        )


if __name__ == "__main__":
    main()
