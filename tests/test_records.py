"""Bad and unusual instruction data: a bad record costs only itself, with its field named; the record kinds beyond
one video (text only, several images, unanswered) convert, split, train and evaluate."""

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline import VIDEO_TOKEN_INDEX
from pipeline.data.dataset import CachedVisuals, InstructionDataset, VideoCollator, fit_records, visual_tokens
from pipeline.data.formats import Options, ssv2_answer, visuals
from pipeline.data.instructions import build, split_records
from pipeline.data.templates import get_template, tokenize_conversation
from pipeline.features.store import INDEX_COLUMNS, FeatureStore
from pipeline.io import read_json, write_json, write_table

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def _build(tmp_path, fmt, annotations, videos, val_fraction=0.0, **options):
    """Convert with every video of ``videos`` indexed; returns counts, train and val records by id, rejected rows."""
    index = tmp_path / "index.tsv"
    write_table(index, [{"video_id": v, "path": "s.h5", "tokens": 8, "dim": 4, "duration": ""} for v in videos],
                INDEX_COLUMNS)
    out = tmp_path / "out"
    counts = build(annotations, fmt, index, out, val_fraction, 0, Options(**options))
    train, val = ({r["id"]: r for r in read_json(out / f"{name}.json")} for name in ("train", "val"))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_bytes().decode("utf-8").splitlines()]
    return counts, train, val, rejected


def _json_file(path: Path, entries: list) -> Path:
    """``entries`` as a JSON file the way a published file holds them (non-ASCII as ``\\u`` escapes, so a lone
    surrogate is the escape ``\\udce9``)."""
    path.write_text(json.dumps(entries), encoding="ascii")
    return path


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# --- one bad string -----------------------------------------------------------------------------------------------

def test_a_lone_surrogate_rejects_only_its_record_and_rejected_jsonl_keeps_it(tmp_path):
    source = _json_file(tmp_path / "qa.json", [{"video_id": "v1", "q": "Where is he?", "a": "At the caf\udce9."},
                                               {"video_id": "v1", "q": "Who is there?", "a": "A man."}])
    counts, train, _, rejected = _build(tmp_path, "videochatgpt_qa", source, ["v1"])
    assert list(train) == ["v1_0"] and train["v1_0"]["conversations"][1]["value"] == "A man."
    assert counts["rejected_by_reason"] == {"invalid text": 1}
    assert rejected[0]["reason"] == "a: lone surrogate U+DCE9 at character 10"
    assert rejected[0]["entry"]["a"] == "At the caf\udce9."  # written as its JSON escape, read back unchanged


def test_a_file_name_that_is_not_utf8_rejects_only_its_record(tmp_path):
    for relative in ("train/fall_down/a.mp4", "train/caf\udce9/b.mp4"):  # a Latin-1 folder name, read by Python
        (tmp_path / "actions" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "actions" / relative).write_bytes(b"")
    counts, train, _, rejected = _build(tmp_path, "class_folders", tmp_path / "actions", ["train__fall_down__a"])
    assert list(train) == ["train__fall_down__a"]
    assert rejected[0]["reason"] == "video_path: lone surrogate U+DCE9 at character 9"


def test_control_characters_reject_their_record_naming_the_field(tmp_path):
    entries = [
        {"id": "kept", "conversations": _turns("Tab\tand\r\nnewlines are text.", "Yes.")},
        {"id": "nul", "conversations": _turns("Hi", "A\u0000B")},
        {"id": "bel", "conversations": _turns("Ring\u0007", "Ding.")},
        {"id": "esc", "conversations": _turns("Colour?", "\u001b[31mRed")},
    ]
    text = json.dumps(entries).replace("\\u001b", "\x1b")  # a raw ESC inside a JSON string: not valid strict JSON
    (tmp_path / "chat.json").write_text(text, encoding="utf-8")
    counts, train, _, rejected = _build(tmp_path, "llava", tmp_path / "chat.json", [])
    assert list(train) == ["kept"] and counts["rejected_by_reason"] == {"invalid text": 3}
    assert [r["reason"] for r in rejected] == [
        "conversations[1].value: control character U+0000 at character 1",
        "conversations[0].value: control character U+0007 at character 4",
        "conversations[1].value: control character U+001B at character 0"]
    assert rejected[0]["where"].endswith("chat.json entry 1 (id 'nul')")


