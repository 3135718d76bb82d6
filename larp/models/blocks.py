"""Shared transformer pieces of the tokenizer and its discriminator.

`vit_block` is timm's ViT `Block`, whose state-dict names the released LARP weights use. The sin-cos tables reproduce the
fixed position buffers stored in the released checkpoints (checked against the golden tiny tokenizer).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block as TimmBlock


def vit_block(dim, num_heads, mlp_ratio=4.0):
    """timm's pre-norm ViT `Block` as LARP uses it: LayerNorm eps 1e-6, bias-free qkv, GELU MLP (ratio 4).
    Its state-dict names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) are the released checkpoints'."""
    return TimmBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def sincos_1d(dim, positions, base=10000.0):
    """(P,) positions -> (P, dim): [sin(p w_i) for i < dim/2, cos(p w_i) ...], w_i = base^(-i / (dim/2))."""
    assert dim % 2 == 0, f"sin-cos embedding needs an even dim, got {dim}"
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    out = positions.to(torch.float64)[:, None] * omega[None]  # (P, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim, grid_h, grid_w):
    """(grid_h * grid_w, dim), h-major: first half encodes the w coordinate, second half the h coordinate."""
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_w = sincos_1d(dim // 2, ww.reshape(-1))
    emb_h = sincos_1d(dim // 2, hh.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1)


def sincos_3d(dim, grid_t, grid_h, grid_w):
    """(t h w, dim), t-major: the spatial 2-D table plus a full-width temporal 1-D table (a sum, not a concat)."""
    spatial = sincos_2d(dim, grid_h, grid_w)  # (H*W, dim)
    temporal = sincos_1d(dim, torch.arange(grid_t))  # (T, dim)
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(grid_t * grid_h * grid_w, dim).float()


def sincos_latent(dim, num_tokens, base):
    """1-D table for the bottleneck token sequence; `base` is the config's latent_pe_scale_factor."""
    return sincos_1d(dim, torch.arange(num_tokens), base=float(base)).float()


def init_linear_xavier(module):
    """ViT/DiT-style init: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_xavier_(conv):
    """Xavier init of a patch-embedding conv viewed as a Linear over flattened patches."""
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def num_patches(size, patch):
    if size % patch:
        raise ValueError(f"size {size} is not divisible by patch size {patch}")
    return size // patch


__all__ = ["vit_block", "sincos_1d", "sincos_2d", "sincos_3d", "sincos_latent",
           "init_linear_xavier", "conv_xavier_", "num_patches"]
