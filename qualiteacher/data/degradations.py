"""Synthetic degradations for the four tasks: haze, rain, snow and low light.

Every degradation is a pure function ``apply(image, params, depth=None) -> image`` on a float32
``(H, W, 3)`` image in ``[0, 1]``; all randomness (streak positions, flakes, noise) is drawn from
``params.seed``, so the recorded parameters reproduce the image exactly. Each task has a sampler
``sample_<task>_params(rng, domain)`` for the two domains of the demo data:

- ``"source"``: the synthetic, paired training degradation (clean and simple);
- ``"real"``: the stand-in for real captures, with other parameter ranges and mixtures (denser,
  non-uniform, tinted, plus blur / sensor noise / JPEG) — the domain gap the method has to bridge.

Spatial parameters (streak length, flake radius, motion) are fractions of ``min(H, W)``, so a
degradation looks alike at every image size; ``blur_sigma`` is in pixels.

Depth (for haze): ``depth`` is a ``(H, W)`` map in ``[0, 1]``, 1 = far. Without one, `depth_proxy`
gives a documented stand-in. `degrade_ladder` / `generic_ladder` apply a degradation at increasing
strength in ``[0, 1]`` (strength 0 is the identity) for IQA sanity checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.ndimage import gaussian_filter

from qualiteacher.data.capture import (
    add_veil, capture, check_image, check_strength, circular_convolve, depth_proxy, haze_model, jpeg_roundtrip,
    line_kernel,
)

DOMAINS: tuple[str, ...] = ("source", "real")


@dataclass(frozen=True)
class HazeParams:
    beta: float  # scattering coefficient: t = exp(-beta * depth)
    airlight: float  # atmospheric light brightness A
    tint_r: float = 1.0  # airlight colour = airlight * tint
    tint_g: float = 1.0
    tint_b: float = 1.0
    nonuniform: float = 0.0  # amplitude of a smooth random field modulating beta (0 = uniform)
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    jpeg_quality: int = 0  # 0 = no JPEG
    seed: int = 0


@dataclass(frozen=True)
class RainParams:
    density: float  # fraction of pixels seeding a streak
    angle: float  # degrees from vertical
    length: float  # streak length, fraction of min(H, W)
    width: float  # streak blur sigma in pixels
    brightness: float  # streak opacity towards white
    layers: int = 1  # 2 = a second, finer and denser layer of far rain
    veil: float = 0.0  # blend towards the airlight (rain accumulation haze)
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    jpeg_quality: int = 0
    seed: int = 0


@dataclass(frozen=True)
class SnowParams:
    density: float  # fraction of pixels holding a flake centre
    radius_min: float  # flake radius, fraction of min(H, W)
    radius_max: float
    opacity: float
    motion: float = 0.0  # fall blur length, fraction of min(H, W)
    angle: float = 0.0  # fall direction, degrees from vertical
    veil: float = 0.0
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    jpeg_quality: int = 0
    seed: int = 0


@dataclass(frozen=True)
class LowLightParams:
    exposure: float  # linear scale of the (gamma-darkened) image
    gamma: float  # >1 darkens mid-tones
    cast_r: float = 1.0  # per-channel colour cast
    cast_g: float = 1.0
    cast_b: float = 1.0
    photons: float = 0.0  # photons at full scale for Poisson shot noise (0 = none)
    read_sigma: float = 0.0  # Gaussian read noise
    blur_sigma: float = 0.0
    jpeg_quality: int = 0
    seed: int = 0


AnyParams = HazeParams | RainParams | SnowParams | LowLightParams


# ---------------------------------------------------------------- sampling helpers
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 4)


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _real_camera(rng: np.random.Generator) -> dict:
    return {"blur_sigma": _u(rng, 0.0, 0.8), "noise_sigma": _u(rng, 0.003, 0.015),
            "jpeg_quality": int(rng.integers(60, 93))}


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _extra_rng(seed: int) -> np.random.Generator:
    # parameters a sampler gained after the demo data's first release are drawn from the sample's own
    # seed, not the task's stream: every other draw, and so every other split, stays byte-identical
    return np.random.default_rng([seed, 1])


# ---------------------------------------------------------------- haze
HAZE_JPEG_SCALE = 3.7  # hazy photos are compressed at 3.7x the demo size (see jpeg_at_capture_size)


def add_haze(image: np.ndarray, params: HazeParams, depth: np.ndarray | None = None) -> np.ndarray:
    """Haze by the scattering model, ``t = exp(-beta * depth * (1 + nonuniform * field))``."""
    image = check_image(image)
    h, w = image.shape[:2]
    depth = depth_proxy(image) if depth is None else np.asarray(depth, dtype=np.float32)
    if depth.shape != (h, w):
        raise ValueError(f"depth map shape {depth.shape} does not match the image {(h, w)}")
    rng = np.random.default_rng(params.seed)
    field = gaussian_filter(rng.standard_normal((h, w)), sigma=0.25 * min(h, w), mode="wrap")
    field = field / max(float(np.abs(field).max()), 1e-12)
    t = np.exp(-params.beta * depth * (1.0 + params.nonuniform * field)).astype(np.float32)
    airlight = np.clip(params.airlight * np.array([params.tint_r, params.tint_g, params.tint_b]), 0, 1)
    hazy = haze_model(image, t, airlight)
    # haze is smooth with depth: JPEG blocks at the image's own size would step it (HAZE_JPEG_SCALE)
    return capture(hazy, params.blur_sigma, params.noise_sigma, params.jpeg_quality, rng, HAZE_JPEG_SCALE)


def sample_haze_params(rng: np.random.Generator, domain: str = "source") -> HazeParams:
    """Source: uniform grey haze, beta 0.6-1.8. Real: denser (1.4-3.0), non-uniform, tinted, + camera."""
    _check_domain(domain)
    if domain == "source":
        return HazeParams(beta=_u(rng, 0.6, 1.8), airlight=_u(rng, 0.8, 0.95), seed=_seed(rng))
    warm = _u(rng, -0.08, 0.08)  # yellowish (>0) or bluish (<0) airlight
    return HazeParams(beta=_u(rng, 1.4, 3.0), airlight=_u(rng, 0.65, 0.95), tint_r=round(1 + warm, 4),
                      tint_g=1.0, tint_b=round(1 - warm, 4), nonuniform=_u(rng, 0.2, 0.6),
                      **_real_camera(rng), seed=_seed(rng))


def haze_ladder_params(strength: float, seed: int = 0) -> HazeParams:
    """Haze of ``strength`` in [0, 1]: beta = 3 * strength."""
    return HazeParams(beta=3.0 * check_strength(strength), airlight=0.9, seed=seed)


# ---------------------------------------------------------------- rain
def _streak_layer(u: np.ndarray, density: float, length_px: float, angle: float, width: float,
                  intensity: np.ndarray) -> np.ndarray:
    seeds = np.where(u < density, intensity, 0.0)  # nested in density: same u, more seeds
    kernel = line_kernel(length_px, angle)
    layer = np.clip(circular_convolve(seeds, kernel), 0.0, 1.0)
    if width > 0:
        gain = 1.0 / max(float(gaussian_filter(kernel, width).max()), 1e-6)
        layer = np.clip(gaussian_filter(layer, width, mode="wrap") * gain, 0.0, 1.0)
    return layer


def add_rain(image: np.ndarray, params: RainParams, depth: np.ndarray | None = None) -> np.ndarray:
    """Motion-blurred rain streaks screened over the image (``I = J + a S (1 - J)``), optional veil."""
    image = check_image(image)
    h, w = image.shape[:2]
    side = min(h, w)
    rng = np.random.default_rng(params.seed)
    u, intensity = rng.random((2, h, w))
    alpha = params.brightness * _streak_layer(u, params.density, params.length * side, params.angle,
                                              params.width, 0.6 + 0.4 * intensity)
    if params.layers >= 2:  # far rain: finer, shorter, denser, dimmer, slightly other angle
        u2 = rng.random((h, w))
        far = _streak_layer(u2, 1.5 * params.density, 0.5 * params.length * side,
                            params.angle + 5.0, 0.5 * params.width, 0.6 + 0.4 * intensity)
        alpha = np.maximum(alpha, 0.6 * params.brightness * far)
    rainy = image + alpha[..., None] * (1.0 - image)
    rainy = add_veil(rainy, params.veil)
    return capture(rainy, params.blur_sigma, params.noise_sigma, params.jpeg_quality, rng)


def sample_rain_params(rng: np.random.Generator, domain: str = "source") -> RainParams:
    """Source: sparse streaks at any slant up to 35 deg, one or two layers, a light veil at most.
    Real: denser (the source's densest is the real's sparsest), slanted 15-35 deg, always two layers,
    thicker veil, + camera.

    The source once held near-vertical, single-layer streaks only; no restorer trained on them
    removed the slanted real ones (docs/results.md), and synthetic rain sets span many angles.
    """
    _check_domain(domain)
    if domain == "source":
        density, angle = _u(rng, 0.004, 0.012), _u(rng, -35, 35)
        length, width, brightness = _u(rng, 0.1, 0.4), _u(rng, 0.5, 1.2), _u(rng, 0.4, 0.8)
        seed = _seed(rng)
        extra = _extra_rng(seed)
        return RainParams(density=density, angle=angle, length=length, width=width, brightness=brightness,
                          layers=int(extra.integers(1, 3)), veil=_u(extra, 0.0, 0.25), seed=seed)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return RainParams(density=_u(rng, 0.01, 0.025), angle=round(sign * _u(rng, 15, 35), 4),
                      length=_u(rng, 0.2, 0.45), width=_u(rng, 0.6, 1.2),
                      brightness=_u(rng, 0.3, 0.7), layers=2, veil=_u(rng, 0.1, 0.35),
                      **_real_camera(rng), seed=_seed(rng))


def rain_ladder_params(strength: float, seed: int = 0) -> RainParams:
    """Rain of ``strength``: density 0.03 s, veil 0.15 s, fixed streak shape (nested streak sets)."""
    s = check_strength(strength)
    return RainParams(density=0.03 * s, angle=10.0, length=0.2, width=0.6, brightness=0.8,
                      veil=0.15 * s, seed=seed)


# ---------------------------------------------------------------- snow
def add_snow(image: np.ndarray, params: SnowParams, depth: np.ndarray | None = None) -> np.ndarray:
    """Soft flakes of random radius (4 size classes), optional fall blur, composited over a veil."""
    image = check_image(image)
    h, w = image.shape[:2]
    side = min(h, w)
    if not 0 < params.radius_min <= params.radius_max:
        raise ValueError(f"need 0 < radius_min <= radius_max, got {params.radius_min}, {params.radius_max}")
    rng = np.random.default_rng(params.seed)
    u, size_u = rng.random((2, h, w))
    centres = u < params.density  # nested in density
    radii = np.geomspace(params.radius_min, params.radius_max, 4) * side
    size_class = np.minimum((size_u**2 * 4).astype(int), 3)  # small flakes are the most common
    alpha = np.zeros((h, w), dtype=np.float32)
    for k, r in enumerate(radii):  # 4 Gaussian blurs, whatever the number of flakes
        impulses = (centres & (size_class == k)).astype(np.float32)
        alpha += gaussian_filter(impulses, sigma=r, mode="wrap") * (2.0 * np.pi * r * r)
    if params.motion > 0:
        kernel = line_kernel(params.motion * side, params.angle)
        alpha = circular_convolve(alpha, kernel / kernel.sum())
    alpha = params.opacity * np.clip(alpha, 0.0, 1.0)[..., None]
    snowy = add_veil(image, params.veil) * (1.0 - alpha) + 0.95 * alpha
    return capture(snowy, params.blur_sigma, params.noise_sigma, params.jpeg_quality, rng)


def sample_snow_params(rng: np.random.Generator, domain: str = "source") -> SnowParams:
    """Source: sparse small flakes, still or slowly falling, a light to medium veil. Real: denser, bigger,
    always falling, thick veil, + camera.

    The source once held still flakes under a slight veil only; no restorer trained on them removed the
    falling, veiled real snow (docs/results.md)."""
    _check_domain(domain)
    if domain == "source":
        density, radius_min = _u(rng, 0.002, 0.006), _u(rng, 0.004, 0.008)
        radius_max, opacity, veil = _u(rng, 0.012, 0.04), _u(rng, 0.7, 1.0), _u(rng, 0.03, 0.25)
        seed = _seed(rng)
        extra = _extra_rng(seed)
        return SnowParams(density=density, radius_min=radius_min, radius_max=radius_max, opacity=opacity,
                          motion=_u(extra, 0.0, 0.06), angle=_u(extra, -30, 30), veil=veil, seed=seed)
    return SnowParams(density=_u(rng, 0.006, 0.015), radius_min=_u(rng, 0.006, 0.012),
                      radius_max=_u(rng, 0.025, 0.05), opacity=_u(rng, 0.6, 0.95),
                      motion=_u(rng, 0.03, 0.08), angle=_u(rng, -30, 30), veil=_u(rng, 0.12, 0.3),
                      **_real_camera(rng), seed=_seed(rng))


def snow_ladder_params(strength: float, seed: int = 0) -> SnowParams:
    """Snow of ``strength``: density 0.02 s, veil 0.15 s, fixed flake sizes (nested flake sets)."""
    s = check_strength(strength)
    return SnowParams(density=0.02 * s, radius_min=0.006, radius_max=0.025, opacity=0.9,
                      veil=0.15 * s, seed=seed)


# ---------------------------------------------------------------- low light
def add_low_light(image: np.ndarray, params: LowLightParams, depth: np.ndarray | None = None) -> np.ndarray:
    """``exposure * J ** gamma * cast``, then Poisson shot noise and Gaussian read noise."""
    image = check_image(image)
    if params.exposure <= 0 or params.gamma <= 0:
        raise ValueError(f"exposure and gamma must be > 0, got {params.exposure}, {params.gamma}")
    rng = np.random.default_rng(params.seed)
    cast = np.array([params.cast_r, params.cast_g, params.cast_b], dtype=np.float32)
    dark = np.clip(params.exposure * np.power(image, params.gamma) * cast, 0.0, 1.0)
    if params.photons > 0:
        dark = rng.poisson(dark * params.photons).astype(np.float32) / params.photons
    if params.read_sigma > 0:
        dark = dark + rng.standard_normal(dark.shape).astype(np.float32) * params.read_sigma
    return capture(dark, params.blur_sigma, 0.0, params.jpeg_quality, rng)


def sample_low_light_params(rng: np.random.Generator, domain: str = "source") -> LowLightParams:
    """Source: exposure 0.15-0.35, mild noise. Real: darker (0.05-0.18), warm/cool cast, strong noise, JPEG."""
    _check_domain(domain)
    if domain == "source":
        return LowLightParams(exposure=_u(rng, 0.15, 0.35), gamma=_u(rng, 1.0, 1.4),
                              photons=_u(rng, 800, 3000), read_sigma=_u(rng, 0.002, 0.006),
                              seed=_seed(rng))
    warm = _u(rng, -0.15, 0.2)  # tungsten (>0) or cold LED / moonlight (<0)
    return LowLightParams(exposure=_u(rng, 0.05, 0.18), gamma=_u(rng, 1.3, 2.0),
                          cast_r=round(1 + warm, 4), cast_g=1.0, cast_b=round(1 - warm, 4),
                          photons=_u(rng, 150, 600), read_sigma=_u(rng, 0.006, 0.015),
                          blur_sigma=_u(rng, 0.0, 0.6), jpeg_quality=int(rng.integers(60, 93)),
                          seed=_seed(rng))


def low_light_ladder_params(strength: float, seed: int = 0) -> LowLightParams:
    """Darkness of ``strength``: exposure 1 - 0.92 s, gamma 1 + s, 100 / s photons, read noise 0.01 s."""
    s = check_strength(strength)
    return LowLightParams(exposure=1.0 - 0.92 * s, gamma=1.0 + s, photons=100.0 / s if s > 0 else 0.0,
                          read_sigma=0.01 * s, seed=seed)


# ---------------------------------------------------------------- catalogue
class Degradation(NamedTuple):
    """One task's degradation: the function, its samplers and the parameter the domains differ in most."""

    task: str
    apply: Callable[..., np.ndarray]  # (image, params, depth=None) -> image
    sample: Callable[[np.random.Generator, str], AnyParams]  # (rng, domain) -> params
    ladder: Callable[[float, int], AnyParams]  # (strength, seed) -> params
    params_type: type
    main_param: str


