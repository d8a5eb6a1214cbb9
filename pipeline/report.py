"""Report assets: loss curves per training stage, statistics of the raw videos, a summary page of what every
stage kept and rejected and why, of each training stage's score on each benchmark (with sample predictions and
frames of their videos) and of what each rule cost, and a job graph that stays readable at any shard count.

``snakemake --report`` embeds them (see ``workflow/rules/report.smk``) next to the rule graph and the DAG, so a
run is inspected in one page.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline import VIDEO_TOKEN
from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import atomic_path, read_json, read_table, write_text
from pipeline.shards import ItemError
from pipeline.video.frames import FrameSampling, read_frames

PREDICTIONS_SHOWN = 100  # predictions listed on the summary page (all of them up to this many)
SAMPLES_SHOWN = 4  # a benchmark's predictions shown with a frame strip (the last stage's first ones)
FAILED_SHOWN = 4  # a benchmark's predictions whose video failed upstream shown besides them (no strip)
STRIP_FRAMES = 4  # frames of a strip (the middles of equal segments of the video)
STRIP_HEIGHT = 96  # pixels; a strip of 16:9 frames is about 20 kB of base64 JPEG
UNITS = ("percent", "fraction", "score")  # a benchmark's units: 0-100, 0-1, a judge's 0-5
EVAL_KEYS = ("benchmark", "stage", "overall", "units", "count", "unanswered")  # what a metrics.json must have


def plot_loss(loss_table: str | Path, out: str | Path, title: str) -> None:
    """Plot a stage's ``loss.tsv`` (loss and learning rate against the optimizer step) to an SVG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = read_table(loss_table).replace("", float("nan")).astype(float)
    fig, loss_axis = plt.subplots(figsize=(6, 3.2))
    loss_axis.plot(table["step"], table["loss"], color="tab:blue", marker=".", label="loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(table["step"], table["learning_rate"], color="tab:orange", linewidth=1, label="learning rate")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="svg")
    plt.close(fig)


def plot_video_stats(tables: list[str | Path], out: str | Path) -> None:
    """Histograms of duration (seconds) and frame rate, the resolutions (width x height, pixels) and the codecs
    of the videos in the download stage's status tables (the raw dataset), to an SVG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.concat([read_table(t) for t in tables]) if tables else pd.DataFrame()
    frame = frame[(frame.get("status") == "ok") & (frame.get("codec", "") != "")] if len(frame) else frame
    frame = frame.drop_duplicates("source") if len(frame) else frame  # segments of one source count once
    fig, axes = plt.subplots(1, 4, figsize=(13, 3))
    if len(frame):
        numbers = frame[["duration", "fps", "width", "height"]].astype(float)
        axes[0].hist(numbers["duration"], bins=20, color="tab:blue")
        axes[1].hist(numbers["fps"], bins=20, color="tab:green")
        axes[2].scatter(numbers["width"], numbers["height"], s=12, color="tab:purple", alpha=0.6)
        codecs = frame["codec"].value_counts()
        axes[3].bar(codecs.index, codecs.values, color="tab:orange")
    for axis, (title, label) in zip(axes, [("duration", "seconds"), ("frame rate", "frames per second"),
                                           ("resolution", "width (px)"), ("codec", "")]):
        axis.set_title(f"{title} ({len(frame)} source files)" if title == "duration" else title)
        axis.set_xlabel(label)
    axes[2].set_ylabel("height (px)")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="svg")
    plt.close(fig)


def job_stats(folder: str | Path, status_tables: dict[str, list[str]] | None = None,
              train_metrics: list[str | Path] = ()) -> pd.DataFrame:
    """What each rule cost, from Snakemake's per-job benchmark files (every rule declares ``benchmark:``).

    Args:
        folder: ``results/benchmarks``; a rule's files are ``<rule>.tsv`` or ``<rule>/<job>.tsv``.
        status_tables: data stage name -> its shards' status tables, to give videos per second of wall time.
        train_metrics: the training stages' ``train_metrics.json`` (``results/train/<stage>/``), to give samples
            per second of training (the Trainer's, model loading excluded).

    Returns:
        One row per rule, the costliest first: ``jobs``, ``wall s`` (summed over jobs), ``share`` of the summed
        wall time, ``max RSS MiB`` (the largest of its jobs), ``CPU s`` and ``throughput`` (text, or empty).
    """
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        last = pd.read_csv(path, sep="\t").iloc[-1]
        rows.append({"rule": path.relative_to(folder).parts[0].removesuffix(".tsv"), "job": path.stem,
                     "seconds": float(last["s"]), "rss": float(last["max_rss"]), "cpu": float(last["cpu_time"])})
    if not rows:
        return pd.DataFrame(columns=["rule", "jobs", "wall s", "share", "max RSS MiB", "CPU s", "throughput"])
    jobs = pd.DataFrame(rows)
    frame = jobs.groupby("rule", sort=False).agg(jobs=("seconds", "size"), seconds=("seconds", "sum"),
                                                 rss=("rss", "max"), cpu=("cpu", "sum"))
    throughput = {}
    for stage, tables in (status_tables or {}).items():
        videos = sum(len(read_table(t)) for t in tables)
        if stage in frame.index and frame.loc[stage, "seconds"] > 0:
            throughput[stage] = f"{videos / frame.loc[stage, 'seconds']:.2f} videos/s"
    for path in train_metrics:
        if Path(path).exists():
            metrics = read_json(path)
            throughput[f"train_{Path(path).parent.name}"] = f"{metrics['train_samples_per_second']:.2f} samples/s"
    frame = frame.sort_values("seconds", ascending=False)
    return pd.DataFrame({
        "rule": frame.index, "jobs": frame["jobs"].values, "wall s": frame["seconds"].round(1).values,
        "share": (frame["seconds"] / frame["seconds"].sum()).map("{:.0%}".format).values,
        "max RSS MiB": frame["rss"].round().astype(int).values, "CPU s": frame["cpu"].round(1).values,
        "throughput": [throughput.get(rule, "") for rule in frame.index]})


def collapse_dag(dot: str, max_jobs: int = 8) -> str:
    """A ``snakemake --dag`` graph (graphviz dot) with the jobs of every rule that has more than ``max_jobs`` drawn
    as one node, ``<rule> × <n> jobs`` (a run of 400 shards stays a readable picture); other jobs and the edges
    between what remains are kept, each edge once."""
    node = re.compile(r'^\s*(\d+)\[label = "([^"\\]*)(?:\\n[^"]*)?"(.*)\];\s*$')
    edge = re.compile(r"^\s*(\d+) -> (\d+)\s*$")
    nodes, edges, head = {}, [], []
    for line in dot.splitlines():
        if match := node.match(line):
            nodes[match.group(1)] = (match.group(2), line, match.group(3))
        elif match := edge.match(line):
            edges.append((match.group(1), match.group(2)))
        elif line.strip() != "}":
            head.append(line)
    count = Counter(rule for rule, _, _ in nodes.values())
    big = {rule for rule, n in count.items() if n > max_jobs}
    group = {job: (f"rule_{rule}" if rule in big else job) for job, (rule, _, _) in nodes.items()}
    lines, drawn = list(head), set()
    for job, (rule, line, rest) in nodes.items():
        if rule not in big:
            lines.append(line)
        elif group[job] not in drawn:
            drawn.add(group[job])
            lines.append(f'\t{group[job]}[label = "{rule}\\n\u00d7 {count[rule]} jobs"{rest}];')
    seen = set()
    for a, b in edges:
        pair = (group[a], group[b])
        if pair not in seen and pair[0] != pair[1]:
            seen.add(pair)
            lines.append(f"\t{pair[0]} -> {pair[1]}")
    return "\n".join(lines + ["}"]) + "\n"


def _question(text: str) -> str:
    """A question as a reader sees it: without the ``<video>`` marker, on one line."""
    return " ".join(text.replace(VIDEO_TOKEN, " ").split())


def failure_kind(reason: str) -> str:
    """A failure reason without its particulars: the text before its first ``:``, numbers as ``N``."""
    return re.sub(r"\d+", "N", reason.split(":")[0]).strip()


def stage_counts(tables: dict[str, list[str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per data stage, the videos received, kept and failed; and every failed video with its stage and reason.

    Args:
        tables: ``stage name -> its shards' status tables``, in pipeline order.
    """
    counts, failures = [], []
    for stage, paths in tables.items():
        frames = [read_table(p) for p in paths]
        status = pd.concat(frames) if frames else pd.DataFrame(columns=["video_id", "status", "reason"])
        failed = status[status["status"] != "ok"]
        counts.append({"stage": stage, "videos": len(status), "ok": len(status) - len(failed), "failed": len(failed)})
        failures += [{"stage": stage, "video_id": r["video_id"], "reason": r["reason"]} for _, r in failed.iterrows()]
    return pd.DataFrame(counts), pd.DataFrame(failures, columns=["stage", "video_id", "reason"])


def format_score(value: float | None, units: str) -> str:
    """A benchmark number in its ``units``: ``percent`` ``"62.5 %"``, ``fraction`` ``"0.625"``, ``score`` (a
    judge's 0 to 5) ``"3.10 / 5"``; None (nothing was scored) ``"n/a"``.

    Raises:
        ValueError: ``units`` is not one of :data:`UNITS`.
    """
    if units not in UNITS:
        raise ValueError(f"unknown units {units!r}; known: {UNITS}")
    if value is None:
        return "n/a"
    return {"percent": f"{value:.1f} %", "fraction": f"{value:.3f}", "score": f"{value:.2f} / 5"}[units]


def read_evaluations(metrics: list[str | Path],
                     predictions: list[str | Path] = ()) -> dict[str, dict[str, tuple[dict, Path | None]]]:
    """The benchmark evaluations, ``benchmark -> stage -> (its metrics.json, its predictions.jsonl or None)``,
    benchmarks and stages in the order the files come.

    Args:
        metrics: each (stage, benchmark)'s ``results/eval/<stage>/<benchmark>/metrics.json``; the stage and the
            benchmark are its ``stage`` and ``benchmark`` keys.
        predictions: their ``predictions.jsonl``, in the same order; empty: none.

    Raises:
        ValueError: ``predictions`` and ``metrics`` differ in length, a metrics file lacks a key of
            :data:`EVAL_KEYS`, has unknown units or an ``overall``, ``tasks`` or ``durations`` value that is not a
            number (or None), or two files are the same stage's on the same benchmark.
    """
    if predictions and len(predictions) != len(metrics):
        raise ValueError(f"{len(metrics)} metrics files but {len(predictions)} predictions files")
    evaluations: dict[str, dict[str, tuple[dict, Path | None]]] = {}
    for i, path in enumerate(metrics):
        scores = read_json(path)
        scores.update(scores.get("headline", {}))  # a scorer's numbers, flat (pipeline.eval.benchmarks.headline)
        missing = [key for key in EVAL_KEYS if key not in scores]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)}")
        if scores["units"] not in UNITS:
            raise ValueError(f"{path}: unknown units {scores['units']!r}; known: {UNITS}")
        numbers = {"overall": scores["overall"], **{f"{key} {group}": value for key in ("tasks", "durations")
                                                   for group, value in (scores.get(key) or {}).items()}}
        for name, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}: {name} is {value!r}, not a number in {scores['units']}")
        stages = evaluations.setdefault(scores["benchmark"], {})
        if scores["stage"] in stages:
            raise ValueError(f"{path}: a second evaluation of stage {scores['stage']!r} on {scores['benchmark']!r}")
        stages[scores["stage"]] = (scores, Path(predictions[i]) if predictions else None)
    return evaluations


