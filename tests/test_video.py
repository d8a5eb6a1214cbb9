import subprocess

import numpy as np
import pytest

from pipeline.shards import ItemError
from pipeline.video.compress import compress
from pipeline.video.ffmpeg import probe
from pipeline.video.frames import read_frames, sample_indices
from pipeline.video.transcode import transcode


def test_transcode_cuts_a_webm_segment_to_h264_mp4_with_audio(tmp_path, clips):
    out = tmp_path / "seg.mp4"
    fields = transcode({"path": str(clips["webm"]), "start": "10", "end": "15"}, out, 23, "ultrafast", 1, 60)
    info = probe(out)
    assert (info.codec, info.pix_fmt, info.has_audio) == ("h264", "yuv420p", True)
    assert info.duration == pytest.approx(5.0, abs=0.1)
    assert fields["duration"] == pytest.approx(5.0, abs=0.1) and fields["width"] == 176


def test_transcode_stream_copies_an_h264_mp4_without_cut(tmp_path, clips):
    out = tmp_path / "copy.mp4"
    transcode({"path": str(clips["bikes"]), "start": "", "end": ""}, out, 23, "ultrafast", 1, 60)
    source, copied = probe(clips["bikes"]), probe(out)
    assert (copied.frames, copied.width, copied.height) == (source.frames, source.width, source.height)


def test_transcode_rejects_a_start_past_the_end(tmp_path, clips):
    with pytest.raises(ItemError, match="lies past the end"):
        transcode({"path": str(clips["carphone"]), "start": "30", "end": ""}, tmp_path / "x.mp4", 23, "ultrafast", 1,
                  60)


def test_odd_dimensions_become_even(tmp_path):
    odd = tmp_path / "odd.mkv"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=175x143:rate=10:duration=1",
                    "-pix_fmt", "yuv444p", "-c:v", "libx264", str(odd)], check=True)
    out = tmp_path / "even.mp4"
    transcode({"path": str(odd), "start": "", "end": ""}, out, 23, "ultrafast", 1, 60)
    info = probe(out)
    assert (info.width, info.height, info.pix_fmt) == (174, 142, "yuv420p")


@pytest.mark.parametrize("source, size", [("bikes", (528, 224)), ("carphone", (274, 224))])
def test_compress_to_3_fps_short_side_224_without_audio(tmp_path, clips, source, size):
    out = tmp_path / "small.mp4"
    compress({"path": str(clips[source])}, out, fps=3, size=224, crf=23, preset="ultrafast", threads=1, timeout_s=60)
    info = probe(out)
    assert (info.width, info.height) == size
    assert info.fps == pytest.approx(3.0)
    assert not info.has_audio


def test_non_videos_fail_with_the_tools_reason(tmp_path, clips):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(clips["text"].read_bytes())
    with pytest.raises(ItemError, match="ffprobe: .*moov atom not found"):
        probe(fake)
    with pytest.raises(ItemError, match="not a video: ffprobe reads it as 'tty'"):
        probe(clips["text"])
    with pytest.raises(ItemError, match="missing file"):
        probe(tmp_path / "absent.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ItemError, match="ffprobe"):
        probe(empty)


def test_sample_indices_are_segment_midpoints():
    assert sample_indices(100, 4).tolist() == [12, 37, 62, 87]
    assert sample_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        sample_indices(0, 4)


def test_read_frames_decodes_only_the_sampled_frames(short_clip):
    frames, indices, times = read_frames(short_clip, 5)
    assert frames.shape == (5, 144, 176, 3) and frames.dtype == np.uint8
    assert indices.tolist() == sample_indices(48, 5).tolist()
    assert np.all(np.diff(times) > 0) and times[-1] < 2.0


def test_read_frames_of_a_broken_file_is_an_item_error(tmp_path, clips):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clips["bikes"].read_bytes()[:5000])
    with pytest.raises(ItemError):
        read_frames(broken, 4)
