"""Restoring a real photo on an ordinary machine: attention through SDPA, tiles under a memory
budget without seams, 8-bit photos, header-only bombs, broken weights, the output folder."""
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qualiteacher.archs.output import StudentOutput
from qualiteacher.archs.transformer import TransformerBlock
from qualiteacher.archs.vqae import AttnBlock
from qualiteacher.training.memory import MemoryBudgetError, measure_peak, parse_memory
from qualiteacher.training.restore import (NonFiniteOutputError, auto_tile, default_overlap, default_tile,
                                           load_for_inference, restore)
from qualiteacher.training.tiling import axis_starts, axis_weights, plan_batch, tiled_apply


def _explicit_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_attention_block_is_sdpa_and_equals_explicit_attention():
    block = AttnBlock(24).eval()
    assert set(block.state_dict()) == {"norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj.weight",
                                       "proj.bias"}  # the names old checkpoints hold
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 24, 6, 5)
        q, k, v = block.qkv(block.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C)
        ref = x + block.proj(_explicit_attention(q, k, v).transpose(1, 2).reshape(2, 24, 6, 5))
        assert torch.allclose(block(x), ref, atol=1e-5)


def test_transformer_attention_equals_explicit_attention():
    block = TransformerBlock(32, 4, 64).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        qkv = block.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        ref = block.proj(_explicit_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(2, 10, 32))
        assert torch.allclose(block.attention(x), ref, atol=1e-5)


def test_attention_memory_is_linear_in_the_tokens():
    # 4096 tokens: the explicit matrix alone is 4096^2 floats = 64 MiB; the fused kernel holds rows
    block = AttnBlock(32).eval()
    with torch.no_grad():
        _, peak = measure_peak(block, torch.randn(1, 32, 64, 64))
    assert peak < 8 * 2**20


def test_budget_and_tile_rules():
    assert parse_memory("1.5G") == int(1.5 * 2**30) and parse_memory("512MB") == 512 * 2**20
    assert parse_memory(1000) == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)
    # the smaller the budget, the fewer tiles per batch; not even one: a clear error
    assert plan_batch(10e6, 100_000_000, 20_000_000) == 8
    assert plan_batch(10e6, 50_000_000, 20_000_000) == 3
    assert plan_batch(10e6, 10**12, 0, max_positions=64) == 64
    with pytest.raises(MemoryBudgetError, match="over the memory budget"):
        plan_batch(10e6, 25_000_000, 20_000_000)
    # tiles spread evenly, neighbours overlapping by at least the overlap; weights sum to one inside
    for size in (130, 1000, 4000):
        starts = axis_starts(size, 128, 16)
        assert starts[0] == 0 and starts[-1] == size - 128
        assert all(128 - (b - a) >= 16 for a, b in zip(starts, starts[1:]))
        weights, total = axis_weights(starts, 128, size, torch.device("cpu"))
        assert torch.allclose(total, torch.ones(size), atol=1e-6)  # raised-cosine ramps are complementary


def test_default_tiles_follow_the_architecture():
    from qualiteacher.training.students import build_student

    demo, paper_smoke = build_student("iqpir", "demo"), build_student("iqpir", "paper-smoke")
    assert default_tile(demo) == 128 and default_tile(paper_smoke) == 512
    assert default_overlap(128) == 16 and default_overlap(512) == 64 and default_overlap(32) == 8
    assert auto_tile(torch.zeros(1, 3, 100, 120), None, demo) is None      # fits one tile: whole
    assert auto_tile(torch.zeros(1, 3, 8, 20000), None, demo) == 128       # a strip: 8 x 128 tiles
    assert auto_tile(torch.zeros(1, 3, 600, 600), 0, demo) is None


class _Local(nn.Module):
    """A convolutional net with a 7-px receptive field (no normalisation, no attention)."""

    size_multiple = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                                 nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x, level=None):
        return StudentOutput(torch.sigmoid(self.net(x) + 4 * (x - 0.5)), x.new_zeros(()))


