"""The NLL column's null-class variant (`sample.py --nll class_swapped`): the reference NAR's sample.py leaves its
class dropout on while it scores the sampled tokens, so a share of samples (the dropout probability, 0.1) is scored
under the null class. Here that draw comes from each sample's own seed, so shards and reruns agree."""
import numpy as np
import torch
import torch.nn.functional as F

NULL_SWAP_STREAM = 3  # sample i's draw: numpy default_rng([its seed, NULL_SWAP_STREAM]).random() < prob


def null_swapped(seeds, prob):
    """(B,) bool: which samples (given by their seeds) are scored under the null class."""
    return torch.tensor([np.random.default_rng([s, NULL_SWAP_STREAM]).random() < prob for s in seeds], dtype=torch.bool)


def null_class_nll(model, tokens, nll, swapped):
    """`nll` (B,) with the rows in `swapped` replaced by the teacher-forced per-token NLL of their `tokens` (B, N)
    under the null class of the class-conditional generator `model`."""
    rows = swapped.nonzero().flatten().tolist()
    if not rows:
        return nll
    picked = tokens[rows]
    null = torch.full((len(rows),), model.cls_embedding.num_classes, dtype=torch.long, device=tokens.device)
    logits, _ = model(picked, null)
    scored = F.cross_entropy(logits.float().transpose(1, 2), picked, reduction="none").mean(1)
    nll = nll.clone()
    nll[rows] = scored.to(nll.dtype)
    return nll
