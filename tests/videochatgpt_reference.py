"""Video-ChatGPT's feature script, line by line: the reference of the parity test and of benchmarks/features.py.

``scripts/save_spatio_temporal_clip_features.py`` of mbzuai-oryx/Video-ChatGPT (commit 69ea1db): decord reads 100
frames at rounded segment midpoints, nearest-neighbour resize to 224 x 224, PIL images through
``CLIPImageProcessor``, ``CLIPVisionModel`` ``hidden_states[-2]`` without CLS in batches of 32, features rounded to
float16, then temporal means (zero-padded to 100 rows) and spatial means. The original runs the tower on a GPU in
float16; here it runs where torch puts it, in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def get_seq_frames(total_num_frames, desired_num_frames):
    seg_size = float(total_num_frames - 1) / desired_num_frames
    seq = []
    for i in range(desired_num_frames):
        start = int(np.round(seg_size * i))
        end = int(np.round(seg_size * (i + 1)))
        seq.append((start + end) // 2)
    return seq


def load_video(vis_path, num_frm=100):
    from decord import VideoReader, cpu
    from PIL import Image

    vr = VideoReader(vis_path, ctx=cpu(0))
    total_frame_num = len(vr)
    total_num_frm = min(total_frame_num, num_frm)
    frame_idx = get_seq_frames(total_frame_num, total_num_frm)
    img_array = vr.get_batch(frame_idx).asnumpy()
    h, w = 224, 224
    if img_array.shape[-3] != h or img_array.shape[-2] != w:
        img_array = torch.from_numpy(img_array).permute(0, 3, 1, 2).float()
        img_array = torch.nn.functional.interpolate(img_array, size=(h, w))
        img_array = img_array.permute(0, 2, 3, 1).to(torch.uint8).numpy()
    img_array = img_array.reshape((1, total_num_frm, img_array.shape[-3], img_array.shape[-2], img_array.shape[-1]))
    return [Image.fromarray(img_array[0, j]) for j in range(total_num_frm)]


def get_spatio_temporal_features(features, num_temporal_tokens=100):
    t, s, c = features.shape
    temporal_tokens = np.mean(features, axis=1)
    padding_size = num_temporal_tokens - t
    if padding_size > 0:
        temporal_tokens = np.pad(temporal_tokens, ((0, padding_size), (0, 0)), mode="constant")
    spatial_tokens = np.mean(features, axis=0)
    return np.concatenate([temporal_tokens, spatial_tokens], axis=0)


def load_tower(model_dir):
    """The script's image processor and vision tower (from a local folder here, by hub name there)."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    return CLIPImageProcessor.from_pretrained(model_dir), CLIPVisionModel.from_pretrained(model_dir).eval()


def videochatgpt_features(video_path, model_dir, tower=None, infer_batch=32):
    """The script's main loop body for one video: ``(100 + 256, D)`` float16."""
    image_processor, vision_tower = tower or load_tower(model_dir)
    video = load_video(str(video_path))
    video_tensor = image_processor.preprocess(video, return_tensors="pt")["pixel_values"]
    n_chunk = len(video_tensor)
    video_features = torch.FloatTensor(n_chunk, 256, vision_tower.config.hidden_size).fill_(0)
    for i in range(int(math.ceil(n_chunk / float(infer_batch)))):
        min_ind, max_ind = i * infer_batch, (i + 1) * infer_batch
        with torch.no_grad():
            image_forward_outs = vision_tower(video_tensor[min_ind:max_ind], output_hidden_states=True)
        video_features[min_ind:max_ind] = image_forward_outs.hidden_states[-2][:, 1:].detach().cpu()
    return get_spatio_temporal_features(video_features.numpy().astype("float16"))
