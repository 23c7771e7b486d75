"""Two-process gloo runs for the distributed tests: every rank runs ``fn(rank, world)`` and
saves what it returns; the test gets the list back, rank by rank."""
import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, port, out_dir, world, fn, strict_warnings):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("error" if strict_warnings else "always", UserWarning)
            result = fn(rank, world)
        torch.save({"result": result, "warnings": [str(w.message) for w in caught]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, out_dir, world=2, strict_warnings=False):
    """Run ``fn(rank, world)`` (a module-level function) on ``world`` gloo ranks; returns
    ``[(result, warning messages), ...]`` per rank. ``strict_warnings`` turns UserWarnings into
    errors."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(out_dir), world, fn, strict_warnings), nprocs=world,
             join=True)
    out = [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True)
           for r in range(world)]
    return [(o["result"], o["warnings"]) for o in out]
