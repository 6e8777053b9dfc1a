"""Can a learned member defend what the hand-made ones cannot? A small CNN fitted to rank a clean
photo above its damaged copies, measured by the audit on photos it never saw (a study, not a test:
about 10-25 min per variant on 2 CPU cores).

    python pipelines/study_learned_member.py --out outputs/learned_member --demo-data demo_data

Why: the weak audit kinds pull the hand-made colour members in opposite directions (docs/iqa.md
"Why the weak kinds fail"): desaturation and a brown tint need more pay for colour, tile seams and
colour halos less. A ranking learned from pairs could hold both, with the clean photo as the optimum.

``NaturalnessNet`` (fully convolutional after a 2x2 pixel unshuffle, mean and std pooling, 52 k
parameters) is fitted with a pairwise logistic (RankNet) loss on crops of the audit's **tune**
photos only (plus scikit-image's astronaut and coffee, in no audit set): each crop ranked above

- a destruction of ``iqa.destruction.DESTRUCTIONS`` blended in at a random strength, and the weaker
  blend above the stronger one (the score must fall monotonically with the damage);
- an over-saturated copy (chroma x 1.3-2): colour beyond the photo's own must not pay;
- blur, noise, JPEG and the four tasks' degradations at two random ladder strengths (weaker above);
- optionally (``rework``) the photo as a classical restorer returns it (do no harm: a photo that
  needed nothing must not gain from a restorer's rework).

Variants: ``photos`` (as above), ``rework`` (plus the rework pairs), ``dead_leaves`` (procedural
dead-leaves images in the tune photos' colours instead of photo crops: no content to memorise) and
``mix`` (half and half). Each fitted member is scored with the ``offline`` preset's members on the
audit's tune and report images (every destruction, the ladders, and with ``--checkpoint`` a trained
student's rework of each clean photo), then fused at several weights: the figures are the audit's
(``iqa.audit_tune.evaluate``). Output: ``learned_member.csv`` and ``learned_member.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.iqa.audit import default_images
from qualiteacher.iqa.audit_tune import evaluate, fuse, raw_scores
from qualiteacher.iqa.ensemble import Ensemble
from qualiteacher.iqa.members import MemberSpec, Normalization
from qualiteacher.iqa.presets import build_ensemble, preset_specs
from qualiteacher.say import say
from qualiteacher.tables import markdown_table


class NaturalnessNet(nn.Module):
    """Image (B, 3, H, W) in [0, 1] -> score (B,), higher = more like an undamaged photo."""

    tolerates_bf16 = False

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        c = width

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode="reflect")

        self.features = nn.Sequential(  # 2x2 pixels to channels first: 1-px structure kept, a quarter of the cost
            nn.PixelUnshuffle(2),
            conv(12, c), nn.GELU(),
            conv(c, 2 * c, 2), nn.GELU(),
            conv(2 * c, 2 * c), nn.GELU(),
            conv(2 * c, 4 * c, 2), nn.GELU(),
            conv(4 * c, 4 * c, 2), nn.GELU(),
        )
        self.head = nn.Sequential(nn.Linear(8 * c, 32), nn.GELU(), nn.Linear(32, 1))

    def forward(self, images: Tensor) -> Tensor:
        f = self.features(images * 2 - 1)
        pooled = torch.cat([f.mean((2, 3)), f.flatten(2).std(2)], 1)
        return self.head(pooled).squeeze(1)


@dataclass(frozen=True)
class FitSettings:
    """One fit: the defaults are the study's (``rework`` and ``dead_leaves`` pick the variant)."""

    steps: int = 900
    batch: int = 16
    crops_per_photo: int = 48
    size: int = 96
    lr: float = 2e-3
    width: int = 16
    seed: int = 0
    rework: float = 0.0  # weight of the clean > classical-restorer(clean) pairs (0: none)
    dead_leaves: float = 0.0  # share of the clean images that are dead-leaves images instead of photo crops


