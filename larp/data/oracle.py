"""Analytic classifier of synthetic videos (no learned weights): measures whether generated videos show their class.

The disk is the only saturated thing in a frame. Per frame, subtract the frame's median color (the
background), drop the gray component (the texture is gray), and take the chroma magnitude as saliency; pixels
above half the frame's peak saliency form the object. The object's mean chroma vector gives its hue, matched
to the nearest class color; a weighted linear fit of the object's centroid over time gives its velocity,
matched to the nearest class direction. Frames are resized to 32x32 first, so any size and any T >= 2 work.

    python -m larp.data.oracle data/synthetic/val.csv
"""

import numpy as np
import torch
import torch.nn.functional as F

from larp.core.cli import parser
from larp.data.dataset import check_labels, read_video_csv
from larp.data.synthetic import COLORS, DIRECTIONS, class_grid, class_names
from larp.data.video_io import read_frames
from larp.core.errors import UsageError, VideoReadError, run_cli
from larp.core.utils import progress_bar

WORK_SIZE = 32


def _as_float_thwc(frames):
    """uint8 or float [0,1] video, (T,H,W,3) or (3,T,H,W), numpy or torch -> float32 (T,32,32,3) in [0,1]."""
    if torch.is_tensor(frames):
        frames = frames.detach().cpu()
        frames = frames.numpy() if frames.dtype == torch.uint8 else frames.float().numpy()
    x = np.asarray(frames)
    if x.ndim != 4:
        raise ValueError(f"expected a video (T,H,W,3) or (3,T,H,W), got shape {x.shape}")
    x = x.astype(np.float64) / 255 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.shape[-1] != 3 and x.shape[0] == 3:
        x = x.transpose(1, 2, 3, 0)  # (3,T,H,W) -> (T,H,W,3)
    if x.shape[1:3] != (WORK_SIZE, WORK_SIZE):
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float()  # (T, 3, H, W)
        t = F.interpolate(t, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = t.permute(0, 2, 3, 1).numpy().astype(np.float64)
    return np.clip(x, 0, 1)  # (T, 32, 32, 3)


def _chroma(rgb):
    """Component of color vectors (..., 3) orthogonal to the gray axis."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb - rgb.mean(-1, keepdims=True)


def object_track(frames):
    """(chroma vector (3,), centroids (T,2) as x,y, per-frame object mass (T,)) of the salient object."""
    x = _as_float_thwc(frames)  # (T, S, S, 3)
    background = np.median(x.reshape(x.shape[0], -1, 3), axis=1)[:, None, None, :]  # (T, 1, 1, 3)
    chroma = _chroma(x - background)  # (T, S, S, 3)
    saliency = np.linalg.norm(chroma, axis=-1)  # (T, S, S)
    # 3x3 box filter: suppresses isolated noisy pixels before taking each frame's peak
    padded = np.pad(saliency, ((0, 0), (1, 1), (1, 1)), mode="edge")
    smooth = sum(padded[:, i:i + WORK_SIZE, j:j + WORK_SIZE] for i in range(3) for j in range(3)) / 9
    peak = smooth.reshape(len(x), -1).max(1)[:, None, None]
    weight = np.clip(smooth - 0.5 * peak, 0, None)  # (T, S, S)
    mass = weight.sum((1, 2)) + 1e-12
    yy, xx = np.mgrid[0:WORK_SIZE, 0:WORK_SIZE] + 0.5
    centroids = np.stack([(weight * xx).sum((1, 2)) / mass, (weight * yy).sum((1, 2)) / mass], -1)  # (T, 2)
    color = (weight[..., None] * chroma).sum((0, 1, 2)) / mass.sum()
    return color, centroids, mass


def _velocity(centroids, mass):
    """Weighted least-squares slope of the centroid over time, px/frame (x, y)."""
    t = np.arange(len(centroids), dtype=np.float64)
    w = mass / mass.sum()
    t_mean = (w * t).sum()
    c_mean = (w[:, None] * centroids).sum(0)
    var = (w * (t - t_mean) ** 2).sum() + 1e-12
    return (w[:, None] * (t - t_mean)[:, None] * (centroids - c_mean)).sum(0) / var


def predict_class(frames, num_classes):
    """Label (color_index * num_dirs + dir_index) of the synthetic class shown in `frames` (T >= 2)."""
    colors, dirs = class_grid(num_classes)
    if np.shape(frames)[0 if np.shape(frames)[-1] == 3 else 1] < 2:
        raise ValueError("predict_class needs at least 2 frames (motion is part of the class)")
    color, centroids, mass = object_track(frames)
    refs = _chroma(np.array([COLORS[c] for c in colors]))
    refs = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    color_index = int(np.argmax(refs @ color))
    velocity = _velocity(centroids, mass)
    dir_index = int(np.argmax(np.array([DIRECTIONS[d] for d in dirs]) @ velocity))
    return color_index * len(dirs) + dir_index


def _infer_num_classes(df):
    num_classes = int(df["label"].max()) + 1
    synthetic_names = {f"{c}_{d}" for c in COLORS for d in DIRECTIONS}
    actions = set(df["action"])
    if actions <= synthetic_names:
        # the smallest valid class count whose names match every row (CSV may hold only some classes)
        for n in (4, 6, 8, 10, 12, 16, 20, 24):
            if n >= num_classes and all(class_names(n)[l] == a for l, a in zip(df["label"], df["action"])):
                return n
        raise UsageError("labels and action names of the CSV match no synthetic class set; pass --num-classes")
    return num_classes


def oracle_predictions(csv_or_df, num_classes=None, progress=False, skip_bad=False):
    """(predictions, labels, num_classes) for every video of a CSV (or DataFrame with path,label[,action]).

    With `skip_bad`, unreadable videos are left out of both arrays (and counted: the returned arrays are shorter
    than the CSV by that many); otherwise the first one raises VideoReadError naming it.
    """
    df = csv_or_df if hasattr(csv_or_df, "columns") else read_video_csv(csv_or_df)
    if "action" not in df.columns:
        df = df.assign(action=df["label"].astype(str))
    num_classes = num_classes or _infer_num_classes(df)
    check_labels(df, num_classes, "the CSV" if hasattr(csv_or_df, "columns") else csv_or_df,
                 f"--num-classes {num_classes}")
    preds, labels = [], []
    for path, label in progress_bar(zip(df["path"], df["label"]), total=len(df), desc="oracle", disable=not progress):
        try:
            frames = read_frames(path)
        except VideoReadError as e:
            if not skip_bad:
                raise VideoReadError(f"{e} (--skip-bad leaves unreadable videos out, counted)") from None
            continue
        preds.append(predict_class(frames, num_classes))
        labels.append(int(label))
    return np.array(preds, dtype=int), np.array(labels, dtype=int), num_classes


def oracle_accuracy(csv_or_df, num_classes=None):
    """Fraction of videos whose predicted class equals their label."""
    preds, labels, _ = oracle_predictions(csv_or_df, num_classes)
    return float((preds == labels).mean())


def accuracy_table(preds, labels, num_classes):
    names = class_names(num_classes)
    lines = [f"{'label':>5}  {'class':<14} {'videos':>6} {'correct':>7} {'accuracy':>8}"]
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            lines.append(f"{c:>5}  {names[c]:<14} {int(sel.sum()):>6} {int((preds[sel] == c).sum()):>7} "
                         f"{(preds[sel] == c).mean():>8.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("csv", help="CSV (id,path,action,label) of synthetic or generated videos")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: the smallest synthetic class set consistent with the labels and action names; "
                        "pass it when the CSV holds only some of the classes")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable videos out (they are counted)")
    return p.parse_args(argv)


def main(args):
    preds, labels, num_classes = oracle_predictions(args.csv, args.num_classes, progress=True,
                                                    skip_bad=args.skip_bad)
    skipped = len(read_video_csv(args.csv)) - len(labels)
    if skipped:
        print(f"--skip-bad: skipped {skipped} unreadable video(s) of {args.csv}")
    if not len(labels):
        raise VideoReadError(f"{args.csv}: no readable video")
    print(f"{len(labels)} videos of {args.csv}, {num_classes}-class synthetic set")
    print(accuracy_table(preds, labels, num_classes))
    print(f"oracle_accuracy={(preds == labels).mean():.4f}")


if __name__ == "__main__":
    run_cli(main, parse_args())
