"""The JSON-lines access log, written off the event loop.

``write`` only puts the record on a queue; a daemon thread serialises and appends it, so a slow disk
never stalls the proxy. Each line is one complete JSON object, flushed as written, so ``tail -f`` and
log shippers see whole lines.
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
