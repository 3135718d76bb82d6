"""What lets the sampling host run ahead of the GPU: stage clocks read from CUDA events once a chunk is done, and
clips copied to pinned host memory without blocking, each mp4 writer waiting for its own copy."""
import time

import torch

from larp.core.io import to_uint8
from larp.data.video_io import write_video


class StageClock:
    """Stage boundaries of one batch, marked without stopping the host: CUDA events (read once the chunk is done)
    on CUDA, else perf_counter."""

    def __init__(self, device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self):
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def spans(self):
        """Seconds between consecutive marks (waits for the last one on CUDA)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def host_copy(videos):
    """(host tensor, event or None): videos copied to pinned host memory without blocking on CUDA."""
    if videos.device.type != "cuda":
        return videos, None
    host = torch.empty(videos.shape, dtype=videos.dtype, pin_memory=True)
    host.copy_(videos, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def write_sample(path, copy, j):
    """Write clip j of a host copy as mp4, once the copy has arrived."""
    host, done = copy
    if done is not None:
        done.synchronize()
    write_video(path, to_uint8(host[j:j + 1])[0])
