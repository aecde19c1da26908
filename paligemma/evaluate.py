"""Whole-dataset evaluation: run a model over a JSONL or COCO data set and score PaliGemma's own outputs.

    report = evaluate(model, "data/valid.jsonl")        # a Report; report.as_dict() is the JSON
    python -m paligemma evaluate --model SRC --data PATH [--images DIR] [--json] [--out DIR] [--batch-size N]

What is measured (see eval_data for the formats and how COCO files become prompts):
- Located lines (prompt `detect`/`segment`, or a ground truth holding boxes): the boxes of the expected suffix
  and of the output are read with `postprocess.parse` (loc bins -> pixels as everywhere in the app), each line is
  one COCO image, labels are the categories, and pycocotools' COCOeval (bbox) gives AP (IoU .50:.95), AP50, AP75
  and recall (AR@100), also per label. Predictions are ranked by the per-object confidence of
  `postprocess.confidence` (box × label probability from the generated tokens' scores).
- Segment lines (prompt `segment` or a ground truth with seg tokens): when the model has a mask decoder, the
  seg tokens of both sides go through the same `postprocess.MaskDecoder`, and COCOeval (segm, RLE masks) gives
  mask AP, AP50, AP75 and recall.
- Other lines are text: exact match of output and suffix (surrounding spaces ignored), overall and per task
  (the prompt's first word: caption, answer, ocr, ...).
- Calibration: located boxes in bins of confidence, with the share that is correct (same label, IoU >= 0.5,
  matched one to one, most confident first).
- Throughput: images/s, one image+prompt line counting as one image, over the generation steps (compilation
  included; images_per_s_warm leaves out the steps that compiled).
- The worst located lines (false boxes + misses, then lowest IoU) drawn for a person to look at (eval_report).

Data parallelism: the model is copied to every group of `model_parallel` devices (a data × model grid of the
local devices; each group's copy is split over its devices as sharding.py splits a model) and each copy runs a
consecutive slice of every global batch in its own thread. Every copy sees exactly the batches one device would,
padded to the same shape, so greedy outputs, and thus the metrics, do not depend on the number of devices.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable

import jax
import numpy as np
from flax import traverse_util
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from postprocess import MaskDecoder, Object, compare, mask_to_rle, objects, parse
from postprocess.confidence import object_confidences
from postprocess.ground_truth import MATCH_IOU

from . import sharding
from .eval_data import Example, Problem, read_examples
from .eval_report import draw_review
from .generate import BATCH_BUCKETS, MAX_BATCH, MAX_NEW_TOKENS
from .preprocess import open_image, to_rgb

CALIBRATION_BINS = 10
WORST_SHOWN = 12
CPU_BATCH = 16  # rows per device on a CPU: the best of 1, 4, 8, 16 in bench/evaluate.py (demo model, 2 cores)
LOCATED_TASKS = ("detect", "segment")
# evaluate_zip's default bounds, like the app's other uploads
MAX_ZIP_BYTES = 200 * 2**20
MAX_UNPACKED_BYTES = 1 * 2**30
MAX_ZIP_IMAGES = 2000
ZIP_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


@dataclasses.dataclass
class Line:
    """One evaluated example: its output, objects on both sides (masks as COCO RLE) and the outputs' scores."""

    example: Example
    width: int
    height: int
    output: str
    truth: list[Object]
    predicted: list[Object]
    scores: list[float]
    truth_masks: list[dict | None]
    predicted_masks: list[dict | None]

    @property
    def located(self) -> bool:
        return self.example.task in LOCATED_TASKS or bool(self.truth)

    @property
    def segmented(self) -> bool:
        return self.example.task == "segment" or any(obj.seg_codes is not None for obj in self.truth)

    def as_dict(self) -> dict:
        return {
            "line": self.example.line,
            "image": self.example.image,
            "prefix": self.example.prefix,
            "suffix": self.example.suffix,
            "output": self.output,
            "width": self.width,
            "height": self.height,
            "scores": [round(s, 6) for s in self.scores],
        }


