"""Chat templates and the label mask: which tokens of a conversation the model is trained to produce.

A conversation is rendered piece by piece, each piece tokenized on its own and marked trained or not, so the
mask is exact by construction: there is no second pass that re-derives answer spans from token counts (the
source of LLaVA's silent mismatch, where ``cur_len != total_len`` zeroes a whole sample's labels). Only the
assistant's answers and their end-of-turn marker are trained; the system prompt, the user turns, the role
headers, the video positions and the padding carry ``IGNORE_INDEX``.

The formats follow the systems they come from (LLaVA ``llava/conversation.py``, E.T. Chat
``etchat/conversation.py``, Video-LLaMA ``video_llama/conversation/conversation_video.py``); ``tokenizer`` uses the
tokenizer's own chat template, cut into pieces by rendering the conversation one message at a time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

from pipeline import IGNORE_INDEX, VIDEO_TOKEN, VIDEO_TOKEN_INDEX

VIDEO_WRAP = ("<vid_start>", "<vid_end>")
"""Tokens around the video positions when a recipe asks for them (Video-ChatGPT's ``--mm_use_vid_start_end``)."""


def video_wrap_ids(tokenizer, enabled: bool) -> tuple[int, int] | None:
    """The ids of :data:`VIDEO_WRAP` in ``tokenizer`` (which must hold them) when ``enabled``, else None: the
    ``video_wrap`` argument of :func:`tokenize_conversation`."""
    return tuple(tokenizer.convert_tokens_to_ids(list(VIDEO_WRAP))) if enabled else None


@dataclass(frozen=True)
class Template:
    """A chat format.

    Attributes:
        name: the config name.
        system: default system prompt; ``""`` renders none.
        system_format: renders ``{content}`` = the system prompt before the first turn (not trained).
        user_format: renders a user turn ``{content}`` followed by the assistant header (not trained).
        first_user_format: renders the first user turn when the system prompt goes inside it (``llama_2``);
            ``{system}`` and ``{content}``. Empty: ``system_format`` then ``user_format``.
        assistant_format: renders an answer ``{content}`` with its end-of-turn marker (trained).
        assistant_sep: text after an answer before the next turn (not trained).
        bos: start with the tokenizer's BOS token (not trained).
        plain: LLaVA's pretraining format: the user turn is the video alone, its words are dropped.
        source: where the format comes from.
    """

    name: str
    system: str = ""
    system_format: str = "{content}"
    user_format: str = "{content}"
    first_user_format: str = ""
    assistant_format: str = "{content}"
    assistant_sep: str = ""
    bos: bool = False
    plain: bool = False
    source: str = ""


CHATML = Template(
    name="chatml",
    system="You are a helpful AI assistant that answers questions about videos.",
    system_format="<|im_start|>system\n{content}<|im_end|>\n",
    user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>",
    assistant_sep="\n",
    source="ChatML as in the chat templates of SmolLM2-Instruct and Qwen2 (tokenizer_config.json)",
)

TEMPLATES = {
    t.name: t
    for t in (
        Template(
            name="plain",
            user_format="{content}",
            assistant_format="{content}\n",
            bos=True,
            plain=True,
            source="LLaVA llava/conversation.py conv_llava_plain + train.py preprocess_plain: '<image>' + caption + "
                   "'\\n', the instruction dropped, the caption and its newline trained (E.T. Chat stage 1 too)",
        ),
        CHATML,
        dataclasses.replace(
            CHATML, name="qwen_2", system="You are a helpful assistant.",
            source="VideoChat-Flash llava-train_videochat/llava/train/train.py preprocess_qwen (lines 585-603): "
                   "ChatML, system 'You are a helpful assistant.', no BOS",
        ),
        Template(
            name="vicuna_v1",
            system=(
                "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions."
            ),
            system_format="{content} ",
            user_format="USER: {content} ASSISTANT:",
            assistant_format=" {content}</s>",
            bos=True,
            source="LLaVA llava/conversation.py conv_vicuna_v1 (Video-ChatGPT's vicuna_v1_1)",
        ),
        Template(
            name="llama_2",
            system=(
                "You are a helpful language and vision assistant. You are able to understand the visual content "
                "that the user provides, and assist the user with a variety of tasks using natural language."
            ),
            first_user_format="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
            user_format="<s>[INST] {content} [/INST]",
            assistant_format=" {content} </s>",
            bos=True,
            source="LLaVA llava/conversation.py conv_llava_llama_2 (Video-LLaMA's llama_v2: Llama-2-chat)",
        ),
        Template(
            name="videollama_llama_2",
            system=" ",
            first_user_format="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
            user_format="<s>[INST] {content} [/INST]",
            assistant_format=" {content} </s>",
            bos=True,
            source="Video-LLaMA video_llama/datasets/datasets/video_instruct_dataset.py llama_v2_video_conversation "
                   "(lines 31-39: system ' ', sep '<s>', sep2 '</s>') as conversation_video.py SeparatorStyle.LLAMA_2 "
                   "renders it (lines 63-84) and preprocess_for_llama_v2 masks it (lines 263-326): the fine-tuning "
                   "format of model_type llama_v2 (Llama-2-chat)",
        ),
        Template(
            name="phi3",
            system="You are a helpful AI assistant.",
            system_format="<|system|>\n{content}<|end|>",
            user_format="\n<|user|>\n{content}<|end|>\n<|assistant|>\n",
            assistant_format="{content}<|end|>",
            source="E.T. Chat etchat/conversation.py phi3 (Phi-3-mini-4k-instruct)",
        ),
        Template(
            name="tokenizer",
            source="the tokenizer's own chat_template (apply_chat_template), rendered one message at a time",
        ),
    )
}


def get_template(name: str) -> Template:
    """The template called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None


def _encode(tokenizer, text: str, video_rows: Iterator[int], video_wrap: tuple[int, int] | None = None) -> list[int]:
    """Token ids of ``text`` with each ``<video>`` replaced by ``next(video_rows)`` ``VIDEO_TOKEN_INDEX`` ids
    (between the ``video_wrap`` token ids, when given)."""
    ids: list[int] = []
    for i, part in enumerate(text.split(VIDEO_TOKEN)):
        if i:
            video = [VIDEO_TOKEN_INDEX] * next(video_rows)
            ids.extend([video_wrap[0], *video, video_wrap[1]] if video_wrap else video)
        if part:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def _pieces(turns: list[dict], template: Template, system: str) -> list[tuple[str, bool]]:
    """The text pieces of a conversation in a :class:`Template`'s format, each marked trained or not."""
    pieces: list[tuple[str, bool]] = []
    if system and not template.first_user_format:
        pieces.append((template.system_format.format(content=system), False))
    for i, turn in enumerate(turns):
        if turn["from"] == "human":
            plain = template.plain and VIDEO_TOKEN in turn["value"]
            content = VIDEO_TOKEN * turn["value"].count(VIDEO_TOKEN) if plain else turn["value"]
            if i == 0 and template.first_user_format and system:
                pieces.append((template.first_user_format.format(system=system, content=content), False))
            else:
                pieces.append((template.user_format.format(content=content), False))
        else:
            pieces.append((template.assistant_format.format(content=turn["value"]), True))
            if template.assistant_sep and i + 1 < len(turns):
                pieces.append((template.assistant_sep, False))
    return pieces


def _tokenizer_pieces(turns: list[dict], tokenizer, system: str | None) -> list[tuple[str, bool]]:
    """Pieces of the tokenizer's own chat template: each message's share of the rendered text is the difference
    between renderings of the conversation up to it and up to the one before (with the generation prompt before
    an answer, so the assistant header belongs to the untrained side).

    Raises:
        ValueError: the tokenizer has no chat template, or its renderings are not prefixes of each other (the
            pieces, and so the mask, could not be exact).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer': the tokenizer has no chat_template")
    messages = [{"role": "system", "content": system}] if system else []
    rendered, pieces = "", []
    for turn in turns:
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]})
        if turn["from"] == "human":
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            end = len(text) - len(text.rstrip("\n"))  # the newline after an answer opens the next turn
            text = text[: len(text) - end]
        if not text.startswith(rendered):
            raise ValueError("template 'tokenizer': the chat template's renderings are not prefixes of each other")
        pieces.append((text[len(rendered):], turn["from"] == "gpt"))
        rendered = text
    return pieces


def tokenize_conversation(conversations: list[dict], tokenizer, template: Template,
                          num_video_tokens: int | Sequence[int], system: str | None = None,
                          for_generation: bool = False, video_wrap: tuple[int, int] | None = None
                          ) -> tuple[list[int], list[int]]:
    """Token ids and labels of a LLaVA conversation.

    Args:
        conversations: turns ``{"from": "human" | "gpt", "value": str}``, alternating, starting with ``human``.
        tokenizer: a Hugging Face tokenizer.
        num_video_tokens: rows of the video's features (T + S); each ``<video>`` becomes that many positions. A
            sequence gives each marker its own count, in order (a record of several visuals; ``[]``: text only).
        system: system prompt; ``None`` uses the template's.
        for_generation: drop a trailing ``gpt`` turn, so the ids end with the assistant header (a prompt).
        video_wrap: ids of the tokens around the video positions (Video-ChatGPT's ``<vid_start>``/``<vid_end>``).

    Returns:
        ``input_ids`` and ``labels``, equal length; ``labels`` is ``IGNORE_INDEX`` everywhere but the answers and
        their end-of-turn markers.

    Raises:
        ValueError: turns do not alternate human/gpt starting with human (names the turn), the ``tokenizer``
            template cannot be cut into exact pieces, or a sequence ``num_video_tokens`` has another length than
            the conversation has ``<video>`` markers.
    """
    turns = conversations
    if for_generation and turns and turns[-1]["from"] == "gpt":
        turns = turns[:-1]
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ValueError(f"conversations[{i}].from: expected {expected!r}, got {turn.get('from')!r}")
    system = template.system if system is None else system
    if template.name == "tokenizer":
        pieces = _tokenizer_pieces(turns, tokenizer, system or None)
    else:
        pieces = _pieces(turns, template, system)
    markers = sum(text.count(VIDEO_TOKEN) for text, _ in pieces)
    rows = [num_video_tokens] * markers if isinstance(num_video_tokens, int) else list(num_video_tokens)
    if len(rows) != markers:
        raise ValueError(f"{markers} {VIDEO_TOKEN} marker(s) in the conversation but {len(rows)} visual(s)")
    video_rows = iter(rows)
    ids: list[int] = [tokenizer.bos_token_id] if template.bos and tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for text, trained in pieces:
        piece = _encode(tokenizer, text, video_rows, video_wrap)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return ids, labels
