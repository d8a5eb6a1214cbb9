"""An LLM judge for open-ended answers, as Video-ChatGPT's ``quantitative_evaluation`` scripts use GPT-3.5: the
judges we run ourselves (a local Hugging Face causal LM, or any OpenAI-compatible server such as vLLM), Video-ChatGPT's
prompts, a cache of every reply, and a strict reader of the replies.

Sources. ``VCGPT`` below is github.com/mbzuai-oryx/Video-ChatGPT at commit 659e04b2 (2025-03-29); a citation
``VCGPT quantitative_evaluation/evaluate_activitynet_qa.py:N`` is line N of that file. The six prompts
(:data:`TEMPLATES`) are copied verbatim from those scripts (system and user messages, including upstream's string
concatenations without spaces and its ``{''score': 4.8}`` typo): they are facts of the benchmark.

Upstream vs. here:

- Upstream sends each pair to ``gpt-3.5-turbo`` (evaluate_activitynet_qa.py:33-60) and reads the reply with
  ``ast.literal_eval`` of the whole message (:63); a reply that does not parse raises, nothing is saved and its
  ``while True`` loop (:125-151) asks again until every pair has a parseable reply. Here a judge is greedy (HF) or
  temperature 0 (server), so asking again gives the same reply: a malformed reply is recorded, counted by reason
  (:data:`MALFORMED_REASONS`) and scored as "no" / 0 by the benchmark modules, never crashed on.
- The reply is read without evaluating code: the first ``{...}`` (no nesting, at most 2000 characters) is read as
  JSON, else with ``ast.literal_eval`` only after ``ast.parse`` showed it is a dict display. Surrounding text is
  tolerated (upstream would reject it and ask again).
- ``score`` is truncated to an integer as upstream does (``int(score_match)``, evaluate_activitynet_qa.py:179), after
  checking it is a number (or a numeral string) in 0..5; ``pred`` is "yes" when it contains "yes", else "no" when it
  contains "no" (upstream's substring test, :183-187); a ``pred`` with neither is malformed.

Cache. :class:`JudgeCache` is an append-only JSON-lines file, one reply per line, keyed by the SHA-256 of (the
request's fields, the judge's key, the template's id and text). JSON lines over sqlite: the file is plain text that
can be read, grepped, merged (``cat``) and copied between clusters; appending a line and flushing it is the only
write, so a killed run loses at most the line being written (a torn last line is ignored on reading), and no
database lock is held across a network file system. A different judge or template makes a different key, so its
entries sit beside the old ones, never over them. Only replies are cached: a request that failed (HTTP error,
timeout) is not, so a rerun asks again. The API key is never part of a key, an entry or a message.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

UPSTREAM = "VCGPT (github.com/mbzuai-oryx/Video-ChatGPT@659e04b2) quantitative_evaluation"

# Malformed-judgment reasons (the keys of the ``malformed`` counts).
REQUEST_FAILED = "request failed"
NO_DICT = "no parseable dict"
MISSING_PRED = "missing pred"
BAD_PRED = "pred neither yes nor no"
MISSING_SCORE = "missing score"
BAD_SCORE = "score not a number"
SCORE_RANGE = "score outside 0-5"
MALFORMED_REASONS = (REQUEST_FAILED, NO_DICT, MISSING_PRED, BAD_PRED, MISSING_SCORE, BAD_SCORE, SCORE_RANGE)

_MAX_DICT_CHARS = 2000
_DICT = re.compile(r"\{[^{}]{0,%d}\}" % _MAX_DICT_CHARS)
_FIELD = re.compile(r"\{(question|answer|pred|question_2|pred_2)\}")


# ---------------------------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Template:
    """One judge prompt: a system message and a user message with ``{question}``, ``{answer}``, ``{pred}`` (and, for
    consistency, ``{question_2}``, ``{pred_2}``) slots.

    Attributes:
        id: a stable name (part of the cache key with the text itself).
        system: the system message, verbatim from upstream.
        user: the user message; only the slots above are substituted (in one pass, so a prediction that contains
            ``{answer}`` is not substituted again), every other brace is literal.
        yes_no: whether the reply must carry ``pred`` (yes/no) besides ``score`` (the zero-shot QA prompt).
        source: upstream file:lines of the prompt.
    """

    id: str
    system: str
    user: str
    yes_no: bool
    source: str

    def messages(self, fields: dict[str, str]) -> list[dict[str, str]]:
        """The chat messages ``[{"role": "system", ...}, {"role": "user", ...}]`` for ``fields``.

        Raises:
            KeyError: a slot of the template is missing from ``fields``.
        """
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": _FIELD.sub(lambda m: str(fields[m.group(1)]), self.user)}]

    def fingerprint(self) -> str:
        """The template's identity in cache keys: its id and both texts."""
        return json.dumps([self.id, self.system, self.user, self.yes_no])


