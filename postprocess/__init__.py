"""From PaliGemma's generated text to boxes, masks, pictures and JSON; no model needed.

pieces = parse(text, width, height)                      # Text and Object pieces, in order, the model's labels
pieces = MaskDecoder.load("vae-oid.npz").attach_masks(pieces, width, height)
data = to_json(pieces, width, height)                    # for download; to_coco_results for scoring
shown = display_labels(pieces)                           # "cat", "cat 2", "object": distinct names to show
picture = draw_annotations(image, shown)                 # PIL image for download
colors = label_colors(obj.label for obj in objects(shown))  # also the UI's color_map

Debugging one answer (see each module): object_confidences (confidence.py), draw_edge_bands (uncertainty.py),
model_eye (model_view.py), token_rows/table_values (token_table.py), parse_ground_truth/compare/draw_comparison
(ground_truth.py).
"""

from postprocess.colors import contrast_ratio, label_color, label_colors
from postprocess.confidence import EdgeBins, ObjectConfidence, object_confidences
from postprocess.draw import annotated_image_value, colors_on, draw_annotations, draw_tags, highlighted_text_value
from postprocess.export import mask_from_rle, mask_to_rle, to_coco_results, to_json
from postprocess.ground_truth import Comparison, Match, compare, draw_comparison, parse_ground_truth
from postprocess.model_view import model_eye, model_input, squash_note
from postprocess.parse import (
    Object,
    Piece,
    Text,
    bin_to_pixel,
    display_labels,
    format_object,
    join_objects,
    objects,
    parse,
    pixel_to_bin,
)
from postprocess.token_table import TOKEN_COLUMNS, TokenRow, table_values, token_rows
from postprocess.uncertainty import draw_edge_bands, edge_band_overlay
from postprocess.vqvae import (
    MaskDecoder,
    decode_codes,
    init_decoder_params,
    load_vqvae_params,
    mask_to_image,
    params_to_published,
)

__all__ = [
    "Comparison",
    "EdgeBins",
    "MaskDecoder",
    "Match",
    "Object",
    "ObjectConfidence",
    "Piece",
    "TOKEN_COLUMNS",
    "Text",
    "TokenRow",
    "annotated_image_value",
    "bin_to_pixel",
    "colors_on",
    "compare",
    "contrast_ratio",
    "decode_codes",
    "display_labels",
    "draw_annotations",
    "draw_comparison",
    "draw_edge_bands",
    "draw_tags",
    "edge_band_overlay",
    "format_object",
    "highlighted_text_value",
    "init_decoder_params",
    "join_objects",
    "label_color",
    "label_colors",
    "load_vqvae_params",
    "mask_from_rle",
    "mask_to_image",
    "mask_to_rle",
    "model_eye",
    "model_input",
    "object_confidences",
    "objects",
    "params_to_published",
    "parse",
    "parse_ground_truth",
    "pixel_to_bin",
    "squash_note",
    "table_values",
    "to_coco_results",
    "to_json",
    "token_rows",
]
