"""Writing runner results: CSV tables, markdown reports and matplotlib figures, atomically.

Numbers in markdown tables are formatted by `fmt` (NaN as "—"), and `read_markdown_tables`
parses a report back into DataFrames of strings, so a test can check that every number in a
report equals the CSV it came from. Figures use matplotlib's non-interactive Agg backend
(`pip install matplotlib`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from sae.io import atomic_path

MISSING = "—"


def fmt(value: Any, spec: str = ".3g") -> str:
    """One table cell: NaN / None as "—", ints as ints, floats with `spec`, anything else str()."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if spec == "d":
            return str(int(value)) if value.is_integer() else format(value, "g")
        return format(value, spec)
    try:                                            # numpy scalars
        return fmt(value.item(), spec)
    except AttributeError:
        return str(value)


def markdown_table(df: pd.DataFrame, columns: Sequence[str], formats: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> str:
    """A GitHub markdown table of `columns` of `df`, each cell through `fmt` with formats[col]."""
    formats, headers = formats or {}, headers or {}
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table (it has {list(df.columns)})")
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = ["| " + " | ".join(fmt(row[c], formats.get(c, ".3g")) for c in columns) + " |"
            for _, row in df.iterrows()]
    return "\n".join([head, rule, *rows])


def read_markdown_tables(text: str) -> list[pd.DataFrame]:
    """Every markdown table in `text`, in order, as DataFrames of cell strings."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if len(block) >= 2:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            tables.append(pd.DataFrame(cells[2:], columns=cells[0]))
        block = []
    return tables


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` as CSV atomically; list cells (feature ids) become space-separated strings."""
    out = df.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, tuple))).any():
            out[col] = out[col].map(lambda v: " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the runners draw their figures with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def timings_line(timings: dict[str, float]) -> str:
    """"setup 12 s, search 80 s, ..." from {name_s: seconds}."""
    return ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timings.items())


def bullet_list(items: Iterable[str]) -> str:
    return "\n".join(f"- {x}" for x in items)


def write_outputs(name: str, df: pd.DataFrame, out_dir: str | Path, plot: Any, markdown: str) -> dict[str, Path]:
    """Write NAME.csv, NAME_summary.csv (from df.attrs["summary"]), NAME.png (plot(df, path)) and
    NAME.md (`markdown`) into out_dir, each atomically; returns {kind: path}."""
    out = Path(out_dir)
    return {"csv": write_csv(df, out / f"{name}.csv"),
            "summary_csv": write_csv(df.attrs["summary"], out / f"{name}_summary.csv"),
            "png": plot(df, out / f"{name}.png"),
            "md": write_text(out / f"{name}.md", markdown)}


def print_outputs(df: pd.DataFrame) -> None:
    """Print the markdown report written by `write_outputs` (df.attrs["files"]) and the file list."""
    files = df.attrs["files"]
    print(Path(files["md"]).read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))
