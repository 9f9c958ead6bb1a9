"""The Pick-a-Pic v2 pair schema (``yuvalkirstain/pickapic_v2``), in one place.

``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded image bytes), ``label_0`` / ``label_1`` (1/0,
0/1, or 0.5/0.5 for a tie), ``has_label``, ``are_different``, plus ids we carry but do not need.

Readers need different subsets of it, named here so they cannot drift apart:

* :data:`REQUIRED_COLUMNS`: what the training loader (:mod:`diffalign.data.pickapic`) needs; the
  caption column is configurable (``data_opts.caption_column``) and ``label_1`` defaults to
  ``1 - label_0``, so neither is required;
* :data:`PAIR_COLUMNS`: every column the reward tools (:mod:`diffalign.rewards.pairs`: accuracy,
  relabelling, filtering) read and write back: caption and both labels included.
"""

from __future__ import annotations

CAPTION_COLUMN = "caption"
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABEL_COLUMNS = ("label_0", "label_1")

REQUIRED_COLUMNS = (*IMAGE_COLUMNS, LABEL_COLUMNS[0])
PAIR_COLUMNS = (CAPTION_COLUMN, *IMAGE_COLUMNS, *LABEL_COLUMNS)

# Column -> pyarrow type name (``getattr(pyarrow, name)()``) of the Pick-a-Pic v2 columns we write.
PICKAPIC_SCHEMA_TYPES = {
    "caption": "string", "jpg_0": "binary", "jpg_1": "binary", "label_0": "float64", "label_1": "float64",
    "has_label": "bool_", "are_different": "bool_", "model_0": "string", "model_1": "string",
    "ranking_id": "int64", "user_id": "int64", "best_image_uid": "string", "image_0_uid": "string",
    "image_1_uid": "string",
}

__all__ = ["CAPTION_COLUMN", "IMAGE_COLUMNS", "LABEL_COLUMNS", "PAIR_COLUMNS", "PICKAPIC_SCHEMA_TYPES", "REQUIRED_COLUMNS"]