def _smooth(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([xx, yy, 0.5 + 0.4 * torch.sin(3 * xx + 2 * yy)])[None]


# stated bound: on a smooth image, a model with a 7-px receptive field restored in 64-px tiles
# overlapping by 16 px differs from the whole-image restoration by less than half an 8-bit step
TILED_VS_WHOLE_BOUND = 0.5 / 255


def test_tiled_equals_whole_on_a_smooth_image_within_the_stated_bound():
    net, x = _Local().eval(), _smooth(200, 288)  # multiples of 4: the whole image needs no padding either
    whole = restore(net, x, tile=0)
    tiled = restore(net, x, tile=64, overlap=16)
    assert (tiled - whole).abs().max() < TILED_VS_WHOLE_BOUND
    # from an 8-bit photo: the same within rounding, and 8-bit out
    u8 = (x * 255).round().to(torch.uint8)
    out = restore(net, u8, tile=64, overlap=16)
    assert out.dtype == torch.uint8 and (out.float() - restore(net, u8.float() / 255, tile=0) * 255).abs().max() <= 1


def test_no_step_at_tile_borders_even_when_tiles_disagree():
    # the worst case of a non-local model: every tile's output is off by its own constant. Blended
    # with raised-cosine ramps, the output's slope stays within (largest disagreement) x pi/(2 overlap):
    # a ramp, never a step
    x = _smooth(150, 230) * 0.5
    offsets = iter(torch.rand(1000).tolist())

    def fn(t):
        return t + 0.2 * torch.tensor([next(offsets) for _ in range(t.shape[0])])[:, None, None, None]

    out = tiled_apply(fn, x, tile=48, overlap=16)
    for dim in (-1, -2):
        excess = (out.diff(dim=dim) - x.diff(dim=dim)).abs().max()
        assert excess <= 0.2 * math.pi / (2 * 16) + 1e-5


def test_a_smaller_budget_runs_smaller_tile_batches():
    net, x = _Local().eval(), _smooth(256, 256)
    seen = {}

    def batches(budget):
        sizes = []

        def fn(t):
            sizes.append(t.shape[0])
            return net(t).image

        out = tiled_apply(fn, x, tile=64, overlap=16, max_memory=budget, multiple=4, key=None)
        seen[budget] = out
        return max(sizes[1:])  # the first call is the probe

    big, small = batches(64 * 2**20), batches(4 * 2**20)
    assert small < big
    assert torch.allclose(seen[64 * 2**20], seen[4 * 2**20], atol=1e-6)  # same result, smaller batches
    with pytest.raises(MemoryBudgetError):
        batches(2**20)  # not even the image and one tile


def test_non_finite_weights_and_outputs_are_errors(tmp_path):
    net = _Local().eval()
    with torch.no_grad():
        net.net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteOutputError):
        restore(net, _smooth(40, 40))


def _checkpoint(tmp_path, **hparams):
    from test_safety import write_stage3_checkpoint

    return write_stage3_checkpoint(tmp_path / "s3.ckpt", student="unet", **hparams)


