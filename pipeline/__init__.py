"""A staged data and training pipeline for LLaVA-style video-LLMs.

Every stage is a module with a ``main`` run by a thin Snakemake rule as ``python -m pipeline.<module>``.
"""

from __future__ import annotations

import logging
import os

IGNORE_INDEX = -100
"""Label value the loss ignores (``torch.nn.CrossEntropyLoss`` default): prompts, padding, video positions."""

VIDEO_TOKEN = "<video>"
"""Marker in a human turn where the video's feature tokens go (Video-ChatGPT, Video-LLaMA convention)."""

VIDEO_TOKEN_INDEX = -200
"""Placeholder token id of a video feature position in ``input_ids`` (LLaVA's ``IMAGE_TOKEN_INDEX`` idea)."""


class PipelineError(Exception):
    """An error whose message says all a user needs (what failed, which file, what to do): a command ends with
    that message, not a traceback (:func:`pipeline.cli.run`)."""


def configure_logging() -> None:
    """Log INFO and above to stderr with time, level and module; ``PIPELINE_LOG_LEVEL`` overrides the level."""
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
