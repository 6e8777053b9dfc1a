"""COCO mAP through torchmetrics, class maps, detector building and running (CPU, no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from qualiteacher.data.layouts.exdark import EXDARK_CLASSES
from qualiteacher.data.layouts.rtts import RTTS_CLASSES
from qualiteacher.data.records import ImageRecord
from qualiteacher.eval.coco_map import MapResult, detection_map
from qualiteacher.eval.detection import Detections, GroundTruth, collect_ground_truths, ground_truths_from_records
from qualiteacher.eval.detector import (
    DEFAULT_CLASS_MAPS,
    MissingDetectorWeightsError,
    build_detector,
    coco_category_names,
    list_detectors,
    load_class_map,
    run_detector,
)

SMALL_DETECTOR = "ssdlite320_mobilenet_v3_large"  # 3.4 M parameters, builds in a fraction of a second


def det(boxes: list[list[float]], scores: list[float], labels: list[str]) -> Detections:
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float64), labels)


def gt(boxes: list[list[float]], labels: list[str], difficult: list[bool] | None = None) -> GroundTruth:
    return GroundTruth(np.asarray(boxes, np.float32).reshape(-1, 4), labels, difficult)


# ---- detection_map --------------------------------------------------------------------------------

def test_perfect_predictions_give_one() -> None:
    truths = {
        "a": gt([[10, 10, 50, 60], [60, 5, 90, 40]], ["car", "person"]),
        "b": gt([[0, 0, 30, 30]], ["bus"]),
        "c": gt([[5, 5, 25, 45], [30, 30, 70, 70], [1, 2, 3, 4]], ["person", "person", "car"]),
    }
    dets = {k: det(v.boxes.tolist(), [0.9] * len(v.labels), list(v.labels)) for k, v in truths.items()}
    dets["a"] = det(dets["a"].boxes.tolist() + [[0, 0, 9, 9]], [0.9, 0.9, 0.95], ["car", "person", "bicycle"])
    r = detection_map(dets, truths, RTTS_CLASSES)  # "bicycle" has no ground truth: NaN, outside the mean
    assert isinstance(r, MapResult)
    assert r.map_50 == pytest.approx(1.0) and r.map == pytest.approx(1.0) and r.map_75 == pytest.approx(1.0)
    for name in ("bus", "car", "person"):
        assert r.per_class[name] == pytest.approx(1.0) and r.per_class_50[name] == pytest.approx(1.0)
    assert math.isnan(r.per_class["bicycle"]) and math.isnan(r.per_class_50["motorbike"])
    assert r.num_gt == {"bicycle": 0, "bus": 1, "car": 2, "motorbike": 0, "person": 3}
    assert (r.num_images, r.images_without_gt, r.dropped_detections) == (3, 0, 0)


def test_partial_case_matches_hand_computed_101_point_ap() -> None:
    # one class, one box in each of two images; ranked detections: TP (0.9), then FP (0.8, on no box).
    # precision/recall after each: (1, 0.5), (0.5, 0.5). COCO interpolates precision at recall points
    # 0, 0.01, ..., 1 as the best precision at recall >= point: 1 for the 51 points <= 0.5, 0 for the
    # 50 points above (recall never exceeds 0.5). The TP box is exact, so every IoU threshold agrees.
    expected = 51 / 101
    truths = {"a": gt([[10, 10, 50, 50]], ["car"]), "b": gt([[20, 20, 60, 60]], ["car"])}
    dets = {"a": det([[10, 10, 50, 50]], [0.9], ["car"]), "b": det([[100, 100, 120, 120]], [0.8], ["car"])}
    r = detection_map(dets, truths, ["car"])
    assert r.map_50 == pytest.approx(expected) and r.map == pytest.approx(expected)
    assert r.per_class_50["car"] == pytest.approx(expected)


def test_per_class_ap_at_50_and_over_thresholds() -> None:
    # "car" as in the partial case (51/101 at every IoU); "bus": one box found with IoU 0.72, a TP at the
    # thresholds 0.50 ... 0.70 (5 of 10) only, so AP@0.5 = 1, AP@[.5:.95] = 0.5, AP@0.75 = 0.
    truths = {"a": gt([[10, 10, 50, 50], [0, 0, 10, 10]], ["car", "bus"]), "b": gt([[20, 20, 60, 60]], ["car"])}
    dets = {"a": det([[10, 10, 50, 50], [0, 0, 10, 7.2]], [0.9, 0.7], ["car", "bus"]),
            "b": det([[100, 100, 120, 120]], [0.8], ["car"])}
    r = detection_map(dets, truths, ["bus", "car"])
    assert r.per_class_50 == pytest.approx({"bus": 1.0, "car": 51 / 101})
    assert r.per_class == pytest.approx({"bus": 0.5, "car": 51 / 101})
    assert r.map_50 == pytest.approx((1.0 + 51 / 101) / 2)
    assert r.map == pytest.approx((0.5 + 51 / 101) / 2)
    assert r.map_75 == pytest.approx((0.0 + 51 / 101) / 2)


def test_unannotated_and_empty_images() -> None:
    records = [
        ImageRecord("a", Path("a.png"), boxes=np.array([[0, 0, 20, 20]], np.float32), labels=("person",)),
        ImageRecord("empty", Path("empty.png"), boxes=np.zeros((0, 4), np.float32)),
        ImageRecord("unannotated", Path("unannotated.png")),
    ]
    truths, unannotated = collect_ground_truths(records)
    assert set(truths) == {"a", "empty"} and unannotated == ("unannotated",)
    assert truths.keys() == ground_truths_from_records(records).keys()
    dets = {
        "a": det([[0, 0, 20, 20]], [0.8], ["person"]),
        "empty": det([[5, 5, 15, 15]], [0.9], ["person"]),  # a false positive ranked first
        "unannotated": det([[0, 0, 9, 9]], [0.95], ["person"]),  # objects unknown: left out
    }
    r = detection_map(dets, truths, RTTS_CLASSES)
    # ranked: FP (0.9) then TP (0.8): recall reaches 1 at precision 1/2, so AP = 0.5 at every point
    assert r.map_50 == pytest.approx(0.5) and r.map == pytest.approx(0.5)
    assert (r.num_images, r.images_without_gt) == (2, 1)
    # without the empty image the TP alone gives 1; counting the unannotated one would give 1/3
    assert detection_map(dets, {"a": truths["a"]}, RTTS_CLASSES).map_50 == pytest.approx(1.0)


def test_image_without_detections_counts_as_missed() -> None:
    truths = {"a": gt([[0, 0, 20, 20]], ["car"]), "b": gt([[0, 0, 20, 20]], ["car"])}
    r = detection_map({"a": det([[0, 0, 20, 20]], [0.9], ["car"])}, truths, ["car"])
    assert r.map_50 == pytest.approx(51 / 101)  # recall 0.5 at precision 1
    assert detection_map({}, truths, ["car"]).map_50 == 0.0


def test_difficult_boxes_are_ignored() -> None:
    truths = {"a": gt([[0, 0, 20, 20], [40, 40, 80, 80]], ["car", "car"], [False, True])}
    dets = {"a": det([[0, 0, 20, 20], [40, 40, 80, 80]], [0.8, 0.9], ["car", "car"])}
    r = detection_map(dets, truths, ["car"])
    assert r.map_50 == pytest.approx(1.0) and r.num_gt == {"car": 1}
    # the same through an RTTS-style record: meta["difficult"] travels with ground_truths_from_records
    record = ImageRecord("a", Path("a.png"), boxes=truths["a"].boxes, labels=("car", "car"),
                         meta={"annotated": True, "difficult": (False, True)})
    assert detection_map(dets, ground_truths_from_records([record]), ["car"]).map_50 == pytest.approx(1.0)
    # a missed difficult box costs no recall; the same box not flagged does (recall 0.5 at precision 1)
    missed = {"a": det([[0, 0, 20, 20]], [0.8], ["car"])}
    assert detection_map(missed, truths, ["car"]).map_50 == pytest.approx(1.0)
    unflagged = {"a": gt(truths["a"].boxes.tolist(), ["car", "car"])}
    assert detection_map(missed, unflagged, ["car"]).map_50 == pytest.approx(51 / 101)


def test_labels_outside_classes_are_dropped() -> None:
    truths = {"a": gt([[0, 0, 20, 20], [30, 30, 50, 50]], ["car", "tram"])}
    dets = {"a": det([[0, 0, 20, 20], [30, 30, 50, 50]], [0.9, 0.95], ["car", "tram"])}
    r = detection_map(dets, truths, RTTS_CLASSES)
    assert r.map_50 == pytest.approx(1.0) and r.dropped_detections == 1


def test_no_ground_truth_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no annotated image"):
        detection_map({}, {}, RTTS_CLASSES)
    with pytest.raises(ValueError, match="no ground-truth box"):
        detection_map({}, {"a": gt([], [])}, RTTS_CLASSES)
    with pytest.raises(ValueError, match="no ground-truth box"):  # only difficult boxes
        detection_map({}, {"a": gt([[0, 0, 5, 5]], ["car"], [True])}, RTTS_CLASSES)
    with pytest.raises(ValueError, match="unique"):
        detection_map({}, {"a": gt([[0, 0, 5, 5]], ["car"])}, ["car", "car"])


# ---- class maps -----------------------------------------------------------------------------------

def test_coco_names_come_from_torchvision() -> None:
    names = coco_category_names()
    assert names == torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    assert names[0] == "__background__" and "motorcycle" in names and "dining table" in names


@pytest.mark.parametrize("dataset, classes", [("rtts", RTTS_CLASSES), ("exdark", EXDARK_CLASSES)])
def test_default_class_maps_cover_the_data_sets(dataset: str, classes: tuple[str, ...]) -> None:
    mapping = load_class_map(None, dataset)
    assert mapping == DEFAULT_CLASS_MAPS[dataset]
    assert sorted(mapping.values()) == sorted(classes)
    assert set(mapping) <= set(coco_category_names())


def test_class_map_specs(tmp_path: Path) -> None:
    expected = {"motorcycle": "motorbike", "person": "person"}
    assert load_class_map("motorcycle=motorbike, person=person", "rtts") == expected
    (tmp_path / "map.yaml").write_text("motorcycle: motorbike\nperson: person\n")
    assert load_class_map(tmp_path / "map.yaml", "rtts") == expected
    (tmp_path / "map.json").write_text(json.dumps(expected))
    assert load_class_map(str(tmp_path / "map.json"), "rtts") == expected
    motorcycle = coco_category_names().index("motorcycle")
    assert load_class_map({motorcycle: "motorbike"}, "rtts") == {"motorcycle": "motorbike"}
    assert load_class_map({"zebra": "stripes"}) == {"zebra": "stripes"}  # no data set: values unchecked


def test_class_map_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'motorcycle'"):
        load_class_map({"motorcylce": "motorbike"}, "rtts")
    with pytest.raises(ValueError, match="not classes of rtts"):
        load_class_map({"motorcycle": "Motorbike"}, "rtts")
    with pytest.raises(ValueError, match="no default class map"):
        load_class_map(None, "coco")
    with pytest.raises(ValueError, match="give a class map"):
        load_class_map(None, None)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_class_map(tmp_path / "missing.yaml", "rtts")
    with pytest.raises(ValueError, match="expected a YAML/JSON file"):
        load_class_map("motorcycle", "rtts")
    with pytest.raises(ValueError, match="no detector class"):
        load_class_map({0: "person"}, "rtts")  # background


# ---- running detectors ----------------------------------------------------------------------------

def fake_detector(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Motorcycle, person and airplane (COCO ids) at fixed boxes, for every image."""
    names = coco_category_names()
    labels = torch.tensor([names.index("motorcycle"), names.index("person"), names.index("airplane")])
    return [{"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]]),
             "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": labels} for _ in images]


