"""Table-driven tests of the output parser and its inverse, `format_object`."""

import numpy as np
import pytest

from postprocess.parse import (
    Object,
    Text,
    bin_to_pixel,
    display_labels,
    format_object,
    join_objects,
    objects,
    parse,
    pixel_to_bin,
)

W, H = 640, 480
SEGS = "".join(f"<seg{code:03d}>" for code in range(0, 128, 8))  # 16 codes: 0, 8, ..., 120
CODES = tuple(range(0, 128, 8))


def loc(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


def test_known_box_in_pixels():
    (cat,) = parse(loc(256, 512, 768, 1023) + " cat", W, H)
    # y: 256/1024*480 = 120, 768/1024*480 = 360; x: 512/1024*640 = 320, 1023/1024*640 = 639.375
    assert cat == Object(label="cat", box=(320, 120, 639, 360), text=loc(256, 512, 768, 1023) + " cat")


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("with_masks", [False, True], ids=["detect", "segment"])
def test_well_formed_outputs(count, with_masks):
    labels = ["cat", "dog", "traffic light", "cat", "person"][:count]
    bins = [(100 * i, 50 + 100 * i, 100 * i + 300, 150 + 100 * i) for i in range(count)]
    segs = SEGS if with_masks else ""
    text = " ; ".join(loc(*b) + segs + " " + label for b, label in zip(bins, labels))

    pieces = parse(text, W, H)

    assert [type(p) for p in pieces] == [Object] * count
    assert [p.label for p in pieces] == labels
    assert [p.box for p in pieces] == [
        (bin_to_pixel(x1, W), bin_to_pixel(y1, H), bin_to_pixel(x2, W), bin_to_pixel(y2, H)) for y1, x1, y2, x2 in bins
    ]
    assert all(p.seg_codes == (CODES if with_masks else None) for p in pieces)
    assert "".join(p.text for p in pieces) == text


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(
            "I see " + loc(0, 0, 512, 512) + " cat",
            [Text("I see "), ("cat", (0, 0, 320, 240), None)],
            id="text before an object",
        ),
        pytest.param(
            loc(0, 0, 512, 512) + " ; " + loc(512, 512, 1023, 1023),
            [("", (0, 0, 320, 240), None), ("", (320, 240, 639, 480), None)],
            id="no labels, joined",
        ),
        pytest.param(
            loc(0, 0, 512, 512) + loc(512, 512, 1023, 1023) + " dog",
            [("", (0, 0, 320, 240), None), ("dog", (320, 240, 639, 480), None)],
            id="two objects back to back",
        ),
        pytest.param(
            loc(0, 0, 512, 512) + " " + SEGS + " cat",
            [("cat", (0, 0, 320, 240), CODES)],
            id="space between box and seg tokens",
        ),
        pytest.param(
            loc(0, 0, 512, 512) + " Käsekuchen 🍰 ; " + loc(0, 0, 100, 100) + " 猫",
            [("Käsekuchen 🍰", (0, 0, 320, 240), None), ("猫", (0, 0, 62, 47), None)],
            id="unicode labels",
        ),
        pytest.param(
            loc(0, 0, 512, 512) + " cat\nThat is all.",
            [("cat", (0, 0, 320, 240), None), Text("\nThat is all.")],
            id="a label ends at the line's end",
        ),
    ],
)
def test_accepted_forms(text, expected):
    pieces = parse(text, W, H)
    assert [p if isinstance(p, Text) else (p.label, p.box, p.seg_codes) for p in pieces] == expected
    assert "".join(p.text for p in pieces) == text