_PAIR = ("Please evaluate the following video-based question-answer pair:\n\n"
         "Question: {question}\n"
         "Correct Answer: {answer}\n"
         "Predicted Answer: {pred}\n\n")
_ONLY_DICT = ("DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. ")
_SCORE_EXAMPLE = "For example, your response should look like this: {''score': 4.8}."

TEMPLATES: dict[str, Template] = {
    # VCGPT quantitative_evaluation/evaluate_activitynet_qa.py:36-58
    "qa": Template(
        id="vcgpt.qa",
        system=(
            "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
            "question-answer pairs. "
            "Your task is to compare the predicted answer with the correct answer and determine if they match "
            "meaningfully. Here's how you can accomplish the task:"
            "------"
            "##INSTRUCTIONS: "
            "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
            "- Consider synonyms or paraphrases as valid matches.\n"
            "- Evaluate the correctness of the prediction compared to the answer."
        ),
        user=(
            _PAIR
            + "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
            "with 5 indicating the highest meaningful match. "
            "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
            "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
            + _ONLY_DICT
            + "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
        ),
        yes_no=True,
        source="evaluate_activitynet_qa.py:36-58",
    ),
    # VCGPT quantitative_evaluation/evaluate_benchmark_1_correctness.py:36-59
    "correctness": Template(
        id="vcgpt.correctness",
        system=(
            "You are an intelligent chatbot designed for evaluating the factual accuracy of generative outputs for "
            "video-based question-answer pairs. "
            "Your task is to compare the predicted answer with the correct answer and determine if they are factually "
            "consistent. Here's how you can accomplish the task:"
            "------"
            "##INSTRUCTIONS: "
            "- Focus on the factual consistency between the predicted answer and the correct answer. The predicted "
            "answer should not contain any misinterpretations or misinformation.\n"
            "- The predicted answer must be factually accurate and align with the video content.\n"
            "- Consider synonyms or paraphrases as valid matches.\n"
            "- Evaluate the factual accuracy of the prediction compared to the answer."
        ),
        user=(
            _PAIR
            + "Provide your evaluation only as a factual accuracy score where the factual accuracy score is an integer "
            "value between 0 and 5, with 5 indicating the highest level of factual consistency. "
            "Please generate the response in the form of a Python dictionary string with keys 'score', where its value "
            "is the factual accuracy score in INTEGER, not STRING."
            + _ONLY_DICT + _SCORE_EXAMPLE
        ),
        yes_no=False,
        source="evaluate_benchmark_1_correctness.py:36-59",
    ),
    # VCGPT quantitative_evaluation/evaluate_benchmark_2_detailed_orientation.py:36-59
    "detail": Template(
        id="vcgpt.detail",
        system=(
            "You are an intelligent chatbot designed for evaluating the detail orientation of generative outputs for "
            "video-based question-answer pairs. "
            "Your task is to compare the predicted answer with the correct answer and determine its level of detail, "
            "considering both completeness and specificity. Here's how you can accomplish the task:"
            "------"
            "##INSTRUCTIONS: "
            "- Check if the predicted answer covers all major points from the video. The response should not leave out "
            "any key aspects.\n"
            "- Evaluate whether the predicted answer includes specific details rather than just generic points. It "
            "should provide comprehensive information that is tied to specific elements of the video.\n"
            "- Consider synonyms or paraphrases as valid matches.\n"
            "- Provide a single evaluation score that reflects the level of detail orientation of the prediction, "
            "considering both completeness and specificity."
        ),
        user=(
            _PAIR
            + "Provide your evaluation only as a detail orientation score where the detail orientation score is an "
            "integer value between 0 and 5, with 5 indicating the highest level of detail orientation. "
            "Please generate the response in the form of a Python dictionary string with keys 'score', where its value "
            "is the detail orientation score in INTEGER, not STRING."
            + _ONLY_DICT + _SCORE_EXAMPLE
        ),
        yes_no=False,
        source="evaluate_benchmark_2_detailed_orientation.py:36-59",
    ),
    # VCGPT quantitative_evaluation/evaluate_benchmark_3_context.py:36-59
    "context": Template(
        id="vcgpt.context",
        system=(
            "You are an intelligent chatbot designed for evaluating the contextual understanding of generative outputs "
            "for video-based question-answer pairs. "
            "Your task is to compare the predicted answer with the correct answer and determine if the generated "
            "response aligns with the overall context of the video content. Here's how you can accomplish the task:"
            "------"
            "##INSTRUCTIONS: "
            "- Evaluate whether the predicted answer aligns with the overall context of the video content. It should "
            "not provide information that is out of context or misaligned.\n"
            "- The predicted answer must capture the main themes and sentiments of the video.\n"
            "- Consider synonyms or paraphrases as valid matches.\n"
            "- Provide your evaluation of the contextual understanding of the prediction compared to the answer."
        ),
        user=(
            _PAIR
            + "Provide your evaluation only as a contextual understanding score where the contextual understanding "
            "score is an integer value between 0 and 5, with 5 indicating the highest level of contextual "
            "understanding. "
            "Please generate the response in the form of a Python dictionary string with keys 'score', where its value "
            "is contextual understanding score in INTEGER, not STRING."
            + _ONLY_DICT + _SCORE_EXAMPLE
        ),
        yes_no=False,
        source="evaluate_benchmark_3_context.py:36-59",
    ),
    # VCGPT quantitative_evaluation/evaluate_benchmark_4_temporal.py:36-58
    "temporal": Template(
        id="vcgpt.temporal",
        system=(
            "You are an intelligent chatbot designed for evaluating the temporal understanding of generative outputs "
            "for video-based question-answer pairs. "
            "Your task is to compare the predicted answer with the correct answer and determine if they correctly "
            "reflect the temporal sequence of events in the video content. Here's how you can accomplish the task:"
            "------"
            "##INSTRUCTIONS: "
            "- Focus on the temporal consistency between the predicted answer and the correct answer. The predicted "
            "answer should correctly reflect the sequence of events or details as they are presented in the video "
            "content.\n"
            "- Consider synonyms or paraphrases as valid matches, but only if the temporal order is maintained.\n"
            "- Evaluate the temporal accuracy of the prediction compared to the answer."
        ),
        user=(
            _PAIR
            + "Provide your evaluation only as a temporal accuracy score where the temporal accuracy score is an "
            "integer value between 0 and 5, with 5 indicating the highest level of temporal consistency. "
            "Please generate the response in the form of a Python dictionary string with keys 'score', where its value "
            "is the temporal accuracy score in INTEGER, not STRING."
            + _ONLY_DICT + _SCORE_EXAMPLE
        ),
        yes_no=False,
        source="evaluate_benchmark_4_temporal.py:36-58",
    ),
    # VCGPT quantitative_evaluation/evaluate_benchmark_5_consistency.py:38-64
    "consistency": Template(
        id="vcgpt.consistency",
        system=(
            "You are an intelligent chatbot designed for evaluating the consistency of generative outputs for similar "
            "video-based question-answer pairs. "
            "You will be given two very similar questions, a common answer common to both the questions and predicted "
            "answers for the two questions ."
            "Your task is to compare the predicted answers for two very similar question, with a common correct answer "
            "and determine if they are consistent. Here's how you can accomplish the task:"
            "------"
            "##INSTRUCTIONS: "
            "- Focus on the consistency between the two predicted answers and the correct answer. Both predicted "
            "answers should correspond to the correct answer and to each other, and should not contain any "
            "contradictions or significant differences in the conveyed information.\n"
            "- Both predicted answers must be consistent with each other and the correct answer, in terms of the "
            "information they provide about the video content.\n"
            "- Consider synonyms or paraphrases as valid matches, but only if they maintain the consistency in the "
            "conveyed information.\n"
            "- Evaluate the consistency of the two predicted answers compared to the correct answer."
        ),
        user=(
            "Please evaluate the following video-based question-answer pair:\n\n"
            "Question 1: {question}\n"
            "Question 2: {question_2}\n"
            "Correct Answer: {answer}\n"
            "Predicted Answer to Question 1: {pred}\n"
            "Predicted Answer to Question 2: {pred_2}\n\n"
            "Provide your evaluation only as a consistency score where the consistency score is an integer value "
            "between 0 and 5, with 5 indicating the highest level of consistency. "
            "Please generate the response in the form of a Python dictionary string with keys 'score', where its value "
            "is the consistency score in INTEGER, not STRING."
            + _ONLY_DICT + _SCORE_EXAMPLE
        ),
        yes_no=False,
        source="evaluate_benchmark_5_consistency.py:38-64",
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Requests, replies, judgments


@dataclass(frozen=True)
class JudgeRequest:
    """One pair to judge.

    Attributes:
        id: the item's id (reported back in its :class:`Judgment`; not part of the cache key).
        template: the prompt.
        fields: ``question``, ``answer`` (the reference), ``pred`` (the model's answer), and for consistency
            ``question_2``, ``pred_2``.
    """

    id: str
    template: Template
    fields: dict[str, str]


@dataclass(frozen=True)
class Reply:
    """What a judge answered for one request: ``text`` (the raw reply) or ``error`` (why none came)."""

    text: str | None
    error: str | None = None


@dataclass
class Judgment:
    """A judged request.

    Attributes:
        id: the request's id.
        pred: ``"yes"``/``"no"`` for a yes/no template, else None.
        score: the integer score in 0..5, None when malformed.
        reply: the judge's raw reply (None when the request failed).
        malformed: None, or the reason (one of :data:`MALFORMED_REASONS`) the reply gives no judgment.
        error: the request's failure (HTTP status, timeout) when ``malformed`` is ``request failed``.
        cached: whether the reply came from the cache.
        parsed: the dict read from the reply, when one was.
    """

    id: str
    pred: str | None
    score: int | None
    reply: str | None
    malformed: str | None = None
    error: str | None = None
    cached: bool = False
    parsed: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Whether the judgment is usable (not malformed and not failed)."""
        return self.malformed is None


def _read_dict(text: str) -> dict | None:
    """The first flat ``{...}`` of ``text`` as a dict (JSON, else a Python dict literal), or None."""
    for match in _DICT.finditer(text):
        literal = match.group(0)
        try:
            value = json.loads(literal)
        except ValueError:
            try:
                node = ast.parse(literal, mode="eval").body
                value = ast.literal_eval(node) if isinstance(node, ast.Dict) else None
            except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
                value = None
        if isinstance(value, dict):
            return value
    return None


def parse_reply(text: str, yes_no: bool) -> tuple[str | None, int | None, str | None, dict | None]:
    """Read a judge's reply: ``(pred, score, malformed reason or None, parsed dict)``.

    ``pred`` follows upstream's substring test (VCGPT quantitative_evaluation/evaluate_activitynet_qa.py:183-187:
    "yes" if it contains "yes", else "no" if it contains "no"); ``score`` is ``int()`` of the value as at :179, after
    checking that it is a real number (not a bool) or a numeral string in 0..5. Nothing in ``text`` is executed.
    """
    parsed = _read_dict(text) if isinstance(text, str) else None
    if parsed is None:
        return None, None, NO_DICT, None
    pred = None
    if yes_no:
        if "pred" not in parsed:
            return None, None, MISSING_PRED, parsed
        raw = parsed["pred"]
        low = raw.lower() if isinstance(raw, str) else ""
        pred = "yes" if "yes" in low else "no" if "no" in low else None
        if pred is None:
            return None, None, BAD_PRED, parsed
    if "score" not in parsed:
        return pred, None, MISSING_SCORE, parsed
    raw = parsed["score"]
    if isinstance(raw, str):
        try:
            raw = float(raw.strip())
        except ValueError:
            return pred, None, BAD_SCORE, parsed
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != raw:
        return pred, None, BAD_SCORE, parsed
    if not 0 <= raw <= 5:
        return pred, None, SCORE_RANGE, parsed
    return pred, int(raw), None, parsed


def count_malformed(judgments: Iterable[Judgment]) -> dict[str, int]:
    """``{reason: count}`` of the malformed judgments (reasons with no case left out), in :data:`MALFORMED_REASONS`
    order."""
    counts = {reason: 0 for reason in MALFORMED_REASONS}
    for judgment in judgments:
        if judgment.malformed is not None:
            counts[judgment.malformed] = counts.get(judgment.malformed, 0) + 1
    return {reason: n for reason, n in counts.items() if n}


# ---------------------------------------------------------------------------------------------------------------
# Judges


class Judge(Protocol):
    """A judge: a name for the cache and a batched chat completion.

    Attributes:
        key: names the judge (kind, where, which model); part of every cache key.
        batch_size: how many requests :func:`judge_items` hands to one :meth:`complete` call.
    """

    key: str
    batch_size: int

    def complete(self, conversations: Sequence[list[dict[str, str]]]) -> list[Reply]:
        """One :class:`Reply` per conversation (a list of ``{"role", "content"}`` messages), in order; failures are
        replies with ``error`` set, not exceptions."""
        ...


class HFJudge:
    """Any local Hugging Face causal LM as judge (``AutoModelForCausalLM`` + ``AutoTokenizer``), greedy.

    The conversation (upstream's system + user messages, VCGPT quantitative_evaluation/evaluate_activitynet_qa.py:35-59)
    goes through the tokenizer's chat template with the generation prompt when it has one, else as
    ``system + "\\n\\n" + user + "\\n"``. Batches are left-padded and generated together.

    Args:
        model_name_or_path: a local folder (or a hub id already in the local cache: nothing is downloaded,
            ``local_files_only=True``).
        max_new_tokens: the longest reply in tokens (upstream's replies are a one-line dict: 32-64 is plenty).
        device: a torch device; default ``cuda`` when available, else ``cpu``.
        batch_size: requests generated together.
        dtype: torch dtype name (``"bfloat16"``, ``"float32"``); default bfloat16 on CUDA, float32 on CPU.

    Raises:
        OSError: the model or tokenizer cannot be loaded.
    """

    def __init__(self, model_name_or_path: str | Path, max_new_tokens: int = 64, device: str | None = None,
                 batch_size: int = 8, dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(model_name_or_path)
        self.key = f"hf:{self.path}"
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, local_files_only=True)
        self.model.to(self.device).eval()

    def _text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n"

    def complete(self, conversations: Sequence[list[dict[str, str]]]) -> list[Reply]:
        """Greedy replies to ``conversations``, generated as one left-padded batch."""
        import torch

        if not conversations:
            return []
        texts = [self._text(messages) for messages in conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        return [Reply(text) for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class OpenAIJudge:
    """Any OpenAI-compatible ``/v1/chat/completions`` server as judge (vLLM on the cluster, or OpenAI itself).

    Requests are sent ``concurrency`` at a time with ``temperature`` (default 0: upstream used the API default,
    VCGPT quantitative_evaluation/evaluate_activitynet_qa.py:33-34). HTTP 408/409/429/5xx, timeouts and connection
    errors are retried ``max_retries`` times, waiting ``backoff_s * 2**attempt`` seconds; what still fails (and any
    other HTTP error) becomes a :class:`Reply` with ``error`` set, never an exception.

    Args:
        base_url: the API root as the OpenAI client takes it (``http://host:8000/v1``); ``/v1`` is appended when the
            URL does not end with it, then ``/chat/completions``.
        model: the served model name (the request's ``model``).
        api_key_env: the environment variable holding the API key, read at each request; when unset or empty no
            ``Authorization`` header is sent (a vLLM server started without ``--api-key``). The key is never stored
            on the object, in the cache, in ``key`` or in error messages.
        timeout_s: seconds per HTTP request.
        max_retries: retries after the first attempt.
        temperature: sampling temperature.
        concurrency: requests in flight at once (also the batch size of :func:`judge_items`).
        backoff_s: the first retry's wait in seconds.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, temperature: float = 0.0, concurrency: int = 8, backoff_s: float = 1.0,
                 max_tokens: int | None = None):
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.temperature = float(temperature)
        self.batch_size = max(1, int(concurrency))
        self.backoff_s = float(backoff_s)
        self.max_tokens = max_tokens
        self.key = f"openai:{self.base_url}:{model}"

    def _once(self, body: bytes) -> tuple[str | None, str | None, bool]:
        """``(text, error, retryable)`` of one HTTP attempt."""
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env or "", "")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            return None, f"HTTP {e.code}", e.code in (408, 409, 429) or e.code >= 500
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            return None, f"{type(e).__name__}: {reason}", True
        except ValueError:
            return None, "response is not JSON", True
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None, "response has no choices[0].message.content", False
        if not isinstance(content, str):
            return None, "message content is not a string", False
        return content, None, False

    def _complete_one(self, messages: list[dict[str, str]]) -> Reply:
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens:
            payload["max_tokens"] = int(self.max_tokens)
        body = json.dumps(payload).encode("utf-8")
        error = None
        for attempt in range(self.max_retries + 1):
            text, error, retryable = self._once(body)
            if error is None:
                return Reply(text)
            if not retryable or attempt == self.max_retries:
                break
            time.sleep(self.backoff_s * 2 ** attempt)
        return Reply(None, error)

    def complete(self, conversations: Sequence[list[dict[str, str]]]) -> list[Reply]:
        """Replies to ``conversations``, ``concurrency`` requests at a time, in order."""
        if len(conversations) <= 1:
            return [self._complete_one(messages) for messages in conversations]
        with ThreadPoolExecutor(max_workers=min(self.batch_size, len(conversations))) as pool:
            return list(pool.map(self._complete_one, conversations))


def judge_key(judge: Judge) -> str:
    """The judge's name in caches and metrics: ``hf:<path>`` or ``openai:<base_url>:<model>``."""
    return judge.key


def check_judge_config(cfg: dict[str, Any]) -> str:
    """Check a judge config without building the judge; returns its ``kind``.

    Shapes (keys beyond ``kind`` go to the constructor):

    - ``{"kind": "hf", "model": PATH, "max_new_tokens": 64, "device": None, "batch_size": 8, "dtype": None}``
    - ``{"kind": "openai", "base_url": URL, "model": NAME, "api_key_env": "OPENAI_API_KEY", "timeout_s": 60,
      "max_retries": 3, "temperature": 0, "concurrency": 8, "backoff_s": 1.0, "max_tokens": None}``

    Raises:
        ValueError: an unknown ``kind``, a missing required key or an unknown key (the message names it; an API
            key given inline as ``api_key`` is refused: name its environment variable in ``api_key_env``).
    """
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if "api_key" in cfg:
        raise ValueError("judge config: 'api_key' is not accepted; name the environment variable in 'api_key_env'")
    if kind == "hf":
        allowed, required = {"model", "max_new_tokens", "device", "batch_size", "dtype"}, {"model"}
    elif kind == "openai":
        allowed = {"base_url", "model", "api_key_env", "timeout_s", "max_retries", "temperature", "concurrency",
                   "backoff_s", "max_tokens"}
        required = {"base_url", "model"}
    else:
        raise ValueError(f"judge config: kind must be 'hf' or 'openai', not {kind!r}")
    if missing := sorted(required - cfg.keys()):
        raise ValueError(f"judge config ({kind}): missing {', '.join(missing)}")
    if unknown := sorted(cfg.keys() - allowed):
        raise ValueError(f"judge config ({kind}): unknown key(s) {', '.join(unknown)}")
    return kind


def judge_from_config(cfg: dict[str, Any]) -> Judge:
    """Build a judge from its config (the shapes of :func:`check_judge_config`).

    Raises:
        ValueError: as :func:`check_judge_config`.
    """
    cfg = dict(cfg)
    kind = check_judge_config(cfg)
    cfg.pop("kind")
    if kind == "hf":
        return HFJudge(cfg.pop("model"), **cfg)
    return OpenAIJudge(**cfg)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def request_key(request: JudgeRequest, key: str) -> str:
    """The cache key of ``request`` for the judge named ``key``: hex SHA-256 of the JSON of (the request's fields,
    the judge's key, the template's id and texts)."""
    material = json.dumps([sorted(request.fields.items()), key, request.template.fingerprint()], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class JudgeCache:
    """Every reply a judge gave, in an append-only JSON-lines file (see the module's docstring for why).

    Each line is ``{"key", "judge", "template", "reply"}`` (``key`` from :func:`request_key`). Reading keeps the
    first entry of a key (the file is only appended to, so a second one is a duplicate from a concurrent run) and
    skips a torn or unreadable line. ``path=None`` keeps the cache in memory only.

    Args:
        path: the file (created with its folder on the first write).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.skipped_lines = 0
        if self.path is not None and self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self._entries.setdefault(entry["key"], entry)
                    except (ValueError, KeyError, TypeError):
                        self.skipped_lines += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> str | None:
        """The cached reply text for ``key``, or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry.get("reply")

    def entries(self) -> list[dict[str, Any]]:
        """All entries, in file order."""
        return list(self._entries.values())

    def put(self, key: str, reply: str, judge: str, template: str) -> None:
        """Append one reply (a no-op when ``key`` is already there); the line is flushed and fsynced before
        returning, so a killed process (or a crashed node) loses at most the line being written.

        Raises:
            OSError: the file cannot be written.
        """
        with self._lock:
            if key in self._entries:
                return
            entry = {"key": key, "judge": judge, "template": template, "reply": reply}
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    if f.tell() > 0 and not self._ends_with_newline():
                        f.write("\n")  # after a torn last line: keep ours on a line of its own
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self._entries[key] = entry

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


# ---------------------------------------------------------------------------------------------------------------
# Judging


def judge_items(judge: Judge, cache: JudgeCache | None, requests: Sequence[JudgeRequest]) -> list[Judgment]:
    """Judge ``requests``: cached replies are reused, the rest sent to ``judge`` in batches of ``judge.batch_size``
    (identical requests once), each reply appended to ``cache`` as its batch returns.

    Returns:
        one :class:`Judgment` per request, in order; a failed request or a malformed reply is a judgment with
        ``malformed`` set (count them with :func:`count_malformed`), never an exception.

    Raises:
        KeyError: a request lacks a field its template needs.
        OSError: the cache file cannot be written.
    """
    cache = cache if cache is not None else JudgeCache(None)
    name = judge_key(judge)
    keys = [request_key(request, name) for request in requests]
    todo: dict[str, JudgeRequest] = {}
    for key, request in zip(keys, requests):
        if key not in cache and key not in todo:
            todo[key] = request
    failures: dict[str, str] = {}
    pending = list(todo.items())
    size = max(1, int(getattr(judge, "batch_size", 1)))
    for start in range(0, len(pending), size):
        chunk = pending[start:start + size]
        replies = judge.complete([request.template.messages(request.fields) for _, request in chunk])
        for (key, request), reply in zip(chunk, replies):
            if reply.error is None and reply.text is not None:
                cache.put(key, reply.text, name, request.template.id)
            else:
                failures[key] = reply.error or "no reply"
    fresh = set(todo)
    judgments = []
    for key, request in zip(keys, requests):
        if key in failures:
            judgments.append(Judgment(request.id, None, None, None, REQUEST_FAILED, failures[key]))
            continue
        text = cache.get(key) or ""
        pred, score, malformed, parsed = parse_reply(text, request.template.yes_no)
        judgments.append(Judgment(request.id, pred, score, text, malformed, None, key not in fresh, parsed))
    return judgments
