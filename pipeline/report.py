"""Report assets: loss curves per training stage, statistics of the raw videos, a summary page of what every
stage kept and rejected and why and of what each rule cost, and a job graph that stays readable at any shard count.

``snakemake --report`` embeds them (see ``workflow/rules/report.smk``) next to the rule graph and the DAG, so a
run is inspected in one page.
"""

from __future__ import annotations

import argparse
import html
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

PREDICTIONS_SHOWN = 100  # predictions listed on the summary page (all of them up to this many)


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


def summary_html(tables: dict[str, list[str]], manifest_rejected: str | Path, instructions: list[str | Path],
                 mixes: list[str | Path], metrics: str | Path, predictions: str | Path,
                 benchmarks: str | Path | None = None, train_metrics: list[str | Path] = ()) -> str:
    """The summary page: videos per data stage, failed videos with reasons, each dataset's instruction records kept
    and rejected by reason, each training stage's data mix and the records it trained on (by kind, excluded,
    skipped at training time), metrics, the predictions (all of them up to
    :data:`PREDICTIONS_SHOWN`) and what each rule cost (:func:`job_stats`).

    Args:
        instructions: each dataset's ``counts.json`` (the dataset is its folder's name).
        mixes: each stage's ``data_counts.json`` (the stage is its folder's name).
        benchmarks: the folder of Snakemake's benchmark files (jobs finished before this page are counted).
        train_metrics: the training stages' ``train_metrics.json``.
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
        ("What each rule cost (jobs finished before this page; wall time summed over a rule's jobs)", costs),
    ]
    body = "".join(f"<h3>{title}</h3>{frame.to_html(index=False, border=0) if len(frame) else '<p>none</p>'}"
                   for title, frame in sections)
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
                                          args.metrics, args.predictions, args.benchmarks, args.train_metrics))
    return 0


if __name__ == "__main__":
    run(main)
