"""A console a person can read: the long start-up blocks go to the log file.

Two helpers, both safe to call more than once:

* :func:`quiet_console` keeps MMEngine's environment dump, config dump and
  hook table (and its known, harmless deprecation notices) off the console
  of an ``MMLogger``; its log file still gets all of them.
* :func:`ignoring_known_warnings` silences, within a block, third-party
  Python warnings that are known and harmless, each with the reason and
  the library version.

Delete an entry of either list once the library version named in it is no
longer supported.
"""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Pattern, Sequence, Tuple, Type

# Messages MMEngine 0.10.7's ``Runner`` logs at INFO while it is built, as
# the regular expressions their text starts with (``re.match``).
CONSOLE_BLOCKS: Tuple[Pattern[str], ...] = (
    # Runner._log_env: '\n----...\nSystem environment:\n    sys.platform...'
    re.compile(r'\s*-+\s*System environment:'),
    # Runner._log_env: 'Config:\n<the whole config>'
    re.compile(r'Config:\n'),
    # Runner.__init__: 'Hooks will be executed in the following order:\n...'
    re.compile(r'Hooks will be executed in the following order:'),
)

# MMEngine log records (not Python warnings) that every run prints and that
# need no action; they stay in the log file.
CONSOLE_FILE_ONLY_WARNINGS: Tuple[Pattern[str], ...] = (
    # mmengine 0.10.7: CheckpointHook.before_train always builds a
    # FileClient (for backward compatibility) and FileClient.__new__ logs
    # this deprecation; nothing in the config can avoid it.
    re.compile(r'"FileClient" will be deprecated in future\.'),
    # mmengine 0.10.7: the same FileClient builds its 'disk' backend,
    # HardDiskBackend, whose __init__ logs that it is an alias.
    re.compile(r'"HardDiskBackend" is the alias of "LocalBackend"'),
)

SUMMARY = 'Environment, config and hook order: see {log_file}'


class QuietConsoleFilter(logging.Filter):
    """Drops MMEngine's start-up blocks from one console handler.

    The first dropped block is replaced by one line, :data:`SUMMARY`, that
    names the log file, which receives the blocks unchanged (the filter sits
    on the console handler only and does not modify records).

    Args:
        handler: The console handler the filter is installed on (the summary
            line is emitted through it).
        log_file: The log file named in the summary line.
    """

    def __init__(self, handler: logging.Handler, log_file: str) -> None:
        super().__init__()
        self.handler = handler
        self.log_file = log_file
        self.summarized = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.WARNING and any(
                p.match(message) for p in CONSOLE_FILE_ONLY_WARNINGS):
            return False
        if record.levelno != logging.INFO or not any(
                p.match(message) for p in CONSOLE_BLOCKS):
            return True
        if not self.summarized:
            self.summarized = True
            summary = logging.makeLogRecord(dict(
                record.__dict__,
                msg=SUMMARY.format(log_file=self.log_file), args=None))
            self.handler.handle(summary)
        return False


def _log_file_of(logger: logging.Logger) -> Optional[str]:
    """The file a logger's ``FileHandler`` writes (``None`` without one)."""
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            return getattr(logger, 'log_file', None) or handler.baseFilename
    return None


def quiet_console(logger: logging.Logger) -> bool:
    """Keep MMEngine's long start-up blocks in the log file only.

    Installs a :class:`QuietConsoleFilter` on every console handler (a
    ``StreamHandler`` that is not a ``FileHandler``) of ``logger``: the
    environment dump ("System environment: ..."), the config dump
    ("Config: ...") and the hook table ("Hooks will be executed in the
    following order: ...") reach the console as one line, ``Environment,
    config and hook order: see <log file>``, and MMEngine's known FileClient
    deprecation notices (:data:`CONSOLE_FILE_ONLY_WARNINGS`) not at all; the
    file handler still writes all of them. Call it right after the runner's
    ``MMLogger`` is built, before ``Runner`` logs the environment.

    Nothing is installed on a logger without a file handler (the blocks
    would be lost) and nothing more on a handler that has the filter already
    (calling it twice changes nothing).

    Args:
        logger: Usually ``runner.logger``, an ``MMLogger``.

    Returns:
        Whether a filter was installed by this call.
    """
    log_file = _log_file_of(logger)
    if log_file is None:
        return False
    installed = False
    for handler in logger.handlers:
        if not isinstance(handler, logging.StreamHandler) or isinstance(
                handler, logging.FileHandler):
            continue
        if any(isinstance(f, QuietConsoleFilter) for f in handler.filters):
            continue
        handler.addFilter(QuietConsoleFilter(handler, log_file))
        installed = True
    return installed


# (message regex, category, module regex, reason): matched like
# ``warnings.filterwarnings`` does, the message from its start, ignoring case.
KNOWN_WARNINGS: Sequence[Tuple[str, Type[Warning], str, str]] = (
    (r'Setting (OMP|MKL)_NUM_THREADS environment variable for each process '
     r'to be \d+ in default',
     UserWarning, r'mmengine\.utils\.dl_utils\.setup_env',
     'mmengine 0.10.7: Runner.setup_env sets one OpenMP/MKL thread per '
     'distributed process when the variable is unset and says so once per '
     'rank; the user sets the variable to choose another count'),
    (r'Fail to import ``MultiScaleDeformableAttention`` from '
     r'``mmcv\.ops\.multi_scale_deform_attn``',
     UserWarning, r'mmcv\.cnn\.bricks\.transformer',
     'mmcv-lite 2.2.0 has no compiled ops; mmpretrain 1.2.0 imports '
     'mmcv.cnn.bricks.transformer, which tries to import the op, and mmpfc '
     'uses no deformable attention'),
)


@contextmanager
def ignoring_known_warnings() -> Iterator[None]:
    """Within the block, ignore the third-party warnings of
    :data:`KNOWN_WARNINGS`; after it, exactly these filters are removed
    again, and the filters that libraries imported in the block installed
    stay (``warnings.catch_warnings`` would drop those too).

    Each filter matches a message, its category and the module that warns,
    so the same category from anywhere else, or another message of the same
    module, still shows. ``import mmpfc`` imports mmpretrain within it (the
    mmcv notice is raised at import), and ``PartialFCRunner`` sets up its
    environment within it; MMEngine's own logged notices are handled by
    :func:`quiet_console` instead.
    """
    before, added = list(warnings.filters), []
    for message, category, module, _reason in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category,
                                module=module + r'\Z')
        if warnings.filters[0] not in before:  # else it was someone's
            added.append(warnings.filters[0])
    try:
        yield
    finally:
        for entry in added:
            if entry in warnings.filters:
                warnings.filters.remove(entry)