def benchmark_table(evaluations: dict[str, dict[str, tuple[dict, Path | None]]]) -> pd.DataFrame:
    """Stages x benchmarks (:func:`read_evaluations`): each cell the stage's overall score in the benchmark's units
    (:func:`format_score`) and its answered items of all, ``"62.5 % (15/16 answered)"``; empty where the stage
    was not evaluated on the benchmark. Stages in the order they first come."""
    stages = list(dict.fromkeys(stage for by_stage in evaluations.values() for stage in by_stage))
    rows = []
    for stage in stages:
        row = {"stage": stage}
        for benchmark, by_stage in evaluations.items():
            scores = by_stage[stage][0] if stage in by_stage else None
            row[benchmark] = "" if scores is None else (
                f"{format_score(scores['overall'], scores['units'])} "
                f"({scores['count'] - scores['unanswered']}/{scores['count']} answered)")
        rows.append(row)
    return pd.DataFrame(rows, columns=["stage", *evaluations])


def benchmark_breakdowns(evaluations: dict[str, dict[str, tuple[dict, Path | None]]]) -> list[tuple[str, pd.DataFrame]]:
    """Per benchmark whose metrics have ``tasks`` or ``durations``: a table of the task (or duration bucket)
    against the stages, each cell its score in the benchmark's units; ``(title, table)`` pairs."""
    tables = []
    for benchmark, by_stage in evaluations.items():
        for key, label in (("tasks", "task"), ("durations", "duration")):
            groups = list(dict.fromkeys(group for scores, _ in by_stage.values() for group in scores.get(key) or {}))
            if not groups:
                continue
            frame = pd.DataFrame({label: groups, **{
                stage: [format_score(scores[key][group], scores["units"]) if group in (scores.get(key) or {}) else ""
                        for group in groups] for stage, (scores, _) in by_stage.items()}})
            tables.append((f"{html.escape(benchmark)}: score per {label} and stage", frame))
    return tables


