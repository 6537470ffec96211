"""Structured (JSON lines) logging. Callers pass metadata in `extra`; never prompts, completions or secrets."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Underscored attributes are other libraries' bookkeeping (Ray's log
        # record factory adds `_ray_timestamp_ns` in its workers), not ours.
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """JSON lines on the process's own stderr (or `stream`).

    `sys.__stderr__`, not `sys.stderr`: in a Ray Serve replica under
    RAY_SERVE_THROUGHPUT_OPTIMIZED, Serve replaces `sys.stderr` with a stream
    into its own logger, which buffers 1000 records in memory before writing
    its file: our lines showed up late, and not at all from a replica that was
    killed. File descriptor 2 goes to the worker's log file at once (and, with
    `log_to_driver`, to the `packserve serve` terminal).
    """
    handler = logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("packserve")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
