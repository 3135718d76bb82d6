"""GPT-style video token generators: NAR ("next-neighbor") and raster (plain next-token) orders.

One model family, two decoding orders (see docs/reference.md, "Generator semantics"):
  * raster: causal transformer over [condition ; tokens 0..N-2], one head `norm/output`.
  * nar:    n_layer + 2 blocks over [condition ; all N tokens] with a proximity mask (a token on plane
            c = t+h+w sees the condition and every token on planes <= c); three heads read after blocks
            n_layer (R, next along w), n_layer+1 (D, along h) and n_layer+2 (B, along t). The logits of a
            token are the mean of the heads of its existing predecessors.
The NAR sequence is kept in *decode order* (condition, then tokens sorted by plane) everywhere: the
teacher-forced mask is then block-causal (FlexAttention skips half the blocks on CUDA) and the KV cache
of plane-by-plane sampling is a prefix of the same layout, so each step attends to a plain cache slice.
State-dict names and shapes match the released checkpoints (manifests in tests/fixtures/reference).
"""
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from larp.checkpoint import (CheckpointError, expect_kind, load_state_dict_strict, read_checkpoint, save_hub_dir,
                             strip_prefixes)
from larp.generate import SamplingParams, generate
from larp.nar_order import head_plan, nar_layout

ORDERS = ("nar", "raster")


@dataclass
class ModelArgs:
    """Fields of the released generators' config.json (plus `latent_shape` = (T, H, W) token grid)."""
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000  # unused (absolute position embeddings), kept for config compatibility
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 101
    class_dropout_prob: float = 0.1
    model_type: str = "class_cond"
    vocab_size: int = 8192
    cls_token_num: int = 1
    max_batch_size: int = 32
    max_seq_len: int = 1024
    use_fixed_pe: bool = False
    frame_prediction: bool = False
    latent_shape: Optional[tuple] = None

    def grid(self, order):
        """(T, H, W); a raster model without latent_shape sees its N tokens as (1, 1, max_seq_len)."""
        if self.latent_shape is not None:
            shape = tuple(int(s) for s in self.latent_shape)
            if len(shape) != 3 or math.prod(shape) != self.max_seq_len:
                raise ValueError(f"latent_shape {shape} must be 3 sizes whose product is "
                                 f"max_seq_len={self.max_seq_len}")
            return shape
        if order == "nar":
            raise ValueError("a NAR generator needs latent_shape (T, H, W) in its config")
        return (1, 1, self.max_seq_len)


def _size(n_layer, n_head, dim):
    def factory(**overrides):
        return ModelArgs(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, "latent_shape": (4, 16, 16),
                            **overrides})
    return factory


AR_MODELS = {
    "llama-abs-S": _size(12, 6, 384),
    "llama-abs-B": _size(12, 12, 768),
    "llama-abs-L": _size(24, 16, 1024),
    "llama-abs-LP": _size(30, 20, 1280),
    "llama-abs-XL": _size(36, 20, 1280),
    "llama-abs-XXL": _size(48, 24, 1536),
    "llama-abs-XXXL": _size(48, 40, 2560),
}


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
        try:  # lazy: FlexAttention and torch's private triton probe are missing from some torch builds
            from torch.nn.attention.flex_attention import flex_attention
            if device_type == "cuda":
                from torch.utils._triton import has_triton
                fn = torch.compile(flex_attention, dynamic=False) if has_triton() else None
            else:
                fn = flex_attention
        except Exception:  # old torch / no compiler: callers fall back to SDPA
            fn = None
        _FLEX[device_type] = fn
    return _FLEX[device_type]


