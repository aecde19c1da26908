"""How well a model answers prompts about synthetic scenes, as figures to hold against targets.

Each metric is a pure function of (scene, prompt, model output text); `evaluate_model`
runs any batched `generate_fn(images, prompts) -> texts` over fresh scenes and sums them.
Use an evaluation seed other than the training data's, or the scenes will be seen ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from postprocess import MaskDecoder, objects, parse
from scenes.generate import Box, Scene, scene_for
from scenes.tasks import DEFAULT_MIX, TaskMix, answer, parse_prompt, sample_prompts

MATCH_IOU = 0.5
ANSWER_TASKS = ("count", "colour", "yes_no")

# figure → (comparison, target): what the demo model has to reach
TARGETS = {
    "detection_found": (">=", 0.90),
    "detection_extra": ("<=", 0.10),
    "segmentation_mask_iou": (">=", 0.60),
    "answer_accuracy": (">=", 0.95),
    "caption_accuracy": (">=", 0.90),
}

GenerateFn = Callable[[list[np.ndarray], list[str]], list[str]]


@dataclasses.dataclass(frozen=True)
class DetectionCounts:
    """Sums over detect prompts: prompts, true boxes, predicted boxes, matched pairs and their IoUs."""

    prompts: int = 0
    truth: int = 0
    predicted: int = 0
    matched: int = 0
    matched_iou_sum: float = 0.0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def figures(self, prefix: str = "") -> dict[str, float | None]:
        """Share of objects found, share of predicted boxes matching none (0 when none were
        predicted), mean IoU of the matches; None where nothing was asked or matched."""
        asked = self.prompts > 0
        return {
            f"{prefix}detection_found": _ratio(self.matched, self.truth) if asked else None,
            f"{prefix}detection_extra": (self.predicted - self.matched) / max(self.predicted, 1) if asked else None,
            f"{prefix}detection_box_iou": _ratio(self.matched_iou_sum, self.matched),
        }


def box_ious(predicted: Sequence[Box], truth: Sequence[Box]) -> np.ndarray:
    """IoU of every predicted box (x1, y1, x2, y2) with every true one: [P, T]."""
    if not predicted or not truth:
        return np.zeros((len(predicted), len(truth)))

    def xywh(boxes):
        return np.array([(x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes], float)

    return np.asarray(coco_mask.iou(xywh(predicted), xywh(truth), [0] * len(truth)))


def match_boxes(predicted: Sequence[Box], truth: Sequence[Box], threshold: float = MATCH_IOU) -> list[float]:
    """IoUs of one-to-one matches at IoU >= threshold, taken greedily from the best pair down."""
    ious = box_ious(predicted, truth)
    matched = []
    while ious.size and ious.max() >= threshold:
        row, col = np.unravel_index(np.argmax(ious), ious.shape)
        matched.append(float(ious[row, col]))
        ious[row, :] = -1.0
        ious[:, col] = -1.0
    return matched


def score_detection(scene: Scene, prompt: str, text: str) -> DetectionCounts:
    """Boxes of a detect (or segment) output against the scene's matching objects.

    A predicted box counts only with the label of the object it frames; any other is an extra box.
    """
    query = parse_prompt(prompt)
    height, width = scene.image.shape[:2]
    found = objects(parse(text, width, height))
    truth = 0
    ious: list[float] = []
    for target in query.targets:
        target_truth = [obj.box for obj in scene.objects if target.matches(obj)]
        ious += match_boxes([obj.box for obj in found if obj.label == target.label], target_truth)
        truth += len(target_truth)
    return DetectionCounts(1, truth, len(found), len(ious), sum(ious))


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two bool [H, W] masks (0 when both are empty)."""
    encoded = [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in (predicted, truth)]
    return float(coco_mask.iou([encoded[0]], [encoded[1]], [0])[0, 0])


