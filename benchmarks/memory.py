"""Peak memory that lightning-sentinel adds to a training run, against the model's parameter bytes.

A benchmark, not a test. A 35M-parameter MLP (2048-4096-4096-2048-10, 128 MiB of fp32 weights) trains
with Adam for a few steps, check steps of the suite's clock included, once per variant, each in a fresh
process: no callback, ``Sentinel()``, ``Sentinel(preset="full")``. On the CPU the peak is the process's
peak resident memory (``VmHWM``), on a GPU ``torch.cuda.max_memory_allocated``; a variant's cost is its
peak above the bare run's, in units of the parameter bytes (issue 21's targets: at most 0.2x for
``Sentinel()``, 1.25x for the full preset).

Run: ``python -m benchmarks.memory`` (about a minute per variant on one CPU core).

Example:
    >>> parameter_bytes(mlp([4, 3, 2]))
    92
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from typing import Any

import torch
from torch import nn

WIDTHS = [2048, 4096, 4096, 2048, 10]
DEFAULT_STEPS = 12
VARIANTS = ("bare", "Sentinel()", 'Sentinel(preset="full")')


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers of ``widths`` with ReLUs between them."""
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _peak_resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(variant: str, steps: int, accelerator: str) -> dict[str, Any]:
    """Train once with ``variant`` in this process and return its peak memory (MB) and parameter bytes."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sentinel import Sentinel

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(WIDTHS)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64 * steps, WIDTHS[0], generator=generator)
    targets = torch.randint(0, WIDTHS[-1], (64 * steps,), generator=generator)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=64, shuffle=True)
    model = Classifier()
    callbacks: list[pl.Callback] = []
    if variant == "Sentinel()":
        callbacks = [Sentinel()]
    elif variant == 'Sentinel(preset="full")':
        callbacks = [Sentinel(preset="full")]
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=callbacks,
        )
        trainer.fit(model, loader)
    peak = torch.cuda.max_memory_allocated() / 2**20 if accelerator == "gpu" else _peak_resident_mb()
    return {"variant": variant, "peak_mb": peak, "parameter_bytes": parameter_bytes(model)}


def measure(steps: int, accelerator: str) -> list[dict[str, Any]]:
    """Every variant in a fresh process (a clean peak), bare first."""
    rows = []
    for variant in VARIANTS:
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.memory",
                "--one",
                variant,
                "--steps",
                str(steps),
                "--accelerator",
                accelerator,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    return rows


def report(rows: list[dict[str, Any]], steps: int, accelerator: str) -> list[str]:
    """Markdown lines: each variant's peak above the bare run's, in MB and in parameter bytes."""
    bare = rows[0]["peak_mb"]
    params_mb = rows[0]["parameter_bytes"] / 2**20
    unit = "MB allocated (GPU)" if accelerator == "gpu" else "MB peak RSS"
    lines = [
        f"35M-parameter MLP ({'-'.join(map(str, WIDTHS))}, {params_mb:.0f} MB of fp32 weights), Adam, {steps} "
        f"steps (check steps of the clock included), each variant in a fresh process; {unit}.",
        "",
        "| variant | peak | added | added / parameter bytes | target |",
        "|---|---|---|---|---|",
    ]
    targets = {"Sentinel()": 0.2, 'Sentinel(preset="full")': 1.25}
    for row in rows:
        added = row["peak_mb"] - bare
        target = targets.get(row["variant"])
        verdict = (
            "" if target is None else f"<= {target}x: {'met' if added / params_mb <= target else 'not met'}"
        )
        lines.append(
            f"| {row['variant']} | {row['peak_mb']:.0f} | {added:+.0f} | {added / params_mb:+.2f}x | {verdict} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per run (default: 12)"
    )
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_variant(args.one, args.steps, args.accelerator)))
        return
    rows = measure(args.steps, args.accelerator)
    print("\n".join(report(rows, args.steps, args.accelerator)))


if __name__ == "__main__":
    main()
