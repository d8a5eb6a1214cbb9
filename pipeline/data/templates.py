"""Chat templates and the label mask: which tokens of a conversation the model is trained to produce.

A conversation is rendered piece by piece, each piece tokenized on its own and marked trained or not, so the
mask is exact by construction: there is no second pass that re-derives answer spans from token counts (the
source of LLaVA's silent mismatch, where ``cur_len != total_len`` zeroes a whole sample's labels). Only the
assistant's answers and their end-of-turn marker are trained; the system prompt, the user turns, the role
headers, the video positions and the padding carry ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import IGNORE_INDEX, VIDEO_TOKEN, VIDEO_TOKEN_INDEX


@dataclass(frozen=True)
class Template:
    """A chat format.

    Attributes:
        name: the config name (``chatml``, ``vicuna_v1``).
        system: default system prompt; ``""`` renders no system block.
        system_format: renders ``{content}`` = the system prompt (not trained).
        user_format: renders a user turn ``{content}`` followed by the assistant header (not trained).
        assistant_format: renders an answer ``{content}`` with its end-of-turn marker (trained).
        assistant_sep: text after an answer before the next turn (not trained).
        bos: start with the tokenizer's BOS token.
        source: where the format comes from.
    """

    name: str
    system: str
    system_format: str
    user_format: str
    assistant_format: str
    assistant_sep: str
    bos: bool
    source: str


TEMPLATES = {
    t.name: t
    for t in (
        Template(
            name="chatml",
            system="You are a helpful AI assistant that answers questions about videos.",
            system_format="<|im_start|>system\n{content}<|im_end|>\n",
            user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant_format="{content}<|im_end|>",
            assistant_sep="\n",
            bos=False,
            source="ChatML as in the chat templates of SmolLM2-Instruct and Qwen2 (tokenizer_config.json)",
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
            assistant_sep="",
            bos=True,
            source="Video-ChatGPT video_chatgpt/video_conversation.py conv_video_chatgpt_v1 (LLaVA conv_vicuna_v1)",
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


def _encode(tokenizer, text: str, num_video_tokens: int) -> list[int]:
    """Token ids of ``text`` with each ``<video>`` replaced by ``num_video_tokens`` ``VIDEO_TOKEN_INDEX`` ids."""
    ids: list[int] = []
    for i, part in enumerate(text.split(VIDEO_TOKEN)):
        if i:
            ids.extend([VIDEO_TOKEN_INDEX] * num_video_tokens)
        if part:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_conversation(conversations: list[dict], tokenizer, template: Template, num_video_tokens: int,
                          system: str | None = None, for_generation: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of a LLaVA conversation.

    Args:
        conversations: turns ``{"from": "human" | "gpt", "value": str}``, alternating, starting with ``human``.
        tokenizer: a Hugging Face tokenizer.
        num_video_tokens: rows of the video's features (T + S); each ``<video>`` becomes that many positions.
        system: system prompt; ``None`` uses the template's.
        for_generation: drop a trailing ``gpt`` turn, so the ids end with the assistant header (a prompt).

    Returns:
        ``input_ids`` and ``labels``, equal length; ``labels`` is ``IGNORE_INDEX`` everywhere but the answers and
        their end-of-turn markers.

    Raises:
        ValueError: turns do not alternate human/gpt starting with human (names the turn).
    """
    turns = conversations
    if for_generation and turns and turns[-1]["from"] == "gpt":
        turns = turns[:-1]
    ids: list[int] = [tokenizer.bos_token_id] if template.bos and tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)

    def add(piece: list[int], trained: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    system = template.system if system is None else system
    if system:
        add(_encode(tokenizer, template.system_format.format(content=system), 0), False)
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ValueError(f"conversations[{i}].from: expected {expected!r}, got {turn.get('from')!r}")
        if expected == "human":
            add(_encode(tokenizer, template.user_format.format(content=turn["value"]), num_video_tokens), False)
        else:
            add(_encode(tokenizer, template.assistant_format.format(content=turn["value"]), 0), True)
            if template.assistant_sep and i + 1 < len(turns):
                add(_encode(tokenizer, template.assistant_sep, 0), False)
    return ids, labels
