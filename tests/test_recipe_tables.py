"""The recipes against the originals they reproduce, value by value: each recipe has a table written from its
original's training scripts and code, and every row is checked on the validated recipe (schema defaults filled,
as ``snakemake.utils.validate`` does) as the workflow resolves it.

Table format: rows of ``(stage, key, expected, source)``.

- ``stage``: the recipe's stage name, or None for a row about the whole recipe (``llm.``, ``model.``,
  ``features.``, ``compress.`` keys).
- ``key``, one of:
    - a dotted path into ``resolve_stage(config, stage)`` (pipeline/train/config.py): ``learning_rate``,
      ``param_groups.vision_tower.learning_rate``, ``vision_tower_training``, ``frames.max_frames``, ``template``,
      ``video_prompt``, ``vision_tower.layer``, ...;
    - ``llm.X``, ``model.X``, ``features.X``, ``compress.X``: that key of the config's section;
    - ``global_batch``: batch_size x gradient_accumulation_steps x resources.gpus x resources.nodes of the stage;
    - ``zero_stage``: ``zero_optimization.stage`` of the stage's DeepSpeed JSON (None without DeepSpeed);
    - ``datasets``: the file names of the annotation files the stage's data mix reads;
    - ``tower.X``: the stage's vision tower geometry, of a tower of the recipe's backend and model geometry (input
      size, patch size, frames a clip) at the stage's resolution, width shrunk: ``tower.image_size`` (px),
      ``tower.patches`` (tokens an output frame), ``tower.clip_frames``, ``tower.mean``, ``tower.out_frames@T``
      (output frames of T input frames);
    - ``tokens.video@T`` / ``tokens.image``: LLM tokens of a video of T sampled frames / of a still image, as the
      recipe's connector counts them (``Connector.num_tokens``) on that tower's output.
- ``expected``: the original's value (floats compared with a relative tolerance of 1e-9).
- ``source``: where the original sets it, ``file:line`` with the abbreviations of :data:`SOURCES`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
from conftest import REPO
from snakemake.utils import validate

from pipeline.io import read_yaml
from pipeline.train.config import resolve_stage

SOURCES = {
    "videochat_flash": "OpenGVLab/VideoChat-Flash at 2f8e2f5, under llava-train_videochat/: "
                       "S1 = scripts/train/stage1-init_connector/stage1_umt_tome16_res224_qwen7b.sh, "
                       "S2 = scripts/train/stage2-visual_pretraining/stage2_umt_tome16_res224_qwen_7b.sh, "
                       "S3 = scripts/train/stage3-video_sft/stage3_umt_tome16_res224_qwen_7b.sh, "
                       "S4 = scripts/train/stage4_highres_postft/stage4_umt_tome16_res448_qwen_7b.sh, "
                       "T = llava/train/train.py, VU = llava/video_utils.py, Z1 = scripts/zero1.json, "
                       "TM = llava/model/multimodal_projector/tome16_mlp_hd64.py, "
                       "umt_encoder.py and builder.py = llava/model/multimodal_encoder/*, "
                       "data/*.yaml = data/*",
    "llava_ssv2": "SeHwanJoo/LLaVA at 576d339: configs/experiments/train_qwen.yaml, configs/training_args/*.yaml, "
                  "configs/model_args/qwen2.5-1.5b.yaml, configs/model_args/video_encoder/base.yaml, "
                  "configs/data_args/ssv2_video.yaml, llava/model/video_encoder/clip_encoder.py, "
                  "llava/model/llava_arch.py, llava/dataset/video_dataset/dataset.py, llava/train/utils.py, "
                  "scripts/dataset/{webm2mp4,convert2instruct}.py",
    "llava_ssv2_phi": "as llava_ssv2, with configs/experiments/train_phi.yaml and configs/model_args/phi4mini.yaml",
    "videollama_action": "DAMO-NLP-SG/Video-LLaMA at 64888c0 and the custom fine-tuning guide of ../shared/seeds: "
                         "G = 001_0dafb0c7450320eb.txt (its visionbranch_stage2_finetune.yaml), "
                         "VID = video_llama/datasets/datasets/video_instruct_dataset.py, "
                         "VP = video_llama/processors/video_processor.py, VL = video_llama/models/video_llama.py, "
                         "OPT = video_llama/common/optims.py, RB = video_llama/runners/runner_base.py, "
                         "EVA = video_llama/models/eva_vit.py",
    "etchat": "PolyU-ChenLab/ETBench at 445f620: S1..S3 = scripts/train_stage_{1,2,3}.sh, T = etchat/train/train.py, "
              "TR = etchat/train/etchat_trainer.py, A = etchat/model/etchat_arch.py, C = etchat/conversation.py, "
              "TF = etchat/utils/transforms.py, IO = etchat/utils/io.py, "
              "EV = etchat/model/vision_encoder/eva_vit.py, M = docs/MODEL.md, Z2 = scripts/zero2.json",
}

TIME_MSG_SHORT = "\nThe video lasts for {duration:.2f} seconds, and {frames} frames are uniformly sampled from it. "
IMAGENET_MEAN = (0.485, 0.456, 0.406)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _videochat_flash_stage(stage, s, lines):
    """Rows every online stage of VideoChat-Flash shares; ``lines`` maps a name to its line in script ``s``."""
    return [
        (stage, "vision", "online", f"{s}:{lines['tunable']} (the tower trains: frames decoded each step)"),
        (stage, "vision_tower_training", "full", f"{s}:{lines['tunable']} mm_vision_tower"),
        (stage, "connector_training", "full", f"{s}:{lines['tunable']} mm_mlp_adapter"),
        (stage, "learning_rate", 1e-5, f"{s}:{lines['lr']}"),
        (stage, "param_groups.vision_tower.learning_rate", 2e-6, f"{s}:{lines['tower_lr']} mm_vision_tower_lr"),
        (stage, "param_groups.connector.learning_rate", 1e-5, f"{s}:{lines['lr']}"),
        (stage, "param_groups.llm.learning_rate", 1e-5, f"{s}:{lines['lr']}"),
        (stage, "param_groups.vision_tower.weight_decay", 0.0, f"{s}:{lines['lr'] + 1}"),
        (stage, "weight_decay", 0.0, f"{s}:{lines['lr'] + 1}"),
        (stage, "warmup_ratio", 0.03, f"{s}:{lines['lr'] + 2}"),
        (stage, "lr_scheduler", "cosine", f"{s}:{lines['lr'] + 3}"),
        (stage, "epochs", 1, f"{s}:{lines['bs'] - 1}"),
        (stage, "batch_size", 1, f"{s}:{lines['bs']}"),
        (stage, "gradient_accumulation_steps", 8, f"{s}:{lines['bs'] + 2}"),
        (stage, "global_batch", 256, f"{s}:{lines['gpus']} NUM_GPU=32, {s}:{lines['bs']},{lines['bs'] + 2}"),
        (stage, "max_length", 32768, f"{s}:{lines['max_length']}"),
        (stage, "bf16", True, f"{s}:{lines['bs'] - 4}"),
        (stage, "gradient_checkpointing", True, f"{s}:{lines['max_length'] + 1}"),
        (stage, "dataloader_workers", lines["workers_value"], f"{s}:{lines['max_length'] + 2}"),
        (stage, "save_steps", lines["save_value"], f"{s}:{lines['save']}"),
        (stage, "zero_stage", 1, f"{s}:{lines['deepspeed']} scripts/zero1.json, Z1:23"),
        (stage, "template", "qwen_2", f"{s}:{lines['template']}"),
        (stage, "video_prompt", TIME_MSG_SHORT, f"{s}:{lines['time_msg']} time_msg short, T:1399-1400, T:420-423"),
        (stage, "frames.sampling", "fps", f"{s}:{lines['sample']} dynamic_fps1, VU:106-117"),
        (stage, "frames.fps", 1.0, f"{s}:{lines['sample']} dynamic_fps1: duration // 4 clips of 4, VU:108-113"),
        (stage, "tower.clip_frames", 4, f"{s}:{lines['local']} mm_local_num_frames 4"),
        (stage, "vision_tower.backend", "umt", f"{s}:{lines['tower']} umt-large, builder.py:24-27"),
        (stage, "vision_tower.layer", -2, f"{s}:{lines['tunable'] + 2}"),
    ]


VIDEOCHAT_FLASH = [
    (None, "llm.name_or_path", "Qwen/Qwen2-7B-Instruct", "S1:10,33"),
    (None, "llm.template", "qwen_2", "S2:16, S3:17, S4:20"),
    (None, "model.mm_projector_type", "tome16_mlp_hd64", "S1:13,39"),
    (None, "features.backend", "umt", "S1:7,36 umt-large; builder.py:26-27"),
    (None, "features.model", "umt-l", "S1:7,36; umt_encoder.py:72-82"),
    (None, "features.pretrained", "resources/videochat_flash/UMT-L_f4_vision.pt", "umt_encoder.py:112-115"),
    (None, "features.layer", -2, "S1:38"),
    (None, "features.resize", "stretch", "umt_encoder.py:31,57 (resize to 224 x 224, no crop)"),
    (None, "features.pooling", "frames", "TM:143-163 (ToMe on per-frame tokens)"),
    (None, "features.spatial_pool", 1, "TM:143-163 (ToMe on every patch)"),
    (None, "compress.size", 224, "umt_encoder.py:31 size 224 (stage 4 reads its 448 px copy)"),
    # stage 1: the connector alone, tower frozen (so cached), 4 middle frames
    ("stage1", "vision", "cached", "S1:37 (the tower is frozen)"),
    ("stage1", "vision_tower_training", "frozen", "S1:37 mm_mlp_adapter only"),
    ("stage1", "connector_training", "full", "S1:37"),
    ("stage1", "llm_training", "frozen", "S1:37"),
    ("stage1", "learning_rate", 1e-3, "S1:51"),
    ("stage1", "param_groups.connector.learning_rate", 1e-3, "S1:51"),
    ("stage1", "weight_decay", 0.0, "S1:52"),
    ("stage1", "warmup_ratio", 0.03, "S1:53"),
    ("stage1", "lr_scheduler", "cosine", "S1:54"),
    ("stage1", "epochs", 1, "S1:44"),
    ("stage1", "bf16", True, "S1:42"),
    ("stage1", "gradient_checkpointing", True, "S1:58"),
    ("stage1", "batch_size", 16, "S1:45"),
    ("stage1", "gradient_accumulation_steps", 4, "S1:47"),
    ("stage1", "global_batch", 512, "S1:22,26-28 (8 GPUs), S1:45,47"),
    ("stage1", "max_length", 8192, "S1:57"),
    ("stage1", "template", "plain", "S1:14,34"),
    ("stage1", "video_prompt", None, "T:997-998 (plain keeps only the <image> token)"),
    ("stage1", "zero_stage", 1, "S1:32 scripts/zero1.json, Z1:23"),
    ("stage1", "dataloader_workers", 16, "S1:59"),
    ("stage1", "features.sampling", "midpoints", "S1:67 sample_type middle, VU:141-142"),
    ("stage1", "features.num_frames", 4, "S1:64 frames_upbound 4"),
    ("stage1", "datasets", ["smit_caption_481k.json", "blip_laion_cc_sbu_558k.json"],
     "S1:5, data/stage1_init_connector_iv1m.yaml:2-7"),
    ("stage1", "vision_tower.backend", "umt", "S1:7,36"),
    ("stage1", "vision_tower.model", "umt-l", "S1:7,36"),
    ("stage1", "vision_tower.layer", -2, "S1:38"),
    ("stage1", "tower.image_size", 224, "umt_encoder.py:79,135"),
    ("stage1", "tower.patches", 196, "umt_encoder.py:79-80,98 (224 / 16 = 14 x 14)"),
    ("stage1", "tower.clip_frames", 4, "S1:70 mm_local_num_frames 4"),
    ("stage1", "tower.mean", IMAGENET_MEAN, "umt_encoder.py:31"),
    ("stage1", "tokens.video@4", 64, "TM:159 (16 a frame)"),
    ("stage1", "tokens.image", 64, "TM:161"),
    # stage 2: everything trains, the ViT at 2e-6, 1 fps up to 8 frames
    *_videochat_flash_stage("stage2", "S2", {
        "tunable": 41, "tower_lr": 42, "lr": 63, "bs": 56, "gpus": 25, "max_length": 69, "workers_value": 8,
        "save": 61, "save_value": 12000, "deepspeed": 35, "template": 16, "time_msg": 79, "sample": 82,
        "local": 84, "tower": 9}),
    ("stage2", "llm_training", "full", "S2:41 mm_language_model"),
    ("stage2", "frames.min_frames", 1, "T:153 frames_lowbound default"),
    ("stage2", "frames.max_frames", 8, "S2:78 frames_upbound 8"),
    ("stage2", "resolution", None, "S2:9 umt-large: its 224 px"),
    ("stage2", "tower.image_size", 224, "umt_encoder.py:79,135"),
    ("stage2", "tower.patches", 196, "umt_encoder.py:79-80,98"),
    ("stage2", "tokens.video@8", 128, "TM:159"),
    ("stage2", "datasets", ["stage2_short_pretrain_iv6m.json"], "S2:6"),
    # stage 3: the same, 64 to 512 frames
    *_videochat_flash_stage("stage3", "S3", {
        "tunable": 41, "tower_lr": 42, "lr": 63, "bs": 56, "gpus": 26, "max_length": 69, "workers_value": 6,
        "save": 61, "save_value": 10000, "deepspeed": 36, "template": 17, "time_msg": 79, "sample": 82,
        "local": 83, "tower": 10}),
    ("stage3", "llm_training", "full", "S3:41 mm_language_model"),
    ("stage3", "frames.min_frames", 64, "S3:78 frames_lowbound 64"),
    ("stage3", "frames.max_frames", 512, "S3:77 frames_upbound 512"),
    ("stage3", "resolution", None, "S3:10 umt-large: its 224 px"),
    ("stage3", "tokens.video@64", 1024, "TM:159"),
    ("stage3", "tokens.video@512", 8192, "TM:159"),
    ("stage3", "datasets", ["stage3_short-long_mix_sft.json"], "S3:7"),
    # stage 4: the LLM frozen, the tower at 448 px
    *_videochat_flash_stage("stage4", "S4", {
        "tunable": 43, "tower_lr": 44, "lr": 65, "bs": 58, "gpus": 28, "max_length": 71, "workers_value": 4,
        "save": 63, "save_value": 8000, "deepspeed": 38, "template": 20, "time_msg": 81, "sample": 84,
        "local": 85, "tower": 10}),
    ("stage4", "llm_training", "frozen", "S4:43 (no mm_language_model)"),
    ("stage4", "frames.min_frames", 64, "S4:80"),
    ("stage4", "frames.max_frames", 512, "S4:79"),
    ("stage4", "resolution", 448, "S4:10,42 umt-hd-large, builder.py:24-25"),
    ("stage4", "tower.image_size", 448, "builder.py:24-25"),
    ("stage4", "tower.patches", 784, "builder.py:24-25, umt_encoder.py:98 (448 / 16 = 28 x 28)"),
    ("stage4", "tokens.video@64", 1024, "TM:159 (16 a frame at any resolution)"),
    ("stage4", "tokens.image", 64, "TM:161"),
    ("stage4", "datasets", ["stage4_highres_postsft.json"], "S4:7 (data/stage4_highres_postsft.yaml)"),
]


def _llava_ssv2(experiment: str, model_args: str, llm: str, batch: int) -> list:
    """The SSv2 fork's table for one experiment (train_qwen / train_phi)."""
    return [
        (None, "llm.name_or_path", llm, f"{model_args}:7"),
        (None, "llm.template", "plain", f"{model_args}:9"),
        (None, "model.mm_projector_type", "mlp2x_gelu", "video_encoder/base.yaml:4"),
        (None, "features.backend", "multichannel_clip", "clip_encoder.py:13,36-39 (num_channels = num_segment)"),
        (None, "features.model", "openai/clip-vit-large-patch14-336", "video_encoder/base.yaml:2"),
        (None, "features.layer", -2, "video_encoder/base.yaml:3, clip_encoder.py:44-47 (CLS dropped)"),
        (None, "features.num_frames", 16, "ssv2_video.yaml:6, video_encoder/base.yaml:7"),
        (None, "features.pooling", "frames", "llava_arch.py:245-258 (flat, no pooling)"),
        (None, "features.spatial_pool", 1, "llava_arch.py:245-258"),
        (None, "compress.fps", 12, "dataset.py:148 (native rate), webm2mp4.py:26-33 (rate kept: SSv2 is 12 fps)"),
        (None, "compress.size", 240, "webm2mp4.py:26-33 (size kept: SSv2 is 240 px high)"),
        ("pretrain", "vision", "online", "dataset.py:80-134 (frames augmented at every step)"),
        ("pretrain", "augment", "llava_ssv2", "dataset.py:80-134 (RandAugment m7 n4, crop, flip, erasing)"),
        ("pretrain", "vision_tower_training", "frozen", "clip_encoder.py:40,54"),
        ("pretrain", "connector_training", "full", f"video_encoder/base.yaml:1, {model_args}:8, utils.py:477-485"),
        ("pretrain", "llm_training", "frozen", "utils.py:479 (tune_mm_mlp_adapter: all but the projector frozen)"),
        ("pretrain", "lora", None, "pretrain.yaml:22 lora_enable False"),
        ("pretrain", "learning_rate", 1e-3, "pretrain.yaml:12"),
        ("pretrain", "param_groups.connector.learning_rate", 1e-3, "pretrain.yaml:12,25 (mm_projector_lr null)"),
        ("pretrain", "weight_decay", 0.0, "pretrain.yaml:13"),
        ("pretrain", "warmup_ratio", 0.03, "pretrain.yaml:14"),
        ("pretrain", "lr_scheduler", "cosine", "pretrain.yaml:15"),
        ("pretrain", "epochs", 1, "pretrain.yaml:4"),
        ("pretrain", "batch_size", batch, f"{experiment}:11"),
        ("pretrain", "gradient_accumulation_steps", 1, "pretrain.yaml:7"),
        ("pretrain", "global_batch", batch * 8, f"{experiment}:11, pretrain.yaml:7; 8 GPUs ours (README.md:151,155)"),
        ("pretrain", "max_length", 2048, "pretrain.yaml:18"),
        ("pretrain", "bf16", True, "pretrain.yaml:2"),
        ("pretrain", "gradient_checkpointing", True, "pretrain.yaml:19"),
        ("pretrain", "dataloader_workers", 4, "pretrain.yaml:20"),
        ("pretrain", "save_steps", 24000, "pretrain.yaml:10"),
        ("pretrain", "seed", 1997, f"{experiment}:8"),
        ("pretrain", "template", "plain", f"{model_args}:9"),
        ("pretrain", "zero_stage", 2, "pretrain.yaml:1 scripts/zero2.json"),
        ("pretrain", "frames.sampling", "midpoints", "dataset.py:153-169 (segments; random offsets: augment)"),
        ("pretrain", "frames.num_frames", 16, "ssv2_video.yaml:6"),
        ("pretrain", "datasets", ["train.csv"], "convert2instruct.py:11"),
        ("pretrain", "vision_tower.backend", "multichannel_clip", "clip_encoder.py:36-39"),
        ("pretrain", "vision_tower.model", "openai/clip-vit-large-patch14-336", "video_encoder/base.yaml:2"),
        ("pretrain", "vision_tower.layer", -2, "video_encoder/base.yaml:3"),
        ("pretrain", "tower.image_size", 336, "ssv2_video.yaml:7 crop_size 336"),
        ("pretrain", "tower.patches", 576, "clip-vit-large-patch14-336: (336 / 14)^2, clip_encoder.py:46-47"),
        ("pretrain", "tower.clip_frames", 16, "ssv2_video.yaml:6, clip_encoder.py:13"),
        ("pretrain", "tower.out_frames@16", 3, "dataset.py:101-102, llava_arch.py:245-252 (C, T, H, W: 3 images)"),
        ("pretrain", "tower.mean", IMAGENET_MEAN, "dataset.py:100"),
        ("pretrain", "tokens.video@16", 1728, "llava_arch.py:253-258 (3 x 576, flat)"),
    ]


