"""Multiple-choice scoring speed: a synthetic 5,000-question Video-MME benchmark loaded, its predictions read and
scored end to end (``pipeline.eval.benchmarks.mcq``), best of 3.

The rows have Video-MME's columns (``video_id, duration, domain, sub_category, url, videoID, question_id, task_type,
question, options, answer``), written as JSON lines; the predictions are JSON lines ``{"id", "prediction"}`` in a mix
of answer styles (a bare letter, ``"The answer is (B)."``, ``"C. text"``, a sentence without a letter, and some
questions left unanswered). Each round times ``load_videomme`` + ``read_predictions`` + ``score`` under both
variants. The goal is well under 5 s.

    python benchmarks/mcq_scoring.py [--questions 5000]

Writes ``benchmarks/results/mcq_scoring.json`` ``{questions, seconds, goal_seconds, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.eval.benchmarks import mcq  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "mcq_scoring.json"
GOAL_SECONDS = 5
DURATIONS = ("short", "medium", "long")
TASKS = ("Temporal Perception", "Counting Problem", "OCR Problems", "Action Reasoning", "Information Synopsis")
STYLES = ("{}", "The answer is ({}).", "{}. because it is shown", "Best option: {}", "I am not sure about it at all")


def write_benchmark(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """Writes ``n`` Video-MME rows and predictions for them under ``folder``; returns (annotations, predictions)."""
    rng = random.Random(seed)
    rows, preds = [], []
    for i in range(n):
        video = i // 3
        answer = "ABCD"[rng.randrange(4)]
        rows.append({
            "video_id": f"{video:03d}", "duration": DURATIONS[video % 3], "domain": "Knowledge",
            "sub_category": "Humanity & History", "url": f"https://www.youtube.com/watch?v=v{video}",
            "videoID": f"v{video}", "question_id": f"{video:03d}-{i % 3 + 1}", "task_type": TASKS[i % len(TASKS)],
            "question": f"Question {i}: what does the person in the video do after the {i}th event?",
            "options": [f"{letter}. option {letter} of question {i}." for letter in "ABCD"], "answer": answer,
        })  # fmt: skip
        if rng.random() < 0.02:
            continue  # unanswered
        letter = answer if rng.random() < 0.6 else "ABCD"[rng.randrange(4)]
        preds.append({"id": rows[-1]["question_id"], "prediction": STYLES[rng.randrange(len(STYLES))].format(letter)})
    ann = folder / "videomme.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pred = folder / "predictions.jsonl"
    pred.write_text("".join(json.dumps(p) + "\n" for p in preds))
    return ann, pred


def run_once(ann: Path, pred: Path) -> tuple[float, dict]:
    """Seconds for load + read_predictions + score (both variants), and the videochat_flash metrics."""
    start = time.perf_counter()
    items, bad = mcq.load_videomme(ann)
    predictions = mcq.read_predictions(pred)
    out = mcq.score("videomme", items, predictions, variant="videochat_flash")
    mcq.score("videomme", items, predictions, variant="lmms_eval")
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ann, pred = write_benchmark(Path(tmp), args.questions)
        times, out = [], {}
        for _ in range(args.repeats):
            seconds, out = run_once(ann, pred)
            times.append(seconds)
    result = {
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "python benchmarks/mcq_scoring.py",
        "questions": args.questions,
        "seconds": round(min(times), 4),
        "all_seconds": [round(t, 4) for t in times],
        "goal_seconds": GOAL_SECONDS,
        "includes": "load_videomme + read_predictions + score (videochat_flash and lmms_eval variants)",
        "overall_videochat_flash": round(out["overall"], 2),
        "unanswered": out["unanswered"],
        "invalid": out["invalid"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["seconds"] < GOAL_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
