"""`qalign score --num-processes N` and launcher-started ranks: the inputs are split over the
processes and the merged output is the single-process output, row for row, in input order."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qalign import shard

TIMEOUT = 240


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT", shard.ARGS_ENV)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def _score(args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qalign", "score", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env or _env())


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def inputs(image_paths, tmp_path_factory) -> list[str]:
    """11 images and one broken file (an error row must keep its place too)."""
    folder = tmp_path_factory.mktemp("shard-inputs")
    paths = []
    for i, p in enumerate(image_paths[:11]):
        target = folder / f"{i:02d}_{Path(p).name}"
        target.write_bytes(Path(p).read_bytes())
        paths.append(str(target))
    broken = folder / "05b_broken.png"
    broken.write_text("not an image")
    return sorted([*paths, str(broken)])


@pytest.fixture(scope="module")
def single(tiny_model_dir, inputs, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single") / "one.csv"
    res = _score([*inputs, "--model", str(tiny_model_dir), "--batch-size", "2", "--output", str(out)])
    assert res.returncode == 1, res.stderr  # the broken file
    rows = _rows(out)
    assert [r["path"] for r in rows] == inputs
    return rows


@pytest.mark.parametrize("n,world,size", [(0, 2, 4), (1, 2, 4), (12, 2, 2), (13, 3, 4), (5, 4, 1), (7, 8, 2), (40, 3, 16)])
def test_blocks_cover_every_input_once_and_merge_in_order(n, world, size):
    todo = [f"item{i}" for i in range(n)]
    mine = [shard._my_inputs(todo, r, world, size) for r in range(world)]
    assert sorted(x for m in mine for x in m) == sorted(todo)
    assert all(len(m) <= -(-n // world) + size for m in mine)  # the work is spread, not piled on one rank

    class Echo:  # a scorer that returns its inputs: shows what a rank's rounds look like
        def iter_score(self, items, task, batch_size):
            return iter(items)

    rounds = [list(shard._rounds(Echo(), todo, "quality", r, world, size)) for r in range(world)]
    merged = [x for step in zip(*rounds) for part in step for x in part]
    assert merged == todo


def test_two_processes_equal_one_process(tiny_model_dir, inputs, single, tmp_path):
    out = tmp_path / "two.csv"
    res = _score([*inputs, "--model", str(tiny_model_dir), "--batch-size", "2", "--num-processes", "2",
                  "--output", str(out)], env=_env(QALIGN_SHARD_VERBOSE="1"))
    assert res.returncode == 1, res.stderr  # the broken file's row, as with one process
    assert _rows(out) == single
    # Both ranks really scored a share: 12 inputs in blocks of 2 -> 6 each.
    assert "rank 0/2 scored 6 inputs" in res.stderr and "rank 1/2 scored 6 inputs" in res.stderr, res.stderr
    assert res.stderr.count("1 of 12 inputs failed") == 1  # reported once, by rank 0


def test_two_processes_csv_on_stdout(tiny_model_dir, inputs, single):
    res = _score([*inputs[:5], "--model", str(tiny_model_dir), "--batch-size", "2", "--num-processes", "2",
                  "--format", "csv"])
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(res.stdout.splitlines()))  # printed once, by rank 0
    assert [r["path"] for r in rows] == [r["path"] for r in single[:5]]
    # The last image is alone in its batch here (batched with the next one above): float rounding only.
    for got, want in zip(rows, single[:5]):
        assert float(got["score_1_5"]) == pytest.approx(float(want["score_1_5"]), abs=1e-6)


def test_launcher_environment_like_accelerate(tiny_model_dir, inputs, single, tmp_path):
    """What `accelerate launch` / torchrun do: start every rank with RANK, WORLD_SIZE, MASTER_* set."""
    out = tmp_path / "launched.csv"
    port = shard._free_port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "qalign", "score", *inputs, "--model", str(tiny_model_dir),
                                       "--batch-size", "2", "--output", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert procs[0].returncode == 1, results[0][1]
    assert procs[1].returncode == 0, results[1][1]
    assert _rows(out) == single


def test_rank0_failing_early_stops_the_workers(tiny_model_dir, tmp_path):
    res = _score([str(tmp_path / "nothing-here" / "*.png"), "--model", str(tiny_model_dir), "--num-processes", "2"])
    assert res.returncode == 2
    assert "no input files" in res.stderr


def test_resume_with_two_processes(tiny_model_dir, inputs, single, tmp_path):
    out = tmp_path / "resume.csv"
    first = _score([*inputs[:4], "--model", str(tiny_model_dir), "--batch-size", "2", "--output", str(out)])
    assert first.returncode == 0, first.stderr
    res = _score([*inputs, "--model", str(tiny_model_dir), "--batch-size", "2", "--num-processes", "2",
                  "--output", str(out), "--resume"])
    assert res.returncode == 1, res.stderr
    assert "4 already in" in res.stderr
    assert _rows(out) == single


def test_bad_process_count(tiny_model_dir, inputs):
    res = _score([inputs[0], "--model", str(tiny_model_dir), "--num-processes", "0"])
    assert res.returncode == 2 and "at least 1" in res.stderr
