"""The image physics and the camera the synthetic degradations share (`qualiteacher.data.degradations`):
input checks, the atmospheric scattering model, a depth stand-in, line kernels and a wrap-around
convolution (streaks, motion), JPEG round trips (at the demo size or at a photo's capture size), the
"real" domain's capture pipeline (optics blur, sensor noise, compression) and a veil. Float32
``(H, W, 3)`` images in ``[0, 1]``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a float (H, W, 3) image in [0, 1], got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    return image.astype(np.float32, copy=False)


def check_strength(strength: float) -> float:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"degradation strength must lie in [0, 1], got {strength}")
    return float(strength)


def haze_model(clean: np.ndarray, transmission: np.ndarray, airlight: np.ndarray) -> np.ndarray:
    """Atmospheric scattering model ``I = J t + A (1 - t)``; ``t`` is ``(H, W)``, ``A`` is ``(3,)``."""
    t = transmission[..., None]
    return clean * t + np.asarray(airlight, dtype=np.float32) * (1.0 - t)


def depth_proxy(image: np.ndarray) -> np.ndarray:
    """Stand-in depth in ``[0.2, 1]`` (1 = far) for a photo without a depth map.

    ``0.2 + 0.8 * (0.6 * vertical ramp (top = far) + 0.4 * smoothed "hazy-looking" map)``, where
    the latter is luminance times (1 - saturation), Gaussian-smoothed with sigma ``min(H, W) / 12``
    and min-max normalised: bright, colourless regions (sky, distant walls) read as far. The 0.2
    floor keeps some haze on the nearest objects too.
    """
    image = check_image(image)
    h, w = image.shape[:2]
    ramp = np.broadcast_to(np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None], (h, w))
    lum = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    sat = image.max(axis=2) - image.min(axis=2)
    pale = gaussian_filter(lum * (1.0 - sat), sigma=min(h, w) / 12.0, mode="reflect")
    pale = (pale - pale.min()) / max(float(pale.max() - pale.min()), 1e-6)
    return (0.2 + 0.8 * np.clip(0.6 * ramp + 0.4 * pale, 0.0, 1.0)).astype(np.float32)


def line_kernel(length: float, angle: float) -> np.ndarray:
    """Binary ``(k, k)`` kernel of a 1-px line of ``length`` px at ``angle`` degrees from vertical."""
    n = max(int(np.ceil(length)), 1)
    c = n // 2 + 1
    ts = np.linspace(-(n - 1) / 2.0, (n - 1) / 2.0, 4 * n + 1)
    a = np.deg2rad(angle)
    xs = np.clip(np.rint(c + ts * np.sin(a)).astype(int), 0, 2 * c)
    ys = np.clip(np.rint(c + ts * np.cos(a)).astype(int), 0, 2 * c)
    kernel = np.zeros((2 * c + 1, 2 * c + 1), dtype=np.float32)
    kernel[ys, xs] = 1.0
    return kernel


def circular_convolve(plane: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # FFT convolution with wrap-around: cost independent of the kernel size
    h, w = plane.shape
    kh, kw = min(kernel.shape[0], h), min(kernel.shape[1], w)
    top, left = (kernel.shape[0] - kh) // 2, (kernel.shape[1] - kw) // 2  # centre crop if too big
    padded = np.zeros((h, w), dtype=np.float64)
    padded[:kh, :kw] = kernel[top:top + kh, left:left + kw]
    padded = np.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1))
    out = np.fft.irfft2(np.fft.rfft2(plane) * np.fft.rfft2(padded), s=(h, w))
    return np.clip(out, 0.0, None).astype(np.float32)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def jpeg_at_capture_size(image: np.ndarray, quality: int, scale: float) -> np.ndarray:
    # a real photo is compressed at its own (megapixel) size and only then shown small: compress a
    # ``scale``-times larger copy and shrink it back (antialiased), so the 8-px blocks shrink to
    # 8/scale px and average out; a non-integer scale keeps the block edges off the pixel grid.
    # Compressing the 96-px demo image itself left visible 8-px steps in smooth haze.
    h, w = image.shape[:2]
    big = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).resize(
        (round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    small = Image.fromarray(np.round(jpeg_roundtrip(np.asarray(big, dtype=np.float32) / 255.0, quality) * 255)
                            .astype(np.uint8)).resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32) / 255.0


def capture(image: np.ndarray, blur_sigma: float, noise_sigma: float, jpeg_quality: int,
            rng: np.random.Generator, jpeg_scale: float = 1.0) -> np.ndarray:
    # capture pipeline of the "real" domain: optics blur, sensor noise, compression
    if blur_sigma > 0:
        image = gaussian_filter(image, sigma=(blur_sigma, blur_sigma, 0), mode="reflect")
    if noise_sigma > 0:
        image = image + rng.standard_normal(image.shape).astype(np.float32) * noise_sigma
    image = np.clip(image, 0.0, 1.0)
    if jpeg_quality:
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 0 (off) or in 1..100, got {jpeg_quality}")
        image = jpeg_roundtrip(image, jpeg_quality) if jpeg_scale <= 1 else jpeg_at_capture_size(image, jpeg_quality, jpeg_scale)
    return image.astype(np.float32)


def add_veil(image: np.ndarray, amount: float, airlight: float = 0.9) -> np.ndarray:
    return image * (1.0 - amount) + airlight * amount