VIDEOLLAMA_TIME_MSG = "</Video> The video contains {frames} frames sampled at {times} seconds. "
VIDEOLLAMA_ACTION = [
    (None, "llm.name_or_path", "meta-llama/Llama-2-7b-chat-hf", "G:65"),
    (None, "llm.template", "videollama_llama_2", "G:110 model_type llama_v2, VID:31-39,102-105,263-326"),
    (None, "model.mm_projector_type", "video_qformer",
     "VL:153-215,298-321 (frame position, video Q-Former, llama_proj)"),
    (None, "model.connector.num_query_tokens", 32, "VL:74,188-190,569 num_video_query_token; G:108"),
    (None, "model.connector.num_hidden_layers", 2, "VL:189-190 (G:76 fusion_head_layers 2)"),
    (None, "model.connector.max_frame_pos", 32, "G:77, VL:186"),
    (None, "features.backend", "eva", "VL:49,85-87,541 vit_model eva_clip_g"),
    (None, "features.model", "eva_vit_g_qformer", "G:56-57 freeze_vit, freeze_qformer; VL:88-118,285-296"),
    (None, "features.pretrained", "resources/videollama/eva_vit_g.pth", "EVA:429-436"),
    (None, "features.overrides.qformer.pretrained", "resources/videollama/blip2_pretrained_flant5xxl.pth",
     "VL:50,110,542 q_former_model"),
    (None, "features.layer", -2, "EVA:421 depth=39 of the file's 40 blocks (pipeline/vision/eva.py: layer -2)"),
    (None, "features.resize", "stretch", "VID:84-90, VP:27 (decord height = width = 224: the whole frame)"),
    (None, "features.sampling", "uniform", "VID:89 sampling uniform, VP:34-35"),
    (None, "features.num_frames", 8, "G:103 n_frms 8, VID:58"),
    (None, "features.pooling", "frames", "VL:287-305 (a frame's 32 query tokens, kept per frame)"),
    (None, "features.spatial_pool", 1, "VL:287-296"),
    (None, "compress.size", 224, "VID:57,84-88 resize_size 224"),
    (None, "compress.fps", 30, "VP:27-35 (upstream samples the raw frames; the clips are short, G:170)"),
    ("finetune", "vision", "cached", "G:56-57 (the ViT and image Q-Former are frozen)"),
    ("finetune", "vision_tower_training", "frozen", "G:56-57, VL:88-118"),
    ("finetune", "connector_training", "full",
     "G:72-73 frozen_llama_proj, frozen_video_Qformer False; VL:166-169,209-215"),
    ("finetune", "llm_training", "frozen", "VL:147-148"),
    ("finetune", "lora", None, "VL:147-148 (no adapters)"),
    ("finetune", "mm_projector_init", "resources/videollama/VL_LLaMA_2_7B_Pretrained.pth", "G:68 ckpt, VL:604-608"),
    ("finetune", "learning_rate", 3e-5, "G:116 init_lr"),
    ("finetune", "param_groups.connector.learning_rate", 3e-5, "G:116, RB:114-127 (one learning rate)"),
    ("finetune", "param_groups.connector.weight_decay", 0.05, "G:120, RB:108-119"),
    ("finetune", "weight_decay", 0.05, "G:120"),
    ("finetune", "lr_scheduler", "linear_warmup_cosine", "G:115 linear_warmup_cosine_lr, OPT:56-112"),
    ("finetune", "warmup_steps", 1000, "G:126, OPT:81-88"),
    ("finetune", "warmup_start_lr", 1e-6, "G:118 warmup_lr, RB:158, OPT:77"),
    ("finetune", "min_learning_rate", 1e-5, "G:117 min_lr, OPT:99-105"),
    ("finetune", "max_steps", 3000, "G:121-122 max_epoch 3 x iters_per_epoch 1000, OPT:80,93"),
    ("finetune", "batch_size", 4, "G:123 batch_size_train"),
    ("finetune", "gradient_accumulation_steps", 1, "RB:300-301 accum_grad_iters default 1"),
    ("finetune", "global_batch", 16, "G:123,138 (4 a GPU, world_size 4)"),
    ("finetune", "max_length", 512, "VID:216,296 max_length 512 (the 32 placeholders included, VID:185)"),
    ("finetune", "template", "videollama_llama_2", "G:110, VID:31-39,102-105,263-326"),
    ("finetune", "video_prompt", VIDEOLLAMA_TIME_MSG, "VID:185, VP:52-55"),
    ("finetune", "zero_stage", None, "G:139-140,160-163 (torchrun, DistributedDataParallel)"),
    ("finetune", "bf16", True, "G:131 amp (fp16 autocast upstream, VL:142-145 the LLM in bf16)"),
    ("finetune", "gradient_checkpointing", False, "VL:142-145 (none on the LLM)"),
    ("finetune", "seed", 42, "G:128"),
    ("finetune", "dataloader_workers", 4, "G:125"),
    ("finetune", "save_steps", 1000, "RB:404-407 (a checkpoint each epoch), G:122"),
    ("finetune", "logging_steps", 50, "RB:287-289 log_freq 50"),
    ("finetune", "datasets", ["human_action"], "G:30-46 (the class folders of the Kaggle set)"),
    ("finetune", "vision_tower.backend", "eva", "VL:85-87"),
    ("finetune", "vision_tower.model", "eva_vit_g_qformer", "VL:85-118"),
    ("finetune", "vision_tower.layer", -2, "EVA:421"),
    ("finetune", "tower.image_size", 224, "G:104 image_size 224, VL:51"),
    ("finetune", "tower.patches", 32, "G:60 num_query_token 32, VL:101-103,290-296 (32 x 768 a frame)"),
    ("finetune", "tower.clip_frames", 1, "VL:284 (the frames one by one)"),
    ("finetune", "tower.mean", CLIP_MEAN, "VP:61-62"),
    ("finetune", "tokens.video@8", 32, "VL:311-321 (32 video query tokens), VID:185 (32 placeholders)"),
]


