"""Per-video reconstruction metrics on videos in [0, 1].

Both take (B, C, T, H, W) (or (B, C, H, W)) tensors and return one value per sample, so the evaluation can
average over clips and shards exactly. SSIM follows Wang et al. 2004: 11x11 Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, valid region only, averaged over channels and frames.
"""
import torch
import torch.nn.functional as F


def _as_frames(x):
    """(B, C, T, H, W) -> (B, T, C, H, W) float64; images get T = 1."""
    x = x.detach().double()
    return x[:, None] if x.dim() == 4 else x.transpose(1, 2)


def psnr(a, b, data_range=1.0):
    """(B,) PSNR in dB of the mean squared error over each whole sample; inf for identical samples."""
    mse = (a.detach().double() - b.detach().double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def mean_colour_psnr(videos):
    """(B,) PSNR of each sample against its own mean colour (every pixel of every frame replaced by the sample's mean
    per channel): what a reconstruction that kept nothing but the colour scores. videos (B, C, T, H, W) in [0, 1]."""
    return psnr(videos.mean(tuple(range(2, videos.dim())), keepdim=True).expand_as(videos), videos)


def gaussian_window(size=11, sigma=1.5):
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size)


def ssim(a, b, data_range=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """(B,) mean SSIM per sample."""
    fa, fb = _as_frames(a), _as_frames(b)  # (B, T, C, H, W)
    B, T, C, H, W = fa.shape
    if min(H, W) < win_size:
        raise ValueError(f"ssim needs frames of at least {win_size}x{win_size}, got {H}x{W}")
    fa, fb = fa.reshape(B * T * C, 1, H, W), fb.reshape(B * T * C, 1, H, W)
    w = gaussian_window(win_size, sigma).to(fa.device)[None, None]

    def filt(x):
        return F.conv2d(x, w)  # valid region

    mu_a, mu_b = filt(fa), filt(fb)
    var_a = filt(fa * fa) - mu_a ** 2
    var_b = filt(fb * fb) - mu_b ** 2
    cov = filt(fa * fb) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.reshape(B, -1).mean(1)
