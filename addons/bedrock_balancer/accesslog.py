"""What the proxy records per request, written off the event loop: the JSON-lines access log, and the
line per request on the terminal.

``write`` only puts the record on a queue; a daemon thread serialises and writes it, so a slow disk (or
a slow reader of the proxy's output) never stalls the proxy. Each access-log line is one complete JSON
object, flushed as written, so ``tail -f`` and log shippers see whole lines.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_STOP = object()


class AccessLog:
    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as e:
            from .config import ConfigError

            raise ConfigError(f"bedrock_access_log: cannot open {path}: {e.strerror}") from None
        self._thread = threading.Thread(target=self._run, name="bedrock-access-log", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        self._queue.put(record)

    def close(self) -> None:
        """Write what is queued, then stop. Safe to call twice."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=5)

    def flush(self) -> None:
        """Block until every record written so far is on disk (for tests and shutdown)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout=5)

    def _run(self) -> None:
        with self._file:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if isinstance(item, threading.Event):
                    self._file.flush()
                    item.set()
                    continue
                try:
                    self._file.write(json.dumps(item, separators=(",", ":")) + "\n")
                except (OSError, TypeError, ValueError) as e:
                    log.error("bedrock-balancer: access log %s: %s", self.path, e)


class LogLines:
    """The line per request, handed to ``logger`` (and so to mitmproxy's terminal and mitmweb's event log) by a
    thread: the logging handlers format and print it, and the proxy's output may be a pipe that fills up."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="bedrock-log-lines", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        self._queue.put(line)

    def flush(self) -> None:
        """Block until every line written so far went to the handlers (for shutdown and tests)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout=5)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            self.logger.info(item)