def test_run_detector_maps_coco_ids_to_data_set_names() -> None:
    items = [(f"im{i}", torch.rand(3, 32, 24 + i)) for i in range(5)]
    dets = run_detector(fake_detector, items, load_class_map(None, "rtts"), batch_size=2)
    assert list(dets) == [f"im{i}" for i in range(5)]
    d = dets["im3"]
    assert d.labels == ["motorbike", "person"]  # airplane has no RTTS class: dropped
    assert d.boxes.shape == (2, 4) and d.scores.tolist() == pytest.approx([0.9, 0.8])
    exdark = run_detector(fake_detector, items[:1], load_class_map(None, "exdark"))
    assert exdark["im0"].labels == ["Motorbike", "People"]
    # end to end: the fake boxes as ground truth give a perfect score
    truths = {k: gt([[0, 0, 10, 10], [5, 5, 20, 20]], ["motorbike", "person"]) for k in dets}
    assert detection_map(dets, truths, RTTS_CLASSES).map == pytest.approx(1.0)


def test_run_detector_with_name_labels() -> None:
    def named(images: list[torch.Tensor]) -> list[dict]:
        return [{"boxes": torch.zeros(3, 4), "scores": torch.ones(3), "labels": ["motorcycle", "car", "zebra"]}
                for _ in images]

    dets = run_detector(named, [("a", torch.rand(3, 8, 8))], {"motorcycle": "motorbike", "car": "car"})
    assert dets["a"].labels == ["motorbike", "car"]
    kept = run_detector(named, [("a", torch.rand(3, 8, 8))], {"motorcycle": "motorbike"})
    assert kept["a"].labels == ["motorbike"]  # "car" is no data-set name here, "zebra" neither


