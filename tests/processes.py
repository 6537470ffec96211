"""Process sessions of commands the tests start (`packserve serve`, `ray start`): bench/common.py's helpers."""

from bench.common import kill_session, session_members

__all__ = ["kill_session", "session_members"]
