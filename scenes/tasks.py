"""Prompts about a scene and their exact answers, in PaliGemma's output format.

One parser (`parse_prompt`) serves both the dataset writer and the evaluator, so the
questions the model is trained on and scored on cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from postprocess import format_object, join_objects
from scenes.generate import COLOURS, KINDS, Scene, SceneObject

CAPTION_PROMPT = "caption en"
COUNT_PROMPT = "answer en how many shapes are there?"
TASKS = ("caption", "detect", "segment", "count", "colour", "yes_no")

_KIND = "|".join(KINDS)
_COLOUR = "|".join(COLOURS)
_PATTERNS = (
    ("caption", re.compile(re.escape(CAPTION_PROMPT))),
    ("count", re.compile(re.escape(COUNT_PROMPT))),
    ("detect", re.compile(rf"detect (?:(?P<colour>{_COLOUR}) )?(?P<kind>{_KIND})")),
    ("segment", re.compile(rf"segment (?P<colour>{_COLOUR}) (?P<kind>{_KIND})")),
    ("colour", re.compile(rf"answer en what color is the (?P<kind>{_KIND})\?")),
    ("yes_no", re.compile(rf"answer en is there a (?P<colour>{_COLOUR}) (?P<kind>{_KIND})\?")),
)


@dataclasses.dataclass(frozen=True)
class Query:
    """What a prompt asks: its task and the colour/kind it names, if any."""

    task: str
    kind: str | None = None
    colour: str | None = None

    @property
    def label(self) -> str:
        """The label detection answers carry: the prompt's own words."""
        return self.kind if self.colour is None else f"{self.colour} {self.kind}"

    def matches(self, obj: SceneObject) -> bool:
        return obj.kind == self.kind and self.colour in (None, obj.colour)


def parse_prompt(prompt: str) -> Query:
    """What `prompt` asks; ValueError listing the accepted prompts when it is none of them."""
    for task, pattern in _PATTERNS:
        found = pattern.fullmatch(prompt)
        if found:
            groups = found.groupdict()
            return Query(task, groups.get("kind"), groups.get("colour"))
    raise ValueError(
        f"unsupported prompt {prompt!r}; accepted: '{CAPTION_PROMPT}', 'detect [colour] KIND', "
        f"'segment COLOUR KIND', '{COUNT_PROMPT}', 'answer en what color is the KIND?', "
        f"'answer en is there a COLOUR KIND?' with KIND in {KINDS} and COLOUR in {tuple(COLOURS)}"
    )


def caption(scene: Scene) -> str:
    """'a red circle', 'a red circle and a blue square', 'a, b and c' (left to right)."""
    phrases = [f"a {obj.label}" for obj in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def answer(scene: Scene, prompt: str, seg_codes: Sequence[Sequence[int]] | None = None) -> str:
    """The exact expected output for `prompt` on `scene`.

    `seg_codes[i]` are the 16 VQ-VAE codes of `scene.objects[i]`; segment prompts need them.
    """
    query = parse_prompt(prompt)
    height, width = scene.image.shape[:2]
    if query.task == "caption":
        return caption(scene)
    if query.task == "count":
        return str(len(scene.objects))
    if query.task == "yes_no":
        return "yes" if any(query.matches(obj) for obj in scene.objects) else "no"
    if query.task == "colour":
        same_kind = [obj for obj in scene.objects if obj.kind == query.kind]
        if len(same_kind) != 1:
            raise ValueError(f"{prompt!r} needs exactly one {query.kind} in the scene, found {len(same_kind)}")
        return same_kind[0].colour
    if query.task == "segment" and seg_codes is None:
        raise ValueError("segment prompts need the objects' seg_codes (from a trained VQ-VAE encoder)")
    pieces = []
    for index, obj in enumerate(scene.objects):
        if query.matches(obj):
            codes = seg_codes[index] if query.task == "segment" else None
            pieces.append(format_object(query.label, obj.box, width, height, seg_codes=codes))
    return join_objects(pieces)


@dataclasses.dataclass(frozen=True)
class TaskMix:
    """How many prompts of each task to draw per scene, and how often they should match."""

    caption: int = 1
    detect: int = 2
    segment: int = 1
    count: int = 1
    colour: int = 1
    yes_no: int = 1
    positive_rate: float = 0.5  # share of detect, segment and yes/no prompts naming something present

    def __post_init__(self):
        counts = [getattr(self, task) for task in TASKS]
        if any(count < 0 for count in counts):
            raise ValueError(f"task counts must be >= 0, got {dict(zip(TASKS, counts))}")
        if not 0.0 <= self.positive_rate <= 1.0:
            raise ValueError(f"positive_rate must lie in [0, 1], got {self.positive_rate}")


DEFAULT_MIX = TaskMix()


def _labels_present_and_absent(scene: Scene) -> tuple[list[str], list[str]]:
    """'colour kind' labels in the scene, and those not in it."""
    present = [obj.label for obj in scene.objects]
    absent = [f"{colour} {kind}" for colour in COLOURS for kind in KINDS if f"{colour} {kind}" not in present]
    return present, absent


def _draw_prompt(task: str, scene: Scene, rng: np.random.Generator, positive_rate: float) -> str | None:
    """One random prompt of `task` for `scene`, or None when the task cannot be asked of it.

    Detect, segment and yes/no prompts name something present with probability
    `positive_rate` and something absent otherwise; half the detect prompts name a kind only.
    """
    if task == "caption":
        return CAPTION_PROMPT
    if task == "count":
        return COUNT_PROMPT
    kinds = [obj.kind for obj in scene.objects]
    if task == "colour":
        single = [kind for kind in KINDS if kinds.count(kind) == 1]
        return f"answer en what color is the {rng.choice(single)}?" if single else None
    present, absent = _labels_present_and_absent(scene)
    positive = rng.random() < positive_rate
    labels = present if positive else absent
    if task == "detect":
        kinds_named = [kind for kind in KINDS if (kind in kinds) == positive]
        if kinds_named and rng.random() < 0.5:
            labels = kinds_named
        return f"detect {rng.choice(labels)}"
    if task == "segment":
        return f"segment {rng.choice(labels)}"
    return f"answer en is there a {rng.choice(labels)}?"


def sample_prompts(
    scene: Scene, rng: np.random.Generator, mix: TaskMix = DEFAULT_MIX, with_segment: bool = True
) -> list[str]:
    """Distinct prompts for one scene following `mix` (segment ones only if `with_segment`)."""
    prompts: list[str] = []
    for task in TASKS:
        if task == "segment" and not with_segment:
            continue
        for _ in range(getattr(mix, task)):
            prompt = _draw_prompt(task, scene, rng, mix.positive_rate)
            if prompt is not None and prompt not in prompts:
                prompts.append(prompt)
    return prompts