# ------------------------------------------------------------------------------------- fit data
LADDER_KINDS: tuple[str, ...] = ("blur", "noise", "jpeg", "dehaze", "derain", "desnow", "lowlight")


def fit_photos() -> dict[str, np.ndarray]:
    """The photos the member is fitted on: the audit catalogue's tune side plus scikit-image's
    astronaut and coffee (the offline NIQE's colour fit photos, in no audit set). Never a report
    photo."""
    import skimage.data

    from qualiteacher.iqa.audit_photos import catalogue_photos, split_of

    photos = catalogue_photos("tune")
    for name in ("astronaut", "coffee"):
        photos[name] = np.asarray(getattr(skimage.data, name)())[..., :3]
    assert all(split_of(k) == "tune" for k in photos if k not in ("astronaut", "coffee"))
    return photos


def random_crops(photos: dict[str, np.ndarray], per_photo: int, size: int, rng: np.random.Generator) -> Tensor:
    """``per_photo`` square crops of every photo (side 20-100 % of its shorter side, anywhere),
    area-resized to ``size``: (N, 3, size, size) float in [0, 1]."""
    out = []
    for photo in photos.values():
        h, w = photo.shape[:2]
        x = torch.from_numpy(np.array(photo[..., :3], dtype=np.float32)).permute(2, 0, 1) / 255
        for _ in range(per_photo):
            side = int(min(h, w) * rng.uniform(0.2, 1.0))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = x[None, :, top : top + side, left : left + side]
            out.append(F.interpolate(crop, size=(size, size), mode="area") if side != size else crop)
    return torch.cat(out).clamp(0, 1)


