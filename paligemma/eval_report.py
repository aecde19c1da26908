"""An evaluation report for people: report.json and a self-contained report.html with the worst images drawn.

    write(report, "out/")         # out/report.json, out/report.html (images embedded as PNG data URIs)
    page = to_html(report)        # the same page as a string, e.g. for the app

In the pictures, true boxes found are thin green, missed true boxes thick orange, matched predictions blue with
their confidence and IoU, and false boxes red with their confidence.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from postprocess.draw import font_size, line_width
from postprocess.parse import UNLABELLED

from .preprocess import open_image, to_rgb

if TYPE_CHECKING:
    from .evaluate import Report, Review

COLORS = {"found": "#2e7d32", "miss": "#ef6c00", "match": "#1565c0", "false": "#c62828"}
SHOWN_SIDE = (448, 1024)  # pictures are scaled so the shorter side reaches the first and no side exceeds the second


def draw_review(review: Review) -> Image.Image:
    """The line's image with its true boxes (found / missed) and predicted boxes (matched / false) drawn."""
    image = to_rgb(open_image(review.line.example.image))
    scale = min(max(1.0, SHOWN_SIDE[0] / min(image.size)), SHOWN_SIDE[1] / max(image.size))
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(image)
    stroke, font = line_width(*image.size), ImageFont.load_default(font_size(*image.size))

    def box(obj_box, color, width, tag=None):
        x1, y1, x2, y2 = (round(v * scale) for v in obj_box)
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=color, width=width)
        if tag:
            left, top, right, bottom = draw.textbbox((x1, y1), tag, font=font)
            y = y1 - (bottom - top) - 2 * stroke if y1 >= (bottom - top) + 2 * stroke else y1
            draw.rectangle((x1, y, x1 + right - left + 2 * stroke, y + bottom - top + 2 * stroke), fill=color)
            draw.text((x1 + stroke, y + stroke - (top - y1)), tag, fill="white", font=font)

    line = review.line
    for obj, found in zip(line.truth, review.truth_found):
        box(
            obj.box,
            COLORS["found" if found else "miss"],
            stroke if found else 3 * stroke,
            None if found else f"missed {obj.label or UNLABELLED}",
        )
    for obj, confidence, iou in zip(line.predicted, line.scores, review.predicted_iou):
        if iou is None:
            box(obj.box, COLORS["false"], 2 * stroke, f"{obj.label or UNLABELLED} {confidence:.2f} false")
        else:
            box(obj.box, COLORS["match"], 2 * stroke, f"{obj.label or UNLABELLED} {confidence:.2f} IoU {iou:.2f}")
    return image


def write(report: Report, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Writes report.json (report.as_dict()) and report.html into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, html_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.html")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report.as_dict(), f, ensure_ascii=False, indent=1)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(to_html(report))
    return json_path, html_path


def to_html(report: Report) -> str:
    """One self-contained page: figures, per-label AP, calibration, text accuracy, skipped lines, worst images."""
    data = report.as_dict(with_lines=False)
    parts = [
        f"<h1>Evaluation of {_e(report.model)}</h1>",
        f"<p>{_e(report.data)}: {data['evaluated']} of {data['examples']} examples evaluated"
        + (" — <strong>stopped early</strong>" if report.stopped else "")
        + f", {len(report.problems)} skipped; {_e(report.throughput['images_per_s'])} images/s on "
        f"{_e(report.throughput['device'])}.</p>",
    ]
    rows = [(name, m) for name in ("detection", "segmentation") if (m := data[name])]
    if rows:
        parts.append(
            _table(
                ["", "AP", "AP50", "AP75", "recall", "lines", "true", "predicted"],
                [
                    [name, m["ap"], m["ap50"], m["ap75"], m["recall"], m["lines"], m["truth"], m["predicted"]]
                    for name, m in rows
                ],
            )
        )
    if data["detection"] and data["detection"]["per_label"]:
        parts.append("<h2>Per label (boxes)</h2>")
        parts.append(
            _table(
                ["label", "AP", "AP50", "true", "predicted"],
                [
                    [label, v["ap"], v["ap50"], v["truth"], v["predicted"]]
                    for label, v in data["detection"]["per_label"].items()
                ],
            )
        )
    if data["calibration"]:
        parts.append(
            "<h2>Confidence calibration</h2><p>Boxes by confidence, and the share correct (same label, IoU ≥ 0.5).</p>"
        )
        parts.append(
            _table(
                ["confidence", "boxes", "correct", "mean confidence"],
                [
                    [f"{b['from']:.1f}–{b['to']:.1f}", b["boxes"], b["correct"], b["mean_score"]]
                    for b in data["calibration"]
                ],
            )
        )
    if data["text"]:
        parts.append(
            f"<h2>Text answers</h2><p>Exact match {data['text']['exact_match']} over {data['text']['lines']} lines.</p>"
        )
        parts.append(
            _table(
                ["task", "lines", "exact match"],
                [[task, v["lines"], v["exact_match"]] for task, v in data["text"]["per_task"].items()],
            )
        )
    if report.problems:
        parts.append(
            "<h2>Skipped</h2><ul>"
            + "".join(f"<li>line {p.line}: {_e(p.reason)}</li>" for p in report.problems)
            + "</ul>"
        )
    parts.append(
        "<h2>Worst images</h2><p class=legend>"
        + " ".join(
            f"<span style='color:{color}'>■ {name}</span>"
            for name, color in (
                ("found", COLORS["found"]),
                ("missed", COLORS["miss"]),
                ("matched prediction", COLORS["match"]),
                ("false box", COLORS["false"]),
            )
        )
        + "</p>"
    )
    parts += [_figure(review) for review in report.worst] or ["<p>No located line with an error.</p>"]
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>PaliGemma evaluation</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}figure{display:inline-block;"
        "margin:.5em;vertical-align:top;max-width:480px}figure img{max-width:100%}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )


def _figure(review: Review) -> str:
    facts = review.as_dict()
    caption = (
        f"line {facts['line']}: {_e(facts['prefix'])} — {facts['false_boxes']} false, {facts['misses']} "
        f"missed, lowest IoU {'—' if facts['lowest_iou'] is None else facts['lowest_iou']}"
    )
    if review.picture is None:
        return f"<figure><figcaption>{caption}</figcaption></figure>"
    buffer = io.BytesIO()
    review.picture.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    image = f"<img class=worst alt='line {facts['line']}' src='{uri}'>"
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e('—' if v is None else v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(value) -> str:
    return html.escape(str(value))