def _etchat_stage(stage, s, lines):
    """Rows every stage of E.T. Chat shares; ``lines`` maps a name to its line in script ``s``."""
    return [
        (stage, "vision", "online", "A:109-110 (the tower runs in the step), T:424 (frozen)"),
        (stage, "vision_tower_training", "frozen", "T:424,471-484 (no tuning mode trains vision_tower); M:55-57"),
        (stage, "learning_rate", lines["lr_value"], f"{s}:{lines['lr']}"),
        (stage, "weight_decay", 0.0, f"{s}:{lines['lr'] + 1}"),
        (stage, "warmup_ratio", 0.03, f"{s}:{lines['lr'] + 2}"),
        (stage, "lr_scheduler", "cosine", f"{s}:{lines['lr'] + 3}"),
        (stage, "logging_steps", 1, f"{s}:{lines['lr'] + 4}"),
        (stage, "max_length", 2048, f"{s}:{lines['lr'] + 5}"),
        (stage, "gradient_checkpointing", True, f"{s}:{lines['lr'] + 6}"),
        (stage, "dataloader_workers", 4, f"{s}:{lines['lr'] + 7}"),
        (stage, "epochs", 1, f"{s}:{lines['bs'] - 1}"),
        (stage, "batch_size", lines["bs_value"], f"{s}:{lines['bs']}"),
        (stage, "gradient_accumulation_steps", lines["accum_value"], f"{s}:{lines['bs'] + 1}"),
        (stage, "global_batch", lines["bs_value"] * lines["accum_value"] * 8,
         f"{s}:{lines['gpus']} nproc_per_node 8, {s}:{lines['bs']},{lines['bs'] + 1}"),
        (stage, "save_steps", 500, f"{s}:{lines['save']}"),
        (stage, "zero_stage", 2, f"{s}:{lines['gpus'] + 1} scripts/zero2.json, Z2:17"),
        (stage, "frames.sampling", "fps_from_start", "IO:46"),
        (stage, "frames.fps", 1.0, f"{s}:{lines['fps']} --fps 1"),
        (stage, "video_prompt", None, f"{s}:{lines['time_tag']} use_time_tag False"),
        (stage, "vision_tower.backend", "eva", f"{s}:{lines['tower']} eva_vit"),
        (stage, "vision_tower.model", "eva_vit_g", "EV:410-431"),
        (stage, "vision_tower.layer", -2, f"{s}:{lines['tower'] + 2} vision_output_layer -2, EV:425"),
        (stage, "tower.image_size", 224, f"{s}:{lines['tower'] + 1} clip_center_224, EV:415"),
        (stage, "tower.patches", 256, "EV:415-416,457-458 ((224 / 14)^2), A:112-113 (CLS dropped)"),
        (stage, "tower.clip_frames", 1, "A:109-110 (frames as images)"),
        (stage, "tower.mean", CLIP_MEAN, "TF:6"),
    ]


