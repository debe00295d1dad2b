"""A 2-process CPU DDP run where only rank 1 produces a NaN loss; prints one line per rank."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _models import Classifier, classification_loader

from lightning_sentinel import Sentinel, SentinelError, findings


class NaNOnRankOne(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.global_rank == 1 and self.global_step >= 3:
            logits = logits / 0.0
        return torch.nn.functional.cross_entropy(logits, y)


if __name__ == "__main__":
    on_detect, root = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=40,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[Sentinel(on_detect=on_detect)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    try:
        trainer.fit(NaNOnRankOne(), classification_loader())
        outcome = "stopped"
    except SentinelError as error:
        outcome = f"raised:{error.finding.check}"
    checks = sorted({f.check for f in findings(trainer)})
    print(
        f"RESULT rank={trainer.global_rank} outcome={outcome} step={trainer.global_step} checks={','.join(checks)}"
    )
