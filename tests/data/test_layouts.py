import logging
from pathlib import Path

import numpy as np
import pytest

from qualiteacher.data.io import SkipLog, write_image
from qualiteacher.data.layouts import (
    LAYOUTS,
    list_layouts,
    read_exdark,
    read_layout,
    read_paired,
    read_real3000,
    read_realsnow,
    read_rtts,
    read_unpaired,
)
from qualiteacher.data.records import ImageRecord


def _img(path: Path, h: int = 8, w: int = 8) -> Path:
    # PNG content under any suffix: readers go by name, Pillow by content
    return write_image(path.with_name(path.name + ".tmp.png"), np.zeros((h, w, 3), np.float32)).rename(path)


# --- records -------------------------------------------------------------------------------------

def test_image_record_validates_boxes():
    r = ImageRecord(id="a", lq="x.png", boxes=[[1, 2, 3, 4]], labels=["car"])
    assert r.boxes.dtype == np.float32 and r.boxes.shape == (1, 4) and isinstance(r.lq, Path)
    assert ImageRecord(id="b", lq="x.png", boxes=np.zeros(0), labels=()).boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="2 labels"):
        ImageRecord(id="a", lq="x.png", boxes=[[1, 2, 3, 4]], labels=["car", "bus"])
    with pytest.raises(ValueError, match="shape"):
        ImageRecord(id="a", lq="x.png", boxes=[[1, 2, 3]], labels=["car"])
    with pytest.raises(ValueError, match="empty id"):
        ImageRecord(id="", lq="x.png")


# --- paired / unpaired ----------------------------------------------------------------------------

def test_paired_matches_by_stem(tmp_path):
    for name in ("a.png", "b.jpg"):
        _img(tmp_path / "lq" / name)
    for name in ("a.png", "b.png"):
        _img(tmp_path / "gt" / name)
    records = read_paired(tmp_path)
    assert [r.id for r in records] == ["a", "b"]
    assert records[1].lq.name == "b.jpg" and records[1].gt.name == "b.png"


def test_paired_unmatched_lists_both_sides(tmp_path):
    for i in range(13):
        _img(tmp_path / "lq" / f"l{i:02d}.png")
    _img(tmp_path / "lq" / "both.png")
    _img(tmp_path / "gt" / "both.png")
    _img(tmp_path / "gt" / "onlygt.png")
    with pytest.raises(ValueError) as info:
        read_paired(tmp_path)
    msg = str(info.value)
    assert "13 in lq/ only" in msg and "l00" in msg and "l09" in msg and "l12" not in msg and "+3 more" in msg
    assert "1 in gt/ only: onlygt" in msg and "both" not in msg


def test_paired_errors(tmp_path):
    _img(tmp_path / "lq" / "a.png")
    with pytest.raises(FileNotFoundError, match="gt"):
        read_paired(tmp_path)
    (tmp_path / "gt").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        read_paired(tmp_path)
    _img(tmp_path / "gt" / "a.png")
    _img(tmp_path / "gt" / "a.jpg")
    _img(tmp_path / "lq" / "b.png")
    _img(tmp_path / "gt" / "b.png")
    # one id with two suffixes is reported (both files) and skipped; the rest of the folder is read
    from qualiteacher.data.records import check_unique_ids

    log = SkipLog()
    recs = check_unique_ids([ImageRecord(id=p.stem, lq=p) for p in sorted((tmp_path / "gt").iterdir())],
                            tmp_path / "gt", log)
    assert [r.id for r in recs] == ["b"]
    assert {Path(p).name for p in log.paths} == {"a.png", "a.jpg"}
    assert all("two suffixes" in r for r in log.paths.values())
    with pytest.raises(ValueError, match="without a partner"):  # lq/a.png lost its reference
        read_paired(tmp_path)


def test_unpaired(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "y.webp")
    _img(tmp_path / "sub" / "z.png")
    assert [r.id for r in read_unpaired(tmp_path)] == ["x", "y"]
    assert [r.id for r in read_unpaired(tmp_path, recursive=True)] == ["sub/z", "x", "y"]
    assert all(r.gt is None for r in read_unpaired(tmp_path))


def test_unpaired_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        read_unpaired(tmp_path / "empty")


# --- Real3000 ------------------------------------------------------------------------------------

