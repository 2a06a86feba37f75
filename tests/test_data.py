import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dudch import DudchError, openclipart, sources
from dudch.features import bag_of_words, expand_internal_entities, read_image, render_svg
from dudch.prepare import PrepareConfig, make_split
from pipeline.data import ensure_openclipart, workspace_matches_pin
from tests.helpers import ROOT, dudch, interruptible

SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
 xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://creativecommons.org/ns#" width="10" height="20"><metadata><rdf:RDF><cc:Work>
<dc:subject><rdf:Bag><rdf:li>Black &amp; white</rdf:li><rdf:li>owl</rdf:li><rdf:li></rdf:li></rdf:Bag></dc:subject>
</cc:Work></rdf:RDF></metadata><rect width="10" height="20" fill="red"/></svg>"""


def test_tags_categories_and_folder_words():
    assert openclipart.parse_tags(SVG) == ("Black & white", "owl")
    assert openclipart.parse_tags(b"<svg/>") == ()
    assert openclipart.categories("animals/birds/night/owl.svg") == ("animals", "animals/birds")
    assert openclipart.categories("office/pen.svg") == ("office",)
    assert openclipart.folder_words(["signs_and_symbols/flags/x.svg"]) == {"signs", "and", "symbols", "flags"}


def test_bag_of_words_drops_folder_words_and_rare_words():
    bow, vocabulary = bag_of_words([["Birds", "red owl"], ["owl"], ["bird", "rare"]], min_count=2,
                                   drop_words={"birds"})
    assert vocabulary == ["owl"]
    np.testing.assert_array_equal(bow, [[1], [1], [0]])


def test_render_keeps_aspect_on_a_white_canvas(tmp_path):
    (tmp_path / "a.svg").write_bytes(SVG)
    pixels = render_svg(tmp_path / "a.svg", size=32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert (pixels[16, 0] == 255).all() and pixels[16, 16, 0] == 255 and pixels[16, 16, 1] < 50
    (tmp_path / "bad.svg").write_bytes(b"<svg")
    assert render_svg(tmp_path / "bad.svg") is None



def test_the_canvas_is_read_as_the_png_cairo_would_write():
    """render_svg reads cairo's canvas directly: its pixels must equal the PNG's, translucent ones
    (premultiplied in the canvas) included."""
    import io

    import cairocffi
    from PIL import Image

    from dudch.features import _cairo_rgb

    surface = cairocffi.ImageSurface(cairocffi.FORMAT_ARGB32, 37, 5)  # stride wider than 37 pixels
    context = cairocffi.Context(surface)
    for x, alpha in enumerate(np.linspace(0, 1, 37)):
        context.set_source_rgba(0.9, 0.3 + x / 100, 0.05, alpha)
        context.rectangle(x, 0, 1, 5)
        context.fill()
    png = io.BytesIO()
    surface.write_to_png(png)
    np.testing.assert_array_equal(_cairo_rgb(surface), np.asarray(Image.open(png).convert("RGB")))


def test_reuse_freed_memory_keeps_large_blocks_off_mmap():
    """glibc mmaps each large allocation by default (page faults on every batch); after
    reuse_freed_memory, a 64 MiB array comes from the heap and freed memory stays for reuse."""
    script = (
        "import ctypes, numpy as np\n"
        "from dudch import reuse_freed_memory\n"
        "class Info(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in "
        "('arena','ordblks','smblks','hblks','hblkhd','usmblks','fsmblks','uordblks','fordblks','keepcost')]\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = Info\n"
        "def mapped(): a = np.ones(2**26, np.uint8); return libc.mallinfo2().hblkhd >= 2**26\n"
        "before = mapped(); reuse_freed_memory(); print(before, mapped())\n")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["True", "False"], result.stderr

ILLUSTRATOR_SVG = b"""<?xml version="1.0"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd" [
  <!ENTITY ns_svg "http://www.w3.org/2000/svg">
  <!-- Illustrator writes these in every export -->
  <!ENTITY ns_flows 'http://ns.adobe.com/Flows/1.0/'>
  <!ENTITY fill "red">
]>
<svg xmlns="&ns_svg;" xmlns:x="&ns_flows;" width="10" height="20"><rect width="10" height="20" fill="&fill;"/></svg>"""


def test_svg_internal_entities_are_expanded_and_unsafe_ones_refused(tmp_path):
    (tmp_path / "plain.svg").write_bytes(SVG)
    (tmp_path / "illustrator.svg").write_bytes(ILLUSTRATOR_SVG)
    np.testing.assert_array_equal(render_svg(tmp_path / "illustrator.svg", 32), render_svg(tmp_path / "plain.svg", 32))
    external = ILLUSTRATOR_SVG.replace(b'<!ENTITY fill "red">', b'<!ENTITY fill SYSTEM "file:///etc/passwd">')
    parameter = ILLUSTRATOR_SVG.replace(b'<!ENTITY fill "red">', b'<!ENTITY % fill "red">')
    nested = ILLUSTRATOR_SVG.replace(b'<!ENTITY fill "red">', b'<!ENTITY fill "&ns_svg;">')
    bomb = ILLUSTRATOR_SVG.replace(b'<!ENTITY fill "red">', b'<!ENTITY fill "' + b"x" * 1000 + b'">').replace(
        b"</svg>", b"<desc>" + b"&fill;" * 5000 + b"</desc></svg>")
    for svg in (external, parameter, nested, bomb):
        assert expand_internal_entities(svg) is None and render_svg(svg) is None
    assert expand_internal_entities(SVG) is SVG


def test_decoding_is_bounded(tmp_path, monkeypatch):
    from PIL import Image

    from dudch import features

    big = tmp_path / "big.png"
    Image.new("RGB", (4000, 3000), "red").save(big)
    pixels = read_image(big, 32)
    assert pixels.shape == (32, 32, 3) and (pixels[..., 0] > 250).all() and (pixels[..., 1] < 5).all()
    monkeypatch.setattr(features, "MAX_IMAGE_PIXELS", 4000 * 3000 - 1)
    assert read_image(big, 32) is None  # refused before its pixels are decoded
    monkeypatch.setattr(features, "MAX_IMAGE_BYTES", big.stat().st_size - 1)
    assert read_image(big.read_bytes(), 32, svg=False) is None
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's decompression-bomb guard stays on


def test_the_encoder_s_channels_last_weights_give_the_features_of_the_plain_layout(openclipart_root):
    """ImageEncoder lays its weights out channels-last for speed; the features must be those of
    the network as shipped (the feature cache keys do not change with the layout)."""
    import torch

    from dudch.features import ImageEncoder, efficientnet_backbone

    drawings = sorted(openclipart_root.glob("food/*.svg"))[:6]
    pixels = np.stack([read_image(path) for path in drawings])
    plain = efficientnet_backbone().eval()
    with torch.inference_mode():
        expected = plain(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(ImageEncoder().encode(pixels), expected, rtol=0, atol=1e-5)


def test_split_is_seeded_disjoint_and_scaled():
    split = make_split(1000, PrepareConfig(seed=3))
    again = make_split(1000, PrepareConfig(seed=3))
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert len(split["query"]) == 150 and len(split["database"]) == 850
    assert not set(split["query"]) & set(split["database"])
    assert set(split["train"]) <= set(split["database"]) and set(split["validation"]) <= set(split["database"])
    assert not set(split["validation"]) & set(split["train"])
    assert not np.array_equal(split["query"], make_split(1000, PrepareConfig(seed=4))["query"])


def test_a_second_prepare_reuses_the_cached_image_features(openclipart_root, tmp_path, monkeypatch):
    from dudch import prepare

    config = PrepareConfig(max_items=30, min_label_size=1, min_word_count=1, image_size=64)
    first, _, _ = prepare.prepare(f"openclipart:{openclipart_root}", tmp_path, config, progress=False)
    monkeypatch.setattr(prepare, "ImageEncoder", None)  # any attempt to encode again would fail
    monkeypatch.setattr(sources, "read_image", None)
    second, _, _ = prepare.prepare(f"openclipart:{openclipart_root}", tmp_path, config, progress=False)
    np.testing.assert_array_equal(first["image"], second["image"])
    assert len(list(tmp_path.glob("image-features-*.npz"))) == 1


def test_features_and_pixels_come_from_one_rendering_pass(openclipart_root, tmp_path, monkeypatch):
    from dudch import prepare

    rendered = []
    real = sources.read_image
    monkeypatch.setattr(sources, "read_image", lambda path, size: rendered.append(path) or real(path, size))
    config = PrepareConfig(max_items=20, min_label_size=1, min_word_count=1, image_size=64, keep_pixels=True)
    features, _, _ = prepare.prepare(f"openclipart:{openclipart_root}", tmp_path, config, progress=False)
    assert len(rendered) == len(set(rendered)) == 20 and len(features["pixels"]) == len(features["image"])


def test_missing_archive_is_one_clear_line(tmp_path):
    with pytest.raises(DudchError, match="archive not found") as error:
        openclipart.fetch(tmp_path / "data", tmp_path / "dl", archive=tmp_path / "nope.deb")
    assert "\n" not in str(error.value)


def test_corrupt_archive_is_refused_and_good_data_is_kept(tmp_path, monkeypatch):
    good = tmp_path / "data"
    good.mkdir()
    (good / "keep.svg").write_text("good")
    corrupt = tmp_path / "openclipart.deb"
    corrupt.write_bytes(b"!<arch>\n truncated")
    with pytest.raises(DudchError, match="corrupt archive .*SHA-256.*delete it and rerun"):
        openclipart.fetch(good, tmp_path / "dl", archive=corrupt)
    # Even an archive with the pinned checksum that dpkg cannot unpack leaves the data alone.
    monkeypatch.setattr(openclipart, "ARCHIVE_SHA256", openclipart.sha256_of(corrupt))
    with pytest.raises(DudchError, match="cannot extract"):
        openclipart.fetch(good, tmp_path / "dl", archive=corrupt)
    assert [p.name for p in good.iterdir()] == ["keep.svg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "openclipart.deb"]


def test_the_checkout_holds_the_pinned_data(openclipart_root):
    assert workspace_matches_pin(ROOT)
    assert ensure_openclipart(ROOT) == openclipart_root


def test_cli_reports_a_corrupt_archive_in_one_line(tmp_path):
    corrupt = tmp_path / "x.deb"
    corrupt.write_bytes(b"garbage")
    done = dudch("data", "openclipart", "--archive", str(corrupt))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "corrupt archive" in done.stderr
    assert workspace_matches_pin(ROOT)


def test_ctrl_c_during_extraction_is_one_line_and_blocks_no_later_run(tmp_path):
    """SIGINT to the command's process group (as a terminal sends it) while dpkg unpacks: one
    line, and whatever an interruption leaves beside data/openclipart (also what older versions
    left: tmp* folders) is removed by the next run, which then matches the pin."""
    deb = ROOT / ".dudch" / "downloads" / openclipart.ARCHIVE_NAME
    assert deb.is_file(), "run `make test`: it downloads the package into .dudch/downloads"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=tmp_path, check=True)
    shutil.copy(ROOT / "data.dvc", tmp_path / "data.dvc")
    command = [str(Path(sys.executable).with_name("dudch")), "data", "openclipart", "--archive", str(deb)]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, preexec_fn=interruptible)
    try:
        for _ in range(3000):  # until dpkg has started unpacking (at most 5 minutes)
            if list((tmp_path / "data").glob(".openclipart-unpack-*/usr")) or run.poll() is not None:
                break
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines() == ["error: data openclipart interrupted (Ctrl-C); nothing was half-written, "
                                           "rerun it to start again"]
    assert not (tmp_path / "data" / "openclipart").exists()
    # What a harder stop (SIGKILL, a power cut) or an older version would have left behind.
    (tmp_path / "data" / "tmpold" / openclipart.SVG_ROOT_IN_ARCHIVE).mkdir(parents=True)
    (tmp_path / "data" / ".openclipart.abc.partial" / "animals").mkdir(parents=True)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["openclipart"]
    assert workspace_matches_pin(tmp_path)


def test_rasters_decode_by_their_bit_depth_palette_and_orientation():
    """Reference pixels: 16-bit grey 32768 is mid-grey (not white); a palette PNG with a
    transparent entry is its colours on white; a JPEG whose EXIF says "rotate 90" is read upright."""
    import io

    from PIL import Image

    def encoded(image, **options):
        out = io.BytesIO()
        image.save(out, **options)
        return out.getvalue()

    grey = Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16))
    assert grey.mode.startswith("I")
    np.testing.assert_array_equal(read_image(encoded(grey, format="PNG"), 8), np.full((8, 8, 3), 128))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.paste(0, (0, 0, 8, 4))  # top half: entry 0, transparent
    decoded = read_image(encoded(palette, format="PNG", transparency=0), 8)
    np.testing.assert_array_equal(decoded[:4], np.full((4, 8, 3), 255))
    np.testing.assert_array_equal(decoded[4:], np.broadcast_to([200, 30, 40], (4, 8, 3)))
    # Left half red, right half blue, stored sideways with "rotate 90 clockwise to show".
    upright = np.zeros((64, 64, 3), dtype=np.uint8)
    upright[:, :32] = (255, 0, 0)
    upright[:, 32:] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = read_image(encoded(stored, format="JPEG", quality=95, exif=exif), 64).astype(int)
    assert photo[:, :28, 0].mean() > 200 and photo[:, :28, 2].mean() < 50  # red on the left
    assert photo[:, 36:, 2].mean() > 200 and photo[:, 36:, 0].mean() < 50  # blue on the right
