"""Quiet runs: the log records of Ray and the libraries, Python warnings and the native standard error go to a
file while a block runs."""
from __future__ import annotations

import importlib
import logging
import os
import sys
from contextlib import contextmanager

_NOISY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "py.warnings", "filelock", "fsspec")


@contextmanager
def quiet_logs(path: str):
    """Log records of Ray and the libraries, Python warnings, and what Ray's C++ core writes to the process's
    standard error go to the file ``path`` (appended) instead of the terminal while the block runs; progress
    bars and the pipeline's own lines stay on screen."""
    importlib.import_module("ray.data")   # it sets its loggers' handlers on first import: do that before replacing
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    logging.captureWarnings(True)
    try:
        with _native_stderr_to(path):
            yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


@contextmanager
def _native_stderr_to(path: str):
    """File descriptor 2 (where Ray's C++ core logs, e.g. its actor-restart warnings) goes to ``path``, while
    Python's ``sys.stderr`` keeps writing to the terminal. Does nothing when ``sys.stderr`` is not descriptor 2
    (under a test runner's capture, for example)."""
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd2 = False
    if not on_fd2:
        yield
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    saved = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=saved.encoding, errors="backslashreplace",
                      closefd=False)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = saved
        os.dup2(terminal, 2)
        os.close(terminal)
