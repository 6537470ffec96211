"""Process sessions of commands the tests start (`packserve serve`, `ray start`), read from Linux /proc."""

from __future__ import annotations

import contextlib
import os
import signal


def session_members(sid: int) -> dict[int, str]:
    """Live processes of session `sid` (Linux /proc), by pid, with their names.

    The command runs as the leader of its own session; Ray's processes stay in it
    even when their parent dies and they are reparented to init.
    """
    members: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        name, _, rest = raw.partition(" (")[2].rpartition(")")
        fields = rest.split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            members[int(entry)] = name
    return members


def kill_session(sid: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
