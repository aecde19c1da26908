"""Task presets (PaliGemma's prompt keywords) and the example gallery listed in `assets/examples/examples.json`.

A prompt is `KEYWORD [LANGUAGE] [ARGUMENT]`, e.g. `caption en`, `answer de wie viele?`, `detect cat ; dog`,
`ocr`. The UI composes prompts from a task and a language and reads them back, so that picking an example
also shows its task.
"""

from __future__ import annotations

import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # as the UI shows it
    keyword: str  # as the model reads it
    takes_language: bool
    argument: str = ""  # what follows the keyword (and language), for the placeholder; "" when nothing does


TASKS = (
    Task("caption", "caption", True),
    Task("describe", "describe", True),
    Task("OCR", "ocr", False),
    Task("answer", "answer", True, "a question about the image"),
    Task("question", "question", True, "an answer to ask a question for"),
    Task("detect", "detect", False, "objects to find, separated by ' ; '"),
    Task("segment", "segment", False, "the object to outline"),
)
TASK_NAMES = tuple(task.name for task in TASKS)
# Languages of PaliGemma's multilingual captioning and answering data that a visitor is most likely to want.
LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk", "tr", "ar", "hi", "zh", "ja", "ko",
             "id", "vi", "th", "sv")  # fmt: skip
DEFAULT_LANGUAGE = "en"

_BY_NAME = {task.name: task for task in TASKS}
_BY_KEYWORD = {task.keyword: task for task in TASKS}


def task_named(name: str) -> Task:
    if name not in _BY_NAME:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASK_NAMES)}")
    return _BY_NAME[name]


def task_names(tasks) -> tuple[str, ...]:
    """The task names of a model's list of tasks (by name or keyword, any case), in the page's order; a
    ValueError names what is accepted."""
    if isinstance(tasks, str) or not isinstance(tasks, list | tuple) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    by_word = {word.lower(): task.name for task in TASKS for word in (task.name, task.keyword)}
    unknown = [t for t in tasks if not isinstance(t, str) or t.strip().lower() not in by_word]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; accepted: {', '.join(TASK_NAMES)}")
    named = {by_word[t.strip().lower()] for t in tasks}
    return tuple(name for name in TASK_NAMES if name in named)


def compose(task_name: str, language: str = DEFAULT_LANGUAGE, argument: str = "") -> str:
    """The prompt for a task; a task that needs an argument and has none ends in a space, ready to type."""
    task = task_named(task_name)
    words = [task.keyword] + ([language] if task.takes_language else [])
    if not task.argument:
        return " ".join(words)
    return " ".join(words) + " " + argument.strip()


def split(prompt: str) -> tuple[Task | None, str | None, str]:
    """(task, language, argument) of a prompt; (None, None, prompt) for free text that names no task."""
    keyword, _, rest = prompt.strip().partition(" ")
    task = _BY_KEYWORD.get(keyword)
    if task is None:
        return None, None, prompt.strip()
    language = None
    if task.takes_language:
        language, _, rest = rest.partition(" ")
    return task, language or None, rest.strip()


def retarget(prompt: str, task_name: str, language: str) -> str:
    """The prompt after the visitor picks another task or language: the argument typed so far is kept."""
    _, _, argument = split(prompt)
    return compose(task_name, language, argument if task_named(task_name).argument else "")


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    image: str  # absolute path
    prompt: str
    objects: tuple[dict, ...] = ()  # the truth of a synthetic scene: {"label", "box" [x1, y1, x2, y2]}
    models: tuple[str, ...] = ()  # the models known to answer it; () for any
    not_for: tuple[str, ...] = ()  # models it is not offered with (the demo model has never seen a photo)


def load_examples(folder: str) -> list[Example]:
    """The gallery from `folder/examples.json` ({"examples": [{"task", "image", "prompt"[, "objects", "models",
    "not_for"]}]})."""
    path = os.path.join(folder, "examples.json")
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)["examples"]
        examples = [
            Example(
                row["task"],
                os.path.abspath(os.path.join(folder, row["image"])),
                row["prompt"],
                tuple(row.get("objects", ())),
                tuple(row.get("models", ())),
                tuple(row.get("not_for", ())),
            )
            for row in rows
        ]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the examples list {path}: {err}") from None
    missing = [ex.image for ex in examples if not os.path.isfile(ex.image)]
    if missing:
        raise ValueError(f"{path} lists images that do not exist: {', '.join(missing)}")
    return examples


def examples_for(model: str, examples: list[Example]) -> list[Example]:
    """The examples to offer with `model`: those that name it in their "models" list, or name no model, unless
    their "not_for" list names it."""
    return [ex for ex in examples if (not ex.models or model in ex.models) and model not in ex.not_for]
