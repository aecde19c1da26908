"""`python -m paligemma evaluate` on a data set of 50 synthetic scenes with known boxes and masks, answered by the
demo model: its AP figures equal pycocotools run directly on the same outputs, 4 devices give the same metrics
as one, bad lines are reported with their line numbers and skipped, a stop gives a partial report, and uploaded
zips are checked before they are unpacked."""

import contextlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import paligemma
from paligemma import evaluate as ev
from paligemma.__main__ import main as cli_main
from paligemma.eval_data import read_examples
from postprocess import MaskDecoder, objects, parse
from scenes.dataset import write_dataset
from scenes.tasks import TaskMix
from scenes.vqvae_train import load_vqvae

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
NUM_SCENES = 50
SEED = 20261202  # not a training seed of the demo model
MIX = TaskMix(caption=1, detect=1, segment=1, count=0, colour=0, yes_no=0)
BATCH = 8
METRICS = ("detection", "segmentation", "text", "calibration")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """50 scenes (caption, detect and segment lines), then a malformed line, a missing image and a text file."""
    folder = tmp_path_factory.mktemp("eval_scenes")
    write_dataset(folder, NUM_SCENES, SEED, load_vqvae(DEMO), MIX, valid_fraction=0.0)
    data = folder / "train.jsonl"
    good = len(data.read_text().splitlines())
    (folder / "notes.txt").write_text("not an image")
    with data.open("a") as f:
        f.write('{"image": "images/000000.png", "prefix": "detect circle"\n')
        f.write(json.dumps({"image": "images/gone.png", "prefix": "detect circle", "suffix": ""}) + "\n")
        f.write(json.dumps({"image": "notes.txt", "prefix": "detect circle", "suffix": ""}) + "\n")
    return {"path": data, "good": good, "bad_lines": [good + 1, good + 2, good + 3]}


@pytest.fixture(scope="module")
def report(dataset, tmp_path_factory):
    """One evaluation through the command line's entry point, its stdout read as JSON."""
    out = tmp_path_factory.mktemp("eval_out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(
            [
                "evaluate",
                "--model",
                str(DEMO),
                "--data",
                str(dataset["path"]),
                "--json",
                "--out",
                str(out),
                "--batch-size",
                str(BATCH),
            ]
        )
    assert code == 0
    report = json.loads(stdout.getvalue())
    print(json.dumps({k: report[k] for k in (*METRICS, "throughput", "skipped")}))  # the figures, with -s
    return {"json": report, "out": out}


