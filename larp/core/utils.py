"""Small helpers used across the package: device, dtype and autocast selection, seeding, progress bars and the
lines printed beside them."""
import contextlib
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

from larp.core.errors import UsageError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def torch_at_least(major, minor):
    """Whether this torch is release major.minor or newer; a pre-release or local build (2.7.0a0+nv25.04) counts as
    its release."""
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (major, minor)


def get_device(name=None):
    """`None`/"auto" -> cuda if available else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def get_dtype(name):
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}', expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(name):
    """The canonical spelling ("fp32", "bf16" or "fp16") of a dtype or of any of its names in DTYPES, so that
    settings spelled differently compare equal."""
    return SHORT_NAMES[get_dtype(name)]


def autocast(device, dtype):
    """Autocast to `dtype` where the device supports it; a no-op for fp32 or unsupported combos."""
    device = torch.device(device)
    dtype = get_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        return contextlib.nullcontext()  # fp16 autocast on CPU is slow/partial: stay in fp32
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def matmul_precision(precision):
    """float32 matmuls on CUDA inside the block: "high" allows TF32 (what the reference's sample.py sets for its
    whole run), "highest" keeps full fp32. The previous setting comes back after the block; CPU matmuls are not
    affected either way."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "high"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def progress_bar(iterable=None, **kwargs):
    """tqdm on a terminal only: output redirected to a file gets no progress bar (its carriage-return updates would
    fill the log); the callers log a plain line per interval or chunk instead."""
    stream = kwargs.get("file") or sys.stderr
    kwargs["disable"] = kwargs.get("disable", False) or not getattr(stream, "isatty", lambda: False)()
    return tqdm(iterable, **kwargs)


def say(text):
    """Print a line to stdout without running into a progress bar on the terminal (tqdm clears and redraws it)."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()
