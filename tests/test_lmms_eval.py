"""lmms-eval, in its own venv (``make eval-env``: it pins av<16), runs a local task written in its task format
(tests/fixtures/lmms_task) on a tiny trained stage through our model, ``--model video_llm``
(pipeline/eval/lmms_eval_model.py)."""

import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO, run_stage_process, stage_settings

from pipeline.eval.generate import GenerationSettings, StageAnswerer

EVAL_VENV = REPO / ".venv-eval"
LMMS_EVAL = EVAL_VENV / "bin" / "lmms-eval"
TASK = REPO / "tests" / "fixtures" / "lmms_task"

pytestmark = pytest.mark.skipif(not (EVAL_VENV / ".installed").exists(),
                                reason="lmms-eval's venv is missing: run `make eval-env`")


def test_lmms_eval_answers_a_local_task_with_a_trained_stage(tmp_path, tiny_llm_dir, train_data):
    # the whole LLM trained for 3 epochs: answers that are not empty (a frozen tiny LLM answers newlines)
    config = stage_settings(tmp_path, tiny_llm_dir, train_data, "stage", epochs=3, llm_training="full",
                            deepspeed=None)
    trained = run_stage_process(tmp_path, config)
    assert trained.returncode == 0, trained.stderr[-3000:]
    task = shutil.copytree(TASK, tmp_path / "task")
    # no PYTHONPATH: the venv has our package (editable); the checkout's egg-info (the main venv's) would shadow its
    # metadata, entry point included
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [str(LMMS_EVAL), "--model", "video_llm", "--model_args",
         f"stage={tmp_path / 'stage'},index={train_data / 'index.tsv'}", "--tasks", "video_llm_local",
         "--include_path", str(task), "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=task, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Error during evaluation" not in output, output[-3000:]  # errors exit 0 too
    assert "video_llm_local/test doc 2: answered ''" in output  # v9: no features

    records = [{"id": str(i), "video": f"v{i}",
                "conversations": [{"from": "human", "value": f"<video>\nQuestion {i}?"}]} for i in range(2)]
    answerer = StageAnswerer(tmp_path / "stage" / "model", train_data / "index.tsv")
    expected = [answer.split("\n\n")[0].strip()
                for answer in answerer.answer(records, GenerationSettings(max_new_tokens=4, batch_size=2))] + [""]
    assert all(expected[:2])
    [samples] = (tmp_path / "out").rglob("*_samples_video_llm_local.jsonl")
    rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda row: row["doc_id"])
    assert [row["filtered_resps"] for row in rows] == expected
    [results] = (tmp_path / "out").rglob("*_results.json")
    scores = json.loads(results.read_text())["results"]["video_llm_local"]
    references = ["Answer v0.", "Answer v1.", "Answer v9."]
    assert scores["exact_match,none"] == pytest.approx(sum(map(str.__eq__, expected, references)) / 3)
    assert scores["answered,none"] == pytest.approx(sum(map(bool, expected)) / 3)
