"""PNG and GIF video grids: layout, upscaling and float/uint8 inputs."""
import numpy as np
import torch
from PIL import Image

from larp.core.visualize import PAD, save_video_grid_gif, save_video_grid_png


def videos_uint8(b=2, t=3, h=32, w=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (b, t, h, w, 3), dtype=np.uint8)


def test_png_grid_layout(tmp_path):
    v = videos_uint8()
    path = save_video_grid_png(v, tmp_path / "grid.png")  # 32 px frames upscaled x3 (nearest)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (PAD + 2 * (96 + PAD), PAD + 3 * (96 + PAD), 3)
    y, x = PAD + 1 * (96 + PAD), PAD + 2 * (96 + PAD)  # video 1, frame 2
    np.testing.assert_array_equal(img[y:y + 96:3, x:x + 96:3], v[1, 2])
    np.testing.assert_array_equal(img[y + 2:y + 96:3, x + 2:x + 96:3], v[1, 2])


def test_png_float_input_labels_and_subsampling(tmp_path):
    v = videos_uint8(t=8)
    as_float = torch.from_numpy(v).permute(0, 4, 1, 2, 3).float() / 255  # (B, 3, T, H, W)
    a = np.asarray(Image.open(save_video_grid_png(as_float, tmp_path / "f.png", scale=1)).convert("RGB"))
    b = np.asarray(Image.open(save_video_grid_png(v, tmp_path / "u.png", scale=1)).convert("RGB"))
    np.testing.assert_array_equal(a, b)
    sub = np.asarray(Image.open(save_video_grid_png(v, tmp_path / "s.png", nrow=2, scale=1)).convert("RGB"))
    assert sub.shape[1] == PAD + 2 * (32 + PAD)
    np.testing.assert_array_equal(sub[PAD:PAD + 32, PAD + 34:PAD + 66], v[0, 7])  # frames 0 and T-1 shown
    labeled = np.asarray(Image.open(save_video_grid_png(v, tmp_path / "l.png", row_labels=["red_right", "x"],
                                                        scale=1)).convert("RGB"))
    extra = labeled.shape[1] - b.shape[1]
    assert extra > 20 and (labeled[:, :extra] < 128).any()  # text drawn in the label column
    np.testing.assert_array_equal(labeled[:, extra:], b)


def test_gif_grid(tmp_path):
    v = videos_uint8(b=3, t=4, h=16, w=16)
    path = save_video_grid_gif(v, tmp_path / "grid.gif", fps=4)  # 2x2 tiles of 96 px (16 px x6)
    img = Image.open(path)
    assert img.n_frames == 4 and img.size == (PAD + 2 * (96 + PAD), PAD + 2 * (96 + PAD))
    img.seek(3)
    frame = np.asarray(img.convert("RGB")).astype(int)
    tile = frame[PAD + 96 + PAD:PAD + 96 + PAD + 96:6, PAD:PAD + 96:6]  # video 2 (row 1, col 0), frame 3
    assert np.abs(tile - v[2, 3]).mean() < 20  # GIF palette quantization
    assert np.abs(tile - v[1, 3]).mean() > 50


def test_curves_png(tmp_path):
    from larp.core.visualize import CURVE_COLORS, save_curves_png
    path = save_curves_png([("loss", {"a": ([0, 10, 20], [3.0, 2.0, 1.5]), "b": ([0, 20], [2.5, 2.4])}, None),
                            ("psnr", {"val": ([5, 10], [20.0, 25.0])}, ("baseline", 21.0))],
                           str(tmp_path / "c.png"), width=200, height=150)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (150, 400, 3)
    for k, color in enumerate(CURVE_COLORS[:2]):  # both series of the first panel are drawn in it
        assert (image[:, :200] == color).all(-1).sum() > 20, k
    assert (image[:, 200:] == CURVE_COLORS[0]).all(-1).sum() > 20
