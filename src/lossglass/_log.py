"""lossglass's status lines go through the standard ``logging`` module, logger ``"lossglass"``: silence them with
``logging.getLogger("lossglass").setLevel(logging.WARNING)``, or route them with your own handlers.

A study that shows progress adds one handler to that logger, once, if it has none: it prints ``[lossglass] message``
to the standard error stream of the moment, as the command line does, and the records stop there (``propagate`` off,
so a root handler does not print them twice). Give the logger a handler of your own before the study runs and it
is used instead."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lossglass")


class _Stderr(logging.Handler):
    """Writes to ``sys.stderr`` as it is when the record is emitted (a stream redirected or captured later is used)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def ensure_handler() -> None:
    """Print status lines to stderr unless the ``lossglass`` logger has a handler already (the user's, or ours)."""
    if logger.handlers:
        return
    h = _Stderr()
    h.setFormatter(logging.Formatter("[lossglass] %(message)s"))
    logger.addHandler(h)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def log(msg: str) -> None:
    """One status line (level INFO)."""
    logger.info(msg)
