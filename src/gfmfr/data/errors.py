"""Errors for bad input data, naming the file, line and field."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input: names the file, the 1-based line (or row) and the field (column)."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
