"""`qalign data convert` (labels -> training records) and `qalign data overlap`, and the round trip of
the converted records through `read_labels` and `train.read_records`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from qalign.cli import main
from qalign.data.labels import read_labels
from qalign.levels import LEVELS, level_of
from qalign.prompts import IMAGE_PLACEHOLDER, answer, training_questions
from tiny_model import make_image, write_images

# 12 labelled images on a 0-100 scale; the extreme scores sit in the test split, so a range taken
# over the train split alone would differ from the whole file's.
SCORES = [3.0, 97.0, 10.0, 25.0, 40.0, 41.0, 55.0, 62.0, 70.0, 80.0, 88.0, 33.0]
SPLITS = ["test", "test", "train", "train", "train", "train", "train", "train", "train", "train", "test", "train"]


@pytest.fixture
def labelled(tmp_path) -> dict:
    root = tmp_path / "imgs"
    paths = write_images(root / "sub", len(SCORES))
    rel = [str(Path(p).relative_to(root)) for p in paths]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "MOS", "std", "split"])
        for r, s, sp in zip(rel, SCORES, SPLITS):
            w.writerow([r, s, 0.1 * s + 1, sp])
        w.writerow(["sub/lost_1.png", 50.0, 1.0, "train"])  # missing files, in both splits
        w.writerow(["sub/lost_2.png", 20.0, 1.0, "test"])
    return {"root": root, "labels": labels, "rel": rel}


def _convert(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["data", "convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _histogram(out: str) -> list[int]:
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("level histogram"))
    counts = []
    for word, ln in zip(LEVELS, lines[start + 1:start + 6]):
        parts = ln.split()
        assert parts[0] == word
        counts.append(int(parts[1]))
    return counts


def test_convert_levels_histogram_and_missing(labelled, tmp_path, capsys):
    out_path = tmp_path / "out" / "train.jsonl"
    rc, out, err = _convert(capsys, "--data", labelled["labels"], "--images", labelled["root"], "--output", out_path,
                            "--split", "train")
    assert rc == 0, err
    lines = [json.loads(ln) for ln in out_path.read_text().splitlines()]
    train_scores = [s for s, sp in zip(SCORES, SPLITS) if sp == "train"]
    assert [r["score"] for r in lines] == train_scores
    low, high = 3.0, 97.0  # the WHOLE file's range (test items and missing files included)
    assert "[m, M] = [3, 97]" in out
    expected = [level_of(s, low, high) for s in train_scores]
    assert [r["level"] for r in lines] == expected
    assert expected != [level_of(s, min(train_scores), max(train_scores)) for s in train_scores]
    assert [r["level_word"] for r in lines] == [LEVELS[i] for i in expected]
    assert _histogram(out) == np.bincount(expected, minlength=5).tolist()
    questions = training_questions("quality", "image")
    for r in lines:
        assert Path(r["path"]).is_absolute() and Path(r["path"]).is_file()
        assert r["task"] == "quality" and r["input"] == "image" and r["split"] == "train"
        assert r["std"] == pytest.approx(0.1 * r["score"] + 1)
        human, gpt = r["conversations"]
        q, placeholder = human["value"].split("\n")
        assert q in questions and placeholder == IMAGE_PLACEHOLDER
        assert gpt == {"from": "gpt", "value": answer(r["level_word"], "quality", "image")}
    # the missing train file is listed on stderr and in OUT.missing.txt, not dropped silently
    assert "sub/lost_1.png" in err and "1 of 10 labelled files are missing" in err
    assert (tmp_path / "out" / "train.missing.txt").read_text().splitlines() == ["sub/lost_1.png"]
    assert "lost_2" not in err  # other split
    # a later run with nothing missing removes the stale list
    (labelled["root"] / "sub" / "lost_1.png").write_bytes((labelled["root"] / "sub" / "img_000.png").read_bytes())
    rc, out, err = _convert(capsys, "--data", labelled["labels"], "--images", labelled["root"], "--output", out_path,
                            "--split", "train")
    assert rc == 0 and not (tmp_path / "out" / "train.missing.txt").exists()


def test_convert_dmos_aesthetics_and_round_trip(labelled, tmp_path, capsys):
    out_path = tmp_path / "all.jsonl"
    rc, out, err = _convert(capsys, "--data", labelled["labels"], "--images", labelled["root"], "--output", out_path,
                            "--dmos", "--task", "aesthetics")
    assert rc == 0, err
    lines = [json.loads(ln) for ln in out_path.read_text().splitlines()]
    assert len(lines) == len(SCORES)
    assert [r["level"] for r in lines] == [level_of(s, 3.0, 97.0, lower_is_better=True) for s in SCORES]
    assert lines[0]["level_word"] == "excellent" and lines[1]["level_word"] == "bad"  # flipped
    assert all(r["conversations"][1]["value"].startswith("The aesthetics of the image is") for r in lines)
    assert all(r["conversations"][0]["value"].split("\n")[0] in training_questions("aesthetics") for r in lines)
    assert "lower is better" in out
    # round trip: read_labels reads the records back, direction and all
    back = read_labels(out_path)
    assert back.lower_is_better is True
    assert [r.score for r in back] == SCORES
    assert [r.split for r in back] == SPLITS
    assert [r.std for r in back] == pytest.approx([0.1 * s + 1 for s in SCORES])
    assert [Path(r.path).name for r in back] == [Path(p).name for p in labelled["rel"]]
    assert [back.level_index(r) for r in back] == [r["level"] for r in lines]
    # ... and so does training (paths are absolute: no --images needed)
    from qalign.train import read_records

    records = read_records(str(out_path), None)
    assert [r.score for r in records] == SCORES
    assert [r.split for r in records] == SPLITS
    assert all(Path(r.path).is_file() for r in records)


def test_read_records_takes_every_label_format_and_lists_missing_files(labelled, tmp_path):
    from qalign.train import read_records

    # Q-Align JSON (upstream format: image + gt_score) under an explicit images root
    rows = [{"image": rel, "gt_score": s} for rel, s in zip(labelled["rel"], SCORES)]
    qjson = tmp_path / "q.json"
    qjson.write_text(json.dumps(rows))
    recs = read_records(str(qjson), str(labelled["root"]))
    assert [r.score for r in recs] == SCORES and all(r.split == "train" for r in recs)
    # the CSV with its missing files: the error lists them
    with pytest.raises(FileNotFoundError) as e:
        read_records(str(labelled["labels"]), str(labelled["root"]))
    assert "2 of 14 labelled files are missing" in str(e.value)
    assert "sub/lost_1.png" in str(e.value) and "sub/lost_2.png" in str(e.value)


def test_convert_errors(labelled, tmp_path, capsys):
    rc, _, err = _convert(capsys, "--data", labelled["labels"], "--images", labelled["root"], "--output",
                          tmp_path / "x.jsonl", "--split", "val")
    assert rc == 2 and "no records with split 'val'" in err and "test, train" in err
    rc, _, err = _convert(capsys, "--data", labelled["labels"], "--images", tmp_path / "nowhere", "--output",
                          tmp_path / "x.jsonl")
    assert rc == 2 and "none of the 14 labelled files was found" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_convert_bins_each_dataset_of_a_mixed_file_on_its_own_range(tmp_path, capsys):
    paths = write_images(tmp_path, 6)
    labels = tmp_path / "mixed.csv"
    labels.write_text("path,score,dataset\n" + "".join(
        f"{Path(p).name},{s},{d}\n" for p, s, d in zip(paths, [1, 3, 5, 0, 50, 100], ["KonIQ-10k"] * 3 + ["SPAQ"] * 3)))
    rc, out, err = _convert(capsys, "--data", labels, "--output", tmp_path / "m.jsonl")
    assert rc == 0, err
    levels = [json.loads(ln)["level"] for ln in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert levels == [0, 2, 4, 0, 2, 4]
    assert "KonIQ-10k: score range [m, M] = [1, 5]" in out and "SPAQ: score range [m, M] = [0, 100]" in out


def test_data_synth_still_registered(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "--help"])
    assert e.value.code == 0
    assert "usage: qalign data synth" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ overlap

def _overlap(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["data", "overlap", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_overlap_finds_a_reencoded_png_copy(tmp_path, capsys):
    a = tmp_path / "train"
    b = tmp_path / "test"
    write_images(a, 4)
    write_images(b / "deep", 3, start=10)
    # a re-encoded copy of train/img_002.png (other compression: different bytes, same pixels)
    copy = b / "deep" / "renamed.png"
    make_image(2).save(copy, compress_level=0)
    assert copy.read_bytes() != (a / "img_002.png").read_bytes()
    rc, out, err = _overlap(capsys, a, b)
    assert rc == 1
    pairs = [ln.split("\t") for ln in out.splitlines()]
    assert pairs == [["pixels", str(a / "img_002.png"), str(copy)]]
    assert "1 overlapping pair" in err
    # bytes only: the re-encoded copy is not found
    rc, out, _ = _overlap(capsys, a, b, "--bytes-only")
    assert rc == 0 and out == ""
    # label files on either side, resolved under their folders / --images-*
    (tmp_path / "test.csv").write_text("path,score\n" + "".join(f"deep/{p.name},1\n" for p in sorted((b / "deep").iterdir()))
                                       + "deep/gone.png,2\n")
    rc, out, err = _overlap(capsys, a, tmp_path / "test.csv", "--images-b", b)
    assert rc == 1 and out.count("\n") == 1 and "renamed.png" in out
    assert "1 entries of B not found" in err and "deep/gone.png" in err
    # no overlap: exit 0
    copy.unlink()
    rc, out, _ = _overlap(capsys, a, b)
    assert rc == 0 and out == ""


def test_overlap_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_images(tmp_path / "a", 2)
    rc, _, err = _overlap(capsys, tmp_path / "a", empty)
    assert rc == 2 and "nothing to compare" in err
    rc, _, err = _overlap(capsys, tmp_path / "a", tmp_path / "nope.csv")
    assert rc == 2 and "nope.csv" in err