@dataclasses.dataclass
class Review:
    """A located line worth a look: its matching against the truth, and a picture of it (eval_report draws)."""

    line: Line
    predicted_iou: list[float | None]  # per predicted object: IoU with its match, None for a false box
    truth_found: list[bool]  # per true object
    picture: Image.Image | None = None

    @property
    def false_boxes(self) -> int:
        return sum(iou is None for iou in self.predicted_iou)

    @property
    def misses(self) -> int:
        return self.truth_found.count(False)

    @property
    def lowest_iou(self) -> float | None:
        found = [iou for iou in self.predicted_iou if iou is not None]
        return min(found) if found else None

    def badness(self) -> tuple[int, float]:
        lowest = self.lowest_iou
        return self.false_boxes + self.misses, 1.0 - (1.0 if lowest is None else lowest)

    def as_dict(self) -> dict:
        lowest = self.lowest_iou
        return {
            "line": self.line.example.line,
            "image": self.line.example.image,
            "prefix": self.line.example.prefix,
            "false_boxes": self.false_boxes,
            "misses": self.misses,
            "lowest_iou": None if lowest is None else round(lowest, 4),
        }


@dataclasses.dataclass
class Report:
    """The figures of one run. `metrics` (detection, segmentation, text, calibration) depend only on the outputs;
    `throughput` on the machine. `worst` holds the reviews that the HTML report draws."""

    data: str
    model: str
    lines: list[Line]
    problems: list[Problem]
    metrics: dict
    throughput: dict
    stopped: bool
    total: int  # examples that could be evaluated; len(lines) < total when stopped
    worst: list[Review]

    def as_dict(self, with_lines: bool = True) -> dict:
        out = {
            "data": self.data,
            "model": self.model,
            "stopped": self.stopped,
            "examples": self.total,
            "evaluated": len(self.lines),
            "skipped": [p.as_dict() for p in self.problems],
            **self.metrics,
            "throughput": self.throughput,
            "worst": [r.as_dict() for r in self.worst],
        }
        if with_lines:
            out["predictions"] = [line.as_dict() for line in self.lines]
        return out


def evaluate(
    model,
    data_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    batch_size: int | None = None,
    devices=None,
    model_parallel: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | object | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    confined: bool = False,
) -> Report:
    """Runs `model` (a paligemma.Model) greedily over a data set and scores it (see the module doc).

    batch_size: rows per device group per step (default: default_batch_size). devices/model_parallel: the local
    devices to use (default all of the model's platform; or a 2-D [data, model] grid or Mesh) and how many of them
    hold one copy of the model (default: as many as it is split over now); see `replicas`. progress(done, total)
    is called after every step; stop (a callable or anything with is_set(), like threading.Event) ends the run
    before the next step, and the report of the lines done so far says stopped. limit: only the first `limit`
    examples. max_new_tokens: default the longest expected suffix + 16 tokens. confined: only images inside the
    data's folder (for uploads). Bad entries of the data set are skipped and listed in report.problems.
    """
    examples, problems = read_examples(data_path, image_root, confined)
    examples, problems = _with_valid_prompts(model, examples, problems)
    if limit is not None:
        examples = examples[: max(0, limit)]
    if not examples:
        listed = "; ".join(f"line {p.line}: {p.reason}" for p in problems[:5])
        raise ValueError(f"{data_path} holds no example that can be evaluated" + (f" ({listed})" if listed else ""))
    copies = replicas(model, devices, model_parallel)
    batch_size = batch_size or default_batch_size(model)
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH}, got {batch_size}")
    if max_new_tokens is None:
        longest = max(len(model.tokenizer.encode(e.suffix)) for e in examples)
        max_new_tokens = min(longest + 16, MAX_NEW_TOKENS)
    decoder = MaskDecoder.load(model.mask_decoder_path) if model.mask_decoder_path else None
    runner = _Runner(copies, batch_size, max_new_tokens)
    lines, stopped = [], False
    for step in range(0, len(examples), runner.rows_per_step):
        if _should_stop(stop):
            stopped = True
            break
        chunk = examples[step : step + runner.rows_per_step]
        lines += [_score_line(ex, *out, model.tokenizer, decoder) for ex, out in zip(chunk, runner.run(chunk))]
        if progress is not None:
            progress(len(lines), len(examples))
    metrics = score(lines)
    worst = worst_lines(lines)
    for review in worst:  # drawn now: the images of an uploaded zip are gone once evaluate_zip returns
        review.picture = draw_review(review)
    return Report(
        os.fspath(data_path),
        model.source,
        lines,
        problems,
        metrics,
        runner.throughput(len(lines), batch_size, model_parallel or _split_over(model)),
        stopped,
        len(examples),
        worst,
    )


