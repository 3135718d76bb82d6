"""The rows of the papers' table (`eval/reproduce_paper.py`): for each published number, the model, the paper's value
and the command of this repository that measures it with the paper's protocol.

This is the one place the protocol flags live: docs/evaluation.md shows the same commands (tests/test_reproduce_paper.py
checks that each row's command appears there word for word).
"""
from dataclasses import dataclass
from typing import Optional

TOKENIZER_HUB = "hywang66/LARP-L-long-tokenizer"


@dataclass(frozen=True)
class PaperRow:
    """One published number and how it is measured here.

    `entry`: "sample.py" or "eval/eval_larp_tokenizer.py". `generator`: the public hub id of the generator, None
    for the tokenizer row and for rows whose checkpoint is not public (they need `--model ROW=PATH`). `flags`: the
    protocol's flags besides the models, the output folder and the detector. `paper`: the published value as the
    table shows it; `paper_value`: the number alone. `size`: the generator's size in the throughput file
    (benchmarks/throughputs.json). `num_samples`: clips scored.
    """
    name: str
    model: str
    paper: str
    paper_value: float
    source: str
    entry: str
    flags: tuple
    num_samples: int
    dataset_csv: str
    generator: Optional[str] = None
    needs_generator: bool = True
    size: Optional[str] = None
    frame_prediction: bool = False

    @property
    def samples_flag(self):
        return "--max_clips" if self.entry.startswith("eval/") else "--num_samples"


UCF_FLAGS = ("--num_samples", "10000", "--sample_batch_size", "64", "--cfg_scale", "1.25",
             "--dataset_csv", "ucf101_train.csv", "--dtype", "bfloat16")

ROWS = (
    PaperRow(name="tokenizer_rfvd", model="LARP-L-Long tokenizer", paper="20 (19.53 in the release's evaluation)",
             paper_value=19.53, source="LARP paper, Table 1 (rFVD)", entry="eval/eval_larp_tokenizer.py",
             flags=("--dataset_csv", "ucf101_train.csv", "--use_amp", "--det"), num_samples=9537,
             dataset_csv="ucf101_train.csv", needs_generator=False),
    PaperRow(name="ucf_larp_ar", model="LARP-L-Long AR (632M)", paper="57", paper_value=57.0,
             source="LARP paper, Table 1 (UCF-101 class-conditional gFVD)", entry="sample.py", flags=UCF_FLAGS,
             num_samples=10000, dataset_csv="ucf101_train.csv", generator="hywang66/LARP-L-long-AR",
             size="raster-LP"),
    PaperRow(name="ucf_nar_l", model="NAR-L (369M)", paper="96.2 (34 steps, 1.09 s)", paper_value=96.2,
             source="NAR paper, Table 2 (UCF-101, cfg 1.25)", entry="sample.py", flags=UCF_FLAGS, num_samples=10000,
             dataset_csv="ucf101_train.csv", size="nar-L"),
    PaperRow(name="ucf_nar_lp", model="NAR-LP (694M)", paper="71.1 (34 steps, 1.30 s)", paper_value=71.1,
             source="NAR paper, Table 2 (UCF-101, cfg 1.25)", entry="sample.py", flags=UCF_FLAGS, num_samples=10000,
             dataset_csv="ucf101_train.csv", size="nar-LP"),
    PaperRow(name="k600_fp", model="LARP-L-Long AR-FP", paper="5.1", paper_value=5.1,
             source="LARP paper, Table 1 (K600 frame prediction gFVD)", entry="sample.py",
             flags=("--frame_prediction", "--num_cond_frames", "5", "--cfg_scale", "1", "--dataset_csv", "k600_val",
                    "--num_samples", "50000", "--sample_batch_size", "64", "--dtype", "bfloat16"),
             num_samples=50000, dataset_csv="k600_val", generator="hywang66/LARP-L-long-AR-FP", size="raster-LP",
             frame_prediction=True),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def row_by_name(name):
    """The row called `name`; None when there is none."""
    return next((r for r in ROWS if r.name == name), None)


def with_flag(flags, flag, value):
    """`flags` with the value after `flag` replaced by `value` (appended when absent; value None: a switch)."""
    flags = list(flags)
    if flag in flags:
        if value is not None:
            flags[flags.index(flag) + 1] = str(value)
        return flags
    return flags + [flag] + ([str(value)] if value is not None else [])


def protocol_flags(row, dataset_csv=None, num_samples=None):
    """The row's protocol flags with the dataset CSV (a local copy) and the sample count (a quick look) replaced."""
    flags = list(row.flags)
    if dataset_csv is not None:
        flags = with_flag(flags, "--dataset_csv", dataset_csv)
    if num_samples is not None:
        flags = with_flag(flags, row.samples_flag, num_samples)
    return flags


def documented_command(row):
    """The row's command as docs/evaluation.md shows it (hub ids, the default detector, no output folder)."""
    if row.entry == "sample.py":
        models = ["--ar_model", row.generator or "PATH", "--tokenizer", TOKENIZER_HUB]
    else:
        models = ["--tokenizer", TOKENIZER_HUB]
    return ["python", row.entry, *models, *row.flags]