ETCHAT_LORA = [("r", 128, "T:73"), ("alpha", 256, "T:74"), ("dropout", 0.05, "T:75"),
               ("target_modules", ["qkv_proj", "o_proj"], "T:72 lora_type attention, T:269-270")]
ETCHAT = [
    (None, "llm.name_or_path", "microsoft/Phi-3-mini-4k-instruct", "S1:12, M:60"),
    (None, "llm.template", "phi3", "S2:15, S3:15, C:58-64"),
    (None, "model.mm_projector_type", "etchat_qformer", "S1:20 mm_projector qformer, A:36-56,135-190"),
    (None, "model.connector.tokenizer", "bert-base-uncased", "A:39"),
    (None, "features.backend", "eva", "S1:16 eva_vit"),
    (None, "features.model", "eva_vit_g", "EV:410-431, S1:19 vision_output_token patch"),
    (None, "features.pretrained", "resources/etchat/eva_vit_g.pth", "S1:21, M:60,102"),
    (None, "features.layer", -2, "S1:18, EV:425 (39 of 40 blocks; pipeline/vision/eva.py: layer -2)"),
    (None, "features.resize", "crop", "S1:17 clip_center_224, TF:26-37,64-73"),
    (None, "features.sampling", "fps_from_start", "IO:46"),
    (None, "features.fps", 1.0, "S1:26, S2:27, S3:24"),
    (None, "features.max_frames", 350, "S2:35, S3:33 max_video_len 350 (1 fps)"),
    (None, "features.pooling", "frames", "A:182-186 (one token a frame)"),
    (None, "features.spatial_pool", 1, "A:152-177 (every patch into the Q-Former)"),
    (None, "compress.fps", 3, "M:72 (3 FPS)"),
    (None, "compress.size", 224, "M:72 (224ss)"),
    # stage 1: the aggregator and projector on LLaMA-VID's stage-1 data, plain
    *_etchat_stage("stage1", "S1", {"lr": 40, "lr_value": 1e-3, "bs": 33, "bs_value": 4, "accum_value": 8,
                                    "gpus": 10, "save": 38, "fps": 26, "time_tag": 29, "tower": 16}),
    ("stage1", "connector_training", ["aggregator", "projector"], "S1:27 tuning_mode projector, T:471-473"),
    ("stage1", "llm_training", "frozen", "T:71 lora_enable False, T:424"),
    ("stage1", "lora", None, "T:71"),
    ("stage1", "param_groups.connector.learning_rate", 1e-3, "S1:40, TR:148-155 (no lora_lr: one lr)"),
    ("stage1", "mm_projector_init", "resources/etchat/instruct_blip_vicuna7b_trimmed.pth",
     "S1:22 pretrain_qformer, A:70-75, M:60,103"),
    ("stage1", "matching", None, "S1:28 use_matching False"),
    ("stage1", "template", "plain", "S1:14, T:90-102"),
    ("stage1", "min_duration", None, "T:56 min_video_len -1"),
    ("stage1", "max_duration", None, "T:57 max_video_len -1"),
    ("stage1", "max_answer_words", None, "T:59 max_num_words -1"),
    ("stage1", "datasets", ["llava_558k_with_webvid.json"], "S1:23, M:68"),
    ("stage1", "tokens.video@8", 8, "A:182-186 (one token a frame)"),
    ("stage1", "tokens.image", 1, "A:182-186"),
    # stage 2: the whole connector and LoRA on LLaMA-VID's stage-2 data
    *_etchat_stage("stage2", "S2", {"lr": 44, "lr_value": 2e-5, "bs": 37, "bs_value": 1, "accum_value": 16,
                                    "gpus": 11, "save": 42, "fps": 27, "time_tag": 32, "tower": 17}),
    ("stage2", "connector_training", "full", "S2:30 tuning_mode qformer, T:477-479"),
    ("stage2", "llm_training", "lora", "S2:28 lora_enable, T:431-442"),
    *[("stage2", f"lora.{key}", value, source) for key, value, source in ETCHAT_LORA],
    ("stage2", "param_groups.lora.learning_rate", 2e-4, "S2:29 lora_lr, TR:156-172"),
    ("stage2", "param_groups.connector.learning_rate", 2e-5, "S2:44, TR:158-163"),
    ("stage2", "param_groups.lora.weight_decay", 0.0, "S2:45, TR:165-171"),
    ("stage2", "matching", None, "S2:31 use_matching False"),
    ("stage2", "template", "phi3", "S2:15, C:58-64"),
    ("stage2", "min_duration", None, "T:56 (no --min_video_len)"),
    ("stage2", "max_duration", 350, "S2:35, T:293-294, IO:43-44"),
    ("stage2", "max_answer_words", None, "T:59 (no --max_num_words)"),
    ("stage2", "datasets", ["llava_v1_5_mix665k_with_video_chatgpt.json"], "S2:22, M:69"),
    ("stage2", "tokens.video@100", 100, "A:182-186"),
    # stage 3: the Q-Former's attention, the aggregator, the projector, LoRA and the <vid> matching on E.T. Instruct
    *_etchat_stage("stage3", "S3", {"lr": 43, "lr_value": 2e-5, "bs": 36, "bs_value": 1, "accum_value": 4,
                                    "gpus": 11, "save": 41, "fps": 24, "time_tag": 29, "tower": 17}),
    ("stage3", "connector_training", ["qformer_attention", "queries", "aggregator", "projector"],
     "S3:27 tuning_mode attention, T:474-476"),
    ("stage3", "llm_training", "lora", "S3:25 lora_enable, T:431-442"),
    *[("stage3", f"lora.{key}", value, source) for key, value, source in ETCHAT_LORA],
    ("stage3", "param_groups.lora.learning_rate", 5e-5, "S3:26 lora_lr, TR:156-172"),
    ("stage3", "param_groups.connector.learning_rate", 2e-5, "S3:43, TR:158-163"),
    ("stage3", "param_groups.heads.learning_rate", 2e-5, "S3:43, T:467-469, TR:157-163 (not LoRA: the stage's lr)"),
    ("stage3", "matching.alpha", 2.0, "S3:31, A:437"),
    ("stage3", "matching.bidirectional_frames", True, "S3:30 bi_attention, A:84-90"),
    ("stage3", "template", "phi3", "S3:15, C:58-64"),
    ("stage3", "min_duration", 5, "S3:32, T:291-292"),
    ("stage3", "max_duration", 350, "S3:33, T:293-294"),
    ("stage3", "max_answer_words", 200, "S3:34, T:286-290 (the first answer, split(' '))"),
    ("stage3", "datasets", ["et_instruct_164k_vid.json"], "S3:22, M:70"),
    ("stage3", "tokens.video@350", 350, "A:182-186"),
]


