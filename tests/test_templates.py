import pytest

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.templates import get_template, tokenize_conversation

TWO_TURNS = [
    {"from": "human", "value": "<video>\nWhat instrument is played?"},
    {"from": "gpt", "value": "An electric guitar."},
    {"from": "human", "value": "Where is this?"},
    {"from": "gpt", "value": "In a music studio."},
]


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


def test_chatml_two_turn_label_mask_token_by_token(tokenizer):
    template = get_template("chatml")
    ids, labels = tokenize_conversation(TWO_TURNS, tokenizer, template, num_video_tokens=3)
    assert len(ids) == len(labels)
    # every trained position predicts exactly its own token (labels are ids, shifted inside the model)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert _trained_spans(ids, labels) == [encode("An electric guitar.") + [end], encode("In a music studio.") + [end]]
    # the video sits in the first user turn, 3 positions, never trained
    video = [i for i, t in enumerate(ids) if t == VIDEO_TOKEN_INDEX]
    assert len(video) == 3 and video == list(range(video[0], video[0] + 3))
    assert all(labels[i] == IGNORE_INDEX for i in video)
    # with the video positions replaced by the text marker, the ids are those of the whole rendered conversation
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": template.system}]
        + [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in TWO_TURNS],
        tokenize=False,
    )
    before, after = text.split("<video>")
    assert ids[: video[0]] == encode(before)
    assert ids[video[-1] + 1:] == encode(after.rstrip("\n"))


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    template = get_template("chatml")
    ids, labels = tokenize_conversation(TWO_TURNS[:2], tokenizer, template, 2, for_generation=True)
    assert tokenizer.decode([t for t in ids if t >= 0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert set(labels) == {IGNORE_INDEX}


def test_vicuna_v1_trains_answers_and_eos(tokenizer):
    ids, labels = tokenize_conversation(TWO_TURNS[:2], tokenizer, get_template("vicuna_v1"), 1)
    assert ids[0] == tokenizer.bos_token_id
    trained = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " An electric guitar.</s>"


def test_turns_must_alternate(tokenizer):
    with pytest.raises(ValueError, match=r"conversations\[1\].from: expected 'gpt'"):
        tokenize_conversation([TWO_TURNS[0], TWO_TURNS[2]], tokenizer, get_template("chatml"), 1)
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("alpaca")
