"""Decoding: the fast JPEG path gives exactly Pillow's pixels, and refuses what Pillow refuses."""
import io

import numpy as np
import pytest
from PIL import Image

from zoolib import images
from zoolib.images import load_rgb, plain_jpeg_size, read_file, squished_pixels


def _pillow(data: bytes, size: int) -> np.ndarray:
    """The reference: what training and inference.to_tensor see."""
    return np.asarray(load_rgb(io.BytesIO(data)).resize((size, size), Image.BILINEAR))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def photo():
    """A smooth image with texture, so chroma subsampling and the IDCT matter."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    base = np.stack([x * 2, y * 2, (x + y)], axis=-1) + rng.normal(0, 20, (96, 128, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("kw", [{}, {"quality": 95, "subsampling": 0}, {"subsampling": 1},
                                {"progressive": True}, {"quality": 30}])
@pytest.mark.parametrize("size", [32, 96, 128, 57])
def test_jpeg_fast_path_equals_pillow(photo, kw, size):
    data = _jpeg(photo, **kw)
    assert plain_jpeg_size(data) == photo.size  # the torchvision path is taken
    out = squished_pixels(data, size)
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    assert np.array_equal(out, _pillow(data, size))


@pytest.fixture
def decoded(monkeypatch):
    """The files simplejpeg is asked to decode, in order (it still decodes them)."""
    real, calls = images.simplejpeg, []
    assert real is not None  # installed with the package

    class Counting:
        @staticmethod
        def decode_jpeg(data, **kw):
            calls.append(data)
            return real.decode_jpeg(data, **kw)
    monkeypatch.setattr(images, "simplejpeg", Counting)
    return calls


def test_plain_jpegs_use_simplejpeg_and_fall_back_to_pillow(photo, monkeypatch, decoded):
    calls = decoded
    data = _jpeg(photo)
    squished_pixels(data, 32)
    squished_pixels(_png(photo), 32)
    assert calls == [data]  # the JPEG went to simplejpeg, the PNG did not
    # Corrupt scan data (complete file): libjpeg-turbo warns, Pillow decides.
    start = data.index(b"\xff\xda") + 40
    corrupt = data[:start] + b"\xff\xd0" * 8 + data[start + 16:]
    assert plain_jpeg_size(corrupt) == photo.size
    assert np.array_equal(squished_pixels(corrupt, 32), _pillow(corrupt, 32))
    assert calls[-1] == corrupt
    # Without simplejpeg: the same pixels from Pillow, no error.
    monkeypatch.setattr(images, "simplejpeg", None)
    assert np.array_equal(squished_pixels(data, 32), _pillow(data, 32))


_XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("orientation", range(1, 10))
@pytest.mark.parametrize("where", ["exif", "xmp"])
def test_orientation_from_exif_or_xmp_on_the_fast_path(photo, decoded, orientation, where):
    """Every orientation tag (9 is invalid: left as is) gives Pillow's upright pixels."""
    if where == "exif":
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _jpeg(photo, exif=exif)
    else:
        data = _jpeg(photo, xmp=_XMP % orientation)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == orientation
    for size in (40, 96):
        assert np.array_equal(squished_pixels(data, size), _pillow(data, size))
    assert len(decoded) == 2  # both decoded by simplejpeg
    if orientation in (5, 6, 7, 8):  # a quarter turn: the upright image is tall
        assert load_rgb(io.BytesIO(data)).size == photo.size[::-1]


@pytest.mark.parametrize("size", [0, 1500, images._CHUNK - 1, images._CHUNK, images._CHUNK + 1,
                                  3 * images._CHUNK + 7])
def test_read_file_reads_every_byte(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(data)
    assert read_file(tmp_path / "f.bin") == data
    assert read_file(str(tmp_path / "f.bin")) == data


def test_read_file_missing_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "nope.jpg")


