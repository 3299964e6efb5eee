"""JSON text for scripts: the one encoder behind every `--json`, `--json-file` and data file llavactl writes.

Non-ASCII text stays as itself, readable; what would break a terminal or a reader is written as a
``\\uXXXX`` escape, which decodes to exactly the same value: C0 controls (``json`` escapes those
already), DEL and the C1 controls (``\\x9b`` starts an escape sequence on many terminals), the line and
paragraph separators (line ends to JavaScript) and lone surrogates (which UTF-8 cannot encode).
"""

from __future__ import annotations

import json
import re

# Outside its strings JSON text is ASCII, so each of these is inside a string, where an escape is the same value.
_ESCAPED = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def dumps(value: object, *, indent: int | None = 2) -> str:
    """``value`` as JSON text that is safe to print and to write as UTF-8."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    return _ESCAPED.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
