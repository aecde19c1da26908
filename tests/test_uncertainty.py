"""Box-edge bands: each bin of an edge's distribution becomes a strip at its pixel, as opaque as it is probable."""

import numpy as np
import pytest
from PIL import Image, ImageColor

from postprocess.confidence import EdgeBins
from postprocess.parse import bin_to_pixel
from postprocess.uncertainty import BAND_COLOR, MAX_ALPHA, draw_edge_bands, edge_band_overlay

W, H = 2048, 1024  # 2 and 1 pixels a bin across and down


def _edges(y1, x1, y2, x2):
    return [
        {"edge": name, "bins": list(bins), "probs": list(probs)}
        for name, (bins, probs) in zip(("y1", "x1", "y2", "x2"), (y1, x1, y2, x2))
    ]


def test_strips_sit_at_their_bins_with_opacity_by_probability():
    box = (bin_to_pixel(200, W), bin_to_pixel(100, H), bin_to_pixel(600, W), bin_to_pixel(500, H))  # x1 y1 x2 y2
    edges = _edges(([100, 104], [0.8, 0.2]), ([200], [1.0]), ([500, 490, 510], [0.5, 0.3, 0.2]), ([600], [0.9]))
    alpha = np.asarray(edge_band_overlay(W, H, [box], [edges]))[..., 3].astype(float) / 255
    x_mid, y_mid = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    assert alpha[100, x_mid] == pytest.approx(0.8 * MAX_ALPHA, abs=1 / 255)  # top edge, the written bin
    assert alpha[104, x_mid] == pytest.approx(0.2 * MAX_ALPHA, abs=1 / 255)  # its runner-up 4 bins lower
    assert alpha[102, x_mid] == 0  # no probability between them
    assert alpha[100, box[0] - 1] == 0 and alpha[100, box[2] + 2] == 0  # strips span the box only (x2 bin: 2 px)
    assert alpha[y_mid, 400] == pytest.approx(MAX_ALPHA, abs=1 / 255)  # left edge, bin 200 → pixel 400, sure
    assert alpha[y_mid, 401] == pytest.approx(MAX_ALPHA, abs=1 / 255)  # a bin is 2 pixels wide here
    assert [round(alpha[y, x_mid] / MAX_ALPHA, 2) for y in (500, 490, 510)] == [0.5, 0.3, 0.2]
    assert alpha[y_mid, 1200] == pytest.approx(0.9 * MAX_ALPHA, abs=1 / 255)
    assert (alpha > 0).sum() < 0.02 * W * H  # nothing else drawn
    rgb = np.asarray(edge_band_overlay(W, H, [box], [edges]))[100, x_mid, :3]
    assert tuple(rgb) == ImageColor.getrgb(BAND_COLOR)


def test_edge_records_as_objects_and_a_small_image_keep_one_pixel_strips():
    edges = [EdgeBins(name, 10, [10, 11], [0.6, 0.4]) for name in ("y1", "x1", "y2", "x2")]
    alpha = np.asarray(edge_band_overlay(224, 224, [(0, 0, 100, 100)], [edges]))[..., 3]
    row = bin_to_pixel(10, 224)
    assert bin_to_pixel(11, 224) == row  # both bins fall on one pixel row: the more probable one shows
    assert alpha[row, 50] == round(0.6 * MAX_ALPHA * 255)


def test_bands_drawn_on_the_image_blend_each_box_in_its_colour():
    image = Image.new("RGB", (W, H), (0, 0, 0))
    boxes = [(400, 100, 1200, 500), (1400, 600, 1800, 900)]
    sure = _edges(*[([b], [1.0]) for b in (100, 200, 500, 600)])
    other = _edges(*[([b], [0.5]) for b in (600, 700, 900, 900)])
    drawn = np.asarray(draw_edge_bands(image, boxes, [sure, other], ["#ff0000", "#00ff00"]))
    assert tuple(drawn[100, 800]) == (round(255 * MAX_ALPHA), 0, 0)
    assert tuple(drawn[600, 1600]) == (0, round(255 * MAX_ALPHA * 0.5), 0)
    assert tuple(drawn[300, 800]) == (0, 0, 0)


def test_bad_input_is_refused():
    edges = _edges(*[([1], [1.0])] * 4)
    with pytest.raises(ValueError, match="1 boxes, 2 edge lists"):
        edge_band_overlay(10, 10, [(0, 0, 5, 5)], [edges, edges])
    with pytest.raises(ValueError, match="4 edges"):
        edge_band_overlay(10, 10, [(0, 0, 5, 5)], [edges[:3]])
    with pytest.raises(ValueError, match="probabilities in"):
        edge_band_overlay(10, 10, [(0, 0, 5, 5)], [_edges(*[([1], [1.5])] * 4)])
    with pytest.raises(ValueError, match="one probability per bin"):
        edge_band_overlay(10, 10, [(0, 0, 5, 5)], [_edges(*[([1, 2], [1.0])] * 4)])
