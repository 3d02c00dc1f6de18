"""Scoring across several processes: ``qalign score --num-processes N`` and
``accelerate launch -m qalign score ...`` (or ``torchrun -m qalign score ...``).

    rank 0: reads the inputs (and --resume state), broadcasts the list
    inputs, in blocks of one batch, dealt round-robin:  block 0 -> rank 0, block 1 -> rank 1, ...
    every rank scores its blocks with its own Scorer (one GPU per process, or a share of the CPU cores)
    after each round, rank 0 gathers the rows (torch.distributed, gloo) and writes them in input order

So the output is the normal output, row for row as one process would write it, and streamed:
a killed run leaves a file that ``--resume`` continues. ``--num-processes N`` without a launcher
starts N worker processes itself (on 127.0.0.1) and waits for them; when one fails, the others
are stopped. Under a launcher (accelerate, torchrun: RANK / WORLD_SIZE / MASTER_ADDR in the
environment) each process is one rank and ``--num-processes`` is ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from itertools import islice
from typing import Iterator, Sequence

ARGS_ENV = "QALIGN_SHARD_ARGS"
# QALIGN_SHARD_VERBOSE=1: each rank says on stderr how many inputs it scored.
GRACE_S = 30.0  # how long workers may outlive rank 0 before they are stopped


def in_distributed_env() -> bool:
    """Started by a launcher with more than one process (RANK and WORLD_SIZE set)?"""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def rank_and_world() -> tuple[int, int]:
    if not in_distributed_env():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


# --------------------------------------------------------------------------- entry from cmd_score

def dispatch(args) -> int | None:
    """First thing ``qalign score`` does. Returns an exit code when this process's part is done
    here (the launcher, or a worker rank), None when the caller goes on as rank 0 or alone."""
    if not in_distributed_env():
        n = getattr(args, "num_processes", None)
        n = 1 if n is None else int(n)
        if n < 1:
            print("qalign: --num-processes must be at least 1", file=sys.stderr)
            return 2
        return launch(args, n) if n > 1 else None
    _init_rank(args)
    rank, _ = rank_and_world()
    if rank == 0:
        return None
    try:
        return _worker(args)
    finally:
        _finish()


def wrap(scorer):
    """Rank 0's scorer: its ``iter_score`` spreads the inputs over all ranks and yields the merged
    rows in input order. Alone (no distributed run), the scorer itself."""
    if not in_distributed_env():
        return scorer
    return ShardedScorer(scorer)


# --------------------------------------------------------------------------- ranks

def _init_rank(args) -> None:
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and getattr(args, "device", "auto") in ("auto", "cuda"):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        args.device = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per process
    elif "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        # Objects only (rows, the input list) travel between ranks: gloo serves CPU and GPU runs alike.
        dist.init_process_group("gloo", timeout=timedelta(hours=6))


def _finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _blocks(n: int, world: int, size: int) -> int:
    """Rounds needed for ``n`` inputs dealt in blocks of ``size`` over ``world`` ranks."""
    return -(-n // (world * size)) if n else 0


def _my_inputs(todo: Sequence, rank: int, world: int, size: int) -> list:
    return [x for r in range(_blocks(len(todo), world, size))
            for x in todo[(r * world + rank) * size:(r * world + rank + 1) * size]]


def _rounds(scorer, todo: Sequence, task: str, rank: int, world: int, size: int) -> Iterator[list]:
    """This rank's rows, one list per round (empty when its block of that round is past the end)."""
    rows = scorer.iter_score(_my_inputs(todo, rank, world, size), task=task, batch_size=size)
    done = 0
    for r in range(_blocks(len(todo), world, size)):
        start = (r * world + rank) * size
        count = max(0, min(size, len(todo) - start))
        yield list(islice(rows, count))
        done += count
    if os.environ.get("QALIGN_SHARD_VERBOSE"):
        print(f"qalign: rank {rank}/{world} scored {done} inputs", file=sys.stderr, flush=True)


def _worker(args) -> int:
    """A rank > 0: load the same model, take the input list from rank 0, score its blocks."""
    import torch.distributed as dist

    from .models.registry import load_scorer
    from .scoring import VideoOptions

    kwargs = {"max_pixels": args.max_pixels} if getattr(args, "max_pixels", None) else {}
    kwargs["video"] = VideoOptions(fps=args.fps, frames=args.frames, max_frames=args.max_frames or None)
    scorer = load_scorer(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **kwargs)
    message = [None]
    dist.broadcast_object_list(message, src=0)
    todo, task, size = message[0]
    rank, world = rank_and_world()
    for rows in _rounds(scorer, todo, task, rank, world, size):
        dist.gather_object(rows, None, dst=0)
    return 0


class ShardedScorer:
    """Rank 0's view: the wrapped Scorer, whose ``iter_score`` runs over all ranks."""

    def __init__(self, scorer):
        self._scorer = scorer

    def __getattr__(self, name):
        return getattr(self._scorer, name)

    def iter_score(self, inputs: Sequence, task: str = "quality", batch_size: int | None = None,
                   progress: bool = False) -> Iterator:
        import torch.distributed as dist

        from .scoring import _progress

        self._scorer.backend.check_task(task)
        size = batch_size or self._scorer.batch_size
        rank, world = rank_and_world()
        todo = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in inputs]
        dist.broadcast_object_list([(todo, task, size)], src=0)
        bar = _progress(len(todo)) if progress else None
        try:
            for rows in _rounds(self._scorer, todo, task, rank, world, size):
                gathered: list = [None] * world
                dist.gather_object(rows, gathered, dst=0)
                for part in gathered:
                    for row in part:
                        if bar is not None:
                            bar.update(1)
                        yield row
        finally:
            if bar is not None:
                bar.close()
            _finish()

    def score(self, inputs, task: str = "quality", batch_size: int | None = None, progress: bool = False):
        return list(self.iter_score(list(inputs), task=task, batch_size=batch_size, progress=progress))


# --------------------------------------------------------------------------- the launcher

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, n: int) -> int:
    """Start ``n`` ranks of ``qalign score`` with the same arguments; wait; rank 0's exit code
    (or the first failing worker's). Output and progress come from rank 0."""
    payload = json.dumps({k: v for k, v in vars(args).items() if k != "func"})
    port = _free_port()
    procs = []
    for rank in range(n):
        env = {**os.environ, ARGS_ENV: payload, "RANK": str(rank), "WORLD_SIZE": str(n), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "qalign.shard"], env=env))
    codes: dict[int, int] = {}
    rank0_done = None
    try:
        while len(codes) < n:
            for rank, proc in enumerate(procs):
                if rank not in codes and proc.poll() is not None:
                    codes[rank] = proc.returncode
            failed = [r for r, c in codes.items() if r > 0 and c != 0]
            if failed:
                print(f"qalign: worker process {failed[0]} failed (exit code {codes[failed[0]]}); stopping the others",
                      file=sys.stderr)
                _stop(procs)
                return codes[failed[0]] or 1
            if 0 in codes:
                rank0_done = rank0_done or time.monotonic()
                if codes[0] not in (0, 1) or time.monotonic() - rank0_done > GRACE_S:
                    _stop(procs)
                    break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    return codes.get(0, 1)


def _stop(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _main() -> int:
    """A rank started by ``launch``: ``qalign score`` with the launcher's arguments."""
    from .commands.score import cmd_score

    args = argparse.Namespace(**json.loads(os.environ[ARGS_ENV]))
    return int(cmd_score(args) or 0)


if __name__ == "__main__":
    sys.exit(_main())
