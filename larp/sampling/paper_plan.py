"""What `eval/reproduce_paper.py` will run: the checks made before any model loads, the command of each row, the
detector, and the wall-time estimate from measured throughputs (benchmarks/throughputs.json)."""
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from larp.core.checkpoint import expect_kind, peek_checkpoint
from larp.core.errors import CheckpointError, CSVError, CSVNotFoundError, UsageError
from larp.core.safe_load import known_torchscript
from larp.data.dataset import read_video_csv
from larp.metrics.detectors import DEFAULT_I3D, ROOT
from larp.metrics.i3d_weights import INSTALL_HINT, kinetics400_available
from larp.sampling.paper_rows import ROW_NAMES, TOKENIZER_HUB, protocol_flags, row_by_name, with_flag

THROUGHPUTS = os.path.join(ROOT, "benchmarks", "throughputs.json")
SMOKE_NOTE = "smoke: tiny models, synthetic data, random detector"


@dataclass(frozen=True)
class TableOptions:
    """The table's inputs as typed values (the flags of eval/reproduce_paper.py).

    `models`: {row name: local generator path} from --model; `tokenizer`: hub id or local path; `num_samples`: a
    quick look with fewer samples (None: the paper's); `datasets`: {row name: CSV} replacing a row's CSV (the smoke
    run's synthetic trees); `extra`: flags every command gets besides the protocol's (the smoke run's device and
    batch size); `gpus`: GPUs of this node (0: CPU)."""
    out: str
    rows: tuple
    models: dict = field(default_factory=dict)
    tokenizer: str = TOKENIZER_HUB
    num_samples: Optional[int] = None
    smoke: bool = False
    datasets: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    gpus: int = 0
    device_name: str = "CPU"
    bootstrap: int = 1000


@dataclass(frozen=True)
class Detector:
    spec: str  # what --i3d gets
    label: str  # what the table's card says


@dataclass(frozen=True)
class RowPlan:
    """One row as it will run: `argv` as printed (python / torchrun first), its output `folder`, the generator it
    loads (None: the tokenizer row), `missing` (why it cannot run, shown in its cell), `changed` (why it is not the
    paper's protocol; empty when it is), the GPUs it uses and the detector's label."""
    row: object
    folder: str
    argv: tuple
    generator: Optional[str]
    missing: str
    changed: str
    gpus: int
    detector: str  # the detector's label in the table


def parse_rows(spec):
    """The rows named by a comma-separated `--rows` ("all": every row)."""
    names = list(ROW_NAMES) if spec in (None, "", "all") else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if row_by_name(n) is None]
    if unknown:
        raise UsageError(f"--rows {unknown[0]}: no such row; the rows are {', '.join(ROW_NAMES)}")
    return tuple(row_by_name(n) for n in names)


def parse_models(pairs):
    """{row name: path} of `--model ROW=PATH` flags; each names an existing row that loads a generator."""
    models = {}
    for pair in pairs or ():
        name, sep, path = pair.partition("=")
        row = row_by_name(name)
        if not sep or not path:
            raise UsageError(f"--model {pair}: expected ROW=PATH")
        if row is None:
            raise UsageError(f"--model {pair}: no row named {name}; the rows are {', '.join(ROW_NAMES)}")
        if not row.needs_generator:
            raise UsageError(f"--model {pair}: row {name} scores the tokenizer; give it with --tokenizer PATH")
        models[name] = local_or_hub(path)
    return models


def local_or_hub(spec):
    """A hub id (`owner/name`, pinned with `owner/name@COMMIT`) as given; a local path made absolute (the rows run
    from the project root)."""
    if not os.path.exists(spec) and spec.split("@")[0].count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec
    return os.path.abspath(spec)


def check_checkpoint(path, want, source, frame_prediction=None):
    """A local checkpoint must exist and be a `want` ('tokenizer' or 'generator') of the right kind, read from its
    config only (no weights loaded)."""
    if not os.path.exists(path):
        raise UsageError(f"{source}: no such file or directory")
    try:
        cfg = peek_checkpoint(path)
        expect_kind(cfg, want, source)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    fp = bool(cfg.get("frame_prediction", cfg.get("model_type") == "frame_pred"))
    if frame_prediction is not None and fp != frame_prediction:
        raise UsageError(f"{source}: holds a {'frame-prediction' if fp else 'class-conditional'} generator; the row "
                         f"needs a {'frame-prediction' if frame_prediction else 'class-conditional'} one")


def check_models(opts):
    """Every local checkpoint named by --model and --tokenizer is of the kind its row loads (a hub id is checked by
    the row's command, once fetched)."""
    if os.path.isabs(opts.tokenizer):
        check_checkpoint(opts.tokenizer, "tokenizer", f"--tokenizer {opts.tokenizer}")
    for name, path in opts.models.items():
        if os.path.isabs(path):
            check_checkpoint(path, "generator", f"--model {name}={path}", row_by_name(name).frame_prediction)


