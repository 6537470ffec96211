"""Structured logs: JSON lines, metadata in fields, and the process's real stderr even when sys.stderr is swapped."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from serve_apps.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_packserve_logger() -> Iterator[None]:
    root = logging.getLogger("packserve")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_json_line_with_extra_fields() -> None:
    out = io.StringIO()
    setup_logging(stream=out)
    logging.getLogger("packserve.test").info("request finished", extra={"request_id": "r1", "ttft_ms": 12})
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["msg"] == "request finished"
    assert line["logger"] == "packserve.test"
    assert line["level"] == "info"
    assert (line["request_id"], line["ttft_ms"]) == ("r1", 12)


def test_other_libraries_underscored_record_attributes_are_left_out() -> None:
    out = io.StringIO()
    setup_logging(stream=out)
    logger = logging.getLogger("packserve.test")

    def bookkeeping(record: logging.LogRecord) -> bool:
        # What Ray's log record factory does in its processes (`_ray_timestamp_ns`).
        record.__dict__["_lib_timestamp_ns"] = 1
        return True

    logger.addFilter(bookkeeping)
    try:
        logger.info("x", extra={"model": "m"})
    finally:
        logger.removeFilter(bookkeeping)
    line = json.loads(out.getvalue().splitlines()[-1])
    assert "_lib_timestamp_ns" not in line and line["model"] == "m"


def test_bypasses_a_replaced_sys_stderr(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # Ray Serve's throughput mode swaps sys.stderr for a buffered logger stream in replicas.
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    setup_logging()
    logging.getLogger("packserve.test").warning("engine failed mid-stream", extra={"error": "boom"})
    assert swapped.getvalue() == ""
    # Other threads of the test session (a running Ray's) may write to fd 2 too: find our line.
    ours = [line for line in capfd.readouterr().err.splitlines() if '"engine failed mid-stream"' in line]
    assert len(ours) == 1 and json.loads(ours[0])["error"] == "boom"
