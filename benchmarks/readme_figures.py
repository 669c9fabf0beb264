"""Writes a benchmark's figures into the README between its markers, so that a README number is always the
output of the script that measured it (``<!-- name -->`` ... ``<!-- /name -->``)."""
from __future__ import annotations

import re
from pathlib import Path


def write_between_markers(readme: Path, name: str, text: str, inline: bool = False) -> None:
    """Replace what stands between ``<!-- name -->`` and ``<!-- /name -->`` in ``readme`` with ``text`` (on lines of
    its own, or ``inline`` within one line, e.g. a table cell)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    content = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no {start} ... {end} block to write the figures into")
    block = f"{start} {text} {end}" if inline else f"{start}\n{text}\n{end}"
    readme.write_text(pattern.sub(lambda _: block, content))
