"""Parameters and estimated training memory of every generator size (NAR and raster), from the model definitions.

    python benchmarks/memory_table.py [--batch 8] [--gpu_gb 80] [--gpus 8]

Each model is built on the meta device (no memory, no init) with the LARP-L-long tokenizer's geometry
(4x16x16 = 1024 tokens, vocabulary 8192, 101 classes) and its parameters are counted. The memory estimate
per GPU, in GB (1e9 bytes):

  states      = 16 B x params: fp32 weights (4) + fp32 gradients (4) + AdamW exp_avg and exp_avg_sq (4 + 4)
  activations = bf16 tensors each block keeps for backward (fused SDPA / FlexAttention: no L x L matrix)
                + the fp32 logits of the heads:
                blocks x B x L x (8 d + 4 f) x 2 B   +   (heads + 1) x B x N x V x 4 B
    with L = sequence length through the blocks (NAR: 1 + 1024, raster: 1 + 1023), N = 1024 targets,
    d = dim, f = SwiGLU hidden size; per block and token the 8 d are the norm inputs and outputs (4), q, k, v
    (3) and the attention output (1); the 4 f are w1 x, w3 x, silu(w1 x) and their product. The logits
    term is each head's fp32 logits plus the cross-entropy's log-softmax (heads = 3 for NAR, 1 for raster).
  DDP total   = states + activations;  FSDP on G GPUs = states / G + activations, leaving out the one or two
                blocks and the root unit gathered at a time (under 1 GB even for XXXL).

"needs FSDP" means the DDP total exceeds 90% of the GPU (the rest for the CUDA context, the allocator's
fragmentation and temporaries). The CUDA check (benchmarks/gpu_check.sh) measures the real peak of NAR-L at
batch 8 for comparison. Prints a markdown table for docs/training.md.
"""
import argparse

import torch

from larp.models.generator import AR_MODELS, Generator

GRID, VOCAB, CLASSES = (4, 16, 16), 8192, 101


def build(size, order):
    args = AR_MODELS[size](vocab_size=VOCAB, num_classes=CLASSES, latent_shape=GRID, max_seq_len=1024)
    with torch.device("meta"):
        return Generator(args, order=order)


def estimate(model, batch):
    """dict: params, blocks, states_gb, activations_gb for training at `batch` clips per GPU."""
    a = model.args
    params = sum(p.numel() for p in model.parameters())
    f = model.layers[0].feed_forward.w1.out_features
    L = model.abs_pe.shape[1]
    N = model.num_tokens
    heads = 3 if model.order == "nar" else 1
    blocks = len(model.layers)
    act = blocks * batch * L * (8 * a.dim + 4 * f) * 2 + (heads + 1) * batch * N * a.vocab_size * 4
    return {"params": params, "blocks": blocks, "states_gb": 16 * params / 1e9, "activations_gb": act / 1e9}


def table(batch, gpu_gb, gpus):
    lines = [f"| size | order | blocks | dim | params | weights+grads+AdamW | activations (batch {batch}) | "
             f"DDP total | FSDP on {gpus} GPUs | needs FSDP on {gpu_gb} GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in AR_MODELS:
        for order in ("nar", "raster"):
            m = build(size, order)
            e = estimate(m, batch)
            total = e["states_gb"] + e["activations_gb"]
            sharded = e["states_gb"] / gpus + e["activations_gb"]
            need = total > 0.9 * gpu_gb
            lines.append(f"| {size.removeprefix('llama-abs-')} | {order} | {e['blocks']} | {m.args.dim} | "
                         f"{e['params'] / 1e9:.3f} B | {e['states_gb']:.1f} GB | {e['activations_gb']:.1f} GB | "
                         f"{total:.1f} GB | {sharded:.1f} GB | {'**yes**' if need else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="clips per GPU")
    p.add_argument("--gpu_gb", type=float, default=80)
    p.add_argument("--gpus", type=int, default=8, help="GPUs that share the FSDP shards")
    args = p.parse_args(argv)
    print(table(args.batch, args.gpu_gb, args.gpus))


if __name__ == "__main__":
    main()
