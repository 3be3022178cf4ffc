"""Where disa's own messages go: library modules log to ``logging.getLogger("disa.<module>")`` and print nothing
but the results a caller asked for; the ``disa`` command installs the one handler (:func:`cli_logging`).

* Progress, what a stage saw and what to do about it: ``INFO``; something a user should act on: ``WARNING``.
* The handler writes to stderr as ``disa <verb>: <message>`` (``disa <verb>: WARNING: ...``), so that results
  and tables on stdout can be piped apart. A stage run by ``disa run`` names itself: ``disa label: ...``.
* ``-v`` shows ``DEBUG`` and every library warning; ``-q`` only warnings and errors.
* Without the command (a notebook, a script), nothing is shown until the caller configures logging, as with any
  library: ``logging.basicConfig(level=logging.INFO)``.
* The deprecation and advisory warnings that transformers and peft raise on every load (a renamed attribute,
  GPT-2's ``Conv1D`` under LoRA) are not the user's to act on: the command hides those few, by category and
  module, and only while it runs; ``-v`` shows them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator, Optional

ROOT = "disa"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}

# (action, message regex, category, module regex): narrow on purpose, a warning of our own code still shows.
LIBRARY_NOISE = (
    ("ignore", "", FutureWarning, r"(transformers|peft)(\..*)?$"),
    ("ignore", "", DeprecationWarning, r"(transformers|peft)(\..*)?$"),
    ("ignore", r"fan_in_fan_out is set to False", UserWarning, r"peft(\..*)?$"),
)


def get_logger(module: str) -> logging.Logger:
    """``get_logger(__name__)`` in a library module: a ``disa.*`` logger (``__name__`` is one already)."""
    return logging.getLogger(module if module == ROOT or module.startswith(ROOT + ".") else f"{ROOT}.{module}")


def stage_logger(verb: str) -> logging.Logger:
    """The logger of one stage verb: ``fit-z`` -> ``disa.stages.fit_z``."""
    return logging.getLogger(f"{ROOT}.stages.{verb.replace('-', '_')}")


class CliFormatter(logging.Formatter):
    """``disa <verb>: <message>``; the verb is the record's own (``extra={"verb": ...}``) or the command's."""

    def __init__(self, verb: str):
        super().__init__()
        self.verb = verb

    def format(self, record: logging.LogRecord) -> str:
        verb = getattr(record, "verb", None) or self.verb
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        text = f"disa {verb}: {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _CliHandler(logging.StreamHandler):
    """Marks the command's handler, so that a second :func:`cli_logging` (tests call ``main`` many times) replaces
    it instead of adding another."""


def verbosity_level(verbose: int = 0, quiet: int = 0) -> int:
    return LEVELS[max(-1, min(1, verbose - quiet))]


@contextlib.contextmanager
def cli_logging(verb: str, verbose: int = 0, quiet: int = 0, stream=None) -> Iterator[logging.Handler]:
    """While the command runs: one stderr handler on the ``disa`` logger at the chosen level, and the library
    noise of :data:`LIBRARY_NOISE` filtered (not with ``-v``). Both are undone on exit."""
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(old)
    handler = _CliHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(CliFormatter(verb))
    level = verbosity_level(verbose, quiet)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            if level > logging.DEBUG:
                for action, message, category, module in LIBRARY_NOISE:
                    warnings.filterwarnings(action, message=message, category=category, module=module)
            yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def warn_lines(logger: logging.Logger, lines, verb: Optional[str] = None) -> None:
    for line in lines:
        logger.warning(line, extra={"verb": verb} if verb else None)
