"""Stand-in `systemctl show` for the emulated control-plane hosts: kubespray's certificate renewal units.

Only `systemctl show [-p NAME | --property=NAME[,NAME]]... UNIT` is answered, from the unit's state in
`$CP_SANDBOX_ROOT/run/systemd/UNIT.json` (written by `sandbox/control_plane.py`), as systemd prints it
(systemctl(1) `show`; properties of org.freedesktop.systemd1(5)): `Key=Value` lines, timestamps as
`Mon 2024-05-06 03:00:00 UTC` in the caller's TZ (the flow sets TZ=UTC), `n/a` for a timestamp never set,
and `LoadState=not-found` for a unit that does not exist. Any other verb is refused (the check never
starts or stops a unit).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

_TIMESTAMPS = {"LastTriggerUSec", "NextElapseUSecRealtime", "ExecMainExitTimestamp", "ExecMainStartTimestamp",
               "StateChangeTimestamp", "ActiveEnterTimestamp"}


def _fmt(value: str | None) -> str:
    if not value:
        return "n/a"
    when = dt.datetime.fromisoformat(value).astimezone(dt.UTC)
    return when.strftime("%a %Y-%m-%d %H:%M:%S UTC")


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "show":
        print(f"systemctl stand-in: only `show` is supported here, got {argv[:1]}", file=sys.stderr)
        return 1
    props: list[str] = []
    units: list[str] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-p", "--property"):
            props += argv[i + 1].split(",")
            i += 1
        elif a.startswith("--property="):
            props += a.split("=", 1)[1].split(",")
        elif not a.startswith("-"):
            units.append(a)
        i += 1
    root = Path(os.environ.get("CP_SANDBOX_ROOT", "/"))
    for n, unit in enumerate(units):
        path = root / "run" / "systemd" / f"{unit}.json"
        state = json.loads(path.read_text()) if path.exists() else {"LoadState": "not-found",
                                                                    "ActiveState": "inactive"}
        if n:
            print()
        for p in props or sorted(state):
            value = state.get(p, "")
            print(f"{p}={_fmt(value) if p in _TIMESTAMPS else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
