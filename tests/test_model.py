import pytest
import torch

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.dataset import VideoCollator, fit_records
from pipeline.data.templates import get_template, tokenize_conversation
from pipeline.model.connectors import build_connector as build_projector
from pipeline.model.video_llm import VideoLLM, load_llm
from pipeline.train.config import StageConfig
from pipeline.train.trainer import build_model, stage_tokenizer


def _stage(**kwargs):
    return StageConfig(name="s", template="chatml", **kwargs)


def test_projector_shapes():
    assert build_projector("linear", 8, 4).weight.shape == (4, 8)
    mlp = build_projector("mlp2x_gelu", 8, 4)
    assert [tuple(p.shape) for p in mlp.parameters()] == [(4, 8), (4,), (4, 4), (4,)]
    with pytest.raises(ValueError, match="unknown connector"):
        build_projector("qformer", 8, 4)


def test_video_rows_land_at_the_video_positions_in_order(tiny_llm_dir):
    llm = load_llm(str(tiny_llm_dir), torch.float32)
    model = VideoLLM(llm, build_projector("linear", 6, 32))
    ids = torch.tensor([[5, VIDEO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, 7], [VIDEO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, 9, 2]])
    features = torch.randn(4, 6)
    embeds = model.embed(ids, features)
    projected = model.mm_projector(features)
    table = llm.get_input_embeddings().weight
    assert torch.allclose(embeds[0, 1:3], projected[:2]) and torch.allclose(embeds[1, :2], projected[2:])
    assert torch.equal(embeds[0, 0], table[5]) and torch.equal(embeds[1, 2], table[9])
    with pytest.raises(ValueError, match="4 video positions in input_ids but the connector gives 3 embeddings"):
        model.embed(ids, features[:3])


def test_collator_pads_right_and_concatenates_features():
    batch = [
        {"input_ids": torch.tensor([1, VIDEO_TOKEN_INDEX, 3]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 3]),
         "video_features": torch.ones(1, 4), "layouts": [(0, 1)]},
        {"input_ids": torch.tensor([VIDEO_TOKEN_INDEX, VIDEO_TOKEN_INDEX]), "labels": torch.tensor([IGNORE_INDEX] * 2),
         "video_features": torch.zeros(2, 4), "layouts": [(1, 2)]},
    ]
    out = VideoCollator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[1, VIDEO_TOKEN_INDEX, 3], [VIDEO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, 0]]
    assert out["labels"][1].tolist() == [IGNORE_INDEX] * 3
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["video_features"].shape == (3, 4) and out["video_features"][0].sum() == 4
    assert out["visual_layout"].tolist() == [[0, 1], [1, 2]]


def test_fit_records_drops_whole_trailing_turns_and_excludes_what_cannot_fit(tokenizer):
    template = get_template("chatml")
    long_answer = "word " * 40
    record = {"id": "r", "video": "v", "conversations": [
        {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "A short answer."},
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": long_answer}]}
    short = tokenize_conversation(record["conversations"][:2], tokenizer, template, 4)[0]
    kept, excluded = fit_records([record], tokenizer, template, len(short) + 5, {"v": 4})
    assert excluded == [] and kept[0]["conversations"] == record["conversations"][:2]
    assert kept[0]["dropped_turns"] == 2  # the second answer would have been cut: it goes whole
    kept, excluded = fit_records([record, {**record, "id": "gone", "video": "nope"}], tokenizer, template,
                                 len(short) - 1, {"v": 4})
    assert kept == [] and [e["id"] for e in excluded] == ["r", "gone"]
    assert "more than max_length" in excluded[0]["reason"] and excluded[1]["reason"] == "no features for 'nope'"
    whole, _ = fit_records([record], tokenizer, template, 10_000, {"v": 4})
    assert whole == [record]


@pytest.mark.parametrize("llm_training, wrap, expected", [
    ("frozen", False, lambda name: name.startswith("mm_projector.")),
    ("frozen", True, lambda name: name.startswith(("mm_projector.", "extra_embeddings."))),
    ("lora", False, lambda name: name.startswith("mm_projector.") or ".lora_" in name),
    ("full", False, lambda name: True),
])
def test_exactly_the_stage_parameters_receive_gradients_and_change(tiny_llm_dir, llm_training, wrap, expected):
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    config = _stage(llm_training=llm_training, lora=lora if llm_training == "lora" else None,
                    video_start_end=wrap)
    tokenizer, base_vocab = stage_tokenizer(config, str(tiny_llm_dir))
    assert len(tokenizer) == base_vocab + (2 if wrap else 0)
    model, meta = build_model(config, str(tiny_llm_dir), 6, tokenizer, base_vocab)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if expected(name)}
    if llm_training == "lora":  # LoRA B starts at zero, so A gets no gradient on the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
    start, end = tokenizer.convert_tokens_to_ids(["<vid_start>", "<vid_end>"]) if wrap else (5, 8)
    batch = {"input_ids": torch.tensor([[start, VIDEO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, end, 5, 6, 7]]),
             "labels": torch.tensor([[IGNORE_INDEX] * 5 + [6, 7]]),
             "video_features": torch.randn(2, 6)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert with_grad <= trainable and changed == with_grad
    assert {n for n in trainable if n.startswith("mm_projector.")} <= changed
    if llm_training == "lora":
        assert {n for n in trainable if "lora_" in n} <= changed
    if wrap:  # the added tokens train in their own table; the LLM's embedding matrix stays as it was
        assert "extra_embeddings.weight" in changed
        assert not any("embed_tokens" in name for name in changed)
    assert meta["llm_training"] == llm_training and meta["mm_hidden_size"] == 6 and meta["hidden_size"] == 32


def test_a_llava_v1_checkpoint_gives_its_llama_and_its_mm_projector(tmp_path, tiny_llm_dir):
    """Video-ChatGPT's start: LLaVA-Lightning-7B, a Llama checkpoint of model_type llava holding model.mm_projector."""
    import json
    import shutil

    import safetensors.torch

    llava = tmp_path / "llava"
    shutil.copytree(tiny_llm_dir, llava)
    weights = safetensors.torch.load_file(llava / "model.safetensors")
    projector = {"model.mm_projector.weight": torch.randn(32, 6), "model.mm_projector.bias": torch.randn(32)}
    safetensors.torch.save_file({**weights, **projector}, llava / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((llava / "config.json").read_text())
    (llava / "config.json").write_text(json.dumps({**config, "model_type": "llava", "mm_hidden_size": 6,
                                                   "architectures": ["LlavaLlamaForCausalLM"]}))
    model, _ = build_model(_stage(mm_projector_init=str(llava)), str(llava), feature_dim=6)
    assert torch.equal(model.mm_projector.weight, projector["model.mm_projector.weight"])
    assert torch.equal(model.mm_projector.bias, projector["model.mm_projector.bias"])
    assert torch.equal(model.llm.get_input_embeddings().weight, weights["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="does not fit this stage"):
        build_model(_stage(mm_projector_init=str(llava)), str(llava), feature_dim=8)
    with pytest.raises(ValueError, match="no mm_projector weights"):
        build_model(_stage(mm_projector_init=str(tiny_llm_dir)), str(tiny_llm_dir), feature_dim=6)
