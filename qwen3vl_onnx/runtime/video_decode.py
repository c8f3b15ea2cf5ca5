"""Read chosen frames of a video file with PyAV (FFmpeg), keeping only those frames.

Frames are numbered by presentation time (``round((pts - start) * fps)``), which equals the decode
count transformers' PyAV reader uses on constant-rate video and stays right after a seek. When the
next wanted frame lies further ahead than the keyframe spacing seen so far, the reader seeks to the
keyframe before it instead of decoding everything in between, so a long video sampled sparsely
costs the frames near the samples, not the whole file. Each frame is handed to ``keep`` as soon as
it is decoded, so the caller can shrink it before the next one arrives.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

VideoFile = str | Path | bytes

# Seek when the next wanted frame is more than this many frames ahead and no keyframe spacing has
# been seen yet (x264's default keyframe interval); afterwards the spacing seen is used.
DEFAULT_KEYFRAME_INTERVAL = 250


@dataclass(frozen=True)
class VideoInfo:
    """What the container says: frame count, average frame rate (None if unknown) and frame size."""

    total_frames: int
    fps: float | None
    width: int
    height: int


def _av() -> Any:
    try:
        import av
    except ImportError:  # pragma: no cover - av is a base dependency
        raise UserError("video input needs PyAV: pip install av") from None
    return av


def _name(source: VideoFile) -> str:
    return "video data" if isinstance(source, bytes) else str(source)


def _open(source: VideoFile) -> Any:
    av = _av()
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: video file not found")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: video file is empty")
        target: Any = str(path)
    else:
        if not source:
            raise UserError("video data is empty")
        target = io.BytesIO(source)
    try:
        container = av.open(target, metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{_name(source)}: cannot read video ({type(e).__name__})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{_name(source)}: not a video (no video stream)")
    kind = container.format.name or ""
    if kind == "image2" or kind.endswith("_pipe"):  # FFmpeg reads a picture as a one-frame video
        container.close()
        raise UserError(f"{_name(source)}: a picture ({kind.removesuffix('_pipe')}), not a video: give it as an image")
    return container


def _count_frames(container: Any, stream: Any) -> int:
    """Frames in the stream when the container does not say: demux (no decoding) and count packets."""
    n = sum(1 for p in container.demux(stream) if p.size)
    container.seek(0)
    return n


def probe(source: VideoFile) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream."""
    container = _open(source)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        total = int(stream.frames or 0)
        if total <= 0:
            total = _count_frames(container, stream)
        if total <= 0 or not stream.width or not stream.height:
            raise UserError(f"{_name(source)}: video has no frames")
        return VideoInfo(total, fps, int(stream.width), int(stream.height))
    except _av().FFmpegError as e:
        raise UserError(f"{_name(source)}: cannot read video ({type(e).__name__})") from None
    finally:
        container.close()


def read_frames(source: VideoFile, indices: Sequence[int], fps: float | None, keep: Callable[[int, np.ndarray], None]) -> None:
    """Decode the frames numbered ``indices`` (sorted, distinct) and call ``keep(i, rgb)`` for each,
    ``i`` its position in ``indices``; a wanted frame missing from the stream is replaced by the
    next one decoded. Frames missing at the end are the last one repeated when the stream ends
    within a second of where its header said (headers are often a frame or two off); a stream that
    ends well before (a file cut short) is refused, as its prompt would show a frozen picture."""
    av = _av()
    wanted = list(indices)
    container = _open(source)
    try:
        kept, last_number, last = _read(container, wanted, fps, keep)
    except av.FFmpegError as e:
        raise UserError(f"{_name(source)}: video is damaged ({type(e).__name__})") from None
    finally:
        container.close()
    if kept == len(wanted):
        return
    if last is None:
        raise UserError(f"{_name(source)}: video has no decodable frames")
    if wanted[-1] - last_number > max(2.0, fps or 0.0):
        at = f"{last_number / fps:.1f}s" if fps else f"frame {last_number}"
        raise UserError(f"{_name(source)}: the video's frames stop at {at}, before {len(wanted) - kept} of the "
                        f"{len(wanted)} frames sampled over the length its header gives: the file is cut short or "
                        "damaged (a video end before that point reads the part that is there)")  # fmt: skip
    rgb = last.to_ndarray(format="rgb24")
    for j in range(kept, len(wanted)):
        keep(j, rgb)


def _read(container: Any, wanted: list[int], fps: float | None, keep: Callable[[int, np.ndarray], None]
          ) -> tuple[int, int, Any]:  # fmt: skip
    """Keep what the stream has of ``wanted``: how many were kept, the last frame's number, the last frame."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb = float(stream.time_base) if stream.time_base else None
    start = stream.start_time or 0
    use_pts = fps is not None and tb is not None

    def number(frame: Any, count: int) -> int:
        if use_pts and frame.pts is not None:
            return int(round((frame.pts - start) * tb * fps))
        return count

    k, count, last, last_key, keyint, i = 0, -1, None, None, DEFAULT_KEYFRAME_INTERVAL, -1
    sought = -1  # the frame the last seek aimed at: no new seek before it is reached (a longer GOP than seen)
    while k < len(wanted):
        restart = False
        for frame in container.decode(stream):
            count += 1
            i = number(frame, count)
            if frame.key_frame:
                if last_key is not None and i > last_key:
                    keyint = i - last_key
                last_key = i
            last = frame
            while k < len(wanted) and wanted[k] <= i:
                keep(k, frame.to_ndarray(format="rgb24"))
                k += 1
            if k < len(wanted) and use_pts and i >= sought and wanted[k] - i > keyint:
                assert tb is not None and fps is not None
                container.seek(int(start + (wanted[k] / fps) / tb), stream=stream, backward=True, any_frame=False)
                sought, last_key, restart = wanted[k], None, True
                break
        if not restart:
            break
    return k, i, last