def score_segmentation(scene: Scene, prompt: str, text: str, mask_decoder: MaskDecoder) -> float | None:
    """Mask IoU of all predicted masks with one of the prompt's labels against the matching objects' masks.

    None when both are empty: a correct "nothing here" has no IoU to average.
    """
    query = parse_prompt(prompt)
    labels = {target.label for target in query.targets}
    height, width = scene.image.shape[:2]
    pieces = mask_decoder.attach_masks(parse(text, width, height), width, height)
    empty = np.zeros((height, width), bool)
    predicted = np.any(
        [empty, *(obj.mask for obj in objects(pieces) if obj.label in labels and obj.mask is not None)], axis=0
    )
    truth = np.any([empty, *(obj.mask for obj in scene.objects if query.matches(obj))], axis=0)
    if not predicted.any() and not truth.any():
        return None
    return mask_iou(predicted, truth)


def answer_is_right(scene: Scene, prompt: str, text: str) -> bool:
    """Exact match with the expected caption or answer, ignoring surrounding spaces."""
    return text.strip() == answer(scene, prompt)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def evaluate_model(
    generate_fn: GenerateFn,
    num_scenes: int,
    seed: int,
    mask_decoder: MaskDecoder | None = None,
    mix: TaskMix = DEFAULT_MIX,
    batch_size: int = 16,
) -> dict:
    """Runs `generate_fn` on prompts (drawn as for training) about scenes of series `seed`.

    Segment prompts are asked only with a `mask_decoder` to read the predicted masks.
    Figures with nothing to measure are None. detection_extra is the share of predicted
    boxes that match no object (wrong label, wrong place, a duplicate, or any box at all
    for a prompt naming something absent).
    """
    if num_scenes < 1 or batch_size < 1:
        raise ValueError(f"num_scenes and batch_size must be at least 1, got {num_scenes} and {batch_size}")
    scenes = [scene_for(seed, index) for index in range(num_scenes)]
    asked = [
        (scene, prompt)
        for index, scene in enumerate(scenes)
        for prompt in sample_prompts(scene, np.random.default_rng([seed, index, 1]), mix, mask_decoder is not None)
    ]
    texts: list[str] = []
    for start in range(0, len(asked), batch_size):
        batch = asked[start : start + batch_size]
        outputs = list(generate_fn([scene.image for scene, _ in batch], [prompt for _, prompt in batch]))
        if len(outputs) != len(batch):
            raise ValueError(f"generate_fn returned {len(outputs)} texts for {len(batch)} prompts")
        texts.extend(outputs)

    detection = {"detect": DetectionCounts(), "multi_detect": DetectionCounts()}
    mask_ious: dict[str, list[float]] = {"segment": [], "multi_segment": []}
    right: dict[str, list[bool]] = {task: [] for task in (*ANSWER_TASKS, "caption")}
    for (scene, prompt), text in zip(asked, texts):
        task = parse_prompt(prompt).task
        if task in detection:
            detection[task] += score_detection(scene, prompt, text)
        elif task in mask_ious:
            iou = score_segmentation(scene, prompt, text, mask_decoder)
            if iou is not None:
                mask_ious[task].append(iou)
        else:
            right[task].append(answer_is_right(scene, prompt, text))
    answers = [ok for task in ANSWER_TASKS for ok in right[task]]
    figures = {
        "scenes": num_scenes,
        "prompts": len(asked),
        **detection["detect"].figures(),
        **detection["multi_detect"].figures("multi_"),
        "segmentation_mask_iou": _ratio(sum(mask_ious["segment"]), len(mask_ious["segment"])),
        "multi_segmentation_mask_iou": _ratio(sum(mask_ious["multi_segment"]), len(mask_ious["multi_segment"])),
        "answer_accuracy": _ratio(sum(answers), len(answers)),
        "caption_accuracy": _ratio(sum(right["caption"]), len(right["caption"])),
    }
    figures.update({f"{task}_accuracy": _ratio(sum(right[task]), len(right[task])) for task in ANSWER_TASKS})
    return figures


def missed_targets(figures: dict) -> list[str]:
    """Human-readable lines for each figure of `TARGETS` that misses its target (or is missing)."""
    missed = []
    for name, (comparison, target) in TARGETS.items():
        value = figures.get(name)
        meets = value is not None and (value >= target if comparison == ">=" else value <= target)
        if not meets:
            missed.append(f"{name} = {value} (target {comparison} {target})")
    return missed
