"""Readers for the on-disk formats: idx (Fashion-MNIST), the CIFAR python pickles, SVHN ``.mat`` files and
ImageFolder trees (plain folders or ``<split>.zip``).

Every reader returns ``(images, labels, classes)``: a uint8 array (N, C, H, W), an int64 array (N,) and the
class names. Missing files raise :class:`DatasetNotFoundError` (a ``FileNotFoundError``) saying what was
expected where; malformed files raise ``ValueError`` naming the file. Nothing here knows about caching.
"""

from __future__ import annotations

import gzip
import io
import logging
import multiprocessing
import os
import pickle
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Decoded = tuple[np.ndarray, np.ndarray, list[str]]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SVHN_CLASSES = [str(d) for d in range(10)]
# torchvision's IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for; the message lists what was expected."""


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files
# ---------------------------------------------------------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08


def find_idx_files(root: Path, split: str) -> list[Path]:
    """The (images, labels) idx files of ``split`` in ``root`` (or torchvision's ``root/FashionMNIST/raw``),
    gzipped or not."""
    found = []
    for stem in IDX_FILES[split]:
        candidates = [d / (stem + ext) for d in (root, root / "FashionMNIST" / "raw") for ext in (".gz", "")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            expected = ", ".join(f"{s}[.gz]" for pair in IDX_FILES.values() for s in pair)
            raise DatasetNotFoundError(
                f"Fashion-MNIST {split} split: {stem}[.gz] not found in {root}. Expected the four idx files "
                f"({expected}) in that folder. On Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them "
                "in /usr/share/datasets/fashion-mnist; otherwise pass a folder holding them."
            )
        found.append(path)
    return found


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte idx array of ``ndim`` dimensions (big-endian header: 0, 0, type 0x08, ndim, dims)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: cannot read idx file ({e})") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: expected an idx file, got only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if magic != expected_magic:
        raise ValueError(
            f"{path}: expected idx magic number {expected_magic:#010x} (unsigned bytes, {ndim} dims), got {magic:#010x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header; expected {header} bytes, got {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise ValueError(f"{path}: idx dims {dims} need {header + size} bytes, got {len(raw)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(files: list[Path]) -> Decoded:
    image_path, label_path = files
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: expected labels 0..9, got {int(labels.max())}")
    return images[:, None].copy(), labels.astype(np.int64), list(FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the official python pickles
# ---------------------------------------------------------------------------------------------------------

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_labels",
                 "fine_label_names"),
}

# What the official files (python 2 pickles of numpy arrays) and numpy-written re-pickles reference. Anything
# else is refused: unpickling is code execution.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise ValueError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # python 2 pickles give str keys under latin1; python 3 ones written with bytes keys keep them
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def find_cifar_files(name: str, root: Path, split: str) -> list[Path]:
    """The batch files of ``split`` and then the meta file; ``root`` is the extracted folder or its parent."""
    folder, splits, meta, _, _ = CIFAR_LAYOUT[name]
    base = root / folder if (root / folder).is_dir() else root
    files = [base / f for f in splits[split]] + [base / meta]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        all_files = sorted({f for v in splits.values() for f in v} | {meta})
        raise DatasetNotFoundError(
            f"{name} {split} split: missing {missing} in {base}. Expected the official python version "
            f"({folder}/ with {', '.join(all_files)}); pass root= that folder or its parent."
        )
    return files


def read_cifar(name: str, files: list[Path]) -> Decoded:
    *batches, meta_path = files
    _, _, _, label_key, names_key = CIFAR_LAYOUT[name]
    meta = _load_pickle(meta_path)
    if names_key not in meta:
        raise ValueError(f"{meta_path}: expected key {names_key!r}, got keys {sorted(meta)}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    images, labels = [], []
    for path in batches:
        batch = _load_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{path}: expected keys 'data' and {label_key!r}, got {sorted(batch)}")
        data, y = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
        if y.shape != (len(data),):
            raise ValueError(f"{path}: {len(data)} images but labels of shape {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"{path}: expected labels in 0..{len(classes) - 1}, got {int(y.min())}..{int(y.max())}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 red, 1024 green, 1024 blue, row-major
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels), classes


# ---------------------------------------------------------------------------------------------------------
# SVHN: the official cropped-digit .mat files
# ---------------------------------------------------------------------------------------------------------

SVHN_FILES = {"train": "train_32x32.mat", "extra": "extra_32x32.mat", "test": "test_32x32.mat"}


def find_svhn_file(root: Path, split: str) -> list[Path]:
    path = root / SVHN_FILES[split]
    if not path.is_file():
        raise DatasetNotFoundError(
            f"svhn {split} split: {path.name} not found in {root}. Expected the official format-2 files "
            f"({', '.join(SVHN_FILES.values())}) in one folder."
        )
    return [path]


def read_svhn(files: list[Path]) -> Decoded:
    import scipy.io

    (path,) = files
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # noqa: BLE001 - scipy raises many types for bad files
        raise ValueError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("_"))
        raise ValueError(f"{path}: expected variables 'X' and 'y', got {found}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{path}: expected X as uint8 (H, W, 3, N), got {x.dtype} {x.shape}")
    if len(y) != x.shape[3]:
        raise ValueError(f"{path}: X holds {x.shape[3]} images but y holds {len(y)} labels")
    y = y.astype(np.int64)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{path}: expected labels 1..10 (10 is the digit 0), got {int(y.min())}..{int(y.max())}")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y, list(SVHN_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# ImageFolder: root/<split>/<class>/**/*.jpg, or root/<split>.zip holding the same tree
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderSource:
    """The images of one split: ``paths`` inside a folder, or member names of ``archive`` (a zip)."""

    paths: list[str]
    targets: list[int]
    classes: list[str]
    archive: Path | None = None

    @property
    def key_files(self) -> list[str]:
        return [str(self.archive)] if self.archive is not None else self.paths


def brief_error(err: BaseException, limit: int = 120) -> str:
    """``module.Type: message`` on one line of at most about ``limit`` characters: some readers put what they
    choked on in the message (zipfile quotes a damaged member header: up to 64 KB of binary)."""
    kind = type(err)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{name}: {text}" if text else name


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: Path, split: str) -> FolderSource:
    """The split's files in torchvision ``ImageFolder`` order (classes sorted, files sorted per class)."""
    folder, archive = root / split, root / f"{split}.zip"
    if folder.is_dir():
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        paths, targets = [], []
        for idx, cls in enumerate(classes):
            files = [
                os.path.join(d, f)
                for d, _, names in sorted(os.walk(folder / cls, followlinks=True))
                for f in sorted(names)
                if _is_image(f)
            ]
            if not files:
                exts = ", ".join(IMAGE_EXTENSIONS)
                raise DatasetNotFoundError(f"class folder {folder / cls} holds no images ({exts})")
            paths += files
            targets += [idx] * len(files)
        if not classes:
            raise DatasetNotFoundError(f"{folder} holds no class folders; expected {folder}/<class>/<image files>")
        return FolderSource(paths, targets, classes)
    if archive.is_file():
        return _list_zip(archive, split)
    raise DatasetNotFoundError(
        f"imagefolder {split} split: neither {folder}/ nor {archive} exists. Expected the ImageFolder layout "
        f"{root}/{split}/<class>/<image files> (or the same tree zipped as {archive.name})."
    )


def _list_zip(archive: Path, split: str) -> FolderSource:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/") and _is_image(n)]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{archive}: cannot read zip archive ({brief_error(e)})") from e
    prefix = f"{split}/" if names and all(n.startswith(f"{split}/") for n in names) else ""
    by_class: dict[str, list[str]] = {}
    for n in names:
        parts = n[len(prefix):].split("/")
        if len(parts) < 2:
            raise ValueError(f"{archive}: {n} is not inside a class folder; expected [{split}/]<class>/<file>")
        by_class.setdefault(parts[0], []).append(n)
    if not by_class:
        raise DatasetNotFoundError(f"{archive} holds no images in class folders ([{split}/]<class>/<file>)")
    classes = sorted(by_class)
    paths, targets = [], []
    for idx, cls in enumerate(classes):
        members = sorted(by_class[cls])
        paths += members
        targets += [idx] * len(members)
    return FolderSource(paths, targets, classes, archive)