def test_greyscale_cmyk_exif_and_png_equal_pillow(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = photo.transpose(Image.Transpose.ROTATE_90)
    grey, cmyk = _jpeg(photo.convert("L")), _jpeg(photo.convert("CMYK"))
    rotated, png = _jpeg(turned, exif=exif), _png(photo.convert("RGBA"))
    assert plain_jpeg_size(grey) == photo.size  # simplejpeg, greyscale made RGB
    assert plain_jpeg_size(rotated) == turned.size  # simplejpeg, then turned upright
    assert plain_jpeg_size(cmyk) is plain_jpeg_size(png) is None
    for data in (grey, cmyk, rotated, png):
        assert np.array_equal(squished_pixels(data, 40), _pillow(data, 40))
    # The EXIF-rotated file is shown upright: its pixels are close to the upright file's.
    upright = squished_pixels(_jpeg(photo), 40).astype(int)
    assert np.abs(squished_pixels(_jpeg(turned, exif=exif), 40) - upright).mean() < 8


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_truncated_jpeg_and_junk_are_errors(photo):
    data = _jpeg(photo)
    with pytest.raises(OSError, match="truncated"):
        squished_pixels(data[: len(data) * 2 // 3], 32)
    with pytest.raises(Exception, match="a text file, not an image"):
        squished_pixels(b"not an image at all", 32)


def test_bombs_are_refused_on_both_paths(photo, monkeypatch):
    data = _jpeg(photo)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", photo.width * photo.height - 1)
    assert plain_jpeg_size(data) is None  # too big for the fast path: Pillow decides
    with pytest.raises(Image.DecompressionBombWarning):
        squished_pixels(data, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", photo.width * photo.height // 3)
    with pytest.raises(Image.DecompressionBombError):
        squished_pixels(data, 32)


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos", "nearest"])
def test_the_resize_filter_of_model_json_is_the_one_used(photo, interpolation):
    data = _jpeg(photo)
    want = np.asarray(load_rgb(io.BytesIO(data)).resize((40, 40), images.RESAMPLE[interpolation]))
    out = squished_pixels(data, 40, interpolation)
    assert np.array_equal(out, want) and not np.array_equal(out, _pillow(data, 40))
    with pytest.raises(ValueError, match="interpolation 'area'"):
        squished_pixels(data, 40, "area")


# ---------------------------------------------------------------- reduced-size decoding

@pytest.fixture(scope="module")
def camera_photo():
    """A 4032x3024 photo-like JPEG (smooth gradients plus texture), as phones take."""
    rng = np.random.default_rng(3)
    small = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((4032, 3024), Image.BICUBIC)


def _with_orientation(img: Image.Image, orientation: int, **kw) -> bytes:
    exif = img.getexif()
    exif[0x0112] = orientation
    return _jpeg(img, exif=exif.tobytes(), quality=90, **kw)


@pytest.mark.parametrize("size", [32, 224, 299, 640])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_reduced_decode_is_the_same_on_both_decoders(camera_photo, monkeypatch, size,
                                                     orientation):
    data = _with_orientation(camera_photo, orientation)
    fast = squished_pixels(data, size, decode="reduced")
    monkeypatch.setattr(images, "simplejpeg", None)  # Pillow's draft path
    slow = squished_pixels(data, size, decode="reduced")
    reference = np.asarray(load_rgb(io.BytesIO(data), draft=size).resize((size, size),
                                                                          Image.BILINEAR))
    assert np.array_equal(fast, slow) and np.array_equal(fast, reference)
    assert fast.shape == (size, size, 3)


def test_reduced_decode_picks_the_smallest_scale_that_covers_the_size(camera_photo):
    assert [images.dct_scale(4032, 3024, s) for s in (32, 224, 299, 400, 800, 1600, 3100)] \
        == [8, 8, 8, 4, 2, 1, 1]
    assert images.dct_scale(1000, 800, 250) == 2  # Pillow's draft rule, not libjpeg's 3/8
    data = _jpeg(camera_photo.resize((1000, 800)), quality=90)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (250, 250))
        assert img.size == (500, 400)


def test_full_decode_is_unchanged_and_differs_from_reduced(camera_photo):
    data = _with_orientation(camera_photo, 6)
    full = squished_pixels(data, 224)
    assert np.array_equal(full, np.asarray(load_rgb(io.BytesIO(data)).resize(
        (224, 224), Image.BILINEAR)))
    assert not np.array_equal(full, squished_pixels(data, 224, decode="reduced"))
    with pytest.raises(ValueError, match="decode"):
        squished_pixels(data, 224, decode="fast")


def test_reduced_decode_leaves_small_and_non_jpeg_files_alone(photo):
    small = _jpeg(photo)  # 128x96: at 96 px no DCT reduction covers the size
    assert np.array_equal(squished_pixels(small, 96, decode="reduced"), squished_pixels(small, 96))
    png = _png(photo)
    assert np.array_equal(squished_pixels(png, 32, decode="reduced"), squished_pixels(png, 32))
