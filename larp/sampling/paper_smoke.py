"""The inputs of `eval/reproduce_paper.py --smoke`: tiny synthetic trees laid out like UCF-101 and K600 (their CSVs
built by larp.data.make_csv as for the real sets) and tiny models in the release formats, so every row of the
papers' table runs end to end on a CPU in minutes, offline.

The class-conditional rows use the golden tiny tokenizer, raster and NAR generators (tests/fixtures/reference/
golden/tiny, the released layouts at tiny sizes); the frame-prediction row a tiny raster frame-prediction generator
written here. The videos are the synthetic moving disks (larp.data.synthetic), 8 frames of 32x32.
"""
import os

import numpy as np
import pandas as pd
import torch

from larp.core.io import atomic_write_text
from larp.data.make_csv import k600_tables, ucf101_tables, write_csv
from larp.data.synthetic import render_video
from larp.data.video_io import write_video
from larp.models.generator import ModelArgs, build_generator

ACTIONS = ("RedRight", "RedLeft", "GreenRight", "GreenLeft")  # synthetic classes 0-3, spelled as UCF-101 actions
FRAMES, SIZE = 8, 32
SMOKE_SAMPLES = 8  # samples (clips) per row


def _write(path, label, k, seed):
    video = render_video(label, len(ACTIONS), FRAMES, SIZE, np.random.default_rng([seed, label, k]))
    write_video(path, video)


def ucf_tree(root, per_class=3):
    """<root>/UCF-101/<Action>/v_<Action>_gNN_c01.avi (H.264 in the .avi name) and ucfTrainTestlist/; returns the
    train CSV built from it. The last video of each class is the test list's."""
    train, test = [], []
    for label, action in enumerate(ACTIONS):
        for k in range(per_class):
            entry = f"{action}/v_{action}_g{k + 1:02d}_c01.avi"
            _write(os.path.join(root, "UCF-101", entry), label, k, seed=0)
            if k == per_class - 1:
                test.append(entry)
            else:
                train.append(f"{entry} {label + 1}")
    lists = os.path.join(root, "ucfTrainTestlist")
    atomic_write_text(os.path.join(lists, "classInd.txt"), "".join(f"{i + 1} {a}\n" for i, a in enumerate(ACTIONS)))
    atomic_write_text(os.path.join(lists, "trainlist01.txt"), "\n".join(train) + "\n")
    atomic_write_text(os.path.join(lists, "testlist01.txt"), "\n".join(test) + "\n")
    df, _ = ucf101_tables(os.path.join(root, "UCF-101"), lists)
    return write_csv(df, os.path.join(root, "ucf101_train.csv"))


def k600_tree(root, num=SMOKE_SAMPLES):
    """<root>/k600/val/<youtube_id>_<start>_<end>.mp4 with annotations/val.csv (the CVDF layout); returns the val
    CSV built from it."""
    rows = []
    for k in range(num):
        label = k % len(ACTIONS)
        vid = f"smoke{k:05d}xx"
        _write(os.path.join(root, "k600", "val", f"{vid}_000000_000010.mp4"), label, k, seed=1)
        rows.append({"label": ACTIONS[label], "youtube_id": vid, "time_start": 0, "time_end": 10, "split": "val"})
    atomic_write_text(os.path.join(root, "k600", "annotations", "val.csv"), pd.DataFrame(rows).to_csv(index=False))
    df = k600_tables(os.path.join(root, "k600"), splits=("val",))["val"]
    return write_csv(df, os.path.join(root, "k600_val.csv"))


def frame_prediction_generator(path, tokens=32, vocab=64):
    """A tiny raster frame-prediction generator in the release layout (config.json + model.safetensors), seeded,
    with non-uniform logits."""
    torch.manual_seed(0)
    model = build_generator(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=vocab, num_classes=5,
                                      cls_token_num=tokens + 1, max_seq_len=tokens, frame_prediction=True),
                            order="raster")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("output"):
                p.normal_(std=0.05)
    model.save_pretrained(path)
    return path


def smoke_inputs(root, golden):
    """Build (once) the smoke run's data and models under `root` from the golden tiny models in `golden`. Returns
    ({row name: generator}, tokenizer, {row name: CSV})."""
    done = os.path.join(root, "done")
    fp = os.path.join(root, "k600_fp_generator")
    if not os.path.exists(done):
        ucf, k600 = ucf_tree(os.path.join(root, "ucf")), k600_tree(os.path.join(root, "k600"))
        frame_prediction_generator(fp)
        atomic_write_text(done, f"{ucf}\n{k600}\n")
    with open(done) as f:
        ucf, k600 = f.read().split()
    models = {"ucf_larp_ar": os.path.join(golden, "raster"), "ucf_nar_l": os.path.join(golden, "nar"),
              "ucf_nar_lp": os.path.join(golden, "nar"), "k600_fp": fp}
    datasets = {"tokenizer_rfvd": ucf, "ucf_larp_ar": ucf, "ucf_nar_l": ucf, "ucf_nar_lp": ucf, "k600_fp": k600}
    return models, os.path.join(golden, "tokenizer"), datasets
