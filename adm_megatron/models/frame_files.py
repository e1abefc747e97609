"""Rendered samples as files: frames ``[F, H, W, 3]`` in [0, 1] written as a gif or mp4 (a video) or
a png (the frames side by side; one frame is an image), 8-bit, by imageio / diffusers' exporter;
images tiled into one grid (from arrays, or from written png files)."""

from __future__ import annotations

import math
import os

import numpy as np

FORMATS = ("gif", "mp4", "png")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (pixels * 255).round().clip(0, 255).astype(np.uint8)


def sample_name(index: int, fmt: str) -> str:
    """The file name of sample ``index`` (every writer of samples names them so)."""
    return f"sample-{index:03d}.{fmt}"


def check_writer(fmt: str) -> None:
    """Refuse, in one line, a format this environment cannot write, before anything is rendered: mp4
    goes through diffusers' exporter, which needs imageio-ffmpeg's ffmpeg (a dependency of this
    package, but an environment put together by hand may lack it; it then failed after the render)."""
    if fmt != "mp4":
        return
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--format mp4: no ffmpeg to write mp4 with ({reason}); install imageio-ffmpeg, or "
                         "use --format gif or png") from None


def write_frames(frames: np.ndarray, path: str, fmt: str, fps: int = 8) -> None:
    """Write ``frames`` to ``path`` atomically: beside it first, then renamed, so a file that
    exists is complete (a resumed sampling keeps it)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    stem, ext = os.path.splitext(path)
    partial = f"{stem}.partial{ext}"  # the extension tells the writers the format
    if fmt == "gif":
        import imageio.v3 as iio

        iio.imwrite(partial, to_uint8(frames), extension=".gif", duration=1000 / fps, loop=0)
    elif fmt == "png":
        import imageio.v3 as iio

        iio.imwrite(partial, to_uint8(np.concatenate(list(frames), axis=1)), extension=".png")
    else:
        from diffusers.utils import export_to_video

        export_to_video(list(frames), partial, fps=fps)
    os.replace(partial, path)


def image_grid(images: list[np.ndarray]) -> np.ndarray:
    """``[H, W, 3]`` images in [0, 1] tiled row-major into a near-square grid (blank cells black)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w, c = images[0].shape
    grid = np.zeros((rows * h, cols * w, c), dtype=images[0].dtype)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = image
    return grid


def write_grid(image_paths: list[str], path: str) -> None:
    """The png images at ``image_paths`` (as written by :func:`write_frames`: 8-bit, so read back
    exactly) tiled by :func:`image_grid` into the png ``path``."""
    import imageio.v3 as iio

    write_frames(image_grid([iio.imread(p) / 255.0 for p in image_paths])[None], path, "png")
