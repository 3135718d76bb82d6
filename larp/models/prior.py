"""The training-time AR prior of LARP (`prior_model.*`): a small causal GPT over the normalised code vectors.

It predicts the next code vector; logits = normalised prediction . normalised codebook^T / temperature and a
cross-entropy against the next index. Its loss flows back into the encoder and codebook, which is what shapes
the latent space to be easy for an autoregressive generator. Two (or more) rounds with scheduled sampling: later
rounds see a mix of ground-truth codes and codes sampled from the previous round's predictions, the sampled
fraction ramping linearly from 0 to `mix_ss_max_ratio` at `mix_ss_peak_steps_ratio * max_steps`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (n_layer, n_head, n_embd); gptc-S is the released prior, gptc-tiny is for tests and the quickstart.
PRIOR_SIZES = {
    "gptc-tiny": (2, 2, 64),
    "gptc-S": (12, 6, 384),
    "gptc-B": (12, 12, 768),
}


@dataclass
class PriorConfig:
    name: str = "gptc-S"
    n_rounds: int = 2
    use_mix_ss: bool = True
    mix_ss_max_ratio: float = 0.5
    mix_ss_peak_steps_ratio: float = 0.3
    avg_loss_over_rounds: bool = True
    latent_ce_temperature: float = 1.0
    no_dropout: bool = False
    no_grad_before_last_round: bool = False
    dropout: float = 0.1
    l2_normalized: bool = True

    @classmethod
    def from_config(cls, d):
        """Accept the release's layout: `{"name", ..., "args": {"l2_normalized": true}}`."""
        d = dict(d)
        args = d.pop("args", None) or {}
        return cls(**d, **args)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape

        def heads(t):
            return t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, L, Dh)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, D)))


class GPTBlock(nn.Module):
    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LatentPrior(nn.Module):
    """GPT over code vectors: (B, L, d) inputs -> (B, L, d) predictions of the next code vector."""

    def __init__(self, cfg: PriorConfig, code_dim, max_len):
        super().__init__()
        if cfg.name not in PRIOR_SIZES:
            raise ValueError(f"unknown prior '{cfg.name}', expected one of {sorted(PRIOR_SIZES)} or 'none'")
        n_layer, n_head, dim = PRIOR_SIZES[cfg.name]
        self.cfg = cfg
        drop = 0.0 if cfg.no_dropout else cfg.dropout
        self.pos_emb = nn.Parameter(torch.zeros(1, max_len, dim))
        self.input_proj = nn.Linear(code_dim, dim)
        self.drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList([GPTBlock(dim, n_head, drop) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, code_dim)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z):  # (B, L, d)
        x = self.drop(self.input_proj(z) + self.pos_emb[:, : z.shape[1]])  # (B, L, D)
        for blk in self.blocks:
            x = blk(x)
        pred = self.head(self.ln_f(x)).float()  # (B, L, d)
        return F.normalize(pred, dim=-1) if self.cfg.l2_normalized else pred

    def ss_ratio(self, global_step, max_steps):
        """Fraction of round-2 inputs replaced by sampled codes at this step."""
        peak = self.cfg.mix_ss_peak_steps_ratio * max(int(max_steps), 1)
        return self.cfg.mix_ss_max_ratio * min(float(global_step) / max(peak, 1e-8), 1.0)

    def loss(self, z, idx, codebook, global_step=0, max_steps=1):
        """Multi-round next-code cross-entropy.

        z: (B, N, d) code vectors (with gradient to the encoder), idx: (B, N) their indices,
        codebook: (V, d) normalised codebook. Returns (loss, accuracy of the teacher-forced round, ratio).
        """
        target = idx[:, 1:]  # (B, N-1)
        inputs = z[:, :-1]  # (B, N-1, d): code j predicts code j+1
        ratio = self.ss_ratio(global_step, max_steps) if self.cfg.use_mix_ss else 1.0
        losses, acc = [], None
        for r in range(self.cfg.n_rounds):
            last = r == self.cfg.n_rounds - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and (last or not self.cfg.no_grad_before_last_round)):
                pred = self(inputs)  # (B, N-1, d) fp32
                with torch.autocast(device_type=pred.device.type, enabled=False):
                    logits = pred @ codebook.t().float() / self.cfg.latent_ce_temperature  # (B, N-1, V)
                    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            if acc is None:
                acc = (logits.argmax(-1) == target).float().mean().detach()
            if last or self.cfg.avg_loss_over_rounds:
                losses.append(ce)
            if not last:
                inputs = self._mix_inputs(z, logits.detach(), codebook, ratio)
        return torch.stack(losses).mean(), acc, ratio

    @staticmethod
    def _mix_inputs(z, logits, codebook, ratio):
        """Next round's inputs: position 0 stays ground truth; position j >= 1 takes, with probability `ratio`,
        the code sampled from the previous round's prediction made at position j-1."""
        B, L, V = logits.shape
        sampled = torch.multinomial(torch.softmax(logits[:, :-1].reshape(-1, V), -1), 1).reshape(B, L - 1)
        sampled_z = F.embedding(sampled, codebook).to(z.dtype)  # (B, L-1, d)
        gt = z[:, 1:L]
        use = (torch.rand(B, L - 1, 1, device=z.device) < ratio).to(z.dtype)
        mixed = use * sampled_z + (1 - use) * gt
        return torch.cat([z[:, :1], mixed], dim=1)  # (B, L, d)