DEGRADATIONS: dict[str, Degradation] = {
    "dehaze": Degradation("dehaze", add_haze, sample_haze_params, haze_ladder_params, HazeParams, "beta"),
    "derain": Degradation("derain", add_rain, sample_rain_params, rain_ladder_params, RainParams, "density"),
    "desnow": Degradation("desnow", add_snow, sample_snow_params, snow_ladder_params, SnowParams, "density"),
    "lowlight": Degradation("lowlight", add_low_light, sample_low_light_params, low_light_ladder_params,
                            LowLightParams, "exposure"),
}


def list_degradations() -> list[str]:
    """Names of the tasks with a synthetic degradation."""
    return list(DEGRADATIONS)


def get_degradation(task: str) -> Degradation:
    """The `Degradation` of ``task``; a clear error for an unknown task."""
    if task not in DEGRADATIONS:
        raise KeyError(f"unknown degradation task {task!r}; available: {list_degradations()}")
    return DEGRADATIONS[task]


def params_to_dict(params: AnyParams) -> dict[str, float | int]:
    """Flat ``{name: value}`` of a parameter dataclass (one manifest column per parameter)."""
    return dataclasses.asdict(params)


def params_from_dict(task: str, values: Mapping[str, object]) -> AnyParams:
    """Rebuild ``task``'s parameters from a flat mapping (e.g. a manifest row); extra keys are ignored."""
    fields = dataclasses.fields(get_degradation(task).params_type)
    missing = [f.name for f in fields if f.name not in values]
    if missing:
        raise KeyError(f"{task} parameters missing from the given values: {missing}")
    kwargs = {f.name: int(float(values[f.name])) if f.type == "int" else float(values[f.name]) for f in fields}
    return get_degradation(task).params_type(**kwargs)


