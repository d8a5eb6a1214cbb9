"""lmms-eval's model for a trained stage: lmms-eval's own tasks answered by :class:`.generate.StageAnswerer`.

    .venv-eval/bin/lmms-eval --model video_llm --tasks TASK \\
        --model_args stage=results/train/<stage>,index=results/features/index.tsv

lmms-eval pins ``av<16`` (we use PyAV 18), so it lives in its own venv (``make eval-env``); this module imports
lmms-eval and is importable there only. lmms-eval finds the model through the ``lmms_eval.models`` entry point
``video_llm = "pipeline.eval.lmms_eval_model:MANIFEST"`` of our package.

A stage reads its videos as the pipeline prepared them: the features of the index (cached stages) or the compressed
videos of the videos' index (online stages), by manifest ``video_id``. A task's ``doc_to_visual`` gives video paths;
a path names the video whose id is its file name without the extension (as the pipeline names its files:
``<video_id>.mp4``), so a task over a benchmark's videos is answered once these went through the pipeline's data
rules (DESIGN: a benchmark is a dataset). A doc whose video the stage's source lacks, or whose visual is not a path
(an image), is answered with ``""`` and a warning naming it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from pipeline.eval.generate import GenerationSettings, StageAnswerer

log = logging.getLogger(__name__)

MANIFEST = ModelManifest(model_id="video_llm", simple_class_path=f"{__name__}.StageModel")


def video_id(visual: object) -> str | None:
    """The manifest ``video_id`` a task's visual names (its file name without the extension), or None when the
    visual is not a path (a PIL image, an audio array)."""
    return Path(visual).stem if isinstance(visual, (str, Path)) else None


def settings_of(gen_kwargs: dict, batch_size: int) -> GenerationSettings:
    """The :class:`GenerationSettings` of a request's ``gen_kwargs`` (lmms-eval's ``generation_kwargs``:
    ``max_new_tokens``, default 32; ``do_sample``, ``temperature``, ``top_p``; temperature 0 is greedy)."""
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
    return GenerationSettings(max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)), do_sample=sample,
                              temperature=temperature if sample else 1.0,
                              top_p=float(gen_kwargs.get("top_p") or 1.0), batch_size=batch_size)


def cut_at(text: str, until: list[str] | str | None) -> str:
    """``text`` up to the first of the stop strings ``until``, stripped."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


class StageModel(lmms):
    """A trained stage as an lmms-eval model (``--model video_llm``), generating on a GPU in bfloat16 when one is
    available, else on the CPU in float32.

    Args (``--model_args``, and lmms-eval's ``--batch_size``):
        stage: the stage's folder (``results/train/<stage>``, holding ``model/``) or its ``model/`` folder.
        index: the features index (cached stages).
        videos: the compressed videos' index (online stages).
        batch_size: questions generated at once.
        device, max_batch_size: lmms-eval's ``--device`` and ``--max_batch_size``, ignored: the stage takes the GPU
            when there is one, and batches of ``batch_size``.

    Raises:
        ValueError: the index the stage's vision needs is not given.
        TypeError: an unknown model argument.
    """

    def __init__(self, stage: str, index: str | None = None, videos: str | None = None, batch_size: int | str = 1,
                 device: str | None = None, max_batch_size: int | None = None) -> None:
        super().__init__()
        folder = Path(stage)
        self.answerer = StageAnswerer(folder / "model" if (folder / "model").is_dir() else folder, index, videos)
        self.batch_size = int(batch_size)

    def generate_until(self, requests) -> list[str]:
        """The answers to ``requests`` (``Instance`` objects whose ``args`` are ``(context, gen_kwargs,
        doc_to_visual, doc_id, task, split)``), in order: each context is asked after its doc's videos (``<video>``
        markers before it), cut at the first of ``gen_kwargs["until"]``."""
        answers = [""] * len(requests)
        groups: dict[str, list[tuple[int, dict]]] = {}
        for position, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            ids = [video_id(visual) for visual in visuals]
            if None in ids or any(name not in self.answerer for name in ids):
                log.warning("%s/%s doc %s: answered '': visuals %s are not videos of the stage's source", task, split,
                            doc_id, [str(v) if isinstance(v, (str, Path)) else type(v).__name__ for v in visuals])
                continue
            fields = {"videos": ids} if len(ids) > 1 else {"video": ids[0]} if ids else {}
            record = {"id": f"{task}/{split}/{doc_id}", **fields,
                      "conversations": [{"from": "human", "value": "<video>\n" * len(ids) + context}]}
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append((position, record))
        for key, group in groups.items():
            gen_kwargs = json.loads(key)
            texts = self.answerer.answer([record for _, record in group], settings_of(gen_kwargs, self.batch_size))
            for (position, _), text in zip(group, texts):
                answers[position] = cut_at(text, gen_kwargs.get("until"))
        return answers

    def loglikelihood(self, requests):
        """Not implemented: a stage answers by generation only (lmms-eval tasks of ``output_type:
        generate_until``)."""
        raise NotImplementedError("video_llm: loglikelihood is not implemented; use tasks whose output_type is "
                                  "generate_until")

    def generate_until_multi_round(self, requests):
        """Not implemented: a stage answers single-round questions only."""
        raise NotImplementedError("video_llm: multi-round generation is not implemented")
