"""Write one benchmark's table into its own section of benchmarks/RESULTS.md.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` so
several scripts can update the file without clobbering each other. Writes are atomic.
"""

import os
import platform
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Every table is written by the script named in it; rerun with `make bench`.\n"
)


def machine_line() -> str:
    """One line naming the machine, so numbers are never quoted without their hardware."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def update_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``body``."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n\n_Updated {stamp}._\n<!-- END {name} -->"
    text = path.read_text() if path.exists() else HEADER
    tag = re.escape(name)
    pattern = re.compile(rf"<!-- BEGIN {tag} -->.*?<!-- END {tag} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS.", suffix=".md")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