def degrade_ladder(image: np.ndarray, task: str, strengths: Sequence[float],
                   depth: np.ndarray | None = None, seed: int = 0) -> list[np.ndarray]:
    """The task's degradation at each strength in ``[0, 1]`` (0 = identity), same random draws throughout."""
    deg = get_degradation(task)
    return [deg.apply(image, deg.ladder(s, seed), depth) for s in strengths]


GENERIC_KINDS: tuple[str, ...] = ("blur", "noise", "jpeg")


def generic_ladder(image: np.ndarray, kind: str, strengths: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Generic degradations at strengths in ``[0, 1]`` (0 = identity).

    ``blur``: Gaussian sigma ``3 s`` px; ``noise``: Gaussian sigma ``0.2 s`` (one noise draw scaled);
    ``jpeg``: quality ``round(100 - 95 s)``.
    """
    if kind not in GENERIC_KINDS:
        raise ValueError(f"unknown generic degradation {kind!r}; expected one of {GENERIC_KINDS}")
    image = check_image(image)
    noise = np.random.default_rng(seed).standard_normal(image.shape).astype(np.float32)
    out = []
    for s in map(check_strength, strengths):
        if s == 0:
            out.append(image.copy())
        elif kind == "blur":
            out.append(gaussian_filter(image, sigma=(3 * s, 3 * s, 0), mode="reflect"))
        elif kind == "noise":
            out.append(np.clip(image + 0.2 * s * noise, 0.0, 1.0))
        else:
            out.append(jpeg_roundtrip(image, round(100 - 95 * s)))
    return out
