"""The NAR decoding order, shared by the model (teacher forcing, masks) and the sampler (one plane per pass).

A (T, H, W) token grid is decoded plane by plane, plane c = t + h + w; within a plane in raster order. Each
target is predicted from the heads of its existing predecessors: R at w-1, D at h-1, B at t-1 (target (0, 0, 0):
all three heads at the last condition position). The raster plan (one token per pass) lives here too, so that
the sampler needs nothing from the model's module. `fixed_plan` turns either plan into the fixed-shape tables
of larp.models.decoding.
"""
import torch

RASTER_KV_BUCKET = 64  # raster passes attend over the filled prefix rounded up to a multiple of this many slots


def nar_layout(grid, C):
    """Index tensors of the NAR order for a (T, H, W) grid after C condition positions.

    Returns dict: decode_order (N,) raster indices in decode order (by plane, raster within a plane);
    rank (C+N,) per sequence position (condition -C..-1, tokens their plane): q sees k iff rank[k] <= rank[q];
    pred_R/D/B (N,) sequence position of each raster target's R/D/B predecessor (-1 = none; the
    condition's last position for target 0); count (N,) predecessors (long, so .to(bf16) keeps it exact);
    plane_sizes (P,) with P = T+H+W-2.
    """
    with torch.device("cpu"):  # index bookkeeping stays real even when the model is built on meta
        return _nar_layout(grid, C)