@pytest.mark.parametrize(
    "malformed",
    [
        pytest.param(loc(100, 100, 200) + " cat", id="three loc tokens"),
        pytest.param(loc(100) + " cat", id="one loc token"),
        pytest.param(loc(100, 100, 200, 200) + SEGS[: 10 * 8] + " cat", id="ten seg tokens"),
        pytest.param(loc(100, 100, 200, 200) + SEGS + "<seg001> cat", id="seventeen seg tokens"),
        pytest.param(loc(300, 100, 200, 200) + " cat", id="y2 < y1"),
        pytest.param(loc(100, 300, 200, 200) + " cat", id="x2 < x1"),
        pytest.param(loc(100, 100, 100, 200) + " cat", id="zero height"),
        pytest.param(loc(100, 100, 101, 200) + " cat", id="zero height once in pixels"),
        pytest.param(loc(100, 100, 200, 1024) + " cat", id="loc beyond 1023"),
        pytest.param(loc(100, 100, 200, 200) + SEGS[:-8] + "<seg128> cat", id="seg beyond 127"),
        pytest.param("<seg005> cat <loc0010> and <unused3>", id="stray tokens"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_spans_stay_text(malformed):
    good = loc(0, 0, 512, 512) + " dog"
    text = "look: " + malformed + " ; " + good

    pieces = parse(text, W, H)

    assert [type(p) for p in pieces] == [Text, Object]
    assert pieces[0].text == "look: " + malformed + " ; "
    assert pieces[1].label == "dog" and pieces[1].box == (0, 0, 320, 240)


def test_a_lone_malformed_output_is_one_text_piece():
    text = loc(100, 100, 200) + " cat"
    assert parse(text, W, H) == [Text(text)]
    assert parse("", W, H) == []


def test_display_labels_number_repeats_and_name_unlabelled_objects():
    text = " ; ".join(loc(0, 0, 512, 512) + " " + label for label in ["cat", "cat", "dog", "cat 2", "cat", "", ""])
    pieces = parse(text, W, H)
    assert [p.label for p in objects(pieces)] == ["cat", "cat", "dog", "cat 2", "cat", "", ""]
    shown = display_labels(pieces)
    assert [p.label for p in objects(shown)] == ["cat", "cat 2", "dog", "cat 2 2", "cat 3", "object", "object 2"]
    assert [p.text for p in shown] == [p.text for p in pieces]  # only the names change


@pytest.mark.parametrize("width, height", [(0, 10), (10, -1), (10.5, 10)])
def test_bad_image_size(width, height):
    with pytest.raises(ValueError, match="image size"):
        parse(loc(0, 0, 512, 512), width, height)


def test_format_object_writes_the_published_form():
    assert format_object("cat", (320, 120, 640, 360), W, H) == loc(256, 512, 768, 1023) + " cat"
    assert format_object("  cat ", (0, 0, 320, 240), W, H, seg_codes=CODES) == loc(0, 0, 512, 512) + SEGS + " cat"
    assert format_object("", (0, 0, 320, 240), W, H) == loc(0, 0, 512, 512)
    assert join_objects(["a", "b", "c"]) == "a ; b ; c"


@pytest.mark.parametrize(
    "args, message",
    [
        (("a;b", (0, 0, 10, 10)), "label"),
        (("a<b>", (0, 0, 10, 10)), "label"),
        (("cat", (0, 0, 700, 10)), "box"),
        (("cat", (10, 0, 5, 10)), "box"),
        (("cat", (0, 0, 10)), "box"),
    ],
)
def test_format_object_rejects_what_cannot_parse_back(args, message):
    with pytest.raises(ValueError, match=message):
        format_object(*args, W, H)


@pytest.mark.parametrize("codes", [CODES[:15], (128,) + CODES[1:], (-1,) + CODES[1:]])
def test_format_object_rejects_bad_seg_codes(codes):
    with pytest.raises(ValueError, match="seg_codes"):
        format_object("cat", (0, 0, 10, 10), W, H, seg_codes=codes)


@pytest.mark.parametrize("width, height", [(640, 480), (224, 224), (1920, 1080), (37, 2000)])
def test_format_then_parse_round_trips_within_one_bin(width, height):
    rng = np.random.default_rng(width)
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, width, 2))
        y1, y2 = sorted(rng.uniform(0, height, 2))
        if x2 - x1 < 2 or y2 - y1 < 2:  # smaller boxes may round to zero pixels
            continue
        codes = tuple(int(c) for c in rng.integers(0, 128, 16))
        text = join_objects([format_object("thing", (x1, y1, x2, y2), width, height, seg_codes=codes), "x"])

        (thing, rest) = parse(text, width, height)

        assert thing.label == "thing" and thing.seg_codes == codes and rest == Text("x")
        half_bin = np.array([width, height, width, height]) / 1024 / 2
        np.testing.assert_array_less(np.abs(np.array(thing.box) - [x1, y1, x2, y2]), half_bin + 0.5 + 1e-9)


@pytest.mark.parametrize("size", [1024, 1333, 4000])
def test_bins_round_trip_exactly_on_large_images(size):
    assert [pixel_to_bin(bin_to_pixel(b, size), size) for b in range(1024)] == list(range(1024))


def test_bin_edges():
    assert pixel_to_bin(0, 480) == 0 and pixel_to_bin(480, 480) == 1023  # clipped: there is no bin 1024
    assert bin_to_pixel(0, 480) == 0 and bin_to_pixel(1023, 480) == 480  # 479.53 rounds up to the edge
