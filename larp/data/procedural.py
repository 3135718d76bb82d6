"""A seeded procedural test clip (numpy only): the inputs of the I3D numerics fixture and of the FVD benchmark.
Numpy-only so that tools/i3d_jax_reference.py can import it in a venv that holds jax but not this project's
dependencies."""
import numpy as np


def procedural_clip(seed, frames=16, size=224):
    """A seeded synthetic clip (T, S, S, 3) uint8: a panning two-colour striped background, three moving soft
    disks and a moving bar, all with random colours, sizes and velocities."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size          # (S, S) in [0, 1)
    c0, c1 = rng.uniform(20, 235, size=(2, 3))
    angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
    pan = rng.uniform(-0.02, 0.02, size=2)                                # background shift per frame
    disks = [(rng.uniform(0.2, 0.8, 2), rng.uniform(-0.03, 0.03, 2), rng.uniform(0.06, 0.16),
              rng.uniform(0, 255, 3)) for _ in range(3)]
    bar_pos, bar_vel = rng.uniform(0.2, 0.8), rng.uniform(0.015, 0.04) * rng.choice([-1, 1])
    bar_color, bar_width = rng.uniform(0, 255, 3), rng.uniform(0.04, 0.1)
    video = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        u = (xx - pan[0] * t) * np.cos(angle) + (yy - pan[1] * t) * np.sin(angle)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)                    # (S, S)
        img = c0 * mix[..., None] + c1 * (1 - mix[..., None])            # (S, S, 3)
        for center, vel, radius, color in disks:
            cy, cx = center + vel * t
            alpha = np.clip((radius - np.hypot(yy - cy, xx - cx)) * size / 2, 0, 1)[..., None]
            img = img * (1 - alpha) + color * alpha
        alpha = np.clip((bar_width - np.abs(xx - (bar_pos + bar_vel * t))) * size / 2, 0, 1)[..., None]
        img = img * (1 - alpha) + bar_color * alpha
        video[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return video
