"""Synthetic weld radiographs, line conditions (drift), and folder datasets.

Chapter: "Why it matters" and "Monitoring in production". A model trained on last year's images degrades when
the line changes: a new camera, a new lighting rig, a new material, a different defect mix, or a defect type
nobody labelled before. This module makes all of those reproducible so the labs can show them on purpose.

Images look like a radiograph of a butt weld: a plate with low-frequency texture, a brighter horizontal weld
bead (more metal absorbs more radiation), film grain, and one of these defects:

- ``porosity``: gas pores, small round *dark* spots inside the bead (a void means less metal);
- ``crack``: a thin, jagged dark line;
- ``lack_of_fusion``: a straight dark line along the edge of the bead, where metal did not fuse to the plate;
- ``tungsten_inclusion`` (novel, never in training): small *bright* spots from electrode fragments.

Every image is generated from its own random stream keyed by ``(seed, index)``, so the same seed gives
byte-identical images on any machine, a subset can be regenerated alone, and the same weld can be re-rendered
under a different line condition for a paired comparison.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("good", "porosity", "crack", "lack_of_fusion")
NOVEL_CLASSES: tuple[str, ...] = ("tungsten_inclusion",)
CONDITIONS: tuple[str, ...] = ("baseline", "new_camera", "new_lighting", "new_material")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DECODE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF")  # Pillow's names for the same three formats
MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("file", "class", "condition", "severity", "seed", "index", "sha256")


class DatasetError(ValueError):
    """A dataset could not be generated or loaded; the message names the file or argument at fault."""


@dataclass(frozen=True)
class LineCondition:
    """A named state of the inspection line. ``severity`` 0 is the baseline the model was trained on."""

    name: str = "baseline"
    severity: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in CONDITIONS:
            raise DatasetError(f"unknown line condition {self.name!r}; choose one of {', '.join(CONDITIONS)}")
        if not 0.0 <= float(self.severity) <= 1.0:
            raise DatasetError(f"severity must be in [0, 1], got {self.severity!r}")
        if self.name == "baseline" and self.severity != 0:
            raise DatasetError("the baseline condition has severity 0; pick a named condition to add drift")


@dataclass
class WeldImages:
    """A batch of images with labels: what the generator returns and what training consumes.

    ``images`` is ``(N, H, W)`` uint8 (or uint16 for 16-bit data); ``labels`` index into ``classes``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    condition: LineCondition = field(default_factory=LineCondition)
    seed: int = 0
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray) -> WeldImages:
        idx = np.asarray(idx)
        indices = None if self.indices is None else self.indices[idx]
        return WeldImages(self.images[idx], self.labels[idx], self.classes, self.condition, self.seed, indices)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts, strict=True)}


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
    """Linear-interpolation matrix from ``coarse`` control points to ``size`` pixels (for smooth textures)."""
    pos = np.linspace(0, coarse - 1, size)
    lo = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    frac = pos - lo
    mat = np.zeros((size, coarse))
    mat[np.arange(size), lo] = 1 - frac
    mat[np.arange(size), lo + 1] = frac
    return mat


def _smooth_field(rng: np.random.Generator, size: int, coarse: int) -> np.ndarray:
    up = _upsample_matrix(coarse, size)
    return up @ rng.normal(size=(coarse, coarse)) @ up.T


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected edges (a defocused or lower-resolution sensor)."""
    if sigma < 0.05:
        return img
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(img, radius, mode="reflect")
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="valid")


def _splat_path(size: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Deposit points along a path with bilinear weights: an anti-aliased line one pixel wide."""
    acc = np.zeros((size, size))
    x0 = np.floor(xs).astype(int)
    y0 = np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        np.add.at(acc, (yi[ok], xi[ok]), w[ok])
    return np.minimum(acc, 1.0)


def _spots(size: int, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Thickness profile of spherical voids/inclusions: sqrt(1 - r^2/R^2) inside each radius."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((size, size))
    for (cx, cy), r in zip(centres, radii, strict=True):
        d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)
        out = np.maximum(out, np.sqrt(np.clip(1 - d2, 0, None)))
    return out


