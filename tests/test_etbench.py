"""E.T. Bench scoring (pipeline.eval.benchmarks.etbench) against numbers worked out by hand from ETBench
evaluation/compute_metrics.py's rules, on small records in the format of ETBench docs/BENCHMARK.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.eval.benchmarks import etbench as E

REPO = Path(__file__).resolve().parents[1]


def rec(task: str, idx: int, a=None, source: str = "src", duration: float = 60.0, **fields) -> dict:
    """One record as docs/BENCHMARK.md lays it out; ``a`` is left out when None."""
    record = {"version": 1.0, "idx": idx, "task": task, "source": source, "video": f"{source}/{idx}.mp4"}
    record.update(duration=duration, q="...", **fields)
    if a is not None:
        record["a"] = a
    return record


def metrics(records: list[dict], **kw) -> dict:
    kw.setdefault("similarity", None)
    return E.evaluate(records, **kw)


class OptionSim:
    """A stand-in similarity: 1.0 when the option text contains the word the answer ends with, else 0.0;
    and for captions, 1.0 for identical strings."""

    def similarity(self, a: str, b: str) -> float:
        return float(a.split()[-1] in b)

    def paired_mean(self, refs: list[str], hyps: list[str]) -> float:
        return sum(r == h for r, h in zip(refs, hyps)) / len(refs)


# --- reading answers -------------------------------------------------------------------------------------------


def test_read_spans_rules():
    # rule 1: every "A - B"
    assert E.read_spans("The event happens at 12.5 - 20 seconds.") == ([[12.5, 20.0]], None)
    # rule 2: "A to B", sorted to [min, max]
    assert E.read_spans("from 30 to 10") == ([[10.0, 30.0]], None)
    # rule 3: first number of each keyword sentence (split at newline), paired: [5, 9]
    assert E.read_spans("It starts at 5\nand ends at 9") == ([[5.0, 9.0]], None)
    # quirk: m:ss is not read as a clock, "0:15 - 0:30" matches "15 - 0"
    assert E.read_spans("0:15 - 0:30") == ([[0.0, 15.0]], None)
    # quirk: the hh:mm:ss rule never fires; one keyword sentence -> one number -> dropped
    assert E.read_spans("It starts at 0:01:05.") == (None, E.NO_TIMESTAMP)
    assert E.read_spans("I cannot tell.") == (None, E.NO_TIMESTAMP)
    assert E.read_spans("") == (None, E.NO_TIMESTAMP)
    # upstream raises ValueError on float('1..5'); here it is a counted reason
    assert E.read_spans("1..5 - 3") == (None, E.UNPARSABLE_TIMESTAMP)


def test_read_captions_rules():
    spans, caps = E.read_captions("0 - 5 seconds, a man cuts an onion. 5 - 10 seconds, he fries it.")
    # lower-cased; ranges replaced by newlines; "seconds" removed; pieces longer than 5 chars, stripped of ", "
    assert spans == [[0.0, 5.0], [5.0, 10.0]]
    assert caps == ["a man cuts an onion.", "he fries it."]
    # fallback: "At 25 seconds ..." -> time part "At 25 " -> one number 25 > 20 -> [25 - 20, 25 + 20] = [5, 45]
    assert E.read_captions("At 25 seconds a man cuts an onion.") == ([[5.0, 45.0]], ["a man cuts an onion."])
    # one number <= 20 -> [t, t + 40]
    assert E.read_captions("At 12 seconds a man cuts an onion.") == ([[12.0, 52.0]], ["a man cuts an onion."])
    # quirk: "start time A, end time B" always fails upstream's assertion
    assert E.read_captions("start time 1, end time 2, a man walks") == (None, None)
    assert E.read_captions("nothing to see") == (None, None)


@pytest.mark.parametrize(
    ("answer", "index", "reason", "failed"),
    [
        ("(B)", 1, None, False),
        ("B. The dog", 1, None, False),
        ("b) the dog", 1, None, False),  # E.T. Chat's prompt ends in "Best Option: (", so answers start "B)"
        ("Best Option: (C)", 2, None, False),
        ("A cat sits on the mat", 0, None, False),  # quirk: a leading article "A " reads as option A
        ("The answer is B", None, E.NO_LETTER, True),  # no letter-like start: similarity fallback, Failed
        ("(F)", None, E.BAD_LETTER, False),  # F is not among 4 options: fallback, not Failed
        ("", None, E.EMPTY_ANSWER, True),
    ],
)
def test_read_choice(answer, index, reason, failed):
    choice = E.read_choice(answer, 4)
    assert (choice.index, choice.reason, choice.failed) == (index, reason, failed)


def test_read_gvq_choice_has_no_paren_search():
    assert E.read_gvq_choice("(C) at 10 - 20 seconds", 4).index == 2
    # gvq_eval has no "(X)" search: "The answer is (B)" goes to the fallback without being Failed
    choice = E.read_gvq_choice("The answer is (B)", 4)
    assert (choice.index, choice.reason, choice.failed) == (None, E.NO_LETTER, False)


# --- temporal IoU ------------------------------------------------------------------------------------------------


def test_temporal_iou_backends_agree():
    # [0, 10] vs [5, 15]: intersection 5, union 15 -> 1/3; vs [20, 30]: 0
    iou = E.temporal_iou([[0, 10]], [[5, 15], [20, 30]], backend="numpy")
    assert iou.dtype == np.float32 and iou.shape == (1, 2)
    assert iou[0, 0] == np.float32(1 / 3) and iou[0, 1] == 0
    # two zero-length spans: 0/0 is 0, not nan
    assert E.temporal_iou([[3, 3]], [[3, 3]], backend="numpy")[0, 0] == 0
    pytest.importorskip("nncore")
    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(0, 100, (20, 2)), axis=1)
    b = np.sort(rng.uniform(0, 100, (30, 2)), axis=1)
    assert np.array_equal(E.temporal_iou(a, b, backend="numpy"), E.temporal_iou(a, b, backend="nncore"))


# --- the tasks ---------------------------------------------------------------------------------------------------


def test_tvg_f1_at_iou():
    records = [
        rec("tvg", 0, "The event happens at 10 - 20 seconds.", tgt=[10, 20]),  # IoU 1
        rec("tvg", 1, "12 - 22", tgt=[10, 20]),  # intersection 8, union 12 -> 2/3
        rec("tvg", 2, "0 - 7", tgt=[0, 10]),  # 7/10, in float32 0.69999999 < 0.7 (upstream's torch.Tensor)
        rec("tvg", 3, "no idea", tgt=[0, 10]),  # no timestamp: Failed, a miss
    ]
    out = metrics(records)["metrics"]["tvg"]["src"]
    # F1@0.1 = F1@0.3 = F1@0.5 = 3/4; F1@0.7 = 1/4; F1 = (3 * 0.75 + 0.25) / 4 = 0.625
    assert out["F1@0.1"] == out["F1@0.3"] == out["F1@0.5"] == 0.75
    assert out["F1@0.7"] == 0.25 and out["F1"] == 0.625
    # mIoU = (1 + 2/3 + 0.7) / 4 = 0.591667
    assert out["mIoU"] == 0.59167
    assert (out["Total"], out["Failed"]) == (4, 1)


def test_tem_recall_and_miou():
    gt = [[0, 10], [20, 30]]
    records = [
        rec("tem", 0, "15 - 25", tgt=gt),  # best IoU: [20, 30] -> 5/15 = 1/3
        rec("tem", 1, "It happens in 20 - 30 seconds.", tgt=gt),  # 1
    ]
    out = metrics(records)["metrics"]["tem"]["src"]
    # R@0.1 = R@0.3 = 2/2; R@0.5 = R@0.7 = 1/2; mRec = 3/4; mIoU = (1/3 + 1) / 2
    assert (out["R@0.1"], out["R@0.3"], out["R@0.5"], out["R@0.7"]) == (1.0, 1.0, 0.5, 0.5)
    assert out["mRec"] == 0.75 and out["mIoU"] == 0.66667


def test_tal_f1_at_iou():
    records = [
        rec("tal", 0, "0 - 10, 20 - 25, 50 - 60", duration=100, tgt=[[0, 10], [20, 30]]),
        rec("tal", 1, "none", duration=100, tgt=[[0, 10]]),
    ]
    out = metrics(records)["metrics"]["tal"]["src"]
    # IoU (gt x pred): [[1, 0, 0], [0, 0.5, 0]].
    # t <= 0.5: recall 2/2, precision 2/3 -> F1 = 2 * (2/3) / (5/3) = 0.8; t = 0.7: recall 1/2, precision 1/3 ->
    # F1 = (1/3) / (5/6) = 0.4. The failed sample adds 0: F1@t = 0.4, 0.4, 0.4, 0.2; F1 = 1.4 / 4 = 0.35
    assert (out["F1@0.1"], out["F1@0.3"], out["F1@0.5"], out["F1@0.7"]) == (0.4, 0.4, 0.4, 0.2)
    assert out["F1"] == 0.35 and out["Failed"] == 1


def test_tal_thresholds_compare_in_float32():
    # IoU 7/10 = 0.69999999 (float32), but tal compares float32 tensors with 0.7 -> 0.7f: a hit (unlike tvg)
    out = metrics([rec("tal", 0, "0 - 7", tgt=[[0, 10]])])["metrics"]["tal"]["src"]
    assert out["F1@0.7"] == 1.0


def test_evs_per_second_f1():
    records = [
        # gt seconds 2..5, answer 4..7: TP {4, 5}, FP {6, 7}, FN {2, 3} -> P = R = 1/2 -> F1 = 1/2
        rec("evs", 0, "4 - 8", tgt=[[2, 6]]),
        # round(2.5) = 2, round(3.5) = 4 (half to even): seconds 2, 3 -> TP 2, FP 0, FN 8 -> R = 0.2, P = 1,
        # F1 = 2 * 0.2 / 1.2 = 1/3
        rec("evs", 1, "2.5 - 3.5", tgt=[[0, 10]]),
        rec("evs", 2, "nothing", tgt=[[0, 10]]),  # Failed, and (quirk) left out of the mean
    ]
    out = metrics(records)["metrics"]["evs"]["src"]
    # F1 = (1/2 + 1/3) / 2 = 0.416667
    assert out == {"Total": 3, "Failed": 1, "F1": 0.41667}


def test_vhd_hit_rate():
    records = [
        rec("vhd", 0, "The highlight is at 11.5 seconds.", tgt=[[10, 12], [30, 31]]),  # hit
        rec("vhd", 1, "at 20", tgt=[[10, 12], [30, 31]]),  # miss
        rec("vhd", 2, "5", tgt=[[[0, 1]], [[5, 6]]]),  # hit: the second annotator's span, bounds inclusive
        rec("vhd", 3, "no", tgt=[[10, 12]]),  # Failed
        rec("vhd", 4, "at 500", tgt=[[10, 12]]),  # past the 60 s video: miss
    ]
    result = metrics(records)
    # F1 = hits / Total = 2 / 5
    assert result["metrics"]["vhd"]["src"] == {"Total": 5, "Failed": 1, "F1": 0.4}
    assert result["invalid"]["vhd"] == {E.NO_TIMESTAMP: 1, E.PAST_END: 1}


def test_choice_accuracy_without_similarity_model():
    options = ["a cat", "the dog", "a bird", "a fish"]
    answers = ["(B)", "B. the dog", "Best Option: (C)", "(F)", "The answer is the dog", ""]
    records = [rec("rvq", i, a, o=options, p=1) for i, a in enumerate(answers)]
    result = metrics(records)
    # hits: "(B)", "B." -> Acc = 2/6; Failed: "The answer is ..." (no letter-like start) and "" -> 2
    assert result["metrics"]["rvq"]["src"] == {"Total": 6, "Failed": 2, "Acc": 0.33333}
    assert result["invalid"]["rvq"] == {E.BAD_LETTER: 1, E.EMPTY_ANSWER: 1, E.NO_LETTER: 1}
    # "(F)" and "The answer is the dog" needed the similarity fallback, scored wrong without it
    assert "rvq/src: 2" in result["not_computed"]["option similarity fallback"]


def test_choice_similarity_fallback():
    options = ["a cat", "the dog", "a bird", "a fish"]
    records = [rec("rar", 0, "The answer is the dog", o=options, p=1), rec("rar", 1, "(F) a bird", o=options, p=2)]
    result = metrics(records, similarity=OptionSim())
    # "... dog" -> "(B) the dog" is the only similar option; "(f) a bird" -> "(C) a bird": both right
    assert result["metrics"]["rar"]["src"]["Acc"] == 1.0
    assert "option similarity fallback" not in result["not_computed"]


def test_gvq_accuracy_then_recall():
    options = ["a", "b", "c", "d"]
    records = [
        rec("gvq", 0, "C. 10 - 20", o=options, p=2, tgt=[10, 20]),  # right, IoU 1
        rec("gvq", 1, "(C) the event is at 15 - 25", o=options, p=2, tgt=[10, 20]),  # right, IoU 5/15
        rec("gvq", 2, "A 10 - 20", o=options, p=2, tgt=[10, 20]),  # wrong option: not grounded
        rec("gvq", 3, "C", o=options, p=2, tgt=[10, 20]),  # right, no timestamp: Failed
    ]
    out = metrics(records)["metrics"]["gvq"]["src"]
    # Acc = 3/4; R@t over all 4: IoUs {1, 1/3} -> R@0.1 = R@0.3 = 2/4, R@0.5 = R@0.7 = 1/4; mRec = 1.5/4
    assert out["Acc"] == 0.75
    assert (out["R@0.1"], out["R@0.3"], out["R@0.5"], out["R@0.7"], out["mRec"]) == (0.5, 0.5, 0.25, 0.25, 0.375)
    # mIoU = (1 + 1/3) / 4
    assert out["mIoU"] == 0.33333 and out["Failed"] == 1


def _dvc_records(task: str = "dvc") -> list[dict]:
    g = ["a man cuts an onion", "he fries it in a pan"]
    return [
        rec(
            task, 0, "0 - 10 seconds, a man cuts an onion. 30 - 40 seconds, he fries it.", tgt=[[0, 10], [10, 20]], g=g
        ),
        rec(task, 1, "I do not know", tgt=[[0, 10]], g=["a dog runs"]),
    ]


def test_captioning_detection_f1_without_java():
    result = metrics(_dvc_records(), java=False)
    out = result["metrics"]["dvc"]["src"]
    # read answers: 1 of 2 videos -> scale 1/2. Video 0: answer [0, 10] covers ref [0, 10] (IoU 1 > t), [30, 40]
    # covers none: precision 1/2, recall 1/2, times scale: 1/4 each -> F1@t = 1/4 for every t
    assert [out[f"F1@{t}"] for t in E.IOU_THRESHOLDS] == [0.25] * 4 and out["F1"] == 0.25
    assert (out["Total"], out["Failed"]) == (2, 1)
    assert all(out[k] is None for k in E.CAPTION_METRICS)
    assert all(result["not_computed"][k] for k in E.CAPTION_METRICS)
    if "not installed" not in E.CaptionTools().reasons.get("METEOR", ""):  # pycocoevalcap is there: Java is missing
        assert "needs Java" in result["not_computed"]["METEOR"]


def test_captioning_dedups_by_video():
    records = _dvc_records()
    records[1]["video"] = records[0]["video"]
    records[1]["a"] = "50 - 55 seconds, the dog runs away"
    out = metrics(records, java=False)["metrics"]["dvc"]["src"]
    # both answers are read, but keyed by video the second replaces the first (:751-752): scale = 1 video / 2.
    # The kept answer [50, 55] covers nothing of its tgt [0, 10] -> precision = recall = 0 -> F1 = 0
    assert out["F1"] == 0 and out["Failed"] == 0


def test_captioning_text_metrics():
    pytest.importorskip("pycocoevalcap")
    if not E.CaptionTools().reasons == {}:
        pytest.skip("Java or pycocoevalcap's jars are missing")
    result = metrics(_dvc_records("slc"), similarity=OptionSim())
    out = result["metrics"]["slc"]["src"]
    # Video 0's pairs at every t (IoU 1 >= t): ("a man cuts an onion", same) and ("he fries it", a random string).
    # Tokenized: 5 + 3 answer words; reference lengths 5 + 1 = 6 <= 8, so no brevity penalty.
    # BLEU-1 = 5/8; BLEU-2 = sqrt(5/8 * 4/6); BLEU-3 = (5/8 * 4/6 * 3/4)^(1/3); BLEU-4 = (5/8 * 4/6 * 3/4 * 2/2)^(1/4)
    assert out["Bleu_1"] == 0.625
    assert out["Bleu_2"] == round((5 / 8 * 4 / 6) ** 0.5, 5)
    assert out["Bleu_3"] == round((5 / 8 * 4 / 6 * 3 / 4) ** (1 / 3), 5)
    assert out["Bleu_4"] == round((5 / 8 * 4 / 6 * 3 / 4) ** (1 / 4), 5)
    # ROUGE-L per pair: 1 (identical) and 0 -> mean 1/2; the stand-in SentSim: identical pairs 1 of 2
    assert out["ROUGE_L"] == 0.5 and out["SentSim"] == 0.5
    assert 0 < out["METEOR"] < 1 and out["CIDEr"] >= 0
    assert result["not_computed"] == {}
    assert result["merged_missing"]["F1 (cap)"] == "needs DVC (F1)"  # only slc was scored


def test_sentsim_without_model_is_reported():
    # the default model id is not in the (absent) local cache and downloading is off
    sim, why = E.load_similarity("sentence-transformers/all-MiniLM-L6-v2-not-here")
    assert sim is None and "not in the local Hugging Face cache" in why
    records = _dvc_records()
    records[0]["a"] = ""
    records[1]["a"] = ""
    # no answer read at all: every metric is 0 as upstream (:760-764), nothing is reported missing
    result = E.evaluate(records, similarity="auto", similarity_model="no/such-model", java=False)
    assert result["metrics"]["dvc"]["src"]["SentSim"] == 0 and "SentSim" not in result["not_computed"]


# --- malformed input ---------------------------------------------------------------------------------------------


def test_malformed_predictions_are_counted_not_fatal():
    records = [
        rec("tvg", 0, "no timestamp here", tgt=[0, 10]),
        rec("tvg", 1, "40 - 50 seconds", duration=35, tgt=[0, 10]),  # past the 35 s video's end
        rec("tvg", 2, None, tgt=[0, 10]),  # no 'a'
        rec("tvg", 3, 5, tgt=[0, 10]),  # not a string
        rec("tvg", 4, "", tgt=[0, 10]),
        rec("tvg", 5, "3.. - 4", tgt=[0, 10]),  # float('3..') fails upstream
        rec("rvq", 0, "(Z)", o=["x", "y"], p=0),
        rec("rvq", 1, ["B"], o=["x", "y"], p=1),
        rec("dvc", 0, None, tgt=[[0, 5]], g=["x"]),
        rec("vhd", 0, {"t": 1}, tgt=[[0, 5]]),
    ]
    result = metrics(records)
    assert result["invalid"]["tvg"] == {
        E.NO_TIMESTAMP: 1,
        E.PAST_END: 1,
        E.MISSING_ANSWER: 1,
        E.NOT_A_STRING: 1,
        E.EMPTY_ANSWER: 1,
        E.UNPARSABLE_TIMESTAMP: 1,
    }
    tvg = result["metrics"]["tvg"]["src"]
    # nothing scores; Failed = every unread answer (the past-end one was read, it scores IoU 0)
    assert tvg["F1"] == 0 and tvg["mIoU"] == 0 and tvg["Failed"] == 5
    assert result["invalid"]["rvq"] == {E.BAD_LETTER: 1, E.NOT_A_STRING: 1}
    assert result["metrics"]["rvq"]["src"]["Acc"] == 0
    assert result["invalid"]["dvc"] == {E.MISSING_ANSWER: 1} and result["invalid"]["vhd"] == {E.NOT_A_STRING: 1}


def test_malformed_annotations_are_skipped(tmp_path):
    good = rec("tvg", 0, "0 - 10", tgt=[0, 10])
    no_tgt = rec("tvg", 1, "0 - 10")
    bad_p = rec("rar", 2, "(A)", o=["x", "y"], p=5)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps([good, no_tgt, bad_p, "junk"]))
    result = E.score_files(path, similarity=None)
    assert result["skipped"] == [
        {"file": str(path), "index": 1, "field": "tgt", "error": "missing"},
        {"file": str(path), "index": 2, "field": "p", "error": "not an index into o"},
        {"file": str(path), "index": 3, "field": "", "error": "not a JSON object"},
    ]
    assert set(result["metrics"]) == {"tvg"}
    assert (result["metrics"]["tvg"]["src"]["Total"], result["metrics"]["tvg"]["src"]["F1"]) == (1, 1.0)


# --- aggregates ----------------------------------------------------------------------------------------------------


def test_aggregate_tables():
    collected = {t: {"s1": {"Acc": 0.5, "F1": 0.5, "SentSim": 0.5, "mRec": 0.5}} for t in E.TASKS}
    collected["rar"]["s2"] = {"Acc": 0.7}
    collected["dvc"]["s1"]["SentSim"] = None
    out = E.aggregate(collected)
    # rar: mean over its sources (0.5 + 0.7) / 2 = 0.6; the referring group's Mean Acc: (0.5 + 0.7 + 0.5 + 0.5) / 4
    assert out["tasks"]["rar"] == {"Acc": 0.6} and out["groups"]["Referring"] == {"Mean Acc": 0.55}
    assert out["overall"]["RAR (Acc)"] == 60.0 and out["overall"]["EVC (Acc)"] == 50.0
    # Acc (ref) = (0.6 + 0.5 + 0.5) * 100 / 3 = 53.3; SentSim of dvc is not computed -> Sim (cap) is None
    assert out["merged"]["Acc (ref)"] == 53.3 and out["merged"]["Sim (cap)"] is None
    assert out["groups"]["Complex"] == {"TEM Mean Rec": 0.5, "GVQ Mean Rec": 0.5}
    partial = E.aggregate({"tvg": {"s": {"F1": 0.25}}})
    assert partial["overall"] == {"TVG (F1)": 25.0} and partial["merged"] == {}
    assert partial["missing"]["F1 (gnd)"] == "needs EPM (F1), TAL (F1), EVS (F1), VHD (F1)"


# --- command line --------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.eval.score", "--benchmark", "etbench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_end_to_end(tmp_path):
    annotations = [
        rec("tvg", 0, tgt=[10, 20]),
        rec("tvg", 1, tgt=[0, 10]),
        rec("rar", 2, o=["x", "y", "z", "w"], p=3),
        rec("rar", 3, o=["x", "y", "z", "w"], p=0),
    ]
    predictions = [dict(r) for r in annotations[:3]]
    predictions[0]["a"] = "It happens in 10 - 20 seconds."  # IoU 1
    predictions[1]["a"] = "from 5 to 15"  # 5 / 15
    predictions[2]["a"] = "(D)"  # right; idx 3 has no prediction -> wrong
    (tmp_path / "anno.json").write_text(json.dumps(annotations))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    (tmp_path / "subset.json").write_text(json.dumps({"tvg": {"src": [0]}, "rar": {"src": [2, 3]}}))
    out = tmp_path / "out" / "metrics.json"
    args = ["--annotations", str(tmp_path / "anno.json"), "--predictions", str(tmp_path / "pred.json")]
    run = _cli(*args, "--out", str(out), "--no-sentsim")
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    # tvg: IoUs 1 and 1/3 -> F1@0.1 = F1@0.3 = 1, F1@0.5 = F1@0.7 = 1/2 -> F1 = 0.75; rar: 1 of 2
    assert result["metrics"]["tvg"]["src"]["F1"] == 0.75
    assert result["metrics"]["rar"]["src"] == {"Total": 2, "Failed": 1, "Acc": 0.5}
    assert result["invalid"] == {"rar": {E.MISSING_PREDICTION: 1}}
    assert result["overall"] == {"RAR (Acc)": 50.0, "TVG (F1)": 75.0}
    assert result["inputs"] == {"predictions": 3, "annotations": 4, "predictions_not_in_annotations": 0, "scored": 4}
    assert result["not_computed"] == {} and result["merged"] == {} and result["skipped"] == []
    assert set(result["merged_missing"]) == set(E.MERGED)
    # --subset (here in-process) keeps tvg idx 0 and both rar records
    subset = E.score_files(tmp_path / "pred.json", tmp_path / "anno.json", tmp_path / "subset.json", similarity=None)
    assert subset["metrics"]["tvg"]["src"]["Total"] == 1 and subset["inputs"]["scored"] == 3


def test_cli_bad_input_exits_2(tmp_path):
    bad = tmp_path / "pred.json"
    bad.write_text("[{not json")
    run = _cli("--predictions", str(bad), "--out", str(tmp_path / "m.json"))
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and str(bad) in run.stderr and "invalid JSON" in run.stderr
    bad.write_text('{"task": "tvg"}')
    run = _cli("--predictions", str(bad), "--out", str(tmp_path / "m.json"))
    assert run.returncode == 2 and "expected a JSON list" in run.stderr
    run = _cli("--predictions", str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.json"))
    assert run.returncode == 2 and "missing.json" in run.stderr
    assert not (tmp_path / "m.json").exists()
