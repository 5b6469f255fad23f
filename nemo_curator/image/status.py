"""Per-row image status written by the embedders (column ``image_status``): names re-exported from
``nemo_curator.utils.constants``, where they are defined.

- ``ok``: decoded and embedded.
- ``decode_failed``: the sample's image member exists but could not be decoded (truncated,
  garbage bytes, unsupported format); embedding is null and scores are NaN.
- ``missing_image``: the tar has no image member for this row's id (or no sample at all);
  embedding is null and scores are NaN.
"""
from nemo_curator.utils.constants import DECODE_FAILED, EXTRA_IN_TAR, MISSING_IMAGE, OK, STATUS_COLUMN, STATUSES

__all__ = ["DECODE_FAILED", "EXTRA_IN_TAR", "MISSING_IMAGE", "OK", "STATUS_COLUMN", "STATUSES"]