@pytest.mark.parametrize("fmt, name, content", [
    ("videochatgpt_qa", "qa.json", '[{"video_id": "v1", "q": "Où?", "a": "Ici."}]'),
    ("ssv2_fork", "train.csv", "videos/1.mp4 0\nvidéos/2.mp4 0\n"),
])
def test_a_file_that_is_not_utf8_fails_naming_the_file_and_the_byte_offset(tmp_path, fmt, name, content):
    source = tmp_path / name
    source.write_bytes(content.encode("latin-1"))
    offset = next(i for i, byte in enumerate(source.read_bytes()) if byte >= 0x80)
    with pytest.raises(ValueError, match=re.escape(f"{source}: not UTF-8 text: byte offset {offset} ")):
        _build(tmp_path, fmt, source, ["v1"], labels=str(FIXTURES / "something-something-v2-id2label.json"))


# --- E.T. Instruct --------------------------------------------------------------------------------------------------

ET_VIDEOS = ["didemo__12090392_N02_4919624883", "how_to_step__PJi8ZEHAFcI", "mr_hisum__h1", "hacs__v_reversed"]


def test_et_instruct_txt_file_keeps_its_text_and_its_timestamps(tmp_path):
    counts, train, _, rejected = _build(tmp_path, "etchat", FIXTURES / "et_instruct_164k_txt.json", ET_VIDEOS)
    assert list(train) == ["didemo_0", "how_to_step_1", "mr_hisum_2"]
    assert train["didemo_0"]["conversations"][1]["value"] == "The girl jumps in 5.0 - 10.0 seconds."
    assert train["didemo_0"]["timestamps"] == {"src": [], "tgt": [5.0, 10.0]}
    steps = train["how_to_step_1"]
    assert steps["conversations"][0]["value"] == ("<video>\nThe first step happens at 12.0 - 18.0 seconds. When do "
                                                  "the next two steps happen?")
    assert steps["timestamps"] == {"src": [12, 18], "tgt": [36, 44, 49, 57]} and steps["duration"] == 200.767
    assert train["mr_hisum_2"]["timestamps"]["tgt"] == [14.0]  # a highlight is one moment, not a segment
    assert counts["rejected_by_reason"] == {"segment ends before it starts": 1}
    assert rejected[0]["reason"] == ("conversations[1].value: the segment '88.0 - 64.0 seconds' ends before it "
                                     "starts")


def test_et_instruct_segment_that_ends_before_it_starts_is_rejected_naming_its_timestamps(tmp_path):
    _, train, _, rejected = _build(tmp_path, "etchat", FIXTURES / "et_instruct_164k_vid.json", ET_VIDEOS)
    assert "hacs_4" not in train
    assert [r["reason"] for r in rejected if r["kind"] == "segment ends before it starts"] == [
        "tgt[0], tgt[1]: the segment of conversations[1] ends at 64 s, before it starts at 88 s"]
    assert train["how_to_step_1"]["conversations"][1]["value"] == "36s - 44s seconds, then 49s - 57s seconds."


# --- Something-Something-v2 -----------------------------------------------------------------------------------------

def test_ssv2_placeholders_that_do_not_match_the_slots_are_rejected(tmp_path):
    entries = [
        {"id": "1", "label": "putting a pen on a book", "template": "Putting [something] on [something]",
         "placeholders": ["a pen", "a book"]},
        {"id": "2", "label": "putting a pen on a book", "template": "Putting [something] on [something]",
         "placeholders": ["a pen", "a book", "a table"]},
        {"id": "3", "label": "dropping a cup", "template": "Dropping [something]"},
    ]
    counts, train, _, rejected = _build(tmp_path, "ssv2", _json_file(tmp_path / "t.json", entries), ["1", "2", "3"])
    assert {r["conversations"][1]["value"] for r in train.values()} == {"Putting a pen on a book"}
    assert counts["rejected_by_reason"] == {"placeholder mismatch": 2}
    assert [r["reason"] for r in rejected] == [
        "placeholders: 3 placeholder(s) ['a pen', 'a book', 'a table'] for the 2 slot(s) of "
        "'Putting [something] on [something]'",
        "placeholders: 0 placeholder(s) [] for the 1 slot(s) of 'Dropping [something]'"]
    assert ssv2_answer("Putting [something] on [something]", None) == "Putting something on something"