def frame_strip(path: str | Path) -> str:
    """An ``<img>`` of :data:`STRIP_FRAMES` frames of the video at ``path`` side by side, :data:`STRIP_HEIGHT` px
    high, inline as a base64 JPEG.

    Raises:
        ItemError: the video does not decode (see :func:`pipeline.video.frames.read_frames`).
    """
    import numpy as np
    from PIL import Image  # matplotlib's dependency

    frames, _, _ = read_frames(path, FrameSampling("midpoints", STRIP_FRAMES))
    strip = np.concatenate(list(frames), axis=1)
    width = max(1, round(strip.shape[1] * STRIP_HEIGHT / strip.shape[0]))
    buffer = io.BytesIO()
    Image.fromarray(strip).resize((width, STRIP_HEIGHT)).save(buffer, format="JPEG", quality=70)
    return (f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}" '
            f'height="{STRIP_HEIGHT}" alt="{STRIP_FRAMES} frames of the video">')


def _failed_upstream(row: dict) -> bool:
    """Whether a benchmark prediction's video failed in a data stage (the model never saw it)."""
    return str(row.get("status", "")).startswith("failed upstream")


def _cell(value) -> str:
    """A value as an HTML table cell's escaped text; None is empty."""
    return "" if value is None else html.escape(str(value))


