"""Text from outside, made safe to print with rich: `shown`.

A status event, a SQLite file or an argument may hold anything the wire format takes: rich
would read `[red]x[/red]` in it as style and raise on `etl[/]`, and a control character
(ESC) would reach the terminal and move the cursor, clear the screen or restyle what
follows. Every command and the demo print such text through `shown`.
"""

from __future__ import annotations

import re

from rich.text import Text

# C0 and C1 control characters (rich's Text passes ESC through), and the bidirectional
# overrides and isolates, which reorder what follows them on the line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(value: object, *, keep_newlines: bool = False) -> Text:
    """`value` as a `Text`, so rich reads no markup in it, with its control characters
    (bidirectional overrides among them) and lone surrogates written as escapes."""
    text = "" if value is None else str(value)
    control = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    text = control.sub(_escaped, text)
    # A lone surrogate (an argument's undecodable byte) would make printing it raise.
    return Text(text.encode("utf-8", "backslashreplace").decode("utf-8"))