def test_ssv2_a_video_with_different_labels_rejects_all_its_entries(tmp_path):
    entries = [
        {"id": "5", "label": "opening a jar", "template": "Opening [something]", "placeholders": ["a jar"]},
        {"id": "6", "label": "opening a box", "template": "Opening [something]", "placeholders": ["a box"]},
        {"id": "5", "label": "closing a jar", "template": "Closing [something]", "placeholders": ["a jar"]},
        {"id": "6", "label": "opening a box", "template": "Opening [something]", "placeholders": ["a box"]},
    ]
    counts, train, _, rejected = _build(tmp_path, "ssv2", _json_file(tmp_path / "t.json", entries), ["5", "6"])
    assert list(train) == ["6"]  # the same label twice: one record, the repeat is a duplicate
    assert counts["rejected_by_reason"] == {"conflicting labels": 2, "duplicate": 1}
    assert rejected[0]["reason"].startswith("id: video '5' has 2 different labels in this file ['Closing a jar', "
                                            "'Opening a jar']")
    csv = tmp_path / "train.csv"
    csv.write_text("videos/5.mp4 0\nother/5.mp4 2\nvideos/6.mp4 1\n")
    counts, train, _, _ = _build(tmp_path / "fork", "ssv2_fork", csv, ["5", "6"],
                                 labels=str(FIXTURES / "something-something-v2-id2label.json"))
    assert list(train) == ["6"] and counts["rejected_by_reason"] == {"conflicting labels": 2}


def test_ssv2_test_split_entries_become_unanswered_val_records(tmp_path):
    labels = str(FIXTURES / "something-something-v2-labels.json")
    counts, train, val, _ = _build(tmp_path, "ssv2", FIXTURES / "something-something-v2-test.json",
                                   ["1420", "74230", "8001"], labels=labels)
    assert train == {} and list(val) == ["1420", "74230", "8001"]
    assert val["1420"] == {"id": "1420", "video": "1420", "unanswered": True,
                           "conversations": [{"from": "human", "value": "<video>\nDescribe this video."}]}
    assert counts["kept_by_kind"] == {"unanswered": 3} and counts["val"] == {"records": 3, "videos": 3}


def test_ssv2_fork_without_root_refuses_a_path_that_escapes(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("../../elsewhere/5.mp4 0\nvideos/../6.mp4 1\n")
    counts, train, _, rejected = _build(tmp_path, "ssv2_fork", csv, ["5", "6"],
                                        labels=str(FIXTURES / "something-something-v2-id2label.json"))
    assert list(train) == ["6"] and counts["rejected_by_reason"] == {"unsafe path": 1}
    assert rejected[0]["reason"] == "path: '../../elsewhere/5.mp4' escapes the dataset root"


# --- LLaVA, LLaVA-NeXT, LLaMA-VID -----------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, kind, reason", [
    ({"id": "both", "image": "coco/1.jpg", "video": "clips/1.mp4", "conversations": _turns("<image>\nWhat?", "A.")},
     "invalid entry", "image, video: the entry names both an image and a video"),
    ({"id": "two", "image": ["coco/1.jpg", "coco/2.jpg"], "conversations": _turns("<image>\nCompare.", "Same.")},
     "invalid conversation", "conversations: 2 visuals need one <video> each, in human turns (found [1, 0])"),
    ({"id": "pkl", "video": "features/v_abc.pkl", "conversations": _turns("<image>\nWhat?", "A.")},
     "feature file", "video: 'features/v_abc.pkl' is a feature file, not a video"),
    ({"id": "literal", "video": "clips/1.mp4", "conversations": _turns("<video>\nWhat happens?", "A.")},
     "invalid conversation", "conversations[0].value: a literal <video> in a format whose visual marker is <image>"),
], ids=["image-and-video", "two-images-one-marker", "feature-file", "literal-video-marker"])
def test_llava_entries_that_contradict_themselves_are_rejected(tmp_path, entry, kind, reason):
    indexed = ["coco__1", "coco__2", "clips__1", "features__v_abc"]
    counts, train, _, rejected = _build(tmp_path, "llava", _json_file(tmp_path / "l.json", [entry]), indexed,
                                        images="keep")
    assert train == {} and counts["rejected_by_reason"] == {kind: 1} and rejected[0]["reason"] == reason


