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
# The multi_ tasks name two or more objects ("detect red circle ; green triangle"); they come last so that
# adding them to a mix leaves the prompts drawn for the other tasks unchanged.
TASKS = ("caption", "detect", "segment", "count", "colour", "yes_no", "multi_detect", "multi_segment")
SEGMENT_TASKS = ("segment", "multi_segment")  # the tasks whose answers carry each object's mask codes
MULTI_SEPARATOR = " ; "  # between the objects a prompt names, as in the published detect/segment prompts

_KIND = "|".join(KINDS)
_COLOUR = "|".join(COLOURS)
_ANY_TARGET = rf"(?:(?:{_COLOUR}) )?(?:{_KIND})"
_COLOURED_TARGET = rf"(?:{_COLOUR}) (?:{_KIND})"
_SEPARATOR = re.escape(MULTI_SEPARATOR)
_PATTERNS = (
    ("caption", re.compile(re.escape(CAPTION_PROMPT))),
    ("count", re.compile(re.escape(COUNT_PROMPT))),
    ("detect", re.compile(rf"detect (?P<targets>{_ANY_TARGET}(?:{_SEPARATOR}{_ANY_TARGET})*)")),
    ("segment", re.compile(rf"segment (?P<targets>{_COLOURED_TARGET}(?:{_SEPARATOR}{_COLOURED_TARGET})*)")),
    ("colour", re.compile(rf"answer en what color is the (?P<targets>{_KIND})\?")),
    ("yes_no", re.compile(rf"answer en is there a (?P<targets>{_COLOURED_TARGET})\?")),
)


@dataclasses.dataclass(frozen=True)
class Target:
    """One object a prompt names: a kind, and a colour unless any colour will do."""

    kind: str
    colour: str | None = None

    @classmethod
    def of(cls, label: str) -> Target:
        """'red circle' or 'circle'."""
        *colour, kind = label.split(" ")
        return cls(kind, colour[0] if colour else None)

    @property
    def label(self) -> str:
        """The label detection answers carry: the prompt's own words."""
        return self.kind if self.colour is None else f"{self.colour} {self.kind}"

    def matches(self, obj: SceneObject) -> bool:
        return obj.kind == self.kind and self.colour in (None, obj.colour)

    def overlaps(self, other: Target) -> bool:
        """Whether some object could match both."""
        return self.kind == other.kind and None in (self.colour, other.colour) or self == other


@dataclasses.dataclass(frozen=True)
class Query:
    """What a prompt asks: its task and the objects it names, in prompt order (none for captions and counts)."""

    task: str
    targets: tuple[Target, ...] = ()

    def matches(self, obj: SceneObject) -> bool:
        """Whether `obj` is one of the objects the prompt names."""
        return any(target.matches(obj) for target in self.targets)


def parse_prompt(prompt: str) -> Query:
    """What `prompt` asks; ValueError listing the accepted prompts when it is none of them."""
    for task, pattern in _PATTERNS:
        found = pattern.fullmatch(prompt)
        if found:
            labels = found.groupdict().get("targets")
            targets = tuple(Target.of(label) for label in labels.split(MULTI_SEPARATOR)) if labels else ()
            return Query(f"multi_{task}" if len(targets) > 1 else task, targets)
    raise ValueError(
        f"unsupported prompt {prompt!r}; accepted: '{CAPTION_PROMPT}', 'detect [colour] KIND[ ; [colour] KIND...]', "
        f"'segment COLOUR KIND[ ; COLOUR KIND...]', '{COUNT_PROMPT}', 'answer en what color is the KIND?', "
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
        (target,) = query.targets
        same_kind = [obj for obj in scene.objects if obj.kind == target.kind]
        if len(same_kind) != 1:
            raise ValueError(f"{prompt!r} needs exactly one {target.kind} in the scene, found {len(same_kind)}")
        return same_kind[0].colour
    segment = query.task in SEGMENT_TASKS
    if segment and seg_codes is None:
        raise ValueError("segment prompts need the objects' seg_codes (from a trained VQ-VAE encoder)")
    pieces = []
    for target in query.targets:  # in prompt order, each target's objects in scene order
        for index, obj in enumerate(scene.objects):
            if target.matches(obj):
                codes = seg_codes[index] if segment else None
                pieces.append(format_object(target.label, obj.box, width, height, seg_codes=codes))
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
    multi_detect: int = 0
    multi_segment: int = 0
    positive_rate: float = (
        0.5  # share of detect, segment and yes/no prompts (and of multi_ targets) naming something present
    )
    task_rates: tuple[tuple[str, float], ...] = ()  # (task, its own share) where it differs from positive_rate

    def __post_init__(self):
        counts = [getattr(self, task) for task in TASKS]
        if any(count < 0 for count in counts):
            raise ValueError(f"task counts must be >= 0, got {dict(zip(TASKS, counts))}")
        for name, rate in (("positive_rate", self.positive_rate), *self.task_rates):
            if name != "positive_rate" and name not in TASKS:
                raise ValueError(f"task_rates names {name!r}, not a task ({', '.join(TASKS)})")
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name}'s positive rate must lie in [0, 1], got {rate}")

    def rate_for(self, task: str) -> float:
        """The share of `task`'s prompts (or targets) naming something present."""
        return dict(self.task_rates).get(task, self.positive_rate)


