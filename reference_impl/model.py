"""The network and its preprocessing: one spec, one function that turns it into a transform.

Chapter: "Packaging a model". Training-serving skew happens when serving prepares images differently from
training (another resize, forgotten normalisation, RGB instead of grayscale). The cure is structural: the
preprocessing is *data* (``PreprocessSpec``), saved in the bundle next to the weights, and ``build_transform``
is the only code that turns it into a pipeline. Training, batch scoring and the server all call it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily (it costs seconds); type checkers still see the names
    import torch
    from torch import nn

SPEC_VERSION = 1


class SpecError(ValueError):
    """A preprocessing or model spec is malformed; the message names the field."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a decoded image into the model's input tensor. Serialisable to JSON.

    - ``size``: (height, width) the image is resized to (antialiased bilinear);
    - ``channels``: 1 for grayscale radiographs (colour inputs are converted);
    - ``mean``/``std``: per-channel normalisation applied after scaling pixels to [0, 1];
    - ``dtype``: the tensor dtype the network expects.
    """

    size: tuple[int, int] = (64, 64)
    channels: int = 1
    mean: tuple[float, ...] = (0.45,)
    std: tuple[float, ...] = (0.15,)
    dtype: str = "float32"
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.size) != 2 or min(self.size) < 8:
            raise SpecError(f"size must be (height, width) with both >= 8, got {self.size}")
        if self.channels not in (1, 3):
            raise SpecError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise SpecError(f"mean and std need one value per channel ({self.channels}), got {self.mean}, {self.std}")
        if any(s <= 0 for s in self.std):
            raise SpecError(f"std values must be > 0, got {self.std}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise SpecError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.version != SPEC_VERSION:
            raise SpecError(
                f"preprocessing spec version {self.version} is not supported (this code reads {SPEC_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise SpecError(f"unknown preprocessing fields {sorted(unknown)}")
        return cls(**data)


@lru_cache(maxsize=32)
def build_transform(spec: PreprocessSpec) -> Any:
    """THE preprocessing: a torchvision ``transforms.v2`` pipeline built from the spec.

    Accepts a decoded image as a 2-D numpy array (uint8 or uint16), an ``(H, W, C)`` array, a PIL image, or a
    uint8/uint16/float tensor shaped ``(C, H, W)`` or a batch ``(N, C, H, W)``. Integer pixels are scaled by
    their type's maximum (255 or 65535), so 8- and 16-bit radiographs reach the network on the same scale.
    Cached per spec (specs are frozen, hence hashable): a server builds it once, not once per request.
    """
    import torch
    from torchvision.transforms import v2

    target = getattr(torch, spec.dtype)
    return v2.Compose(
        [
            v2.Lambda(_as_image_tensor),
            # scale to float *before* colour conversion: grayscale of uint8 truncates (a gray RGB export would
            # reach the network one level darker than the same image saved as grayscale)
            v2.ToDtype(torch.float32, scale=True),
            v2.Lambda(lambda t: _match_channels(t, spec.channels)),
            v2.Resize(spec.size, antialias=True),
            v2.Normalize(spec.mean, spec.std),
            v2.ToDtype(target),
            v2.ToPureTensor(),  # a plain tensor: safe to torch.save / load with weights_only, and to send anywhere
        ]
    )


def _as_image_tensor(img: Any) -> torch.Tensor:
    """Decoded image -> ``(C, H, W)`` (or ``(N, C, H, W)``) tensor. uint8 stays uint8 (scaled later by ToDtype);
    uint16 becomes float in [0, 1] here because few torch kernels accept uint16 tensors."""
    import torch
    from torchvision import tv_tensors

    if isinstance(img, torch.Tensor):
        tensor = img[None] if img.ndim == 2 else img
    else:
        arr = np.asarray(img)  # PIL images convert here too
        if arr.dtype == np.uint16:
            arr = arr.astype(np.float32) / 65535.0
        elif not arr.flags.writeable:  # PIL images and decoded uploads are read-only; torch warns on those
            arr = arr.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # HWC -> CHW
    if tensor.dtype == torch.uint16:
        tensor = tensor.to(torch.float32) / 65535.0
    return tv_tensors.Image(tensor)


def _match_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    have = t.shape[-3]
    if have == channels:
        return t
    if have == 4:  # RGBA: drop alpha
        t, have = t[..., :3, :, :], 3
    if have == 3 and channels == 1:
        return F.rgb_to_grayscale(t, num_output_channels=1)
    if have == 1 and channels == 3:
        return t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    raise SpecError(f"cannot convert an image with {have} channels to {channels}")


def preprocess_batch(images: np.ndarray | Sequence[np.ndarray], spec: PreprocessSpec) -> torch.Tensor:
    """Apply ``build_transform(spec)`` to many images at once -> ``(N, C, H, W)`` tensor.

    A stack of same-sized images goes through the pipeline as one batch (fast); a list of differently sized
    images (a folder of real radiographs) goes through it one by one. Either way it is the same transform.
    """
    import torch

    transform = build_transform(spec)
    if len(images) == 0:
        return torch.empty((0, spec.channels, *spec.size), dtype=getattr(torch, spec.dtype))
    if (
        not isinstance(images, np.ndarray)
        and _same_shape_2d(images)
        and len(images) * images[0].size <= STACK_MAX_PIXELS
    ):
        # A list of same-sized grayscale arrays (what a server's batch is): stack it and take the batch path.
        # The pipeline's fixed cost per call is ~0.13 ms, so 16 images cost 0.2 ms instead of 2 ms. Only while the
        # stack is small: 16 full-size radiographs would become gigabytes of float32 before the resize.
        images = np.stack(images)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        batch = torch.from_numpy(images.astype(np.float32) / 65535.0 if images.dtype == np.uint16 else images)
        return transform(batch[:, None])
    return torch.stack([transform(img) for img in images])


STACK_MAX_PIXELS = 64 * 256 * 256  # 4.2 M pixels: 16 MB as float32


def _same_shape_2d(images: Sequence[Any]) -> bool:
    first = images[0]
    return (
        isinstance(first, np.ndarray)
        and first.ndim == 2
        and all(isinstance(im, np.ndarray) and im.shape == first.shape and im.dtype == first.dtype for im in images)
    )


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters: saved in the bundle so loading rebuilds exactly this network."""

    arch: str = "weldnet"
    num_classes: int = 4
    in_channels: int = 1
    width: int = 16
    embedding_dim: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise SpecError(f"unknown model fields {sorted(unknown)}")
        return cls(**data)


