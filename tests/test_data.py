"""data.py: reproducible synthetic radiographs, line conditions (drift), folder datasets and manifests."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_impl import data
from reference_impl.data import DatasetError, LineCondition

# Computed once (Nov 2026, numpy 2.4) from data.generate(16, seed=123). If these change, every generated
# dataset, manifest hash and number quoted in the chapter changes with them: that must be a deliberate decision.
GOLDEN_IMAGES_SHA256 = "9af867dc5180a5a1e9859bfc6bec635634950a1a44a1fcce46ff12fe653e4a49"
GOLDEN_LABELS_SHA256 = "1c3eadddcbedb12b8bbb303bac304d3eda806f4ca36e1516de0ba4ca7931e224"
GOLDEN_LABELS = [2, 1, 1, 1, 0, 2, 0, 1, 0, 3, 2, 3, 1, 0, 1, 3]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_images_and_labels():
    a, b = data.generate(24, seed=7), data.generate(24, seed=7)
    assert a.images.dtype == np.uint8 and a.images.shape == (24, 64, 64)
    assert a.images.tobytes() == b.images.tobytes()
    assert np.array_equal(a.labels, b.labels)


def test_different_seed_gives_different_images():
    a, b = data.generate(24, seed=7), data.generate(24, seed=8)
    assert not np.array_equal(a.images, b.images)
    # not just a few pixels: essentially every image differs
    assert sum(not np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True)) == 24


def test_window_of_indices_is_identical_alone_or_in_a_bigger_batch():
    big = data.generate(30, seed=3)
    window = data.generate(10, seed=3, start_index=12)
    assert np.array_equal(window.indices, np.arange(12, 22))
    assert np.array_equal(window.images, big.images[12:22])
    assert np.array_equal(window.labels, big.labels[12:22])


def test_golden_hashes_prove_cross_machine_reproducibility():
    g = data.generate(16, seed=123)
    assert g.images.dtype == np.uint8 and g.images.shape == (16, 64, 64)
    assert g.labels.tolist() == GOLDEN_LABELS
    assert hashlib.sha256(g.labels.astype("<i8").tobytes()).hexdigest() == GOLDEN_LABELS_SHA256
    assert hashlib.sha256(g.images.tobytes()).hexdigest() == GOLDEN_IMAGES_SHA256


def test_conditions_keep_the_same_welds_for_paired_comparison():
    base = data.generate(40, seed=11)
    for name in data.CONDITIONS[1:]:
        shifted = data.generate(40, seed=11, condition=name, severity=0.6)
        assert np.array_equal(shifted.labels, base.labels), name
        assert not np.array_equal(shifted.images, base.images), name
        assert shifted.condition == LineCondition(name, 0.6)


# ---------------------------------------------------------------------------------------------------------------
# Class mix and the novel defect
# ---------------------------------------------------------------------------------------------------------------


def test_all_four_classes_present_in_a_few_hundred_images():
    d = data.generate(300, seed=0)
    counts = d.class_counts()
    assert set(counts) == set(data.CLASSES)
    assert sum(counts.values()) == 300
    # uniform by default: every class well represented, none dominant
    assert all(40 <= c <= 110 for c in counts.values()), counts


def test_class_mix_shifts_the_class_frequencies():
    mix = {"good": 0.7, "porosity": 0.3}
    d = data.generate(400, seed=0, class_mix=mix)
    freq = np.bincount(d.labels, minlength=4) / len(d)
    assert 0.6 < freq[data.CLASSES.index("good")] < 0.8
    assert 0.2 < freq[data.CLASSES.index("porosity")] < 0.4
    assert freq[data.CLASSES.index("crack")] == 0
    assert freq[data.CLASSES.index("lack_of_fusion")] == 0


@pytest.mark.parametrize(
    "mix, match",
    [({"scratch": 1.0}, "scratch"), ({"good": -1.0, "crack": 2.0}, "weights"), ({"good": 0.0}, "positive sum")],
)
def test_bad_class_mix_is_an_error(mix, match):
    with pytest.raises(DatasetError, match=match):
        data.generate(5, class_mix=mix)


def test_novel_class_generates_bright_inclusions():
    classes = data.CLASSES + data.NOVEL_CLASSES
    novel = data.generate(60, seed=4, classes=classes, class_mix={"tungsten_inclusion": 1.0})
    good = data.generate(60, seed=4, class_mix={"good": 1.0})
    assert novel.classes == classes
    assert set(novel.labels.tolist()) == {classes.index("tungsten_inclusion")}
    assert novel.class_counts()["tungsten_inclusion"] == 60
    # tungsten is denser than steel: the inclusions are the brightest thing in the image
    novel_max = novel.images.reshape(60, -1).max(axis=1).mean()
    good_max = good.images.reshape(60, -1).max(axis=1).mean()
    assert novel_max > good_max + 25, (novel_max, good_max)


def test_unknown_class_name_is_an_error():
    with pytest.raises(DatasetError, match="slag"):
        data.generate(3, classes=("good", "slag"), class_mix={"slag": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# Line conditions: validation and the direction of each effect
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, severity, match",
    [
        ("new_camera", 1.5, "severity must be in"),
        ("new_camera", -0.1, "severity must be in"),
        ("fog", 0.5, "unknown line condition 'fog'"),
        ("baseline", 0.3, "baseline condition has severity 0"),
    ],
)
def test_line_condition_validation(name, severity, match):
    with pytest.raises(DatasetError, match=match):
        LineCondition(name, severity)


def test_generate_rejects_bad_arguments():
    with pytest.raises(DatasetError, match="severity"):
        data.generate(4, condition="new_lighting", severity=2.0)
    with pytest.raises(DatasetError, match="bit_depth"):
        data.generate(4, bit_depth=12)
    with pytest.raises(DatasetError, match="size"):
        data.generate(4, size=8)


def _mean_abs_laplacian(images: np.ndarray) -> float:
    x = images.astype(np.float64)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def _centre_contrast(images: np.ndarray, half: int = 12) -> float:
    """Std of 2x2-averaged pixels in the central patch, where a lamp's fall-off barely matters."""
    c = images.shape[-1] // 2
    x = images[:, c - half : c + half, c - half : c + half].astype(np.float64)
    x = x.reshape(len(x), half, 2, half, 2).mean(axis=(2, 4))
    return float(np.mean([im.std() for im in x]))