def _nar_layout(grid, C):
    T, H, W = grid
    t, h, w = (a.reshape(-1) for a in torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"))
    N = T * H * W
    plane = t + h + w  # (N,)
    order = torch.argsort(plane, stable=True)
    pos = torch.empty(N, dtype=torch.long)
    pos[order] = torch.arange(N) + C  # sequence position of each raster index
    r = torch.arange(N)

    def pred(ok, step):
        p = torch.where(ok, pos[(r - step).clamp(min=0)], torch.full_like(r, -1))
        p[0] = C - 1
        return p

    count = (w > 0).long() + (h > 0).long() + (t > 0).long()
    count[0] = 3
    return {"decode_order": order, "rank": torch.cat([torch.arange(C) - C, plane[order]]),
            "pred_R": pred(w > 0, 1), "pred_D": pred(h > 0, W), "pred_B": pred(t > 0, H * W),
            "count": count, "plane_sizes": torch.bincount(plane)}


def head_plan(preds, targets, offset):
    """For each head: (sel, src) = positions in `targets` that have this predecessor, and the
    predecessor's position in the fed chunk (sequence position - offset)."""
    out = []
    for pred in preds:
        g = pred[targets]
        sel = torch.nonzero(g >= 0).flatten()
        out.append((sel, g[sel] - offset))
    return out


def nar_plan(model):
    """Per-step index tensors for NAR (built once per model and device).

    Step s feeds sequence positions [start, end) (the condition, then plane s-1) and samples the raster
    `targets` of plane s, fed next at abs_pe `rows`; `heads` are local to the fed chunk."""
    device = model.pred_R.device
    cache = model.__dict__.setdefault("_nar_plan", {})
    if device not in cache:
        with torch.inference_mode(False):
            cache[device] = _build_nar_plan(model)
    return cache[device]


def _build_nar_plan(model):
    C = model.cls_token_num
    preds = (model.pred_R, model.pred_D, model.pred_B)
    steps, start, end, done = [], 0, C, 0
    for n in model.plane_sizes.tolist():
        targets = model.decode_order[done:done + n]  # (M,) raster indices on this plane
        steps.append({"start": start, "end": end, "targets": targets, "rows": targets + C,
                      "heads": head_plan(preds, targets, start), "count": model.count[targets]})
        start, end, done = end, end + n, done + n
    return steps


def raster_plan(model):
    """Steps of raster decoding: step s feeds token s-1 (prefill: the condition) and samples token s."""
    cache = model.__dict__.setdefault("_raster_plan", None)
    if cache is not None:
        return cache
    C, N = model.cls_token_num, model.num_tokens
    steps = [{"start": 0, "end": C, "targets": slice(0, 1), "rows": slice(C, C + 1)}]
    steps += [{"start": C + s - 1, "end": C + s, "targets": slice(s, s + 1), "rows": slice(C + s, C + s + 1)}
              for s in range(1, N)]
    model.__dict__["_raster_plan"] = steps
    return steps


def fixed_plan(model):
    """The plan of either order as fixed-shape tables (built once per model and device), for a decode loop whose
    position lives on the device.

    Returns dict: rank (S,) per cache slot (a query sees the slots of rank <= its own: NAR planes, raster
    positions), group_of [per step: its group], tokens_before [per step: tokens sampled by the earlier steps],
    spans [per step: (kv, masked), see attention_spans],
    groups [one per step shape (L fed, M sampled)]: dicts of (num_steps, ...) tables, row s filled for the steps s
    of that group: fed (L,) cache slots fed, targets (M,) raster indices sampled, slots (M,) where those tokens are
    fed later (slot S of the embedding buffer = never fed), rows (M,) their abs_pe rows; NAR also src (3, M) the
    fed position of each target's R/D/B predecessor, w (3, M) 1.0 where it exists, count (M,) float.
    """
    device = model.abs_pe.device
    cache = model.__dict__.setdefault("_fixed_plan", {})
    if device not in cache:
        with torch.inference_mode(False):
            cache[device] = _build_fixed_plan(model, device)
    return cache[device]


def _build_fixed_plan(model, device):
    nar = model.order == "nar"
    steps = nar_plan(model) if nar else raster_plan(model)
    C, N, S = model.cls_token_num, model.num_tokens, model.abs_pe.shape[1]
    slot = torch.arange(N) + C  # raster: token t is fed at slot C + t (t = N - 1: slot S, never fed)
    if nar:
        slot[model.decode_order.cpu()] = torch.arange(N) + C  # NAR: slots in decode order
    groups, keys, group_of, tokens_before, ends, done = [], {}, [], [], [], 0
    for s, step in enumerate(steps):
        fed = torch.arange(step["start"], step["end"])  # (L,)
        targets = torch.arange(N)[step["targets"]] if isinstance(step["targets"], slice) else step["targets"].cpu()
        key = (len(fed), len(targets))
        if key not in keys:
            keys[key] = len(groups)
            groups.append(_empty_group(len(steps), *key, nar))
        g = groups[keys[key]]
        g["fed"][s], g["targets"][s], g["slots"][s] = fed, targets, slot[targets]
        g["rows"][s] = (targets + C).clamp(max=S - 1)
        if nar:
            for h, (sel, src) in enumerate(step["heads"]):
                g["src"][s, h, sel.cpu()], g["w"][s, h, sel.cpu()] = src.cpu(), 1.0
            g["count"][s] = step["count"].cpu().float()
        group_of.append(keys[key])
        tokens_before.append(done)
        ends.append(step["end"])
        done += len(targets)
    rank = model.rank if nar else torch.arange(S)
    return {"rank": rank.to(device), "group_of": group_of, "tokens_before": tokens_before,
            "spans": attention_spans(rank.cpu(), ends, nar, S),
            "groups": [{k: v.to(device) for k, v in g.items()} for g in groups]}


def attention_spans(rank, ends, nar, S, bucket=RASTER_KV_BUCKET):
    """Per step (kv, masked): a pass attends over the cache slots [0, kv) only, under the rank mask when `masked`.

    A step that feeds slots [start, end) needs exactly the filled prefix [0, end). NAR attends over it as it is:
    the fed plane's slots share one rank, above every earlier slot, so no mask is needed (except in a prefill
    whose condition positions see each other causally). Raster rounds `end` up to a multiple of `bucket`, so that
    its N one-token steps share S / bucket shapes (one recorded CUDA graph each) while attending over at most
    bucket - 1 slots more than exist, which the mask hides."""
    spans, start = [], 0
    for end in ends:
        kv = end if nar else min(S, -(-end // bucket) * bucket)
        fed = rank[start:end]
        masked = not nar or bool((fed != fed[0]).any())  # raster always, so that its passes run the same ops
        spans.append((kv, masked))
        start = end
    return spans


def _empty_group(num_steps, L, M, nar):
    g = {"fed": torch.zeros(num_steps, L, dtype=torch.long)}
    for name in ("targets", "slots", "rows"):
        g[name] = torch.zeros(num_steps, M, dtype=torch.long)
    if nar:
        g["src"] = torch.zeros(num_steps, 3, M, dtype=torch.long)
        g["w"] = torch.zeros(num_steps, 3, M)
        g["count"] = torch.ones(num_steps, M)
    return g
