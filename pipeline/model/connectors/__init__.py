"""Connectors (LLaVA's ``mm_projector``): one visual's vision tokens -> the n LLM embeddings that take its place.

One interface (:class:`~pipeline.model.connectors.base.Connector`), one module per family:
:mod:`~pipeline.model.connectors.mlp` (``linear``, ``mlp2x_gelu``: row by row, n = rows),
:mod:`~pipeline.model.connectors.tome` (``tome16_mlp_hd64``, VideoChat-Flash's token merging: n = 16 a frame),
:mod:`~pipeline.model.connectors.video_qformer` (``video_qformer``, Video-LLaMA's video Q-Former over the image
Q-Former's 32 tokens a frame: n = 32 a video) and :mod:`~pipeline.model.connectors.etchat_qformer`
(``etchat_qformer``, E.T. Chat's question-conditioned Q-Former and aggregator: n = one a frame).
The dataset, the length fitting of records and generation ask the connector for n
(:meth:`~pipeline.model.connectors.base.Connector.num_tokens`); nothing assumes n equals the cached rows.
"""

from __future__ import annotations

CONNECTORS = ("linear", "mlp2x_gelu", "tome16_mlp_hd64", "video_qformer", "etchat_qformer")


def _connector_class(kind: str):
    """The class of ``kind``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "linear":
        from pipeline.model.connectors.mlp import LinearConnector

        return LinearConnector
    if kind == "mlp2x_gelu":
        from pipeline.model.connectors.mlp import MLPConnector

        return MLPConnector
    if kind == "tome16_mlp_hd64":
        from pipeline.model.connectors.tome import ToMeConnector

        return ToMeConnector
    if kind == "video_qformer":
        from pipeline.model.connectors.video_qformer import VideoQFormerConnector

        return VideoQFormerConnector
    if kind == "etchat_qformer":
        from pipeline.model.connectors.etchat_qformer import ETChatQFormerConnector

        return ETChatQFormerConnector
    raise ValueError(f"unknown connector (mm_projector_type) {kind!r}; known: {CONNECTORS}")


def connector_parts(kind: str) -> tuple[str, ...]:
    """The parts of a ``kind`` connector a stage can train separately (its ``PARTS``), without building one.

    Raises:
        ValueError: unknown ``kind``.
    """
    return _connector_class(kind).PARTS


def connector_settings(settings: dict | None) -> dict:
    """The settings :func:`build_connector` takes, from a config's ``model.connector``: ``tokenizer`` (the question
    tokenizer of ``etchat_qformer``, read by :func:`pipeline.model.qformer.qformer_tokenizer`) becomes the
    Q-Former's ``vocab_size``, its length with ``[DEC]`` (E.T. Chat resizes the embeddings to it,
    ``etchat/model/etchat_arch.py:48``); ``bert-base-uncased`` is known to give 30523 and is not read. The others
    pass through. Idempotent.

    Raises:
        ValueError: ``vocab_size`` given and not the tokenizer's length.
    """
    settings = dict(settings or {})
    if "tokenizer" not in settings:
        return settings
    from pipeline.model.qformer import BERT_BASE, INSTRUCTBLIP_VOCAB, qformer_tokenizer

    name = str(settings.pop("tokenizer"))
    size = INSTRUCTBLIP_VOCAB if name in (BERT_BASE, f"google-bert/{BERT_BASE}") else len(qformer_tokenizer(name))
    if settings.setdefault("vocab_size", size) != size:
        raise ValueError(f"connector: vocab_size {settings['vocab_size']} but the tokenizer {name} has {size} tokens")
    return settings


def build_connector(kind: str, in_dim: int, out_dim: int, settings: dict | None = None):
    """A connector of ``kind`` (one of :data:`CONNECTORS`) from ``in_dim``-wide vision tokens to ``out_dim``
    (the LLM's hidden size), with the parameter names of the original checkpoints (so that LLaVA's, Video-ChatGPT's
    and VideoChat-Flash's released ``mm_projector`` weights load; the Q-Former connectors read their released
    ``.pth`` files with ``load_original``). Random weights are drawn from the global torch random state.

    Args:
        settings: the connector's own settings (``model.connector``, through :func:`connector_settings`;
            ``tokenizer`` is resolved here too); None or ``{}``: the original's. ``video_qformer``:
            :attr:`~pipeline.model.connectors.video_qformer.VideoQFormerConnector.DEFAULTS`; ``etchat_qformer``:
            :attr:`~pipeline.model.connectors.etchat_qformer.ETChatQFormerConnector.DEFAULTS`; the others take none.

    Raises:
        ValueError: unknown ``kind`` or setting.
    """
    cls = _connector_class(kind)
    settings = connector_settings(settings)
    if kind in ("video_qformer", "etchat_qformer"):
        return cls(in_dim, out_dim, settings)
    if settings:
        raise ValueError(f"connector {kind} takes no settings; got {sorted(settings)}")
    return cls(in_dim, out_dim)
