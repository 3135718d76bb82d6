"""Evaluation metrics: the I3D detector and FVD, PSNR / SSIM."""
