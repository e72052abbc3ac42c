"""How dtsd shows people text that is not its own, and how a job ended: one rule for
dtsctl's terminal and the web UI's pages.

Standard library only, and light: dtsctl and the web child both import it.
"""

from __future__ import annotations

import signal

# What dtsctl and the web UI never show as it is (dtsctl's docstring says when a job's
# output bytes go out exact): every Unicode control character, general category Cc (C0
# U+0000-U+001F, DEL U+007F, C1 U+0080-U+009F), and the Bidi_Control characters, which
# reorder what a person reads ("Trojan Source"): U+061C, U+200E-U+200F, U+202A-U+202E,
# U+2066-U+2069.
_CONTROL_CODES = (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))
_BIDI_CONTROL_CODES = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_SHORT_ESCAPES = {0x09: r"\t", 0x0A: r"\n", 0x0D: r"\r"}


def _shown_as(code: int) -> str:
    r"""Python's spelling: `\t` `\n` `\r`, `\xNN` below U+0080, `\u009b` or `\u202e` above.

    `\xNN` also stands for a byte that is not UTF-8 (dtsctl's `output_text`), so a C1 character,
    which is valid UTF-8, reads differently (`\u009b`) from a stray 0x9B byte (`\x9b`).
    """
    if code in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[code]
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


ESCAPES = {code: _shown_as(code) for code in (*_CONTROL_CODES, *_BIDI_CONTROL_CODES)}
_LAYOUT_ESCAPES = {code: text for code, text in ESCAPES.items() if code not in (0x09, 0x0A)}


def escape(text: str, *, layout: bool = False) -> str:
    r"""`text` with every control and bidi control character spelled out (`\x1b`, `\u202e`).

    With `layout`, newline and tab stay as they are: they are the layout of a multi-line
    body (a job's output, a message). Without it (a table cell, a field) they are escaped
    too, so a value can leave neither its line nor its column. Backslashes are left alone,
    as journalctl and less leave them, so escaping twice changes nothing; a literal `\x1b`
    in a value therefore reads like an escaped ESC (`-o json`, `logs --raw` or `logs` to a
    pipe give the exact value).
    """
    return text.translate(_LAYOUT_ESCAPES if layout else ESCAPES)


def describe_signal(signum: int) -> str:
    """`signal 15 (SIGTERM)`, as the worker writes it into an error."""
    try:
        return f"signal {signum} ({signal.Signals(signum).name})"
    except ValueError:
        return f"signal {signum}"


def signal_name(number: int) -> str:
    """`SIGTERM` for 15; `signal 99` for a number with no name here."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def ending(code: int | None) -> str | None:
    """How a job's command ended, in words: `exit code 7`, `killed by SIGTERM`."""
    if code is None:
        return None
    return f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"


def error_text(code: int | None, error: str) -> str | None:
    """A job's or attempt's error, unless it only repeats how the command ended (the
    worker writes `exit code 7` or `killed by signal 15 (SIGTERM)` when it knows nothing
    more)."""
    if code is not None and error in (f"exit code {code}",
                                      code < 0 and f"killed by {describe_signal(-code)}"):
        return None
    return error or None