def build_model(spec: ModelSpec) -> nn.Module:
    """A small CNN for 64x64 grayscale radiographs: ~40k parameters, a few ms per image on one CPU core.

    Four conv-BN-ReLU layers with max-pooling, then global average pooling to an embedding; the
    embedding is what drift monitoring compares, the linear head gives the class logits.
    """
    import torch
    from torch import nn

    if spec.arch != "weldnet":
        raise SpecError(f"unknown architecture {spec.arch!r}; this package provides 'weldnet'")

    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = spec.width
    # Full resolution only for the first, cheap layer: cracks are one pixel wide, so we must not pool before
    # looking; deeper layers work on 32x32 and 16x16 maps, which keeps training within a minute on 2 cores.
    layers = [
        *conv(spec.in_channels, w), nn.MaxPool2d(2),
        *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
        *conv(2 * w, 4 * w), nn.MaxPool2d(2),
    ]  # fmt: skip

    class WeldNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.project = nn.Linear(4 * w, spec.embedding_dim)
            self.head = nn.Linear(spec.embedding_dim, spec.num_classes)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            """Penultimate-layer embedding (used by drift monitoring)."""
            return torch.relu(self.project(self.features(x).mean(dim=(-2, -1))))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    return WeldNet()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is present, else CPU. Asking for ``cuda`` without one is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA GPU is available; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Fix every random source training touches, so a run can be repeated."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
