"""Per-row image status written by the embedders (column ``image_status``).

Every parquet row keeps its place; the status says what happened to its image:
- ``ok``: decoded and embedded.
- ``decode_failed``: the sample's image member exists but could not be decoded (truncated,
  garbage bytes, unsupported format); embedding is null and scores are NaN.
- ``missing_image``: the tar has no image member for this row's id (or no sample at all);
  embedding is null and scores are NaN.
"""
STATUS_COLUMN = "image_status"
OK = "ok"
DECODE_FAILED = "decode_failed"
MISSING_IMAGE = "missing_image"
STATUSES = (OK, DECODE_FAILED, MISSING_IMAGE)