def evaluate_zip(
    model,
    zip_path: str | os.PathLike,
    max_bytes: int = MAX_ZIP_BYTES,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    max_images: int = MAX_ZIP_IMAGES,
    **evaluate_args,
) -> Report:
    """Evaluates an uploaded zip holding one data file (a .jsonl, else a COCO .json; the shallowest one) and its
    images, paths relative to the data file as usual. The zip is checked before anything is unpacked: its size,
    the unpacked size, the image count, and that no name is absolute, climbs out with '..' or is a link; images
    are then opened like every upload (open_image), unreadable ones and those outside the zip's folder skipped with
    their line. evaluate_args go to
    `evaluate` (batch_size, progress, stop, limit, ...). Raises ValueError for a zip that is not accepted."""
    zip_path = os.fspath(zip_path)
    if os.path.getsize(zip_path) > max_bytes:
        raise ValueError(
            f"the zip is {os.path.getsize(zip_path) / 2**20:.1f} MiB; at most {max_bytes / 2**20:.0f} MiB are accepted"
        )
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"the upload is not a readable zip file ({err})") from None
    with archive, tempfile.TemporaryDirectory(prefix="paligemma-eval-") as folder:
        members = [m for m in archive.infolist() if not m.is_dir()]
        _check_members(members, max_unpacked_bytes, max_images)
        data_file = _data_file(members)
        for member in members:  # zipfile reads no more than a member's declared size, checked above
            target = os.path.join(folder, *member.filename.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        report = evaluate(
            model, os.path.join(folder, *data_file.split("/")), image_root=None, confined=True, **evaluate_args
        )
    report.data = os.path.basename(zip_path) + ":" + data_file
    return report


def _check_members(members: list[zipfile.ZipInfo], max_unpacked_bytes: int, max_images: int) -> None:
    for member in members:
        name = member.filename
        parts = name.split("/")
        if name.startswith(("/", "\\")) or ":" in name or "\\" in name or ".." in parts:
            raise ValueError(f"the zip holds an unsafe path {name!r}: names must be relative, without '..'")
        if (member.external_attr >> 16) & 0o170000 == 0o120000:
            raise ValueError(f"the zip holds a link ({name}); links are not accepted")
    unpacked = sum(m.file_size for m in members)
    if unpacked > max_unpacked_bytes:
        raise ValueError(
            f"the zip unpacks to {unpacked / 2**20:.0f} MiB; at most {max_unpacked_bytes / 2**20:.0f} MiB are accepted"
        )
    images = sum(m.filename.lower().endswith(ZIP_IMAGE_SUFFIXES) for m in members)
    if images > max_images:
        raise ValueError(f"the zip holds {images} images; at most {max_images} are accepted")


def _data_file(members: list[zipfile.ZipInfo]) -> str:
    for suffix in (".jsonl", ".json"):
        found = sorted(
            (m.filename for m in members if m.filename.lower().endswith(suffix)),
            key=lambda name: (name.count("/"), name),
        )
        if found:
            return found[0]
    raise ValueError("the zip holds no data file: add a .jsonl (image, prefix, suffix per line) or a COCO .json")


def default_batch_size(model) -> int:
    """Rows per device: CPU_BATCH on a CPU; on an accelerator the largest batch bucket whose KV cache (plus as
    much again for activations) fits in half of the device's free memory."""
    device = next(iter(model.params["llm"]["embedder"]["input_embedding"].devices()))
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return CPU_BATCH
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    text, vision = model.config.text, model.config.vision
    sequence = (vision.image_size // vision.patch_size) ** 2 + 128 + 256  # image + prompt + new token buckets
    per_row = 2 * 2 * text.depth * text.num_kv_heads * text.head_dim * sequence * np.dtype(model.dtype).itemsize
    fitting = [b for b in BATCH_BUCKETS if b * per_row <= free / 2]
    return fitting[-1] if fitting else 1


def replicas(model, devices=None, model_parallel: int | None = None) -> list:
    """One copy of `model` per group of `model_parallel` consecutive devices (the rows of a data × model grid).

    devices: a list (default: all local devices of the model's platform), or a 2-D grid [data, model] (a nested
    list, numpy array or jax Mesh) whose rows are the groups. model_parallel defaults to the number of devices the
    model is split over now. The model itself serves the group it already lives on."""
    platform = next(iter(model.params["llm"]["embedder"]["input_embedding"].devices())).platform
    if isinstance(devices, jax.sharding.Mesh):
        devices = devices.devices
    grid = np.asarray(jax.local_devices(backend=platform) if devices is None else devices, dtype=object)
    if grid.ndim == 2:
        model_parallel = grid.shape[1]
    devices = list(grid.reshape(-1))
    per_copy = model_parallel or _split_over(model)
    if not devices or per_copy < 1 or len(devices) % per_copy:
        raise ValueError(f"{len(devices)} devices cannot be split into groups of {per_copy} (model_parallel)")
    groups = [devices[i : i + per_copy] for i in range(0, len(devices), per_copy)]
    return [model if _lives_on(model, group) else _copy_to(model, group) for group in groups]


def _split_over(model) -> int:
    mesh = sharding.mesh_of(model.params)
    return 1 if mesh is None else mesh.size


def _lives_on(model, group: list[jax.Device]) -> bool:
    return model.params["llm"]["embedder"]["input_embedding"].devices() == set(group)


def _copy_to(model, group: list[jax.Device]):
    from . import Model  # the package imports this module's users, not this module

    if len(group) == 1:
        params = jax.device_put(model.params, group[0])
    else:
        mesh = sharding.make_mesh(group)
        flat = traverse_util.flatten_dict(model.params, sep="/")
        params = traverse_util.unflatten_dict(
            {key: jax.device_put(leaf, sharding.param_sharding(key, leaf.shape, mesh)) for key, leaf in flat.items()},
            sep="/",
        )
    return Model(params, model.config, model.tokenizer, model.source, model.mask_decoder_path)


class _Runner:
    """Runs steps of len(copies) × batch_size examples, each copy a consecutive batch of them, in threads."""

    def __init__(self, copies: list, batch_size: int, max_new_tokens: int):
        self.copies, self.batch_size, self.max_new_tokens = copies, batch_size, max_new_tokens
        self.rows_per_step = len(copies) * batch_size
        self.seconds = self.warm_seconds = 0.0
        self.warm_lines = 0

    def run(self, chunk: list[Example]) -> list[tuple]:
        """(width, height, text, TokenScores) per example of `chunk`, in order."""
        batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        start = time.perf_counter()
        if len(batches) == 1:
            done = [self._run_batch(self.copies[0], batches[0])]
        else:
            with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
                done = list(pool.map(self._run_batch, self.copies, batches))
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        if not any(compiled for _, compiled in done):
            self.warm_seconds += elapsed
            self.warm_lines += len(chunk)
        return [row for rows, _ in done for row in rows]

    def _run_batch(self, model, batch: list[Example]):
        """Pads the batch to batch_size with its last row, so every call has one shape whatever the devices."""
        opened = {path: to_rgb(open_image(path)) for path in dict.fromkeys(e.image for e in batch)}
        padded = batch + [batch[-1]] * (self.batch_size - len(batch))
        *_, result = model.run(
            [opened[e.image] for e in padded], [e.prefix for e in padded], self.max_new_tokens, return_scores=True
        )
        rows = [
            (opened[e.image].width, opened[e.image].height, result.texts[i], result.scores[i])
            for i, e in enumerate(batch)
        ]
        return rows, result.timing.compiled

    def throughput(self, lines: int, batch_size: int, model_parallel: int) -> dict:
        return {
            "images_per_s": round(lines / self.seconds, 3) if self.seconds else None,
            "images_per_s_warm": round(self.warm_lines / self.warm_seconds, 3) if self.warm_seconds else None,
            "seconds": round(self.seconds, 3),
            "batch_size": batch_size,
            "data_parallel": len(self.copies),
            "model_parallel": model_parallel,
            "device": self.copies[0].device,
        }


def _with_valid_prompts(model, examples: list[Example], problems: list[Problem]):
    kept = []
    for example in examples:
        try:
            model.encode_prompt(example.prefix)
            kept.append(example)
        except ValueError as err:
            problems.append(Problem(example.line, str(err)))
    return kept, sorted(problems, key=lambda p: p.line)


def _should_stop(stop) -> bool:
    if stop is None:
        return False
    return bool(stop.is_set() if hasattr(stop, "is_set") else stop())


def _score_line(
    example: Example, width: int, height: int, output: str, token_scores, tokenizer, decoder: MaskDecoder | None
) -> Line:
    truth_pieces, predicted_pieces = parse(example.suffix, width, height), parse(output, width, height)
    confidences = object_confidences(predicted_pieces, token_scores, tokenizer)
    truth_masks, predicted_masks = (
        _rle_masks(truth_pieces, decoder, width, height),
        _rle_masks(predicted_pieces, decoder, width, height),
    )
    return Line(
        example,
        width,
        height,
        output,
        objects(truth_pieces),
        objects(predicted_pieces),
        [c.score for c in confidences],
        truth_masks,
        predicted_masks,
    )


def _rle_masks(pieces, decoder: MaskDecoder | None, width: int, height: int) -> list[dict | None]:
    found = objects(pieces)
    if decoder is None or not any(obj.seg_codes is not None for obj in found):
        return [None] * len(found)
    return [
        None if obj.mask is None else mask_to_rle(obj.mask)
        for obj in objects(decoder.attach_masks(pieces, width, height))
    ]


def score(lines: list[Line]) -> dict:
    """The output-only figures of evaluated lines: detection, segmentation, text and calibration."""
    located = [line for line in lines if line.located]
    segmented = [line for line in located if line.segmented]
    with_masks = any(m is not None for line in segmented for m in (*line.truth_masks, *line.predicted_masks))
    text = [line for line in lines if not line.located]
    return {
        "detection": coco_metrics(located, "bbox") if located else None,
        "segmentation": coco_metrics(segmented, "segm") if with_masks else None,
        "text": text_metrics(text) if text else None,
        "calibration": calibration(located) if located else None,
    }


def coco_metrics(lines: list[Line], iou_type: str) -> dict:
    """COCOeval (iou_type "bbox" or "segm") over `lines`, each one COCO image, each label one category.

    AP figures are None where COCO has nothing to average (no ground truth); with ground truth but no
    predictions they are 0."""
    masks = iou_type == "segm"
    labels = sorted({o.label for line in lines for o in (*line.truth, *line.predicted)})
    category = {label: k + 1 for k, label in enumerate(labels)}
    truth = COCO()
    truth.dataset = {
        "images": [{"id": i, "width": line.width, "height": line.height} for i, line in enumerate(lines)],
        "categories": [{"id": k, "name": label} for label, k in category.items()],
        "annotations": [],
    }
    results = []
    for i, line in enumerate(lines):
        for obj, rle in zip(line.truth, line.truth_masks):
            if masks and rle is None:
                continue
            ann = {
                "id": len(truth.dataset["annotations"]) + 1,
                "image_id": i,
                "category_id": category[obj.label],
                "bbox": _xywh(obj.box),
                "iscrowd": 0,
            }
            if masks:
                ann.update(segmentation=rle, area=float(coco_mask.area(_rle(rle))))
            else:
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
            truth.dataset["annotations"].append(ann)
        for obj, rle, confidence in zip(line.predicted, line.predicted_masks, line.scores):
            if masks and rle is None:
                continue
            result = {"image_id": i, "category_id": category[obj.label], "score": confidence}
            if masks:
                result["segmentation"] = rle
            else:
                result["bbox"] = _xywh(obj.box)
            results.append(result)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
        figures = {"lines": len(lines), "truth": len(truth.dataset["annotations"]), "predicted": len(results)}
        if not truth.dataset["annotations"]:
            return {**figures, "ap": None, "ap50": None, "ap75": None, "recall": None, "per_label": {}}
        if not results:
            return {**figures, "ap": 0.0, "ap50": 0.0, "ap75": 0.0, "recall": 0.0, "per_label": {}}
        run = COCOeval(truth, truth.loadRes(results), iou_type)
        run.evaluate()
        run.accumulate()
        run.summarize()
    stats = [None if s < 0 else round(float(s), 6) for s in run.stats]
    precision = run.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
    per_label = {}
    for k, label in enumerate(labels):
        ap, ap50 = _mean_defined(precision[:, :, k, 0, -1]), _mean_defined(precision[0, :, k, 0, -1])
        per_label[label] = {
            "ap": ap,
            "ap50": ap50,
            "truth": sum(a["category_id"] == k + 1 for a in truth.dataset["annotations"]),
            "predicted": sum(r["category_id"] == k + 1 for r in results),
        }
    return {**figures, "ap": stats[0], "ap50": stats[1], "ap75": stats[2], "recall": stats[8], "per_label": per_label}


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = box
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def _rle(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return round(float(defined.mean()), 6) if defined.size else None


def text_metrics(lines: list[Line]) -> dict:
    """Exact match (surrounding spaces ignored), overall and per task."""
    right = [line.output.strip() == line.example.suffix.strip() for line in lines]
    per_task: dict[str, list[bool]] = {}
    for line, ok in zip(lines, right):
        per_task.setdefault(line.example.task, []).append(ok)
    return {
        "lines": len(lines),
        "exact_match": round(sum(right) / len(right), 6),
        "per_task": {
            task: {"lines": len(oks), "exact_match": round(sum(oks) / len(oks), 6)}
            for task, oks in sorted(per_task.items())
        },
    }


def match(line: Line) -> Review:
    """Predicted boxes matched to true ones by COCO's rule at IoU MATCH_IOU (postprocess.compare with scores)."""
    comparison = compare(line.predicted, line.truth, MATCH_IOU, scores=line.scores)
    predicted_iou: list[float | None] = [None] * len(line.predicted)
    for found in comparison.matches:
        predicted_iou[found.predicted] = found.iou
    truth_found = [t not in comparison.misses for t in range(len(line.truth))]
    return Review(line, predicted_iou, truth_found)


def calibration(lines: list[Line]) -> list[dict]:
    """CALIBRATION_BINS equal bins of confidence: boxes in each, the share correct, their mean confidence."""
    scores, correct = [], []
    for line in lines:
        review = match(line)
        scores += line.scores
        correct += [iou is not None for iou in review.predicted_iou]
    scores, correct = np.asarray(scores, float), np.asarray(correct, bool)
    bins = np.minimum((scores * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    table = []
    for b in range(CALIBRATION_BINS):
        inside = bins == b
        count = int(inside.sum())
        table.append(
            {
                "from": b / CALIBRATION_BINS,
                "to": (b + 1) / CALIBRATION_BINS,
                "boxes": count,
                "correct": round(float(correct[inside].mean()), 6) if count else None,
                "mean_score": round(float(scores[inside].mean()), 6) if count else None,
            }
        )
    return table


def worst_lines(lines: list[Line], count: int = WORST_SHOWN) -> list[Review]:
    """The located lines with the most false boxes + misses, then the lowest IoU; perfect lines left out."""
    reviews = [match(line) for line in lines if line.located]
    flawed = [r for r in reviews if r.badness() != (0, 0.0)]
    return sorted(flawed, key=lambda r: tuple(-v for v in r.badness()))[:count]


def summary(report: Report) -> str:
    """A few lines for a terminal."""
    out = [
        f"{report.data}: {len(report.lines)} of {report.total} examples evaluated"
        + (" (stopped early)" if report.stopped else "")
        + f", {len(report.problems)} skipped"
    ]
    for name in ("detection", "segmentation"):
        m = report.metrics[name]
        if m:
            out.append(
                f"{name}: AP {m['ap']}  AP50 {m['ap50']}  AP75 {m['ap75']}  recall {m['recall']}  "
                f"({m['lines']} lines, {m['truth']} true / {m['predicted']} predicted)"
            )
    if report.metrics["text"]:
        t = report.metrics["text"]
        out.append(
            f"text: exact match {t['exact_match']} over {t['lines']} lines; "
            + ", ".join(f"{task} {v['exact_match']}" for task, v in t["per_task"].items())
        )
    out.append(f"throughput: {report.throughput['images_per_s']} images/s")
    out += [f"  skipped line {p.line}: {p.reason}" for p in report.problems[:20]]
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `evaluate` options, for a subcommand parser of `python -m paligemma`."""
    parser.add_argument(
        "--model",
        required=True,
        help="a .npz file, a folder (big_vision or Hugging Face format), a Hub repo id or a kaggle: handle",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="a .jsonl in the fine-tuning format (image, prefix, suffix) or a COCO annotation .json",
    )
    parser.add_argument("--images", help="folder the image paths are relative to (default: the data file's)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    parser.add_argument("--out", help="folder to write report.json and report.html (with the worst images) into")
    parser.add_argument("--batch-size", type=int, help="rows per device group per step (default: by device memory)")
    parser.add_argument(
        "--model-parallel",
        type=int,
        help="devices per model copy (default: 1); the local devices form a data × model grid",
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--max-new-tokens", type=int, help="default: the longest expected answer + 16")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | int8 (default: by device)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs a parsed `evaluate` command: progress on stderr, the report on stdout (JSON with --json). Bad input
    raises ValueError, which the command line prints as a message."""
    import tqdm

    from . import load

    model = load(args.model, dtype=args.dtype)
    with tqdm.tqdm(total=0, file=sys.stderr, unit="img", desc="evaluate") as bar:

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        report = evaluate(
            model,
            args.data,
            args.images,
            args.batch_size,
            model_parallel=args.model_parallel,
            progress=progress,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
        )
    if args.out:
        from .eval_report import write

        write(report, args.out)
    print(json.dumps(report.as_dict(), ensure_ascii=False) if args.json else summary(report))
    return 0
