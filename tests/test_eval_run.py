"""Answering a benchmark with a stage and scoring the answers (pipeline/eval/run.py), on a stand-in answerer: which
questions are asked, in which order and wording, and how the ones that cannot be answered are counted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.eval import run
from pipeline.eval.benchmarks import get
from pipeline.eval.generate import GenerationSettings, write_jsonl
from pipeline.io import read_json, write_table
from pipeline.shards import ItemError

MCQ = [
    {"id": "q1", "video": "clips/b.mp4", "question": "Colour?", "options": ["red", "blue"], "answer": "A",
     "task": "colour"},
    {"id": "q2", "video": "clips/a.mp4", "question": "Count?", "options": ["one", "two", "three"], "answer": "C"},
    {"id": "q3", "video": "clips/b.mp4", "question": "Where?", "options": ["in", "out"], "answer": "B"},
    {"id": "q4", "video": "clips/broken.mp4", "question": "What?", "options": ["x", "y"], "answer": "A"},
    {"id": "q5", "video": "clips/gone.mp4", "question": "Who?", "options": ["me", "you"], "answer": "B"},
    {"id": "q6", "video": "clips/undecodable.mp4", "question": "How?", "options": ["so", "not"], "answer": "A"},
    {"id": "q7", "video": "../outside.mp4", "question": "Why?", "options": ["no", "yes"], "answer": "A"},
    {"id": "q8", "video": "clips/a.mp4", "question": "Missing its answer", "options": ["no", "yes"]},
]


class Answerer:
    """Answers "A" to every question, except about clips/undecodable, whose visuals fail to load."""

    def __init__(self):
        self.batches = []

    def __contains__(self, video_id):
        return video_id in {"clips__a", "clips__b", "clips__undecodable"}

    def answer(self, records, settings):
        self.batches.append([(r["video"], r["conversations"][0]["value"]) for r in records])
        if any(r["video"] == "clips__undecodable" for r in records):
            raise ItemError("moov atom not found")
        return ["(A)"] * len(records)


@pytest.fixture
def mcq_file(tmp_path):
    path = tmp_path / "mcq.json"
    path.write_text(json.dumps(MCQ))
    return path


def test_questions_are_asked_per_video_and_unanswerable_ones_are_rows_with_their_reason(mcq_file):
    benchmark = get("mcq")
    items, skipped = benchmark.load(mcq_file)
    assert [(s["record"], s["field"]) for s in skipped] == [("q8", "answer")]  # the rest still loads
    answerer = Answerer()
    rows = run.answer_benchmark(benchmark, items, answerer, GenerationSettings(batch_size=2, video_placement="after"),
                                failed={"clips__broken": "transcode: invalid data found"})
    by_id = {row["id"]: row for row in rows}
    assert [row["id"] for row in rows] == ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]  # the items' order
    # sorted by video: a's question, then b's two in one batch; the undecodable video's batch is retried one by one
    assert [[video for video, _ in batch] for batch in answerer.batches] == [
        ["clips__a", "clips__b"], ["clips__b", "clips__undecodable"], ["clips__b"], ["clips__undecodable"]]
    assert answerer.batches[0][0][1].endswith("\n<video>") and answerer.batches[0][0][1].startswith("Question: Count?")
    assert {i: by_id[i]["prediction"] for i in ("q1", "q2", "q3")} == {"q1": "(A)", "q2": "(A)", "q3": "(A)"}
    assert by_id["q4"]["status"] == "failed upstream: transcode: invalid data found"
    assert by_id["q5"]["status"].startswith("not in the stage's visuals")
    assert by_id["q6"]["status"] == "visuals did not load: moov atom not found"
    assert by_id["q7"]["status"].startswith("bad video path") and by_id["q7"]["video_id"] is None
    assert all(by_id[i]["prediction"] is None for i in ("q4", "q5", "q6", "q7"))

    metrics = run.score_rows(benchmark, items, skipped, rows)
    # 7 items: q1 right (A), q2 wrong (C), q3 wrong (B), q4-q7 unanswered -> 1/7
    assert metrics["overall"] == pytest.approx(100 / 7) and metrics["unanswered"] == 4
    assert metrics["headline"] == {"overall": pytest.approx(100 / 7), "units": "percent",
                                   "tasks": {"colour": 100.0}, "durations": {}}
    assert {f["video"]: f["reason"].split(":")[0] for f in metrics["failed_videos"]} == {
        "clips/broken.mp4": "failed upstream", "clips/gone.mp4": "not in the stage's visuals (not in the manifest, or "
        "failed upstream)", "clips/undecodable.mp4": "visuals did not load", "../outside.mp4": "bad video path"}
    assert metrics["skipped"] == skipped


def test_consistency_asks_both_phrasings_and_needs_both_answers():
    benchmark = get("vcgpt_consistency")
    items = [{"id": "v_0", "video": "clips/a.mp4", "prompt": "What colour?", "prompt_2": "Which colour?",
              "question": "What colour?", "question_2": "Which colour?", "answer": "red"}]
    answerer = Answerer()
    rows = run.answer_benchmark(benchmark, items, answerer, GenerationSettings())
    assert [text for _, text in answerer.batches[0]] == ["<video>\nWhat colour?", "<video>\nWhich colour?"]
    assert run.predictions_of(rows, benchmark) == {"v_0": {"prediction": "(A)", "prediction_2": "(A)"}}


def test_failed_videos_come_from_the_data_stages_status_tables(tmp_path):
    table = tmp_path / "transcode" / "shard-000.tsv"
    table.parent.mkdir()
    write_table(table, [{"video_id": "a", "status": "ok", "reason": ""},
                        {"video_id": "b", "status": "failed", "reason": "no video stream"}])
    assert run.failed_videos([table]) == {"b": "transcode: no video stream"}


def test_score_command_records_stage_and_name_and_exits_2_on_a_bad_prediction_file(tmp_path, mcq_file):
    predictions = tmp_path / "predictions.jsonl"
    write_jsonl(predictions, [{"id": "q1", "status": "ok", "prediction": "A"},
                              {"id": "q2", "status": "failed upstream: x", "prediction": None}])
    out = tmp_path / "metrics.json"
    assert run.main(["score", "--benchmark", "mcq", "--annotations", str(mcq_file), "--predictions",
                     str(predictions), "--out", str(out), "--stage", "stage2", "--name", "demo_mcq"]) == 0
    metrics = read_json(out)
    assert (metrics["stage"], metrics["benchmark"], metrics["format"]) == ("stage2", "demo_mcq", "mcq")
    assert metrics["correct"] == 1 and metrics["count"] == 7 and metrics["unanswered"] == 6
    predictions.write_text('{"id": "q1"}\n')
    assert run.main(["score", "--benchmark", "mcq", "--annotations", str(mcq_file), "--predictions",
                     str(predictions), "--out", str(out)]) == 2


def test_score_cli_scores_predictions_made_elsewhere(tmp_path, mcq_file, capsys):
    from pipeline.eval import score

    predictions = tmp_path / "lmms.jsonl"
    write_jsonl(predictions, [{"id": "q1", "prediction": "The answer is A."},
                              {"id": "q2", "prediction": "C"}])
    out = tmp_path / "m.json"
    assert score.main(["--benchmark", "mcq", "--annotations", str(mcq_file), "--predictions", str(predictions),
                       "--out", str(out), "--variant", "lmms_eval"]) == 0
    metrics = read_json(out)
    assert metrics["variant"] == "lmms_eval" and metrics["correct"] == 2 and metrics["unanswered"] == 5
    assert [s["record"] for s in metrics["skipped"]] == ["q8"]
    assert "7 records scored" in capsys.readouterr().out
    # a judged format without a judge, and a variant on a format without variants: exit 2, one line
    assert score.main(["--benchmark", "open_qa", "--annotations", str(mcq_file), "--predictions", str(predictions),
                       "--out", str(out)]) == 2
    assert "judge" in capsys.readouterr().err
    assert score.main(["--benchmark", "mcq", "--annotations", str(Path(sys.executable)), "--predictions",
                       str(predictions), "--out", str(out)]) == 2


def test_the_config_schema_names_every_benchmark_format():
    from pipeline.eval.benchmarks import REGISTRY
    from pipeline.io import read_yaml

    schema = read_yaml(Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    entry = schema["properties"]["evaluate"]["properties"]["benchmarks"]["items"]["properties"]
    assert entry["format"]["enum"] == list(REGISTRY)
    assert set(entry["generation"]["properties"]) == set(GenerationSettings.__dataclass_fields__)


def test_benchmark_config_errors_name_the_entry():
    from pipeline.config import benchmark_errors

    config = {"evaluate": {"stages": ["stage9"], "benchmarks": [
        {"name": "qa", "format": "activitynet_qa", "annotations": "a.json", "judge": None, "variant": None},
        {"name": "qa", "format": "mvbench", "annotations": "m", "judge": {"kind": "hf", "model": "j"},
         "variant": None},
        {"name": "vc", "format": "vcgpt_generic", "annotations": "g.json", "variant": "lmms_eval",
         "judge": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key": "sk-x"}}]}}
    errors = benchmark_errors(config, ["stage1"])
    assert errors == [
        "config error: evaluate.stages: 'stage9' is not a stage; stages are ['stage1']",
        "config error: evaluate.benchmarks[0] (qa): format activitynet_qa is scored by a judge model; set judge",
        "config error: evaluate.benchmarks[1] (qa): the name is used twice",
        "config error: evaluate.benchmarks[1] (qa): format mvbench has no judge",
        "config error: evaluate.benchmarks[2] (vc): format vcgpt_generic has no scorer variants",
        "config error: evaluate.benchmarks[2] (vc).judge: judge config: 'api_key' is not accepted; name the "
        "environment variable in 'api_key_env'"]


def test_a_videos_visuals_are_read_once_for_its_adjacent_questions():
    from pipeline.eval.generate import _LastVideo

    class Source:
        reads = 0

        def load(self, video_id):
            Source.reads += 1
            return {"video": video_id}

        def info(self, video_id):
            return video_id

    source = _LastVideo(Source())
    for video in ["a", "a", "a", "b", "b", "a"]:
        assert source.load(video) == {"video": video} and source.info(video) == video
    assert Source.reads == 3  # a, b, a again