def benchmark_samples(evaluations: dict[str, dict[str, tuple[dict, Path | None]]],
                      videos_index: str | Path | None = None) -> list[tuple[str, pd.DataFrame]]:
    """Per benchmark, sample predictions of its last stage that has a predictions file: the first
    :data:`SAMPLES_SHOWN` and the first :data:`FAILED_SHOWN` others whose video failed upstream, each with a
    :func:`frame_strip` of its video (``frames``, only with ``videos_index``), or ``no video (...)`` with why: the
    video failed upstream, is not in the index, its file is missing or does not decode. ``(title, table)`` pairs;
    the tables' cells are HTML (text escaped).

    Args:
        videos_index: the compressed videos' ``index.tsv`` (:mod:`pipeline.video.index`: ``video_id``, ``path``).

    Raises:
        ValueError: ``videos_index`` has no ``video_id`` or ``path`` column.
    """
    paths: dict[str, str] = {}
    if videos_index is not None:
        index = read_table(videos_index)
        if not {"video_id", "path"} <= set(index.columns):
            raise ValueError(f"{videos_index}: needs the columns video_id and path")
        paths = dict(zip(index["video_id"], index["path"]))
    strips: dict[str, str] = {}  # video id -> its strip or why there is none, each video decoded once

    def strip(row: dict) -> str:
        video = row.get("video_id")
        if _failed_upstream(row):
            return "no video (it failed upstream)"
        if video not in paths:
            return "no video (not in the compressed videos)"
        if video not in strips:
            if not Path(paths[video]).is_file():
                strips[video] = f"no video (missing file {html.escape(paths[video])})"
            else:
                try:
                    strips[video] = frame_strip(paths[video])
                except ItemError as exc:
                    strips[video] = f"no video ({html.escape(str(exc))})"
        return strips[video]

    tables = []
    for benchmark, by_stage in evaluations.items():
        with_predictions = [(stage, path) for stage, (_, path) in by_stage.items() if path is not None]
        if not with_predictions:
            continue
        stage, path = with_predictions[-1]
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        failed = [row for row in rows[SAMPLES_SHOWN:] if _failed_upstream(row)][:FAILED_SHOWN]
        shown = rows[:SAMPLES_SHOWN] + failed
        frame = pd.DataFrame([{
            **{key: _cell(row.get(key)) for key in ("id", "video", "task", "duration")},
            "prompt": html.escape(_question(row.get("prompt") or "")), "answer": _cell(row.get("answer")),
            "prediction": "(none)" if row.get("prediction") is None else _cell(row["prediction"]),
            "status": _cell(row.get("status")), **({"frames": strip(row)} if videos_index is not None else {}),
        } for row in shown])
        title = (f"{html.escape(benchmark)}: the first {min(SAMPLES_SHOWN, len(rows))} of {len(rows)} predictions "
                 f"of stage {html.escape(stage)}" + (f", and {len(failed)} whose video failed upstream" if failed
                                                     else ""))
        tables.append((title, frame))
    return tables


