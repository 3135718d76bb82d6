"""Transformer video discriminator for the tokenizer's adversarial loss.

A ViT over space-time patches with a class token and one logit per video. Position embeddings are fixed 3-D
sin-cos tables computed for the input's patch grid, so the same discriminator works at any resolution / clip
length that divides its patch sizes (no size arguments to keep in sync with the tokenizer config).
"""
import torch
import torch.nn as nn
from einops import rearrange

from larp.models.blocks import conv_xavier_, init_linear_xavier, num_patches, sincos_3d, vit_block


class VideoDiscriminator(nn.Module):
    def __init__(self, in_channels=3, dim=256, depth=4, num_heads=None, patch_size=8, temporal_patch_size=4):
        super().__init__()
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        k = (temporal_patch_size, patch_size, patch_size)
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=k, stride=k)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([vit_block(dim, num_heads or max(1, dim // 64)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 1)
        self.apply(init_linear_xavier)
        conv_xavier_(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        self._pe_cache = {}

    def pos_embed(self, grid, device):
        key = (grid, device)
        if key not in self._pe_cache:
            self._pe_cache[key] = sincos_3d(self.cls_token.shape[-1], *grid).to(device)[None]
        return self._pe_cache[key]

    def forward(self, x):  # (B, 3, T, H, W) in [0, 1]
        grid = (num_patches(x.shape[2], self.temporal_patch_size), num_patches(x.shape[3], self.patch_size),
                num_patches(x.shape[4], self.patch_size))
        p = rearrange(self.patch_embed(x * 2 - 1), "b d t h w -> b (t h w) d")
        p = p + self.pos_embed(grid, p.device).to(p.dtype)
        h = torch.cat([self.cls_token.expand(p.shape[0], -1, -1).to(p.dtype), p], dim=1)  # (B, 1+L, D)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 0])).squeeze(-1).float()  # (B,) logits
