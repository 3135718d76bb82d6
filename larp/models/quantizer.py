"""LARP bottleneck: project to a small code space and quantise against an L2-normalised codebook.

Training samples the code from softmax(cosine / stochastic_temperature) instead of taking the argmax: the
stochasticity keeps many codes in use and makes the latent space friendlier to the AR prior. Evaluation uses the
argmax once `eval_deterministic` is set (`LARPTokenizer.set_vq_eval_deterministic(True)`), else samples too (the
reference's frame-prediction condition). Given `uniforms` (B, N) in [0, 1), a sampled code is the inverse-CDF draw
of its uniform, so a caller with per-sample seeds gets tokens that do not depend on the batch.
State-dict names follow the release: `in_linear`, `out_linear`, `regularizer.embedding.weight`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from larp.models.decoding import sample_inverse_cdf


@dataclass
class VQConfig:
    codebook_size: int = 8192
    l2_normalized: bool = True
    stochastic: bool = True  # sample codes from softmax(similarity / stochastic_temperature) while training
    stochastic_temperature: float = 0.03
    commitment_loss_weight: float = 0.25
    codebook_loss_weight: float = 1.0
    entropy_loss_weight: float = 0.0
    entropy_loss_temperature: float = 0.01


class VectorQuantizer(nn.Module):
    """Nearest (or sampled) code by cosine similarity; straight-through gradient to the encoder."""

    def __init__(self, dim, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.embedding = nn.Embedding(cfg.codebook_size, dim)
        nn.init.kaiming_uniform_(self.embedding.weight)  # as the reference: U(±sqrt(6 / dim))
        self.eval_deterministic = False

    def codebook(self):
        """(V, d) code vectors as used for matching (normalised when l2_normalized)."""
        w = self.embedding.weight.float()
        return F.normalize(w, dim=-1) if self.cfg.l2_normalized else w

    def lookup(self, idx):  # (B, N) long -> (B, N, d)
        return F.embedding(idx, self.codebook())

    def similarity(self, z):
        """(B, N, d) -> (B, N, V) score whose argmax is the nearest code (cosine, or -squared distance)."""
        cb = self.codebook()
        if self.cfg.l2_normalized:
            return z @ cb.t()
        return -(z.pow(2).sum(-1, keepdim=True) - 2 * z @ cb.t() + cb.pow(2).sum(-1))

    def forward(self, z, uniforms=None, losses=True):  # z: (B, N, d); uniforms: None or (B, N) in [0, 1)
        """`losses` False: the codes only (regularized_z, bottleneck_rep, codebook_usage), the same codes and random
        draws, without the VQ and entropy losses (most of the time of a frozen tokenizer's encode)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._quantize(z.float(), uniforms, losses)  # code matching in fp32: bf16 scores would change tokens

    def _quantize(self, z, uniforms=None, losses=True):
        if self.cfg.l2_normalized:
            z = F.normalize(z, dim=-1)
        scores = self.similarity(z)  # (B, N, V)
        sample = self.cfg.stochastic and (self.training or not self.eval_deterministic)
        if sample:
            probs = torch.softmax(scores / self.cfg.stochastic_temperature, dim=-1)
            if uniforms is None:
                idx = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(scores.shape[:-1])
            else:
                idx = sample_inverse_cdf(probs, uniforms.to(probs.device, probs.dtype))  # (B, N)
        else:
            idx = scores.argmax(dim=-1)  # (B, N)
        z_q = self.lookup(idx)  # (B, N, d)
        out = {"regularized_z": z + (z_q - z).detach(), "bottleneck_rep": idx,  # straight-through
               "codebook_usage": torch.tensor(torch.unique(idx).numel() / self.cfg.codebook_size, device=z.device)}
        if not losses:
            return out
        commitment = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        loss = self.cfg.commitment_loss_weight * commitment + self.cfg.codebook_loss_weight * codebook
        out.update(commitment_loss=commitment, codebook_loss=codebook)
        if self.cfg.entropy_loss_weight > 0:
            # The reference computes the entropy on the affinity -||z - e||^2 (= 2 cos - 2 for unit vectors),
            # from the distances of its deterministic branch: with stochastic VQ on, it fails (the distances are
            # never computed). Here the same affinity is derived from the scores, so both branches work.
            affinity = 2 * scores - 2 if self.cfg.l2_normalized else scores
            ent = entropy_loss(affinity, self.cfg.entropy_loss_temperature)
            loss = loss + self.cfg.entropy_loss_weight * ent
            out["entropy_loss"] = ent
        out["loss"] = loss
        return out


def entropy_loss(affinity, temperature):
    """Per-token entropy minus entropy of the batch-average distribution (sharp per token, diverse overall) of
    softmax(affinity / temperature); affinity (..., V) is -squared distance to each code."""
    logp = torch.log_softmax(affinity.reshape(-1, affinity.shape[-1]) / temperature, dim=-1)
    p = logp.exp()
    per_token = -(p * logp).sum(-1).mean()
    avg = p.mean(0)
    batch = -(avg * torch.log(avg + 1e-5)).sum()
    return per_token - batch


class Bottleneck(nn.Module):
    """in_linear (D_enc -> d) -> quantiser -> out_linear (d -> D_dec)."""

    def __init__(self, hidden_size, bottleneck_dim, regularizer, norm="none", out_size=None):
        super().__init__()
        if norm not in (None, "none"):
            raise ValueError(f"bottleneck norm '{norm}' is not supported (only 'none')")
        if regularizer.get("name") != "vq":
            raise ValueError(f"bottleneck regularizer '{regularizer.get('name')}' is not supported (only 'vq')")
        self.in_linear = nn.Linear(hidden_size, bottleneck_dim)
        self.out_linear = nn.Linear(bottleneck_dim, out_size or hidden_size)
        self.regularizer = VectorQuantizer(bottleneck_dim, VQConfig(**regularizer.get("args", {})))

    def forward(self, x, uniforms=None, losses=True):  # (B, N, D)
        out = self.regularizer(self.in_linear(x), uniforms, losses)
        out["output"] = self.out_linear(out["regularized_z"].to(x.dtype))  # (B, N, D_dec)
        return out

    def decode_indices(self, idx):  # (B, N) -> (B, N, D)
        return self.out_linear(self.regularizer.lookup(idx).to(self.out_linear.weight.dtype))
