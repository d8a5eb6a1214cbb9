"""The summary page's benchmark sections: stages x benchmarks, the per-task and per-duration breakdowns, and
sample predictions with frame strips of their compressed videos."""

import json
import re

import pytest

from pipeline.io import write_json, write_table
from pipeline.report import format_score, main, read_evaluations, summary_html


def _val_inputs(tmp_path) -> list:
    """The summary page's other inputs (data stages, manifest, instructions, mix, held-out evaluation), minimal."""
    shard = tmp_path / "compress" / "shard-00000.tsv"
    write_table(shard, [{"video_id": "bikes", "status": "ok", "reason": "", "path": ""}],
                ["video_id", "status", "reason", "path"])
    write_table(tmp_path / "rejected.tsv", [], ["video_id", "source", "reason"])
    write_json(tmp_path / "instructions" / "demo" / "counts.json",
               {"annotations": 1, "kept": 1, "rejected": 0, "rejected_by_reason": {},
                "train": {"records": 1, "videos": 1}, "val": {"records": 0, "videos": 0}})
    write_json(tmp_path / "train" / "stage2" / "data_counts.json",
               {"demo": {"available": 1, "taken": 1, "ratio": 1.0, "max_records": None}})
    write_json(tmp_path / "metrics.json", {"count": 1, "exact_match": 1.0, "model": "m"})
    (tmp_path / "predictions.jsonl").write_text(json.dumps(
        {"video": "bikes", "question": "What?\n<video>", "reference": "Bikes.", "prediction": "Bikes."}) + "\n")
    return [{"compress": [str(shard)]}, tmp_path / "rejected.tsv", [tmp_path / "instructions/demo/counts.json"],
            [tmp_path / "train/stage2/data_counts.json"], tmp_path / "metrics.json", tmp_path / "predictions.jsonl"]


def _prediction(i: int, video_id: str | None, status: str = "ok", task: str = "action") -> dict:
    return {"id": f"q{i}", "video": f"{video_id}.mp4", "video_id": video_id, "prompt": f"Question {i}?\n<video>",
            "answer": "A", "prediction": None if status != "ok" else "(A) yes", "status": status, "task": task,
            "duration": "short"}


