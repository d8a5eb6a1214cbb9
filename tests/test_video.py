import os
import subprocess

import numpy as np
import pytest

from pipeline.io import write_table
from pipeline.manifest import package_file
from pipeline.shards import ItemError, JobError
from pipeline.video import compress, transcode
from pipeline.video.ffmpeg import Encoding, check_encoding, display_rotation, encode, probe
from pipeline.video.frames import FrameSampling, read_frames

TRANSCODE = Encoding(crf=23, preset="ultrafast", audio=True)
COMPRESS = Encoding(crf=23, preset="ultrafast", fps=3, size=224, audio=False)
FORMATS = ["webm", "mkv", "avi", "mov", "mpg", "mpeg", "ogv", "flv", "wmv", "asf", "3gp", "m4v", "f4v", "vob", "rm",
           "gif"]  # and m1v: a raw MPEG-1 stream has no reliable duration to cut by, see below


def _ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.mark.parametrize("ext", FORMATS)
def test_every_container_and_codec_ffmpeg_reads_becomes_h264_mp4(tmp_path, ext):
    source = package_file("iscc_samples", f"files/video/demo.{ext}")
    out = tmp_path / "seg.mp4"
    fields = encode({"path": str(source), "start": "2", "end": "4"}, out, TRANSCODE)
    info = probe(out)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert fields["duration"] == pytest.approx(2.0, abs=0.15)


@pytest.mark.parametrize("codec, encoder", [("vp8", "libvpx"), ("av1", "libsvtav1")])
def test_webm_with_vp8_and_av1(tmp_path, codec, encoder):
    encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True,
                              check=True).stdout
    if f" {encoder} " not in encoders:
        pytest.skip(f"this ffmpeg cannot encode {codec} ({encoder}) to make the test file")
    source = tmp_path / f"{codec}.webm"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=1", "-pix_fmt", "yuv420p", "-c:v", encoder,
            str(source))
    assert probe(source).codec == codec
    assert encode({"path": str(source)}, tmp_path / "out.mp4", TRANSCODE)["frames"] == 10


def test_a_raw_mpeg1_stream_converts_whole(tmp_path):
    source = package_file("iscc_samples", "files/video/demo.m1v")
    assert encode({"path": str(source)}, tmp_path / "out.mp4", TRANSCODE)["frames"] > 1000


def test_transcode_keeps_audio_and_stream_copies_an_uncut_h264_mp4(tmp_path, clips):
    cut = tmp_path / "cut.mp4"
    encode({"path": str(clips["webm"]), "start": "10", "end": "15"}, cut, TRANSCODE)
    assert probe(cut).has_audio and probe(cut).duration == pytest.approx(5.0, abs=0.1)
    copy = tmp_path / "copy.mp4"
    encode({"path": str(clips["bikes"])}, copy, TRANSCODE)
    source, copied = probe(clips["bikes"]), probe(copy)
    assert (copied.frames, copied.width, copied.height) == (source.frames, source.width, source.height)


def test_rotation_is_applied(tmp_path):
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x180:rate=10:duration=2", "-pix_fmt", "yuv420p", "-c:v", "libx264",
            str(plain))
    _ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v", "rotate=90", str(rotated))
    assert display_rotation(rotated) == 90 and display_rotation(plain) == 0
    out = tmp_path / "out.mp4"
    encode({"path": str(rotated)}, out, TRANSCODE)  # not stream-copied: decoders that ignore rotation read it upright
    info = probe(out)
    assert (info.width, info.height, display_rotation(out)) == (180, 320, 0)
    encode({"path": str(rotated)}, out, COMPRESS)
    assert (probe(out).width, probe(out).height) == (224, 398)


def test_odd_dimensions_become_even(tmp_path):
    odd = tmp_path / "odd.mkv"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=175x143:rate=10:duration=1", "-pix_fmt", "yuv444p", "-c:v", "libx264",
            str(odd))
    out = tmp_path / "even.mp4"
    encode({"path": str(odd)}, out, TRANSCODE)
    info = probe(out)
    assert (info.width, info.height, info.pix_fmt) == (174, 142, "yuv420p")


@pytest.mark.parametrize("source, size", [("bikes", (528, 224)), ("carphone", (274, 224))])
def test_compress_to_3_fps_short_side_224_without_audio(tmp_path, clips, source, size):
    out = tmp_path / "small.mp4"
    encode({"path": str(clips[source])}, out, COMPRESS)
    info = probe(out)
    assert (info.width, info.height) == size
    assert info.fps == pytest.approx(3.0)
    assert not info.has_audio


def test_single_pass_cuts_and_compresses_the_raw_file(tmp_path, clips):
    out = tmp_path / "small.mp4"
    fields = encode({"path": str(clips["webm"]), "start": "20", "end": "25"}, out, COMPRESS)
    assert (fields["width"], fields["height"], fields["frames"]) == (274, 224, 15)
    assert fields["duration"] == pytest.approx(5.0, abs=0.1)