def test_run_detector_errors() -> None:
    rtts = load_class_map(None, "rtts")
    with pytest.raises(ValueError, match="empty split"):
        run_detector(fake_detector, [], rtts)
    with pytest.raises(ValueError, match="occurs twice"):
        run_detector(fake_detector, [("a", torch.rand(3, 8, 8))] * 2, rtts)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        run_detector(fake_detector, [("a", torch.rand(1, 3, 8, 8))], rtts)
    with pytest.raises(ValueError, match="one dict per image"):
        run_detector(lambda images: [], [("a", torch.rand(3, 8, 8))], rtts)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.get_model(SMALL_DETECTOR, weights=None, weights_backbone=None)
    path = tmp_path_factory.mktemp("detector") / "ssdlite.pth"
    torch.save(model.state_dict(), path)
    return path


def test_build_torchvision_detector_from_local_weights(small_weights: Path, tmp_path: Path) -> None:
    assert SMALL_DETECTOR in list_detectors()
    detector = build_detector(SMALL_DETECTOR, small_weights)
    assert not detector.training and not any(p.requires_grad for p in detector.parameters())
    items = [("x", torch.rand(3, 64, 64)), ("y", torch.rand(3, 64, 64))]
    dets = run_detector(detector, items, load_class_map(None, "rtts"), batch_size=2)
    assert set(dets) == {"x", "y"}
    for d in dets.values():
        assert d.boxes.shape == (len(d.labels), 4) and d.scores.shape == (len(d.labels),)
        assert set(d.labels) <= set(RTTS_CLASSES)
    # a training checkpoint with the state dict under "model" loads too
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"model": torch.load(small_weights, weights_only=True), "epoch": 3}, wrapped)
    build_detector(SMALL_DETECTOR, wrapped)


