"""The console: what the workbench tells its user while it works, through ``logging``.

Each module logs through its own logger (``log = console.logger(__name__)``, named ``workbench.<layer>.<module>``); the
``workbench`` logger shows their records as plain lines on stderr, each as the module wrote it (``[sweep] ...``,
``[evaluate] ...``), so stdout stays what a command outputs (``--print-config``'s JSON, a results table). The stream
is looked up when a line is written, so a notebook's cell output and a test's captured output receive it.

``progress(log, line)``: a progress line of a long stage, which inside a notebook kernel (a sweep's job) is also
written to the kernel's own stdout, the console the sweep runs in (other lines stay in the executed notebook).

How much is shown: ``python -m workbench ... --verbose`` (debug lines too) or ``--quiet`` (warnings and errors
only); the level travels to a sweep's kernels in ``WORKBENCH_VERBOSITY`` (``debug``, ``info``, ``warning``), read
when the first line is written. A program that configures ``logging`` itself can set the ``workbench`` logger's
level and handlers as for any library (``console.configure(handler=False)`` leaves the handlers to it).
"""

from __future__ import annotations

import logging
import sys

from . import settings

ROOT = "workbench"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
ENV = "WORKBENCH_VERBOSITY"


class ConsoleHandler(logging.Handler):
    """Plain lines on ``sys.stderr`` (looked up at each line), which leaves stdout to what a command outputs (a table,
    a config, a path); a record marked ``console`` (``progress``) also on the process's own stdout when
    ``sys.stderr`` is another stream (a notebook kernel's cell output): the console a sweep's kernel talks to."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            print(line, file=sys.stderr, flush=True)
            if getattr(record, "console", False) and sys.__stdout__ is not None and sys.stderr is not sys.__stderr__:
                print(line, file=sys.__stdout__, flush=True)
        except Exception:  # noqa: BLE001 - logging's own contract: a failed line is reported, never raised
            self.handleError(record)


_configured = False


def configure(verbosity: str | None = None, handler: bool = True) -> None:
    """Set how much the workbench shows (``verbosity``: debug, info or warning; None: ``WORKBENCH_VERBOSITY`` or
    info) and, unless ``handler`` is False, give the ``workbench`` logger its console handler (once). Called by the
    first line written, and by the command line with ``--verbose`` / ``--quiet``."""
    global _configured
    root = logging.getLogger(ROOT)
    name = (verbosity or settings.get(ENV) or "info").lower()
    if name not in LEVELS:
        raise ValueError(f"verbosity {name!r} (from {ENV} or --verbose/--quiet): use one of {sorted(LEVELS)}")
    root.setLevel(LEVELS[name])
    if handler and not any(isinstance(h, ConsoleHandler) for h in root.handlers):
        root.addHandler(ConsoleHandler())
        root.propagate = False  # shown once, not again by a root handler a notebook or a test set up
    _configured = True


class _Logger(logging.LoggerAdapter):
    """A module's logger, which configures the console the first time it writes."""

    def process(self, msg, kwargs):
        return msg, kwargs  # a line's own ``extra`` kept (3.11's adapter would replace it with the adapter's)

    def log(self, level, msg, *args, **kwargs):
        if not _configured:
            configure()
        super().log(level, msg, *args, **kwargs)


def logger(name: str) -> logging.LoggerAdapter:
    """The logger of module ``name`` (``__name__``): ``workbench.<layer>.<module>``."""
    return _Logger(logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}"), {})


def progress(log: logging.LoggerAdapter, line: str) -> None:
    """An information line that a sweep's console shows too when it is written inside the sweep's notebook kernel."""
    log.info(line, extra={"console": True})
