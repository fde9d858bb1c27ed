"""Preprocessing parity with transformers' Gemma3ImageProcessor, and image-loading failure modes."""

from __future__ import annotations

import base64
import io
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t5gemma2_jax.data.images import ImageError, load_image, preprocess_image, preprocess_images
from t5gemma2_jax.data.tokenizer import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, expand_image_tokens, image_token_sequence


# ------------------------------------------------------------------------------------------------
# Sample photographs shipped inside installed packages (no downloads).
# ------------------------------------------------------------------------------------------------


def _sample_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "mpl-data" / "sample_data"
    return d if d.is_dir() else None


SAMPLES = _sample_dir()
needs_samples = pytest.mark.skipif(SAMPLES is None, reason="matplotlib sample photographs not installed")


def _photo(name: str) -> Image.Image:
    return load_image(str(SAMPLES / name))


@pytest.fixture(scope="module")
def hf_processor():
    """transformers' Gemma 3 image processor with the Gemma 3 / T5Gemma 2 preprocessor settings.
    (Without torchvision, transformers 5.23 resolves Gemma3ImageProcessor to this Pillow backend.)"""
    tr = pytest.importorskip("transformers")
    cls = getattr(tr, "Gemma3ImageProcessorPil")

    def run(image: Image.Image, size: int) -> np.ndarray:
        proc = cls(size={"height": size, "width": size}, resample=2, do_resize=True, do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                   do_convert_rgb=True, do_pan_and_scan=False)
        return np.asarray(proc(images=[image], return_tensors="np")["pixel_values"][0])

    return run


def _assert_matches(ours: np.ndarray, ref: np.ndarray, size: int) -> None:
    assert ours.shape == ref.shape == (3, size, size)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert ours.min() >= -1.0 and ours.max() <= 1.0


# ------------------------------------------------------------------------------------------------
# Parity on real photographs
# ------------------------------------------------------------------------------------------------


@needs_samples
@pytest.mark.parametrize("size", [896, 64])
def test_photo_jpeg_matches_hf(hf_processor, size):
    img = _photo("grace_hopper.jpg")  # RGB JPEG photograph, 512x600 (non-square)
    assert img.mode == "RGB" and img.size[0] != img.size[1]
    _assert_matches(preprocess_image(img, size), hf_processor(img, size), size)


@needs_samples
@pytest.mark.parametrize("size", [896, 64])
def test_photo_rgba_png_matches_hf(hf_processor, size):
    img = _photo("Minduka_Present_Blue_Pack.png")  # RGBA photograph with a transparent background
    assert img.mode == "RGBA"
    ours = preprocess_image(img, size)
    _assert_matches(ours, hf_processor(img, size), size)
    # Transparent corners become white (composited), not black.
    assert np.all(ours[:, 0, 0] == 1.0)


@needs_samples
def test_photo_from_path_bytes_and_base64_agree():
    path = SAMPLES / "grace_hopper.jpg"
    data = path.read_bytes()
    ref = preprocess_image(str(path), 64)
    np.testing.assert_array_equal(preprocess_image(data, 64), ref)
    np.testing.assert_array_equal(preprocess_image(path, 64), ref)
    b64 = base64.b64encode(data).decode()
    np.testing.assert_array_equal(preprocess_image(b64, 64), ref)
    np.testing.assert_array_equal(preprocess_image("data:image/jpeg;base64," + b64, 64), ref)


# ------------------------------------------------------------------------------------------------
# Parity on edge cases (modes, shapes)
# ------------------------------------------------------------------------------------------------


