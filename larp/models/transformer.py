"""Transformer building blocks of the generators: RMSNorm, SwiGLU feed-forward, attention with a static KV cache
(SDPA, or FlexAttention with a proximity BlockMask), the pre-norm block, the class embedder with its null row,
and the fixed sin-cos position table. State-dict names match the released generator checkpoints.
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from larp.core.utils import torch_at_least


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 so bf16 runs match fp32 statistics
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU with hidden size = multiple_of-rounded 2/3 * 4 * dim (2816 for dim 1024)."""

    def __init__(self, args):
        super().__init__()
        hidden = int(2 * 4 * args.dim / 3)
        if args.ffn_dim_multiplier is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.ffn_dropout = nn.Dropout(args.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def flex_attention_fn(device_type):
    """FlexAttention kernel: compiled on CUDA (fused, skips fully masked blocks); the eager reference on
    other devices (used by the CPU test only). None when this torch / machine cannot provide it."""
    if device_type not in _FLEX:
        try:  # lazy: FlexAttention (torch >= 2.5) and torch's private triton probe are missing from some builds
            from torch.nn.attention.flex_attention import flex_attention
            if device_type == "cuda":
                from torch.utils._triton import has_triton
                fn = torch.compile(flex_attention, dynamic=False) if has_triton() else None
            else:
                fn = flex_attention
        except Exception:  # old torch / no compiler: callers fall back to SDPA
            fn = None
        if fn is None and device_type == "cuda":
            warnings.warn(f"FlexAttention is off (needs torch>=2.5 with triton; this is torch {torch.__version__}): "
                          "NAR training attends with SDPA and the dense proximity mask (same result, slower)")
        _FLEX[device_type] = fn
    return _FLEX[device_type]


_FLEX = {}
SDPA_GQA = torch_at_least(2, 5)  # F.scaled_dot_product_attention(enable_gqa=...) is new in torch 2.5


def proximity_block_mask(rank, device):
    """FlexAttention BlockMask of `q sees k iff rank[k] <= rank[q]` over len(rank) positions."""
    # lazy, like flex_attention_fn: only called where that found FlexAttention in this torch
    from torch.nn.attention.flex_attention import create_block_mask
    rank = rank.to(device)
    L = rank.shape[0]
    return create_block_mask(lambda b, h, q, k: rank[k] <= rank[q], None, None, L, L, device=device)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_head = args.n_head
        self.n_kv_head = args.n_kv_head or args.n_head
        self.head_dim = args.dim // args.n_head
        self.wqkv = nn.Linear(args.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.attn_dropout_p = args.attn_dropout_p
        self.resid_dropout = nn.Dropout(args.resid_dropout_p)

    def forward(self, x, mask=None, is_causal=False, cache=None, index=None, kv_len=None):
        """x (B, L, D). `mask`: bool (L, kv) or a FlexAttention BlockMask. `cache`: (k, v) buffers
        (B_max, Hkv, S, hd) whose slots `index` (L,) receive this chunk; attention then reads the first `kv_len`
        slots (all S when None), `mask` hiding the ones this chunk may not see."""
        B, L, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.wqkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, L, nh, hd).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(B, L, nkv, hd).transpose(1, 2)
        v = v.view(B, L, nkv, hd).transpose(1, 2)
        if cache is not None:
            ck, cv = cache[0][:B], cache[1][:B]  # (B, nkv, S, hd)
            ck.index_copy_(2, index, k.to(ck.dtype))
            cv.index_copy_(2, index, v.to(cv.dtype))
            k, v = ck[:, :, :kv_len], cv[:, :, :kv_len]  # (B, nkv, kv_len, hd): the filled prefix (a view)
        dropout = self.attn_dropout_p if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):
            y = flex_attention_fn(q.device.type)(q, k, v, block_mask=mask, enable_gqa=nkv != nh)
        else:
            gqa = {"enable_gqa": True} if nkv != nh else {}
            if gqa and not SDPA_GQA:  # torch 2.4: repeat each kv head for its queries, as enable_gqa does
                k, v, gqa = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1), {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               **gqa)
        y = y.transpose(1, 2).reshape(B, L, nh * hd)  # (B, L, D)
        return self.resid_dropout(self.wo(y))


class TransformerBlock(nn.Module):
    def __init__(self, args, drop_path):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.drop_path = drop_path

    def _dp(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.drop_path)
        return x * keep / (1 - self.drop_path)

    def forward(self, x, **attn_kw):
        x = x + self._dp(self.attention(self.attention_norm(x), **attn_kw))
        return x + self._dp(self.feed_forward(self.ffn_norm(x)))


class LabelEmbedder(nn.Module):
    """Class table with a last 'null' row (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, D)


def sincos_pe(length, dim):
    """(1, length, dim) float32 fixed position table (use_fixed_pe): sin / cos of pos * 10000^(-2i/dim), interleaved."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe[None].float()  # (1, length, dim)