def test_variable_frame_rate_becomes_constant(tmp_path):
    vfr = tmp_path / "vfr.mkv"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=30:duration=2", "-vf",
            "setpts='if(lt(N,30),N/30,1+(N-30)/7.5)/TB'", "-fps_mode", "vfr", "-c:v", "libx264", str(vfr))
    out = tmp_path / "cfr.mp4"
    fields = encode({"path": str(vfr)}, out, COMPRESS)
    assert probe(out).fps == pytest.approx(3.0)
    assert fields["frames"] == pytest.approx(fields["duration"] * 3, abs=1)


def test_a_one_frame_video_keeps_its_frame(tmp_path):
    one = tmp_path / "one.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x180:rate=25:duration=0.04", "-pix_fmt", "yuv420p", "-c:v",
            "libx264", str(one))
    out = tmp_path / "out.mp4"
    assert encode({"path": str(one)}, out, COMPRESS)["frames"] == 1


def test_start_past_the_end_is_refused(tmp_path, clips):
    with pytest.raises(ItemError, match="lies past the end"):
        encode({"path": str(clips["carphone"]), "start": "30"}, tmp_path / "x.mp4", TRANSCODE)


def _bad(tmp_path, clips, kind):
    path = tmp_path / f"{kind}.bad"
    webm, bikes = clips["webm"].read_bytes(), clips["bikes"].read_bytes()
    if kind == "zero_bytes":
        path = path.with_suffix(".mp4")
        path.write_bytes(b"")
    elif kind == "text_as_mp4":
        path = path.with_suffix(".mp4")
        path.write_bytes(clips["text"].read_bytes())
    elif kind == "moov_missing":  # an mp4 cut off before its index: a damaged video, not text
        path = path.with_suffix(".mp4")
        carphone = clips["carphone"].read_bytes()
        path.write_bytes(carphone[: len(carphone) // 2])
    elif kind == "truncated":
        path = path.with_suffix(".webm")
        path.write_bytes(webm[: len(webm) // 2])
    elif kind == "corrupt_middle":
        path = path.with_suffix(".mp4")
        data = bytearray(bikes)
        data[len(data) // 2: len(data) // 2 + 30000] = np.random.default_rng(0).bytes(30000)
        path.write_bytes(bytes(data))
    elif kind == "no_decodable_frame":  # a valid container whose frames are all zeros
        path = path.with_suffix(".mp4")
        data, offset = bytearray(bikes), 0
        while offset < len(data):
            size, box = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
            if box == b"mdat":
                data[offset + 8:offset + size] = bytes(size - 8)
            offset += size
        path.write_bytes(bytes(data))
    elif kind == "audio_only":
        path = package_file("iscc_samples", "files/audio/demo.mp3")
    return path


@pytest.mark.parametrize("kind, reason", [
    ("zero_bytes", r"^empty file \(0 bytes\)$"),
    ("text_as_mp4", r"^not a video: text, starting 'ISCC Test Document! Lorem ipsum dolor si'$"),
    ("moov_missing", r"^libav: Invalid data found when processing input .*moov atom not found"),
    ("truncated", r"ffmpeg reported 1 error\(s\): .*File ended prematurely"),
    ("corrupt_middle", r"ffmpeg reported \d+ error\(s\): .*Invalid NAL unit size"),
    ("audio_only", r"no video stream \(streams: audio\)"),
    ("no_decodable_frame", r"ffmpeg reported \d+ error\(s\): .*Invalid NAL unit size"),
])
def test_bad_files_fail_with_what_the_tool_said(tmp_path, clips, kind, reason):
    with pytest.raises(ItemError, match=reason):
        encode({"path": str(_bad(tmp_path, clips, kind))}, tmp_path / "out.mp4", TRANSCODE)


def test_decode_errors_can_be_tolerated(tmp_path, clips):
    corrupt = _bad(tmp_path, clips, "corrupt_middle")
    tolerant = Encoding(preset="ultrafast", max_decode_errors=10**6)
    assert encode({"path": str(corrupt)}, tmp_path / "out.mp4", tolerant)["frames"] > 0
    with pytest.raises(ItemError, match="no decodable frame: ffmpeg: "):
        encode({"path": str(_bad(tmp_path, clips, "no_decodable_frame"))}, tmp_path / "out.mp4", tolerant)
    truncated = _bad(tmp_path, clips, "truncated")  # tolerated errors, but half the promised duration is missing
    with pytest.raises(ItemError, match=r"truncated: 30\.\d+ s decoded of the 60\.15 s the input promises"):
        encode({"path": str(truncated)}, tmp_path / "out.mp4", tolerant)


def test_theora_decoder_noise_is_not_an_error(tmp_path):
    ogv = package_file("iscc_samples", "files/video/demo.ogv")
    assert encode({"path": str(ogv)}, tmp_path / "out.mp4", COMPRESS)["frames"] > 100


def test_a_still_image_is_a_one_frame_video(tmp_path):
    picture = package_file("iscc_samples", "files/image/demo.jpg")
    info = probe(picture)
    assert (info.still, info.frames, info.duration, info.width, info.height) == (True, 1, 1.0, 200, 133)
    out = encode({"path": str(picture)}, tmp_path / "picture.mp4", COMPRESS)
    assert out["frames"] == 1 and out["codec"] == "h264"
    frames, indices, _ = read_frames(tmp_path / "picture.mp4", FrameSampling("midpoints", 8))
    assert frames.shape[0] == 1 and indices.tolist() == [0]  # an image is one frame, not eight copies


def test_probe_refuses_what_is_not_a_video(tmp_path, clips):
    with pytest.raises(ItemError, match="not a video: libav reads it as 'tty'"):
        probe(clips["text"])
    picture = package_file("iscc_samples", "files/image/demo.jpg")
    disguised = tmp_path / "picture.mp4"  # a picture where a video should be
    disguised.write_bytes(picture.read_bytes())
    with pytest.raises(ItemError, match="not a video: libav reads it as 'jpeg_pipe'"):
        probe(disguised)
    with pytest.raises(ItemError, match="missing file"):
        probe(tmp_path / "absent.mp4")


@pytest.mark.parametrize("ext", [".mp4", ".mkv", ".webm", ".avi", ".m4v", ".video"])
def test_a_text_file_is_not_a_video_whatever_its_extension(tmp_path, clips, ext):
    notes = tmp_path / f"notes{ext}"
    notes.write_bytes(clips["text"].read_bytes())
    with pytest.raises(ItemError, match="^not a video: text, starting 'ISCC Test Document! Lorem ipsum dolor si'$"):
        probe(notes)
    html = tmp_path / f"error_page{ext}"  # what a server sends instead of the video, saved under its name
    html.write_text("<html><head><title>403 — Accès refusé</title></head></html>\n", encoding="utf-8")
    with pytest.raises(ItemError, match="^not a video: text, starting '<html><head><title>403 — Accès refusé</t'$"):
        probe(html)
    binary = tmp_path / f"noise{ext}"  # bytes that are neither text nor a video: libav's words
    binary.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(ItemError, match="^(libav: |no positive duration)"):
        probe(binary)


@pytest.mark.parametrize("encoding, said", [
    (Encoding(preset="veryfastt"), r"preset='veryfastt'.*invalid preset 'veryfastt'"),
    (Encoding(preset="ultrafast", fps=1e12, size=224, audio=False), r"fps=1000000000000\.0.*timebase is not set"),
])
def test_settings_that_fail_on_a_generated_clip_fail_the_job(encoding, said):
    with pytest.raises(JobError, match=r"^the encoding settings cannot work: a generated test clip fails with them \(.*"
                                       + said):
        check_encoding(encoding)


@pytest.mark.parametrize("stage", [transcode, compress])
def test_a_shard_job_with_unusable_settings_fails_before_any_video(tmp_path, clips, stage):
    table, status = tmp_path / "download.tsv", tmp_path / "status.tsv"
    write_table(table, [{"video_id": "band", "status": "ok", "reason": "", "path": str(clips["webm"])}],
                ["video_id", "status", "reason", "path"])
    args = ["--input", str(table), "--out-dir", str(tmp_path / "out"), "--status", str(status)]
    with pytest.raises(JobError, match="invalid preset 'slowest'"):  # was: every video failed, exit code 0
        stage.main([*args, "--preset", "slowest"])
    assert not status.exists() and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("option, value, field", [("--fps", "nan", "fps"), ("--fps", "0", "fps"),
                                                  ("--size", "0", "size"), ("--crf", "80", "crf"),
                                                  ("--timeout", "inf", "timeout_s")])
def test_settings_out_of_range_are_the_command_lines_error(tmp_path, capsys, option, value, field):
    args = ["--input", str(tmp_path / "in.tsv"), "--out-dir", str(tmp_path / "out"), "--status", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as exited:
        compress.main([*args, option, value])
    assert exited.value.code == 2 and f"Encoding.{field}: " in capsys.readouterr().err


def test_read_frames_decodes_only_the_sampled_frames(short_clip):
    sampling = FrameSampling("midpoints", num_frames=5)
    frames, indices, times = read_frames(short_clip, sampling)
    assert frames.shape == (5, 144, 176, 3) and frames.dtype == np.uint8
    assert indices.tolist() == sampling.indices(48).tolist()
    assert np.all(np.diff(times) > 0) and times[-1] < 2.0


def test_read_frames_of_a_broken_file_is_an_item_error(tmp_path, clips):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clips["bikes"].read_bytes()[:5000])
    with pytest.raises(ItemError, match="decode error"):
        read_frames(broken, FrameSampling(num_frames=4))


def test_encode_writes_nothing_under_the_final_name_on_failure(tmp_path, clips):
    from pipeline.io import atomic_path

    final = tmp_path / "final.mp4"
    with pytest.raises(ItemError), atomic_path(final) as tmp:
        encode({"path": str(_bad(tmp_path, clips, "truncated"))}, tmp, TRANSCODE)
    assert not final.exists() and os.listdir(tmp_path) == ["truncated.webm"]