def _synthetic(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    noise = rng.integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _edge_cases() -> dict[str, Image.Image]:
    rgb = _synthetic(45, 30)
    rgba = rgb.convert("RGBA")
    alpha = np.linspace(0, 255, 45 * 30).reshape(30, 45).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    pal = rgb.quantize(16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3  # one palette index is transparent
    return {
        "grayscale_L": rgb.convert("L"),
        "grayscale_LA": rgba.convert("LA"),
        "rgba": rgba,
        "palette": pal,
        "palette_transparent": pal_t,
        "binary_1": rgb.convert("1"),
        "cmyk": rgb.convert("CMYK"),
        "non_square_wide": _synthetic(97, 13, 1),
        "non_square_tall": _synthetic(7, 120, 2),
        "tiny_1x1": _synthetic(1, 1, 3),
        "exact_size": _synthetic(64, 64, 4),
    }


@pytest.mark.parametrize("name", list(_edge_cases()))
def test_edge_cases_match_hf(hf_processor, name):
    img = _edge_cases()[name]
    _assert_matches(preprocess_image(img, 64), hf_processor(img, 64), 64)


def test_edge_cases_survive_a_png_round_trip(hf_processor):
    """Modes as decoded from files (palette transparency stored in tRNS, grayscale PNG)."""
    for name in ("palette_transparent", "grayscale_L", "rgba"):
        buf = io.BytesIO()
        _edge_cases()[name].save(buf, format="PNG")
        img = load_image(buf.getvalue())
        _assert_matches(preprocess_image(img, 32), hf_processor(img, 32), 32)


def test_preprocess_images_stacks_and_handles_empty():
    imgs = [_synthetic(10, 20), _synthetic(33, 5)]
    out = preprocess_images(imgs, 16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], preprocess_image(imgs[1], 16))
    assert preprocess_images([], 16).shape == (0, 3, 16, 16)


def test_numpy_input_and_bad_size():
    a = np.asarray(_synthetic(20, 10))
    np.testing.assert_array_equal(preprocess_image(a, 8), preprocess_image(Image.fromarray(a), 8))
    with pytest.raises(ImageError, match="uint8"):
        preprocess_image(a.astype(np.float32), 8)
    with pytest.raises(ValueError, match="image_size"):
        preprocess_image(a, 0)


# ------------------------------------------------------------------------------------------------
# Failure modes: clear ImageError, no Pillow traceback
# ------------------------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width x height` (the header is all Pillow reads before load())."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + b"\x00" * 8  # the start of a pixel stream that is never read
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 8) + idat + struct.pack(">I", zlib.crc32(idat)))


def _raised(fn, *args, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args, **kw)
    err = info.value
    # Raised directly or `from None`: no Pillow exception is chained into the traceback.
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


def test_missing_file(tmp_path):
    err = _raised(load_image, str(tmp_path / "nope.jpg"))
    assert "does not exist" in str(err) and "nope.jpg" in str(err)
    assert isinstance(err, ValueError)


def test_directory_is_refused(tmp_path):
    assert "directory" in str(_raised(load_image, str(tmp_path)))


def test_corrupt_bytes():
    assert "not in a format" in str(_raised(load_image, b"this is not an image at all"))
    assert "empty" in str(_raised(load_image, b""))


def test_corrupt_pixel_data():
    data = bytearray(_png_bytes(_synthetic(40, 40)))
    mid = len(data) // 2
    data[mid:mid + 40] = b"\x00" * 40  # keep the header, break the IDAT stream
    err = _raised(load_image, bytes(data))
    assert "corrupt" in str(err)


def test_truncated_file(tmp_path):
    buf = io.BytesIO()
    _synthetic(64, 64).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    err = _raised(load_image, str(path))
    assert "truncated" in str(err) and "cut.jpg" in str(err)
    _raised(preprocess_image, str(path), 16)  # same error through preprocessing


def test_decompression_bomb_refused_before_decoding():
    # 100 MP (Pillow only warns) and 10 GP (Pillow raises): both refused with one message.
    for side in (10_000, 100_000):
        err = _raised(load_image, _png_header_only(side, side))
        assert "decompression bomb" in str(err), str(err)
    # The limit is configurable and checked on the header, before any pixel is decoded.
    small = _png_bytes(_synthetic(64, 64))
    err = _raised(load_image, small, max_pixels=1000)
    assert "too large" in str(err) and "64x64" in str(err) and "decompression bomb" in str(err)
    assert load_image(small, max_pixels=None).size == (64, 64)


def test_zero_size_image():
    assert "zero size" in str(_raised(load_image, Image.new("RGB", (0, 5))))
    assert "zero size" in str(_raised(preprocess_image, Image.new("RGB", (5, 0)), 8))


def test_bad_base64_and_bad_type():
    assert "not valid base64" in str(_raised(load_image, "data:image/png;base64,@@@@"))
    assert "cannot load" in str(_raised(load_image, 12345))
    # A long string that is neither a file nor an image in base64: both readings are reported.
    err = str(_raised(load_image, "/data/images/" + "a" * 80))
    assert "not an existing file" in err and "base64" in err


# ------------------------------------------------------------------------------------------------
# Prompt expansion
# ------------------------------------------------------------------------------------------------


def _hf_processor_stub(n: int):
    """Gemma3Processor's own replacement code, with a stand-in tokenizer (only its token strings
    are read; the tokenizer type check at the end of __init__ is expected to fail)."""
    tr = pytest.importorskip("transformers")
    tok = types.SimpleNamespace(boi_token=BOI_TOKEN, eoi_token=EOI_TOKEN, image_token=IMAGE_TOKEN, boi_token_id=0)
    p = tr.Gemma3Processor.__new__(tr.Gemma3Processor)
    try:
        tr.Gemma3Processor.__init__(p, image_processor=tr.Gemma3ImageProcessorPil(), tokenizer=tok,
                                    image_seq_length=n)
    except TypeError:
        pass
    return p


