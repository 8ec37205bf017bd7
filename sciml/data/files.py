"""Finding the files a user names: a file, a folder, a glob, or a list of them."""
from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from sciml.errors import SciMLError


def find_files(path: str | Path | Sequence[str | Path], patterns: Sequence[str], key: str = "data.path"
               ) -> list[Path]:
    """What a user may give as `data.path`: a file, a folder (its files matching `patterns`), a glob, or a list of
    these; sorted within each entry, duplicates removed. Nothing found is a one-line error naming the key."""
    if not isinstance(path, (str, Path)):
        found = [f for p in path for f in find_files(p, patterns, key)]
        if not found:
            raise SciMLError(f"{key}: empty list of files")
        return list(dict.fromkeys(found))
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not files:
            raise SciMLError(f"{key}: no files match '{text}'")
    elif Path(text).is_dir():
        files = sorted({f for pattern in patterns for f in Path(text).glob(pattern) if f.is_file()})
        if not files:
            raise SciMLError(f"{key}: no {', '.join(patterns)} files in the folder '{text}'")
    elif Path(text).is_file():
        files = [Path(text)]
    else:
        raise SciMLError(f"{key}: no such file or folder '{text}'")
    return [f.resolve() for f in files]
