"""Answer metrics that need no judge model: exact match and token F1 after SQuAD normalisation.

Video-ChatGPT scores open answers with a paid GPT judge; these are the free, deterministic baseline every run gets.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed (SQuAD v1.1 evaluate.py)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall of the normalised strings, in [0, 1] (1.0 when both are empty)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(pairs: list[tuple[str, str]]) -> dict:
    """Mean ``exact_match`` and ``token_f1`` over ``(prediction, reference)`` pairs, and their ``count``."""
    count = len(pairs)
    return {
        "count": count,
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / count if count else 0.0,
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / count if count else 0.0,
    }