def test_expand_text_matches_gemma3_processor():
    n = 4
    p = _hf_processor_stub(n)
    assert image_token_sequence(n) == p.full_image_sequence
    assert image_token_sequence(n) == f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * n}{EOI_TOKEN}\n\n"
    text = f"Compare {BOI_TOKEN} with{BOI_TOKEN}. Done"
    ref, _ = p.get_text_with_replacements(
        [text], images_replacements=[p.replace_image_token({"num_crops": [0, 0]}, i) for i in range(2)])
    assert expand_image_tokens(text, n) == ref[0]
    assert expand_image_tokens("no images", n) == "no images"


def test_expand_token_ids():
    out = expand_image_tokens([2, 10, 4, 11, 4], 3, boi_id=4, eoi_id=5, image_token_id=6, newline_ids=[108])
    assert out == [2, 10, 108, 4, 6, 6, 6, 5, 108, 11, 108, 4, 6, 6, 6, 5, 108]
    with pytest.raises(ValueError, match="boi_id"):
        expand_image_tokens([1, 2], 3)


# ------------------------------------------------------------------------------------------------
# Skip reasons, references relative to a data file, one error class
# ------------------------------------------------------------------------------------------------


def test_failures_carry_the_skip_reason(tmp_path):
    assert _raised(load_image, str(tmp_path / "nope.jpg")).reason == "missing_image"
    assert _raised(load_image, str(tmp_path)).reason == "missing_image"  # a directory: nothing to read
    assert _raised(load_image, "/data/images/" + "a" * 80).reason == "missing_image"
    for bad in (b"this is not an image at all", b"", _png_header_only(30_000, 30_000),
                "data:image/png;base64,@@@@", "data:image/png,rawbytes", "", 12345,
                Image.new("RGB", (0, 5)), np.zeros((4, 4), np.float32)):
        err = _raised(load_image, bad)
        assert err.reason == "corrupt_image", (bad if not isinstance(bad, bytes) else bad[:20], err)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    err = _raised(load_image, "broken.png", base_dir=tmp_path)
    assert err.reason == "corrupt_image" and "broken.png" in str(err)


def test_relative_paths_resolve_against_base_dir(tmp_path):
    img = _synthetic(12, 9)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(_png_bytes(img))
    loaded = load_image("sub/a.png", base_dir=str(tmp_path))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "sub" / "a.png", base_dir="/elsewhere")),
                                  np.asarray(img))  # absolute paths ignore base_dir
    err = _raised(load_image, "sub/b.png", base_dir=str(tmp_path))
    assert err.reason == "missing_image" and str(tmp_path / "sub" / "b.png") in str(err)


def test_bare_base64_with_slashes_is_image_data():
    data = _png_bytes(_synthetic(30, 30, 5))
    b64 = base64.b64encode(data).decode()
    assert "/" in b64 and len(b64) < 4096
    np.testing.assert_array_equal(preprocess_image(b64, 16), preprocess_image(data, 16))
    err = _raised(load_image, base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 80).decode())
    assert err.reason == "corrupt_image" and "base64" in str(err)


def test_load_pixels_compact_and_float():
    from t5gemma2_jax.data.images import expand, load_pixels, to_pixels

    img = _synthetic(20, 11, 6)
    ref = "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()
    held = load_pixels(ref, None, 8, compact_ok=True)
    assert held.dtype == np.uint8 and held.shape == (3, 8, 8)
    np.testing.assert_array_equal(held, to_pixels(img, 8))
    full = load_pixels(ref, None, 8)
    assert full.dtype == np.float32 and full.tobytes() == expand(held).tobytes()
    assert full.tobytes() == preprocess_image(img, 8).tobytes()
    with pytest.raises(ValueError, match="image_size"):
        load_pixels(ref, None, 0)


def test_pillow_bomb_warning_is_an_error_unless_max_pixels_allows_more(monkeypatch):
    data = _png_bytes(_synthetic(40, 40))  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000, raises above 2000
    assert "decompression bomb" in str(_raised(load_image, data, max_pixels=1000))
    assert load_image(data, max_pixels=2000).size == (40, 40)
    assert load_image(data, max_pixels=None).size == (40, 40)


def test_image_error_is_one_class():
    import pickle

    import t5gemma2_jax
    from t5gemma2_jax.data import records

    root = Path(t5gemma2_jax.__file__).parent
    defining = [p for p in root.rglob("*.py") if "class ImageError" in p.read_text()]
    assert [p.relative_to(root).as_posix() for p in defining] == ["data/images.py"]
    assert records.ImageError is ImageError and issubclass(ImageError, ValueError)
    err = pickle.loads(pickle.dumps(ImageError("image 'x.png' does not exist", "missing_image")))
    assert err.reason == "missing_image" and str(err) == "image 'x.png' does not exist"
    with pytest.raises(ValueError, match="reason"):
        ImageError("msg", "blurry_image")