def test_real3000_splits(tmp_path, caplog):
    for n in (1, 1704, 1705, 2004, 2005, 3000):
        _img(tmp_path / f"{n}.{'jpg' if n % 2 else 'png'}")
    _img(tmp_path / "readme.png")
    with caplog.at_level(logging.WARNING):
        train = read_real3000(tmp_path)
    assert "readme.png" in caplog.text
    assert [r.meta["index"] for r in train] == [1, 1704, 2005, 3000]
    test = read_real3000(tmp_path, split="test")
    assert [r.id for r in test] == ["1705", "2004"] and all(r.meta["split"] == "test" for r in test)
    assert len(read_real3000(tmp_path, split="all")) == 6
    with pytest.raises(ValueError, match="split"):
        read_real3000(tmp_path, split="val")


def test_real3000_empty_split(tmp_path):
    _img(tmp_path / "5.png")
    with pytest.raises(ValueError, match="'test'"):
        read_real3000(tmp_path, split="test")


# --- RTTS ----------------------------------------------------------------------------------------

def _voc(objects: str) -> str:
    return f"<annotation><filename>x.png</filename>{objects}</annotation>"


def _obj(name, box, difficult=0) -> str:
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def test_rtts(tmp_path, caplog):
    ann = tmp_path / "Annotations"
    ann.mkdir()
    for name in ("good.png", "empty.jpg", "noann.png", "badxml.png", "badnum.png", "truck.png", "nobox.png"):
        _img(tmp_path / "JPEGImages" / name)
    (ann / "good.xml").write_text(_voc(_obj("car", (1, 2, 30, 40)) + _obj("person", (5, 6, 7, 8), 1)))
    (ann / "empty.xml").write_text(_voc(""))
    (ann / "badxml.xml").write_text("<annotation><object><name>car</name>")
    (ann / "badnum.xml").write_text(_voc(_obj("bus", (1, "abc", 3, 4))))
    (ann / "truck.xml").write_text(_voc(_obj("truck", (0, 0, 5, 5))))
    (ann / "nobox.xml").write_text(_voc("<object><name>car</name></object>"))
    (ann / "orphan.xml").write_text(_voc(""))
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        records = {r.id: r for r in read_rtts(tmp_path, skip_log=skips)}
    assert len(records) == 7
    good = records["good"]
    np.testing.assert_array_equal(good.boxes, [[1, 2, 30, 40], [5, 6, 7, 8]])
    assert good.labels == ("car", "person") and good.meta["difficult"] == (False, True)
    assert records["empty"].boxes.shape == (0, 4) and records["empty"].meta["annotated"]
    for name in ("noann", "badxml", "badnum", "nobox"):
        assert records[name].boxes is None and not records[name].meta["annotated"]
    assert records["truck"].labels == ("truck",)
    assert {Path(p).name for p in skips.paths} == {"badxml.xml", "badnum.xml", "nobox.xml"}
    assert "malformed XML" in skips.paths[str(ann / "badxml.xml")]
    assert "'abc'" in skips.paths[str(ann / "badnum.xml")]
    assert "noann.png" in caplog.text and "truck (1)" in caplog.text and "orphan.xml" in caplog.text


def test_rtts_missing_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        read_rtts(tmp_path)


# --- ExDark --------------------------------------------------------------------------------------

@pytest.fixture
def exdark(tmp_path):
    def build(ann_dir="ExDark_Annno", image_dir="ExDark", list_at="imageclasslist.txt"):
        images = tmp_path / image_dir if image_dir else tmp_path
        ann = tmp_path / ann_dir
        files = {"Bicycle": ["2015_00001.png", "2015_00002.JPG", "2015_00003.png"],
                 "People": ["2015_00100.jpg", "2015_00101.png", "unlisted.png"]}
        for cls, names in files.items():
            for name in names:
                _img(images / cls / name)
        (ann / "Bicycle").mkdir(parents=True)
        (ann / "People").mkdir(parents=True)
        (ann / "Bicycle" / "2015_00001.png.txt").write_text(
            "% bbGt version=3\nBicycle 10 20 30 40 0 0 0 0 0 0 0\nPeople 1 2 3 4 0 0 0 0 0 0 0\n")
        (ann / "Bicycle" / "2015_00002.jpg.txt").write_text("% bbGt version=3\n")
        (ann / "People" / "2015_00100.jpg.txt").write_text("% bbGt version=3\nPeople 1 2 three 4\n")
        (ann / "People" / "2015_00101.png.txt").write_text("% bbGt version=3\nGhost 0 0 2 2 0\n")
        # 2015_00003.png has no box file
        (tmp_path / list_at).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / list_at).write_text(
            "Name Class Light In/Out Train/Val/Test\n"
            "2015_00001.png 1 2 1 1\n"
            "2015_00002.jpg 1 10 2 2\n"
            "2015_00003.png 1 1 2 3\n"
            "2015_00100.jpg 11 3 1 1\n"
            "2015_00101.png 11 3 1 3\n"
            "2015_09999.png 5 1 1 1\n"  # listed, missing on disk
            "broken row\n"
            "2015_00200.png 13 1 1 1\n"  # class out of range
        )
        return tmp_path
    return build


