"""Image decoding and augmentation on uint8 tensors.

The training pipeline follows IRRA's setup: resize (bicubic, antialiased) to
``model.image_size``; with ``data.augment``: horizontal flip (p = 0.5), zero-pad by
10 px and crop back at a random offset, normalise with the CLIP mean/std, random
erasing (p = 0.5, area 2-40 %, aspect 0.3-3.3) filled with 0, i.e. the mean colour.
Evaluation is resize + normalise.

:class:`ImageTransform` works on tensors from ``torchvision.io.decode_image`` (libjpeg-
turbo / libpng, straight from the bytes in the Parquet column) and keeps every geometric
step in uint8, converting to float once at the end. :class:`PILTransform` is the same
pipeline the way the reference implementations write it (PIL + ``torchvision.transforms``),
kept as the benchmark baseline. The datasets stop at uint8 (:meth:`ImageTransform.geometric`) and
:func:`normalize_batch` converts a whole batch at once into the batch buffer: a float image
is 4x the bytes of a uint8 one, and allocating one per sample costs more than the arithmetic.

Randomness: :class:`ImageTransform` draws from the ``torch.Generator`` passed to the call,
or from the global torch RNG when none is given; the datasets pass a generator seeded from
(seed, epoch, row) so an augmented sample does not depend on the worker that made it.
:class:`PILTransform` uses the global torch RNG (as ``torchvision.transforms`` does).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PAD_PIXELS = 10
FLIP_P = 0.5
ERASE_P = 0.5
ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.3)


def decode_image_bytes(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode encoded JPEG/PNG bytes to a contiguous RGB uint8 tensor (3, H, W)."""
    # bytearray: decode_image wants a writable uint8 tensor; the copy is tiny next to decoding.
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = decode_image(buf, mode=ImageReadMode.RGB)  # (3, H, W) view of (H, W, 3) memory
    if img.is_contiguous():
        return img
    hwc = img.permute(1, 2, 0)
    if not hwc.is_contiguous():
        return img.contiguous()
    # Channel-first copy: numpy's transposing copy is several times faster than torch's
    # for a 3-wide inner dimension, and every later op wants contiguous (3, H, W).
    return torch.from_numpy(np.ascontiguousarray(hwc.numpy().transpose(2, 0, 1)))


class _Uniforms:
    """Uniform draws in [0, 1) fetched from torch a few at a time (one call per sample, not per draw)."""

    def __init__(self, generator: torch.Generator | None, chunk: int = 8) -> None:
        self.generator, self.chunk = generator, chunk
        self.buf: list[float] = []

    def __call__(self) -> float:
        if not self.buf:
            self.buf = torch.rand(self.chunk, generator=self.generator).tolist()[::-1]
        return self.buf.pop()

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (inclusive)."""
        return low + min(int(self() * (high - low + 1)), high - low)


def _erase_box(h: int, w: int, u: _Uniforms) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of a random-erasing box, or None after 10 misses (as torchvision)."""
    area = h * w
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for _ in range(10):
        target = area * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u())
        aspect = math.exp(log_lo + (log_hi - log_lo) * u())
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            return u.randint(0, h - eh), u.randint(0, w - ew), eh, ew
    return None


