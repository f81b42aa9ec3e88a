"""The configuration reference, ``docs/config.md``, generated from the config dataclasses.

``python -m gfmfr.docs`` writes it; ``python -m gfmfr.docs --check`` exits 1 when the committed file
differs from what the code says. Each field's text is the docstring written under it in
:mod:`gfmfr.config` (read from the source, as Python keeps no attribute docstrings at run time).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

from gfmfr import config

OUT = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls``, whitespace folded."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = markdown(str(after.value.value))
    return docs


def markdown(text: str) -> str:
    """A docstring as one line of Markdown: whitespace folded, reST roles and literals as code."""
    text = re.sub(r":(?:mod|class|func|meth|attr|data):`~?([^`]+)`", r"`\1`", " ".join(text.split()))
    return text.replace("``", "`")


def type_name(tp: object) -> str:
    """A field's type as a reader writes it: ``"a" | "b"`` for choices, ``int | None`` ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f'"{a}"' for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if args and type(None) in args:
        return " \\| ".join(type_name(a) for a in args if a is not type(None)) + " \\| none"
    return getattr(tp, "__name__", str(tp))


def default_text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def section_rows(cls: Any) -> list[str]:
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    instance = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        text = docs.get(f.name, "").replace("|", "\\|")
        rows.append(
            f"| `{f.name}` | {type_name(hints[f.name])} | `{default_text(getattr(instance, f.name))}` | {text} |"
        )
    return rows


def render() -> str:
    """``docs/config.md`` as the code defines it."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/gfmfr/config/schema.py` by `python -m gfmfr.docs`; do not edit by hand. A run reads a",
        "TOML file (`--config FILE`) whose sections are the headings below and takes `--set section.key=value`",
        "overrides; `gfmfr config` prints the resolved configuration. Values outside a field's range are refused",
        "when the configuration loads.",
        "",
    ]
    top = config.RunConfig
    hints = typing.get_type_hints(top)
    lines += ["## Top level", "", *section_rows(top), ""]
    for f in dataclasses.fields(top):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            lines += [f"## [{f.name}]", "", markdown(cls.__doc__ or ""), "", *section_rows(cls), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gfmfr.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is out of date")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            sys.stderr.write(f"{args.out} is out of date: run python -m gfmfr.docs\n")
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
