"""From PaliGemma's generated text to boxes, masks, pictures and JSON; no model needed.

pieces = parse(text, width, height)                      # Text and Object pieces, in order
pieces = MaskDecoder.load("vae-oid.npz").attach_masks(pieces, width, height)
picture = draw_annotations(image, pieces)                # PIL image for download
colors = label_colors(obj.label for obj in objects(pieces))  # also the UI's color_map
"""

from postprocess.colors import label_color, label_colors
from postprocess.draw import annotated_image_value, draw_annotations, highlighted_text_value
from postprocess.export import mask_from_rle, mask_to_rle, to_coco_results, to_json
from postprocess.parse import (
    Object,
    Piece,
    Text,
    bin_to_pixel,
    format_object,
    join_objects,
    objects,
    parse,
    pixel_to_bin,
)
from postprocess.vqvae import (
    MaskDecoder,
    decode_codes,
    init_decoder_params,
    load_vqvae_params,
    mask_to_image,
    params_to_published,
)

__all__ = [
    "MaskDecoder",
    "Object",
    "Piece",
    "Text",
    "annotated_image_value",
    "bin_to_pixel",
    "decode_codes",
    "draw_annotations",
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
    "objects",
    "params_to_published",
    "parse",
    "pixel_to_bin",
    "to_coco_results",
    "to_json",
]
