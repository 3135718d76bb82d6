"""LARP video tokenizer: a ViT encoder reads video patches plus N learned queries, the queries' outputs are
quantised to N discrete tokens (a 1-D "holistic" sequence, not a patch grid), and a ViT decoder reconstructs the
patches from them. A small GPT prior (`prior.py`) trained jointly makes the token sequence easy to model
autoregressively.

The constructor kwargs are exactly the released `config.json` (hub-mixin layout); the state-dict names match
the released `hywang66/LARP-L-long-tokenizer` (see tests/fixtures/reference/tokenizer_larp_L_long.state_dict.tsv).
Videos in and out are float (B, 3, T, H, W) with values in [0, 1]; the decoder output is not clamped.
"""
import copy
import math
from types import SimpleNamespace

import torch
import torch.nn as nn
from einops import rearrange

from larp.models.blocks import conv_xavier_, init_linear_xavier, num_patches, sincos_3d, sincos_latent, vit_block
from larp.core.checkpoint import expect_kind, load_state_dict_strict, read_checkpoint, save_hub_dir
from larp.core.errors import CheckpointError, GeometryError
from larp.models.prior import LatentPrior, PriorConfig
from larp.models.quantizer import Bottleneck

_DEFAULT_BOTTLENECK = {
    "name": "bottleneck",
    "args": {"bottleneck_dim": 16, "norm": "none",
             "regularizer": {"name": "vq", "args": {"codebook_size": 8192, "l2_normalized": True,
                                                    "stochastic": True, "stochastic_temperature": 0.03}}},
}


class VideoPatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (pt, p, p); tokens flattened t-major (t, h, w)."""

    def __init__(self, in_channels, dim, temporal_patch_size, patch_size):
        super().__init__()
        k = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=k, stride=k)

    def forward(self, x):  # (B, C, T, H, W)
        return rearrange(self.proj(x), "b d t h w -> b (t h w) d")


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x):
        return self.linear(self.norm_final(x))


def local_query_mask(num_context, num_queries):
    """(L+N, L+N) bool attention mask over [context ; queries], True = may attend. Context tokens see everything;
    a query sees every query but only its own slice of the context (query i <-> context j when
    j*N // L == i or i*L // N == j; with N == L, query i sees context token i). Not part of the reference."""
    L, N = num_context, num_queries
    i, j = torch.arange(N)[:, None], torch.arange(L)[None]
    mask = torch.ones(L + N, L + N, dtype=torch.bool)
    mask[L:, :L] = (j * N // L == i) | (i * L // N == j)
    return mask


class ParallelTransformer(nn.Module):
    """`transformer_encoder_parallel`: run blocks over [context ; queries] and keep the query positions.

    With `local_mask` = (L, N), queries attend only to their own slice of the context (`local_query_mask`)."""

    def __init__(self, dim, depth, num_heads, local_mask=None):
        super().__init__()
        self.blocks = nn.ModuleList([vit_block(dim, num_heads) for _ in range(depth)])
        # not persistent: the state dict stays the released one
        self.register_buffer("mask", local_query_mask(*local_mask) if local_mask else None, persistent=False)

    def forward(self, context, queries):  # (B, L, D), (B, N, D)
        x = torch.cat([context, queries], dim=1)
        for blk in self.blocks:
            x = blk(x, attn_mask=self.mask)
        return x[:, context.shape[1]:]  # (B, N, D)


def _table(module, name, value, learned):
    """A fixed table is a buffer (stored in the checkpoint, as released); a learned one a parameter."""
    if learned:
        setattr(module, name, nn.Parameter(value.clone()))
    else:
        module.register_buffer(name, value.clone())


def clip_geometry(config, frame_num=None, input_size=None, names=("--num_frames", "--input_size")):
    """(frame_num, input_size) of the clips for a tokenizer of config `config` (its config.json layout): the values
    asked for, or the tokenizer's where a value is None. A value that differs from the tokenizer's is a
    GeometryError naming it by `names` (the flags or config keys it came from)."""
    out = []
    for key, asked, name in zip(("frame_num", "input_size"), (frame_num, input_size), names):
        have = config.get(key)
        if asked is not None and have is not None and asked != have:
            raise GeometryError(f"{name} {asked} does not match the tokenizer ({have})")
        out.append(have if asked is None else asked)
    return tuple(out)


def _check_supported(a):
    """ValueError unless the constructor arguments `a` name the one transformer / bottleneck this port has."""
    if a.transformer_name != "transformer_encoder_parallel":
        raise ValueError(f"transformer_name '{a.transformer_name}' is not supported")
    for which, name in (("encoder_name", a.encoder_name), ("decoder_name", a.decoder_name)):
        if name not in (None, "none"):
            raise ValueError(f"{which} '{name}' is not supported (only none)")
    if a.bottleneck.get("name") != "bottleneck":
        raise ValueError(f"bottleneck name '{a.bottleneck.get('name')}' is not supported")


class LARPTokenizer(nn.Module):
    """Video (B, 3, T, H, W) in [0, 1] <-> N tokens in [0, codebook_size); kwargs = the released config.json."""

    def __init__(self, bottleneck=None, prior_model=None, bottleneck_token_num=1024, input_size=128, frame_num=16,
                 temporal_patch_size=4, patch_size=8, decoder_temporal_patch_size=4, decoder_patch_size=8,
                 in_channels=3, transformer_name="transformer_encoder_parallel", encoder_name=None,
                 decoder_name=None, latent_pe_scale_factor=10000, query_init_std=0.02, encoder_hidden_size=768,
                 decoder_hidden_size=768, encoder_num_heads=12, decoder_num_heads=12, encoder_depth=12,
                 decoder_depth=12, learned_encoder_patch_pe=False, learned_encoder_latent_query_embed=True,
                 learned_decoder_latent_pe=False, learned_decoder_patch_query_embed=False,
                 use_encoder_patch_token_type_embed=False, use_encoder_latent_query_token_type_embed=False,
                 use_decoder_latent_token_type_embed=False, use_decoder_patch_query_token_type_embed=True,
                 encoder_query_gaussian_init=True, input_centering=False, local_query_attention=False):
        super().__init__()
        bottleneck = copy.deepcopy(bottleneck or _DEFAULT_BOTTLENECK)
        prior_model = copy.deepcopy(prior_model or {"name": "none"})
        args = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.config = {k: copy.deepcopy(v) for k, v in vars(args).items()}
        for k in ("input_centering", "local_query_attention"):  # not in the reference: saved only when on
            if not self.config[k]:
                del self.config[k]
        _check_supported(args)

        self.bottleneck_token_num = N = bottleneck_token_num
        self.input_size, self.frame_num, self.in_channels = input_size, frame_num, in_channels
        self.decoder_temporal_patch_size, self.decoder_patch_size = decoder_temporal_patch_size, decoder_patch_size
        self.query_init_std, self.encoder_query_gaussian_init = query_init_std, encoder_query_gaussian_init
        # Two options that are not in the reference (default off = the reference; the CPU quickstart turns them on):
        # input_centering feeds the encoder 2x - 1 instead of x in [0, 1] (the decoder target stays in [0, 1]);
        # local_query_attention lets each latent query see only its own slice of the patch grid (and each decoder
        # patch query only its own latents), so tokens start out local instead of all pooling the same average.
        self.input_centering = input_centering
        self._build_encoder(args)
        self.bottleneck = Bottleneck(encoder_hidden_size, out_size=decoder_hidden_size, **bottleneck.get("args", {}))
        self.codebook_size = self.bottleneck.regularizer.cfg.codebook_size
        self._build_decoder(args)

        self.prior_cfg = None
        if prior_model.get("name") not in (None, "none"):
            self.prior_cfg = PriorConfig.from_config(prior_model)
            self.prior_model = LatentPrior(self.prior_cfg, self.bottleneck.regularizer.dim, N)
        self.initialize_weights()

    def _build_encoder(self, a):
        """Encoder side, on the patch grid of the input: patch embedding, position tables of the patches and of the
        N latent queries, the optional token-type embeddings, and the transformer over [patches ; queries].
        `a`: the constructor arguments."""
        De, N = a.encoder_hidden_size, a.bottleneck_token_num
        gt, gh = num_patches(a.frame_num, a.temporal_patch_size), num_patches(a.input_size, a.patch_size)
        self.x_embedder = VideoPatchEmbed(a.in_channels, De, a.temporal_patch_size, a.patch_size)
        _table(self, "encoder_patch_pe", sincos_3d(De, gt, gh, gh)[None], a.learned_encoder_patch_pe)
        _table(self, "encoder_latent_query_embed", sincos_latent(De, N, a.latent_pe_scale_factor),
               a.learned_encoder_latent_query_embed)
        if a.use_encoder_patch_token_type_embed:
            self.encoder_patch_token_type_embed = nn.Parameter(torch.zeros(1, 1, De))
        if a.use_encoder_latent_query_token_type_embed:
            self.encoder_latent_query_token_type_embed = nn.Parameter(torch.zeros(1, 1, De))
        L = gt * gh * gh
        self.encoder = ParallelTransformer(De, a.encoder_depth, a.encoder_num_heads,
                                           (L, N) if a.local_query_attention else None)

    def _build_decoder(self, a):
        """Decoder side, on the patch grid of the output (its patch sizes may differ from the encoder's): position
        tables of the N latents and of the patch queries, the optional token-type embeddings, the transformer over
        [latents ; patch queries] and the final layer to pixels. `a`: the constructor arguments."""
        Dd, N = a.decoder_hidden_size, a.bottleneck_token_num
        pt, p = a.decoder_temporal_patch_size, a.decoder_patch_size
        self.dec_grid = (num_patches(a.frame_num, pt), num_patches(a.input_size, p), num_patches(a.input_size, p))
        _table(self, "decoder_latent_pe", sincos_latent(Dd, N, a.latent_pe_scale_factor)[None],
               a.learned_decoder_latent_pe)
        _table(self, "decoder_patch_query_embed", sincos_3d(Dd, *self.dec_grid)[None],
               a.learned_decoder_patch_query_embed)
        if a.use_decoder_latent_token_type_embed:
            self.decoder_latent_token_type_embed = nn.Parameter(torch.zeros(1, 1, Dd))
        if a.use_decoder_patch_query_token_type_embed:
            self.decoder_patch_query_token_type_embed = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder = ParallelTransformer(Dd, a.decoder_depth, a.decoder_num_heads,
                                           (N, math.prod(self.dec_grid)) if a.local_query_attention else None)
        self.final_layer = FinalLayer(Dd, pt * p ** 2 * a.in_channels)

    def initialize_weights(self):
        """As the reference: xavier Linear/conv, gaussian latent queries and token-type embeds, a zero output
        layer (the decoder starts by predicting 0 everywhere); the codebook (kaiming-uniform, quantizer.py) and
        the prior keep their own init."""
        for name, m in self.named_modules():
            if not name.startswith("prior_model"):
                init_linear_xavier(m)
        conv_xavier_(self.x_embedder.proj)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        q = self.encoder_latent_query_embed
        if isinstance(q, nn.Parameter) and self.encoder_query_gaussian_init:
            nn.init.normal_(q, std=self.query_init_std)
        for name in ("encoder_patch_token_type_embed", "encoder_latent_query_token_type_embed",
                     "decoder_latent_token_type_embed", "decoder_patch_query_token_type_embed"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=self.query_init_std)

    # ------------------------------------------------------------------ inference API
    def set_vq_eval_deterministic(self, deterministic=True):
        """Eval-mode quantisation by argmax (True) or by sampling as in training (False)."""
        self.bottleneck.regularizer.eval_deterministic = bool(deterministic)
        return self

    @property
    def latent_query(self):
        q = self.encoder_latent_query_embed[None]  # (1, N, D)
        if hasattr(self, "encoder_latent_query_token_type_embed"):
            q = q + self.encoder_latent_query_token_type_embed
        return q

    def encode(self, x, uniforms=None, losses=True):
        """x: (B, 3, T, H, W) in [0, 1] -> dict: encoded (B, N, D) for `decode`, bottleneck_rep (B, N) tokens,
        regularized_z (B, N, d) code vectors, loss (VQ), commitment/codebook losses, codebook_usage.
        `uniforms` (B, N): the draws of a sampling quantiser (quantizer.py); None: its own random draws. `losses`
        False: the same tokens without the VQ and entropy losses (no `loss` keys), for a frozen tokenizer."""
        self._check_input(x)
        p = self.x_embedder(x * 2 - 1 if self.input_centering else x) + self.encoder_patch_pe  # (B, L, D)
        if hasattr(self, "encoder_patch_token_type_embed"):
            p = p + self.encoder_patch_token_type_embed
        z = self.encoder(p, self.latent_query.expand(x.shape[0], -1, -1).to(p.dtype))  # (B, N, D)
        out = self.bottleneck(z, uniforms, losses)
        out["encoded"] = out.pop("output")
        return out

    def encode_condition(self, video, num_cond, uniforms=None):
        """Tokens (B, N) of the first `num_cond` frames of `video` with the last of them repeated to the clip
        length: the condition of a frame-prediction generator. `uniforms` as in `encode`."""
        t = video.shape[2]
        last = video[:, :, num_cond - 1:num_cond].expand(-1, -1, t - num_cond, -1, -1)
        clip = torch.cat([video[:, :, :num_cond], last], dim=2)
        return self.encode(clip, uniforms, losses=False)["bottleneck_rep"]  # (B, N)

    def decode(self, z):
        """z: (B, N, D) (the `encoded` output) -> (B, 3, T, H, W), not clamped."""
        z = z + self.decoder_latent_pe
        if hasattr(self, "decoder_latent_token_type_embed"):
            z = z + self.decoder_latent_token_type_embed
        q = self.decoder_patch_query_embed
        if hasattr(self, "decoder_patch_query_token_type_embed"):
            q = q + self.decoder_patch_query_token_type_embed
        x = self.decoder(z, q.expand(z.shape[0], -1, -1).to(z.dtype))  # (B, L, D)
        return self.unpatchify(self.final_layer(x))

    def decode_from_bottleneck(self, tokens):
        """tokens (B, N) long -> video (B, 3, T, H, W) (not clamped)."""
        if tokens.shape[-1] != self.bottleneck_token_num:
            raise ValueError(f"expected {self.bottleneck_token_num} tokens per video, got {tokens.shape[-1]}")
        return self.decode(self.bottleneck.decode_indices(tokens.long()))

    def unpatchify(self, x):
        """(B, t*h*w, pt*p*p*C) -> (B, C, t*pt, h*p, w*p): `(t h w) (pt p1 p2 c) -> c (t pt) (h p1) (w p2)`."""
        t, h, w = self.dec_grid
        return rearrange(x, "b (t h w) (pt p1 p2 c) -> b c (t pt) (h p1) (w p2)", t=t, h=h, w=w,
                         pt=self.decoder_temporal_patch_size, p1=self.decoder_patch_size, p2=self.decoder_patch_size)

    def _check_input(self, x):
        want = (self.in_channels, self.frame_num, self.input_size, self.input_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected video (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")

    # ------------------------------------------------------------------ training
    def forward(self, x, global_step=0, max_steps=1):
        """Training forward: reconstruction + VQ loss + prior cross-entropy (0 without a prior)."""
        enc = self.encode(x)
        rec = self.decode(enc["encoded"])
        zero = torch.zeros((), device=x.device)
        out = {"reconstruction": rec, "loss_vq": enc["loss"], "bottleneck_rep": enc["bottleneck_rep"],
               "commitment_loss": enc["commitment_loss"], "codebook_loss": enc["codebook_loss"],
               "codebook_usage": enc["codebook_usage"], "loss_prior": zero, "prior_acc": zero,
               "ss_ratio": 0.0}
        if self.prior_cfg is not None:
            loss, acc, ratio = self.prior_model.loss(enc["regularized_z"], enc["bottleneck_rep"],
                                                     self.bottleneck.regularizer.codebook(), global_step, max_steps)
            out.update(loss_prior=loss, prior_acc=acc, ss_ratio=ratio)
        return out

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, spec, map_location="cpu", trust=False):
        """Load a hub-mixin dir, a `*.pth`+`*.json` dir, a training checkpoint or a hub id; strict; eval().
        `trust` (--trust_checkpoint): see larp.checkpoint.read_checkpoint."""
        config, sd, _ = read_checkpoint(spec, trust)
        return cls.from_config_and_state_dict(config, sd, source=str(spec)).to(map_location)

    @classmethod
    def from_config_and_state_dict(cls, config, sd, source="checkpoint"):
        """Build from constructor kwargs and load `sd` strictly (errors name the keys); returns an eval() model."""
        expect_kind(config, "tokenizer", source)
        config = dict(config)
        name = config.pop("__name__", None)
        if name not in (None, "larp_tokenizer", "larp"):
            raise CheckpointError(f"{source}: holds a '{name}' model, not a LARP tokenizer")
        try:
            model = cls(**config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: its config does not build a LARP tokenizer ({e})") from e
        load_state_dict_strict(model, sd, source=source)
        return model.eval()

    def save_pretrained(self, directory):
        """config.json (constructor kwargs) + model.safetensors, the layout `from_pretrained` reads."""
        save_hub_dir(directory, self.config, self.state_dict())
