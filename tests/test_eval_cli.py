"""`qalign eval`: labels + the tiny random model + BRISQUE + NIQE -> one comparison table and a report.

The labelled set: 2 pristine photos (../shared/data/pristine, skipped when absent) at 10 blur / noise
strengths each, human score falling with the strength; plus one labelled file that is missing and
one that does not decode, both of which must be reported and excluded.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import stats

from qalign.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRISTINE = SHARED_DATA / "pristine"
BLUR = (0.0, 0.8, 1.6, 2.5, 4.0)
NOISE = (4.0, 10.0, 20.0, 35.0, 60.0)


def _pristine_photos(n: int) -> list[Path]:
    photos = sorted(PRISTINE.glob("*.png")) if PRISTINE.is_dir() else []
    if len(photos) < n:
        pytest.skip(f"pristine photos not available under {PRISTINE}")
    return photos[:n]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict:
    """A folder of 20 distorted images + broken.png + labels.csv (with one missing file)."""
    root = tmp_path_factory.mktemp("eval-set")
    rows = []
    rng = np.random.default_rng(0)
    for k, src in enumerate(_pristine_photos(2)):
        with Image.open(src) as im:
            base = im.convert("RGB")
        base.thumbnail((256, 256))
        for i, radius in enumerate(BLUR):
            img = base.filter(ImageFilter.GaussianBlur(radius)) if radius else base
            name = f"p{k}_blur{i}.png"
            img.save(root / name)
            rows.append((name, 5.0 - 0.9 * i - 0.05 * k))
        for i, sigma in enumerate(NOISE):
            arr = np.asarray(base, dtype=np.float64) + rng.normal(0, sigma, (base.size[1], base.size[0], 3))
            name = f"p{k}_noise{i}.png"
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / name)
            rows.append((name, 4.8 - 0.85 * i - 0.05 * k))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mos"])
        for name, score in rows:
            w.writerow([name, f"{score:.3f}"])
        w.writerow(["broken.png", "2.5"])
        w.writerow(["not_there.png", "3.0"])
    return {"root": root, "labels": root / "labels.csv", "scores": dict(rows)}


def _parse_table(out: str) -> dict[str, dict]:
    """The Markdown table rows of `qalign eval`'s stdout, numbers parsed."""
    rows = {}
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["model", "n", "SRCC [95% CI]", "KRCC", "PLCC", "PLCC(fit)", "RMSE(fit)"]
    assert set(lines[1]) <= {"|", "-"}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        m = re.fullmatch(r"(-?\d\.\d+) \[(-?\d\.\d+|nan), (-?\d\.\d+|nan)\]", cells[2])
        assert m, cells[2]
        rows[cells[0]] = {
            "n": int(cells[1]), "srcc": float(m[1]), "ci": (float(m[2]), float(m[3])), "krcc": float(cells[3]),
            "plcc": float(cells[4]), "plcc_fit": float(cells[5].split()[0]), "rmse_fit": float(cells[6]),
        }
    return rows


@pytest.fixture(scope="module")
def eval_run(labelled, tiny_model_dir, tmp_path_factory):
    report = tmp_path_factory.mktemp("eval-report")
    import contextlib
    import io

    # capsys is function-scoped; a module-scoped run captures by redirection.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["eval", "--data", str(labelled["labels"]), "--model", str(tiny_model_dir), "--model", "brisque",
                   "--model", "niqe", "--device", "cpu", "--batch-size", "4", "--n-boot", "200",
                   "--report", str(report)])
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "report": report,
            "tiny": Path(tiny_model_dir).resolve().name}


