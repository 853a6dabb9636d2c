"""Item image embeddings: precomputed vectors, or image files/URLs run through a configurable encoder.

The encoder is any ``torch.nn.Module`` (given as ``class_path`` + ``init_args``) that maps a float batch
``[B, 3, size, size]`` (RGB in [0, 1], resized without cropping, then normalised by ``mean``/``std``) to
``[B, d]``, or a Hugging Face vision model (``hf_model``), whose own preprocessing sizes and statistics
are used. Image decoding is optional: ``.npy`` arrays (``H x W``, ``H x W x C``; ``uint8`` or floats in
[0, 1]) are read with numpy alone; other formats (JPEG, PNG, ...) need Pillow. Items without an image
reference get ``present=False``; an unreadable image is an error, or masked and counted with
``unreadable: mask`` (dead URLs are common in crawled catalogs).

``preprocess`` names a function applied to each decoded image before it is resized for the encoder: the hook
for VL-CLIP's visual grounding (crop the product out of a lifestyle photo with a detector queried by the
product type). It receives the image (``H x W x 3`` float32 in [0, 1]) and the item's text, and returns an
image (a ``uint8`` or [0, 1] float array, or a PIL image).
"""

from __future__ import annotations

import importlib
import io
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from mmrec.data.config_paths import InputPath, looks_local, resolve
from mmrec.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

Preprocess = Callable[[np.ndarray, "str | None"], Any]
"""``(image H x W x 3 float32 in [0, 1], the item's text or None) -> image``."""


@dataclass(frozen=True)
class ImageOptions:
    """Item image embeddings (``emb_image.parquet``): set ``precomputed``, ``encoder`` or ``hf_model``.

    Args:
        precomputed: Parquet (``id_column`` + ``embedding_column`` of float lists) or NPZ (arrays named
            ``id_column`` and ``embedding_column``) keyed by raw item id; items absent from it are masked.
        id_column: the precomputed file's item id column or array.
        embedding_column: the precomputed file's embedding column or array.
        encoder: an ``nn.Module`` mapping ``[B, 3, size, size]`` to ``[B, d]``, as ``class_path`` and
            ``init_args``; run on the items' image paths or URLs (the source's image column).
        hf_model: a Hugging Face vision model name or folder, instead of ``encoder``.
        root: folder that relative image paths are resolved against; ``null``: the working directory.
        size: square input size for ``encoder`` (``null``: 224; ``hf_model`` uses its own).
        mean: per-channel normalisation mean (``null``: ImageNet's; ``hf_model`` uses its own).
        std: per-channel normalisation std (``null``: ImageNet's; ``hf_model`` uses its own).
        batch_size: images encoded per batch.
        device: where the encoder runs.
        unreadable: ``fail`` on an image that cannot be read or decoded, or ``mask`` it and count it.
        dim: expected embedding width; a file or encoder giving another width is an error.
        preprocess: import path (``package.module.function`` or ``package.module:function``) of a function
            ``(image, text) -> image`` applied to each decoded image before the encoder: the place for
            visual grounding (crop the product region, VL-CLIP) or any other image clean-up; ``null``: none.
            It receives ``H x W x 3`` float32 in [0, 1] and the item's rendered text (``None`` without), and
            returns a ``uint8`` or [0, 1] float array or a PIL image. An exception in it counts as an
            unreadable image (``unreadable``).
    """

    precomputed: str | None = None
    id_column: str = "item_id"
    embedding_column: str = "embedding"
    encoder: nn.Module | None = None
    hf_model: str | None = None
    root: str | None = None
    size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    batch_size: int = 32
    device: str = "cpu"
    unreadable: Literal["fail", "mask"] = "fail"
    dim: int | None = None
    preprocess: str | None = None

    def check(self) -> None:
        """Fail on values that would only break once encoding starts."""
        for name in ("batch_size", "size", "dim"):
            value = getattr(self, name)
            if (value is not None or name == "batch_size") and (not isinstance(value, int) or value < 1):
                raise InputError(f"image.{name} must be at least 1, got {value!r}")
        if self.std is not None and 0 in self.std:
            raise InputError(f"image.std must not contain 0, got {list(self.std)}")
        if self.preprocess is not None:
            if self.precomputed:
                raise InputError("image.preprocess applies to images the encoder reads; image.precomputed is set")
            load_preprocess(self.preprocess)

    def input_paths(self) -> list[InputPath]:
        """The precomputed file, the image root, and a local Hugging Face model folder."""
        paths = []
        if self.precomputed:
            paths.append(InputPath("image.precomputed", self.precomputed, "precomputed image embeddings file"))
        if self.root is not None:
            paths.append(InputPath("image.root", self.root, "image root folder", "folder"))
        if self.hf_model is not None and looks_local(self.hf_model):
            paths.append(InputPath("image.hf_model", self.hf_model, "image model folder", "folder"))
        return paths


