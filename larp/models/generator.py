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

from larp.core.checkpoint import expect_kind, load_state_dict_strict, read_checkpoint, save_hub_dir, strip_prefixes
from larp.core.errors import CheckpointError
from larp.models.decoding import generate
from larp.models.decoding_order import head_plan, nar_layout
from larp.models.sampling_params import SamplingParams
from larp.models.transformer import (LabelEmbedder, RMSNorm, TransformerBlock, flex_attention_fn, proximity_block_mask,
                                     sincos_pe)

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

    @property
    def device(self):
        """Device of the weights (that of the position table)."""
        return self.abs_pe.device

    @property
    def param_dtype(self):
        """Dtype of the weights (that of the position table): the KV-cache dtype outside autocast."""
        return self.abs_pe.dtype

    def init_weights(self):
        std = self.args.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        if self.args.use_fixed_pe:
            self.abs_pe.data.copy_(sincos_pe(self.abs_pe.shape[1], self.args.dim))
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

    # ---- cached decoding (the sampler's interface, see larp.models.decoding) ---------------------
    def new_kv_cache(self, batch, dtype, device):
        """One persistent (k, v) pair per block, each (batch, Hkv, S, head_dim), S = full sequence length; zeros, so
        that masked slots never hold NaN (attention weights of 0 times NaN would still be NaN)."""
        att = self.layers[0].attention
        shape = (batch, att.n_kv_head, self.abs_pe.shape[1], att.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.layers]

    def decode_step(self, x, caches, at):
        """One fixed-shape cached pass: the chunk x (nb, L, D) is written to the cache slots at["fed"] (L,) and
        attends to the slots [0, at["kv"]) that at["mask"] (L, kv) allows (all of them when it is None) -> float
        logits (nb, M, V) of the step's M targets.

        `at`: one step of larp.models.decoding_order.fixed_plan (plus its mask); NAR reads the R/D/B heads at the
        fed positions at["src"] (3, M), weighted by at["w"] (3, M) and averaged over at["count"] (M,); raster reads
        its head at the last fed position."""
        mask = at["mask"]
        if mask is not None and not torch.is_autocast_enabled(x.device.type):
            mask = mask.to(x.dtype).log()  # additive (0 / -inf) once per pass, instead of in every block's attention
        hidden = self.run_layers(x, caches=caches, index=at["fed"], mask=mask, kv_len=at["kv"])
        if self.order == "nar":  # in place: w is 0 or 1, so the sum is exactly the out-of-place one, without
            logits = None        # a (nb, M, V) temporary per operation
            for h, src, w, name in zip(hidden, at["src"], at["w"], "RDB"):
                out = getattr(self, f"output_{name}")(getattr(self, f"norm_{name}")(h.index_select(1, src)))
                out = out.float().mul_(w[:, None])  # (nb, M, V); 0 where the target has no such predecessor
                logits = out if logits is None else logits.add_(out)
            return logits.div_(at["count"][:, None])
        return self.raster_logits(hidden[:, -1:])

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

    def generate(self, cond, params=SamplingParams(), seeds=None, return_nll=False, generator=None, capture="auto"):
        """Sample (B, N) tokens in raster order with the knobs `params` (see larp.models.decoding.generate, also for
        `capture`); runs in eval mode."""
        return generate(self, cond, params=params, seeds=seeds, return_nll=return_nll, generator=generator,
                        capture=capture)


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
