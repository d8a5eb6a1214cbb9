"""BLIP-2's Q-Former as Video-LLaMA and E.T. Chat use it: building blocks shared by
:mod:`pipeline.model.connectors.video_qformer`, :mod:`pipeline.model.connectors.etchat_qformer` and
:mod:`pipeline.vision.qformer_tower`.

Both originals run LAVIS's BERT (``Qformer.py``, a copy of Hugging Face BERT v4.15 with query tokens, cross-attention
every ``cross_attention_freq`` layers and a separate feed-forward for the query positions). Sources, by line:
Video-LLaMA (DAMO-NLP-SG/Video-LLaMA, read at commit 64888c0) ``video_llama/models/Qformer.py`` (``Q``),
``video_llama/models/blip2.py`` (``B``), ``video_llama/models/video_llama.py`` (``VL``); E.T. Chat
(PolyU-ChenLab/ETBench, read at commit 445f620) ``etchat/model/qformer.py`` (the same BERT, reformatted) and
``etchat/model/etchat_arch.py`` (``A``).

Here the Q-Former is transformers' port of that BERT (transformers 5.23 installed):

- :class:`transformers.Blip2QFormerModel` for a Q-Former that reads query tokens only (Video-LLaMA's image and
  video Q-Formers): a LayerNorm over the query embeddings (``Q:102-109``: with no text the embeddings are the
  queries, normalised), then the layers; built with ``use_qformer_text_input=False`` it has no text feed-forward
  (``intermediate``/``output``), no word or position embeddings, exactly what Video-LLaMA deletes (``VL:104-109``,
  ``VL:192-197``).
- :class:`transformers.InstructBlipQFormerModel` for a Q-Former that also reads a text (E.T. Chat's, InstructBLIP's
  instruction-aware one): word plus absolute position embeddings of the text (positions from 0), the query embeddings
  concatenated in front, one LayerNorm over both (``Q:86-109``); bidirectional self-attention over queries and text
  with the text's padding masked (``Q:738-802`` non-decoder branch); cross-attention from the query positions only;
  the query positions through ``intermediate_query``/``output_query``, the text through ``intermediate``/``output``
  (``Q:430-470``).

Both were ported from LAVIS and checked against it by transformers' conversion scripts
(``convert_blip_2_original_to_pytorch.py``, ``convert_instructblip_original_to_pytorch.py``, not shipped in the
installed wheel): their rename lists are what :func:`rename_lavis_qformer` applies. Differences from LAVIS's
arithmetic, none beyond rounding: attention runs through the model's attention interface (``sdpa`` by default;
LAVIS: explicit softmax, ``Q:206-265``); a masked key gets the dtype's minimum (or a boolean mask) instead of
``-10000`` (``Q:802``), both an exact zero weight after the softmax in float32, bfloat16 and float16.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

BERT_BASE = "bert-base-uncased"
DEC_TOKEN = "[DEC]"
# E.T. Chat tokenizes each question with truncation to 256 tokens (A:146-148).
QUERY_MAX_LENGTH = 256
# bert-base-uncased's 30522 word pieces plus the "[DEC]" bos token InstructBLIP and E.T. Chat add before resizing the
# embeddings (A:39-40,48; transformers convert_instructblip_original_to_pytorch.py: "vocab size = 30522 + 1").
BERT_VOCAB = 30522
INSTRUCTBLIP_VOCAB = BERT_VOCAB + 1

# bert-base-uncased's config.json, which LAVIS's ``BertConfig.from_pretrained("bert-base-uncased")`` reads (B:48,
# VL:33, A:42); transformers' Blip2QFormerConfig / InstructBlipQFormerConfig defaults are the same numbers.
BERT_BASE_GEOMETRY = {
    "hidden_size": 768,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "max_position_embeddings": 512,
}
BERT_BASE_LAYERS = 12


def qformer_tokenizer(name_or_path: str = BERT_BASE):
    """E.T. Chat's question tokenizer: ``BertTokenizer`` with ``truncation_side="left"`` and ``[DEC]`` added as the
    bos token (A:39-40); the dataset truncates to :data:`QUERY_MAX_LENGTH`.

    Args:
        name_or_path: a hub name (``bert-base-uncased``: a download) or a folder with BERT's ``vocab.txt`` or a saved
            tokenizer (a stage's ``qformer_tokenizer/``, where ``[DEC]`` is already in: adding it again is a no-op).
    """
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(name_or_path), truncation_side="left")
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def merge_settings(owner: str, defaults: dict, settings: dict | None) -> dict:
    """``settings`` over ``defaults``.

    Raises:
        ValueError: a key of ``settings`` is not one of ``defaults``.
    """
    settings = dict(settings or {})
    if unknown := sorted(set(settings) - set(defaults)):
        raise ValueError(f"{owner}: unknown setting(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **settings}


def build_qformer(*, text: bool, encoder_width: int, num_hidden_layers: int, cross_attention_freq: int,
                  vocab_size: int | None = None, **geometry) -> nn.Module:
    """A randomly initialised Q-Former (transformers' initialisation: normal(0, ``initializer_range``) Linear and
    Embedding weights, zero biases, unit LayerNorms, as LAVIS's ``BertPreTrainedModel._init_weights``, Q:665-675),
    drawn from the global torch random state.

    Args:
        text: False: :class:`~transformers.Blip2QFormerModel` (queries only); True:
            :class:`~transformers.InstructBlipQFormerModel` (queries and a text, ``vocab_size`` word pieces).
        encoder_width: the width of what the cross-attention reads (LAVIS's ``encoder_width``).
        num_hidden_layers, cross_attention_freq: layers, and a cross-attention in layer ``i`` when
            ``i % cross_attention_freq == 0`` (Q:387-396).
        geometry: :data:`BERT_BASE_GEOMETRY` keys.
    """
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, InstructBlipQFormerConfig, InstructBlipQFormerModel

    common = {**geometry, "num_hidden_layers": num_hidden_layers, "cross_attention_frequency": cross_attention_freq,
              "encoder_hidden_size": encoder_width, "pad_token_id": 0}
    if text:
        return InstructBlipQFormerModel(InstructBlipQFormerConfig(vocab_size=vocab_size, **common))
    return Blip2QFormerModel(Blip2QFormerConfig(use_qformer_text_input=False, **common))


def rename_lavis_qformer(state_dict: dict, prefix: str, text: bool = False) -> dict:
    """The LAVIS Q-Former tensors of ``state_dict`` under ``prefix``, named as :func:`build_qformer`'s module names
    them (relative to it).

    ``{prefix}bert.`` is dropped; ``embeddings.LayerNorm`` becomes ``layernorm`` (``text`` False,
    Blip2QFormerModel) or ``embeddings.layernorm`` (``text`` True, InstructBlipQFormerModel); ``attention.self`` and
    ``crossattention.self`` become ``attention.attention`` and ``crossattention.attention``; the
    ``embeddings.position_ids`` buffer (persistent in LAVIS, Q:70-72; a non-persistent buffer here) is dropped. The
    rules of transformers' ``convert_blip_2_original_to_pytorch.py`` and ``convert_instructblip_original_to_pytorch.py``
    (``Qformer.bert`` -> ``qformer``, ``"attention.self"`` -> ``"attention.attention"``, the LayerNorm rename).
    Names without a counterpart (LAVIS's ``cls.*`` LM head, the text embeddings and text feed-forward when ``text`` is
    False) are returned unchanged (without the ``bert.`` only), for the caller to reject or ignore.

    Args:
        state_dict: e.g. a BLIP-2 checkpoint's ``model`` (``Qformer.bert.encoder.layer.0.attention.self.query.weight``,
            ...), or E.T. Chat's (``qformer_bert.bert....``), or Video-LLaMA's (``video_Qformer.bert....``).
        prefix: ``"Qformer."``, ``"qformer_bert."``, ``"video_Qformer."``, ...
        text: the target is an InstructBlipQFormerModel.

    Returns:
        ``{name: tensor}``, e.g. ``encoder.layer.0.attention.attention.query.weight``.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        name = name[len("bert."):] if name.startswith("bert.") else name
        if name == "embeddings.position_ids":
            continue
        if name.startswith("embeddings.LayerNorm."):
            name = ("embeddings.layernorm." if text else "layernorm.") + name[len("embeddings.LayerNorm."):]
        name = name.replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention.")
        out[name] = value
    return out


def lavis_text_only(name: str) -> bool:
    """Whether a renamed (:func:`rename_lavis_qformer`) LAVIS Q-Former name is a part a queries-only Q-Former has
    not: the LM head (``cls.*``), the word and position embeddings, a layer's text feed-forward (``intermediate.*``,
    ``output.*``). Video-LLaMA deletes exactly these from its image and video Q-Formers (VL:104-109, 192-197)."""
    if name.startswith(("cls.", "embeddings.word_embeddings.", "embeddings.position_embeddings.")):
        return True
    parts = name.split(".")
    return len(parts) > 3 and parts[:2] == ["encoder", "layer"] and parts[3] in ("intermediate", "output")


def read_original(path: str | Path) -> dict:
    """The state dict of a released checkpoint, read as tensors only: a ``.safetensors`` file, or a ``torch.save``
    file read with ``torch.load(weights_only=True)`` (never unpickling code), its ``model`` entry when it has one
    (LAVIS's and Video-LLaMA's ``{"model": ..., "optimizer": ..., ...}``, B:78-84; A:72; VL:604-608).

    Raises:
        ValueError: the file is missing or not a weights-only checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path}: not a checkpoint torch.load reads weights-only ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_exactly(module: nn.Module, found: dict, path: str | Path, parts: tuple[str, ...] | None = None) -> None:
    """Load ``found`` (names relative to ``module``) into the tensors of ``module`` under ``parts`` (top-level
    names; None: all), requiring exactly those names and shapes.

    Raises:
        ValueError: naming ``path``, the missing and unexpected names and the wrong shapes.
    """
    expected = module.state_dict()
    if parts is not None:
        expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] in parts}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {tuple(found[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in found and tuple(found[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        def listed(names: list[str]) -> str:
            return f"{names[:6]}{f' and {len(names) - 6} more' if len(names) > 6 else ''}"

        raise ValueError(f"{path}: does not fit {type(module).__name__}: missing {listed(missing)}, unexpected "
                         f"{listed(unexpected)}, wrong shape {listed(wrong)}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(found[name].to(tensor.dtype))


def strip_model_prefix(state: dict, marker: str) -> dict:
    """``state`` with the prefix before ``marker`` removed from every key that has it (``model.qformer_query`` ->
    ``qformer_query`` for an E.T. Chat checkpoint, ``base_model.model.model.`` under PEFT); keys without it are
    dropped. The prefix is the part before the first key that is ``marker`` or starts with ``marker.``.

    Returns:
        ``{}`` when no key holds ``marker``.
    """
    for key in state:
        head, sep, tail = key.rpartition(marker)
        if sep and (head == "" or head.endswith(".")) and (tail == "" or tail.startswith(".")):
            return {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    return {}