@dataclass(frozen=True)
class Preprocessing:
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class HFVisionEncoder(nn.Module):
    """A Hugging Face vision model as ``[B, 3, H, W] -> [B, d]``: projected image embeddings when the model
    has them (CLIP), else its pooled output, else the mean of its last hidden states."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.image_processing_utils import ImageProcessingMixin

        try:
            self.model = AutoModel.from_pretrained(name)
            config, _ = ImageProcessingMixin.get_image_processor_dict(name)
        except (OSError, ValueError) as exc:
            raise InputError(f"image.hf_model '{name}' cannot be loaded ({str(exc).strip().splitlines()[0]})") from None
        size = config.get("crop_size") or config.get("size") or {}
        size = size if isinstance(size, dict) else {"height": size}
        self.preprocessing = Preprocessing(
            int(size.get("height") or size.get("shortest_edge") or 224),
            tuple(config.get("image_mean") or IMAGENET_MEAN),
            tuple(config.get("image_std") or IMAGENET_STD),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "get_image_features"):
            output = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
        if isinstance(output, torch.Tensor):
            return output
        for name in ("image_embeds", "pooler_output"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value.flatten(1)
        return output.last_hidden_state.mean(dim=1)


def load_preprocess(path: str) -> Preprocess:
    """The function ``image.preprocess`` names, imported; one error line when it cannot be."""
    if not isinstance(path, str) or not path.strip():
        raise InputError(f"image.preprocess must be an import path such as my_package.images:crop, got {path!r}")
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        hook = getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 (importing user code can fail in any way; report it in one line)
        raise InputError(f"image.preprocess: cannot import '{path}' ({type(exc).__name__}: {exc})") from None
    if not callable(hook):
        raise InputError(f"image.preprocess: '{path}' is not a function")
    return hook


def preprocessed(hook: Preprocess, image: np.ndarray, text: str | None, reference: str) -> np.ndarray:
    """``hook``'s output as ``H x W x 3`` float32 in [0, 1]; its failures are the image's (ValueError)."""
    try:
        output = np.asarray(hook(image, text))
    except Exception as exc:  # noqa: BLE001 (user code: treated as an unreadable image, per image.unreadable)
        raise ValueError(f"{reference}: image.preprocess failed ({type(exc).__name__}: {exc})") from None
    return _as_rgb(output, f"{reference} after image.preprocess")


def build_encoder(options: ImageOptions) -> tuple[nn.Module, Preprocessing]:
    if options.encoder is not None and options.hf_model is not None:
        raise InputError("image: set either encoder or hf_model, not both")
    if options.hf_model is not None:
        local = looks_local(options.hf_model)
        encoder = HFVisionEncoder(str(resolve(options.hf_model)) if local else options.hf_model)
        return encoder, encoder.preprocessing
    if options.encoder is None:
        raise InputError("image: set precomputed, encoder or hf_model")
    return options.encoder, Preprocessing(options.size or 224, options.mean or IMAGENET_MEAN, options.std or IMAGENET_STD)


def read_image(reference: str, root: str | None) -> np.ndarray:
    """Decode one image (path or URL) to ``H x W x 3`` float32 in [0, 1]."""
    if _URL.match(reference):
        with urllib.request.urlopen(reference, timeout=30) as response:
            data = response.read()
        name = reference.split("?")[0]
    else:
        path = Path(reference) if root is None or Path(reference).is_absolute() else resolve(root) / reference
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image file not found")
        data, name = path.read_bytes(), path.name
    if name.lower().endswith(".npy"):
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        try:
            from PIL import Image
        except ImportError:
            raise InputError(
                f"{reference}: decoding this image needs Pillow (`pip install Pillow`); "
                "or give .npy images or image.precomputed embeddings"
            ) from None
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    return _as_rgb(array, reference)


def _as_rgb(array: np.ndarray, reference: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise ValueError(f"{reference}: expected an H x W or H x W x (1, 3, 4) image, got shape {array.shape}")
    array = array[:, :, :3] if array.shape[2] >= 3 else np.repeat(array, 3, axis=2)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return array.astype(np.float32) / scale


def to_tensor(image: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """``[3, size, size]``: resized (bilinear, antialiased, no crop) and normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    size = preprocessing.size
    tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(preprocessing.std, dtype=torch.float32)[:, None, None]
    return (tensor - mean) / std


