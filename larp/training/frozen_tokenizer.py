"""The frozen tokenizer of the AR stage: its pre-flight (kind, geometry, token count, from its config alone) and
loading it in evaluation mode."""
import math

from larp.core.checkpoint import describe_checkpoint, expect_kind, peek_checkpoint
from larp.core.errors import CheckpointError, GeometryError, StageError
from larp.models.tokenizer import LARPTokenizer, clip_geometry


def require_tokenizer_spec(spec):
    if not spec:
        raise StageError("vae.checkpoint is not set: pass --opts vae.checkpoint <tokenizer dir, checkpoint or hub id>")


def check_frozen_tokenizer(spec, data, latent_shape, trust=False):
    """Pre-flight: the tokenizer checkpoint `spec` is one, readable, of the config's clip geometry and token count
    (its config only: no weights are read; `trust`: --trust_checkpoint). Returns a line describing it."""
    require_tokenizer_spec(spec)
    try:
        tok = peek_checkpoint(spec, trust)
    except CheckpointError as e:
        raise CheckpointError(f"vae.checkpoint: {e}") from None
    expect_kind(tok, "tokenizer", f"vae.checkpoint {spec}")
    geometry = (tok.get("frame_num"), tok.get("input_size"))
    if None not in geometry:
        check_tokenizer_geometry(spec, *geometry, data)
    n = tok.get("bottleneck_token_num")
    if n:
        check_token_count(latent_shape, n, f"the tokenizer {spec}")
    return f"vae.checkpoint: {spec} ({describe_checkpoint(tok)})"


def load_frozen_tokenizer(spec, data, device, trust=False):
    """The tokenizer `spec` (directory, checkpoint or hub id) in eval mode with deterministic VQ and no grads;
    its clip geometry must be the config's. `trust`: --trust_checkpoint."""
    require_tokenizer_spec(spec)
    tok = LARPTokenizer.from_pretrained(spec, trust=trust).to(device).eval()
    tok.set_vq_eval_deterministic(True)
    for p in tok.parameters():
        p.requires_grad_(False)
    check_tokenizer_geometry(spec, tok.frame_num, tok.input_size, data)
    return tok


def check_tokenizer_geometry(spec, frame_num, input_size, data):
    try:
        clip_geometry({"frame_num": frame_num, "input_size": input_size}, data.frame_num, data.input_size,
                      names=("data.frame_num", "data.input_size"))
    except GeometryError as e:
        raise StageError(f"vae.checkpoint {spec}: {e}") from None


def check_token_count(latent_shape, num_tokens, spec="the tokenizer"):
    if math.prod(latent_shape) != num_tokens:
        raise StageError(f"model.latent_shape {latent_shape} has {math.prod(latent_shape)} cells but "
                         f"{spec} gives {num_tokens} tokens per clip")
