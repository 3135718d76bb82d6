"""The clips a training stage reads, from the config's `data` section: the training set and evenly spaced
evaluation clips (the val CSV, or the training CSV when none is given)."""
import numpy as np
import torch

from larp.data.dataset import VideoDataset


def clip_dataset(data, csv, train):
    """VideoDataset of `csv` with the geometry and options of `data` (random crops / flips only when `train`)."""
    return VideoDataset(csv, frame_num=data.frame_num, input_size=data.input_size, train=train,
                        hflip=data.hflip if train else False, skip_bad=data.skip_bad, cache_dir=data.cache_dir)


def eval_clips(data, count):
    """`count` evaluation clips spread evenly over the val CSV: (videos (B, 3, T, S, S) or None, labels (B,),
    the evaluation dataset)."""
    ds = clip_dataset(data, data.val_csv or data.csv, train=False)
    count = min(count, len(ds))
    idx = np.linspace(0, len(ds) - 1, count).round().astype(int).tolist() if count else []
    items = [ds[i] for i in idx]
    videos = torch.stack([it["video"] for it in items]) if items else None
    return videos, torch.tensor([it["label"] for it in items], dtype=torch.long), ds