@dataclass(frozen=True)
class ImageEmbeddings:
    matrix: np.ndarray
    present: np.ndarray
    unreadable: int


@torch.no_grad()
def encode_images(
    references: list[str | None], item_ids: list[str], options: ImageOptions, texts: list[str | None] | None = None
) -> ImageEmbeddings:
    """Encode each item's image (through ``image.preprocess``, which sees the item's text, when set); items
    without a reference (or, with ``unreadable: mask``, with an unreadable one) are masked."""
    encoder, preprocessing = build_encoder(options)
    hook = load_preprocess(options.preprocess) if options.preprocess is not None else None
    encoder = encoder.eval().to(options.device)
    todo = [row for row, reference in enumerate(references) if reference is not None]
    present = np.zeros(len(references), dtype=bool)
    rows: list[int] = []
    vectors: list[np.ndarray] = []
    unreadable = 0
    progress = tqdm(total=len(todo), desc="image embeddings", unit="img", disable=None)
    for start in range(0, len(todo), options.batch_size):
        batch_rows, tensors = [], []
        for row in todo[start:start + options.batch_size]:
            try:
                image = read_image(str(references[row]), options.root)
                if hook is not None:
                    image = preprocessed(hook, image, texts[row] if texts else None, str(references[row]))
                tensors.append(to_tensor(image, preprocessing))
                batch_rows.append(row)
            except (OSError, ValueError, EOFError, HTTPException) as exc:
                if options.unreadable == "fail":
                    raise InputError(
                        f"item '{item_ids[row]}': image unreadable: {exc} (image.unreadable: mask skips such images)"
                    ) from None
                unreadable += 1
        if tensors:
            output = encoder(torch.stack(tensors).to(options.device))
            if not isinstance(output, torch.Tensor) or output.ndim != 2 or len(output) != len(tensors):
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise InputError(f"image encoder must return a [batch, dim] tensor, got {shape}")
            vectors.append(output.float().cpu().numpy())
            rows.extend(batch_rows)
        progress.update(len(todo[start:start + options.batch_size]))
    progress.close()
    if not vectors:
        raise InputError("image: no item image could be encoded")
    stacked = np.concatenate(vectors)
    if options.dim is not None and stacked.shape[1] != options.dim:
        raise InputError(f"image encoder returns {stacked.shape[1]}-d embeddings, but image.dim is {options.dim}")
    bad = ~np.isfinite(stacked).all(axis=1)
    if bad.any():
        raise InputError(f"item '{item_ids[rows[int(bad.argmax())]]}': the image encoder returned a non-finite embedding")
    matrix = np.zeros((len(references), stacked.shape[1]), dtype=np.float32)
    matrix[rows] = stacked
    present[rows] = True
    return ImageEmbeddings(matrix, present, unreadable)
