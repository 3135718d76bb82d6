"""The public reference samplers (LARP's raster sampler, NAR's plane sampler), loaded from clones in an ignored
folder for side-by-side timing. Nothing of their code is part of this project.

    git clone https://github.com/hywang66/LARP benchmarks/reference_code/LARP
    git clone https://github.com/ThisisBillhe/NAR benchmarks/reference_code/NAR

Only the generator modules are imported (models/models.py, embed.py, norm.py, larp_ar.py and ar/), without the
package's models/__init__.py, which pulls in the tokenizer, losses and their dependencies. Packages those modules
import only for classes the samplers never use (timm, einops, huggingface_hub) are stubbed when not installed.
"""
import dataclasses
import importlib
import json
import os
import sys
import types

import torch
from safetensors.torch import load_file

from larp.core.errors import LarpError

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_code")
REPOS = {"raster": ("hywang66/LARP", "LARP", ""), "nar": ("ThisisBillhe/NAR", "NAR", "NAR-videos")}
_STUBS = {"timm": None, "timm.models": None, "timm.models.vision_transformer": ["PatchEmbed", "Block"],
          "einops": ["rearrange", "repeat"], "huggingface_hub": ["PyTorchModelHubMixin"]}


class ReferenceMissing(LarpError):
    """The reference code is not in benchmarks/reference_code."""


def reference_root(order):
    """The folder of the reference code of `order` ("raster": LARP, "nar": NAR); ReferenceMissing names the clone
    command when it is absent."""
    repo, folder, sub = REPOS[order]
    root = os.path.join(REFERENCE_DIR, folder, sub)
    if not os.path.isfile(os.path.join(root, "models", "larp_ar.py")):
        raise ReferenceMissing(f"reference {order} sampler: {root} has no models/larp_ar.py; run: git clone "
                               f"https://github.com/{repo} {os.path.join(REFERENCE_DIR, folder)}")
    return root


def _stub_missing():
    for name, attrs in _STUBS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            for attr in attrs or []:
                setattr(module, attr, type(attr, (), {}))
            sys.modules[name] = module


def import_reference(order):
    """The reference's models/larp_ar.py module for `order` (its `ar` sampler package imported beside it)."""
    root = reference_root(order)
    _stub_missing()
    for name in [m for m in sys.modules if m.split(".")[0] in ("models", "ar")]:
        del sys.modules[name]  # the other reference uses the same package names
    package = types.ModuleType("models")
    package.__path__ = [os.path.join(root, "models")]
    sys.modules["models"] = package
    sys.path.insert(0, root)
    try:
        registry = importlib.import_module("models.models")
        package.register, package.make, package.models = registry.register, registry.make, registry.models
        module = importlib.import_module("models.larp_ar")
        sys.modules["ar.generate"].tqdm = lambda iterable, **kw: iterable  # NAR's sampler: no progress bar
        return module
    finally:
        sys.path.remove(root)


def load_reference(order, directory, device, dtype=None):
    """The reference generator built from a release-format folder (config.json + model.safetensors, as
    Generator.save_pretrained writes it), weights cast to `dtype` as the reference sample.py does."""
    module = import_reference(order)
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    names = {f.name for f in dataclasses.fields(module.ModelArgs)}
    args = module.ModelArgs(**{k: (tuple(v) if k == "latent_shape" else v) for k, v in cfg.items() if k in names})
    model = module.LARP_AR(args)
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=True)
    return model.to(device, dtype).eval()


def reference_generate(model, labels, cfg_scale, top_k=0):
    """The reference sample() of a class-conditional model: (B, N) tokens."""
    return model.sample(labels, cfg_scale=cfg_scale, cfg_interval=-1, temperature=1.0, top_k=top_k, top_p=1.0)