_FAST_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # torchvision.io decodes these; same pixels as PIL


def _torchvision_decoder():
    """torchvision.io's decoder (libjpeg-turbo, libpng, libwebp), about 3x faster than PIL on small JPEGs;
    None where it is unavailable (torchvision deprecated it in 0.29 in favour of torchcodec)."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_image
    except (ImportError, AttributeError):
        return None
    return lambda data: decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _decode_one(data: bytes, name: str, fast) -> np.ndarray:
    """An image file's bytes -> RGB uint8 (3, H, W); PIL reads what the fast decoder does not."""
    if fast is not None and name.lower().endswith(_FAST_EXTENSIONS):
        try:
            arr = fast(data).numpy()
            if arr.dtype == np.uint8:  # 16-bit PNGs come back as uint16: let PIL convert them
                return arr
        except (RuntimeError, ValueError):
            pass
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


_OPEN_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(archive: Path) -> zipfile.ZipFile:
    """One open archive per process (reading a zip's directory of 50k names costs a fraction of a second;
    a handle inherited through fork must not be shared, hence the pid in the key)."""
    key = (os.getpid(), str(archive))
    if key not in _OPEN_ZIPS:
        _OPEN_ZIPS[key] = zipfile.ZipFile(archive)
    return _OPEN_ZIPS[key]


