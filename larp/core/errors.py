"""The project's error types and the one error edge every entry point goes through.

Library code raises a `LarpError` (or a subclass: CheckpointError, ConfigError, VideoReadError, ...) whose
message names the cause (file, flag or key) and what was expected; it never exits. The entry points call
`run_cli(main, args)`, which turns such an error into one line `<prog>: error: <message>` on stderr (on a line of
its own: progress bars still open are closed first) and exit status 1. Set LARP_DEBUG=1 to get the full traceback
instead. Anything else (a bug) keeps its traceback.
"""
import os
import sys

from tqdm import tqdm


class LarpError(Exception):
    """A problem the user can fix (bad flag, path, file, setting); the message is one line naming the cause."""


class UsageError(LarpError, ValueError):
    """A flag value or combination of flags that cannot work."""


class ConfigError(LarpError, ValueError):
    """A user error in a config file or an override; the message names the key."""


class StageError(LarpError, ValueError):
    """Settings that disagree with each other or with the data / checkpoints, found before training starts."""


class UnsafeFileError(LarpError, RuntimeError):
    """A file refused because reading it could run code; the message names the file and what it holds."""


class GeometryError(LarpError, ValueError):
    """A clip length or size that is not the one the tokenizer encodes; names the flag or key."""


class CheckpointError(LarpError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file or keys."""


class CSVError(LarpError, ValueError):
    """A video CSV that cannot be used (empty, unparsable, missing columns, bad labels); names the file."""


class CSVNotFoundError(LarpError, FileNotFoundError):
    """A CSV named on the command line that exists neither as a path nor under data/metadata/."""


class VideoReadError(LarpError, RuntimeError):
    """A video that cannot be read; the message names the file and the cause."""


class I3DError(LarpError, RuntimeError):
    """The I3D detector cannot be found or loaded; the message says what to do."""


class PerceptualWeightsMissing(LarpError, FileNotFoundError):
    """LPIPS needs torchvision's ImageNet backbone weights, which this machine does not have."""


class NonFiniteLossError(LarpError, FloatingPointError):
    """Raised on every rank together (the loss is averaged over ranks first); names the step."""

    def __init__(self, step, name, value):
        super().__init__(f"non-finite {name} ({value}) at step {step}: stopping (lower the lr, enable grad "
                         f"clipping or use bf16 instead of fp16)")
        self.step = step  # 1-based, as the step column of metrics.csv


class StatsMismatchError(LarpError, ValueError):
    """Feature statistics computed on different clips (length, size, resize, clip set, draw) or detectors, merged
    or compared; the message names each differing field with both values."""


class SampleError(LarpError):
    """A user error found before (or instead of) long work; the message is one line naming the cause."""


class WriteError(LarpError, OSError):
    """A write the file system refused (disk full, quota, read-only or foreign folder, a file where a folder
    should be); names the path. Nothing partial is left under the final name, so a rerun continues."""


class FolderBusyError(LarpError):
    """A run folder or a sample range that another live process holds; names it and the holder (pid, host)."""


def one_line(error):
    """The message of `error` as one line.

    An error re-raised by a DataLoader worker carries the worker's traceback in its message; its last line is
    the original `module.Error: message`, which is what the user needs to see.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(error).__name__


def prog_name():
    """`train.py` for scripts, `python -m larp.data.oracle` for modules run with -m."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0]) or "larp"


def run_cli(main, args, prog=None):
    """Return main(args); a LarpError becomes `<prog>: error: <message>` on stderr and exit status 1."""
    try:
        return main(args)
    except LarpError as e:
        if os.environ.get("LARP_DEBUG") == "1":
            raise
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open ends its line first
            bar.close()
        print(f"{prog or prog_name()}: error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
