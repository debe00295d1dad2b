"""Two gloo processes check the cross-rank reductions that FSDP/DDP need; each rank writes ``DIR/result-<rank>.json``.

- ``global_norms``: norms of tensors split into per-rank shards (a rank may hold no shard of one) equal
  the norms of the whole tensors; a NaN in one rank's shard makes the global norm NaN on every rank.
- ``pooled_moments``: input moments pooled over ranks equal those of the concatenated data, also when
  one rank has seen nothing.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_sentinel._stats import global_norms, shard_norms
from lightning_sentinel.checks._batch_stats import FeatureMoments, pooled_moments


def worker(rank: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, generator=generator), torch.randn(6, generator=generator)
    shards = [a[:4], None] if rank == 0 else [a[4:], b]  # rank 0 holds no shard of b
    norms = global_norms(shard_norms(shards, torch.device("cpu")))
    expected = torch.stack([a.norm(), b.norm()])
    bad = [a[:4].clone(), None] if rank == 0 else [torch.tensor([float("nan")]), b]
    bad_norms = global_norms(shard_norms(bad, torch.device("cpu")))

    data = [torch.randn(100, 3, generator=generator), torch.randn(60, 3, generator=generator) * 1000 + 50]
    moments = FeatureMoments()
    moments.update(data[rank][:50])
    moments.update(data[rank][50:])
    pooled = pooled_moments(moments, torch.device("cpu"))
    everything = torch.cat(data).double()
    lonely = FeatureMoments()
    if rank == 0:
        lonely.update(data[0])
    alone = pooled_moments(lonely, torch.device("cpu"))
    record = {
        "rank": rank,
        "norms_match": bool(torch.allclose(norms, expected, rtol=1e-5)),
        "nan_spreads": bool(torch.isnan(bad_norms[0])) and bool(torch.isfinite(bad_norms[1])),
        "count": float(pooled.count),
        "mean_match": bool(torch.allclose(pooled.mean.double(), everything.mean(0), rtol=1e-4, atol=1e-3)),
        "std_match": bool(torch.allclose(pooled.std.double(), everything.std(0, unbiased=False), rtol=1e-3)),
        "absmax_match": bool(torch.allclose(pooled.absmax, everything.abs().amax(0).float())),
        "alone_count": float(alone.count),
        "alone_match": bool(torch.allclose(alone.mean, data[0].mean(0), atol=1e-5)),
    }
    Path(out, f"result-{rank}.json").write_text(json.dumps(record))  # not stdout: lines interleave
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)  # usage: gloo_reductions.py PORT DIR