def _close_zip(archive: Path) -> None:
    zf = _OPEN_ZIPS.pop((os.getpid(), str(archive)), None)
    if zf is not None:
        zf.close()


def _decode_chunk(args: tuple[list[str], Path | None, tuple[int, int] | None]) -> tuple[np.ndarray, str | None]:
    """Decode images to RGB uint8 (n, 3, H, W). Stops at the first image whose size differs from ``size``
    (or from the first image) and returns a message instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's image decoding
        return _decode_loop(*args)


def _decode_loop(paths: list[str], archive: Path | None, size: tuple[int, int] | None) -> tuple[np.ndarray, str | None]:
    out = np.empty(0, dtype=np.uint8)
    fast = _torchvision_decoder()
    zf = _open_zip(archive) if archive is not None else None
    for i, p in enumerate(paths):
        where = f"{archive}:{p}" if zf is not None else p
        try:
            if zf is not None:
                data = zf.read(p)
            else:
                with open(p, "rb") as f:
                    data = f.read()
        except Exception as e:  # noqa: BLE001 - damaged archives raise BadZipFile, zlib.error, EOFError, ...
            if zf is None:
                return out, f"{p}: cannot read the file ({brief_error(e)})"
            return out, f"{archive}: cannot read member {p} ({brief_error(e)})"
        try:
            arr = _decode_one(data, p, fast)
        except Exception as e:  # noqa: BLE001 - decoders raise many types for bad files
            return out, f"{where}: cannot decode image ({brief_error(e)})"
        if size is None:
            size = arr.shape[1:]
        if arr.shape[1:] != tuple(size):
            return out, (
                f"{where} is {arr.shape[2]}x{arr.shape[1]} (WxH) but other images are {size[1]}x{size[0]}; "
                "in-memory loading needs equal sizes: use skipnet.data.make_stream_loader for this folder"
            )
        if i == 0:
            out = np.empty((len(paths), *arr.shape), dtype=np.uint8)
        out[i] = arr
    return out, None


def read_image_folder(source: FolderSource, workers: int | None = None) -> Decoded:
    """Decode every image once (RGB); all must have the same size. ``workers`` processes decode in
    parallel (default: all cores, up to 8; serial for small sets)."""
    paths, n = source.paths, len(source.paths)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    chunk = 1024
    try:
        first, err = _decode_chunk((paths[:1], source.archive, None))
        if err:
            raise ValueError(err)
        jobs = [(paths[i : i + chunk], source.archive, first.shape[2:]) for i in range(0, n, chunk)]
        if workers > 1 and n >= 4 * chunk and "fork" in multiprocessing.get_all_start_methods():
            # fork: the children only decode into numpy arrays; spawn would re-import the package in each worker
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                results = list(pool.map(_decode_chunk, jobs))
        else:
            results = [_decode_chunk(job) for job in jobs]
    finally:
        if source.archive is not None:
            _close_zip(source.archive)
    for _, err in results:
        if err:
            raise ValueError(err)
    images = np.concatenate([r for r, _ in results])
    return images, np.asarray(source.targets, dtype=np.int64), list(source.classes)
