"""The online pixel source of a training stage (``vision: cached | online``): the sampled frames of the compressed
videos, decoded in DataLoader workers and fitted to the tower (uint8; the model normalises them on its device),
augmented at training time as the recipe says. The tower then runs inside the training step
(:class:`pipeline.model.video_llm.VideoLLM`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.dataset import VisualInfo
from pipeline.io import read_table
from pipeline.video.frames import FrameSampling, read_frames
from pipeline.video.index import VIDEO_COLUMNS


@dataclass(frozen=True)
class TowerGeometry:
    """What the dataset needs of a tower to know a visual's tokens without running it (picklable).

    Attributes:
        clip_frames: frames the tower reads together (a video's count is a multiple of it).
        patches: S, tokens an output frame.
        clip_out: output frames of one clip; image_out: output frames of a still image.
        size: ``(H, W)`` input pixels.
    """

    clip_frames: int
    patches: int
    clip_out: int
    image_out: int
    size: tuple[int, int]

    @classmethod
    def of(cls, tower) -> TowerGeometry:
        """The geometry of a :class:`~pipeline.vision.tower.VisionTower`."""
        return cls(tower.clip_frames, tower.num_patches, tower.out_frames(tower.clip_frames), tower.out_frames(1),
                   tuple(tower.image_size))

    def out_frames(self, frames: int) -> int:
        """Output frames T' of ``frames`` input frames."""
        return self.image_out if frames == 1 else frames // self.clip_frames * self.clip_out


class OnlineVisuals:
    """Visuals decoded from the compressed videos (``vision: online``).

    Args:
        videos: the compressed videos' ``index.tsv`` (:mod:`pipeline.video.index`).
        sampling: the stage's frame sampling.
        prep: a :class:`pipeline.features.encoder.FramePrep` to the tower's input size.
        geometry: the tower's :class:`TowerGeometry`.
        augment: a training-time augmentation of :mod:`pipeline.video.augment` (``(T, 3, H, W)`` uint8 decoded
            frames, ``seed`` -> ``(T, 3, size, size)`` uint8, in place of ``prep``), with the frames sampled at
            random offsets inside their segments; None: ``prep`` and the segments' middles (evaluation, and
            recipes without augmentation).

    Raises:
        ValueError: ``videos`` lacks a column of :data:`VIDEO_COLUMNS`.
    """

    def __init__(self, videos: str | Path, sampling: FrameSampling, prep, geometry: TowerGeometry, augment=None):
        table = read_table(videos)
        missing = [column for column in VIDEO_COLUMNS if column not in table]
        if missing:
            raise ValueError(f"{videos}: no column(s) {missing}; expected {VIDEO_COLUMNS}")
        self.rows = {video: {key: table[key][i] for key in VIDEO_COLUMNS[1:]}
                     for i, video in enumerate(table["video_id"])}
        self.sampling, self.prep, self.geometry, self.augment = sampling, prep, geometry, augment

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.rows

    def info(self, video_id: str) -> VisualInfo:
        """The :class:`~pipeline.data.dataset.VisualInfo` of ``video_id`` from its probe (frame count and rate).

        Raises:
            KeyError: not in the index.
        """
        row = self.rows[video_id]
        total = max(1, int(float(row["frames"] or 1)))
        fps = float(row["fps"] or 0)
        indices = self.sampling.indices(total, fps, self.geometry.clip_frames)
        frames = self.geometry.out_frames(len(indices))
        times = tuple(float(i) / fps for i in indices) if fps and frames == len(indices) else ()
        return VisualInfo(frames, self.geometry.patches, frames * self.geometry.patches, len(indices),
                          float(row["duration"] or 0), times)

    def load(self, video_id: str) -> dict:
        """``{"pixel_values": (T, 3, H, W) uint8, "layout": (T', S)}`` of ``video_id``.

        Raises:
            ItemError: the video does not decode.
        """
        rng = np.random.default_rng(int(torch.randint(2**31, ()))) if self.augment is not None else None
        frames, _, _ = read_frames(self.rows[video_id]["path"], self.sampling, self.geometry.clip_frames, rng)
        if self.augment is None:
            pixels = self.prep(frames)
        else:
            pixels = self.augment(torch.from_numpy(frames).permute(0, 3, 1, 2), seed=int(rng.integers(2**31)))
        return {"pixel_values": pixels, "layout": (self.geometry.out_frames(len(pixels)), self.geometry.patches)}

    def empty(self) -> torch.Tensor:
        """A text-only sample's ``(0, 3, H, W)`` uint8 pixels."""
        return torch.zeros((0, 3, *self.geometry.size), dtype=torch.uint8)


def online_visuals(videos: str | Path, frames: dict, tower, resize: str, augment: str = "none") -> OnlineVisuals:
    """The :class:`OnlineVisuals` of a stage: its ``frames`` settings (:class:`FrameSampling` fields, ``sampling``
    naming the method), ``tower``'s input size and geometry, the tower's ``resize`` and the ``augment`` preset of
    :mod:`pipeline.video.augment` (``none`` at evaluation)."""
    from pipeline.features.encoder import FramePrep

    sampling = FrameSampling(**{("method" if key == "sampling" else key): value for key, value in frames.items()})
    prep = FramePrep(tuple(tower.image_size), resize)
    if augment == "none":
        return OnlineVisuals(videos, sampling, prep, TowerGeometry.of(tower))
    from pipeline.video.augment import build_augment

    return OnlineVisuals(videos, sampling, prep, TowerGeometry.of(tower), build_augment(augment, tower.image_size[0]))