def test_eval_table_has_every_model_and_parses(eval_run, labelled):
    assert eval_run["rc"] == 0, eval_run["err"]
    rows = _parse_table(eval_run["out"])
    assert set(rows) == {eval_run["tiny"], "brisque", "niqe"}
    for name, r in rows.items():
        assert r["n"] == 20, name  # 22 labelled - 1 missing - 1 undecodable
        for key in ("srcc", "krcc", "plcc", "plcc_fit"):
            assert -1.0 <= r[key] <= 1.0, (name, key)
        assert r["ci"][0] <= r["srcc"] <= r["ci"][1], name  # nan (no bootstrap) fails here
        assert r["rmse_fit"] >= 0
    # Direction: BRISQUE / NIQE fall as quality rises; oriented, they must agree with the ladder.
    assert rows["niqe"]["srcc"] > 0.5, rows["niqe"]
    assert rows["brisque"]["srcc"] > 0.3, rows["brisque"]
    # Labelled as such: the legend says which PLCC is raw and which is after the logistic.
    assert "PLCC: Pearson on the raw predictions" in eval_run["out"]
    assert "4-parameter logistic" in eval_run["out"]


def test_eval_reports_missing_and_undecodable_items(eval_run):
    out, err = eval_run["out"], eval_run["err"]
    assert "20 items evaluated of 22 labelled, 1 files missing, 1 failed to decode" in out
    assert "not_there.png" in err
    assert "broken.png" in err


def test_eval_tiny_numbers_match_the_api(eval_run, labelled, tiny_scorer):
    """The table's SRCC/KRCC/PLCC for the tiny model are those of its API scores on the 20 images."""
    root = labelled["root"]
    names = sorted(labelled["scores"])
    scores = {r.path: r.score for r in tiny_scorer.score([str(root / n) for n in names])}
    pred = np.array([scores[str(root / n)] for n in names])
    human = np.array([labelled["scores"][n] for n in names])
    assert np.std(pred) > 1e-4  # the random model does see the pixels
    row = _parse_table(eval_run["out"])[eval_run["tiny"]]
    assert row["srcc"] == pytest.approx(stats.spearmanr(pred, human)[0], abs=1e-4)
    assert row["krcc"] == pytest.approx(stats.kendalltau(pred, human)[0], abs=1e-4)
    assert row["plcc"] == pytest.approx(stats.pearsonr(pred, human)[0], abs=1e-4)


def test_eval_report_files(eval_run, labelled):
    report = eval_run["report"]
    doc = json.loads((report / "results.json").read_text())
    assert [r["name"] for r in doc["results"]] == [eval_run["tiny"], "brisque", "niqe"]
    assert doc["eval"]["missing_files"] == ["not_there.png"]
    assert [Path(d["path"]).name for d in doc["eval"]["failed_to_decode"]] == ["broken.png"]
    assert doc["eval"]["n_evaluated"] == 20
    with open(report / "per_item.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    tiny = eval_run["tiny"]
    probs_cols = [f"{tiny}_p_{w}" for w in ("bad", "poor", "fair", "good", "excellent")]
    for col in ["path", "human", tiny, "brisque", "niqe", *probs_cols]:
        assert col in rows[0], col
    for row in rows:
        assert float(row["human"]) == pytest.approx(labelled["scores"][Path(row["path"]).name], abs=1e-3)
        p = np.array([float(row[c]) for c in probs_cols])
        assert p.sum() == pytest.approx(1.0, abs=1e-6)
        assert float(row[tiny]) == pytest.approx(float(p @ np.arange(1, 6)), abs=1e-6)
    pngs = sorted(report.glob("*.png"))
    names = {p.name for p in pngs}
    assert {f"scatter_{tiny}.png", "scatter_brisque.png", "scatter_niqe.png", f"levels_{tiny}.png"} <= names
    assert not any(n.startswith("levels_brisque") or n.startswith("levels_niqe") for n in names)
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
        with Image.open(png) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float64)
        assert arr.shape[0] > 100 and arr.shape[1] > 100, png
        assert arr.std() > 5 and (arr < 128).mean() > 0.005, f"{png.name} looks blank"