TABLES = {
    "videochat_flash": VIDEOCHAT_FLASH,
    "llava_ssv2": _llava_ssv2("train_qwen.yaml", "qwen2.5-1.5b.yaml", "Qwen/Qwen2.5-1.5B-Instruct", 16),
    "llava_ssv2_phi": _llava_ssv2("train_phi.yaml", "phi4mini.yaml", "microsoft/Phi-4-mini-instruct", 8),
    "videollama_action": VIDEOLLAMA_ACTION,
    "etchat": ETCHAT,
}
# The benchmarks a recipe evaluates on, as its system's evaluation runs them: rows of (benchmark, key, expected,
# source), key a GenerationSettings field of the benchmark's generation.
# VCF_E = OpenGVLab/VideoChat-Flash at 2f8e2f5, lmms-eval_videochat/lmms_eval/tasks;
# VCF_M = lmms-eval_videochat/lmms_eval/models/videochat_flash.py; VCGPT = mbzuai-oryx/Video-ChatGPT at 659e04b.
_VCF_GREEDY = [("do_sample", False), ("video_placement", "before")]
EVAL_ROWS = {
    "videochat_flash": [
        *[(name, key, value, f"VCF_E/{task}:{line}") for name, task, line in [
            ("mvbench", "mvbench/_default_template.yaml", "7-11"), ("videomme", "videomme/videomme.yaml", "14-18"),
            ("mlvu", "mlvu_mc/_default_template.yaml", "7-11"), ("lvbench", "lvbench/_default_template.yaml", "8-12"),
            ("longvideobench", "longvideobench/longvideobench_val_v.yaml", "15-17"),
            ("charades_sta", "temporal_grounding/_default_template.yaml", "7-11")]
          for key, value in _VCF_GREEDY],
        ("mvbench", "max_new_tokens", 16, "VCF_E/mvbench/_default_template.yaml:7"),
        ("videomme", "max_new_tokens", 16, "VCF_E/videomme/videomme.yaml:14"),
        ("mlvu", "max_new_tokens", 16, "VCF_E/mlvu_mc/_default_template.yaml:7"),
        ("lvbench", "max_new_tokens", 16, "VCF_E/lvbench/_default_template.yaml:8"),
        ("longvideobench", "max_new_tokens", 32, "VCF_E/longvideobench/longvideobench_val_v.yaml:15"),
        ("charades_sta", "max_new_tokens", 50, "VCF_E/temporal_grounding/_default_template.yaml:7"),
        ("perceptiontest", "max_new_tokens", 1024, "VCF_M:228-229 (the task sets no generation_kwargs)"),
        ("perceptiontest", "do_sample", False, "VCF_M:232-233"),
    ],
    "videochatgpt": [
        *[(name, key, value, source) for name in ("activitynet_qa", "vcgpt_generic", "vcgpt_temporal",
                                                  "vcgpt_consistency")
          for key, value, source in [("do_sample", True, "VCGPT video_chatgpt/inference.py:104"),
                                     ("temperature", 0.2, "VCGPT video_chatgpt/inference.py:105"),
                                     ("max_new_tokens", 1024, "VCGPT video_chatgpt/inference.py:106"),
                                     ("video_placement", "after", "VCGPT video_chatgpt/inference.py:66-69")]],
    ],
}
EVAL = [(name, *row) for name, rows in EVAL_ROWS.items() for row in rows]


