"""Benchmark scorers: one module per benchmark family, each reading the benchmarks' files as their authors ship them
and reproducing their official scoring; :data:`REGISTRY` names them all.

- ``mcq``: multiple choice (MVBench, Video-MME, Perception Test, LongVideoBench, MLVU, LVBench, our ``mcq``).
- ``grounding``: temporal grounding (Charades-STA, our ``grounding``).
- ``open_qa``: open-ended QA judged by an LLM (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA, our ``open_qa``).
- ``vcgpt``: Video-ChatGPT's 5-criterion benchmark, judged by an LLM.
- ``etbench``: E.T. Bench (its own prediction layout and command-line options; ``pipeline.eval.score``).

``pipeline.eval.score`` scores predictions made anywhere; ``pipeline.eval.run`` answers a benchmark with a trained
stage and scores it.
"""

from __future__ import annotations

from typing import Any

from pipeline.eval.benchmarks import grounding, mcq, open_qa, vcgpt
from pipeline.eval.benchmarks.base import Benchmark

REGISTRY: dict[str, Benchmark] = {**mcq.BENCHMARKS, **grounding.BENCHMARKS, **open_qa.BENCHMARKS,
                                  **vcgpt.BENCHMARKS}

# The formats whose scoring asks a judge model.
JUDGED = ("open_qa", "vcgpt_generic", "vcgpt_temporal", "vcgpt_consistency")


def get(name: str) -> Benchmark:
    """The benchmark called ``name`` (a key of :data:`REGISTRY`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; benchmarks: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a table shows for a benchmark's metrics: ``{"overall": float | None, "units": "percent" |
    "fraction" | "score", "tasks": {name: float | None}, "durations": {bucket: float | None}}``.

    ``mcq`` and ``grounding`` give their ``overall`` (grounding: R@0.5), tasks and duration buckets in their
    ``units`` (``percent`` or ``fraction``, as the benchmark reports them); ``open_qa`` its judged accuracy in
    percent, per question type; the Video-ChatGPT benchmarks (``score``: a judge's 0-5) the mean of their criteria,
    with each criterion as a task. ``None`` where nothing was scored.
    """
    overall = metrics.get("overall")
    if not isinstance(overall, dict):
        return {"overall": overall, "units": metrics["units"], "tasks": metrics.get("tasks") or {},
                "durations": metrics.get("durations") or {}}
    if "accuracy" in overall:  # open_qa
        return {"overall": overall["accuracy"], "units": "percent",
                "tasks": {task: row["accuracy"] for task, row in (metrics.get("tasks") or {}).items()},
                "durations": {}}
    values = [value for value in overall.values() if value is not None]
    return {"overall": sum(values) / len(values) if values else None, "units": "score", "tasks": dict(overall),
            "durations": {}}