Box = tuple[int, int, int, int]  # (top, left, height, width) of a random-erasing box


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP mean and std in 0-255 pixel units, (3, 1, 1)."""
    return torch.tensor(CLIP_MEAN).mul(255.0).view(3, 1, 1), torch.tensor(CLIP_STD).mul(255.0).view(3, 1, 1)


def normalize_batch(
    images: list[torch.Tensor], erase: list[Box | None] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stack uint8 images (3, H, W) into a normalised float batch (B, 3, H, W), then erase boxes.

    The conversion writes straight into ``out`` (e.g. a shared-memory buffer in a DataLoader
    worker), so no per-sample float tensor is ever allocated. Same values, bit for bit, as
    :meth:`ImageTransform.__call__` on each sample.
    """
    if not images:
        raise ValueError("cannot normalise an empty list of images")
    shape = (len(images), *images[0].shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    for b, img in enumerate(images):
        out[b].copy_(img)  # uint8 -> float32
    mean, std = _mean_std()
    out.sub_(mean).div_(std)
    for b, box in enumerate(erase or ()):
        if box is not None:
            top, left, eh, ew = box
            out[b, :, top : top + eh, left : left + ew] = 0.0
    return out


class ImageTransform:
    """Decode + resize + (augment) + normalise on tensors.

    :meth:`__call__` gives the finished float image. The datasets use :meth:`geometric`
    instead (uint8 image + erasing box) and let :func:`normalize_batch` do the float part
    once per batch; both draw the same random numbers and give the same values.

    Args:
        image_size: output (height, width).
        train: training pipeline (augmentations when ``augment``) or evaluation pipeline.
        augment: flip, pad-and-crop and random erasing (``data.augment``); ignored for eval.
    """

    def __init__(self, image_size: tuple[int, int], *, train: bool, augment: bool = True) -> None:
        self.size = (int(image_size[0]), int(image_size[1]))
        self.train = train
        self.augment = bool(augment and train)
        self._mean, self._std = _mean_std()

    def resize(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (3, h, w) -> uint8 (3, H, W), bicubic with antialias; a no-op at the right size."""
        if tuple(img.shape[-2:]) == self.size:
            return img
        return F.resize(img, list(self.size), interpolation=InterpolationMode.BICUBIC, antialias=True)

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (3, H, W) with CLIP mean/std."""
        return img.float().sub_(self._mean).div_(self._std)

    def geometric(
        self, image: bytes | bytearray | memoryview | torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Box | None]:
        """Decode, resize, flip and pad-and-crop in uint8; draw the erasing box.

        Args:
            image: encoded bytes, or uint8 (3, h, w).
            generator: source of randomness for the augmentations (global RNG if None).

        Returns:
            uint8 (3, H, W) and the box to erase after normalisation (None: no erasing).
        """
        img = image if isinstance(image, torch.Tensor) else decode_image_bytes(image)
        img = self.resize(img)  # (3, H, W) uint8
        if not self.augment:
            return img, None
        H, W = self.size
        u = _Uniforms(generator)
        if u() < FLIP_P:
            img = img.flip(-1)
        # Pad by PAD_PIXELS with zeros, crop H x W back: the image moves by (dy, dx) in
        # [-pad, pad]; done as one copy into a zero canvas instead of pad + slice.
        dy = u.randint(0, 2 * PAD_PIXELS) - PAD_PIXELS
        dx = u.randint(0, 2 * PAD_PIXELS) - PAD_PIXELS
        if dy or dx:
            out = torch.zeros_like(img)
            out[:, max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = img[
                :, max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)
            ]
            img = out
        box = _erase_box(H, W, u) if u() < ERASE_P else None
        return img, box

    def __call__(
        self, image: bytes | bytearray | memoryview | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Transform encoded bytes (or an already decoded uint8 tensor) to a float image.

        Args:
            image: encoded bytes, or uint8 (3, h, w).
            generator: source of randomness for the augmentations (global RNG if None).

        Returns:
            float32 (3, H, W), normalised.
        """
        img, box = self.geometric(image, generator)
        x = self.normalize(img)  # (3, H, W) float
        if box is not None:
            top, left, eh, ew = box
            x[:, top : top + eh, left : left + ew] = 0.0
        return x


class PILTransform:
    """The same pipeline with PIL and ``torchvision.transforms`` (the reference implementations' way).

    Takes a PIL image (``Image.open(path).convert("RGB")``); randomness from the global torch RNG.
    """

    def __init__(self, image_size: tuple[int, int], *, train: bool, augment: bool = True) -> None:
        import torchvision.transforms as T

        size = (int(image_size[0]), int(image_size[1]))
        steps: list = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)]
        if train and augment:
            steps += [T.RandomHorizontalFlip(FLIP_P), T.Pad(PAD_PIXELS), T.RandomCrop(size)]
        steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
        if train and augment:
            steps.append(T.RandomErasing(p=ERASE_P, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0))
        self.pipeline = T.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float32 (3, H, W), normalised."""
        return self.pipeline(img)
