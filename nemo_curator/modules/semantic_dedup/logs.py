"""The ``logger`` argument of the NeMo Curator 0.9 classes: a ``logging.Logger``, or a folder for
``<folder>/<name>.log``. The log file is rewritten atomically (old lines + new ones) at the end
of each public call, never left half-written."""
from __future__ import annotations

import logging
import os

from nemo_curator.utils.file_utils import atomic_write


class AtomicLogFile(logging.Handler):
    """Buffers records; ``flush()`` appends them to ``path`` by an atomic rewrite."""

    def __init__(self, path: str):
        super().__init__(logging.INFO)
        self.path = path
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def flush(self) -> None:
        if not self.lines:
            return
        old = ""
        if os.path.exists(self.path):
            with open(self.path) as f:
                old = f.read()
        with atomic_write(self.path, "w") as f:
            f.write(old + "\n".join(self.lines) + "\n")
        self.lines = []


def setup_logger(logger: logging.Logger | str, name: str) -> logging.Logger:
    """``logger`` itself, or a logger writing to ``<logger>/<name>.log`` (one per folder and name)."""
    if isinstance(logger, logging.Logger):
        return logger
    path = os.path.abspath(os.path.join(os.fspath(logger), f"{name}.log"))
    log = logging.getLogger(f"nemo_curator.semantic_dedup.{name}.{path}")
    if not any(isinstance(h, AtomicLogFile) for h in log.handlers):
        log.addHandler(AtomicLogFile(path))
    log.setLevel(logging.INFO)
    return log


def flush_logger(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if isinstance(handler, AtomicLogFile):
            handler.flush()
