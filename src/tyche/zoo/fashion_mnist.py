"""``zoo:fashion-mnist``: Zalando's Fashion-MNIST from the Debian package.

``apt-get install dataset-fashion-mnist`` puts the four original IDX files
(``train-images-idx3-ubyte.gz`` ...) under ``/usr/share/datasets/fashion-mnist/``. We read
them in place with a small IDX reader; ``$TYCHE_FASHION_MNIST_DIR`` points elsewhere.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tyche.errors import InputError
from tyche.zoo.entry import ZooEntry, ZooError, folder_size

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install dataset-fashion-mnist"
FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: IDX type byte -> numpy dtype (big-endian for multi-byte types)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_dir() -> Path:
    """``$TYCHE_FASHION_MNIST_DIR`` if set, else the Debian package's folder."""
    env = os.environ.get("TYCHE_FASHION_MNIST_DIR")
    return Path(env) if env else DEFAULT_DIR


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic ``0 0 type ndim``, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise InputError(f"{path}: {len(raw)} bytes, header says {expected}; truncated file?")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class FashionMNIST:
    """``x_*`` uint8 (N, 28, 28) pixels in 0..255; ``y_*`` int64 (N,) labels 0..9 (``classes``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...] = CLASSES


def _missing(root: Path) -> list[str]:
    return [name for name in FILES.values() if not (root / name).is_file()]


def load_fashion_mnist(root: Path | str | None = None) -> FashionMNIST:
    """The 60,000 training and 10,000 test images; ZooError naming the apt package if absent."""
    root = Path(root) if root is not None else fashion_mnist_dir()
    missing = _missing(root)
    if missing:
        raise ZooError(
            f"zoo:fashion-mnist needs the Debian package dataset-fashion-mnist ({INSTALL}); "
            f"missing under {root}: {', '.join(missing)}"
        )
    arrays = {key: read_idx(root / name) for key, name in FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise InputError(f"{root}: {split} images {x.shape} and labels {y.shape} do not match")
    return FashionMNIST(
        x_train=torch.from_numpy(arrays["x_train"].copy()),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["x_test"].copy()),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
    )


class FashionMNISTEntry(ZooEntry):
    """Fashion-MNIST read in place from the Debian package (nothing cached)."""

    name = "fashion-mnist"
    kind = "data"
    description = f"Fashion-MNIST 28x28 images, 60k/10k (Debian: {INSTALL})"

    @property
    def path(self) -> Path:
        return fashion_mnist_dir()

    def is_ready(self) -> bool:
        return not _missing(self.path)

    def check_available(self) -> None:
        if not self.is_ready():
            load_fashion_mnist(self.path)  # raises the ZooError with the install command

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        data = load_fashion_mnist(self.path)
        return {
            "n_train": len(data.x_train),
            "n_test": len(data.x_test),
            "image_shape": list(data.x_train.shape[1:]),
            "classes": list(CLASSES),
        }

    def metrics(self) -> dict[str, Any]:
        return {"classes": list(CLASSES)} if self.is_ready() else {}

    def texts(self) -> list[str]:
        """Not text: Fashion-MNIST is image data."""
        raise InputError(
            "zoo:fashion-mnist is image data, not text; load it with tyche.zoo.load_fashion_mnist()"
        )

    def size_bytes(self) -> int:
        return sum(folder_size(self.path / n) for n in FILES.values()) if self.is_ready() else 0