def _evaluations(tmp_path) -> tuple[list, list]:
    """Two stages x two benchmarks (MVBench in percent with tasks and durations, VCGPT's judge score without);
    stage2's MVBench has a video that failed upstream, past the first rows, and one not compressed."""
    metrics, predictions = [], []
    scores = {("stage1", "mvbench"): 50.0, ("stage2", "mvbench"): 62.5,
              ("stage1", "vcgpt_generic"): 2.5, ("stage2", "vcgpt_generic"): 3.125}
    for stage in ("stage1", "stage2"):
        for benchmark, units in (("mvbench", "percent"), ("vcgpt_generic", "score")):
            folder = tmp_path / "eval" / stage / benchmark
            rows = [_prediction(i, "bikes") for i in range(3)] + [_prediction(3, "lost")]
            rows += [_prediction(4, "bikes", task="count"),
                     _prediction(5, None, "failed upstream: decode error: moov atom not found", task="count")]
            tasks = {"action": 75.0 if stage == "stage2" else 25.0, "count": 50.0} if benchmark == "mvbench" else {}
            extra = {"tasks": tasks, "durations": {"short": scores[stage, benchmark]}} if tasks else {}
            write_json(folder / "metrics.json", {
                "benchmark": benchmark, "format": benchmark, "family": "mcq" if tasks else "vcgpt_generic",
                "stage": stage, "overall": scores[stage, benchmark], "units": units, **extra, "count": 6,
                "unanswered": 1, "failed_videos": [{"video": "gone.mp4", "reason": "decode error"}], "skipped": []})
            (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            metrics.append(folder / "metrics.json")
            predictions.append(folder / "predictions.jsonl")
    return metrics, predictions


def _rows(page: str, title: str) -> list[list[str]]:
    """The body cells of the table under the ``<h3>`` that starts with ``title``."""
    table = page.split(f"<h3>{title}", 1)[1].split("</table>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row, re.S) for row in table.split("<tbody>", 1)[1].split("<tr>")[1:]]


def test_the_summary_scores_every_stage_on_every_benchmark_with_sample_frames(tmp_path, bikes_clip):
    metrics, predictions = _evaluations(tmp_path)
    write_table(tmp_path / "index.tsv", [{"video_id": "bikes", "path": str(bikes_clip), "frames": 250, "fps": 25,
                                          "duration": 10}], ["video_id", "path", "frames", "fps", "duration"])
    page = summary_html(*_val_inputs(tmp_path), eval_metrics=metrics, eval_predictions=predictions,
                        videos_index=tmp_path / "index.tsv")
    assert _rows(page, "Benchmarks: stages x benchmarks") == [
        ["stage1", "50.0 % (5/6 answered)", "2.50 / 5 (5/6 answered)"],
        ["stage2", "62.5 % (5/6 answered)", "3.12 / 5 (5/6 answered)"]]
    assert _rows(page, "mvbench: score per task") == [["action", "25.0 %", "75.0 %"], ["count", "50.0 %", "50.0 %"]]
    assert _rows(page, "mvbench: score per duration") == [["short", "50.0 %", "62.5 %"]]
    assert "vcgpt_generic: score per" not in page
    samples = _rows(page, "mvbench: the first 4 of 6 predictions of stage stage2, and 1 whose video failed upstream")
    assert [row[0] for row in samples] == ["q0", "q1", "q2", "q3", "q5"]
    assert samples[0][4] == "Question 0?" and samples[0][6] == "(A) yes"
    assert all(re.fullmatch(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+" height="96" [^>]*>', row[-1])
               for row in samples[:3])
    assert samples[3][-1] == "no video (not in the compressed videos)"
    assert samples[4][-1] == "no video (it failed upstream)" and samples[4][6] == "(none)"
    assert samples[4][7] == "failed upstream: decode error: moov atom not found"
    assert page.count("data:image/jpeg") == 6  # the first three rows of each benchmark, one decode per video
    assert len(page) < 200_000


def test_the_cli_takes_the_benchmark_files_and_works_without_them(tmp_path):
    metrics, predictions = _evaluations(tmp_path)
    stages, rejected, instructions, mixes, val_metrics, val_predictions = _val_inputs(tmp_path)
    common = ["summary", "--stage", "compress", *stages["compress"], "--manifest-rejected", str(rejected),
              "--instructions", *map(str, instructions), "--mixes", *map(str, mixes), "--metrics", str(val_metrics),
              "--predictions", str(val_predictions)]
    assert main([*common, "--eval-metrics", *map(str, metrics), "--eval-predictions", *map(str, predictions),
                 "--out", str(tmp_path / "summary.html")]) == 0
    page = (tmp_path / "summary.html").read_text()
    assert "<td>62.5 % (5/6 answered)</td>" in page and "data:image" not in page  # no index: no strips
    assert main([*common, "--out", str(tmp_path / "plain.html")]) == 0
    assert "<h3>Benchmarks: stages x benchmarks" in (tmp_path / "plain.html").read_text()


def test_benchmark_inputs_that_do_not_fit_are_refused(tmp_path):
    metrics, predictions = _evaluations(tmp_path)
    assert format_score(0.625, "fraction") == "0.625" and format_score(None, "percent") == "n/a"
    with pytest.raises(ValueError, match="4 metrics files but 3 predictions files"):
        read_evaluations(metrics, predictions[:3])
    with pytest.raises(ValueError, match="a second evaluation of stage 'stage1' on 'mvbench'"):
        read_evaluations([metrics[0], metrics[0]])
    write_json(tmp_path / "bad.json", {"benchmark": "x", "stage": "s", "overall": 1.0, "units": "points",
                                       "count": 1, "unanswered": 0})
    with pytest.raises(ValueError, match="unknown units 'points'"):
        read_evaluations([tmp_path / "bad.json"])
    write_json(tmp_path / "bad.json", {"benchmark": "x", "stage": "s", "overall": 1.0, "units": "score",
                                       "count": 1, "unanswered": 0, "tasks": {"t": {"score": 3.0}}})
    with pytest.raises(ValueError, match="tasks t is {'score': 3.0}, not a number in score"):
        read_evaluations([tmp_path / "bad.json"])
