"""SamplingParams: the one declaration of the sampling knobs (name, type, default, help text, checks), from which
the command-line flags, the run settings and the report columns are derived."""
import dataclasses
from dataclasses import dataclass, field


def _knob(default, text):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class SamplingParams:
    """The knobs of one sampling run, carried unchanged from the command line (or the training config's eval
    section) to `generate`, the run settings and the report.

    cfg_scale: classifier-free guidance scale (1 = off; class-conditional only); cfg_interval: guide only the
    first this many forward passes (-1: all); temperature (0 = greedy), top_k (0 = off; 1 = greedy), top_p (1 = off).
    """
    cfg_scale: float = _knob(1.0, "classifier-free guidance scale (1 = off; class-conditional generators only)")
    cfg_interval: int = _knob(-1, "CFG on the first N decoding steps (-1 = all)")
    temperature: float = _knob(1.0, "softmax temperature (0 = greedy)")
    top_k: int = _knob(0, "sample from the k most likely tokens only (0 = off; 1 = greedy)")
    top_p: float = _knob(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1 = off)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            name, kind, value = f.name, f.type, getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ValueError(f"{name}: expected a{'n integer' if kind is int else ' number'}, got {value!r}")
            object.__setattr__(self, name, kind(value))
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    @classmethod
    def add_arguments(cls, parser):
        """Add --cfg_scale --cfg_interval --temperature --top_k --top_p (in field order) with their types, defaults
        and help texts to an argparse parser (or argument group); returns it."""
        for f in dataclasses.fields(cls):
            parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=f.metadata["help"])
        return parser

    @classmethod
    def from_args(cls, namespace):
        """SamplingParams from the parsed flags of `add_arguments` (any object with those attributes); a bad value
        raises ValueError naming the knob."""
        return cls(**{name: getattr(namespace, name) for name in SAMPLING_FIELDS})

    def as_dict(self):
        """{name: value} in field order (run settings, report columns)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))  # ("cfg_scale", ..., "top_p")