def test_llava_next_multi_image_records_take_one_marker_per_image(tmp_path):
    images = ["spot-the-diff__harbor_1", "spot-the-diff__harbor_2"]
    _, train, _, _ = _build(tmp_path, "llava", FIXTURES / "llava_next.json", images, images="keep")
    record = train["m4_spot_the_diff_17"]
    assert record["videos"] == images and record["modality"] == "image" and "video" not in record
    assert record["video_paths"] == ["spot-the-diff/harbor_1.jpg", "spot-the-diff/harbor_2.jpg"]
    assert record["conversations"][0]["value"] == ("Image 1: <video>\nImage 2: <video>\nWhat is different between "
                                                   "the two pictures?")  # interleaved markers stay in place
    _, train, _, rejected = _build(tmp_path / "one", "llava", FIXTURES / "llava_next.json", images[:1], images="keep")
    assert "m4_spot_the_diff_17" not in train
    assert "videos[1]: no features for 'spot-the-diff__harbor_2' (failed or missing video)" in [
        r["reason"] for r in rejected]


def test_text_only_conversations_are_kept_counted_and_train_only(tmp_path):
    counts, train, val, _ = _build(tmp_path, "llava", FIXTURES / "llava_v1_5_mix665k.json", [], val_fraction=0.5)
    assert list(train) == ["i6IyJda_0", "wM2pGWq_0"] and val == {}
    assert len(train["i6IyJda_0"]["conversations"]) == 4 and "video" not in train["i6IyJda_0"]
    assert counts["kept_by_kind"] == {"text only": 2} and counts["rejected_by_reason"] == {"no features": 1}


# --- split, training, evaluation ------------------------------------------------------------------------------------

def test_split_keeps_records_that_share_a_visual_together():
    records = [{"id": "a", "video": "a"}, {"id": "ab", "videos": ["a", "b"]}, {"id": "b", "video": "b"},
               *({"id": v, "video": v} for v in "cdfg"), {"id": "text", "conversations": []},
               {"id": "e?", "video": "e", "unanswered": True}, {"id": "e", "video": "e"}]
    for seed in range(6):
        train, val = split_records(records, 0.5, seed)
        sides = {r["id"]: side for side, rs in (("train", train), ("val", val)) for r in rs}
        assert sides["a"] == sides["ab"] == sides["b"] and sides["text"] == "train"
        assert sides["e?"] == sides["e"] == "val"  # an unanswered record holds its video out of training
        assert {v for r in train for v in visuals(r)} & {v for r in val for v in visuals(r)} == set()
        assert len(train) + len(val) == len(records) and train  # something always trains


def test_text_only_and_multi_image_samples_fit_collate_and_embed(tokenizer, tiny_llm_dir, train_data):
    from transformers import AutoModelForCausalLM

    from pipeline.model.connectors import build_connector as build_projector
    from pipeline.model.video_llm import VideoLLM

    template = get_template("chatml")
    store = FeatureStore(train_data / "index.tsv")
    multi = {"id": "m", "videos": ["v1", "v0"], "modality": "image",
             "conversations": _turns("First <video> then <video>: the same?", "No.")}
    text = {"id": "t", "conversations": _turns("Hi", "Hello.")}
    later = {"id": "later", "videos": ["v0", "v1"], "conversations": [
        *_turns("<video>\nWhat is it?", "A square."), *_turns("And <video>?", "word " * 30)]}
    unanswered = {"id": "u", "video": "v2", "unanswered": True, "conversations": [_turns("<video>\nWhat?", "")[0]]}
    records = [multi, text, later, unanswered]
    connector = build_projector("linear", 8, 32)
    rows = visual_tokens(CachedVisuals(store), records, connector)
    assert rows == {"v0": 6, "v1": 6, "v2": 6}
    first_pair = len(tokenize_conversation(later["conversations"][:2], tokenizer, template, [6])[0])
    kept, excluded = fit_records(records, tokenizer, template, first_pair + 20, rows)
    assert [r["id"] for r in kept] == ["m", "t"]  # "later" may not lose the turn that holds its second image
    assert excluded[0]["id"] == "later" and "more than max_length" in excluded[0]["reason"]
    assert excluded[1] == {"id": "u", "video": "v2", "reason": "unanswered: no reference answer to train on"}

    dataset = InstructionDataset(kept, tokenizer, template, CachedVisuals(store), connector, 256)
    assert dataset.source.dim == 8
    m, t = dataset[0], dataset[1]
    expected = torch.cat([torch.from_numpy(store.get("v1")), torch.from_numpy(store.get("v0"))])
    assert torch.equal(m["video_features"], expected)
    positions = (m["input_ids"] == VIDEO_TOKEN_INDEX).nonzero().flatten().tolist()
    assert len(positions) == 12 and positions[5] + 1 < positions[6]  # two runs of 6, text between them
    assert t["video_features"].shape == (0, 8) and not (t["input_ids"] == VIDEO_TOKEN_INDEX).any()

    torch.manual_seed(0)
    model = VideoLLM(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), build_projector("linear", 8, 32))
    only_text = VideoCollator(tokenizer.pad_token_id)([t])
    assert only_text["video_features"].shape == (0, 8)
    model(**only_text).loss.backward()  # no video row at all: the projector is still in the graph, with zero grad
    assert model.mm_projector.weight.grad is not None and not model.mm_projector.weight.grad.any()
    batch = VideoCollator(tokenizer.pad_token_id)([m, t])
    embeds = model.embed(batch["input_ids"], batch["video_features"])
    projected = model.mm_projector(expected.float())
    assert torch.allclose(embeds[0, positions], projected)  # each marker's rows, in marker order


