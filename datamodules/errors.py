"""Bad input: the errors every data module raises and the checks that several formats share.

A ``DataError`` message is one line a user can act on: which file (and line, key or entry), what is
wrong, and how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any


class DataError(ValueError):
    """The data on disk is not what the loader needs; the message says which file and how to fix it."""


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder the data configuration points to does not exist."""


def unsafe_file_name(file_name: str) -> bool:
    """True if ``file_name`` is absolute or walks up with ``..`` (on POSIX or Windows rules)."""
    if not file_name or file_name.startswith(("/", "\\")):
        return True
    for pure in (PurePosixPath(file_name), PureWindowsPath(file_name)):
        if pure.is_absolute() or pure.drive or ".." in pure.parts:
            return True
    return False


def check_relative_file_name(file_name: str, where: str) -> None:
    """``DataError`` starting with ``where`` (e.g. ``"labels.json: file name"``) unless ``file_name``
    stays inside the images folder."""
    if unsafe_file_name(file_name):
        raise DataError(
            f"{where} {file_name!r} escapes the images folder (absolute path or '..'). "
            "Use a path relative to the images folder."
        )


def read_json(path: Path, missing: str) -> Any:
    """The parsed UTF-8 JSON file ``path``: ``MissingDataError(missing)`` when it does not exist,
    ``DataError`` with line and column when it is malformed."""
    if not path.is_file():
        raise MissingDataError(missing)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}, line {e.lineno}, column {e.colno}). "
            "Fix the file there or regenerate it."
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}). JSON files must be UTF-8.") from e
