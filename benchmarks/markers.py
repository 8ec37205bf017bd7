"""Rewrite one marked block of a markdown file (`<!-- NAME:begin -->` ... `<!-- NAME:end -->`), leaving the
hand-written text around it; a block not yet in the file is appended."""
from __future__ import annotations

from pathlib import Path


def replace_block(doc: Path, name: str, table: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else ""
    if begin not in text or end not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + f"{begin}\n{end}\n"
    start, stop = text.index(begin) + len(begin), text.index(end)
    doc.write_text(text[:start] + "\n" + table + "\n" + text[stop:])
    print(f"written to {doc}")
