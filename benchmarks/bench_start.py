"""Start-up and throughput of `qalign score` with the built-in model, as a user meets them.

    python benchmarks/bench_start.py [--images DIR] [--first-run]

- first run: empty cache, so the bases are fetched/converted (only with --first-run; it deletes
  nothing of yours: it points QALIGN_CACHE at a temporary folder);
- cold: bases cached, the OS page cache dropped first when permitted (root on Linux);
- warm: the same command again right away.
Each is the wall time of the whole `qalign score ONE_IMAGE` process. Then images/s in-process at
batch 1 and batch 8 on the given folder. Prints a table with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pristine"


def timed_score(image: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qalign", "score", image, "--format", "none"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def throughput(images: list[str], batch_size: int) -> float:
    import qalign

    scorer = qalign.load("qalign-tiny", device="cpu", batch_size=batch_size)
    scorer.score(images[:batch_size])  # warm-up (kernel selection, caches)
    start = time.perf_counter()
    scorer.score(images)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(SHARED))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--first-run", action="store_true")
    args = parser.parse_args()
    images = sorted(str(p) for p in Path(args.images).glob("*.png"))[: args.count]
    rows = []
    env = dict(os.environ)
    if args.first_run:
        tmp = tempfile.mkdtemp(prefix="qalign-cache-")
        rows.append(("first run (fetch + convert bases)", f"{timed_score(images[0], {**env, 'QALIGN_CACHE': tmp}):.1f} s"))
        shutil.rmtree(tmp, ignore_errors=True)
    timed_score(images[0], env)  # make sure the real cache is populated
    dropped = drop_page_cache()
    rows.append((f"cold start ({'page cache dropped' if dropped else 'page cache NOT dropped'})", f"{timed_score(images[0], env):.1f} s"))
    rows.append(("warm start", f"{timed_score(images[0], env):.1f} s"))
    for bs in (1, 8):
        rows.append((f"images/s, batch {bs}, {len(images)} images", f"{throughput(images, bs):.2f}"))
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