_FLEX = {}


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

    def forward(self, x, mask=None, is_causal=False, cache=None, start=0):
        """x (B, L, D). `mask`: bool (L, S) or a FlexAttention BlockMask. `cache`: (k, v) buffers
        (B_max, Hkv, S_max, hd) that receive positions [start, start+L); attention then reads [0, start+L)."""
        B, L, _ = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.wqkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, L, nh, hd).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(B, L, nkv, hd).transpose(1, 2)
        v = v.view(B, L, nkv, hd).transpose(1, 2)
        if cache is not None:
            ck, cv = cache
            ck[:B, :, start:start + L] = k
            cv[:B, :, start:start + L] = v
            k, v = ck[:B, :, :start + L], cv[:B, :, :start + L]  # (B, nkv, start+L, hd)
        dropout = self.attn_dropout_p if self.training else 0.0
        if mask is not None and not isinstance(mask, torch.Tensor):
            y = flex_attention_fn(q.device.type)(q, k, v, block_mask=mask, enable_gqa=nkv != nh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout, enable_gqa=nkv != nh)
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


class Generator(nn.Module):
    """Class-conditional or frame-prediction token generator, `order` in ("nar", "raster")."""

    def __init__(self, args: ModelArgs, order="nar"):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown order '{order}', expected one of {ORDERS}")
        self.args, self.order = args, order
        self.latent_shape = args.grid(order)
        self.frame_prediction = bool(args.frame_prediction)
        self.num_tokens = N = math.prod(self.latent_shape)
        C = self.cls_token_num = args.cls_token_num
        self.num_blocks = args.n_layer + (2 if order == "nar" else 0)
        if self.frame_prediction:  # condition tokens + separator (index vocab_size) share the token table
            self.tok_embeddings = nn.Embedding(args.vocab_size + 1, args.dim)
        else:
            if C != 1:
                raise ValueError(f"class-conditional generators use cls_token_num=1, got {C}")
            self.cls_embedding = LabelEmbedder(args.num_classes, args.dim, args.class_dropout_prob)
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.tok_dropout = nn.Dropout(args.token_dropout_p)
        seq_len = C + N if order == "nar" else C + N - 1
        self.abs_pe = nn.Parameter(torch.zeros(1, seq_len, args.dim), requires_grad=not args.use_fixed_pe)
        dpr = [args.drop_path_rate * i / max(self.num_blocks - 1, 1) for i in range(self.num_blocks)]
        self.layers = nn.ModuleList(TransformerBlock(args, p) for p in dpr)
        heads = ("R", "B", "D") if order == "nar" else ("",)
        for name in heads:
            setattr(self, f"norm{'_' + name if name else ''}", RMSNorm(args.dim, args.norm_eps))
            setattr(self, f"output{'_' + name if name else ''}", nn.Linear(args.dim, args.vocab_size, bias=False))
        if order == "nar":
            for k, v in nar_layout(self.latent_shape, C).items():
                self.register_buffer(k, v, persistent=False)
            self.register_buffer("attn_mask", self.rank[None, :] <= self.rank[:, None], persistent=False)
        self._flex_masks, self._tf_heads = {}, {}
        self.init_weights()

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def config(self):
        """ModelArgs fields (json-ready) plus the decoding order."""
        cfg = dataclasses.asdict(self.args)
        cfg["latent_shape"] = list(self.latent_shape) if self.args.latent_shape is not None else None
        cfg["order"] = self.order
        return cfg

    def num_decode_steps(self):
        """Forward passes of one generate() call: T+H+W-2 (nar) or N (raster)."""
        return sum(self.latent_shape) - 2 if self.order == "nar" else self.num_tokens

    def init_weights(self):
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        if self.args.use_fixed_pe:
            self.abs_pe.data.copy_(_sincos_pe(self.abs_pe.shape[1], self.args.dim))
        else:
            nn.init.normal_(self.abs_pe, std=std)
        for name, m in self.named_children():
            if name.startswith("output"):  # zero heads: initial logits are uniform
                nn.init.zeros_(m.weight)

    def save_pretrained(self, directory, state_dict=None):
        """Hub-mixin layout (config.json with the ModelArgs fields + model.safetensors); `state_dict`: other
        weights for this model (e.g. EMA, or the full weights gathered from FSDP shards)."""
        cfg = {k: v for k, v in self.config.items() if k != "order"}
        save_hub_dir(os.fspath(directory), cfg, self.state_dict() if state_dict is None else state_dict)

    # ---- embeddings ----------------------------------------------------------------------------
    def embed_condition(self, cond):
        """cond: (B,) labels or (B, Nc) condition tokens -> (B, C, D) with position embeddings."""
        if self.frame_prediction:
            if cond.dim() != 2 or cond.shape[1] != self.cls_token_num - 1:
                raise ValueError(f"frame prediction expects condition tokens (B, {self.cls_token_num - 1}), "
                                 f"got {tuple(cond.shape)}")
            sep = cond.new_full((cond.shape[0], 1), self.args.vocab_size)
            x = self.tok_embeddings(torch.cat([cond, sep], dim=1))  # (B, C, D)
        else:
            if cond.dim() == 2 and cond.shape[1] == 1:
                cond = cond[:, 0]
            if cond.dim() != 1:
                raise ValueError(f"class-conditional generator expects labels (B,), got {tuple(cond.shape)}")
            x = self.cls_embedding(cond)  # (B, 1, D)
        return x + self.abs_pe[:, :self.cls_token_num].to(x.dtype)

    def embed_tokens(self, tokens, rows):
        """tokens (B, M) placed at abs_pe rows `rows` (LongTensor (M,) or slice) -> (B, M, D)."""
        x = self.tok_embeddings(tokens)
        return x + self.abs_pe[0, rows].to(x.dtype)

    # ---- trunk and heads -----------------------------------------------------------------------
    def run_layers(self, x, caches=None, **attn_kw):
        """Blocks over x (B, L, D), with per-block KV `caches` when decoding.
        Returns the final hidden (raster) or (h_R, h_D, h_B) (nar), each (B, L, D)."""
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=None if caches is None else caches[i], **attn_kw)
            if self.order == "nar" and i >= self.args.n_layer - 1:
                outs.append(x)
        return tuple(outs) if self.order == "nar" else x

    def nar_logits(self, hidden, heads, count):
        """Mean of the R/D/B heads of each target's predecessors.

        hidden: (h_R, h_D, h_B) each (B, L, D); heads: per head (sel, src) from `head_plan` (only targets
        that have that predecessor are computed); count: (M,). Returns float logits (B, M, V)."""
        logits = None
        for h, (sel, src), name in zip(hidden, heads, "RDB"):
            out = getattr(self, f"output_{name}")(getattr(self, f"norm_{name}")(h[:, src])).float()  # (B, M_h, V)
            if logits is None:
                logits = out.new_zeros(out.shape[0], count.shape[0], out.shape[-1])  # (B, M, V)
            logits.index_add_(1, sel, out)
        return logits.div_(count[:, None])

    def teacher_forced_heads(self):
        """head_plan of all N raster targets over the full sequence (cached per device)."""
        device = self.pred_R.device
        if device not in self._tf_heads:
            preds = (self.pred_R, self.pred_D, self.pred_B)
            with torch.inference_mode(False):  # cached for later training forwards too
                self._tf_heads[device] = head_plan(preds, torch.arange(self.num_tokens, device=device), 0)
        return self._tf_heads[device]

    def raster_logits(self, h):
        return self.output(self.norm(h)).float()

    def _train_mask(self, x):
        """Proximity mask of the full NAR sequence: a FlexAttention BlockMask on CUDA (block-causal in
        decode order, so half the blocks are skipped), else the precomputed bool mask for SDPA. (The CUDA
        FlexAttention kernel needs a head dim of at least 16; every released size has 64.)"""
        use_flex = x.is_cuda and self.args.attn_dropout_p == 0.0 and self.layers[0].attention.head_dim >= 16 \
            and flex_attention_fn("cuda") is not None
        if not use_flex:
            return self.attn_mask
        if x.device not in self._flex_masks:
            self._flex_masks[x.device] = proximity_block_mask(self.rank, x.device)
        return self._flex_masks[x.device]

    def forward(self, tokens, cond, targets=None):
        """Teacher-forced pass. tokens (B, N) raster order -> (logits (B, N, V) float, loss or None),
        logits[:, i] predicting token i."""
        B, N = tokens.shape
        if N != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens per sample, got {N}")
        C = self.cls_token_num
        cond_x = self.embed_condition(cond)  # (B, C, D)
        if self.order == "nar":
            x = self.embed_tokens(tokens[:, self.decode_order], self.decode_order + C)  # (B, N, D) decode order
            x = self.tok_dropout(torch.cat([cond_x, x], dim=1))  # (B, C+N, D)
            hidden = self.run_layers(x, mask=self._train_mask(x))
            logits = self.nar_logits(hidden, self.teacher_forced_heads(), self.count)
        else:
            x = self.embed_tokens(tokens[:, :-1], slice(C, C + N - 1))  # (B, N-1, D)
            x = self.tok_dropout(torch.cat([cond_x, x], dim=1))  # (B, C+N-1, D)
            logits = self.raster_logits(self.run_layers(x, is_causal=True)[:, C - 1:])  # (B, N, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def generate(self, cond, params=SamplingParams(), seeds=None, return_nll=False, generator=None):
        """Sample (B, N) tokens in raster order with the knobs `params` (see larp.generate.generate); runs in
        eval mode."""
        return generate(self, cond, params=params, seeds=seeds, return_nll=return_nll, generator=generator)


