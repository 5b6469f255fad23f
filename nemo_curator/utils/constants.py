"""Shared names and defaults: the one place for column names, statuses, the default model and cuts.

Every module that writes or reads these columns, and every default that users see in more than one
place (the Python API, the command line, the demo, the report), takes it from here.
"""
from __future__ import annotations

# -- columns --------------------------------------------------------------------------------------
DEFAULT_ID_COL = "key"  # img2dataset's name for a sample's key
EMBEDDING_COLUMN = "image_embedding"  # float32 array of D values per row; null where the image failed
STATUS_COLUMN = "image_status"  # one of STATUSES per row (see below)
AESTHETIC_COLUMN = "aesthetic_score"  # AVA 1-10 scale, float32; NaN where the image failed
NSFW_COLUMN = "nsfw_score"  # probability in [0, 1], float32; NaN where the image failed
KEEP_COLUMN = "keep"  # the boolean filter column that the command line and the demo write

# -- per-row image status (column ``image_status``) -------------------------------------------
# Every parquet row keeps its place; the status says what happened to its image:
OK = "ok"  # decoded and embedded
DECODE_FAILED = "decode_failed"  # the image member exists but could not be decoded; embedding null, scores NaN
MISSING_IMAGE = "missing_image"  # the tar has no image member (or no sample) for this row's id
STATUSES = (OK, DECODE_FAILED, MISSING_IMAGE)
EXTRA_IN_TAR = "extra_in_tar"  # per-shard count (not a row status): samples in the tar without a metadata row

# -- models ---------------------------------------------------------------------------------------
DEFAULT_MODEL = "vit_large_patch14_clip_quickgelu_224.openai"  # CLIP ViT-L/14 (768-d), what the heads expect
# A CLIP-shaped ViT small enough for CPU smoke runs and tests: keeps the 768-d head and the real transform.
TINY_MODEL_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SMOKE_WARNING = ("SMOKE MODE: a tiny random model and random heads - the scores mean nothing "
                 "(this run only shows that the pipeline works)")
HEAD_NAMES = ("aesthetic", "nsfw")  # the classifier heads by command-line name
PRECISIONS = ("auto", "bf16", "fp32")  # see nemo_curator.utils.device.resolve_bf16

# -- deduplication ------------------------------------------------------------------------------
DEDUP_KEEP_COLUMN = "is_unique"  # the boolean column the deduplicators write (False: remove)
HASH_COLUMN = "sha256"  # hex SHA-256 of a sample's image bytes (img2dataset writes it)
WHICH_TO_KEEP = ("hard", "easy", "random")  # SemDeDup's choice of the row kept in a group
SIM_METRICS = ("cosine", "l2")  # the distance to the centroid that ranks a cluster's rows

# -- filter cuts ----------------------------------------------------------------------------------
DEFAULT_AESTHETIC_THRESHOLD = 6.0  # keep aesthetic_score above it (5, 6 and 6.5 are common cuts)
DEFAULT_NSFW_THRESHOLD = 0.5  # keep nsfw_score below it
DEFAULT_FILTER = f"{AESTHETIC_COLUMN} > {DEFAULT_AESTHETIC_THRESHOLD:g} and {NSFW_COLUMN} < {DEFAULT_NSFW_THRESHOLD:g}"
