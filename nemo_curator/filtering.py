"""Row filters written as expressions over metadata columns: ``"aesthetic_score > 6 and nsfw_score < 0.5"``.

An expression is evaluated with ``pandas.DataFrame.eval`` on each partition (never Python's
``eval``). It may use column names (```odd name``` in backticks), numbers, strings, comparisons,
``and``/``or``/``not`` (or ``&``/``|``/``~``), ``in``/``not in`` lists and arithmetic; nothing
else (no calls, no attributes, no ``@`` variables). Per-row only: a score that is NaN (the image
failed) compares False, so its row is dropped.
"""
from __future__ import annotations

import ast
import re

import numpy as np
import pandas as pd

from nemo_curator.utils.constants import DEFAULT_FILTER, KEEP_COLUMN
from nemo_curator.utils.frames import object_columns, to_pandas
from nemo_curator.utils.resume import LineageStep

DEFAULT_KEEP_COLUMN = KEEP_COLUMN

_ALLOWED_NODES = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Name, ast.Load, ast.Constant, ast.List,
    ast.Tuple, ast.And, ast.Or, ast.Not, ast.Invert, ast.USub, ast.UAdd, ast.Add, ast.Sub, ast.Mult, ast.Div,
    ast.Mod, ast.Pow, ast.FloorDiv, ast.BitAnd, ast.BitOr, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    ast.In, ast.NotIn,
)
_BACKTICKED = re.compile(r"`[^`]*`")
_PLACEHOLDER = "_backticked_column_"  # stands for a `quoted name` while the syntax is checked


class FilterExpressionError(ValueError):
    """A filter expression is invalid, names an unknown column, or does not give one bool per row."""


def check_expression(expr: str) -> ast.Expression:
    """Parse ``expr``; raise FilterExpressionError unless it uses only the allowed syntax (module docstring).

    Returns the syntax tree, with each ```quoted name``` replaced by a placeholder name.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise FilterExpressionError(f"the filter expression must be a non-empty string, got {expr!r}")
    try:
        tree = ast.parse(_BACKTICKED.sub(_PLACEHOLDER, expr.strip()), mode="eval")
    except SyntaxError as err:
        raise FilterExpressionError(f"invalid filter expression {expr!r}: {err.msg} "
                                    f"(example: {DEFAULT_FILTER!r})") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise FilterExpressionError(
                f"filter expression {expr!r} uses {type(node).__name__} syntax, which is not allowed: use column "
                f"names, numbers, strings, comparisons, and/or/not and arithmetic (example: {DEFAULT_FILTER!r})")
    return tree


def evaluate_filter(frame, expr: str) -> pd.Series:
    """``expr`` evaluated on one partition: a bool Series with one value per row (same index).

    ``frame``: pandas or cuDF. Nullable booleans count as False where null.
    """
    check_expression(expr)
    pdf = to_pandas(frame)
    try:
        result = pdf.eval(expr.strip())
    except NameError as err:  # pandas' UndefinedVariableError
        raise FilterExpressionError(f"filter expression {expr!r}: {err}; the columns are {list(pdf.columns)}") from None
    except Exception as err:  # e.g. comparing a string column with a number
        raise FilterExpressionError(f"filter expression {expr!r} cannot be evaluated on the metadata: "
                                    f"{type(err).__name__}: {err}") from None
    if not isinstance(result, pd.Series) or len(result) != len(pdf):
        raise FilterExpressionError(f"filter expression {expr!r} must give one True/False per row, "
                                    f"got {type(result).__name__}")
    if result.dtype == bool:
        return result
    if pd.api.types.is_bool_dtype(result.dtype):  # nullable boolean
        return result.fillna(False).astype(bool)
    raise FilterExpressionError(f"filter expression {expr!r} gives {result.dtype} values, not True/False: write a "
                                f"condition such as {DEFAULT_FILTER!r}")


def add_filter_column(dataset, expr: str, column: str = DEFAULT_KEEP_COLUMN):
    """A new dataset whose metadata gains the bool ``column`` = ``expr`` per row (lazy, one task per shard).

    The expression is checked against the metadata's columns and dtypes up front, so a typo fails
    here, before anything is computed.
    """
    meta = dataset.metadata._meta
    evaluate_filter(to_pandas(meta), expr)
    new_meta = meta.assign(**{column: np.array([], dtype=bool)})
    with object_columns():
        metadata = dataset.metadata.map_partitions(_with_filter_column, expr, column, meta=new_meta)
    return dataset.with_metadata(metadata, lineage_step=LineageStep("filter", f"{column}={expr.strip()}"))


def _with_filter_column(frame, expr: str, column: str):
    return frame.assign(**{column: evaluate_filter(frame, expr).to_numpy()})


def expression_columns(expr: str) -> list[str]:
    """The column names ``expr`` refers to (backticked ones first), each once."""
    tree = check_expression(expr)
    names = [m[1:-1] for m in _BACKTICKED.findall(expr)]
    names += [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id != _PLACEHOLDER]
    return list(dict.fromkeys(names))
