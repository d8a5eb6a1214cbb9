"""Multiple-choice scorers (pipeline/eval/benchmarks/mcq.py) on small files in each benchmark's published layout.

Expected numbers are worked out by hand in the comments, from the upstream parsing rules cited in mcq.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval.benchmarks import mcq
from pipeline.eval.benchmarks.base import InputError

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def _fields(bad):
    return sorted((Path(b["file"]).name, b["record"], b["field"]) for b in bad)


def test_mvbench_layout_prompt_and_score():
    items, bad = mcq.load_mvbench(FIX / "mvbench")
    assert [i["id"] for i in items] == ["action_antonym/0", "action_antonym/1", "action_count/0"]
    assert _fields(bad) == [("action_antonym.json", "2", "answer"), ("action_count.json", "1", "video")]
    first = items[0]
    assert first["answer"] == "C" and first["task"] == "action_antonym" and first["video"] == "166583.webm"
    assert first["video_folder"] == "ssv2-video/"
    assert first["prompt"] == (
        "Question: What is the action performed by the person in the video?\nOption:\n(A) Not sure\n"
        "(B) Scattering something down\n(C) Piling something up\n\nOnly give the best option."
    )
    preds = {
        "action_antonym/0": "(C) Piling something up",  # punctuation blanked -> "c piling ..." -> C, right
        "action_antonym/1": "",  # exactly "": left out of the denominator, as mvbench_aggregate_results
        "action_count/0": "I think it is 4",  # no standalone a-e -> invalid, wrong
        "action_antonym/9": "A",  # unknown id
    }
    for variant in ("videochat_flash", "lmms_eval"):
        out = mcq.score("mvbench", items, preds, variant=variant)
        assert out["units"] == "percent"
        assert out["overall"] == pytest.approx(50.0)  # 1 right of 2 counted
        assert out["tasks"] == {"action_antonym": pytest.approx(100.0), "action_count": pytest.approx(0.0)}
        assert (out["count"], out["correct"], out["excluded_empty"]) == (3, 1, 1)
        assert (out["invalid"], out["unanswered"], out["unknown_predictions"]) == (1, 0, 1)


def test_videomme_variants_differ():
    items, bad = mcq.load_videomme(FIX / "videomme.json")
    assert [i["id"] for i in items] == ["001-1", "001-2", "301-1", "601-2"]
    assert _fields(bad) == [("videomme.json", "601-1", "answer")]
    assert items[0]["video"] == "fFjv93ACGo8.mp4" and items[0]["duration"] == "short"
    assert items[1]["prompt"] == (
        "These are the frames of a video. Select the best answer to the following multiple-choice question based on "
        "the video. Respond with only the letter (A, B, C, or D) of the correct option.\nQuestion: What is the genre "
        "of this video?\nOption:\nA. It is a news report that introduces the history behind Christmas decorations.\n"
        "B. It is a documentary on the evolution of Christmas holiday recipes.\nC. It is a travel vlog exploring "
        "Christmas markets around the world.\nD. It is a tutorial on DIY Christmas ornament crafting.\n"
        "Answer with the option's letter from the given choices directly."
    )
    preds = {
        "001-1": "Best option: C",  # VCF: first [ABCD] is the B of "Best" (wrong); lmms-eval: trailing C (right)
        "001-2": "A",
        "601-2": "The answer is D.",
        "601-1": "A",  # a skipped record: ignored, counted as unknown
    }  # 301-1 unanswered
    vcf = mcq.score("videomme", items, preds, variant="videochat_flash")
    assert vcf["overall"] == pytest.approx(50.0)  # 2 of 4
    assert vcf["durations"] == {"long": 100.0, "medium": 0.0, "short": 50.0}
    assert vcf["tasks"]["Counting Problem"] == 0.0
    assert (vcf["unanswered"], vcf["invalid"], vcf["unknown_predictions"]) == (1, 0, 1)
    le = mcq.score("videomme", items, preds, variant="lmms_eval")
    assert le["overall"] == pytest.approx(75.0)  # 3 of 4
    assert le["durations"]["short"] == 100.0 and le["tasks"]["Counting Problem"] == 50.0


def test_videomme_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = json.loads((FIX / "videomme.json").read_text())
    path = tmp_path / "test-00000-of-00001.parquet"
    pd.DataFrame(rows).to_parquet(path)
    items, bad = mcq.load_videomme(path)
    assert len(items) == 4 and len(bad) == 1 and items[0]["options"][2] == "C. Berries."


def test_letter_parsers():
    assert mcq.videomme_vcf_letter("Best option: C") == "B"
    assert mcq.extract_mcq_answer("Best option: C") == "C"
    assert mcq.extract_mcq_answer("The correct answer is (B).") == "B"
    assert mcq.extract_mcq_answer("no letter here") == ""
    assert mcq.mcq_acc_letter("B. a dog") == "B"
    assert mcq.mcq_acc_letter("a man opens it") == "A"  # upstream quirk: the article reads as option A
    assert mcq.perception_letter("(C).") == "C"


def test_generic_mcq_variants_and_bad_records(tmp_path):
    path = tmp_path / "demo.json"
    path.write_text(json.dumps([
        {"id": "q1", "video": "v1.mp4", "question": "Which?", "options": ["x", "y", "z", "w"], "answer": "D",
         "task": "t1", "duration": "short"},
        {"id": "q2", "video": "v2.mp4", "question": "Which?", "options": ["x", "y"], "answer": "C"},
        {"id": "q3", "video": "v3.mp4", "options": ["x", "y"], "answer": "A"},
    ]))
    items, bad = mcq.load_mcq(path)
    assert [i["id"] for i in items] == ["q1"]
    assert _fields(bad) == [("demo.json", "q2", "answer"), ("demo.json", "q3", "question")]
    preds = {"q1": "d"}  # mcq_acc lower-cases and finds d; extract_mcq_answer knows upper-case letters only
    assert mcq.score("mcq", items, preds, variant="videochat_flash")["overall"] == 100.0
    le = mcq.score("mcq", items, preds, variant="lmms_eval")
    assert le["overall"] == 0.0 and le["invalid"] == 1
    with pytest.raises(ValueError):
        mcq.score("mcq", items, preds, variant="nope")


def test_bad_records_reported_whole_while_the_rest_load(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([
        {"id": "ok", "video": "v.mp4", "question": "Which?", "options": ["x", "y"], "answer": "B"},
        {"id": "no_options", "video": "v.mp4", "question": "Which?", "answer": "A"},
        {"id": "two_letters", "video": "v.mp4", "question": "Which?", "options": ["x", "y"], "answer": "AB"},
        {"id": "empty", "video": "v.mp4", "question": "Which?", "options": ["x", "y"], "answer": ""},
    ]))
    items, bad = mcq.load_mcq(path)
    assert [i["id"] for i in items] == ["ok"]
    assert bad == [
        {"file": str(path), "record": "no_options", "field": "options", "reason": "missing"},
        {"file": str(path), "record": "two_letters", "field": "answer", "reason": "letter 'AB' outside the 2 options"},
        {"file": str(path), "record": "empty", "field": "answer", "reason": "letter '' outside the 2 options"},
    ]
    # Video-MME the same: "" or "AB" is no option letter (a substring test would take them, and "" would then
    # match every prediction with no letter)
    rows = json.loads((FIX / "videomme.json").read_text())
    rows[0]["answer"], rows[1]["answer"] = "", "AB"
    (tmp_path / "videomme.json").write_text(json.dumps(rows))
    items, bad = mcq.load_videomme(tmp_path / "videomme.json")
    assert [i["id"] for i in items] == ["301-1", "601-2"]
    assert _fields(bad) == [("videomme.json", "001-1", "answer"), ("videomme.json", "001-2", "answer"),
                            ("videomme.json", "601-1", "answer")]  # fmt: skip


def test_longvideobench_variants():
    items, bad = mcq.load_longvideobench(FIX / "lvb_val.json")
    assert [i["id"] for i in items] == ["86CxyhFV9MI_0", "86CxyhFV9MI_1"]
    assert _fields(bad) == [("lvb_val.json", "2", "correct_choice")]
    assert items[1]["prompt"] == (
        "What colour is the car?\n(A). the blue bus\n(B). the red car\n(C). the green van\n"
        "Answer with the option's letter from the given choices directly.\n"
    )
    preds = {
        "86CxyhFV9MI_0": "(B) run away",
        "86CxyhFV9MI_1": "I think the answer must be the red car here",  # MMMU: option text -> B; [ABCDE]: none
    }
    vcf = mcq.score("longvideobench", items, preds, variant="videochat_flash")
    assert vcf["units"] == "fraction" and vcf["overall"] == 1.0 and vcf["durations"] == {"600": 1.0}
    le = mcq.score("longvideobench", items, preds, variant="lmms_eval")
    assert le["overall"] == 0.5 and le["invalid"] == 1 and le["tasks"] == {"S2E": 0.0, "TOS": 1.0}


def test_perceptiontest(tmp_path):
    path = tmp_path / "mc_question_val.json"
    path.write_text(json.dumps([
        {"video_name": "video_10909", "question_id": 0, "question": "Is the camera moving?",
         "options": ["yes", "no", "I don't know"], "answer_id": 0, "area": "physics", "reasoning": "", "tag": []},
        {"video_name": "video_10909", "question_id": 1, "question": "How many?", "options": ["1", "2", "3"],
         "answer_id": 2, "area": "memory"},
        {"video_name": "video_1", "question_id": 0, "question": "Q?", "answer_id": 1},
    ]))
    items, bad = mcq.load_perceptiontest(path)
    assert _fields(bad) == [("mc_question_val.json", "2", "options")]
    assert items[0]["prompt"] == (
        "\nQuestion: Is the camera moving?\n(A). yes\n(B). no\n(C). I don't know\nOnly give the best option."
    )
    out = mcq.score("perceptiontest", items, {"video_10909/0": "A", "video_10909/1": "(C)."})
    assert out["units"] == "fraction" and out["overall"] == 1.0 and out["tasks"] == {"memory": 1.0, "physics": 1.0}


def test_mlvu_task_mean_and_lvbench(tmp_path):
    (tmp_path / "mlvu" / "json").mkdir(parents=True)
    (tmp_path / "mlvu" / "json" / "4_count.json").write_text(json.dumps([
        {"video": "count_1.mp4", "duration": 5.0, "question": "How many?", "candidates": ["2", "1"], "answer": "1",
         "question_type": "count"},
        {"video": "count_2.mp4", "duration": 5.0, "question": "How many?", "candidates": ["2", "1"], "answer": "2",
         "question_type": "count"},
    ]))
    items, _ = mcq.load_mlvu(tmp_path / "mlvu")
    assert items[0]["prompt"] == (
        "Question:How many?\nOption:\n(A) 2\n(B) 1\nAnswer with the option's letter from the given choices directly."
    )
    preds = {"4_count/0": "B", "4_count/1": "B"}  # 1 of 2 right
    assert mcq.score("mlvu", items, preds)["overall"] == pytest.approx(50.0)
    # lmms-eval: mean over its 7 task types, the 6 absent ones at 0 -> 50 / 7
    assert mcq.score("mlvu", items, preds, variant="lmms_eval")["overall"] == pytest.approx(50 / 7)

    path = tmp_path / "lvbench_clean.json"
    path.write_text(json.dumps([
        {"video": "00000000", "type": "cartoon", "question": "What year appears?",
         "candidates": ["(A) 1636", "(B) 1366", "(C) 1363", "(D) 1633"], "answer": "(D) 1633",
         "question_type": ["key information retrieval", "entity recognition"], "time_reference": "00:15-00:19"},
    ]))
    items, _ = mcq.load_lvbench(path)
    assert items[0]["video"] == "00000000.mp4"
    assert items[0]["prompt"].startswith("What year appears?\nA. (A) 1636\nB. (B) 1366\n")
    out = mcq.score("lvbench", items, {"0": "(D) 1633"})
    assert out["overall"] == 100.0 and out["categories"] == {"cartoon": 100.0}
    assert out["tasks"] == {"entity recognition": 100.0, "key information retrieval": 100.0}
    assert mcq.score("lvbench", items, {"0": "D"}, variant="lmms_eval")["overall"] == 1.0  # a fraction there


def test_read_predictions(tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"id": "a", "prediction": "A"}\n{"id": 2, "prediction": "B"}\n')
    assert mcq.read_predictions(lines) == {"a": "A", "2": "B"}
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps([{"id": "a", "prediction": "C"}]))
    assert mcq.read_predictions(listed) == {"a": "C"}
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"id": "a"}\n')
    with pytest.raises(InputError, match="b.jsonl"):
        mcq.read_predictions(broken)
    with pytest.raises(InputError):
        mcq.read_predictions(tmp_path / "missing.jsonl")


def test_registry():
    assert sorted(mcq.BENCHMARKS) == sorted(
        ["mcq", "mvbench", "videomme", "perceptiontest", "longvideobench", "mlvu", "lvbench"]
    )
    bench = mcq.BENCHMARKS["videomme"]
    items, _ = bench.load(FIX / "videomme.json")
    assert bench.format == "mcq" and bench.score(items, {"001-2": "A"}, variant="lmms_eval")["overall"] == 25.0
