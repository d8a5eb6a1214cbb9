"""The video-LLM: any Hugging Face causal LM, a connector (``mm_projector``) and, for online vision, the vision
tower that feeds it.

The positions of ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the connector's output for the batch's visuals in
order (LLaVA's ``prepare_inputs_labels_for_multimodal``, without re-deriving labels: the dataset already masks those
positions). The visuals come as cached tokens (``video_features`` with each visual's ``(T, S)`` layout) or as
frames (``pixel_values``, run through ``vision_tower`` inside the step). Tokens a recipe adds to the vocabulary
(Video-ChatGPT's ``<vid_start>``/``<vid_end>``) get their own small embedding table, ``extra_embeddings``, so that
training them never touches the LLM's embedding matrix. A question-conditioned connector (E.T. Chat's Q-Former)
gets each visual's question tokens (``query_input_ids``, ``query_attention_mask``). With a
:class:`~pipeline.model.matching.MatchingHead` (E.T. Chat's timestamp matching) the model predicts ``<vid>`` and
matches it against the frames. A stage's folder on disk is :mod:`pipeline.model.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
from torch import nn

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX

log = logging.getLogger(__name__)


def attention_implementation() -> str:
    """``flash_attention_2`` when the flash-attn package is installed and CUDA is available, else ``sdpa``."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class VideoLLM(nn.Module):
    """A causal LM with a connector (``mm_projector``) and optionally a vision tower.

    Args:
        llm: a ``transformers`` causal LM (or a PEFT model wrapping one).
        mm_projector: a :class:`~pipeline.model.connectors.base.Connector` from the vision tokens to the LLM.
        extra_embeddings: embeddings of the tokens added to the vocabulary, ids ``base_vocab`` and up.
        base_vocab: the tokenizer's size before tokens were added.
        vision_tower: a :class:`~pipeline.vision.tower.VisionTower` for batches of ``pixel_values`` (online
            vision); None: the batches carry cached ``video_features``.
        matching: E.T. Chat's :class:`~pipeline.model.matching.MatchingHead`, or None.
    """

    def __init__(self, llm: nn.Module, mm_projector: nn.Module, extra_embeddings: nn.Embedding | None = None,
                 base_vocab: int | None = None, vision_tower: nn.Module | None = None,
                 matching: nn.Module | None = None):
        super().__init__()
        self.llm = llm
        self.mm_projector = mm_projector
        self.extra_embeddings = extra_embeddings
        self.base_vocab = base_vocab
        self.vision_tower = vision_tower
        self.matching = matching

    @property
    def config(self):
        """The LLM's config (the HF Trainer reads it)."""
        return self.llm.config

    def vision_tokens(self, pixel_values: torch.Tensor, visual_frames: torch.Tensor
                      ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Run the tower on each visual's frames.

        Args:
            pixel_values: ``(sum T_i, 3, H, W)`` uint8 frames of the batch's visuals, in order.
            visual_frames: ``(K,)`` int64, T_i.

        Returns:
            ``(sum T'_i * S, D)`` tokens in the tower's dtype and each visual's ``(T'_i, S)``; no gradient when
            the tower is frozen.
        """
        from pipeline.features.encoder import normalize

        tower = self.vision_tower
        trains = any(p.requires_grad for p in tower.parameters())
        counts = visual_frames.tolist()
        with contextlib.nullcontext() if trains and torch.is_grad_enabled() else torch.no_grad():
            if tower.clip_frames == 1 and counts:  # frames are independent: one pass for the whole batch
                tokens = tower(normalize(pixel_values, tower))
                parts = tokens.split([tower.out_frames(t) for t in counts])
            else:
                parts = [tower(normalize(frames, tower)) for frames in pixel_values.split(counts)]
        layouts = [(part.shape[0], part.shape[1]) for part in parts]
        dim = tower.dim
        rows = torch.cat([part.reshape(-1, dim) for part in parts]) if parts else pixel_values.new_zeros(
            (0, dim), dtype=next(tower.parameters()).dtype)
        return rows, layouts

    def embed(self, input_ids: torch.Tensor, video_features: torch.Tensor | None = None,
              visual_layout: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
              visual_frames: torch.Tensor | None = None, query_input_ids: torch.Tensor | None = None,
              query_attention_mask: torch.Tensor | None = None, vid_frames: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Input embeddings with the connector's output at the ``VIDEO_TOKEN_INDEX`` positions.

        Args:
            input_ids: ``(B, L)`` int64.
            video_features: ``(sum N_i, D)`` cached rows of the batch's visuals; or
            pixel_values, visual_frames: their frames (:meth:`vision_tokens`).
            visual_layout: ``(K, 2)`` int64, each visual's ``(T, S)`` (cached rows; ignored with frames).
            query_input_ids, query_attention_mask: ``(K, Lq)`` int64, each visual's question in the
                connector's tokenizer (question-conditioned connectors only).
            vid_frames: ``(M,)`` int64, the frame of each ``<vid>`` (matching only, :meth:`MatchingHead.inject`).

        Returns:
            ``(B, L, hidden_size)`` in the embedding dtype.

        Raises:
            ValueError: the number of video positions differs from the connector's output.
        """
        is_video = input_ids == VIDEO_TOKEN_INDEX
        is_extra = input_ids >= self.base_vocab if self.extra_embeddings is not None else None
        base_ids = input_ids.masked_fill(is_video, 0)
        if is_extra is not None:
            base_ids = base_ids.masked_fill(is_extra, 0)
        embeds = self.llm.get_input_embeddings()(base_ids)
        if is_extra is not None and is_extra.any():
            extra = self.extra_embeddings(input_ids[is_extra] - self.base_vocab).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_extra.unsqueeze(-1), extra)
        if pixel_values is not None:
            video_features, layouts = self.vision_tokens(pixel_values, visual_frames)
        elif visual_layout is not None:
            layouts = [tuple(layout) for layout in visual_layout.tolist()]
        else:  # rows without layouts: one visual of pooled rows (row-wise connectors only)
            layouts = [(0, 0)] if video_features is not None and len(video_features) else []
        count = int(is_video.sum())
        if video_features is None:
            if count:
                raise ValueError(f"{count} video positions in input_ids but no visual inputs")
            return embeds
        # zero rows too (text-only batch): the connector stays in the step's graph
        weight = next(self.mm_projector.parameters())
        queries = (query_input_ids, query_attention_mask) if query_input_ids is not None else None
        if getattr(self.mm_projector, "needs_query", False):
            projected = self.mm_projector.project(video_features.to(weight.dtype), layouts, queries)
        else:
            projected = self.mm_projector.project(video_features.to(weight.dtype), layouts)
        projected = projected.to(embeds.dtype)
        if count != len(projected):
            raise ValueError(f"{count} video positions in input_ids but the connector gives {len(projected)} "
                             "embeddings")
        embeds = embeds.masked_scatter(is_video.unsqueeze(-1), projected)
        if self.matching is not None:
            embeds = self.matching.inject(embeds, input_ids, vid_frames)
        return embeds

    def _frame_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype):
        """The attention mask to pass the LLM: the 2D one, or with bidirectional frames their 4D mask (boolean for
        SDPA, additive for eager attention).

        Raises:
            ValueError: bidirectional frames under flash-attn, which takes no custom mask.
        """
        if self.matching is None or not self.matching.bidirectional_frames:
            return attention_mask
        implementation = getattr(self.llm.config, "_attn_implementation", "sdpa")
        if implementation.startswith("flash"):
            raise ValueError("matching.bidirectional_frames needs sdpa or eager attention, not flash-attn")
        from pipeline.model.matching import frame_attention_mask

        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return frame_attention_mask(mask, input_ids, None if implementation == "sdpa" else dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, video_features: torch.Tensor | None = None,
                visual_layout: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                visual_frames: torch.Tensor | None = None, query_input_ids: torch.Tensor | None = None,
                query_attention_mask: torch.Tensor | None = None, vid_frames: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs):
        """The LLM's forward pass on the spliced embeddings; with ``labels``, its output carries the loss (with
        matching: the language-model loss over the vocabulary and ``<vid>``, plus the matching loss).

        A packed batch (:class:`~pipeline.data.dataset.VideoCollator` with ``packing``) is one row: ``input_ids``,
        ``labels`` and ``position_ids`` ``(1, sum L_i)`` int64, the positions counting from 0 in each sample, and no
        ``attention_mask``. The visuals fill its video positions in order as in a padded batch, and the LLM reads the
        samples' bounds from ``position_ids`` (transformers' padding-free path, without a KV cache: flash-attn's
        varlen kernel, else a block-diagonal causal mask), so that each token's logits and loss are those of its
        sample alone.

        Raises:
            ValueError: a packed batch with matching, whose frame mask and loss take one sample a row.
        """
        if self.matching is not None and position_ids is not None:
            raise ValueError("packing: matching takes one sample a row (its frame mask and loss), not packed batches")
        embeds = self.embed(input_ids, video_features, visual_layout, pixel_values, visual_frames, query_input_ids,
                            query_attention_mask, vid_frames)
        if self.matching is None:
            if position_ids is not None:  # with a cache, transformers builds a plain causal mask (no packed bounds)
                kwargs["use_cache"] = False
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                            position_ids=position_ids, **kwargs)
        items = kwargs.pop("num_items_in_batch", None)
        mask = self._frame_mask(input_ids, attention_mask, embeds.dtype)
        with self.matching.capture(self.llm):
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            out.logits = self.matching.logits(out.logits)
            if labels is not None:
                out.loss = self._lm_loss(out.logits, labels, items) + self.matching.loss(input_ids, labels,
                                                                                         vid_frames)
        return out

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, items=None) -> torch.Tensor:
        """Next-token cross-entropy over the LLM's vocabulary + ``<vid>`` (the last column): the label of
        ``<vid>`` (its tokenizer id) is that column's index; summed over ``items`` tokens when the Trainer counts
        them across accumulated steps, else the mean."""
        labels = labels.masked_fill(labels == self.matching.token_id, logits.shape[-1] - 1)
        shifted = labels[:, 1:].reshape(-1).to(logits.device)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted,
                                           ignore_index=IGNORE_INDEX, reduction="sum" if items else "mean")
        return loss / items if items else loss

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 video_features: torch.Tensor | None = None, visual_layout: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, visual_frames: torch.Tensor | None = None,
                 query_input_ids: torch.Tensor | None = None, query_attention_mask: torch.Tensor | None = None,
                 vid_frames: torch.Tensor | None = None, **kwargs):
        """Generate from left-padded prompts; returns only the new tokens ``(B, new)``. With matching: greedy
        decoding of each prompt alone (:meth:`generate_matching`), and ``(tokens, matched)``: ``matched[b]`` the
        frame of each ``<vid>`` row b emitted, in order."""
        embeds = self.embed(input_ids, video_features, visual_layout, pixel_values, visual_frames, query_input_ids,
                            query_attention_mask, vid_frames)
        if self.matching is None:
            return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        pad = kwargs.get("pad_token_id") or 0
        rows, matched = [], []
        for b in range(len(input_ids)):
            keep = attention_mask[b].bool()
            tokens, frames = self.generate_matching(input_ids[b:b + 1, keep], embeds[b:b + 1, keep],
                                                    kwargs.get("max_new_tokens", 32), kwargs.get("eos_token_id"))
            rows.append(tokens)
            matched.append(frames)
        out = torch.full((len(rows), max(map(len, rows), default=0)), pad, dtype=torch.long)
        for b, tokens in enumerate(rows):
            out[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out, matched

    def generate_matching(self, input_ids: torch.Tensor, embeds: torch.Tensor, max_new_tokens: int,
                          eos_token_id: int | list[int] | None) -> tuple[list[int], list[int]]:
        """Greedy decoding of one prompt with the matching head (E.T. Chat ``etchat_arch.py:377-419``): each
        emitted ``<vid>`` is matched against the prompt's frames (argmax of ``vid_head @ frm_head``), and its input
        embedding gets the matched frame's embedding added.

        Args:
            input_ids: ``(1, L)`` the prompt, no padding; embeds: ``(1, L, h)`` its :meth:`embed`.
            eos_token_id: id(s) that end the answer (not returned).

        Returns:
            The new token ids and the frame index of each ``<vid>`` among them, in order.
        """
        from pipeline.model.matching import video_spans

        head, vid_id = self.matching, self.matching.token_id
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        start, count = (int(x[0]) for x in video_spans(input_ids))
        mask = self._frame_mask(input_ids, torch.ones_like(input_ids), embeds.dtype)
        tokens, matched, cache, length = [], [], None, input_ids.shape[1]
        frames_embeds = embeds[0, start:start + count]
        with head.capture(self.llm):
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
            frames_states = head.states["prenorm"][:, :]  # the prompt's: frm_head reads its frames
            for _ in range(max_new_tokens):
                cache = out.past_key_values
                logits = head.logits(out.logits[:, -1:])[0, -1]
                token = int(logits.argmax())
                is_vid = token == logits.shape[-1] - 1
                token = vid_id if is_vid else token
                if token in stops:
                    break
                tokens.append(token)
                step = self.embed(torch.tensor([[token]], device=input_ids.device))
                if is_vid:
                    if count == 0:
                        raise ValueError("the model emitted <vid> for a prompt without frames")
                    penultimate = head.states["penultimate"]
                    head.states["prenorm"], head.states["penultimate"] = frames_states, penultimate
                    frame = int(head.similarities(torch.tensor([penultimate.shape[1] - 1]), 0, start, count)[0]
                                .argmax())
                    matched.append(frame)
                    step = step + frames_embeds[frame].to(step.dtype)
                length += 1
                out = self.llm(inputs_embeds=step, past_key_values=cache, use_cache=True,
                               attention_mask=torch.ones((1, length), dtype=torch.long, device=input_ids.device))
        return tokens, matched

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the LLM's layers (the HF Trainer calls this when ``gradient_checkpointing`` is set; ``kwargs``
        such as ``every_n_layers`` go to the LLM's own method) and a training tower's blocks where it supports it;
        the inputs require grad so that a frozen embedding does not cut the graph to the connector."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        self.llm.enable_input_require_grads()
        if self.vision_tower is not None and hasattr(self.vision_tower, "gradient_checkpointing"):
            self.vision_tower.gradient_checkpointing = True


def gathered(*params: nn.Parameter):
    """Context in which parameters partitioned by DeepSpeed ZeRO-3 hold their full values (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params))
    return contextlib.nullcontext()


LLAVA_V1_ARCHITECTURES = {"LlavaLlamaForCausalLM", "VideoChatGPTLlamaForCausalLM"}


def _llava_v1_config(name_or_path: str):
    """A ``LlamaConfig`` for an original LLaVA-v1 checkpoint (``model_type: llava``, architecture
    ``LlavaLlamaForCausalLM``: a Llama whose weights also hold ``model.mm_projector``), which the Auto classes map
    to another model; None for any other checkpoint."""
    from transformers import LlamaConfig, PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    if set(config.get("architectures") or ()) & LLAVA_V1_ARCHITECTURES:
        log.info("%s: a LLaVA-v1 checkpoint, loaded as its Llama (the mm_projector weights are read apart)",
                 name_or_path)
        return LlamaConfig.from_dict({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    return None


def load_llm(name_or_path: str, dtype: torch.dtype, adapters: list[str] = ()) -> nn.Module:
    """Load a causal LM by hub name or local folder and merge the given LoRA adapter folders into it, in order.

    Original LLaVA-v1 checkpoints (LLaVA-Lightning-7B, Video-ChatGPT's start) load as the Llama they contain.
    Under an active ZeRO-3 config (``TrainingArguments`` made first) the weights load partitioned across ranks;
    merging adapters needs them whole, so a stage that merges adapters loads its LLM before making its
    ``TrainingArguments`` (:func:`pipeline.train.trainer.run_stage`).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    attn = attention_implementation()
    log.info("loading %s (%s, attention %s)", name_or_path, dtype, attn)
    llava_v1 = _llava_v1_config(name_or_path)
    llm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn,
                                               **({"config": llava_v1} if llava_v1 else {}))
    for adapter in adapters:
        log.info("merging LoRA adapter %s", adapter)
        llm = PeftModel.from_pretrained(llm, adapter).merge_and_unload()
    return llm