def test_eval_split_limit_and_bad_arguments(labelled, tiny_model_dir, tmp_path, capsys):
    rc = main(["eval", "--data", str(labelled["labels"]), "--model", "niqe", "--split", "test"])
    assert rc == 2
    assert "no records with split 'test'" in capsys.readouterr().err
    rc = main(["eval", "--data", str(labelled["labels"]), "--model", "niqe", "--limit", "6", "--n-boot", "50"])
    out = capsys.readouterr().out
    assert rc == 0
    assert _parse_table(out)["niqe"]["n"] in (5, 6)  # the sample may hold the missing / broken file
    rc = main(["eval", "--data", str(labelled["labels"]), "--model", "no-such-model-xyz", "--model", "niqe",
               "--limit", "4", "--n-boot", "0"])
    captured = capsys.readouterr()
    assert rc == 1  # the other model still gives its row
    assert "no-such-model-xyz" in captured.err
    assert set(_parse_table(captured.out)) == {"niqe"}


def test_eval_warns_when_the_model_was_trained_on_the_eval_set(labelled, tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "trained-tiny"
    shutil.copytree(tiny_model_dir, model)
    root = labelled["root"]
    # Training record: two eval images by path, one by a re-encoded copy's content hash only.
    from qalign.data.overlap import content_hash

    copy = tmp_path / "copy.png"
    with Image.open(root / "p1_noise3.png") as im:
        im.save(copy, compress_level=1)
    assert copy.read_bytes() != (root / "p1_noise3.png").read_bytes()
    training = {"images": [str(root / "p0_blur0.png"), str(root / "p0_blur1.png"), str(tmp_path / "gone.png")],
                "hashes": [content_hash(copy).pixel_sha256]}
    (model / "training.json").write_text(json.dumps(training))
    rc = main(["eval", "--data", str(labelled["labels"]), "--model", str(model), "--device", "cpu",
               "--n-boot", "0"])
    captured = capsys.readouterr()
    assert rc == 0
    msg = [ln for ln in captured.out.splitlines() if ln.startswith("WARNING")]
    assert msg and "trained on 3 of the 20 evaluated items" in msg[0], captured.out
    # No training record -> no warning.
    (model / "training.json").unlink()
    main(["eval", "--data", str(labelled["labels"]), "--model", str(model), "--device", "cpu", "--n-boot", "0"])
    assert "WARNING" not in capsys.readouterr().out


def test_training_items_from_safetensors_metadata_and_train_config(labelled, tmp_path):
    """`qalign train` records its config (labels file, images root) in trained.safetensors' metadata:
    the training set is then read from that labels file (its train split, or unsplit records)."""
    import torch
    from safetensors.torch import save_file

    from qalign.commands.eval import check_training_overlap, training_items

    folder = tmp_path / "m"
    folder.mkdir()
    train_csv = tmp_path / "train.csv"
    train_csv.write_text("path,score,split\np0_blur2.png,3,train\np0_blur3.png,2,test\np1_blur4.png,1,\n")
    meta = {"training": json.dumps({"config": {"data": str(train_csv), "images": str(labelled["root"]),
                                               "train_split": "train"}})}
    save_file({"x": torch.zeros(1)}, str(folder / "trained.safetensors"), metadata=meta)
    paths, hashes, where = training_items(folder)
    assert sorted(Path(p).name for p in paths) == ["p0_blur2.png", "p1_blur4.png"]
    assert "metadata" in where and not hashes
    evals = [str(labelled["root"] / n) for n in ("p0_blur2.png", "p0_blur3.png", "p1_blur4.png", "p1_noise0.png")]
    ov = check_training_overlap(folder, evals)
    assert ov["n_overlap"] == 2
    assert sorted(Path(p).name for p in ov["overlapping"]) == ["p0_blur2.png", "p1_blur4.png"]
    assert training_items(tmp_path) is None  # no record at all


def test_eval_dmos_labels_and_mixed_datasets(labelled, tmp_path, capsys):
    """DMOS labels (lower = better) give NIQE the same agreement as the MOS labels; a file mixing two
    datasets gets one table (and one report folder) per dataset."""
    scores = labelled["scores"]
    root = labelled["root"]
    dmos = tmp_path / "dmos.csv"
    dmos.write_text("path,score\n" + "".join(f"{root / n},{6 - s:.3f}\n" for n, s in scores.items()))
    mos = tmp_path / "mos.csv"
    mos.write_text("path,score\n" + "".join(f"{root / n},{s:.3f}\n" for n, s in scores.items()))
    rc = main(["eval", "--data", str(mos), "--model", "niqe", "--n-boot", "100"])
    ref = _parse_table(capsys.readouterr().out)["niqe"]
    assert rc == 0 and ref["srcc"] > 0.5
    rc = main(["eval", "--data", str(dmos), "--model", "niqe", "--n-boot", "100", "--dmos"])
    out = capsys.readouterr().out
    assert rc == 0 and "lower is better (DMOS)" in out
    got = _parse_table(out)["niqe"]
    for key in ("srcc", "krcc", "plcc", "ci"):
        assert got[key] == pytest.approx(ref[key], abs=1e-4), key
    # without --dmos the same file reads as higher-is-better, and the agreement flips sign
    main(["eval", "--data", str(dmos), "--model", "niqe", "--n-boot", "0"])
    assert _parse_table(capsys.readouterr().out)["niqe"]["srcc"] == pytest.approx(-ref["srcc"], abs=1e-4)

    mixed = tmp_path / "mixed.csv"
    mixed.write_text("path,score,dataset\n" + "".join(
        f"{root / n},{s:.3f},{'KonIQ-10k' if n.startswith('p0') else 'SPAQ'}\n" for n, s in scores.items()))
    report = tmp_path / "rep"
    rc = main(["eval", "--data", str(mixed), "--model", "niqe", "--n-boot", "0", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0
    titles = [ln for ln in out.splitlines() if ln.startswith("dataset:")]
    assert [t.split(" | ")[0] for t in titles] == ["dataset: KonIQ-10k", "dataset: SPAQ"]
    assert all("n = 10" in t for t in titles)
    assert out.count("| niqe ") == 2
    for sub in ("KonIQ-10k", "SPAQ"):
        doc = json.loads((report / sub / "results.json").read_text())
        assert doc["results"][0]["n"] == 10 and doc["eval"]["dataset"] == sub


def test_eval_item_a_model_fails_on_is_excluded_for_every_model(labelled, tmp_path, capsys):
    """NIQE needs two 96x96 blocks: a 64x64 image fails in NIQE only, and leaves every model's table row."""
    root = labelled["root"]
    names = sorted(labelled["scores"])[:6]
    small = tmp_path / "small.png"
    with Image.open(root / names[0]) as im:
        im.resize((64, 64)).save(small)
    labels = tmp_path / "l.csv"
    labels.write_text("path,score\n" + "".join(f"{root / n},{labelled['scores'][n]}\n" for n in names)
                      + f"{small},3.0\n")
    rc = main(["eval", "--data", str(labels), "--model", "brisque", "--model", "niqe", "--n-boot", "0",
               "--report", str(tmp_path / "rep")])
    captured = capsys.readouterr()
    assert rc == 0
    assert "6 items evaluated of 7 labelled, 1 failed in a model (excluded for every model)" in captured.out
    rows = _parse_table(captured.out)
    assert rows["brisque"]["n"] == 6 and rows["niqe"]["n"] == 6
    assert "small.png" in captured.err and "niqe failed" in captured.err
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [Path(d["path"]).name for d in doc["eval"]["failed_in_model"]] == ["small.png"]
    assert list(doc["eval"]["failed_in_model"][0]["errors"]) == ["niqe"]
