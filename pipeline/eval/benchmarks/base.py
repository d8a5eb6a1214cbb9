"""What every benchmark module gives: its items (one question each) read from the published layout, and a scorer.

An **item** is a plain dict, the same for every format:

- ``id`` (str): unique in the benchmark; the key of a prediction (Video-MME: ``question_id``; MVBench:
  ``<subtask>/<index in that subtask's json>``; Charades-STA: ``<video>>>><caption>>>>[s, e]``).
- ``video`` (str | None): the video's file name as the annotation names it, relative to the benchmark's video folder.
- ``prompt`` (str): the text the model is asked, video token excluded (question, options and the benchmark's post
  prompt, as the system's evaluation writes them).
- ``answer`` (str): the reference (an option letter, a span ``"s e"`` in seconds, or an answer text).
- ``task`` (str | None), ``duration`` (str | None): the breakdowns the benchmark reports, where it has them.
- format-specific fields: ``options`` (list of str), ``span`` ([start, end] seconds), ``prompt_2`` (the second
  phrasing of Video-ChatGPT's consistency benchmark), ...

A **prediction** is the raw generated text, keyed by item id (``{id: text}``). One format differs:
``vcgpt_consistency`` asks each item two phrasings, so its predictions are dicts ``{id: {"prediction": text,
"prediction_2": text}}`` (:func:`pipeline.eval.benchmarks.vcgpt.read_consistency_predictions`).

The scorers count what they could not score; each such item scores as wrong (0) and stays in the denominators
(except where upstream drops exactly-empty answers, ``excluded_empty`` in :mod:`.mcq`; the judged formats also give
upstream's ``*_judged`` means over valid judgments only):

- ``unanswered``: an item with no prediction (its video failed upstream, or the model gave none; the judged formats
  count a blank text, and for ``vcgpt_consistency`` either answer missing or blank, as none).
- ``invalid``: a prediction the benchmark's parser reads no answer from (no option letter, no ``[start, end]`` span).
  The rule-parsed formats: :mod:`.mcq`, :mod:`.grounding`. (:mod:`.etbench`, scored through
  :mod:`pipeline.eval.score` rather than a :class:`Benchmark`, counts ``invalid`` by reason per task, a missing
  prediction among them as ``missing prediction``; it has no ``unanswered``.)
- ``malformed``: a judge reply that cannot be parsed into a judgment, or a judge request that failed, counted by
  reason (``{reason: n}``; per criterion in :mod:`.vcgpt`). The LLM-judged formats: :mod:`.open_qa`, :mod:`.vcgpt`.

Malformed annotation records are not items: a loader reports each with :func:`skipped` and loads the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class InputError(ValueError):
    """An input file that cannot be read or is not what it should be; ``str()`` is one line naming the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def skipped(file: str | Path, record: Any, field: str, reason: str) -> dict[str, str]:
    """One malformed annotation record, reported and not scored: ``{"file", "record", "field", "reason"}``."""
    return {"file": str(file), "record": str(record), "field": field, "reason": reason}


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its format and how to read and score it.

    Attributes:
        name: the config and command-line name (``mvbench``, ``videomme``, ``charades_sta``, ...).
        format: ``mcq``, ``grounding``, ``open_qa``, ``vcgpt_generic``, ``vcgpt_temporal`` or
            ``vcgpt_consistency``.
        load: ``(annotations path) -> (items, skipped records)``; raises :class:`InputError` for a file it cannot
            read at all.
        score: ``(items, predictions, **options) -> metrics dict`` (``overall``, per-task and per-duration
            breakdowns in the benchmark's units, ``count``, ``unanswered``, and ``invalid`` (rule-parsed formats) or
            ``malformed`` (judged formats), as the module docstring defines them).
        read_predictions: ``(predictions path) -> {id: text}`` (``vcgpt_consistency``: ``{id: {"prediction",
            "prediction_2"}}``) for the benchmark's prediction layout; raises :class:`InputError`.
        options: the variants or judge settings ``score`` takes (for the command line's help).
    """

    name: str
    format: str
    load: Callable[[str | Path], tuple[list[dict], list[dict]]]
    score: Callable[..., dict[str, Any]]
    read_predictions: Callable[[str | Path], dict[str, Any]]
    options: tuple[str, ...] = ()