def choose_detector(smoke):
    """The reference's StyleGAN-V i3d_torchscript.pt when it is at checkpoints/ with its known digest, else our
    Kinetics-400 port; the smoke run's random network."""
    if smoke:
        return Detector("random:32", "random I3D (not comparable to published FVD)")
    path = os.path.join(ROOT, DEFAULT_I3D)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if known_torchscript(f.read()):
                return Detector(path, "StyleGAN-V i3d_torchscript.pt (the reference's detector, known digest)")
    return Detector("kinetics400", "our Kinetics-400 I3D port (same TF-Hub weights as StyleGAN-V's)")


def data_problem(csv):
    """Why the videos of `csv` cannot be read (missing CSV, videos not on disk), or ""."""
    try:
        df = read_video_csv(csv)
    except (CSVError, CSVNotFoundError) as e:
        return str(e)
    missing = [p for p in df["path"] if not os.path.isfile(p)]
    if missing:
        return f"{len(missing)} of the {len(df)} videos of {csv} are not on disk (e.g. {missing[0]})"
    return ""


def plan_row(row, opts, detector):
    """The RowPlan of `row` under `opts`."""
    quick = opts.num_samples and not opts.smoke  # a quick look has its own folder: the full run's stays clean
    folder = os.path.join(opts.out, f"{row.name}_{opts.num_samples}_samples" if quick else row.name)
    generator = opts.models.get(row.name, row.generator) if row.needs_generator else None
    missing = f"needs --model {row.name}=PATH (no public checkpoint)" if row.needs_generator and not generator else ""
    flags = protocol_flags(row, opts.datasets.get(row.name), opts.num_samples)
    for flag, value in opts.extra.get(row.entry, {}).items():
        flags = with_flag(flags, flag, value)
    if row.entry == "sample.py":
        models = ["--ar_model", generator or "PATH", "--tokenizer", opts.tokenizer, "--output_dir", folder]
    else:
        models = ["--tokenizer", opts.tokenizer, "--out", folder]
    gpus = opts.gpus if row.entry == "sample.py" else min(opts.gpus, 1)  # the tokenizer evaluation: one device
    launch = ["torchrun", "--nproc_per_node", str(gpus)] if gpus > 1 else ["python"]
    argv = (*launch, row.entry, *models, "--i3d", detector.spec, *flags)
    changed = SMOKE_NOTE if opts.smoke else \
        f"{opts.num_samples} instead of {row.num_samples} samples" if opts.num_samples else ""
    return RowPlan(row, folder, argv, generator, missing, changed, gpus, detector.label)


def executable(argv):
    """The argv to run: `python` is this interpreter, `torchrun` its torch.distributed.run."""
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return [sys.executable, *argv[1:]]


def check_data(plans):
    """Every row that will run can read its dataset's videos; else one line naming the row and the CSV."""
    for p in plans:
        if p.missing:
            continue
        csv = p.argv[p.argv.index("--dataset_csv") + 1]
        problem = data_problem(csv)
        if problem:
            raise UsageError(f"row {p.row.name}: {problem}; set the dataset up (docs/datasets.md) or leave the row "
                             f"out with --rows")


def detector_problem(detector):
    """Why the detector cannot load (the Kinetics-400 weights not installed), or ""."""
    if detector.spec == "kinetics400" and not kinetics400_available():
        return (f"install the Kinetics-400 weights with `{INSTALL_HINT}` or put StyleGAN-V's i3d_torchscript.pt at "
                f"{os.path.join(ROOT, DEFAULT_I3D)}")
    return ""


def check_detector(detector):
    problem = detector_problem(detector)
    if problem:
        raise UsageError(f"no I3D detector: {problem}")


def load_throughputs(path=THROUGHPUTS):
    with open(path) as f:
        return json.load(f)["figures"]


def stages(row, num):
    """(stage, model, items) of the work of a row of `num` samples."""
    work = [("decode", "tokenizer-L-long", num), ("i3d", "kinetics400", 2 * num)]
    if row.entry != "sample.py":
        return [("encode", "tokenizer-L-long", num)] + work + [("lpips", "vgg", num)]
    return [("generate", row.size, num)] + ([("encode", "tokenizer-L-long", num)] if row.frame_prediction else []) \
        + work


def estimate(plan, num, device_name, figures):
    """Wall time of a row from the measured throughputs of `device_name` (stages spread over the row's GPUs), or
    what is not measured. Model loading and video decoding are not included."""
    seconds, unmeasured = 0.0, []
    gpus = max(plan.gpus, 1)
    for stage, model, items in stages(plan.row, num):
        fig = next((f for f in figures if f["stage"] == stage and f["model"] == model
                    and f["device"].lower() in device_name.lower()), None)
        if fig is None:
            unmeasured.append(f"{stage} {model}")
            continue
        seconds += items / fig["per_s"] / gpus
    text = f"~{format_seconds(seconds)} from measured throughputs on {device_name} x{gpus}"
    if unmeasured:
        text = (f"no measured throughput on {device_name} for {', '.join(unmeasured)}"
                + (f" (the measured stages: ~{format_seconds(seconds)})" if seconds else ""))
    return text


def format_seconds(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