def test_evaluation_answers_unanswered_records_and_scores_only_the_others(tmp_path, monkeypatch, tiny_llm_dir,
                                                                          train_data):
    from transformers import AutoModelForCausalLM

    import pipeline.eval.generate as generate
    from pipeline.model import checkpoint
    from pipeline.model.connectors import build_connector as build_projector
    from pipeline.model.video_llm import VideoLLM

    torch.manual_seed(0)
    model = VideoLLM(AutoModelForCausalLM.from_pretrained(tiny_llm_dir), build_projector("linear", 8, 32)).eval()
    meta = {"template": "chatml", "mm_hidden_size": 8, "video_start_end": False, "max_frames": None}
    monkeypatch.setattr(checkpoint, "load_stage", lambda model_dir, dtype: (model, meta))  # generate imports it
    records = [{"id": "answered", "video": "v0", "conversations": _turns("<video>\nColour?", "Red.")},
               {"id": "test", "video": "v1", "unanswered": True,
                "conversations": [{"from": "human", "value": "<video>\nDescribe this video."}]},
               {"id": "pair", "videos": ["v2", "v3"], "modality": "image",
                "conversations": _turns("<video> and <video>: same?", "No.")}]
    write_json(tmp_path / "val.json", records)
    metrics = generate.evaluate(tiny_llm_dir, [tmp_path / "val.json"], train_data / "index.tsv", tmp_path / "out",
                                max_new_tokens=2)  # the model folder only gives the tokenizer here
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    predictions = {p["id"]: p for p in map(json.loads, lines)}
    assert metrics["count"] == 2 and metrics["unscored"] == 1
    assert read_json(tmp_path / "out" / "metrics.json")["unscored"] == 1
    assert predictions["test"]["reference"] is None
    assert predictions["test"]["question"] == "<video>\nDescribe this video."
    assert predictions["pair"]["video"] is None and predictions["pair"]["videos"] == ["v2", "v3"]
    assert predictions["answered"]["reference"] == "Red." and isinstance(predictions["answered"]["prediction"], str)


def test_a_stage_trains_on_text_only_multi_image_and_video_records_together(tmp_path, tiny_llm_dir, train_data):
    from conftest import run_stage_process, stage_settings

    from pipeline.io import read_table

    data = tmp_path / "data"
    data.mkdir()
    (data / "index.tsv").write_bytes((train_data / "index.tsv").read_bytes())  # absolute shard paths
    records = [{"id": f"text{i}", "conversations": _turns(f"Hello {i}", "Hi.")} for i in range(4)]  # first: no video
    records += [{"id": f"pair{i}", "videos": ["v0", "v1"], "modality": "image",
                 "conversations": _turns("<video> and <video>: the same?", "No.")} for i in range(2)]
    records += [{"id": f"one{i}", "video": f"v{i}", "conversations": _turns("<video>\nWhat?", "A.")} for i in range(2)]
    write_json(data / "train.json", records)
    config = stage_settings(tmp_path, tiny_llm_dir, data, "mixed", epochs=1, batch_size=1, save_steps=100)
    done = run_stage_process(tmp_path, config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_table(tmp_path / "mixed" / "loss.tsv")) == 8  # one record a step: 4 steps without a video row
    assert (tmp_path / "mixed" / "model" / "excluded.jsonl").read_text() == ""
