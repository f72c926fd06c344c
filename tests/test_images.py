"""Image decoding and preprocessing: parity with transformers' image processor, modes, EXIF, limits."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import transformers
from PIL import Image

from llava_jax.data import images
from llava_jax.data.images import ImageProcessor
from llava_jax.errors import LlavaJaxError

# (height, width) of the test images: square, wide, tall, larger and smaller than the crop, odd.
SIZES = [(30, 30), (17, 45), (64, 23), (121, 200), (12, 9), (31, 30)]

CONFIGS = {
    "clip_default": ImageProcessor.default(30).to_config(),
    "llava_pad": ImageProcessor.default(30, pad_to_square=True).to_config(),
    # Non-default numbers everywhere (resample 2 = bilinear), crop smaller than the resize.
    "custom": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 26},
               "crop_size": {"height": 20, "width": 24}, "resample": 2,
               "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25]},
    # Fixed (height, width) resize without crop.
    "fixed_size": {"image_processor_type": "CLIPImageProcessor", "size": {"height": 18, "width": 22},
                   "do_center_crop": False},
    # No resize: the center crop zero-pads images smaller than it.
    "crop_pads": {"image_processor_type": "CLIPImageProcessor", "do_resize": False,
                  "crop_size": {"height": 40, "width": 40}},
}


def _random_image(rng, height, width, mode="RGB"):
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def _png_bytes(img, **save_kwargs):
  buf = io.BytesIO()
  img.save(buf, format="PNG", **save_kwargs)
  return buf.getvalue()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
  with open(tmp_path / "preprocessor_config.json", "w") as f:
    json.dump(CONFIGS[name], f)
  ref = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), local_files_only=True)
  ours = ImageProcessor.from_folder(tmp_path)
  # Without torchvision (as pinned here) transformers 5 picks the PIL backend (CLIPImageProcessorPil /
  # LlavaImageProcessorPil): the same PIL resize and the same float64-rescale, float32-normalize
  # arithmetic as ours, so outputs are bit-identical (tolerance 0). The torchvision backend resizes
  # with its own bicubic kernel, off by at most one uint8 level: 1/255/std ~ 0.015 after normalize.
  atol = 0.0 if ref.backend == "pil" else 1.01 / 255 / min(ours.image_std)
  rng = np.random.default_rng(0)
  batch = [_random_image(rng, h, w) for h, w in SIZES]
  batch += [_random_image(rng, 33, 21, "RGBA"), _random_image(rng, 19, 40, "L")]
  expected = np.asarray(ref(batch, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)
  got = ours(batch)
  assert got.dtype == np.float32 and got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_save_round_trips_through_transformers(tmp_path):
  ours = ImageProcessor.from_config(CONFIGS["custom"])
  ours.save(tmp_path)
  ref = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), local_files_only=True)
  assert type(ref).__name__ in ("CLIPImageProcessor", "CLIPImageProcessorPil")
  ref.save_pretrained(tmp_path / "again")
  assert ImageProcessor.from_folder(tmp_path / "again") == ours
  padded = ImageProcessor.default(30, pad_to_square=True)
  padded.save(tmp_path / "again")
  assert ImageProcessor.from_folder(tmp_path / "again") == padded


def test_folder_config_sources(tmp_path):
  # transformers 5 nests the image processor in processor_config.json and prefers it.
  nested = {"image_processor": ImageProcessor.default(40).to_config(), "patch_size": 14}
  (tmp_path / "processor_config.json").write_text(json.dumps(nested))
  ImageProcessor.default(30).save(tmp_path)
  assert ImageProcessor.from_folder(tmp_path).crop_size == {"height": 40, "width": 40}
  empty = tmp_path / "empty"
  empty.mkdir()
  assert ImageProcessor.from_folder(empty, image_size=56) == ImageProcessor.default(56)
  assert ImageProcessor.from_folder(empty, 56, image_aspect_ratio="pad").pad_to_square
  with pytest.raises(LlavaJaxError, match="empty"):
    ImageProcessor.from_folder(empty)
  (empty / "preprocessor_config.json").write_text("{not json")
  with pytest.raises(LlavaJaxError, match="preprocessor_config.json: invalid JSON"):
    ImageProcessor.from_folder(empty)
  assert ImageProcessor.from_config({"size": 224, "crop_size": 224}) == ImageProcessor()
  with pytest.raises(LlavaJaxError, match="size"):
    ImageProcessor.from_config({"size": {"longest_edge": 3}})


def test_output_layout():
  proc = ImageProcessor.default(30)
  assert proc([]).shape == (0, 30, 30, 3)
  out = proc.preprocess(Image.new("RGB", (50, 40), tuple(proc.background_rgb)))
  assert out.shape == (30, 30, 3) and out.dtype == np.float32
  # The mean color normalizes to ~0 (background_rgb truncates mean * 255).
  assert np.abs(out).max() < 4 / 255 / min(proc.image_std)


def test_pad_to_square_hand_computed():
  bg = (1, 2, 3)
  wide = Image.new("RGB", (3, 1), (200, 0, 0))
  out = np.asarray(images.pad_to_square(wide, bg))
  expected = np.array([[bg] * 3, [(200, 0, 0)] * 3, [bg] * 3], np.uint8)
  np.testing.assert_array_equal(out, expected)
  tall = Image.fromarray(np.full((5, 2, 3), 9, np.uint8))
  out = np.asarray(images.pad_to_square(tall, bg))
  assert out.shape == (5, 5, 3)
  # Offset (5 - 2) // 2 = 1: image in columns 1..2, background in 0, 3, 4.
  np.testing.assert_array_equal(out[:, 1:3], 9)
  for col in (0, 3, 4):
    np.testing.assert_array_equal(out[:, col], np.tile(bg, (5, 1)))
  square = Image.new("RGB", (4, 4))
  assert images.pad_to_square(square, bg) is square
  assert ImageProcessor().background_rgb == (122, 116, 104)  # LLaVA-1.5's gray


def _load(img, fmt="PNG", **kwargs):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  out = images.load_image(buf.getvalue())
  assert out.mode == "RGB" and out.size == img.size
  return np.asarray(out)


def test_modes_8bit():
  gray = Image.fromarray(np.array([[0, 128, 255]], np.uint8), mode="L")
  np.testing.assert_array_equal(_load(gray)[0, :, 0], [0, 128, 255])
  bilevel = Image.fromarray(np.array([[False, True, True]]))
  np.testing.assert_array_equal(_load(bilevel)[0, :, 0], [0, 255, 255])
  palette = gray.convert("P")
  np.testing.assert_array_equal(_load(palette), _load(gray))
  # Palette with a transparent index: transparent pixels become the (white) background.
  transparent = palette.copy()
  transparent.info["transparency"] = palette.getpixel((0, 0))
  np.testing.assert_array_equal(_load(transparent, transparency=palette.getpixel((0, 0)))[0, 0], 255)
  rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], np.uint8))
  out = _load(rgba)
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
  np.testing.assert_allclose(out[0, 2], [227, 177, 127], atol=1)  # 50% over white
  la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), mode="LA")
  np.testing.assert_array_equal(_load(la)[0], [[255] * 3, [50] * 3])
  cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
  np.testing.assert_array_equal(_load(cmyk, "TIFF"), 255)
  ycc = Image.new("RGB", (2, 2), (10, 200, 30)).convert("YCbCr")
  np.testing.assert_allclose(_load(ycc, "TIFF")[0, 0], [10, 200, 30], atol=3)
  opaque = Image.new("RGBA", (3, 2), (10, 20, 30, 255))
  for mode in ("PA", "RGBa", "HSV", "LAB"):
    out = np.asarray(images.to_rgb(opaque.convert(mode)))
    assert out.shape == (2, 3, 3)
    np.testing.assert_allclose(out[0, 0], [10, 20, 30], atol=3)
  half_gray = Image.new("LA", (1, 1), (100, 128)).convert("La")
  np.testing.assert_allclose(images.to_rgb(half_gray).getpixel((0, 0)), [177] * 3, atol=1)
  # A custom background for compositing.
  clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
  assert images.to_rgb(clear, (1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)


def test_modes_high_depth_are_scaled_not_clipped():
  values16 = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
  expected = [0, 100, 128, 255]
  img16 = Image.frombytes("I;16", (4, 1), values16.astype("<u2").tobytes())
  np.testing.assert_array_equal(_load(img16)[0, :, 0], expected)  # 16-bit PNG
  img16b = Image.frombytes("I;16B", (4, 1), values16.astype(">u2").tobytes())
  np.testing.assert_array_equal(np.asarray(images.to_rgb(img16b))[0, :, 0], expected)
  as_int = Image.fromarray(values16.astype(np.int32))
  assert as_int.mode == "I"
  np.testing.assert_array_equal(_load(as_int, "TIFF")[0, :, 0], expected)
  small_int = Image.fromarray(np.array([[0, 100, 255]], np.int32))
  np.testing.assert_array_equal(np.asarray(images.to_rgb(small_int))[0, :, 0], [0, 100, 255])
  unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
  np.testing.assert_array_equal(_load(unit_float, "TIFF")[0, :, 0], [0, 128, 255])


def test_exif_orientation(tmp_path):
  pixels = np.zeros((10, 20, 3), np.uint8)
  pixels[:2, :3] = (255, 0, 0)  # a red top-left corner on a 20x10 (w x h) image
  img = Image.fromarray(pixels)
  # EXIF orientation -> the rotation that makes the stored image upright.
  for orientation, upright in ((1, pixels), (3, np.rot90(pixels, 2)),
                               (6, np.rot90(pixels, -1)), (8, np.rot90(pixels, 1))):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    img.save(path, exif=exif)
    np.testing.assert_array_equal(np.asarray(images.load_image(path)), upright)


def _png_header_only(width, height):
  """A PNG whose header claims width x height but holds a few bytes of pixel data."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 12000x8000 > PIL's 89M
