import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from qualiteacher.data.io import (
    ImageReadError,
    SkipLog,
    get_skip_log,
    list_images,
    pad_to_size,
    read_image,
    to_tensor,
    write_image,
)


def _rgb(h=20, w=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix,kwargs", [(".png", {}), (".bmp", {}), (".webp", {"lossless": True}),
                                           (".tif", {}), (".tiff", {})])
def test_lossless_formats_round_trip(tmp_path, suffix, kwargs):
    rgb = _rgb()
    path = tmp_path / f"a{suffix}"
    Image.fromarray(rgb).save(path, **kwargs)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (20, 24, 3)
    np.testing.assert_allclose(out, rgb / 255.0, atol=1e-6)


def test_jpeg_reads_close(tmp_path):
    rgb = np.full((16, 16, 3), (200, 40, 90), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.JPG", quality=95)
    np.testing.assert_allclose(read_image(tmp_path / "a.JPG"), rgb / 255.0, atol=0.03)


def test_grayscale_is_replicated(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], gray / 255.0, atol=1e-6)


def test_one_bit_image(tmp_path):
    Image.new("1", (6, 4), 1).save(tmp_path / "b.png")
    np.testing.assert_allclose(read_image(tmp_path / "b.png"), 1.0)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(out[0, 0], [1, 1, 1], atol=1e-6)  # transparent -> white
    np.testing.assert_allclose(out[0, 1], [1, 0, 0], atol=1e-6)  # opaque red
    a = 128 / 255
    np.testing.assert_allclose(out[0, 2], [1, 1 - a, 1 - a], atol=1e-6)


def test_la_composited_on_white(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)  # black, alpha 0 / 255
    la[1, :, 1] = 255
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], 0.0)


def test_palette_image(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = (10, 200, 30)
    rgb[2:] = (250, 5, 100)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), rgb / 255.0, atol=1e-6)


def test_palette_transparency_on_white(tmp_path):
    im = Image.new("P", (3, 3), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.save(tmp_path / "pt.png", transparency=0)
    out = read_image(tmp_path / "pt.png")
    np.testing.assert_allclose(out[0, 0], [1, 1, 1])  # transparent index -> white
    np.testing.assert_allclose(out[1, 1], [1, 0, 0])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_scaled_not_clipped(tmp_path, suffix):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / f"d{suffix}")
    assert Image.open(tmp_path / f"d{suffix}").mode.startswith("I")
    out = read_image(tmp_path / f"d{suffix}")
    np.testing.assert_allclose(out[..., 0], values / 65535.0, atol=1e-6)
    assert out[0, 1, 0] < 0.02  # 1000 is dark in 16-bit, not clipped to white


def test_cmyk(tmp_path):
    Image.new("CMYK", (5, 5), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    Image.new("CMYK", (5, 5), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    np.testing.assert_allclose(read_image(tmp_path / "c.jpg"), 1.0, atol=0.02)
    np.testing.assert_allclose(read_image(tmp_path / "c.tif")[2, 2], [1, 0, 0], atol=0.02)


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)  # stored: 40 wide, 20 high
    rgb[:, :20] = (255, 0, 0)  # left half red
    rgb[:, 20:] = (0, 0, 255)  # right half blue
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    # clockwise: the stored left half (red) becomes the top half
    assert out[:18, :, 0].mean() > 0.9 and out[:18, :, 2].mean() < 0.1
    assert out[22:, :, 2].mean() > 0.9 and out[22:, :, 0].mean() < 0.1


def _encoded(fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_rgb(32, 32)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty"),
    ("text.png", b"hello, not an image\n" * 5, "not a recognised image"),
    ("noise.jpg", bytes(range(256)) * 4, "not a recognised image"),
    ("trunc.png", None, "truncated"),
    ("trunc.jpg", None, "truncated"),
    ("broken.png", "corrupt", ""),
])
def test_bad_files_raise_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        data = _encoded("PNG" if path.suffix == ".png" else "JPEG")
        path.write_bytes(data[: len(data) // 2])
    elif content == "corrupt":
        data = bytearray(_encoded("PNG"))
        data[100:140] = b"\x00" * 40  # damage the compressed data / CRC
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == path and err.reason and reason in err.reason
    assert str(path) in str(err)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_image_read_error_pickles(tmp_path):
    err = pickle.loads(pickle.dumps(ImageReadError(tmp_path / "x.png", "bad")))
    assert err.path == tmp_path / "x.png" and err.reason == "bad"


def test_skip_log_reports_once_and_counts(caplog):
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        assert skips.record("/data/a.png", "truncated")
        assert not skips.record("/data/a.png", "truncated")
        skips.record("/data/b.png", "empty")
    assert len(skips) == 2 and skips.count == 3
    assert sum("a.png" in r.getMessage() for r in caplog.records) == 1
    summary = skips.summary()
    assert "2 file(s)" in summary and "/data/a.png: truncated" in summary and "3 skip" in summary
    clone = pickle.loads(pickle.dumps(skips))
    assert clone.paths == skips.paths and clone.count == 3
    clone.record("/data/c.png", "x")
    assert len(skips) == 2
    skips.clear()
    assert len(skips) == 0 and skips.summary() == "no files skipped"


def test_skip_log_summary_truncates():
    skips = SkipLog()
    for i in range(15):
        skips.record(f"f{i}.png", "bad")
    assert "and 5 more" in skips.summary(max_items=10)


def test_default_skip_log_is_shared():
    assert get_skip_log() is get_skip_log()


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.tif", "f.BMP", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.png").write_bytes(b"x")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.tif", "f.BMP"]
    assert "z.png" in [p.name for p in list_images(tmp_path, recursive=True)]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "a.jpg")


def test_write_image_round_trip(tmp_path):
    t = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))
    path = write_image(tmp_path / "x" / "y" / "t.png", t)
    back = read_image(path)
    np.testing.assert_allclose(back, t.permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)
    rgb = _rgb(5, 7)
    np.testing.assert_array_equal(np.asarray(Image.open(write_image(tmp_path / "u.png", rgb))), rgb)
    write_image(tmp_path / "g.png", np.zeros((4, 4), dtype=np.float32))
    write_image(tmp_path / "b.png", torch.ones(1, 3, 4, 4))
    assert read_image(tmp_path / "b.png").min() == 1.0
    with pytest.raises(ValueError, match="PNG"):
        write_image(tmp_path / "x.jpg", rgb)
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "x.png", torch.zeros(2, 4, 4))


def test_to_tensor():
    arr = np.random.default_rng(0).random((6, 5, 3), dtype=np.float32)
    t = to_tensor(arr)
    assert t.shape == (3, 6, 5) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.equal(t[1], torch.from_numpy(arr[..., 1]))
    with pytest.raises(ValueError):
        to_tensor(arr[..., 0])


def test_pad_to_size_reflect_and_replicate():
    img = np.random.default_rng(0).random((5, 6, 3), dtype=np.float32)
    out = pad_to_size(img, 8, 8)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, np.pad(img, ((1, 2), (1, 1), (0, 0)), mode="reflect"))
    tiny = img[:2, :2]
    out = pad_to_size(tiny, 8, 8)  # too small to reflect: replicate
    np.testing.assert_array_equal(out, np.pad(tiny, ((3, 3), (3, 3), (0, 0)), mode="edge"))
    assert pad_to_size(img, 4, 4) is img
