"""The command line of every stage module (``python -m pipeline.<module>``): named as it is run, described by the
module's whole first paragraph, fast to ask for help (the modules import torch and its kin only once the
arguments are parsed), and ending with one clear line, not a traceback, when the job cannot work.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable

from pipeline import PipelineError, configure_logging

log = logging.getLogger(__name__)

_ROLE = re.compile(r":\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def describe(doc: str) -> str:
    """The first paragraph of a docstring as plain text: reStructuredText roles (``:func:`x```) and literal
    quotes (double backticks) removed, lines joined."""
    first = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(_ROLE.sub(r"\1", first).replace("``", "").split())


def parser(module: str, doc: str, **kwargs) -> argparse.ArgumentParser:
    """An argument parser whose usage reads ``python -m <module>`` and whose description is :func:`describe` of
    ``doc``.

    Args:
        module: the module's dotted name (its ``__spec__.name``, which is right when it runs as ``__main__``).
        doc: the module's docstring.
        kwargs: passed to ``argparse.ArgumentParser``.
    """
    return argparse.ArgumentParser(prog=f"python -m {module}", description=describe(doc), **kwargs)


def run(main: Callable[[list[str] | None], int]) -> None:
    """Run a module's ``main`` as the process: log to stderr, exit with its code; a :class:`PipelineError` (a job
    that cannot work: a missing tool, unusable settings, a damaged input shard) ends it with its message and exit
    code 1."""
    configure_logging()
    try:
        code = main(None)
    except PipelineError as error:
        log.error("%s", error)
        code = 1
    sys.exit(code)
