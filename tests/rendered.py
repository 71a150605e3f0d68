"""Reading rendered output back in tests, so that they assert on structure and numbers rather than
on wording: markdown pipe tables as rows of cells, the numbers in a cell or a line, image links, and
the one error line a failed CLI command prints."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table in `text` (a header line, a |---| line, then rows), each as its rows
    {column header: cell}. A row with fewer cells than the header (a merged failure row) gives ''
    for the columns it lacks; a row with more cells is an error (the table is malformed)."""
    lines = text.splitlines()
    tables = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1]):
            header = _cells(lines[i])
            assert len(set(header)) == len(header), f"repeated column headers: {header}"
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = _cells(lines[i])
                assert len(cells) <= len(header), f"{len(cells)} cells under {len(header)} headers: {lines[i]}"
                rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def markdown_table(text: str, first_column: str | None = None) -> list[dict[str, str]]:
    """The one table of `text` (or the one whose first column header is `first_column`)."""
    tables = [t for t in markdown_tables(text) if first_column is None or (t and next(iter(t[0])) == first_column)]
    assert len(tables) == 1, f"{len(tables)} tables found"
    return tables[0]


def column(table: list[dict[str, str]], prefix: str) -> str:
    """The one column header of `table` that starts with `prefix` (headers may carry a parameter,
    e.g. 'time to first token, 8-token prompt (s)')."""
    names = [h for h in table[0] if h.startswith(prefix)]
    assert len(names) == 1, (prefix, list(table[0]))
    return names[0]


def numbers(text: str) -> list[float]:
    """Every number in `text`, in order ('3.170 | 50%' -> [3.17, 50.0])."""
    return [float(m) for m in _NUMBER.findall(text)]


def number(cell: str) -> float:
    """The one number of a cell ('52 MB', '71.000', '12%' -> 52.0, 71.0, 12.0)."""
    found = numbers(cell)
    assert len(found) == 1, f"not one number in {cell!r}"
    return found[0]


def image_links(text: str) -> list[str]:
    """The targets of the markdown images in `text`, in order."""
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)


def warnings_logged(caplog) -> list[str]:
    """The messages of the WARNING (or worse) records pytest's caplog holds."""
    import logging

    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def error_line(code: int, err: str) -> str:
    """A usage failure of the CLI: exit code 2, no traceback, exactly one 'lowbit: error:' line on
    stderr. Returns that line, for asserts on what it names."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1, err
    return lines[0]