def dead_leaves(n: int, size: int, palette: Tensor, rng: np.random.Generator, disks: int = 400,
                chunk: int = 32) -> Tensor:
    """``n`` dead-leaves images (Matheron; Lee, Mumford & Huang 2001): disks of power-law radii
    (p(r) ~ r^-3, 1.5 px to half the side) dropped one over the other, each a colour drawn from
    ``palette`` (K, 3) with a shading gradient and fine luma texture, then a lens blur and sensor
    noise. Scale-invariant like photos, occlusion edges, natural colours, and no content to
    memorise: (n, 3, size, size) in [0, 1]."""
    from qualiteacher.iqa.image_ops import gaussian_blur

    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    out = []
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    rmin, rmax = 1.5, size / 2
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        u = torch.rand(b, disks, generator=g)
        radius = 1 / torch.sqrt(u / rmin**2 + (1 - u) / rmax**2)  # inverse CDF of r^-3 on [rmin, rmax]
        cy, cx = torch.rand(b, disks, generator=g) * size, torch.rand(b, disks, generator=g) * size
        inside = (yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2 < radius[..., None, None] ** 2
        order = torch.arange(1, disks + 1, dtype=torch.float32)[None, :, None, None]
        top = (inside * order).amax(1).long() - 1  # (b, H, W): the last disk over each pixel (-1: none, shown as disk 0)
        colour = palette[torch.randint(len(palette), (b, disks), generator=g)]  # (b, disks, 3)
        slope = (torch.rand(b, disks, 2, generator=g) - 0.5) * 0.6 / radius[..., None]
        idx = top.clamp_min(0)
        pick = lambda t: torch.gather(t, 1, idx.flatten(1)).view(b, size, size)  # noqa: E731
        shade = 1 + pick(slope[..., 0]) * (yy - pick(cy)) + pick(slope[..., 1]) * (xx - pick(cx))
        img = torch.stack([pick(colour[..., c]) for c in range(3)], 1) * shade.clamp(0.5, 1.5)[:, None]
        texture = gaussian_blur(torch.randn(b, 1, size, size, generator=g), 0.7)
        img = img * (1 + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * texture)
        img = gaussian_blur(img, float(rng.uniform(0.4, 1.0)))
        img = img + 0.01 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(b, 3, size, size, generator=g)
        out.append(img.clamp(0, 1))
    return torch.cat(out)


def ladder_pairs(crops: Tensor, rng: np.random.Generator) -> Tensor:
    """For every crop one ladder kind (``LADDER_KINDS``) at two random strengths, weaker first:
    (N, 2, 3, H, W)."""
    from qualiteacher.data.degradations import GENERIC_KINDS, degrade_ladder, generic_ladder

    out = []
    for image in crops.permute(0, 2, 3, 1).numpy():
        kind = LADDER_KINDS[int(rng.integers(len(LADDER_KINDS)))]
        strengths = sorted(rng.uniform(0.1, 1.0, 2).tolist())
        seed = int(rng.integers(2**31))
        pair = generic_ladder(image, kind, strengths, seed) if kind in GENERIC_KINDS else \
            degrade_ladder(image, kind, strengths, seed=seed)
        out.append(np.stack(pair))
    return torch.from_numpy(np.stack(out)).permute(0, 1, 4, 2, 3).float().clamp(0, 1).contiguous()


def oversaturate(images: Tensor, seed: int = 0) -> Tensor:
    """Chroma (distance from luma) times a gain of 1.3-2 drawn per image."""
    from qualiteacher.iqa.image_ops import generator, luma

    gain = 1.3 + 0.7 * torch.rand(images.shape[0], generator=generator(seed)).to(images)
    y = luma(images)
    return (y + gain[:, None, None, None] * (images - y)).clamp(0, 1)


# the destruction kinds this study trained and measured on (docs/iqa.md, "A learned member memorises its
# photos"): listed, so that a kind added to the audit later does not change its draws or its figures
STUDIED_KINDS = ("greyout", "posterize", "colour_cast", "mosaic", "noise_texture", "oversharpen", "heavy_blur",
                 "constant", "emboss", "oversharpen_wide", "halo", "ringing", "tile_seams", "codebook_mosaic",
                 "desaturate", "hue_rotation", "sepia", "chroma_noise", "overexpose", "crush_blacks",
                 "chroma_speckle", "colour_halo", "brown_tint", "sepia_emboss")


def _damage(crops: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """(strong, weak) damaged copies of a batch: one kind per image, blended in at t and at a
    fraction of t."""
    from qualiteacher.iqa.destruction import DESTRUCTIONS

    kinds = [*STUDIED_KINDS, "oversaturate"]
    choice = rng.integers(len(kinds), size=len(crops))
    full = crops.clone()
    for k in np.unique(choice):
        idx = torch.from_numpy(np.flatnonzero(choice == k))
        fn = oversaturate if kinds[k] == "oversaturate" else DESTRUCTIONS[kinds[k]]
        full[idx] = fn(crops[idx], int(rng.integers(2**31)))
    t = torch.from_numpy(rng.uniform(0.35, 1.0, len(crops))).float()[:, None, None, None]
    u = torch.from_numpy(rng.uniform(0.25, 0.7, len(crops))).float()[:, None, None, None]
    delta = full - crops
    return (crops + t * delta).clamp(0, 1), (crops + t * u * delta).clamp(0, 1)


def rework_copies(crops: Tensor, rng: np.random.Generator) -> Tensor:
    """Every crop reworked by one classical restorer (``classical.CLASSICAL``, drawn per crop): what
    a restorer does to a photo that needed nothing (more contrast, darker, flattened texture)."""
    from qualiteacher.classical.catalogue import CLASSICAL

    names = sorted(CLASSICAL)
    choice = rng.integers(len(names), size=len(crops))
    out = crops.clone()
    for k in np.unique(choice):
        idx = torch.from_numpy(np.flatnonzero(choice == k))
        out[idx] = CLASSICAL[names[k]].fn(crops[idx]).clamp(0, 1)
    return out


def _rank_loss(better: Tensor, worse: Tensor) -> Tensor:
    return F.softplus(worse - better).mean()


def fit_naturalness(settings: FitSettings = FitSettings(), photos: dict[str, np.ndarray] | None = None,
                    log_every: int = 100) -> NaturalnessNet:
    """Fit ``NaturalnessNet`` on crops of ``photos`` (default ``fit_photos()``): deterministic for
    ``settings.seed`` on one machine."""
    rng = np.random.default_rng(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = NaturalnessNet(settings.width)
        photos = photos if photos is not None else fit_photos()
        crops = random_crops(photos, settings.crops_per_photo, settings.size, rng)
        if settings.dead_leaves > 0:  # replace a share of the crops by dead-leaves images in the photos' colours
            pixels = torch.cat([torch.from_numpy(np.array(p[..., :3], dtype=np.float32)).reshape(-1, 3) / 255
                                for p in photos.values()])
            palette = pixels[torch.from_numpy(rng.integers(len(pixels), size=4096))]
            share = settings.dead_leaves
            n_dl = 4 * len(crops) if share >= 1 else int(round(share * len(crops) / (1 - share)))
            crops = torch.cat([crops if share < 1 else crops[:0],
                               dead_leaves(max(n_dl, settings.batch), settings.size, palette, rng)])
        ladders = ladder_pairs(crops, rng)
        reworked = rework_copies(crops, rng) if settings.rework > 0 else None
        opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps, pct_start=0.1)
        start = time.perf_counter()
        for step in range(settings.steps):
            idx = torch.from_numpy(rng.choice(len(crops), settings.batch, replace=False))
            clean = crops[idx]
            lad = ladders[idx]
            extra = [] if reworked is None else [reworked[idx]]
            if rng.random() < 0.5:  # the same flip for a crop and its damaged copies
                clean, lad, extra = clean.flip(-1), lad.flip(-1), [e.flip(-1) for e in extra]
            strong, weak = _damage(clean, rng)
            s = net(torch.cat([clean, weak, strong, lad[:, 0], lad[:, 1], *extra]))
            s_clean, s_weak, s_strong, s_l0, s_l1, *s_extra = s.split(settings.batch)
            loss = (_rank_loss(s_clean, s_weak) + _rank_loss(s_weak, s_strong) + _rank_loss(s_clean, s_strong)
                    + _rank_loss(s_clean, s_l0) + _rank_loss(s_l0, s_l1)) / 5 + 1e-3 * s.square().mean()
            if s_extra:
                loss = loss + settings.rework * _rank_loss(s_clean, s_extra[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step + 1) % log_every == 0:
                say(f"naturalness fit: step {step + 1}/{settings.steps} loss {loss.item():.4f} "
                    f"({time.perf_counter() - start:.0f} s)", "quiet")
    net.requires_grad_(False)
    return net.eval()


# ---------------------------------------------------------------------------------------- study
VARIANTS: dict[str, dict[str, float]] = {
    "photos": {},
    "rework": {"rework": 1.0},
    "dead_leaves": {"dead_leaves": 1.0},
    "mix": {"dead_leaves": 0.5},
}
WEIGHTS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)  # the member's weight beside the offline members (sum 3.0-3.3)
LADDERS: tuple[str, ...] = ("blur", "noise", "jpeg")
TRAINED = "trained_student"


def _member(net: nn.Module, lo: float = -3.0, hi: float = 3.0, weight: float = 1.0) -> tuple[MemberSpec, nn.Module]:
    # scored through an Ensemble so the audit's guards apply; the backend name only labels it
    return MemberSpec("learned", "physical:learned", weight, Normalization("range", lo, hi), True, True), net


def audit_table(task: str, net: nn.Module, demo_data: str | None, size: int, cache: Path,
                checkpoint: str | None) -> pd.DataFrame:
    """Raw scores of the offline members (cached per task) and of ``net`` on the tune and report
    images of ``task``; a trained student's rework of each photo is the case ``trained_student``."""
    outputs = None
    if checkpoint:
        from qualiteacher.training.students import trained_student_outputs

        outputs = trained_student_outputs(checkpoint)
    spec, module = _member(net)
    learned = Ensemble([spec], {"learned": module}).eval()
    parts = []
    for split in ("tune", "report"):
        images = default_images(size, split, demo_root=demo_data, task=task)
        kinds = [task, *LADDERS]
        path = cache / f"offline_{task}_{split}_{size}{'_ck' if checkpoint else ''}.parquet"
        if path.is_file():
            offline = pd.read_parquet(path)
        else:
            offline = raw_scores(build_ensemble("offline", task), images, split, kinds, student_outputs=outputs)
            offline.to_parquet(path)
        parts += [offline, raw_scores(learned, images, split, kinds, student_outputs=outputs)]
    table = pd.concat(parts, ignore_index=True)
    table["case"] = table["case"].replace("untrained_student", TRAINED)  # the checkpoint's, when given
    return table


def figures(table: pd.DataFrame, task: str, variant: str) -> list[dict]:
    """The audit's figures of the offline preset plus the member at each of ``WEIGHTS`` and alone;
    the member's range is fitted on the tune photos (5th percentile of damaged to 95th of clean)."""
    tune = table[(table["member"] == "learned") & (table["split"] == "tune")]
    lo = float(tune[tune["case"] != "source"]["raw"].quantile(0.05))
    hi = float(tune[tune["case"] == "source"]["raw"].quantile(0.95))
    base = preset_specs("offline", task)
    rows = []
    for weight in (*WEIGHTS, None):
        member = _member(nn.Identity(), lo, hi, 1.0 if weight is None else weight)[0]
        fused = fuse(table, [member] if weight is None else [*base, member])
        for split in ("tune", "report"):
            passes, rhos = evaluate(fused[fused["case"] != TRAINED], split)
            kinds = passes.drop("all")
            row = {"task": task, "variant": variant, "weight": "alone" if weight is None else weight,
                   "split": split, "pass_all": round(float(passes["all"]), 3),
                   "worst_kind": f"{kinds.idxmin()} {kinds.min():.2f}", "kinds_below_0.9": int((kinds < 0.9).sum()),
                   "worst_ladder": f"{rhos.idxmin()} {rhos.min():.2f}"}
            if (fused["case"] == TRAINED).any():
                rework, _ = evaluate(fused[fused["case"].isin(["source", TRAINED])], split)
                row[TRAINED] = round(float(rework["all"]), 2)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/learned_member")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", nargs="+", default=["dehaze", "lowlight", "derain", "desnow"])
    parser.add_argument("--steps", type=int, default=None, help="fit steps (default: 2500, dead-leaves 1500)")
    parser.add_argument("--demo-data", default=None, help="demo data folder: its test / val ground truth joins the photos")
    parser.add_argument("--checkpoint", default=None, help="a stage-3 checkpoint: its rework of each clean photo")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        settings = FitSettings(**VARIANTS[variant])
        steps = args.steps or (1500 if settings.dead_leaves > 0 else 2500)
        settings = replace(settings, steps=steps, lr=3e-3)
        weights = out / f"{variant}.pt"
        start = time.perf_counter()
        if weights.is_file():
            net = NaturalnessNet(settings.width)
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            net.eval().requires_grad_(False)
        else:
            net = fit_naturalness(settings)
            torch.save(net.state_dict(), weights)
        say(f"{variant}: fitted in {time.perf_counter() - start:.0f} s")
        for task in args.tasks:
            table = audit_table(task, net, args.demo_data, args.size, out, args.checkpoint if task == "dehaze" else None)
            rows += figures(table, task, variant)
    result = pd.DataFrame(rows)
    result.to_csv(out / "learned_member.csv", index=False)
    (out / "learned_member.md").write_text(markdown_table(result.set_index("task"), digits=3) + "\n")
    print(result.to_string(index=False))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
