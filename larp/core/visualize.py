"""Pictures of videos people can look at: a PNG grid (one row of frames per video) and an animated GIF grid.

Videos are float (B,3,T,H,W) in [0,1] (model outputs; clamped) or uint8 (B,T,H,W,3) (decoded files), as
torch tensors or numpy arrays; a single video without the batch dimension is accepted too. Small frames are
upscaled with nearest-neighbour so 32x32 videos stay visible and sharp.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from larp.core.io import atomic_write, to_uint8

PAD = 2
MIN_FRAME_PX = 96


def to_uint8_videos(videos):
    """uint8 (B,T,H,W,3) from float (B,3,T,H,W) in [0,1] or uint8 (B,T,H,W,3) (batch dim optional)."""
    if hasattr(videos, "detach"):
        videos = videos.detach().cpu()
        videos = videos.float().numpy() if videos.is_floating_point() else videos.numpy()
    v = np.asarray(videos)
    if v.dtype == np.uint8:
        v = v[None] if v.ndim == 4 else v
        if v.ndim != 5 or v.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be (B,T,H,W,3), got {v.shape}")
        return v
    v = v[None] if v.ndim == 4 else v
    if v.ndim != 5 or v.shape[1] != 3:
        raise ValueError(f"float videos must be (B,3,T,H,W) in [0,1], got {v.shape}")
    return to_uint8(v)  # (B, T, H, W, 3)


def _scale_for(h, w, scale):
    return scale if scale is not None else max(1, int(np.ceil(MIN_FRAME_PX / max(1, min(h, w)))))


def _upscale(frame, scale):
    return frame.repeat(scale, 0).repeat(scale, 1) if scale > 1 else frame


def _label_width(labels, font):
    if not labels:
        return 0
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(int(draw.textlength(str(t), font=font)) for t in labels) + 2 * PAD + 4


def _atomic_save(image_or_frames, path, **kwargs):
    atomic_write(path, lambda tmp: image_or_frames.save(tmp, **kwargs))


def video_grid_image(videos, row_labels=None, nrow=None, scale=None):
    """PIL image: one row per video, its frames left to right, optional label text at the left of each row.

    `nrow`: number of frames shown per row (evenly subsampled; None = all frames).
    """
    v = to_uint8_videos(videos)  # (B, T, H, W, 3)
    b, t, h, w, _ = v.shape
    if row_labels is not None and len(row_labels) != b:
        raise ValueError(f"{len(row_labels)} row labels for {b} videos")
    cols = np.arange(t) if nrow is None or nrow >= t else np.round(np.linspace(0, t - 1, nrow)).astype(int)
    s = _scale_for(h, w, scale)
    fh, fw = h * s, w * s
    font = ImageFont.load_default()
    lw = _label_width(row_labels, font)
    canvas = np.full((b * (fh + PAD) + PAD, lw + len(cols) * (fw + PAD) + PAD, 3), 255, dtype=np.uint8)
    for i in range(b):
        y = PAD + i * (fh + PAD)
        for j, f in enumerate(cols):
            x = lw + PAD + j * (fw + PAD)
            canvas[y:y + fh, x:x + fw] = _upscale(v[i, f], s)
    image = Image.fromarray(canvas)
    if row_labels is not None:
        draw = ImageDraw.Draw(image)
        for i, text in enumerate(row_labels):
            draw.text((PAD + 2, PAD + i * (fh + PAD) + fh // 2), str(text), fill=(0, 0, 0), font=font, anchor="lm")
    return image


def save_video_grid_png(videos, path, row_labels=None, nrow=None, scale=None):
    """Save the frame grid of `videos` (see video_grid_image) as a PNG, atomically."""
    _atomic_save(video_grid_image(videos, row_labels, nrow, scale), path, format="PNG")
    return path


def save_preview_png(path, videos, names, real=None, kinds=("real", "pred")):
    """The preview of generated (or reconstructed) float videos (B, 3, T, H, W): one row each, labelled `names`.
    With `real` (B, 3, T, H, W), each row follows its real clip and the labels start with `kinds`."""
    if real is None:
        return save_video_grid_png(videos.float().cpu(), path, row_labels=list(names))
    rows = torch.stack([real.to(videos.device).float(), videos.float()], dim=1).flatten(0, 1)  # (2B, 3, T, H, W)
    return save_video_grid_png(rows.cpu(), path, row_labels=[f"{k} {n}" if n else k for n in names for k in kinds])


def save_video_grid_gif(videos, path, nrow=None, fps=8, scale=None, row_labels=None):
    """Animated GIF: videos tiled in a grid (`nrow` videos per row; default ~square), animated over time.

    `row_labels` here label each video (drawn in its top-left corner).
    """
    v = to_uint8_videos(videos)  # (B, T, H, W, 3)
    b, t, h, w, _ = v.shape
    per_row = nrow or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / per_row))
    s = _scale_for(h, w, scale)
    fh, fw = h * s, w * s
    font = ImageFont.load_default()
    frames = []
    for f in range(t):
        canvas = np.full((rows * (fh + PAD) + PAD, per_row * (fw + PAD) + PAD, 3), 255, dtype=np.uint8)
        for i in range(b):
            y, x = PAD + (i // per_row) * (fh + PAD), PAD + (i % per_row) * (fw + PAD)
            canvas[y:y + fh, x:x + fw] = _upscale(v[i, f], s)
        image = Image.fromarray(canvas)
        if row_labels is not None:
            draw = ImageDraw.Draw(image)
            for i, text in enumerate(row_labels):
                y, x = PAD + (i // per_row) * (fh + PAD), PAD + (i % per_row) * (fw + PAD)
                draw.text((x + 2, y + 1), str(text), fill=(255, 255, 255), font=font, stroke_width=1,
                          stroke_fill=(0, 0, 0))
        frames.append(image)
    _atomic_save(frames[0], path, format="GIF", save_all=True, append_images=frames[1:],
                 duration=max(20, int(round(1000 / fps))), loop=0)
    return path


CURVE_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def curves_image(panels, width=420, height=260):
    """PIL image of line plots side by side. panels: list of (title, {label: (xs, ys)}, hline or None); each
    panel has its own y range, a dashed gray `hline` (a baseline) if given, and a legend of its labels."""
    font = ImageFont.load_default()
    left, right, top, bottom = 52, 10, 22, 30
    image = Image.new("RGB", (width * len(panels), height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for k, (title, series, hline) in enumerate(panels):
        x0, x1, y0, y1 = k * width + left, (k + 1) * width - right, top, height - bottom
        xs = [x for sx, _ in series.values() for x in sx]
        ys = [y for _, sy in series.values() for y in sy if np.isfinite(y)] + ([hline[1]] if hline else [])
        if not xs or not ys:
            continue
        xmin, xmax = min(xs), max(max(xs), min(xs) + 1)
        ymin, ymax = min(ys), max(ys)
        pad = 0.05 * (ymax - ymin or 1.0)
        ymin, ymax = ymin - pad, ymax + pad

        def px(x, y):
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))

        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text(((x0 + x1) / 2, 4), title, fill=(0, 0, 0), font=font, anchor="mt")
        for frac in (0.0, 0.5, 1.0):
            yv, xv = ymin + frac * (ymax - ymin), xmin + frac * (xmax - xmin)
            draw.text((x0 - 4, px(xmin, yv)[1]), f"{yv:.3g}", fill=(0, 0, 0), font=font, anchor="rm")
            draw.text((px(xv, ymin)[0], y1 + 4), f"{xv:.0f}", fill=(0, 0, 0), font=font, anchor="mt")
        draw.text(((x0 + x1) / 2, height - 4), "step", fill=(0, 0, 0), font=font, anchor="mb")
        legend = list(series.items())
        if hline:
            label, value = hline
            yy = px(xmin, value)[1]
            for xa in range(int(x0), int(x1), 8):
                draw.line([(xa, yy), (min(xa + 4, x1), yy)], fill=(128, 128, 128))
            draw.text((x1 - 4, yy - 2), label, fill=(100, 100, 100), font=font, anchor="rb")
        for i, (label, (sx, sy)) in enumerate(legend):
            color = CURVE_COLORS[i % len(CURVE_COLORS)]
            pts = [px(x, y) for x, y in zip(sx, sy) if np.isfinite(y)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for p in pts if len(pts) < 30 else []:
                draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
            draw.text((x0 + 6, y0 + 4 + 12 * i), label, fill=color, font=font)
    return image


def save_curves_png(panels, path, width=420, height=260):
    """Save `curves_image(panels)` as a PNG, atomically."""
    _atomic_save(curves_image(panels, width, height), path, format="PNG")
    return path
