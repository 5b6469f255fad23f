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

# What an embedder records per shard in NNNNN.stats.json (besides the status counts, which every
# write recomputes from the column); ``save_metadata`` carries these over to later saves.
EMBED_STATS_KEYS = ("tar", "samples_in", "embedded", "extra_in_tar", "embed_seconds", "images_per_second", "first_error")