@pytest.mark.parametrize(("name", "benchmark", "key", "expected", "source"), EVAL,
                         ids=[f"{name}-{benchmark}-{key}" for name, benchmark, key, _, _ in EVAL])
def test_a_recipe_evaluates_as_its_original(name, benchmark, key, expected, source):
    from pipeline.eval.generate import GenerationSettings

    entry = next(b for b in _recipe(name)["evaluate"]["benchmarks"] if b["name"] == benchmark)
    value = getattr(GenerationSettings(**entry["generation"]), key)
    assert value == expected, f"{name} {benchmark} {key}: {value!r}, the original's is {expected!r} ({source})"


# The geometry of the towers the recipes name (input px, patch px): what a tiny stand-in keeps of the real model.
HF_GEOMETRY = {"openai/clip-vit-large-patch14-336": (336, 14)}


@cache
def _recipe(name: str) -> dict:
    config = read_yaml(REPO / "config" / "recipes" / f"{name}.yaml")
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))  # fills in the defaults
    return config


@pytest.fixture(scope="module")
def tower_of(tmp_path_factory):
    """``tower_of(backend, model, resolution)``: a tower of that backend with the model's geometry (input size,
    patch size, frames a clip) but a tiny width and one block, random weights."""
    from pipeline.vision import build_tower

    root = tmp_path_factory.mktemp("towers")

    @cache
    def build(backend: str, model: str, resolution: int | None):
        if backend == "umt":
            return build_tower("umt", model, None, -1, {"dim": 64, "depth": 1, "heads": 1}, 0, resolution)
        if backend in ("multichannel_clip", "hf_clip"):
            from transformers import CLIPVisionConfig

            image_size, patch_size = HF_GEOMETRY[model]
            folder = root / model.replace("/", "--")
            CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=image_size, patch_size=patch_size).save_pretrained(folder)
            return build_tower(backend, str(folder), None, -1, {}, 0, resolution)
        if backend == "eva":  # EVA-ViT-G's 224 px in 14 px patches, one block of width 32
            tiny = {"width": 32, "depth": 1, "heads": 2, **({"qformer": {}} if model == "eva_vit_g_qformer" else {})}
            return build_tower("eva", model, None, -1, tiny, 0, resolution)
        raise AssertionError(f"no geometry for backend {backend!r}")

    return build


