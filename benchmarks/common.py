"""Helpers shared by the benchmark scripts: process memory, CPU name, JSON output."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path


def max_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit_json(doc: dict, out: Path | None) -> None:
    """Print the result document on stdout and, when asked, write it to ``out`` too."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