def _sincos_pe(length, dim):
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe[None].float()  # (1, length, dim)


def build_generator(name_or_args, order="nar", **overrides):
    """Generator from a size name of AR_MODELS (with ModelArgs overrides) or a ModelArgs."""
    if isinstance(name_or_args, ModelArgs):
        args = dataclasses.replace(name_or_args, **overrides)
    elif name_or_args in AR_MODELS:
        args = AR_MODELS[name_or_args](**overrides)
    else:
        raise ValueError(f"unknown generator size '{name_or_args}', expected one of {sorted(AR_MODELS)}")
    return Generator(args, order=order)


def args_from_config(cfg):
    """ModelArgs from a config dict: golden config.json (all fields), or training-checkpoint args, which
    may be only the overrides of the size named cfg["__name__"]. Unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    kw = {k: v for k, v in cfg.items() if k in names}
    if kw.get("latent_shape") is not None:
        kw["latent_shape"] = tuple(kw["latent_shape"])
    if cfg.get("__name__") in AR_MODELS:
        return AR_MODELS[cfg["__name__"]](**kw)
    return ModelArgs(**kw)


def load_generator(spec, device="cpu", trust=False):
    """Generator in eval() mode from a hub dir / hub id / training checkpoint; order inferred from keys.
    `trust` (--trust_checkpoint): see larp.checkpoint.read_checkpoint."""
    cfg, sd, _layout = read_checkpoint(spec, trust)
    expect_kind(cfg, "generator", os.fspath(spec))
    sd = strip_prefixes(sd)
    if "output_R.weight" in sd:
        order = "nar"
    elif "output.weight" in sd:
        order = "raster"
    else:
        raise CheckpointError(f"{spec}: not a generator checkpoint (neither output_R.weight nor output.weight)")
    if cfg.get("order") not in (None, order):
        raise CheckpointError(f"{spec}: config says order '{cfg['order']}' but the weights are a {order} model")
    try:
        args = args_from_config(cfg)
        with torch.device("meta"):
            Generator(args, order=order)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{spec}: invalid generator config ({e})") from e
    return generator_from_state(args, order, sd, device, source=os.fspath(spec)).eval()


def generator_from_state(args, order, sd, device="cpu", source="state dict"):
    """Generator with the weights `sd`, built on the meta device (no random init of weights that are overwritten)."""
    with torch.device("meta"):
        model = Generator(args, order=order)
    model = model.to_empty(device=device)
    _rebuild_buffers(model)
    load_state_dict_strict(model, sd, source=source)
    return model.to(device)


def _rebuild_buffers(model):
    """Recompute the non-persistent index buffers after `to_empty` (they are not in the state dict)."""
    if model.order == "nar":
        device = model.abs_pe.device
        for k, v in nar_layout(model.latent_shape, model.cls_token_num).items():
            setattr(model, k, v.to(device))
        model.attn_mask = model.rank[None, :] <= model.rank[:, None]
