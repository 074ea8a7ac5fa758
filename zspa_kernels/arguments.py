"""Checks of the command-line arguments that ``zspa``'s commands and the examples share: a budget
read as ``prune(keep=...)`` reads one, a local checkpoint folder, an output folder. Each says what
is wrong in the words of a usage message, before anything is built or loaded."""
from __future__ import annotations

import pathlib
from typing import Optional, Union

from .spec import as_keep


def parse_keep(text: str) -> Union[int, float]:
    """A ``--keep`` value as the library reads one: an int count, else a float fraction."""
    try:
        keep = int(text)
    except ValueError:
        try:
            keep = float(text)
        except ValueError:
            raise ValueError(f"keep: expected an int count >= 1 or a fraction in (0, 1], got {text!r}") from None
    return as_keep(keep)


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a local checkpoint folder, or None. Checked before anything loads: a
    name that is not a folder would be taken for a Hub repository and downloaded."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        return f"expected a local checkpoint folder, got {path!r}"
    if not (folder / "config.json").is_file():
        return f"expected a local checkpoint folder with a config.json, got {path!r}"
    return None


def out_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be an output folder (it, or a folder above it, is a file), or None.
    Nothing is created: the commands make it once they have something to write."""
    for existing in (p for p in (pathlib.Path(path), *pathlib.Path(path).parents) if p.exists()):
        return None if existing.is_dir() else f"expected an output folder, but {str(existing)!r} is not a folder"
    return None