def _section(title: str, frame: pd.DataFrame, escape: bool = True) -> str:
    """A titled table of the page (``title`` is HTML); ``escape=False``: the cells are HTML already."""
    return f"<h3>{title}</h3>{frame.to_html(index=False, border=0, escape=escape) if len(frame) else '<p>none</p>'}"


def summary_html(tables: dict[str, list[str]], manifest_rejected: str | Path, instructions: list[str | Path],
                 mixes: list[str | Path], metrics: str | Path, predictions: str | Path,
                 benchmarks: str | Path | None = None, train_metrics: list[str | Path] = (),
                 eval_metrics: list[str | Path] = (), eval_predictions: list[str | Path] = (),
                 videos_index: str | Path | None = None) -> str:
    """The summary page: videos per data stage, failed videos with reasons, each dataset's instruction records kept
    and rejected by reason, each training stage's data mix and the records it trained on (by kind, excluded,
    skipped at training time), metrics on the held-out split, its predictions (all of them up to
    :data:`PREDICTIONS_SHOWN`), each stage's scores on the benchmarks (:func:`benchmark_table`, per task and
    duration: :func:`benchmark_breakdowns`) with sample predictions and frames of their videos
    (:func:`benchmark_samples`), and what each rule cost (:func:`job_stats`).

    Args:
        instructions: each dataset's ``counts.json`` (the dataset is its folder's name).
        mixes: each stage's ``data_counts.json`` (the stage is its folder's name).
        metrics, predictions: the held-out split's evaluation (``results/eval/metrics.json``, ``predictions.jsonl``).
        benchmarks: the folder of Snakemake's benchmark files (jobs finished before this page are counted).
        train_metrics: the training stages' ``train_metrics.json``.
        eval_metrics, eval_predictions: each (stage, benchmark)'s ``metrics.json`` and ``predictions.jsonl``
            (``results/eval/<stage>/<benchmark>/``), in the same order (:func:`read_evaluations`).
        videos_index: the compressed videos' ``index.tsv``, for the sample predictions' frame strips; None: no
            strips.

    Raises:
        ValueError: see :func:`read_evaluations` and :func:`benchmark_samples`.
    """
    counts, failures = stage_counts(tables)
    by_reason = (failures.assign(kind=failures["reason"].map(failure_kind)).groupby(["stage", "kind"], sort=False)
                 .size().reset_index(name="videos") if len(failures) else failures)
    rejected = read_table(manifest_rejected)
    datasets = {Path(path).parent.name: read_json(path) for path in instructions}
    records = pd.DataFrame([
        {"dataset": name, "entries": c["annotations"], "kept": c["kept"], "rejected": c["rejected"],
         "kept by kind": ", ".join(f"{kind} {n}" for kind, n in c.get("kept_by_kind", {}).items()),
         "train records": c["train"]["records"], "train visuals": c["train"]["videos"],
         "val records": c["val"]["records"], "val visuals": c["val"]["videos"]} for name, c in datasets.items()
    ])
    reasons = pd.DataFrame([{"dataset": name, "reason": reason, "records": n}
                            for name, c in datasets.items() for reason, n in c["rejected_by_reason"].items()],
                           columns=["dataset", "reason", "records"])
    mix = pd.DataFrame([{"stage": Path(path).parent.name, "dataset": dataset, **taken,
                         "max_records": "all" if taken["max_records"] is None else taken["max_records"]}
                        for path in mixes for dataset, taken in read_json(path).items()])
    scores = read_json(metrics)
    metric_rows = pd.DataFrame([{"metric": key, "value": f"{value:.4f}" if isinstance(value, float) else str(value)}
                                for key, value in scores.items()
                                if isinstance(value, (int, float)) and not isinstance(value, bool)])
    lines = Path(predictions).read_text(encoding="utf-8").splitlines()
    shown_rows = [json.loads(line) for line in lines[:PREDICTIONS_SHOWN]]
    for row in shown_rows:  # a multi-image record names its images
        row["video"] = row.get("video") or ", ".join(row.get("videos") or [])
    samples = pd.DataFrame(shown_rows, columns=["video", "question", "reference", "prediction"])
    samples["question"] = samples["question"].map(_question)
    samples["reference"] = samples["reference"].map(lambda r: "(no reference: not scored)" if r is None else r)
    shown = f"All {len(lines)} predictions" if len(lines) <= PREDICTIONS_SHOWN else \
        f"The first {PREDICTIONS_SHOWN} of {len(lines)} predictions"
    costs = job_stats(benchmarks, tables, train_metrics) if benchmarks else pd.DataFrame()
    trained = pd.DataFrame([
        {"stage": Path(path).parent.name, "records": m["records"],
         "by kind": ", ".join(f"{kind} {n}" for kind, n in m.get("records_by_kind", {}).items()),
         "excluded before training": m["excluded"], "skipped at training time": m["skipped_at_training"]}
        for path in train_metrics if Path(path).exists() and "records" in (m := read_json(path))])
    evaluations = read_evaluations(eval_metrics, eval_predictions)
    sections = [
        ("Videos per data stage", counts),
        ("Manifest rows rejected before download", rejected),
        ("Failures by stage and reason", by_reason),
        ("Failed videos and why", failures),
        ("Instruction records per dataset", records),
        ("Rejected instruction records by reason", reasons),
        ("Training data of each stage", mix),
        ("Records each stage trained on (images train as one-frame videos; model/excluded.jsonl says why a record "
         "was not)", trained),
        (f"Evaluation of {html.escape(str(scores['model']))} (greedy decoding)", metric_rows),
        (shown, samples),
        ("Benchmarks: stages x benchmarks (the overall score in the benchmark's units, and the items answered; a "
         "video that failed upstream leaves its items unanswered)", benchmark_table(evaluations)),
        *benchmark_breakdowns(evaluations),
    ]
    body = "".join(_section(title, frame) for title, frame in sections)
    body += "".join(_section(title, frame, escape=False)
                    for title, frame in benchmark_samples(evaluations, videos_index))
    body += _section("What each rule cost (jobs finished before this page; wall time summed over a rule's jobs)", costs)
    style = "body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{body}</body></html>"


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.report {loss,video-stats,summary,collapse-dag} ...``: the report rules."""
    parser = cli_parser(__spec__.name, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss", help="plot a stage's loss curve")
    loss.add_argument("--loss", required=True, help="the stage's loss.tsv")
    loss.add_argument("--stage", required=True, help="the stage's name (the plot's title)")
    loss.add_argument("--out", required=True)
    dag = commands.add_parser("collapse-dag", help="snakemake --dag on stdin -> one node per rule of many jobs")
    dag.add_argument("--max-jobs", type=int, default=8, help="rules with more jobs become one node")
    stats = commands.add_parser("video-stats", help="plot the raw videos' duration, fps, resolution, codec")
    stats.add_argument("--out", required=True)
    stats.add_argument("tables", nargs="*", help="the download stage's status tables")
    summary = commands.add_parser("summary", help="write the summary page")
    summary.add_argument("--stage", action="append", nargs="+", metavar=("NAME", "TABLE"), default=[],
                         help="a data stage's name and its status tables (repeat per stage)")
    summary.add_argument("--manifest-rejected", required=True)
    summary.add_argument("--instructions", required=True, nargs="+", help="each dataset's counts.json")
    summary.add_argument("--mixes", required=True, nargs="+", help="each stage's data_counts.json")
    summary.add_argument("--metrics", required=True)
    summary.add_argument("--predictions", required=True)
    summary.add_argument("--benchmarks", help="the folder of Snakemake's benchmark files")
    summary.add_argument("--train-metrics", nargs="*", default=[], help="each stage's train_metrics.json")
    summary.add_argument("--eval-metrics", nargs="*", default=[],
                         help="each (stage, benchmark)'s metrics.json (both read from the file)")
    summary.add_argument("--eval-predictions", nargs="*", default=[],
                         help="their predictions.jsonl, in the same order")
    summary.add_argument("--videos-index", help="the compressed videos' index.tsv (frame strips of the samples)")
    summary.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the report asset the subcommand names."""
    args = parser().parse_args(argv)
    if args.command == "loss":
        plot_loss(args.loss, args.out, f"{args.stage}: training loss and learning rate")
    elif args.command == "collapse-dag":
        sys.stdout.write(collapse_dag(sys.stdin.read(), args.max_jobs))
    elif args.command == "video-stats":
        plot_video_stats(args.tables, args.out)
    else:
        tables = {name: paths for name, *paths in args.stage}
        write_text(args.out, summary_html(tables, args.manifest_rejected, args.instructions, args.mixes,
                                          args.metrics, args.predictions, args.benchmarks, args.train_metrics,
                                          args.eval_metrics, args.eval_predictions, args.videos_index))
    return 0


if __name__ == "__main__":
    run(main)
