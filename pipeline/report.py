"""Report assets: loss curves per training stage, statistics of the raw videos, and a summary page of what every
stage kept and rejected and why.

``snakemake --report`` embeds them (see ``workflow/rules/report.smk``) next to the rule graph and the DAG, so a
run is inspected in one page.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

import pandas as pd

from pipeline import configure_logging
from pipeline.io import atomic_path, read_json, read_table, write_text


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
                 mixes: list[str | Path], metrics: str | Path, predictions: str | Path, sample_count: int = 10) -> str:
    """The summary page: videos per data stage, failed videos with reasons, each dataset's instruction records kept
    and rejected by reason, each training stage's data mix, metrics and the first ``sample_count`` predictions.

    Args:
        instructions: each dataset's ``counts.json`` (the dataset is its folder's name).
        mixes: each stage's ``data_counts.json`` (the stage is its folder's name).
    """
    counts, failures = stage_counts(tables)
    by_reason = (failures.assign(kind=failures["reason"].map(failure_kind)).groupby(["stage", "kind"], sort=False)
                 .size().reset_index(name="videos") if len(failures) else failures)
    rejected = read_table(manifest_rejected)
    datasets = {Path(path).parent.name: read_json(path) for path in instructions}
    records = pd.DataFrame([
        {"dataset": name, "entries": c["annotations"], "kept": c["kept"], "rejected": c["rejected"],
         "train records": c["train"]["records"], "train videos": c["train"]["videos"],
         "val records": c["val"]["records"], "val videos": c["val"]["videos"]} for name, c in datasets.items()
    ])
    reasons = pd.DataFrame([{"dataset": name, "reason": reason, "records": n}
                            for name, c in datasets.items() for reason, n in c["rejected_by_reason"].items()],
                           columns=["dataset", "reason", "records"])
    mix = pd.DataFrame([{"stage": Path(path).parent.name, "dataset": dataset, **taken}
                        for path in mixes for dataset, taken in read_json(path).items()])
    scores = read_json(metrics)
    metric_rows = pd.DataFrame([{"metric": "records", "value": str(scores["count"])}] + [
        {"metric": key, "value": f"{scores[key]:.4f}"} for key in ("exact_match", "token_f1")])
    samples = pd.DataFrame([json.loads(line) for line in Path(predictions).read_text(encoding="utf-8").splitlines()
                            ][:sample_count], columns=["video", "question", "reference", "prediction"])
    sections = [
        ("Videos per data stage", counts),
        ("Manifest rows rejected before download", rejected),
        ("Failures by stage and reason", by_reason),
        ("Failed videos and why", failures),
        ("Instruction records per dataset", records),
        ("Rejected instruction records by reason", reasons),
        ("Training data of each stage", mix),
        (f"Evaluation of {html.escape(str(scores['model']))} (greedy decoding)", metric_rows),
        (f"The first {len(samples)} predictions", samples),
    ]
    body = "".join(f"<h3>{title}</h3>{frame.to_html(index=False, border=0) if len(frame) else '<p>none</p>'}"
                   for title, frame in sections)
    style = "body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left}"
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{body}</body></html>"


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.report loss ...`` or ``python -m pipeline.report summary ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss", help="plot a stage's loss curve")
    loss.add_argument("--loss", required=True)
    loss.add_argument("--title", required=True)
    loss.add_argument("--out", required=True)
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
    summary.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "loss":
        plot_loss(args.loss, args.out, args.title)
    elif args.command == "video-stats":
        plot_video_stats(args.tables, args.out)
    else:
        tables = {name: paths for name, *paths in args.stage}
        write_text(args.out, summary_html(tables, args.manifest_rejected, args.instructions, args.mixes,
                                          args.metrics, args.predictions))
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
