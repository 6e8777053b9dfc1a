"""Markdown tables of pandas frames, for every layer (the evaluation's report, the IQA audit).

This module imports nothing of the package: the evaluation adds its metric labels and directions
(``qualiteacher.eval.report.markdown_table``), the audit its own headers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd


def markdown_table(df: pd.DataFrame, digits: int = 4, headers: Mapping[str, str] | None = None,
                   best: Mapping[str, bool] | None = None) -> str:
    """``df`` as a Markdown table, one row per index entry (the first header: the index's name, else
    "restorer"). ``headers``: column -> header text (default the column's name). ``best``: column ->
    True (highest is best) / False (lowest), whose best value among the rows is bold. NaN shows as
    "–"; integer columns (and ``images``) as integers; other floats with ``digits`` decimals."""
    headers, best = headers or {}, best or {}
    bold = {}
    for column, higher in best.items():
        values = pd.to_numeric(df[column], errors="coerce") if column in df.columns else pd.Series(dtype=float)
        if values.notna().sum() > 1:
            bold[column] = values.max() if higher else values.min()
    integer = {c for c in df.columns if c == "images" or pd.api.types.is_integer_dtype(df[c])}
    names = [df.index.name or "restorer", *(headers.get(c, str(c)) for c in df.columns)]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for name, row in df.iterrows():
        cells = [str(name)]
        for column, value in row.items():
            if isinstance(value, (int, float)) and math.isnan(value):
                cells.append("–")
            elif column in integer:  # a row of mixed columns holds its integers as floats
                cells.append(str(int(value)))
            elif isinstance(value, float):
                text = f"{value:.{digits}f}"
                cells.append(f"**{text}**" if column in bold and value == bold[column] else text)
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