def render_weld(
    rng: np.random.Generator,
    label: str,
    size: int = 64,
    condition: LineCondition | None = None,
    condition_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render one radiograph as float64 in [0, 1]. Draw order is fixed so images are reproducible."""
    condition = condition or LineCondition()
    s = float(condition.severity)
    material = s if condition.name == "new_material" else 0.0
    crng = condition_rng if condition_rng is not None else rng

    # The plate: base exposure, slow thickness variation (texture), weld bead across the middle.
    background = rng.uniform(0.28, 0.42)
    texture = _smooth_field(rng, size, 6) * rng.uniform(0.015, 0.03)
    bead_height = rng.uniform(0.14, 0.22)
    centre_y = size / 2 + rng.normal(0, size / 40)
    half_width = size * rng.uniform(0.16, 0.21) * (1 + 0.6 * material)
    wobble = _upsample_matrix(5, size) @ rng.normal(0, size / 60, 5)  # bead edges are not ruler-straight
    yy = np.arange(size)[:, None]
    xx = np.arange(size)[None, :]
    rel = (yy - centre_y - wobble[None, :]) / half_width
    bead = np.sqrt(np.clip(1 - rel**2, 0, None))  # a rounded bead cross-section
    ripple = 1 + 0.04 * np.sin(2 * np.pi * xx / rng.uniform(5, 9) + rng.uniform(0, 2 * np.pi))
    img = background + texture + bead_height * bead * ripple

    # The defect, placed inside the bead where welders and inspectors expect it.
    if label == "porosity":
        n = int(rng.integers(1, 7))
        cx = rng.uniform(0.1 * size, 0.9 * size, n)
        cy = centre_y + rng.uniform(-0.6, 0.6, n) * half_width
        img -= rng.uniform(0.10, 0.22) * _spots(size, np.stack([cx, cy], 1), rng.uniform(1.0, 2.8, n))
    elif label == "crack":
        steps = 80
        angle = rng.uniform(-0.5, 0.5) + (np.pi / 2 if rng.random() < 0.3 else 0.0)  # mostly longitudinal
        heading = angle + np.cumsum(rng.normal(0, 0.25, steps))
        step = rng.uniform(0.25, 0.45)
        x = rng.uniform(0.25 * size, 0.75 * size) + np.cumsum(step * np.cos(heading))
        y = centre_y + rng.uniform(-0.3, 0.3) * half_width + np.cumsum(step * np.sin(heading))
        img -= rng.uniform(0.12, 0.22) * _splat_path(size, x, y)
    elif label == "lack_of_fusion":
        length = rng.uniform(0.4, 0.85) * size
        x = np.linspace(0, length, int(length * 3)) + rng.uniform(0, size - length)
        side = 1 if rng.random() < 0.5 else -1
        y = centre_y + side * 0.85 * half_width + np.interp(x, np.arange(size), wobble) + rng.normal(0, 0.15, x.size)
        line = _splat_path(size, x, y)
        if rng.random() < 0.5:  # a wider, doubled line: incomplete fusion on both sides of the root
            line = np.maximum(line, _splat_path(size, x, y + side))
        img -= rng.uniform(0.10, 0.18) * line
    elif label == "tungsten_inclusion":
        n = int(rng.integers(1, 4))
        cx = rng.uniform(0.1 * size, 0.9 * size, n)
        cy = centre_y + rng.uniform(-0.5, 0.5, n) * half_width
        img += rng.uniform(0.22, 0.35) * _spots(size, np.stack([cx, cy], 1), rng.uniform(0.8, 2.0, n))
    elif label != "good":
        raise DatasetError(f"unknown class {label!r}; known: {', '.join(CLASSES + NOVEL_CLASSES)}")

    # Exposure varies from shot to shot; this is why global brightness alone cannot tell the classes apart.
    img = rng.uniform(0.85, 1.15) * img + rng.uniform(-0.06, 0.06)
    film_grain = rng.uniform(0.010, 0.03)  # grain differs between films, so the model must tolerate some noise

    # The line condition, drawn from its own stream so the weld itself is unchanged (paired comparisons).
    if condition.name == "new_material":
        img += _smooth_field(crng, size, 12) * 0.07 * s  # coarser grain structure of the new alloy
    elif condition.name == "new_lighting":
        r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size / 2) ** 2
        img = (img - 0.5) * (1 - 0.5 * s) + 0.5 + 0.22 * s  # flatter contrast, brighter source
        img *= 1 - 0.45 * s * r2  # vignetting: the new lamp lights the centre more
    elif condition.name == "new_camera":
        img = _gaussian_blur(img, 1.2 * s) * (1 + 0.3 * s)  # softer optics, higher gain
    grain = film_grain + (0.06 * s if condition.name == "new_camera" else 0.0)
    img += crng.normal(0, grain, img.shape)
    return np.clip(img, 0.0, 1.0)


def _class_probabilities(classes: Sequence[str], class_mix: Mapping[str, float] | None) -> np.ndarray:
    if class_mix is None:
        return np.full(len(classes), 1 / len(classes))
    unknown = set(class_mix) - set(classes)
    if unknown:
        raise DatasetError(f"class_mix names classes not in {list(classes)}: {sorted(unknown)}")
    weights = np.array([float(class_mix.get(c, 0.0)) for c in classes])
    if (weights < 0).any() or weights.sum() <= 0:
        raise DatasetError(f"class_mix weights must be >= 0 with a positive sum, got {dict(class_mix)}")
    return weights / weights.sum()


def generate(
    n: int,
    *,
    seed: int = 0,
    condition: str | LineCondition = "baseline",
    severity: float = 0.0,
    size: int = 64,
    class_mix: Mapping[str, float] | None = None,
    classes: Sequence[str] = CLASSES,
    start_index: int = 0,
    bit_depth: int = 8,
) -> WeldImages:
    """Generate ``n`` labelled radiographs.

    ``condition``/``severity`` choose the line condition (data drift); ``class_mix`` changes the defect mix
    (prior shift), e.g. ``{"good": 0.5, "porosity": 0.5}``; adding ``"tungsten_inclusion"`` to ``classes``
    creates the novel defect (concept drift). Images ``start_index .. start_index+n-1`` of a seed are the same
    whatever ``n`` is, so a stream of windows is just consecutive index ranges.
    """
    if isinstance(condition, str):
        condition = LineCondition(condition, severity if condition != "baseline" else 0.0)
    if n < 0 or size < 16 or bit_depth not in (8, 16):
        raise DatasetError(f"need n >= 0, size >= 16, bit_depth 8 or 16; got n={n}, size={size}, {bit_depth=}")
    classes = tuple(classes)
    probs = _class_probabilities(classes, class_mix)
    dtype, scale = (np.uint8, 255) if bit_depth == 8 else (np.uint16, 65535)
    images = np.empty((n, size, size), dtype=dtype)
    labels = np.empty(n, dtype=np.int64)
    indices = np.arange(start_index, start_index + n)
    for row, index in enumerate(indices):
        weld_rng = np.random.default_rng([seed, int(index), 0])
        label = int(weld_rng.choice(len(classes), p=probs))
        condition_rng = np.random.default_rng([seed, int(index), 1])
        img = render_weld(weld_rng, classes[label], size, condition, condition_rng)
        images[row] = np.round(img * scale).astype(dtype)
        labels[row] = label
    return WeldImages(images, labels, classes, condition, seed, indices)


# --------------------------------------------------------------------------------------------------------------
# Files: write a class-per-folder dataset with a manifest, read any such folder back
# --------------------------------------------------------------------------------------------------------------


def sample_photographs() -> list[Path]:
    """Real photographs that ship inside installed packages (matplotlib's sample data; scikit-learn's sample images
    when it is installed): a local source of images that are certainly not weld radiographs. Nothing is downloaded."""
    import importlib.util

    import matplotlib

    found = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        images = Path(spec.origin).parent / "datasets" / "images"
        found += [images / "china.jpg", images / "flower.jpg"]
    return [p for p in found if p.is_file()]


def not_welds(n: int, *, seed: int = 0, size: int = 64) -> np.ndarray:
    """``n`` grayscale images that are not weld radiographs, ``(n, size, size)`` uint8: half random crops of the
    :func:`sample_photographs` at random scales, half synthetic textures (noise, flat fields, gradients, checkers,
    stripes). What the out-of-distribution flag must catch (chapter: "Monitoring in production")."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("L")) for p in sample_photographs()]
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if photos and i % 2 == 0:
            photo = photos[int(rng.integers(len(photos)))]
            h, w = photo.shape
            side = int(rng.integers(min(48, h, w), min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(crop)
            continue
        kind = int(rng.integers(5))
        yy, xx = np.indices((size, size))
        if kind == 0:
            tex = rng.integers(0, 256, (size, size))
        elif kind == 1:
            tex = np.full((size, size), rng.integers(0, 256))
        elif kind == 2:
            tex = (xx if rng.random() < 0.5 else yy) * 255 / (size - 1)
        elif kind == 3:
            cell = int(rng.integers(2, 17))
            tex = ((yy // cell + xx // cell) % 2) * 255
        else:
            tex = 127.5 + 127.5 * np.sin(xx / rng.uniform(1.0, 6.0))
        out[i] = np.clip(tex, 0, 255).astype(np.uint8)
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks so a large weights file never has to fit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes for a uint8 (mode L) or uint16 (mode I;16) grayscale array."""
    from PIL import Image

    buf = io.BytesIO()
    if image.dtype == np.uint16:
        # frombytes with an explicit raw mode: Pillow >= 12 rejects fromarray(..., mode="I;16") for uint16 arrays
        height, width = image.shape
        Image.frombytes("I;16", (width, height), image.astype("<u2").tobytes()).save(buf, format="PNG")
    else:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(data: WeldImages, out_dir: str | Path) -> Path:
    """Write ``out_dir/<class>/<condition>_<seed>_<index>.png`` plus ``manifest.csv``; returns the manifest path.

    The manifest records, per file: class, condition, severity, seed, index and sha256, so a bundle can say
    exactly which data trained it (its hash goes into the bundle metadata).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    indices = data.indices if data.indices is not None else np.arange(len(data))
    rows = []
    for img, label, index in zip(data.images, data.labels, indices, strict=True):
        cls = data.classes[int(label)]
        rel = Path(cls) / f"{data.condition.name}_{data.seed}_{int(index):06d}.png"
        payload = encode_png(img)
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_bytes(payload)
        rows.append(
            {
                "file": rel.as_posix(),
                "class": cls,
                "condition": data.condition.name,
                "severity": f"{data.condition.severity:g}",
                "seed": data.seed,
                "index": int(index),
                "sha256": sha256_bytes(payload),
            }
        )
    manifest = out / MANIFEST_NAME
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# Modes we accept: grayscale (1, L, P, LA), 16-bit grayscale (I;16*, I) and colour (RGB, RGBA, converted to
# luminance). Print-oriented or float modes (CMYK, YCbCr, LAB, HSV, F) are rejected: they are not what an X-ray
# detector or its viewer exports, so receiving one almost always means the wrong file was sent.
SUPPORTED_MODES = ("1", "L", "P", "LA", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageTooLargeError(DatasetError):
    """The image has more pixels than allowed (a decompression bomb, or simply the wrong file)."""


def decode_image(data: bytes | str | Path, *, name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG/TIFF (8- or 16-bit, gray, RGB or RGBA) to a 2-D uint8 or uint16 array.

    Colour images are converted to luminance: radiographs are grayscale, and a colour export from a viewer
    should not become a different input to the model. Raises ``DatasetError`` naming the file when the bytes
    are not a readable image, and ``ImageTooLargeError`` when ``max_pixels`` is given and exceeded; the size is
    checked from the header *before* decoding, so a tiny compressed file cannot expand into gigabytes.
    """
    from PIL import Image, UnidentifiedImageError

    label = name or (str(data) if isinstance(data, str | Path) else "<bytes>")
    if isinstance(data, bytes) and not data:
        raise DatasetError(f"{label}: empty input; send the bytes of a PNG, JPEG or TIFF file")
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")  # noqa: SIM115
        # Only the formats the course documents: Pillow would otherwise try every format it knows (dozens of
        # parsers exposed to untrusted uploads), which is both a larger attack surface and slower.
        with source, Image.open(source, formats=DECODE_FORMATS) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{label}: image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
                )
            if im.mode not in SUPPORTED_MODES:
                raise DatasetError(f"{label}: unsupported image mode {im.mode!r}; send grayscale (8- or 16-bit), "
                                   "RGB or RGBA")  # fmt: skip
            im.load()  # force full decode now so a truncated file fails here, not later in training
            if im.mode.startswith("I;16"):
                arr = np.asarray(im, dtype=np.uint16)
            elif im.mode == "I":  # 32-bit container, typically holding 16-bit TIFF data
                arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
            else:
                arr = np.asarray(im if im.mode == "L" else im.convert("L"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, for images far beyond any sane limit
        raise ImageTooLargeError(f"{label}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DatasetError(f"{label}: not a readable image (unrecognised format; expected PNG, JPEG or TIFF)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{label}: not a readable PNG/JPEG/TIFF image ({exc})") from exc
    return arr


@dataclass
class FolderDataset:
    """Images loaded from a class-per-folder tree, with the files that could not be read listed by name."""

    paths: list[Path]
    images: list[np.ndarray]
    labels: np.ndarray
    classes: tuple[str, ...]
    errors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def iter_image_files(root: Path) -> Iterable[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(root: str | Path, classes: Sequence[str] | None = None, *, on_error: str = "raise") -> FolderDataset:
    """Load ``root/<class>/*.png|jpg|tif`` (8- or 16-bit). Works for generated data and real radiographs.

    ``classes`` fixes the label order (use the model's label map); by default it is the sorted subfolder names.
    An unreadable file is never silently skipped: with ``on_error="raise"`` (default) loading fails with every
    bad file named; with ``on_error="report"`` the good images load and the bad ones are listed in ``errors``.
    """
    root = Path(root)
    if on_error not in ("raise", "report"):
        raise DatasetError(f"on_error must be 'raise' or 'report', got {on_error!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; expected a folder with one subfolder per class")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = tuple(classes) if classes is not None else tuple(found)
    if not classes:
        raise DatasetError(f"{root}: no class subfolders found (expected e.g. {root}/good/, {root}/crack/)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{root}: subfolders {unknown} are not among the model's classes {list(classes)}")
    paths, images, labels, errors = [], [], [], {}
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue
        for path in iter_image_files(folder):
            try:
                images.append(decode_image(path))
            except DatasetError as exc:
                errors[str(path)] = str(exc)
                continue
            paths.append(path)
            labels.append(label)
    if errors and on_error == "raise":
        listing = "\n  ".join(f"{p}: {msg}" for p, msg in errors.items())
        raise DatasetError(f"{len(errors)} unreadable image(s) under {root}:\n  {listing}")
    for path, msg in errors.items():
        log.warning("skipped unreadable image %s: %s", path, msg)
    if not paths:
        raise DatasetError(f"{root}: no readable images with suffixes {IMAGE_SUFFIXES} in the class subfolders")
    return FolderDataset(paths, images, np.asarray(labels, dtype=np.int64), classes, errors)


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = set(MANIFEST_FIELDS) - set(rows[0] if rows else MANIFEST_FIELDS)
    if missing:
        raise DatasetError(f"{path}: manifest lacks columns {sorted(missing)}")
    return rows


def save_grid(data: WeldImages, path: str | Path, per_class: int = 8) -> Path:
    """Save a PNG grid, one row per class: the quickest way to *look* at what a condition does."""
    from PIL import Image, ImageDraw

    size = data.images.shape[-1]
    scale = 2
    label_w = 120
    rows = [np.flatnonzero(data.labels == k)[:per_class] for k in range(len(data.classes))]
    canvas = Image.new("L", (label_w + per_class * (size * scale + 2), len(rows) * (size * scale + 2)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, idx in enumerate(rows):
        y = r * (size * scale + 2)
        draw.text((4, y + size * scale // 2 - 6), data.classes[r], fill=0)
        for c, i in enumerate(idx):
            img = data.images[i]
            img8 = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else img
            tile = Image.fromarray(img8, mode="L").resize((size * scale, size * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (size * scale + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