def _folder(tmp_path, name="photos", sizes=((40, 56),)):
    folder = tmp_path / name
    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        arr = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def test_restore_cli_refuses_its_input_folder_and_broken_weights(tmp_path, capsys):
    from qualiteacher.cli import main

    ckpt, photos = _checkpoint(tmp_path), _folder(tmp_path)
    before = (photos / "im0.png").read_bytes()
    assert main(["restore", str(photos), "--checkpoint", str(ckpt), "--out", str(photos)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the input folder" in err
    assert (photos / "im0.png").read_bytes() == before and sorted(p.name for p in photos.iterdir()) == ["im0.png"]
    # NaN weights: one line, exit 2, no black PNG
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k in state["state_dict"] if k.startswith("student.") and k.endswith("weight"))
    state["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    assert main(["restore", str(photos), "--checkpoint", str(tmp_path / "nan.ckpt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN or infinite" in err and not (tmp_path / "o").exists()


def test_restore_app_and_registry_never_create_the_checkpoints_bank_folder(tmp_path):
    from qualiteacher.app.model import load_checkpoint_model
    from qualiteacher.cli import main

    bank = tmp_path / "planted_bank"
    ckpt = _checkpoint(tmp_path, bank_dir=str(bank))
    state = torch.load(ckpt, weights_only=True)  # a legacy bank: loading it would write its entries
    state["pseudo_label_bank"] = {"k": 3, "entries": {"x": [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8),
                                                              "mask": torch.zeros(1, 8, 8, dtype=torch.uint8),
                                                              "score": 0.5, "level": 3}]}}
    torch.save(state, ckpt)
    photos = _folder(tmp_path)
    assert main(["restore", str(photos), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "im0.png").is_file()
    load_checkpoint_model(ckpt)
    trained = load_for_inference(ckpt)
    assert trained.hparams["bank_dir"] == str(bank)
    assert not bank.exists()


def test_the_app_api_checks_its_dials():
    from qualiteacher.app.logic import UploadError, restore_image
    from qualiteacher.app.model import AppModel
    from qualiteacher.archs.presets import build_unet

    model = AppModel(build_unet("tiny").eval(), None, "dehaze", "offline", None, 7, "test")
    x = _smooth(32, 32)
    for level, w in ((8, None), (-1, None), (3, 5.0), (3, -0.1), (3, float("nan"))):
        with pytest.raises(UploadError):
            restore_image(model, x, level=level, w=w)
    assert restore_image(model, x, level=7, w=1.0).image.shape == x.shape


def test_a_header_only_bomb_is_refused_from_its_header(tmp_path, capsys):
    from qualiteacher.cli import main

    folder = tmp_path / "bomb"
    folder.mkdir()
    Image.new("L", (7900, 7900), 128).save(folder / "bomb.png", optimize=True)  # 62 MP in a few KB
    assert (folder / "bomb.png").stat().st_size < 200_000
    ckpt = _checkpoint(tmp_path)
    assert main(["restore", str(folder), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                 "--max-memory", "256M"]) == 0
    out = capsys.readouterr().out
    assert "0 image(s) restored" in out and "over the memory budget" in out
    assert not (tmp_path / "o").exists()


_PEAK_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    from qualiteacher.training.restore import restore
    from qualiteacher.training.students import build_student
    torch.manual_seed(0)
    net = build_student("unet", "tiny").eval()
    h, w, budget = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    image = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
    restore(net, image[..., :64, :64], max_memory=budget)  # warm up: kernels, allocator, the probe
    status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts from here
    out = restore(net, image, max_memory=budget)
    print(status("VmHWM") - base, out.shape[-1])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_a_large_photo_is_restored_under_the_budget(tmp_path):
    budget = 64 * 2**20
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "1600", "2000", str(budget)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    grown, width = map(int, run.stdout.split())
    assert width == 2000 and grown <= budget, f"peak RSS grew {grown / 2**20:.0f} MiB, budget {budget / 2**20:.0f}"


def test_scoring_reads_large_images_in_8_bits_at_a_bounded_size(tmp_path):
    from qualiteacher.iqa.bounded import fit_side, read_bounded, read_uint8

    arr = (np.random.default_rng(0).random((300, 2400, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "grey.png")
    assert read_uint8(tmp_path / "wide.png").shape == (300, 2400, 3)
    assert np.array_equal(read_uint8(tmp_path / "wide.png"), arr)
    small = read_bounded(tmp_path / "wide.png", 1024)
    assert small.shape == (128, 1024, 3) and small.dtype == np.float32 and 0 <= small.min() <= small.max() <= 1
    assert read_bounded(tmp_path / "grey.png", 600).shape == (75, 600, 3)
    assert fit_side(torch.rand(2, 3, 40, 900), 300).shape == (2, 3, 13, 300)
    with pytest.raises(ValueError):  # a broken file: read_image's error
        (tmp_path / "bad.png").write_bytes(b"not a png")
        read_uint8(tmp_path / "bad.png")