def test_pixel_limit(tmp_path):
  data = _png_bytes(Image.new("RGB", (100, 100)))
  assert images.load_image(data, max_pixels=10_000).size == (100, 100)
  with pytest.raises(LlavaJaxError, match="100x100 = 10000 pixels, over the limit of 9999"):
    images.load_image(data, max_pixels=9_999)
  # The header alone decides: decoding this one would fail as truncated, so reaching the limit
  # message proves the pixels were never decoded (12000x8000 is under PIL's own bomb error).
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(_png_header_only(12_000, 8_000))
  with pytest.raises(LlavaJaxError, match="bomb.png: image is 12000x8000 .* over the limit"):
    images.load_image(bomb)
  with pytest.raises(LlavaJaxError, match="bomb.png: cannot decode"):
    images.load_image(bomb, max_pixels=10**9)
  # Far beyond PIL's own limit, PIL refuses in Image.open; still our error type and file name.
  with pytest.raises(LlavaJaxError, match="huge.png"):
    (tmp_path / "huge.png").write_bytes(_png_header_only(100_000, 100_000))
    images.load_image(tmp_path / "huge.png")


def test_not_an_image(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("this is not an image\n")
  with pytest.raises(LlavaJaxError, match=r"notes.txt: not an image") as err:
    images.load_image(text)
  assert "\n" not in str(err.value)
  with pytest.raises(LlavaJaxError, match="missing.jpg: image file not found"):
    images.load_image(tmp_path / "missing.jpg")
  with pytest.raises(LlavaJaxError, match="is a directory"):
    images.load_image(tmp_path)
  with pytest.raises(LlavaJaxError, match="bytes of image data"):
    images.load_image(b"\x00\x01garbage")
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(_png_bytes(_random_image(np.random.default_rng(1), 64, 64))[:300])
  with pytest.raises(LlavaJaxError, match="cut.png: cannot decode"):
    images.load_image(truncated)