def _dotted(value, key: str):
    for part in key.split("."):
        value = value[part]
    return value


def _value(name: str, stage: str | None, key: str, tower_of):
    config = _recipe(name)
    section = key.split(".", 1)[0]
    if section in ("llm", "model", "features", "compress"):
        return _dotted(config, key)
    resolved = resolve_stage(config, stage)
    raw = next(s for s in config["stages"] if s["name"] == stage)
    if key == "global_batch":
        resources = raw["resources"]
        return (resolved["batch_size"] * resolved["gradient_accumulation_steps"] * resources["gpus"]
                * resources["nodes"])
    if key == "zero_stage":
        if not resolved["deepspeed"]:
            return None
        return json.loads((REPO / resolved["deepspeed"]).read_text())["zero_optimization"]["stage"]
    if key == "datasets":
        files = {d["name"]: Path(d["annotations"]).name for d in config["instructions"]["datasets"]}
        return [files[entry["dataset"]] for entry in raw["data"]] if raw.get("data") else sorted(files.values())
    if section in ("tower", "tokens"):
        settings = resolved["vision_tower"]
        tower = tower_of(settings["backend"], settings["model"], resolved.get("resolution"))
        attribute, _, frames = key.split(".", 1)[1].partition("@")
        if section == "tokens":
            from pipeline.model.connectors import build_connector

            out = tower.out_frames(1 if attribute == "image" else int(frames))
            connector = build_connector(resolved["mm_projector_type"], 1024, 8)
            return connector.num_tokens(out, tower.num_patches, out * tower.num_patches)
        if attribute == "out_frames":
            return tower.out_frames(int(frames))
        if attribute == "patches":
            return tower.num_patches
        if attribute == "image_size":
            assert tower.image_size[0] == tower.image_size[1]
            return tower.image_size[0]
        return tuple(getattr(tower, attribute)) if attribute in ("mean", "std") else getattr(tower, attribute)
    return _dotted(resolved, key)


