"""The ``qalign`` command: in-process through ``qalign.cli.main`` where possible, the real
console script in a subprocess for exit statuses and the kill-and-resume scenario."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qalign import __version__
from qalign.cli import main
from qalign.scoring import ROW_FIELDS
from processes import console_script, run_until_then_sigkill
from tiny_model import write_images


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([*console_script(), *args], capture_output=True, text=True, env=env, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-images")
    write_images(path, 5)
    return path


@pytest.fixture(scope="module")
def api_scores(tiny_scorer, folder) -> dict[str, float]:
    return {r.path: r.score for r in tiny_scorer.score(sorted(str(p) for p in folder.glob("*.png")))}


def _score(capsys, model_dir, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["score", *map(str, args), "--model", str(model_dir), "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def _check_row(row: dict, api_scores: dict[str, float]) -> None:
    assert row["path"] in api_scores
    s = float(row["score_1_5"])
    assert s == pytest.approx(api_scores[row["path"]], abs=1e-5)
    assert float(row["score_0_1"]) == pytest.approx((s - 1) / 4, abs=1e-6)
    probs = np.array([float(row[f"p_{w}"]) for w in ("bad", "poor", "fair", "good", "excellent")])
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert s == pytest.approx(float(probs @ np.arange(1, 6)), abs=1e-6)
    assert row["error"] == ""


def test_versionconsole_script():
    proc = _run(["--version"])
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qalign {__version__}"


def test_models_lists_tiny_with_its_tasks(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "tasks", "video"]
    tiny = [line for line in lines if line.startswith("qalign-tiny ")]
    assert len(tiny) == 1
    assert tiny[0].split()[1] == "quality"
    aesthetic = [line for line in lines if line.startswith("q-align-aesthetic ")]
    assert aesthetic and "aesthetics" in aesthetic[0].split()[1]


def test_score_folder_prints_a_table(capsys, tiny_model_dir, folder, api_scores):
    rc, out, _ = _score(capsys, tiny_model_dir, folder)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("path") and "score [1-5]" in lines[0] and "p(excellent)" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    body = lines[2:]
    assert len(body) == len(api_scores)
    for line, (path, score) in zip(body, sorted(api_scores.items())):
        cells = line.split()
        assert cells[0] == path
        assert float(cells[1]) == pytest.approx(score, abs=6e-4)
        assert cells[2] in ("bad", "poor", "fair", "good", "excellent")


def test_format_csv(capsys, tiny_model_dir, folder, api_scores):
    rc, out, _ = _score(capsys, tiny_model_dir, folder, "--format", "csv")
    assert rc == 0
    reader = csv.DictReader(io.StringIO(out))
    assert tuple(reader.fieldnames) == ROW_FIELDS
    rows = list(reader)
    assert [r["path"] for r in rows] == sorted(api_scores)
    for row in rows:
        _check_row(row, api_scores)


def test_format_json(capsys, tiny_model_dir, folder, api_scores):
    rc, out, _ = _score(capsys, tiny_model_dir, folder, "--format", "json")
    assert rc == 0
    rows = json.loads(out)
    assert [tuple(r) for r in rows] == [ROW_FIELDS] * len(api_scores)
    for row in rows:
        _check_row(row, api_scores)


def test_format_jsonl(capsys, tiny_model_dir, folder, api_scores):
    rc, out, _ = _score(capsys, tiny_model_dir, folder, "--format", "jsonl", "--batch-size", "2")
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == sorted(api_scores)
    for row in rows:
        assert tuple(row) == ROW_FIELDS
        _check_row(row, api_scores)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_output_file(capsys, tmp_path, tiny_model_dir, folder, api_scores, suffix):
    out_file = tmp_path / f"scores.{suffix}"
    out_file.write_text("stale content from an earlier run\n")  # replaced, not appended to
    rc, out, _ = _score(capsys, tiny_model_dir, folder, "--output", out_file)
    assert rc == 0
    assert out == ""  # --output alone prints nothing on stdout
    text = out_file.read_text()
    if suffix == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert text.splitlines()[0] == ",".join(ROW_FIELDS)
    else:
        rows = [json.loads(line) for line in text.splitlines()]
    assert [r["path"] for r in rows] == sorted(api_scores)
    for row in rows:
        _check_row(row, api_scores)


def test_output_must_be_csv_or_jsonl(tmp_path, tiny_model_dir, folder):
    with pytest.raises(SystemExit) as info:
        main(["score", str(folder), "--model", str(tiny_model_dir), "--output", str(tmp_path / "x.txt")])
    assert "csv or .jsonl" in str(info.value.code)


def test_failed_row_gives_nonzero_exit_and_error_column(capsys, tmp_path, tiny_model_dir, folder, api_scores):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc, out, err = _score(capsys, tiny_model_dir, folder, broken, "--format", "csv")
    assert rc == 1
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(api_scores) + 1
    bad = [r for r in rows if r["error"]]
    assert [r["path"] for r in bad] == [str(broken)]
    assert bad[0]["score_1_5"] == "" and str(broken) in bad[0]["error"]
    assert "1 of 6 inputs failed" in err
    for row in rows:
        if not row["error"]:
            _check_row(row, api_scores)


def test_no_inputs_is_exit_2(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _score(capsys, tiny_model_dir, empty)
    assert rc == 2 and "no input files" in err


def test_aesthetics_refused_with_exit_2(capsys, tiny_model_dir, folder):
    rc, out, err = _score(capsys, tiny_model_dir, folder, "--task", "aesthetics")
    assert rc == 2
    assert out == ""
    assert "cannot judge aesthetics" in err and "--model one-align" in err


def test_resume_needs_output(capsys, tiny_model_dir, folder):
    rc, _, err = _score(capsys, tiny_model_dir, folder, "--resume")
    assert rc == 2 and "--resume needs --output" in err


def test_console_script_exit_status(tmp_path, tiny_model_dir, folder):
    """The installed script's exit status: 1 when a row failed, 2 for a refused task."""
    missing = tmp_path / "missing.png"
    proc = _run(["score", str(folder), str(missing), "--model", str(tiny_model_dir), "--format", "jsonl",
                 "--device", "cpu"])
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 6 and rows[-1]["path"] == str(missing) and "no such file" in rows[-1]["error"]
    assert all(r["score_1_5"] is not None for r in rows[:-1])