def test_exdark_all(exdark, caplog):
    root = exdark()
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        records = {r.id: r for r in read_exdark(root, split="all", skip_log=skips)}
    assert sorted(records) == ["Bicycle/2015_00001", "Bicycle/2015_00002", "Bicycle/2015_00003",
                               "People/2015_00100", "People/2015_00101"]
    first = records["Bicycle/2015_00001"]
    np.testing.assert_array_equal(first.boxes, [[10, 20, 40, 60], [1, 2, 4, 6]])  # l, t, l+w, t+h
    assert first.labels == ("Bicycle", "People")
    assert first.meta == {"class": "Bicycle", "light": "Ambient", "indoor": True, "split": "train",
                          "annotated": True}
    assert records["Bicycle/2015_00002"].boxes.shape == (0, 4)  # header only: no objects
    assert records["Bicycle/2015_00002"].lq.name == "2015_00002.JPG"  # case-insensitive match
    assert records["Bicycle/2015_00002"].meta["light"] == "Twilight"
    assert records["Bicycle/2015_00003"].boxes is None  # no box file
    bad = records["People/2015_00100"]
    assert bad.boxes is None and "line 2" in bad.meta["annotation_error"]
    assert len(skips) == 1 and "2015_00100.jpg.txt" in next(iter(skips.paths))
    assert records["People/2015_00101"].labels == ("Ghost",)
    text = caplog.text
    for expected in ("2 malformed row", "2015_09999.png", "unlisted.png", "Bicycle/2015_00003.png", "Ghost (1)"):
        assert expected in text


@pytest.mark.parametrize("split,ids", [
    ("train", ["Bicycle/2015_00001", "People/2015_00100"]),
    ("val", ["Bicycle/2015_00002"]),
    ("test", ["Bicycle/2015_00003", "People/2015_00101"]),
])
def test_exdark_splits(exdark, split, ids):
    assert [r.id for r in read_exdark(exdark(), split=split, skip_log=SkipLog())] == ids


@pytest.mark.parametrize("ann_dir,image_dir,list_at", [
    ("ExDark_Anno", "", "imageclasslist.txt"),
    ("Annotations", "ExDark", "Groundtruth/imageclasslist.txt"),
])
def test_exdark_alternative_layouts(exdark, ann_dir, image_dir, list_at):
    records = read_exdark(exdark(ann_dir, image_dir, list_at), split="train", skip_log=SkipLog())
    assert records[0].boxes.shape == (2, 4)


def test_exdark_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="imageclasslist"):
        read_exdark(tmp_path)
    (tmp_path / "imageclasslist.txt").write_text("Name Class Light In/Out Split\n")
    with pytest.raises(FileNotFoundError, match="class folder"):
        read_exdark(tmp_path)
    with pytest.raises(ValueError, match="split"):
        read_exdark(tmp_path, split="dev")


# --- RealSnow ------------------------------------------------------------------------------------

def test_realsnow(tmp_path):
    _img(tmp_path / "test" / "a.png")
    _img(tmp_path / "test" / "b.jpg")
    _img(tmp_path / "train" / "c.png")
    with pytest.raises(ValueError, match="test, train"):
        read_realsnow(tmp_path)
    assert [r.id for r in read_realsnow(tmp_path, split="test")] == ["test/a", "test/b"]
    assert [r.id for r in read_realsnow(tmp_path / "train")] == ["c"]
    with pytest.raises(FileNotFoundError, match="val"):
        read_realsnow(tmp_path, split="val")


# --- read_layout ---------------------------------------------------------------------------------

def test_read_layout_table(tmp_path):
    assert list_layouts() == sorted(LAYOUTS) == ["exdark", "paired", "real3000", "realsnow", "rtts", "unpaired"]
    for n in (1, 1800):
        _img(tmp_path / f"{n}.png")
    assert [r.id for r in read_layout("real3000", tmp_path, split="test")] == ["1800"]
    assert [r.id for r in read_layout("unpaired", str(tmp_path))] == ["1", "1800"]
    with pytest.raises(ValueError, match="known layouts: exdark, paired"):
        read_layout("voc", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_layout("paired", tmp_path / "missing")
    with pytest.raises(ValueError, match="does not take option"):
        read_layout("unpaired", tmp_path, split="test")
