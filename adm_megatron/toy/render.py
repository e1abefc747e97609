"""Latents to pictures: the 4 latent channels of a frame as one RGB tile, tiles in a labelled grid.

The colour of a tile is a fixed linear map of the channels (channel 0 red, 1 green, 2 blue,
3 magenta; negative values darken), so each class's colour mix shows as a hue. No VAE is involved.
"""

from __future__ import annotations

import numpy as np
import torch

CHANNEL_RGB = torch.tensor([
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [0.6, 0.0, 0.6],
])


def frame_to_rgb(frame: torch.Tensor, scale: float = 4.0) -> np.ndarray:
    """``[C, H, W]`` -> ``[H, W, 3]`` uint8 (0 maps to mid grey)."""
    rgb = torch.einsum("chw,cr->hwr", frame.float(), CHANNEL_RGB)
    return ((0.5 + 0.5 * rgb / scale).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def save_grid(rows: list[tuple[str, torch.Tensor]], path: str, zoom: int = 8, gap: int = 2) -> str:
    """One row per ``(label, samples [S, F, C, H, W])``: each sample's frames left to right,
    samples separated by a wider gap; the label on the left."""
    from PIL import Image, ImageDraw

    s, f, _, h, w = rows[0][1].shape
    tile_h, tile_w = h * zoom, w * zoom
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 12 + int(max(measure.textlength(label) for label, _ in rows))
    width = label_w + s * (f * (tile_w + gap) + 3 * gap)
    height = len(rows) * (tile_h + 2 * gap) + 2 * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, samples) in enumerate(rows):
        y = 2 * gap + r * (tile_h + 2 * gap)
        draw.text((4, y + tile_h // 2 - 6), label, fill=(0, 0, 0))
        x = label_w
        for i in range(samples.shape[0]):
            for j in range(f):
                tile = Image.fromarray(frame_to_rgb(samples[i, j])).resize((tile_w, tile_h), Image.NEAREST)
                canvas.paste(tile, (x, y))
                x += tile_w + gap
            x += 3 * gap
    canvas.save(path)
    return path