def test_resume_csv_after_torn_write(capsys, tmp_path, tiny_model_dir, folder, api_scores):
    out_file = tmp_path / "partial.csv"
    paths = sorted(api_scores)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROW_FIELDS)
    writer.writeheader()
    rc, out, _ = _score(capsys, tiny_model_dir, paths[0], paths[1], "--format", "csv")
    for row in csv.DictReader(io.StringIO(out)):
        writer.writerow(row)
    out_file.write_text(buf.getvalue() + paths[2] + ",3.1")  # a row cut by a kill
    rc, _, err = _score(capsys, tiny_model_dir, folder, "--output", out_file, "--resume")
    assert rc == 0
    assert "2 already in" in err and "3 to score" in err
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert [r["path"] for r in rows] == paths
    for row in rows:
        _check_row(row, api_scores)


def test_resume_after_sigkill(tmp_path, tiny_model_dir):
    """Kill a real run mid-way (after a few rows hit the disk), tear its last line, resume."""
    images = tmp_path / "many"
    n = 120
    paths = write_images(images, n)
    out_file = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [*console_script(), "score", str(images), "--model", str(tiny_model_dir), "--batch-size", "1",
           "--output", str(out_file), "--device", "cpu"]
    with open(tmp_path / "stderr.txt", "wb") as log:  # a file, not a pipe that could fill up and block the run
        proc = run_until_then_sigkill(cmd, lambda: out_file.exists() and out_file.read_bytes().count(b"\n") >= 3,
                                      90, stdout=subprocess.DEVNULL, stderr=log, env=env)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended (rc {proc.returncode}) before it could be killed: {(tmp_path / 'stderr.txt').read_text()[-2000:]}")
    before = out_file.read_bytes()
    written = before.count(b"\n")
    assert 3 <= written < n
    # Simulate a torn write: half a JSON line without its newline.
    with open(out_file, "ab") as f:
        f.write(b'{"path": "' + paths[written].encode() + b'", "score_1_5": 2.')
    rc = main(["score", str(images), "--model", str(tiny_model_dir), "--batch-size", "16", "--output",
               str(out_file), "--resume", "--device", "cpu"])
    assert rc == 0
    data = out_file.read_bytes()
    assert data.startswith(before)  # finished rows are kept as they were
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.decode().splitlines()]  # every line parses
    assert sorted(r["path"] for r in rows) == sorted(paths)  # each file exactly once
    assert len(rows) == n
    assert all(r["error"] == "" and 1 <= r["score_1_5"] <= 5 for r in rows)
