"""E.T. Chat's timestamp matching (pipeline.model.matching) on a tiny Llama: the soft-target loss against values
computed by hand, the source-frame injection, the bidirectional frame mask, greedy generation that turns each
emitted <vid> into the matched frame's time, and the data side (each <vid> of a record paired with its frame, the
duration and answer-length filters, E.T. Chat's 1 fps sampling from t = 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.dataset import CachedVisuals, VisualInfo, filter_records
from pipeline.model.connectors.mlp import LinearConnector
from pipeline.model.matching import MatchingHead, frame_attention_mask
from pipeline.model.video_llm import VideoLLM
from pipeline.video.frames import FrameSampling

V, H, T, D = 40, 32, 5, 8  # vocabulary, hidden, frames, feature width; <vid> is id V (the first added token)


def _model(bidirectional: bool = True) -> VideoLLM:
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1))
    return VideoLLM(llm, LinearConnector(D, H), nn.Embedding(1, H), V, None,
                    MatchingHead(H, V, 2.0, bidirectional)).eval()


def _batch():
    ids = torch.tensor([[1, 2] + [VIDEO_TOKEN_INDEX] * T + [3, V, 4, V, 5]])
    labels = ids.clone()
    labels[:, :9] = IGNORE_INDEX  # the question (with its <vid> at 8) is not trained; the answer's <vid> at 10 is
    return ids, labels, torch.randn(T, D, generator=torch.Generator().manual_seed(1)), torch.tensor([[T, 1]])


def test_the_matching_loss_is_the_soft_target_cross_entropy_at_the_step_that_predicts_vid():
    model = _model()
    ids, labels, feats, layout = _batch()
    frames = torch.tensor([1, 3])  # the question's <vid> shows frame 1, the answer's is frame 3
    out = model(ids, torch.ones_like(ids), labels, video_features=feats, visual_layout=layout, vid_frames=frames)
    states = model.matching.states
    with torch.no_grad():
        frm = model.matching.frm_head(states["prenorm"][0, 2:2 + T])
        vid = model.matching.vid_head(states["penultimate"][0, 9])  # position 9 predicts the <vid> at 10
        sim = vid @ frm.T / math.sqrt(H)
        soft = torch.tensor([2.0 ** -abs(i - 3) for i in range(T)])  # alpha^-|i - t|, not normalised
        expected_match = -(soft * sim.log_softmax(-1)).sum()
        logits = out.logits[0, :-1]
        targets = labels[0, 1:].masked_fill(labels[0, 1:] == V, V)  # <vid>'s column is the last, V
        expected_lm = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    assert out.logits.shape == (1, ids.shape[1], V + 1)
    assert torch.allclose(out.loss, expected_lm + expected_match, atol=1e-5)
    out.loss.backward()
    head = model.matching
    assert head.frm_head[1].weight.grad.abs().sum() > 0 and head.vid_output.weight.grad.abs().sum() > 0


def test_each_vid_input_gets_its_frames_embedding_added():
    model = _model()
    ids, _, feats, layout = _batch()
    plain = model.embed(ids, feats, layout)
    injected = model.embed(ids, feats, layout, vid_frames=torch.tensor([1, -1]))
    assert torch.allclose(injected[0, 8], plain[0, 8] + plain[0, 2 + 1])  # frame 1's connector output
    assert torch.equal(injected[0, 10], plain[0, 10])  # -1: none
    assert torch.equal(injected[0, :8], plain[0, :8])
    with pytest.raises(ValueError, match="2 <vid> tokens"):
        model.embed(ids, feats, layout, vid_frames=torch.tensor([1]))


def test_frames_attend_to_each_other_both_ways_and_text_stays_causal():
    ids, _, _, _ = _batch()
    mask = frame_attention_mask(torch.ones_like(ids), ids)[0, 0]
    assert mask[2, 6] and mask[6, 2]  # first and last frame, both ways
    assert not mask[1, 2] and not mask[2, 7] and mask[7, 2]  # text before cannot see frames; text after can
    model, causal = _model(), _model(bidirectional=False)
    _, _, feats, layout = _batch()
    changed = feats.clone()
    changed[-1] += 5  # only the last frame changes
    states = []
    for m in (model, causal):
        outs = [m(ids, torch.ones_like(ids), video_features=f, visual_layout=layout).logits[0, 2] for f in
                (feats, changed)]
        states.append(torch.allclose(*outs))
    assert states == [False, True]  # the first frame's output sees the last frame only with bidirectional frames


def test_generation_turns_each_emitted_vid_into_the_matched_frame():
    model = _model()
    _, _, feats, layout = _batch()
    prompt = torch.tensor([[1, 2] + [VIDEO_TOKEN_INDEX] * T + [3]])
    head = model.matching
    head.logits = lambda logits: torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), 1e4)], -1)
    tokens, matched = model.generate(prompt, torch.ones_like(prompt), video_features=feats, visual_layout=layout,
                                     max_new_tokens=3, eos_token_id=None)
    assert tokens.tolist() == [[V, V, V]] and len(matched[0]) == 3
    with torch.no_grad():  # the first match: vid_head at the prompt's last step against the prompt's frames
        embeds = model.embed(prompt, feats, layout)
        with head.capture(model.llm):
            model.llm(inputs_embeds=embeds, attention_mask=model._frame_mask(prompt, torch.ones_like(prompt),
                                                                            embeds.dtype))
        first = int(head.similarities(torch.tensor([prompt.shape[1] - 1]), 0, 2, T)[0].argmax())
    assert matched[0][0] == first

    from pipeline.eval.generate import decode_answer

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    assert decode_answer(Letters(), [0, V, 1, V], [2, 4], (0.0, 1.0, 2.0, 3.0, 4.5), V) == "a2.0b4.5"


def test_a_records_vid_tokens_take_their_timestamps_nearest_frames(tokenizer):
    from pipeline.data.dataset import InstructionDataset
    from pipeline.data.templates import get_template
    from pipeline.shards import ItemError

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<vid>"]})
    vid = tok.convert_tokens_to_ids("<vid>")

    class Source(CachedVisuals):  # three frames' worth of cached rows, times known
        dim = D

        def __init__(self):
            pass

        def __contains__(self, video):
            return True

        def info(self, video):
            return VisualInfo(T, 1, T, T, 5.0, (0.0, 1.0, 2.0, 3.0, 4.0))

        def load(self, video):
            return {"video_features": torch.zeros(T, D, dtype=torch.float16), "layout": (T, 1)}

    record = {"id": "r", "video": "v", "timestamps": {"src": [0.6], "tgt": [2.4, 3.5]}, "conversations": [
        {"from": "human", "value": "<video>\nAfter <vid>, when is it?"},
        {"from": "gpt", "value": "From <vid> to <vid>."}]}
    dataset = InstructionDataset([record], tok, get_template("chatml"), Source(), LinearConnector(D, H), 512,
                                 match_token_id=vid)
    item = dataset.item(record)
    assert item["vid_frames"].tolist() == [1, 2, 4]  # nearest frames of 0.6, 2.4, 3.5 s (torch.round: half to even)
    assert int((item["input_ids"] == vid).sum()) == 3
    assert dataset.item(record, for_generation=True)["vid_frames"].tolist() == [1]  # the question's only
    broken = {**record, "timestamps": {"src": [], "tgt": [2.4, 3.5]}}
    with pytest.raises(ItemError, match="more <vid> than timestamps"):
        dataset.item(broken)


def test_duration_and_answer_length_filters_drop_records_with_their_reason():
    records = [{"id": "short", "video": "a", "duration": 4.0, "conversations": [
                   {"from": "human", "value": "q"}, {"from": "gpt", "value": "a b"}]},
               {"id": "long", "video": "b", "duration": 351.0, "conversations": [
                   {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
               {"id": "wordy", "video": "c", "duration": 60.0, "conversations": [
                   {"from": "human", "value": "q"}, {"from": "gpt", "value": " ".join(["w"] * 201)}]},
               {"id": "kept", "video": "d", "duration": 5.0, "conversations": [
                   {"from": "human", "value": "q"}, {"from": "gpt", "value": " ".join(["w"] * 200)}]}]
    kept, excluded = filter_records(records, {}, 5, 350, 200)
    assert [r["id"] for r in kept] == ["kept"]
    assert [(e["id"], e["reason"].split(":")[0]) for e in excluded] == [
        ("short", "duration"), ("long", "duration"), ("wordy", "conversations")]
    assert "201 words" in excluded[2]["reason"]


def test_etchat_sampling_takes_the_frames_at_whole_seconds_from_the_start():
    sampling = FrameSampling(method="fps_from_start", fps=1.0, max_frames=350)
    # etchat/utils/io.py:47: np.arange(0, len(vr), avg_fps / fps).round() of a 10.5 s video at 3 fps
    assert sampling.indices(32, 3.0).tolist() == np.arange(0, 32, 3.0).round().astype(int).tolist()
    assert sampling.indices(32, 3.0).tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert len(FrameSampling(method="fps_from_start", fps=1.0, max_frames=4).indices(32, 3.0)) == 4


def test_et_chats_stage_3_trains_exactly_its_freeze_table(tmp_path, tiny_llm_dir):
    """Q-Former attention, queries, aggregator, projector, LoRA, the <vid> rows and the matching heads train
    (etchat/train/train.py:467-476); the Q-Former's feed-forward, the tower and the LLM's own weights do not; and each
    trained tensor lands in its parameter group."""
    from conftest import tiny_bert_tokenizer

    from pipeline.train.config import StageConfig
    from pipeline.train.trainer import build_model, parameter_group, stage_tokenizer

    bert = tiny_bert_tokenizer(tmp_path / "bert")
    config = StageConfig.from_dict({
        "name": "stage3", "template": "phi3", "mm_projector_type": "etchat_qformer", "deepspeed": None,
        "connector": {"tokenizer": str(bert), "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                      "num_hidden_layers": 2, "num_query_tokens": 4},
        "connector_training": ["qformer_attention", "queries", "aggregator", "projector"], "llm_training": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "o_proj"]},
        "matching": {"alpha": 2.0}, "param_groups": {group: {"learning_rate": 1e-3, "weight_decay": 0.0} for group in
                                                     ("vision_tower", "connector", "llm", "lora", "heads")}})
    tokenizer, base_vocab = stage_tokenizer(config, str(tiny_llm_dir))
    model, meta = build_model(config, str(tiny_llm_dir), D, tokenizer, base_vocab)
    assert meta["matching"] == {"alpha": 2.0, "bidirectional_frames": True,
                                "token_id": tokenizer.convert_tokens_to_ids("<vid>")}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    parts = {model.mm_projector.part(name.split(".", 1)[1]) for name in trained if name.startswith("mm_projector.")}
    assert parts == {"qformer_attention", "queries", "aggregator", "projector"}
    frozen_connector = {n for n, _ in model.mm_projector.named_parameters()} - {
        n.split(".", 1)[1] for n in trained if n.startswith("mm_projector.")}
    assert frozen_connector and {model.mm_projector.part(n) for n in frozen_connector} == {"qformer_ffn"}
    assert {parameter_group(name) for name in trained} == {"connector", "lora", "heads"}
    assert {n for n in trained if parameter_group(n) == "heads"} >= {"matching.vid_output.weight",
                                                                   "matching.frm_head.1.weight"}
    assert "extra_embeddings.weight" in trained
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trained)
