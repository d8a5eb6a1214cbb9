"""The Q-Former connectors (Video-LLaMA's ``video_qformer``, E.T. Chat's ``etchat_qformer``) and Video-LLaMA's
image-Q-Former tower: shapes, parameter names, loading checkpoints written under the ORIGINAL key names (LAVIS's
``Qformer.bert.*``, Video-LLaMA's and E.T. Chat's model keys) against a reference written from LAVIS's BERT and the
originals' forward code, the freeze table's parts, question conditioning and padding, frame order."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert_tokenizer
from torch import nn

from pipeline.model.connectors import (
    CONNECTORS,
    build_connector,
    connector_parts,
    connector_settings,
)
from pipeline.model.connectors.etchat_qformer import ETChatQFormerConnector
from pipeline.model.connectors.video_qformer import VideoQFormerConnector
from pipeline.model.qformer import QUERY_MAX_LENGTH, qformer_tokenizer, rename_lavis_qformer
from pipeline.vision.qformer_tower import build_qformer_tower

TINY_BERT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = 2
D_VISION = 24    # a tiny EVA width
HIDDEN = 16      # a tiny LLM width
QUERIES = 4


# --- the originals, written out: LAVIS BERT (video_llama/models/Qformer.py) in eval mode, by original key names ---

def lavis_bert_state(prefix: str, generator, *, layers: int, freq: int, enc: int, text: bool, vocab: int = 0,
                     hidden: int = 32, inter: int = 64) -> dict:
    """Random tensors under LAVIS's names (Qformer.py:52-110 embeddings, 112-401 layers): ``{prefix}bert.*``, with
    the text parts (word/position embeddings, the text feed-forward) only when ``text``; the persistent
    ``position_ids`` buffer (Qformer.py:70-72) always."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    def ln(name):
        return {f"{name}.weight": 1 + rand(hidden), f"{name}.bias": rand(hidden)}

    def linear(name, out, inp):
        return {f"{name}.weight": rand(out, inp), f"{name}.bias": rand(out)}

    b = f"{prefix}bert."
    state = {f"{b}embeddings.position_ids": torch.arange(512)[None], **ln(f"{b}embeddings.LayerNorm")}
    if text:
        state[f"{b}embeddings.word_embeddings.weight"] = rand(vocab, hidden)
        state[f"{b}embeddings.position_embeddings.weight"] = rand(512, hidden)
    for i in range(layers):
        p = f"{b}encoder.layer.{i}."
        for kind, width in [("attention", hidden)] + ([("crossattention", enc)] if i % freq == 0 else []):
            state |= linear(f"{p}{kind}.self.query", hidden, hidden) | linear(f"{p}{kind}.self.key", hidden, width)
            state |= linear(f"{p}{kind}.self.value", hidden, width) | linear(f"{p}{kind}.output.dense", hidden, hidden)
            state |= ln(f"{p}{kind}.output.LayerNorm")
        for ffn in ["_query"] + ([""] if text else []):
            state |= linear(f"{p}intermediate{ffn}.dense", inter, hidden)
            state |= linear(f"{p}output{ffn}.dense", hidden, inter) | ln(f"{p}output{ffn}.LayerNorm")
    return state