ROWS = [(name, *row) for name, rows in TABLES.items() for row in rows]


@pytest.mark.parametrize(("name", "stage", "key", "expected", "source"), ROWS,
                         ids=[f"{name}-{stage or 'recipe'}-{key}" for name, stage, key, _, _ in ROWS])
def test_a_recipe_has_its_originals_value(name, stage, key, expected, source, tower_of):
    value = _value(name, stage, key, tower_of)
    if isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-9), f"{name} {stage} {key}: {value!r}, original {source}"
    else:
        assert value == expected, f"{name} {stage} {key}: {value!r}, the original's is {expected!r} ({source})"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_stage_of_a_tabled_recipe_has_rows_and_every_row_a_source(name):
    config = _recipe(name)
    stages = {stage["name"] for stage in config["stages"]}
    tabled = {stage for stage, *_ in TABLES[name] if stage is not None}
    assert tabled == stages
    for stage, key, _, source in TABLES[name]:
        assert source and ":" in source, (stage, key)
    for key in ("vision_tower_training", "connector_training", "llm_training", "learning_rate", "global_batch",
                "template"):  # what trains, how fast, on how much, in which format: for every stage
        assert {stage for stage, k, *_ in TABLES[name] if k == key} == stages, key
    assert config["evaluate"]["stage"] in stages
