"""Filter expressions (nemo_curator.filtering): per-row evaluation with pandas' eval, the allowed
syntax, the columns an expression names. The lazy filter column on a dataset and the `filter`
subcommand are tested with the command line (tests/scripts/test_cli.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nemo_curator.filtering import FilterExpressionError, check_expression, evaluate_filter, expression_columns


def test_evaluate_filter_is_per_row_and_drops_nan_scores():
    frame = pd.DataFrame({"aesthetic_score": np.array([7, 5, np.nan, 6.5], np.float32),
                          "nsfw_score": np.array([0.1, 0.1, 0.1, 0.9], np.float32),
                          "my col": [1, 2, 3, 4]})
    keep = evaluate_filter(frame, "aesthetic_score > 6 and nsfw_score < 0.5")
    assert keep.dtype == bool and keep.tolist() == [True, False, False, False]
    assert evaluate_filter(frame, "not (`my col` in [1, 2]) | (aesthetic_score >= 7)").tolist() == [True, False, True, True]
    nullable = pd.DataFrame({"flag": pd.array([True, None, False], dtype="boolean")})
    assert evaluate_filter(nullable, "flag").tolist() == [True, False, False]
    assert expression_columns("a > 1 and `b c` < 2 or a < 0") == ["b c", "a"]
    for bad in ("a = 1", "@frame", "a.b > 1", "lambda: 1", ""):
        with pytest.raises(FilterExpressionError):
            check_expression(bad)