def _low_frequency_texture(images: np.ndarray, block: int = 8) -> float:
    """Std of 8x8 block means after removing each block-row's mean (the horizontal bead): coarse texture."""
    n, h, w = images.shape
    b = images.astype(np.float64).reshape(n, h // block, block, w // block, block).mean(axis=(2, 4))
    return float((b - b.mean(axis=2, keepdims=True)).std())


@pytest.fixture(scope="module")
def paired():
    """The same 120 welds under the baseline and each condition (severity 0.6, the demo default)."""
    out = {"baseline": data.generate(120, seed=5).images}
    for name in data.CONDITIONS[1:]:
        out[name] = data.generate(120, seed=5, condition=name, severity=0.6).images
    return out


def test_new_camera_adds_high_frequency_noise(paired):
    base, cam = _mean_abs_laplacian(paired["baseline"]), _mean_abs_laplacian(paired["new_camera"])
    assert cam > 1.8 * base, (base, cam)
    diff_std = [np.diff(paired[k].astype(np.float64), axis=-1).std() for k in ("baseline", "new_camera")]
    assert diff_std[1] > 1.8 * diff_std[0]


def test_new_camera_effect_grows_with_severity():
    values = [_mean_abs_laplacian(data.generate(40, seed=9, condition="new_camera", severity=s).images)
              for s in (0.2, 0.5, 1.0)]  # fmt: skip
    assert values[0] < values[1] < values[2], values


def test_new_lighting_is_brighter_and_flatter(paired):
    base, light = paired["baseline"].astype(np.float64), paired["new_lighting"].astype(np.float64)
    assert light.mean() > base.mean() + 8, (base.mean(), light.mean())
    assert _centre_contrast(paired["new_lighting"]) < 0.9 * _centre_contrast(paired["baseline"])

    # vignetting: the new lamp lights the centre more than the corners
    def corner_to_centre(x: np.ndarray) -> float:
        corners = np.mean([x[:, :8, :8].mean(), x[:, :8, -8:].mean(), x[:, -8:, :8].mean(), x[:, -8:, -8:].mean()])
        return float(corners / x[:, 28:36, 28:36].mean())

    assert corner_to_centre(light) < corner_to_centre(base) - 0.1


def test_new_material_changes_texture_not_grain(paired):
    base, mat = paired["baseline"], paired["new_material"]
    assert _low_frequency_texture(mat) > 1.3 * _low_frequency_texture(base)
    # a coarser grain structure, not sensor noise: pixel-level noise stays about the same
    assert _mean_abs_laplacian(mat) == pytest.approx(_mean_abs_laplacian(base), rel=0.1)


def test_global_brightness_is_not_a_good_classifier():
    d = data.generate(600, seed=1)
    brightness = d.images.reshape(len(d), -1).mean(axis=1)
    per_class = [brightness[d.labels == k] for k in range(len(d.classes))]
    class_means = np.array([b.mean() for b in per_class])
    within_std = np.mean([b.std() for b in per_class])
    assert class_means.max() - class_means.min() < 0.5 * within_std, (class_means, within_std)


# ---------------------------------------------------------------------------------------------------------------
# Files: write, manifest, load back
# ---------------------------------------------------------------------------------------------------------------


def _index_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def test_write_dataset_manifest_matches_files(tmp_path):
    d = data.generate(20, seed=2, condition="new_camera", severity=0.4)
    manifest = data.write_dataset(d, tmp_path / "ds")
    assert manifest == tmp_path / "ds" / data.MANIFEST_NAME
    rows = data.read_manifest(manifest)
    assert len(rows) == 20
    assert tuple(rows[0]) == data.MANIFEST_FIELDS
    for row, label, index in zip(rows, d.labels, d.indices, strict=True):
        path = tmp_path / "ds" / row["file"]
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["class"] == d.classes[label] == path.parent.name
        assert (row["condition"], row["severity"], row["seed"]) == ("new_camera", "0.4", "2")
        assert int(row["index"]) == index == _index_of(path)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        data.read_manifest(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,good\n")
    with pytest.raises(DatasetError, match="sha256"):
        data.read_manifest(bad)


def test_load_folder_round_trip_in_the_given_class_order(tmp_path):
    d = data.generate(24, seed=6)
    data.write_dataset(d, tmp_path / "ds")
    order = tuple(reversed(data.CLASSES))
    loaded = data.load_folder(tmp_path / "ds", order)
    assert loaded.classes == order
    assert len(loaded) == 24 and loaded.errors == {}
    for path, img, label in zip(loaded.paths, loaded.images, loaded.labels, strict=True):
        i = _index_of(path)
        assert img.dtype == np.uint8
        assert np.array_equal(img, d.images[i])
        assert order[label] == d.classes[d.labels[i]] == path.parent.name


def test_load_folder_default_class_order_is_sorted_folder_names(tmp_path):
    data.write_dataset(data.generate(12, seed=6), tmp_path / "ds")
    assert data.load_folder(tmp_path / "ds").classes == tuple(sorted(data.CLASSES))


def test_16bit_png_round_trip_preserves_uint16(tmp_path):
    d = data.generate(8, seed=1, bit_depth=16)
    assert d.images.dtype == np.uint16 and d.images.max() > 255
    data.write_dataset(d, tmp_path / "ds")
    loaded = data.load_folder(tmp_path / "ds", data.CLASSES)
    assert len(loaded) == 8
    for path, img in zip(loaded.paths, loaded.images, strict=True):
        assert img.dtype == np.uint16
        assert np.array_equal(img, d.images[_index_of(path)])


def test_16bit_tiff_round_trip_preserves_uint16(tmp_path):
    img = data.generate(1, seed=1, bit_depth=16).images[0]
    (tmp_path / "ds" / "good").mkdir(parents=True)
    path = tmp_path / "ds" / "good" / "scan.tif"
    Image.frombytes("I;16", img.shape[::-1], img.astype("<u2").tobytes()).save(path)
    decoded = data.decode_image(path)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, img)
    loaded = data.load_folder(tmp_path / "ds", ["good"])
    assert loaded.images[0].dtype == np.uint16 and np.array_equal(loaded.images[0], img)


def test_jpeg_and_rgb_png_load_as_2d_uint8(tmp_path):
    gray = data.generate(1, seed=3).images[0]
    rgb = np.stack([gray, gray, gray], axis=-1)
    folder = tmp_path / "ds" / "good"
    folder.mkdir(parents=True)
    Image.fromarray(rgb).save(folder / "colour.png")
    Image.fromarray(rgb).save(folder / "photo.JPG", quality=95)
    Image.fromarray(rgb).save(folder / "photo2.jpeg", quality=95)
    loaded = data.load_folder(tmp_path / "ds", ["good"])
    assert sorted(p.name for p in loaded.paths) == ["colour.png", "photo.JPG", "photo2.jpeg"]
    for path, img in zip(loaded.paths, loaded.images, strict=True):
        assert img.dtype == np.uint8 and img.shape == gray.shape, path.name
    by_name = {p.name: img for p, img in zip(loaded.paths, loaded.images, strict=True)}
    assert np.array_equal(by_name["colour.png"], gray)  # a gray image exported as RGB is the same image
    assert np.abs(by_name["photo.JPG"].astype(int) - gray).mean() < 3  # lossy, but the same picture


@pytest.fixture
def folder_with_bad_files(tmp_path) -> Path:
    d = data.generate(8, seed=0, class_mix={"good": 1, "crack": 1})
    root = tmp_path / "ds"
    data.write_dataset(d, root)
    (root / data.MANIFEST_NAME).unlink()
    (root / "good" / "x.png").write_bytes(np.random.default_rng(0).bytes(700))
    payload = data.encode_png(d.images[0])
    (root / "crack" / "cut.png").write_bytes(payload[: len(payload) // 2])
    return root


def test_bad_files_are_named_when_loading_fails(folder_with_bad_files):
    with pytest.raises(DatasetError) as info:
        data.load_folder(folder_with_bad_files, ["good", "crack"])
    message = str(info.value)
    assert "2 unreadable image(s)" in message
    assert "x.png" in message and "cut.png" in message


def test_report_mode_loads_good_files_and_names_bad_ones(folder_with_bad_files):
    loaded = data.load_folder(folder_with_bad_files, ["good", "crack"], on_error="report")
    assert len(loaded) == 8
    assert sorted(Path(p).name for p in loaded.errors) == ["cut.png", "x.png"]
    assert all(p.name not in ("cut.png", "x.png") for p in loaded.paths)
    assert all("not a readable" in msg for msg in loaded.errors.values())


def test_invalid_on_error_value(folder_with_bad_files):
    with pytest.raises(DatasetError, match="on_error"):
        data.load_folder(folder_with_bad_files, on_error="ignore")


def test_unknown_subfolder_is_an_error(tmp_path):
    data.write_dataset(data.generate(8, seed=0), tmp_path / "ds")
    with pytest.raises(DatasetError, match="crack"):
        data.load_folder(tmp_path / "ds", ["good", "porosity", "lack_of_fusion"])


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no class subfolders"):
        data.load_folder(tmp_path)
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "readme.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="no readable images"):
        data.load_folder(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        data.load_folder(tmp_path / "missing")


def test_decode_image_on_bytes():
    img = data.generate(1, seed=8).images[0]
    assert np.array_equal(data.decode_image(data.encode_png(img)), img)
    img16 = data.generate(1, seed=8, bit_depth=16).images[0]
    out16 = data.decode_image(data.encode_png(img16))
    assert out16.dtype == np.uint16 and np.array_equal(out16, img16)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="TIFF")
    assert np.array_equal(data.decode_image(buf.getvalue()), img)


def test_decode_image_errors_name_the_source():
    with pytest.raises(DatasetError, match=r"upload\.png: not a readable"):
        data.decode_image(b"definitely not an image", name="upload.png")
    with pytest.raises(DatasetError, match="<bytes>"):
        data.decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    float_tiff = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.float32)).save(float_tiff, format="TIFF")
    with pytest.raises(DatasetError, match=r"^f\.tif: "):  # float images are refused, naming the file
        data.decode_image(float_tiff.getvalue(), name="f.tif")
    img = data.generate(1, seed=8).images[0]
    for fmt in ("BMP", "GIF"):  # readable by Pillow, but not a format the course accepts
        other = io.BytesIO()
        Image.fromarray(img).save(other, format=fmt)
        with pytest.raises(DatasetError, match="expected PNG, JPEG or TIFF"):
            data.decode_image(other.getvalue(), name=f"x.{fmt.lower()}")
    jpeg = io.BytesIO()
    Image.fromarray(img).save(jpeg, format="JPEG", quality=95)
    assert data.decode_image(jpeg.getvalue()).shape == img.shape


def test_save_grid_writes_a_png(tmp_path):
    d = data.generate(16, seed=0, bit_depth=16)
    path = data.save_grid(d, tmp_path / "sub" / "grid.png", per_class=3)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        assert im.height == len(d.classes) * (64 * 2 + 2)


def test_subset_keeps_indices_and_metadata():
    d = data.generate(10, seed=2, condition="new_material", severity=0.5)
    s = d.subset([7, 2])
    assert s.indices.tolist() == [7, 2]
    assert np.array_equal(s.images[0], d.images[7])
    assert s.condition == d.condition and s.seed == 2 and len(s) == 2