DEFAULT_MIX = TaskMix()


def _labels_present_and_absent(scene: Scene) -> tuple[list[str], list[str]]:
    """'colour kind' labels in the scene, and those not in it."""
    present = [obj.label for obj in scene.objects]
    absent = [f"{colour} {kind}" for colour in COLOURS for kind in KINDS if f"{colour} {kind}" not in present]
    return present, absent


def _draw_label(
    scene: Scene, rng: np.random.Generator, positive_rate: float, kind_only: bool, apart_from: Target | None = None
) -> str:
    """A 'colour kind' label present in `scene` with probability `positive_rate`, absent otherwise; with
    `kind_only`, half the time a bare kind instead. With `apart_from`, never one that an object matching it
    could also match (an absent one when every present one could)."""
    present, absent = _labels_present_and_absent(scene)
    positive = rng.random() < positive_rate
    labels = present if positive else absent
    if kind_only:
        kinds = [obj.kind for obj in scene.objects]
        kinds_named = [kind for kind in KINDS if (kind in kinds) == positive]
        if kinds_named and rng.random() < 0.5:
            labels = kinds_named
    if apart_from is not None:
        labels = [label for label in labels if not Target.of(label).overlaps(apart_from)] or [
            label for label in absent if not Target.of(label).overlaps(apart_from)
        ]
    return str(rng.choice(labels))


def _draw_multi_prompt(verb: str, scene: Scene, rng: np.random.Generator, positive_rate: float) -> str:
    """'VERB a ; b': two labels drawn like single ones, never two that one object could both match."""
    kind_only = verb == "detect"
    first = _draw_label(scene, rng, positive_rate, kind_only)
    second = _draw_label(scene, rng, positive_rate, kind_only, apart_from=Target.of(first))
    return f"{verb} {first}{MULTI_SEPARATOR}{second}"


def _draw_prompt(task: str, scene: Scene, rng: np.random.Generator, positive_rate: float) -> str | None:
    """One random prompt of `task` for `scene`, or None when the task cannot be asked of it.

    Detect, segment and yes/no prompts name something present with probability
    `positive_rate` and something absent otherwise; half the detect prompts name a kind only.
    """
    if task == "caption":
        return CAPTION_PROMPT
    if task == "count":
        return COUNT_PROMPT
    if task == "colour":
        kinds = [obj.kind for obj in scene.objects]
        single = [kind for kind in KINDS if kinds.count(kind) == 1]
        return f"answer en what color is the {rng.choice(single)}?" if single else None
    if task.startswith("multi_"):
        return _draw_multi_prompt(task.removeprefix("multi_"), scene, rng, positive_rate)
    label = _draw_label(scene, rng, positive_rate, kind_only=task == "detect")
    if task == "detect":
        return f"detect {label}"
    if task == "segment":
        return f"segment {label}"
    return f"answer en is there a {label}?"


def sample_prompts(
    scene: Scene, rng: np.random.Generator, mix: TaskMix = DEFAULT_MIX, with_segment: bool = True
) -> list[str]:
    """Distinct prompts for one scene following `mix` (segment ones only if `with_segment`)."""
    prompts: list[str] = []
    for task in TASKS:
        if task in SEGMENT_TASKS and not with_segment:
            continue
        for _ in range(getattr(mix, task)):
            prompt = _draw_prompt(task, scene, rng, mix.rate_for(task))
            if prompt is not None and prompt not in prompts:
                prompts.append(prompt)
    return prompts