def _direct_coco(predictions, tasks, masks):
    """AP figures from pycocotools on the report's outputs, built here without the evaluator's code."""
    decoder = MaskDecoder.load(DEMO / "vae-oid.npz") if masks else None
    rows = [p for p in predictions if p["prefix"].split()[0] in tasks]
    images, truth, results, names = [], [], [], {}
    for image_id, row in enumerate(rows):
        w, h = row["width"], row["height"]
        images.append({"id": image_id, "width": w, "height": h})
        for source, scores in ((row["suffix"], None), (row["output"], row["scores"])):
            pieces = parse(source, w, h)
            if decoder:
                pieces = decoder.attach_masks(pieces, w, h)
            for k, obj in enumerate(objects(pieces)):
                if decoder and obj.mask is None:
                    continue
                category = names.setdefault(obj.label, len(names) + 1)
                x1, y1, x2, y2 = obj.box
                item = {"image_id": image_id, "category_id": category}
                if decoder:
                    item["segmentation"] = coco_mask.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
                    item["area"] = float(coco_mask.area(item["segmentation"]))
                else:
                    item["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                    item["area"] = (x2 - x1) * (y2 - y1)
                if scores is None:
                    truth.append({**item, "id": len(truth) + 1, "iscrowd": 0, "bbox": [x1, y1, x2 - x1, y2 - y1]})
                else:
                    results.append({**item, "score": scores[k]})
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": truth,
        "categories": [{"id": i, "name": n} for n, i in names.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        run = COCOeval(gt, gt.loadRes(results), "segm" if masks else "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return run.stats


@pytest.mark.slow  # the demo model answers 150 prompts (once for the module)
def test_box_ap_equals_pycocotools_on_the_same_outputs(report):
    figures = report["json"]["detection"]
    stats = _direct_coco(report["json"]["predictions"], ("detect", "segment"), masks=False)
    assert figures["ap50"] == pytest.approx(stats[1], abs=1e-6)
    assert figures["ap"] == pytest.approx(stats[0], abs=1e-6)
    assert figures["ap75"] == pytest.approx(stats[2], abs=1e-6)
    assert figures["recall"] == pytest.approx(stats[8], abs=1e-6)
    assert 0.5 < figures["ap50"] <= 1.0, "the demo model finds most boxes of unseen scenes"


@pytest.mark.slow
def test_mask_ap_equals_pycocotools_on_the_same_outputs(report):
    figures = report["json"]["segmentation"]
    stats = _direct_coco(report["json"]["predictions"], ("segment",), masks=True)
    assert figures["ap50"] == pytest.approx(stats[1], abs=1e-6)
    assert figures["ap"] == pytest.approx(stats[0], abs=1e-6)
    assert figures["lines"] == sum(p["prefix"].startswith("segment") for p in report["json"]["predictions"])


@pytest.mark.slow
def test_text_per_label_calibration_and_throughput(report, dataset):
    data = report["json"]
    assert data["evaluated"] == data["examples"] == dataset["good"] and not data["stopped"]
    assert set(data["text"]["per_task"]) == {"caption"} and data["text"]["lines"] == NUM_SCENES
    assert data["text"]["exact_match"] >= 0.8
    labels = data["detection"]["per_label"]
    assert sum(v["truth"] for v in labels.values()) == data["detection"]["truth"] > NUM_SCENES / 2
    bins = data["calibration"]
    assert len(bins) == ev.CALIBRATION_BINS and sum(b["boxes"] for b in bins) == data["detection"]["predicted"]
    assert data["throughput"]["images_per_s"] > 0 and data["throughput"]["batch_size"] == BATCH


@pytest.mark.slow
def test_bad_lines_are_reported_with_their_numbers_and_skipped(report, dataset):
    skipped = report["json"]["skipped"]
    assert [s["line"] for s in skipped] == dataset["bad_lines"]
    malformed, missing, not_image = (s["reason"] for s in skipped)
    assert "JSON object with image, prefix and suffix" in malformed
    assert "not found" in missing and "gone.png" in missing
    assert "not a" in not_image and "image" in not_image


@pytest.mark.slow
def test_out_writes_the_json_and_the_page(report):
    written = json.loads((report["out"] / "report.json").read_text())
    assert {k: written[k] for k in METRICS} == {k: report["json"][k] for k in METRICS}
    page = (report["out"] / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(report["json"]["worst"]) > 0


@pytest.mark.slow
def test_four_devices_give_the_same_metrics(report, dataset):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "paligemma",
            "evaluate",
            "--model",
            str(DEMO),
            "--data",
            str(dataset["path"]),
            "--json",
            "--batch-size",
            str(BATCH),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    four = json.loads(out.stdout)
    assert four["throughput"]["data_parallel"] == 4
    assert "img" in out.stderr, "the progress bar goes to stderr"
    assert [p["output"] for p in four["predictions"]] == [p["output"] for p in report["json"]["predictions"]]
    assert {k: four[k] for k in METRICS} == {k: report["json"][k] for k in METRICS}


@pytest.fixture(scope="module")
def demo():
    paligemma.enable_compile_cache()
    return paligemma.load(str(DEMO))


@pytest.mark.slow
def test_stop_ends_with_a_partial_report(demo, dataset):
    calls = []
    report = ev.evaluate(
        demo,
        dataset["path"],
        batch_size=BATCH,
        limit=3 * BATCH,
        progress=lambda done, total: calls.append((done, total)),
        stop=lambda: len(calls) >= 1,
    )
    assert report.stopped and len(report.lines) == BATCH and report.total == 3 * BATCH
    assert calls == [(BATCH, 3 * BATCH)]
    assert report.as_dict()["stopped"] is True


@pytest.mark.slow
def test_zip_upload_is_evaluated(demo, dataset, tmp_path):
    folder = dataset["path"].parent
    lines = dataset["path"].read_text().splitlines()[:BATCH]
    upload = tmp_path / "upload.zip"
    with zipfile.ZipFile(upload, "w") as z:
        z.writestr("set/data.jsonl", "\n".join(lines) + "\n")
        for name in sorted({json.loads(line)["image"] for line in lines}):
            z.write(folder / name, f"set/{name}")
    report = ev.evaluate_zip(demo, upload, batch_size=BATCH)
    assert len(report.lines) == BATCH and not report.problems and report.data == "upload.zip:set/data.jsonl"


def _zip(path, files: dict):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


def _png(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "gray").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "files, match",
    [
        ({"../evil.jsonl": "{}"}, "unsafe path"),
        ({"/abs.jsonl": "{}"}, "unsafe path"),
        ({"a.png": _png(), "b.png": _png(), "data.jsonl": "{}"}, "2 images; at most 1 are accepted"),
        ({"a.png": _png()}, "no data file"),
    ],
)
def test_unsafe_or_oversized_zips_are_refused_before_any_model_work(tmp_path, files, match):
    with pytest.raises(ValueError, match=match):
        ev.evaluate_zip(None, _zip(tmp_path / "up.zip", files), max_images=1)


def test_zip_size_bounds_and_a_file_that_is_no_zip(tmp_path):
    upload = _zip(tmp_path / "up.zip", {"data.jsonl": "x" * 5000})
    with pytest.raises(ValueError, match="MiB are accepted"):
        ev.evaluate_zip(None, upload, max_bytes=10)
    with pytest.raises(ValueError, match="unpacks to"):
        ev.evaluate_zip(None, upload, max_unpacked_bytes=100)
    (tmp_path / "not.zip").write_text("hello")
    with pytest.raises(ValueError, match="not a readable zip"):
        ev.evaluate_zip(None, tmp_path / "not.zip")


def test_coco_file_gives_one_detect_prompt_per_category_present(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((200, 100)))
    (tmp_path / "b.png").write_bytes(_png())
    coco = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 200, "height": 100},
            {"id": 8, "file_name": "b.png", "width": 40, "height": 30},
            {"id": 9, "file_name": "gone.png", "width": 40, "height": 30},
            {"id": 10, "file_name": "a.png"},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"image_id": 7, "category_id": 1, "bbox": [10, 20, 50, 40]},
            {"image_id": 7, "category_id": 1, "bbox": [100, 0, 100, 100]},
            {"image_id": 7, "category_id": 2, "bbox": [0, 0, 20, 20], "iscrowd": 1},
            {"image_id": 8, "category_id": 2, "bbox": [0, 0, 20, 20]},
            {"image_id": 9, "category_id": 2, "bbox": [0, 0, 20, 20]},
            {"image_id": 10, "category_id": 2, "bbox": [0, 0, 20, 20]},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    examples, problems = read_examples(tmp_path / "coco.json")
    assert [(e.line, e.prefix) for e in examples] == [(1, "detect cat"), (2, "detect dog")]
    boxes = [o.box for o in objects(parse(examples[0].suffix, 200, 100))]
    assert boxes == [(10, 20, 60, 60), (100, 0, 200, 100)] and examples[0].image == str(tmp_path / "a.png")
    assert [(p.line, "not found" in p.reason or "malformed" in p.reason) for p in problems] == [(3, True), (4, True)]


def test_jsonl_problems_and_confined_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png())
    lines = [
        json.dumps({"image": "../a.png", "prefix": "caption en", "suffix": "x"}),
        "[1, 2]",
        json.dumps({"image": "../a.png", "prefix": 3, "suffix": "x"}),
        "",
    ]
    (tmp_path / "sub" / "data.jsonl").write_text("\n".join(lines))
    examples, problems = read_examples(tmp_path / "sub" / "data.jsonl")
    assert [e.line for e in examples] == [1] and [p.line for p in problems] == [2, 3]
    examples, problems = read_examples(tmp_path / "sub" / "data.jsonl", confined=True)
    assert not examples and problems[0].line == 1
    assert problems[0].reason == "image path leads out of the data set's folder: ../a.png"  # as the line wrote it
