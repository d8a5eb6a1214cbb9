import pytest

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.templates import TEMPLATES, get_template, tokenize_conversation

TWO_TURNS = [
    {"from": "human", "value": "<video>\nWhat instrument is played?"},
    {"from": "gpt", "value": "An electric guitar."},
    {"from": "human", "value": "Where is this?"},
    {"from": "gpt", "value": "In a music studio."},
]

# what each template trains on: every answer with its end-of-turn marker, nothing else
TRAINED = {
    "plain": ["An electric guitar.\n", "In a music studio.\n"],
    "chatml": ["An electric guitar.<|im_end|>", "In a music studio.<|im_end|>"],
    "qwen_2": ["An electric guitar.<|im_end|>", "In a music studio.<|im_end|>"],
    "vicuna_v1": [" An electric guitar.</s>", " In a music studio.</s>"],
    "llama_2": [" An electric guitar. </s>", " In a music studio. </s>"],
    "videollama_llama_2": [" An electric guitar. </s>", " In a music studio. </s>"],
    "phi3": ["An electric guitar.<|end|>", "In a music studio.<|end|>"],
    "tokenizer": ["An electric guitar.<|im_end|>", "In a music studio.<|im_end|>"],  # SmolLM2's own: ChatML
}


def _trained_spans(ids, labels):
    """Maximal runs of positions whose label is not IGNORE_INDEX."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append(ids[start:i])
            start = None
    return spans


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_trains_exactly_the_answers_token_by_token(tokenizer, name):
    ids, labels = tokenize_conversation(TWO_TURNS, tokenizer, get_template(name), num_video_tokens=3)
    assert len(ids) == len(labels)
    # every trained position predicts exactly its own token (labels are ids, shifted inside the model)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert [tokenizer.decode(span) for span in _trained_spans(ids, labels)] == TRAINED[name]
    video = [i for i, t in enumerate(ids) if t == VIDEO_TOKEN_INDEX]
    assert len(video) == 3 and video == list(range(video[0], video[0] + 3))
    assert all(labels[i] == IGNORE_INDEX for i in video)


def test_chatml_pieces_tokenize_as_the_whole_rendered_conversation(tokenizer):
    template = get_template("chatml")
    ids, _ = tokenize_conversation(TWO_TURNS, tokenizer, template, num_video_tokens=3)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": template.system}]
        + [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in TWO_TURNS],
        tokenize=False,
    )
    before, after = text.split("<video>")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    video = ids.index(VIDEO_TOKEN_INDEX)
    assert ids[:video] == encode(before)
    assert ids[video + 3:] == encode(after.rstrip("\n"))


def test_plain_drops_the_instruction_and_llama_2_puts_the_system_prompt_in_the_first_turn(tokenizer):
    ids, _ = tokenize_conversation(TWO_TURNS[:2], tokenizer, get_template("plain"), 2)
    assert "instrument" not in tokenizer.decode([t for t in ids if t >= 0])
    ids, _ = tokenize_conversation(TWO_TURNS, tokenizer, get_template("llama_2"), 1)
    text = tokenizer.decode([t for t in ids if t >= 0])
    assert text.count("<<SYS>>") == 1 and text.index("<<SYS>>") < text.index("What instrument")
    assert "<s>[INST] Where is this? [/INST]" in text


class _CharTokenizer:
    """One id per character (its code point): ids decode back to exactly the text the template rendered."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _rendered(ids: list[int]) -> str:
    return "".join("<BOS>" if t == 1 else "<VID>" if t == VIDEO_TOKEN_INDEX else chr(t) for t in ids)


def test_videollama_llama_2_renders_video_llamas_fine_tuning_prompt_exactly():
    # Video-LLaMA's llama_v2_video_conversation (system " ", video_instruct_dataset.py:31-39) through
    # SeparatorStyle.LLAMA_2 (conversation_video.py:63-84): '<s>' from the tokenizer, then
    # "[INST] <<SYS>>\n \n<</SYS>>\n\n{q0} [/INST] {a0} </s><s>[INST] {q1} [/INST] {a1} </s>"
    ids, labels = tokenize_conversation(TWO_TURNS, _CharTokenizer(), get_template("videollama_llama_2"), 2)
    assert _rendered(ids) == (
        "<BOS>[INST] <<SYS>>\n \n<</SYS>>\n\n<VID><VID>\nWhat instrument is played? [/INST] An electric guitar. "
        "</s><s>[INST] Where is this? [/INST] In a music studio. </s>")
    trained = "".join(chr(t) for t, label in zip(ids, labels) if label != IGNORE_INDEX)
    assert trained == " An electric guitar. </s> In a music studio. </s>"


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    for name, header in (("chatml", "<|im_end|>\n<|im_start|>assistant\n"), ("phi3", "<|end|>\n<|assistant|>\n"),
                         ("vicuna_v1", "ASSISTANT:"), ("tokenizer", "<|im_start|>assistant\n")):
        ids, labels = tokenize_conversation(TWO_TURNS[:2], tokenizer, get_template(name), 2, for_generation=True)
        assert tokenizer.decode([t for t in ids if t >= 0]).endswith(header), name
        assert set(labels) == {IGNORE_INDEX}


def test_turns_must_alternate(tokenizer):
    with pytest.raises(ValueError, match=r"conversations\[1\].from: expected 'gpt'"):
        tokenize_conversation([TWO_TURNS[0], TWO_TURNS[2]], tokenizer, get_template("chatml"), 1)
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("alpaca")