def lavis_bert(state: dict, prefix: str, query, enc, input_ids=None, text_mask=None, eps: float = 1e-12):
    """``BertModel.forward`` of LAVIS (Qformer.py:805-...) with ``query_embeds``, ``encoder_hidden_states`` and, with
    ``input_ids``, a text: embeddings (86-109), the -10000 extended mask (714-802), per layer self-attention over
    queries and text, cross-attention and ``*_query`` feed-forward for the queries, the text feed-forward for the
    text (403-485)."""
    def w(name):
        return state[f"{prefix}{name}"]

    def linear(x, name):
        return F.linear(x, w(f"{name}.weight"), w(f"{name}.bias"))

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w(f"{name}.weight"), w(f"{name}.bias"), eps)

    def attention(h, kv, name, mask):
        def heads(x):
            return x.reshape(*x.shape[:2], HEADS, -1).transpose(1, 2)

        q, k, v = heads(linear(h, f"{name}.self.query")), heads(linear(kv, f"{name}.self.key")), heads(
            linear(kv, f"{name}.self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        return norm(linear(context, f"{name}.output.dense") + h, f"{name}.output.LayerNorm")

    def ffn(x, suffix, name):
        return norm(linear(F.gelu(linear(x, f"{name}.intermediate{suffix}.dense")), f"{name}.output{suffix}.dense")
                    + x, f"{name}.output{suffix}.LayerNorm")

    n_query = query.shape[1]
    x, mask = query, None
    if input_ids is not None:
        text = F.embedding(input_ids, w("embeddings.word_embeddings.weight"))
        x = torch.cat([query, text + w("embeddings.position_embeddings.weight")[:input_ids.shape[1]]], 1)
        full = torch.cat([torch.ones(query.shape[:2]), text_mask.float()], 1)
        mask = (1.0 - full[:, None, None, :]) * -10000.0
    x = norm(x, "embeddings.LayerNorm")
    i = 0
    while f"{prefix}encoder.layer.{i}.attention.self.query.weight" in state:
        p = f"encoder.layer.{i}"
        a = attention(x, x, f"{p}.attention", mask)
        q = a[:, :n_query]
        if f"{prefix}{p}.crossattention.self.query.weight" in state:
            q = attention(q, enc, f"{p}.crossattention", None)
        q = ffn(q, "_query", p)
        x = torch.cat([q, ffn(a[:, n_query:], "", p)], 1) if a.shape[1] > n_query else q
        i += 1
    return x


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    return qformer_tokenizer(str(tiny_bert_tokenizer(tmp_path_factory.mktemp("bert"))))


def etchat(tokenizer, **settings) -> ETChatQFormerConnector:
    return build_connector("etchat_qformer", D_VISION, HIDDEN, {**TINY_BERT, "num_query_tokens": QUERIES,
                                                                "vocab_size": len(tokenizer), **settings}).eval()


def video(**settings) -> VideoQFormerConnector:
    return build_connector("video_qformer", 32, HIDDEN, {**TINY_BERT, "num_query_tokens": QUERIES,
                                                         "image_query_tokens": 4, "max_frame_pos": 6,
                                                         **settings}).eval()


def questions(tokenizer, texts: list[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (K, Lq) ids and mask, as the dataset's collator makes them."""
    ids = [tokenizer(t, truncation=True, max_length=QUERY_MAX_LENGTH)["input_ids"] for t in texts]
    width = pad_to or max(map(len, ids), default=0)
    out, mask = torch.zeros(len(ids), width, dtype=torch.long), torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return out, mask


# --- settings, names, parts -------------------------------------------------------------------------------------

def test_registry_settings_and_defaults(tmp_path, bert_tokenizer):
    assert {"video_qformer", "etchat_qformer"} <= set(CONNECTORS)
    assert connector_parts("etchat_qformer") == ("qformer_attention", "qformer_ffn", "queries", "aggregator",
                                                 "projector")
    assert connector_parts("video_qformer") == ("frame_position", "video_qformer", "projector")
    assert connector_parts("linear") == ("projector",)
    # the originals' geometry (VL:38,72,74,189-190; A:45,48-49; bert-base-uncased)
    assert {k: VideoQFormerConnector.DEFAULTS[k] for k in ("num_query_tokens", "num_hidden_layers", "max_frame_pos",
                                                           "image_query_tokens", "cross_attention_freq",
                                                           "hidden_size")} == {
        "num_query_tokens": 32, "num_hidden_layers": 2, "max_frame_pos": 32, "image_query_tokens": 32,
        "cross_attention_freq": 1, "hidden_size": 768}
    assert {k: ETChatQFormerConnector.DEFAULTS[k] for k in ("num_query_tokens", "num_hidden_layers", "vocab_size",
                                                            "cross_attention_freq", "num_attention_heads")} == {
        "num_query_tokens": 32, "num_hidden_layers": 12, "vocab_size": 30523, "cross_attention_freq": 2,
        "num_attention_heads": 12}
    full = build_connector("video_qformer", 768, 64)  # the original's size: 2 layers of 768
    assert full.video_query_tokens.shape == (1, 32, 768) and full.video_frame_position_embedding.weight.shape == (
        32, 768) and full.llama_proj.weight.shape == (64, 768)
    assert len(full.video_Qformer.encoder.layer) == 2 and all(
        layer.has_cross_attention for layer in full.video_Qformer.encoder.layer)
    for kind in ("video_qformer", "etchat_qformer"):
        with pytest.raises(ValueError, match=r"unknown setting\(s\) \['num_query_token'\]"):
            build_connector(kind, 32, 8, {"num_query_token": 4})
    with pytest.raises(ValueError, match="takes no settings"):
        build_connector("linear", 8, 4, {"hidden_size": 4})
    with pytest.raises(ValueError, match="unknown setting"):
        build_connector("video_qformer", 32, 8, {"tokenizer": "bert-base-uncased"})
    folder = str(tiny_bert_tokenizer(tmp_path / "bert"))
    assert connector_settings({"tokenizer": folder, "num_query_tokens": 4}) == {
        "vocab_size": len(bert_tokenizer), "num_query_tokens": 4}
    assert connector_settings({"tokenizer": "bert-base-uncased"}) == {"vocab_size": 30523}  # not downloaded
    assert connector_settings(connector_settings({"tokenizer": folder})) == {"vocab_size": len(bert_tokenizer)}
    with pytest.raises(ValueError, match="vocab_size 7 but the tokenizer"):
        connector_settings({"tokenizer": folder, "vocab_size": 7})
    # deterministic given the global seed
    torch.manual_seed(3)
    a = etchat(bert_tokenizer).state_dict()
    torch.manual_seed(3)
    b = etchat(bert_tokenizer).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parameter_names_are_the_originals(bert_tokenizer):
    names = [n for n, _ in etchat(bert_tokenizer).named_parameters()]
    assert {n.split(".", 1)[0] for n in names} == {"qformer_bert", "qformer_query", "qformer_ln", "qformer_proj",
                                                   "qformer_q_proj", "qformer_k_proj", "qformer_v_proj"}
    assert {"qformer_bert.embeddings.word_embeddings.weight", "qformer_bert.embeddings.layernorm.weight",
            "qformer_bert.encoder.layer.0.attention.attention.query.weight",
            "qformer_bert.encoder.layer.0.crossattention.attention.key.weight",
            "qformer_bert.encoder.layer.1.intermediate.dense.weight",
            "qformer_bert.encoder.layer.1.output_query.LayerNorm.bias",
            "qformer_q_proj.0.weight", "qformer_v_proj.1.weight"} <= set(names)
    assert not any("layer.1.crossattention" in n for n in names)  # cross-attention every 2nd layer (A:45)
    names = [n for n, _ in video().named_parameters()]
    assert {n.split(".", 1)[0] for n in names} == {"video_frame_position_embedding", "video_Qformer",
                                                   "video_query_tokens", "llama_proj"}
    assert "video_Qformer.layernorm.weight" in names  # no text feed-forward, as Video-LLaMA deletes it (VL:192-197)
    assert not any(re.search(r"layer\.\d+\.(intermediate|output)\.", n) for n in names)


def _original_name(name: str) -> str:
    """Our etchat parameter name -> E.T. Chat's (``model.`` prefix, LAVIS's BERT names)."""
    if name.startswith("qformer_bert."):
        name = "qformer_bert.bert." + name[len("qformer_bert."):]
        name = name.replace("embeddings.layernorm", "embeddings.LayerNorm").replace(
            "attention.attention.", "attention.self.")
    return "model." + name


# E.T. Chat's tuning modes (etchat/train/train.py:471-479), by its parameter names
ETCHAT_MODES = {
    "projector": lambda n: "qformer" in n and "proj" in n or "mm_projector" in n,
    "attention": lambda n: "qformer" in n and ("attention" in n or "qformer_bert" not in n),
    "qformer": lambda n: "qformer" in n,
}


def test_parts_reproduce_the_original_tuning_modes(bert_tokenizer):
    connector = etchat(bert_tokenizer)
    parts = {name: connector.part(name) for name, _ in connector.named_parameters()}
    assert set(parts.values()) == set(connector.PARTS)
    assert parts["qformer_bert.encoder.layer.0.crossattention.output.LayerNorm.weight"] == "qformer_attention"
    assert parts["qformer_bert.embeddings.word_embeddings.weight"] == "qformer_ffn"
    assert parts["qformer_bert.encoder.layer.1.intermediate_query.dense.weight"] == "qformer_ffn"
    assert parts["qformer_query"] == parts["qformer_ln.weight"] == "queries"
    assert parts["qformer_proj.weight"] == parts["qformer_k_proj.1.bias"] == "aggregator"
    assert parts["qformer_v_proj.0.weight"] == "projector"
    recipes = {"projector": ["aggregator", "projector"], "qformer": list(connector.PARTS),
               "attention": ["qformer_attention", "queries", "aggregator", "projector"]}
    for mode, selected in recipes.items():
        original = {n for n in parts if ETCHAT_MODES[mode](_original_name(n))}
        assert original == {n for n, part in parts.items() if part in selected}, mode
    v = video()
    assert {v.part(n) for n, _ in v.named_parameters() if n.startswith("video_")} == {"frame_position",
                                                                                     "video_qformer"}
    assert v.part("video_frame_position_embedding.weight") == "frame_position"
    assert v.part("video_query_tokens") == "video_qformer" and v.part("llama_proj.bias") == "projector"
    assert build_connector("mlp2x_gelu", 8, 4).part("2.weight") == "projector"
    for module in (connector, v, build_connector("linear", 8, 4)):
        with pytest.raises(ValueError, match="has no parameter 'nope'"):
            module.part("nope")


# --- video_qformer ----------------------------------------------------------------------------------------------

def test_video_qformer_shapes_and_layouts():
    connector = video()
    assert connector.num_tokens(3, 4, 12) == QUERIES and connector.num_tokens(1, 4, 4) == QUERIES
    for layout, message in [((3, 5), "reads 4 image-Q-Former tokens a frame"), ((7, 4), "for 6 frames"),
                            ((0, 0), "not pooled rows")]:
        with pytest.raises(ValueError, match=message):
            connector.num_tokens(*layout, layout[0] * layout[1])
    rows = torch.randn(3 * 4 + 2 * 4 + 3 * 4, 32)
    layouts = [(3, 4), (2, 4), (3, 4)]
    with torch.no_grad():
        out = connector.project(rows, layouts)
        assert out.shape == (3 * QUERIES, HIDDEN)
        alone = [connector(part, layout) for part, layout in zip(rows.split([12, 8, 12]), layouts)]
        assert torch.allclose(out, torch.cat(alone), atol=1e-6)  # grouping by frame count changes nothing
        assert connector.project(rows[:0], []).shape == (0, HIDDEN)
    with pytest.raises(ValueError, match="rows for layouts"):
        connector.project(rows[:-1], layouts)


def test_video_qformer_frame_order_matters_only_through_the_position_embedding(tmp_path):
    torch.save({"model": video_llama_state(torch.Generator().manual_seed(0))}, tmp_path / "vl.pth")
    connector = video()
    connector.load_original(tmp_path / "vl.pth")  # weights of a trained size (the initial ones are 0.02-small)
    frames = torch.randn(5, 4, 32)
    order = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        a = connector(frames.reshape(-1, 32), (5, 4))
        b = connector(frames[order].reshape(-1, 32), (5, 4))
        assert not torch.allclose(a, b, atol=1e-3)
        connector.video_frame_position_embedding.weight.zero_()  # cross-attention alone is order-blind
        a = connector(frames.reshape(-1, 32), (5, 4))
        b = connector(frames[order].reshape(-1, 32), (5, 4))
        assert torch.allclose(a, b, atol=1e-5)


def video_llama_state(generator) -> dict:
    """A Video-LLaMA vision-branch checkpoint's ``model`` under its names (VL:153-197): the video branch, plus keys
    of other parts that must be ignored."""
    state = lavis_bert_state("video_Qformer.", generator, layers=2, freq=1, enc=32, text=False)
    state |= {"video_query_tokens": torch.randn(1, QUERIES, 32, generator=generator),
              "video_frame_position_embedding.weight": torch.randn(6, 32, generator=generator),
              "llama_proj.weight": torch.randn(HIDDEN, 32, generator=generator) * 0.2,
              "llama_proj.bias": torch.randn(HIDDEN, generator=generator),
              # not the connector's: the image branch, the LLM, the audio branch
              "Qformer.bert.embeddings.LayerNorm.weight": torch.ones(32), "query_tokens": torch.zeros(1, 4, 32),
              "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
              "audio_query_tokens": torch.zeros(1, 8, 32)}
    return state


def video_llama_reference(state: dict, rows: torch.Tensor, frames: int) -> torch.Tensor:
    """encode_videoQformer_visual after the image Q-Former (VL:298-321), one video."""
    x = rows.reshape(1, frames, 4, 32) + state["video_frame_position_embedding.weight"][:frames][None, :, None]
    hidden = lavis_bert(state, "video_Qformer.bert.", state["video_query_tokens"], x.flatten(1, 2))
    return F.linear(hidden, state["llama_proj.weight"], state["llama_proj.bias"])[0]


def test_video_qformer_loads_a_video_llama_checkpoint(tmp_path):
    state = video_llama_state(torch.Generator().manual_seed(1))
    path = tmp_path / "VL_LLaMA_2_7B_Pretrained.pth"
    torch.save({"model": state, "epoch": 3}, path)
    connector = video()
    rows = torch.randn(5 * 4, 32)
    with torch.no_grad():
        before = connector(rows, (5, 4))
        connector.load_original(path)
        after = connector(rows, (5, 4))
        assert torch.allclose(after, video_llama_reference(state, rows, 5), atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(connector.video_Qformer.encoder.layer[1].crossattention.attention.key.weight,
                       state["video_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"])
    broken = dict(state)
    del broken["video_Qformer.bert.encoder.layer.0.output_query.dense.bias"]
    broken["llama_proj.weight"] = torch.zeros(HIDDEN + 1, 32)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth: does not fit VideoQFormerConnector: missing "
                                         r"\['video_Qformer\.encoder\.layer\.0\.output_query\.dense\.bias'\].*"
                                         r"wrong shape \['llama_proj\.weight \(17, 32\) \(expected \(16, 32\)\)'\]"):
        video().load_original(tmp_path / "broken.pth")
    text_ffn = {**state, "video_Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(64, 32)}
    torch.save({"model": text_ffn}, tmp_path / "text.pth")
    with pytest.raises(ValueError, match=r"unexpected \['video_Qformer\.encoder\.layer\.0\.intermediate"):
        video().load_original(tmp_path / "text.pth")
    torch.save({"model": {"llama_proj.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: no video_query_tokens"):
        video().load_original(tmp_path / "other.pth")


# --- etchat_qformer ---------------------------------------------------------------------------------------------

def test_etchat_shapes_question_conditioning_and_padding(bert_tokenizer):
    torch.manual_seed(0)
    connector = etchat(bert_tokenizer)
    assert connector.needs_query and connector.num_tokens(7, 9, 63) == 7 and connector.num_tokens(1, 9, 9) == 1
    with pytest.raises(ValueError, match="not pooled rows"):
        connector.num_tokens(0, 0, 12)
    rows = torch.randn(3 * 9 + 1 * 9, D_VISION)
    layouts = [(3, 9), (1, 9)]
    texts = ["when does the square appear ?", "describe the video in detail ."]
    with torch.no_grad():
        out = connector.project(rows, layouts, questions(bert_tokenizer, texts))
        assert out.shape == (4, HIDDEN)
        alone = [connector(part, layout, *[q[0] for q in questions(bert_tokenizer, [text])])
                 for part, layout, text in zip(rows.split([27, 9]), layouts, texts)]
        assert torch.allclose(out, torch.cat(alone), atol=1e-5)  # one batched call = one call a visual
        padded = connector.project(rows, layouts, questions(bert_tokenizer, texts, pad_to=40))
        assert torch.allclose(out, padded, atol=1e-5)  # the question's padding is masked
        ids, mask = questions(bert_tokenizer, texts, pad_to=40)
        assert not torch.allclose(out, connector.project(rows, layouts, (ids, torch.ones_like(mask))), atol=1e-4)
        other = connector.project(rows, layouts, questions(bert_tokenizer, ["what is the man holding ?"] * 2))
        assert not torch.allclose(out[:3], other[:3], atol=1e-4)  # question-conditioned
        assert connector.project(rows[:0], [], questions(bert_tokenizer, [])).shape == (0, HIDDEN)
        assert connector.project(rows[:0], []).shape == (0, HIDDEN)  # a text-only batch needs no question
    with pytest.raises(ValueError, match="reads each visual's question"):
        connector.project(rows, layouts)
    with pytest.raises(ValueError, match="2 visuals but questions of shape \\(1, "):
        connector.project(rows, layouts, questions(bert_tokenizer, texts[:1]))


def etchat_reference(state: dict, rows: torch.Tensor, layouts, texts, tokenizer) -> torch.Tensor:
    """compress_image_qformer (A:135-190), visual by visual, by E.T. Chat's key names (``model.`` prefixed)."""
    def w(name):
        return state[f"model.{name}"]

    def seq(x, name):
        x = F.layer_norm(x, x.shape[-1:], w(f"{name}.0.weight"), w(f"{name}.0.bias"))
        return F.linear(x, w(f"{name}.1.weight"), w(f"{name}.1.bias"))

    out, start = [], 0
    for (frames, patches), text in zip(layouts, texts):
        image = rows[start:start + frames * patches].reshape(frames, patches, -1)
        start += frames * patches
        inputs = tokenizer([text], padding="longest", truncation=True, max_length=256, return_tensors="pt")
        ids = inputs.input_ids.expand(frames, -1)
        mask = inputs.attention_mask.expand(frames, -1)
        query = w("qformer_query").expand(frames, -1, -1)
        ln = F.layer_norm(image, image.shape[-1:], w("qformer_ln.weight"), w("qformer_ln.bias"))
        hidden = lavis_bert(state, "model.qformer_bert.bert.", query, ln, ids, mask)
        query_embeds = F.linear(hidden[:, :query.shape[1]], w("qformer_proj.weight"), w("qformer_proj.bias"))
        att = (seq(query_embeds, "qformer_q_proj") @ seq(image, "qformer_k_proj").transpose(-1, -2)
               / image.shape[-1] ** 0.5).softmax(-1)
        out.append(seq((att @ image + query_embeds).mean(1), "qformer_v_proj"))
    return torch.cat(out)


def etchat_state(generator, vocab: int) -> dict:
    """An E.T. Chat model state dict's connector keys (A:47-56), ``model.`` prefixed, plus an LLM key."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    state = lavis_bert_state("qformer_bert.", generator, layers=2, freq=2, enc=D_VISION, text=True, vocab=vocab)
    state |= {"qformer_query": rand(1, QUERIES, 32), "qformer_ln.weight": 1 + rand(D_VISION),
              "qformer_ln.bias": rand(D_VISION), "qformer_proj.weight": rand(D_VISION, 32),
              "qformer_proj.bias": rand(D_VISION)}
    for name, out in (("qformer_q_proj", D_VISION), ("qformer_k_proj", D_VISION), ("qformer_v_proj", HIDDEN)):
        state |= {f"{name}.0.weight": 1 + rand(D_VISION), f"{name}.0.bias": rand(D_VISION),
                  f"{name}.1.weight": rand(out, D_VISION), f"{name}.1.bias": rand(out)}
    return {f"model.{k}": v for k, v in state.items()} | {"model.layers.0.mlp.down_proj.weight": rand(4, 4)}


def test_etchat_loads_an_etchat_state_and_matches_the_original_forward(tmp_path, bert_tokenizer):
    state = etchat_state(torch.Generator().manual_seed(2), len(bert_tokenizer))
    torch.save(state, tmp_path / "etchat.pth")  # a plain state dict (no "model" entry)
    connector = etchat(bert_tokenizer)
    connector.load_original(tmp_path / "etchat.pth")
    rows = torch.randn(2 * 9 + 3 * 9, D_VISION)
    layouts, texts = [(2, 9), (3, 9)], ["when does the square appear ?", "what happens after the man sits down ?"]
    with torch.no_grad():
        out = connector.project(rows, layouts, questions(bert_tokenizer, texts))
        assert torch.allclose(out, etchat_reference(state, rows, layouts, texts, bert_tokenizer), atol=1e-5)


def test_etchat_loads_the_instructblip_qformer_file(tmp_path, bert_tokenizer):
    """instruct_blip_vicuna7b_trimmed.pth: Qformer.bert.*, ln_vision.*, query_tokens into qformer_bert, qformer_ln,
    qformer_query (A:70-75); llm_proj.* ignored; the aggregator and projector untouched."""
    generator = torch.Generator().manual_seed(4)
    lavis = lavis_bert_state("Qformer.", generator, layers=2, freq=2, enc=D_VISION, text=True,
                             vocab=len(bert_tokenizer))
    lavis |= {"ln_vision.weight": torch.rand(D_VISION, generator=generator) + 0.5,
              "ln_vision.bias": torch.randn(D_VISION, generator=generator),
              "query_tokens": torch.randn(1, QUERIES, 32, generator=generator),
              "llm_proj.weight": torch.zeros(4096, 32), "llm_proj.bias": torch.zeros(4096)}
    path = tmp_path / "instruct_blip_vicuna7b_trimmed.pth"
    torch.save({"model": lavis, "config": {"arch": "blip2_vicuna_instruct"}}, path)
    connector = etchat(bert_tokenizer)
    kept = {k: v.clone() for k, v in connector.state_dict().items() if not k.startswith(("qformer_bert",
                                                                                           "qformer_ln",
                                                                                           "qformer_query"))}
    connector.load_original(path)
    loaded = connector.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in kept.items())
    assert torch.equal(loaded["qformer_query"], lavis["query_tokens"])
    assert torch.equal(loaded["qformer_ln.weight"], lavis["ln_vision.weight"])
    renamed = rename_lavis_qformer(lavis, "Qformer.", text=True)
    assert set(renamed) == set(connector.qformer_bert.state_dict())
    assert all(torch.equal(loaded[f"qformer_bert.{k}"], v) for k, v in renamed.items())
    # the same file as a reference computes it (the rest of the state: the connector's own)
    state = {f"model.{k}": v for k, v in connector.state_dict().items() if not k.startswith("qformer_bert")}
    state |= {f"model.qformer_bert.{k[len('Qformer.'):]}": v for k, v in lavis.items() if k.startswith("Qformer.")}
    rows = torch.randn(2 * 9, D_VISION)
    with torch.no_grad():
        out = connector.project(rows, [(2, 9)], questions(bert_tokenizer, ["when does it end ?"]))
        assert torch.allclose(out, etchat_reference(state, rows, [(2, 9)], ["when does it end ?"], bert_tokenizer),
                              atol=1e-5)
    with_head = {**lavis, "Qformer.cls.predictions.bias": torch.zeros(len(bert_tokenizer))}
    del with_head["query_tokens"]
    torch.save({"model": with_head}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"head\.pth: does not fit ETChatQFormerConnector: missing "
                                         r"\['qformer_query'\], unexpected \['qformer_bert\.cls\.predictions\.bias'\]"):
        etchat(bert_tokenizer).load_original(tmp_path / "head.pth")


def test_gradients_reach_only_the_trained_parts(bert_tokenizer):
    torch.manual_seed(0)
    connector = etchat(bert_tokenizer)
    for name, param in connector.named_parameters():
        param.requires_grad_(connector.part(name) in ("aggregator", "projector"))
    rows = torch.randn(2 * 9, D_VISION)
    connector.project(rows, [(2, 9)], questions(bert_tokenizer, ["when does the square appear ?"])).square().sum(
    ).backward()
    for name, param in connector.named_parameters():
        if connector.part(name) in ("aggregator", "projector"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


# --- the image-Q-Former tower -----------------------------------------------------------------------------------

class StandInEVA(nn.Module):
    """What the tower needs of EVA: ``hidden(pixels) -> (T, 1 + S, D)`` with the CLS token first."""

    dim, heads, clip_frames = D_VISION, 2, 1
    image_size = (16, 16)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D_VISION, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D_VISION))

    def hidden(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)


TINY_TOWER = {**TINY_BERT, "num_query_token": QUERIES}


def test_the_tower_shapes_names_and_seed():
    tower = build_qformer_tower(StandInEVA(), TINY_TOWER, seed=1)
    assert (tower.dim, tower.grid, tower.num_patches, tower.clip_frames) == (32, (1, QUERIES), QUERIES, 1)
    assert (tower.image_size, tower.mean, tower.std) == ((16, 16), StandInEVA.mean, StandInEVA.std)
    with torch.no_grad():
        assert tower.eval()(torch.randn(3, 3, 16, 16)).shape == (3, QUERIES, 32)
        assert tower.double()(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    tower.float()
    names = [n for n, _ in tower.named_parameters()]
    assert {n.split(".", 1)[0] for n in names} == {"visual_encoder", "ln_vision", "Qformer", "query_tokens"}
    assert "Qformer.encoder.layer.0.crossattention.attention.key.weight" in names
    assert not any("layer.1.crossattention" in n for n in names)  # every 2nd layer (B:47)
    assert tower.Qformer.encoder.layer[0].crossattention.attention.key.in_features == D_VISION
    again, other = build_qformer_tower(StandInEVA(), TINY_TOWER, 1), build_qformer_tower(StandInEVA(), TINY_TOWER, 2)
    assert torch.equal(again.query_tokens, tower.query_tokens) and not torch.equal(other.query_tokens,
                                                                                    tower.query_tokens)
    tower.requires_grad_(False).train()
    assert not tower.training and not tower.Qformer.training  # frozen: eval mode, as Video-LLaMA's
    tower.query_tokens.requires_grad_(True)
    assert tower.train().Qformer.training
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['num_query_tokens'\]"):
        build_qformer_tower(StandInEVA(), {"num_query_tokens": 4}, 0)


def test_the_tower_loads_a_blip2_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(5)
    # a BLIP-2 stage-1 style file: the text parts Video-LLaMA deletes are in it, and other modules' keys
    state = lavis_bert_state("Qformer.", generator, layers=2, freq=2, enc=D_VISION, text=True, vocab=30)
    state |= {"Qformer.cls.predictions.bias": torch.zeros(30), "query_tokens": torch.randn(1, QUERIES, 32),
              "ln_vision.weight": torch.rand(D_VISION) + 0.5, "ln_vision.bias": torch.randn(D_VISION),
              "t5_proj.weight": torch.zeros(8, 32), "visual_encoder.cls_token": torch.zeros(1, 1, 1408)}
    path = tmp_path / "blip2_pretrained_flant5xxl.pth"
    torch.save({"model": state}, path)
    base = StandInEVA()
    tower = build_qformer_tower(base, {**TINY_TOWER, "pretrained": str(path)}, 0).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = base.hidden(pixels)
        ln = F.layer_norm(tokens, tokens.shape[-1:], state["ln_vision.weight"], state["ln_vision.bias"], 1e-5)
        expected = lavis_bert(state, "Qformer.bert.", state["query_tokens"].expand(2, -1, -1), ln)
        assert torch.allclose(tower(pixels), expected, atol=1e-5)
    state["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(32, 1408)
    torch.save({"model": state}, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide\.pth: does not fit QFormerTower: missing \[\], unexpected \[\], "
                                         r"wrong shape \['Qformer\.encoder\.layer\.0\.crossattention\.attention\.key"
                                         r"\.weight \(32, 1408\) \(expected \(32, 24\)\)'\]"):
        build_qformer_tower(StandInEVA(), {**TINY_TOWER, "pretrained": str(tmp_path / "wide.pth")}, 0)


def test_video_llamas_frozen_branch_is_cached_once_and_its_cache_equals_the_tower(tmp_path, short_clip):
    """The features rule with ``eva_vit_g_qformer`` (a tiny EVA-ViT-G + image Q-Former) caches T x 32-query tokens
    a video (the frozen boundary), equal to the tower's output on the same frames; a video_qformer connector reads
    that cache as (T, Q) frames."""
    import numpy as np

    from pipeline.features import extract
    from pipeline.features.encoder import FramePrep, normalize
    from pipeline.features.extract import FeatureConfig
    from pipeline.features.store import FeatureStore, write_index
    from pipeline.io import write_table
    from pipeline.video.frames import FrameSampling, read_frames
    from pipeline.vision import build_tower

    settings = {"backend": "eva", "model": "eva_vit_g_qformer", "pretrained": None, "seed": 0, "layer": -1,
                "overrides": {"width": 24, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32,
                              "mlp_ratio": 2.0, "qformer": TINY_TOWER}}
    config = FeatureConfig.from_dict({**settings, "sampling": "uniform", "num_frames": 8, "pooling": "frames",
                                      "workers": 0, "resize": "stretch"})
    rows = [{"video_id": "band", "path": str(short_clip), "status": "ok"}]
    status = extract.extract_shard(rows, tmp_path / "shard-00000.h5", config, threads=1)
    assert status[0]["status"] == "ok", status
    write_table(tmp_path / "features.tsv", status, extract.COLUMNS)
    write_index([tmp_path / "features.tsv"], tmp_path / "index.tsv")
    store = FeatureStore(tmp_path / "index.tsv")
    cached = store.get("band")
    assert cached.shape == (8 * QUERIES, 32) and store.info("band")["layout"] == "frames"
    tower = build_tower(*(settings[key] for key in ("backend", "model", "pretrained", "layer", "overrides",
                                                    "seed"))).eval()
    frames, _, _ = read_frames(short_clip, FrameSampling(method="uniform", num_frames=8))
    with torch.no_grad():
        expected = tower(normalize(FramePrep(tower.image_size, "stretch")(frames), tower)).reshape(-1, 32)
    assert np.allclose(cached, expected.numpy(), atol=2e-3)  # float16 in the store
    connector = build_connector("video_qformer", 32, HIDDEN, {**TINY_BERT, "num_query_tokens": 4,
                                                              "image_query_tokens": QUERIES})
    assert connector.project(torch.from_numpy(cached).float(), [(8, QUERIES)]).shape == (4, HIDDEN)
