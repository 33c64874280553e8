"""The shared bad-input checks: one-line errors that name the file, the place and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.errors import (
    DataError,
    MissingDataError,
    check_relative_file_name,
    read_json,
    unsafe_file_name,
)


@pytest.mark.parametrize("name", ["", "/etc/passwd", "\\share\\a.png", "../a.png", "a/../../b.png", "C:\\a.png",
                                  "C:a.png", "a\\..\\..\\b.png"])
def test_names_that_leave_the_images_folder_are_refused(name: str) -> None:
    assert unsafe_file_name(name)
    with pytest.raises(DataError, match=r"^labels\.json: file name .* escapes the images folder .*relative"):
        check_relative_file_name(name, "labels.json: file name")


@pytest.mark.parametrize("name", ["a.png", "sub/dir/a.png", "sub\\a.png", "a..b.png", "./a.png"])
def test_relative_names_inside_the_folder_pass(name: str) -> None:
    assert not unsafe_file_name(name)
    check_relative_file_name(name, "labels.json: file name")


def test_read_json_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    with pytest.raises(MissingDataError, match="^set data.root$"):
        read_json(path, "set data.root")
    path.write_text('{"images": [],\n  "categories": [,]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:2:18: malformed JSON \(.*line 2, column 18\)") as caught:
        read_json(path, "unused")
    assert "\n" not in str(caught.value)
    path.write_bytes(b'{"name": "caf\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"a\.json: not UTF-8"):
        read_json(path, "unused")
    path.write_text('{"ok": [1, 2]}', encoding="utf-8")
    assert read_json(path, "unused") == {"ok": [1, 2]}