def test_detector_weight_errors(small_weights: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ssdlite.pth"
    with pytest.raises(MissingDetectorWeightsError) as info:
        build_detector(SMALL_DETECTOR, missing)
    message = str(info.value)
    assert str(missing) in message and "downloads nothing" in message and "https://" in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingDetectorWeightsError, match="no weight file given"):
        build_detector(SMALL_DETECTOR)
    state = torch.load(small_weights, weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="do not fit"):
        build_detector(SMALL_DETECTOR, tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load weights"):
        build_detector(SMALL_DETECTOR, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="ssdlite320_mobilenet_v3_large"):
        build_detector("ssdlite_tiny", small_weights)
    with pytest.raises(ValueError, match="either"):
        build_detector()


DETECTOR_MODULE = '''
import torch

class Detector:
    def __call__(self, images):
        return [{"boxes": torch.tensor([[0.0, 0, 4, 4]]), "scores": torch.tensor([0.5]),
                 "labels": torch.tensor([4])} for _ in images]

detector = Detector()
not_callable = 3
'''


def test_build_detector_from_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_detector.py").write_text(DETECTOR_MODULE)
    image = [("a", torch.rand(3, 8, 8))]
    rtts = load_class_map(None, "rtts")
    from_file = build_detector(target=f"{tmp_path / 'my_detector.py'}:detector")
    assert run_detector(from_file, image, rtts)["a"].labels == ["motorbike"]
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = build_detector(target="my_detector:detector")
    assert run_detector(from_module, image, rtts)["a"].labels == ["motorbike"]
    with pytest.raises(TypeError, match="a class"):
        build_detector(target="my_detector:Detector")
    with pytest.raises(TypeError, match="int"):
        build_detector(target="my_detector:not_callable")
    with pytest.raises(ValueError, match="no 'missing'"):
        build_detector(target="my_detector:missing")
    with pytest.raises(ImportError, match="no_such_module"):
        build_detector(target="no_such_module:detector")
    with pytest.raises(FileNotFoundError, match="absent.py"):
        build_detector(target=f"{tmp_path / 'absent.py'}:detector")
    with pytest.raises(ValueError, match="expected"):
        build_detector(target="my_detector")
    with pytest.raises(ValueError, match="weights go with"):
        build_detector(target="my_detector:detector", weights=tmp_path / "w.pth")
