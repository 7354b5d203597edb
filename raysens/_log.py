"""The one log line format of raysens (``[raysens] …`` on stderr) and UTC timestamps."""

from __future__ import annotations

import datetime as _dt
import sys


def log(msg: str) -> None:
    print(f"[raysens] {msg}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
