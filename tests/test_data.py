"""The dataset layer: every reader on tiny files written in the real formats, the cache, the batch loader."""

import gzip
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from skipnet.data import (
    DATASETS,
    BatchLoader,
    DatasetNotFoundError,
    ImageData,
    channel_stats,
    crop_flip,
    dataset_info,
    default_cache_dir,
    formats,
    load_dataset,
    make_stream_loader,
)
from skipnet.data import datasets as datasets_mod

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache."""
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "default-cache"))


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------
# writers for the real formats
# ---------------------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fashion(root: Path, n_train=6, n_test=4, gz=True, seed=0):
    rng = _rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, (img_name, lab_name) in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                                          ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, arr in ((img_name, images), (lab_name, labels)):
            data = _idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
        out[split] = (images, labels)
    return out


# A hand-written pickle stream (protocol 2 opcodes: U/T strings, K/M/J ints, c globals, R reduce, b build) in
# the shape python 2 gave the official CIFAR files: str keys, numpy.core module paths, array bytes as a str.
def _py2_str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _py2_value(v) -> bytes:
    if isinstance(v, (bytes, str)):
        return _py2_str(v.encode() if isinstance(v, str) else v)
    if isinstance(v, int):
        return _py2_int(v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(x) for x in v) + b"e"
    assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
        + b"(" + _py2_int(1) + _py2_int(v.shape[0]) + _py2_int(v.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
        + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
        + b"\x89" + _py2_str(v.tobytes()) + b"tb"
    )


def py2_pickle(d: dict) -> bytes:
    """What python 2's cPickle.dump(d, f, 2) writes for a CIFAR batch: str keys, numpy.core paths."""
    return b"\x80\x02}(" + b"".join(_py2_str(k.encode()) + _py2_value(v) for k, v in d.items()) + b"u."


def _pickle(path: Path, obj, protocol):
    """protocol "py2": the bytes python 2's cPickle wrote for the official files (str keys, numpy.core)."""
    if protocol == "py2":
        path.write_bytes(py2_pickle({k.decode(): v for k, v in obj.items()}))
        return
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(parent: Path, per_batch=3, n_test=4, seed=0, protocol=2):
    """The official cifar-10-batches-py layout (bytes keys, as the python-2 pickles load under encoding='bytes')."""
    rng = _rng(seed)
    base = parent / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(base / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072},
            protocol)
    out = {"train": ([], [])}
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _pickle(base / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
                                           b"data": data, b"filenames": [b"x.png"] * per_batch}, protocol)
        out["train"][0].append(data)
        out["train"][1].extend(labels)
    data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n_test)]
    _pickle(base / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
                                  b"filenames": [b"y.png"] * n_test}, protocol)
    out["train"] = (np.concatenate(out["train"][0]), out["train"][1])
    out["test"] = (data, labels)
    return base, out


def write_cifar100(parent: Path, n_train=5, n_test=3, seed=1):
    rng = _rng(seed)
    base = parent / "cifar-100-python"
    base.mkdir(parents=True)
    fine = [f"class{i:02d}".encode() for i in range(100)]
    _pickle(base / "meta", {b"fine_label_names": fine, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]},
            pickle.HIGHEST_PROTOCOL)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine_labels = [int(v) for v in rng.integers(0, 100, n)]
        _pickle(base / split, {b"filenames": [b"z.png"] * n, b"batch_label": split.encode(),
                               b"fine_labels": fine_labels, b"coarse_labels": [0] * n, b"data": data},
                pickle.HIGHEST_PROTOCOL)
        out[split] = (data, fine_labels)
    return base, out


def write_svhn(root: Path, sizes=None, seed=0):
    rng = _rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (sizes or {"train": 5, "extra": 3, "test": 4}).items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # the digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y[:, 0])
    return out


def write_image_folder(root: Path, split="train", classes=("cat", "ant", "bee"), per_class=2, size=(6, 5), seed=0,
                       ext=".png"):
    """root/split/<class>/<i>.png with random RGB pixels; returns {path: (class, HWC array)}."""
    rng = _rng(seed)
    written = {}
    for cls in classes:
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = d / f"{i:03d}{ext}"
            Image.fromarray(arr).save(path)
            written[path] = (cls, arr)
    return written


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST (idx)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    written = write_fashion(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        d = load_dataset("fashion_mnist", tmp_path / "fm", split, cache_dir=tmp_path / "cache")
        images, labels = written[split]
        assert d.images.shape == (len(images), 1, 28, 28) and d.images.dtype == torch.uint8
        assert d.images.is_contiguous()
        assert d.images[2, 0, 5, 17] == images[2, 5, 17]
        assert torch.equal(d.images[:, 0], torch.from_numpy(images))
        assert d.labels.dtype == torch.int64 and d.labels.tolist() == labels.tolist()
        assert d.classes == FASHION_CLASSES and d.num_classes == 10
        assert d.in_channels == 1 and d.image_size == (28, 28) and len(d) == len(images)
        assert d.mean == (0.2860,) and d.std == (0.3530,) and d.name == "fashion_mnist"


def test_fashion_mnist_missing_files_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", tmp_path, "train")
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_fashion_mnist_malformed_files(tmp_path):
    root = tmp_path / "fm"
    write_fashion(root, gz=False)
    images = root / "train-images-idx3-ubyte"
    good = images.read_bytes()

    images.write_bytes(good[:-10])  # truncated
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        load_dataset("fashion_mnist", root, "train", cache=False)

    images.write_bytes(struct.pack(">I", 2049) + good[4:])  # a label file's magic number
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
        load_dataset("fashion_mnist", root, "train", cache=False)

    images.write_bytes(good)
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(5, dtype=np.uint8)))  # 6 images, 5 labels
    with pytest.raises(ValueError, match="6 images but .*5 labels"):
        load_dataset("fashion_mnist", root, "train", cache=False)

    (root / "t10k-images-idx3-ubyte").unlink()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", root, "test", cache=False)


def test_real_fashion_mnist_if_installed(tmp_path):
    if not (datasets_mod.FASHION_MNIST_ROOT / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    d = load_dataset("fashion_mnist", None, "test", cache_dir=tmp_path)
    assert d.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.labels).tolist() == [1000] * 10
    mean, std = channel_stats(d.images)
    assert abs(mean[0] - 0.2868) < 1e-3 and abs(std[0] - 0.3524) < 1e-3  # the test split's own statistics


# ---------------------------------------------------------------------------------------------------------
# CIFAR (python pickles)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["py2", 2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickle_roundtrip(tmp_path, protocol):
    base, written = write_cifar10(tmp_path, protocol=protocol)
    for root in (tmp_path, base):  # the parent or the extracted folder itself
        d = load_dataset("cifar10", root, "train", cache=False)
        data, labels = written["train"]
        assert d.images.shape == (15, 3, 32, 32)
        # row layout: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major
        assert d.images[7, 1, 3, 5] == data[7, 1024 + 3 * 32 + 5]
        assert d.images[14, 2, 31, 0] == data[14, 2048 + 31 * 32]
        assert torch.equal(d.images, torch.from_numpy(data).view(15, 3, 32, 32))
        assert d.labels.tolist() == labels
        assert d.classes[0] == "airplane" and d.classes[9] == "truck"
        assert d.mean == (0.4914, 0.4822, 0.4465) and d.std == (0.2470, 0.2435, 0.2616)
    t = load_dataset("cifar10", tmp_path, "test", cache=False)
    assert torch.equal(t.images, torch.from_numpy(written["test"][0]).view(-1, 3, 32, 32))
    assert t.labels.tolist() == written["test"][1]


def test_cifar100_pickle_roundtrip(tmp_path):
    base, written = write_cifar100(tmp_path)
    d = load_dataset("cifar100", tmp_path, "train", cache=False)
    assert d.num_classes == 100 and d.classes[42] == "class42"
    assert torch.equal(d.images, torch.from_numpy(written["train"][0]).view(-1, 3, 32, 32))
    assert d.labels.tolist() == written["train"][1]  # the fine labels
    assert d.mean == (0.5071, 0.4865, 0.4409)
    t = load_dataset("cifar100", base, "test", cache=False)
    assert t.labels.tolist() == written["test"][1]


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="root="):
        load_dataset("cifar10", None, "train")
    base, _ = write_cifar10(tmp_path)
    (base / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, "train")
    load_dataset("cifar10", tmp_path, "test", cache=False)  # the test split is still complete

    (base / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", tmp_path, "test", cache=False)
    _pickle(base / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, 2)
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_dataset("cifar10", tmp_path, "test", cache=False)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_refuses_code(tmp_path):
    base, _ = write_cifar10(tmp_path)
    _pickle(base / "test_batch", {b"data": _Evil(), b"labels": []}, 2)
    with pytest.raises(ValueError, match="refusing to load posix.getcwd"):
        load_dataset("cifar10", tmp_path, "test", cache=False)


# ---------------------------------------------------------------------------------------------------------
# SVHN (.mat)
# ---------------------------------------------------------------------------------------------------------


def test_svhn_mat_roundtrip_and_label_10(tmp_path):
    written = write_svhn(tmp_path)
    for split in ("train", "extra", "test"):
        d = load_dataset("svhn", tmp_path, split, cache=False)
        x, y = written[split]
        assert d.images.shape == (x.shape[3], 3, 32, 32) and d.images.is_contiguous()
        assert d.images[1, 2, 4, 9] == x[4, 9, 2, 1]  # X is (H, W, C, N)
        assert torch.equal(d.images, torch.from_numpy(x).permute(3, 2, 0, 1))
        assert d.labels[0] == 0  # label 10 is the digit 0
        assert d.labels.tolist() == [0 if v == 10 else int(v) for v in y]
        assert d.classes == [str(i) for i in range(10)]
    both = load_dataset("svhn", tmp_path, "train+extra", cache=False)
    assert len(both) == 8 and torch.equal(both.images[5:], torch.from_numpy(written["extra"][0]).permute(3, 2, 0, 1))


def test_svhn_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="extra_32x32.mat"):
        load_dataset("svhn", tmp_path, "extra")
    with pytest.raises(ValueError, match="svhn split"):
        load_dataset("svhn", tmp_path, "validation")
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(ValueError, match="test_32x32.mat.*'y'"):
        load_dataset("svhn", tmp_path, "test", cache=False)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(ValueError, match="train_32x32.mat"):
        load_dataset("svhn", tmp_path, "train", cache=False)


# ---------------------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------------------


def _expected_folder(written):
    """ImageFolder order: classes sorted, files sorted."""
    classes = sorted({c for c, _ in written.values()})
    items = sorted(written.items(), key=lambda kv: (classes.index(kv[1][0]), kv[0].name))
    images = np.stack([a for _, (_, a) in items]).transpose(0, 3, 1, 2)
    return classes, images, [classes.index(c) for _, (c, _) in items]


@pytest.mark.parametrize("fast_decoder", [True, False])
def test_image_folder_png_roundtrip_and_stats(tmp_path, monkeypatch, fast_decoder):
    if not fast_decoder:
        monkeypatch.setattr(formats, "_torchvision_decoder", lambda: None)  # PIL only
    written = write_image_folder(tmp_path)
    written.update(write_image_folder(tmp_path, classes=("bee",), per_class=1, seed=5, ext=".bmp"))  # PIL path
    d = load_dataset("imagefolder", tmp_path, "train", cache=False)
    classes, images, labels = _expected_folder(written)
    assert d.classes == ["ant", "bee", "cat"] == classes
    assert d.images.shape == (7, 3, 5, 6) and d.image_size == (5, 6)
    assert torch.equal(d.images, torch.from_numpy(images)) and d.labels.tolist() == labels
    mean = images.reshape(7, 3, -1).transpose(1, 0, 2).reshape(3, -1) / 255
    assert np.allclose(d.mean, mean.mean(1)) and np.allclose(d.std, mean.std(1))

    write_image_folder(tmp_path, split="test", per_class=1, seed=3)
    t = load_dataset("imagefolder", tmp_path, "test", cache=False)
    assert t.mean == d.mean and t.std == d.std  # normalised with the train split's statistics
    given = load_dataset("imagefolder", tmp_path, "test", cache=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert given.mean == (0.5,) * 3 and given.std == (0.25,) * 3


def test_image_folder_from_zip(tmp_path):
    written = write_image_folder(tmp_path / "tree")
    root = tmp_path / "zipped"
    root.mkdir()
    with zipfile.ZipFile(root / "train.zip", "w") as zf:  # like cifar10-jpeg: members train/<class>/<file>
        for path in written:
            zf.write(path, path.relative_to(tmp_path / "tree").as_posix())
    from_zip = load_dataset("imagefolder", root, "train", cache_dir=tmp_path / "cache")
    from_dir = load_dataset("imagefolder", tmp_path / "tree", "train", cache=False)
    assert torch.equal(from_zip.images, from_dir.images) and torch.equal(from_zip.labels, from_dir.labels)
    assert from_zip.classes == from_dir.classes


def test_image_folder_zip_with_a_damaged_member(tmp_path):
    """A member whose local header is damaged: zipfile quotes the header it read (here 60 KB of binary, ~170 KB
    of escapes), which the error used to carry whole; now one short line naming the archive and the member."""
    written = write_image_folder(tmp_path / "tree")
    root = tmp_path / "zipped"
    root.mkdir()
    with zipfile.ZipFile(root / "train.zip", "w") as zf:
        for path in written:
            zf.write(path, path.relative_to(tmp_path / "tree").as_posix())
        zf.writestr("train/cat/zz.png", _rng().integers(0, 256, 70000, dtype=np.uint8).tobytes())
    data = bytearray((root / "train.zip").read_bytes())
    header = data.rindex(b"PK\x03\x04", 0, data.index(b"PK\x01\x02"))  # the last member's local header
    struct.pack_into("<H", data, header + 26, 60000)  # its file name length
    (root / "train.zip").write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        load_dataset("imagefolder", root, "train", cache=False)
    message = str(err.value)
    assert message.startswith(f"{root / 'train.zip'}: cannot read member train/cat/zz.png "
                              "(zipfile.BadZipFile: File name in directory")
    assert "\n" not in message and len(message) < 300


def test_stream_loader_names_a_damaged_image(tmp_path):
    """PIL's "Truncated File Read" for a damaged JPEG did not say which file."""
    write_image_folder(tmp_path, split="val", classes=("a", "b"), size=(30, 20), ext=".jpg")
    bad = tmp_path / "val" / "b" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: cannot decode image \\(OSError: "):
        list(make_stream_loader(tmp_path, "val", 2, train=False, image_size=16, workers=0))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train.zip"):
        load_dataset("imagefolder", tmp_path, "train")
    write_image_folder(tmp_path, classes=("a",), size=(6, 5))
    write_image_folder(tmp_path, classes=("b",), size=(7, 5))
    with pytest.raises(ValueError, match="make_stream_loader"):
        load_dataset("imagefolder", tmp_path, "train", cache=False)
    write_image_folder(tmp_path, split="val", classes=("a", "c"))
    write_image_folder(tmp_path / "other", classes=("a", "b"))
    write_image_folder(tmp_path / "other", split="val", classes=("a", "c"))
    with pytest.raises(ValueError, match="classes of 'val' differ"):
        load_dataset("imagefolder", tmp_path / "other", "val", cache=False)
    (tmp_path / "bad" / "train" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "x" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0.png.*cannot decode"):
        load_dataset("imagefolder", tmp_path / "bad", "train", cache=False)
    with pytest.raises(ValueError, match="split name"):
        load_dataset("imagefolder", tmp_path, "../x")


# ---------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------


def _no_decoding(monkeypatch, name):
    def boom(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setitem(datasets_mod._READERS, name, boom)


def test_cache_is_written_and_used(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", tmp_path / "data", "train", cache_dir=cache)
    files = list(cache.glob("cifar10-train-*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    _no_decoding(monkeypatch, "cifar10")
    second = load_dataset("cifar10", tmp_path / "data", "train", cache_dir=cache)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.mean == first.mean
    with pytest.raises(AssertionError, match="decoded again"):  # another split is not in the cache
        load_dataset("cifar10", tmp_path / "data", "test", cache_dir=cache)


def test_cache_default_dir_and_disable(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    write_svhn(tmp_path / "svhn", sizes={"test": 3})
    load_dataset("svhn", tmp_path / "svhn", "test")
    assert len(list((tmp_path / "env-cache").glob("svhn-test-*.pt"))) == 1
    load_dataset("cifar100", write_cifar100(tmp_path / "c100")[0], "test", cache=False)
    assert not list((tmp_path / "env-cache").glob("cifar100-*"))


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    write_fashion(tmp_path / "fm")
    cache = tmp_path / "cache"
    good = load_dataset("fashion_mnist", tmp_path / "fm", "train", cache_dir=cache)
    (path,) = cache.glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="skipnet.data.datasets"):
        again = load_dataset("fashion_mnist", tmp_path / "fm", "train", cache_dir=cache)
    assert torch.equal(again.images, good.images)
    assert "ignoring unreadable dataset cache" in caplog.text
    assert torch.load(path, weights_only=True)["images"].shape == good.images.shape  # rewritten
    path.write_bytes(b"")
    assert torch.equal(load_dataset("fashion_mnist", tmp_path / "fm", "train", cache_dir=cache).labels, good.labels)


def test_cache_follows_source_changes(tmp_path):
    written = write_image_folder(tmp_path)
    cache = tmp_path / "cache"
    before = load_dataset("imagefolder", tmp_path, "train", cache_dir=cache)
    path, (cls, arr) = next(iter(written.items()))
    Image.fromarray(255 - arr).save(path)
    os.utime(path, ns=(0, 1))  # a different mtime even on coarse clocks
    written[path] = (cls, 255 - arr)
    after = load_dataset("imagefolder", tmp_path, "train", cache_dir=cache)
    assert not torch.equal(before.images, after.images)
    assert torch.equal(after.images, torch.from_numpy(_expected_folder(written)[1]))
    assert len(list(cache.glob("imagefolder-train-*.pt"))) == 1  # the stale entry was removed


# ---------------------------------------------------------------------------------------------------------
# ImageData
# ---------------------------------------------------------------------------------------------------------


def _toy(n=10, c=3, h=8, w=8, seed=0, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    return ImageData(images, labels, ["a", "b", "c", "d"], mean[:c], std[:c], "toy")


def test_image_data_validation_and_subset():
    d = _toy()
    sub = d.subset(torch.tensor([3, 1]))
    assert len(sub) == 2 and torch.equal(sub.images[0], d.images[3]) and sub.classes == d.classes
    with pytest.raises(ValueError, match="uint8"):
        ImageData(d.images.float(), d.labels, d.classes, d.mean, d.std, "x")
    with pytest.raises(ValueError, match="int64 labels"):
        ImageData(d.images, d.labels.int(), d.classes, d.mean, d.std, "x")
    with pytest.raises(ValueError, match="3 mean/std"):
        ImageData(d.images, d.labels, d.classes, (0.5,), (0.5,), "x")
    with pytest.raises(ValueError, match="labels below 2"):
        ImageData(d.images, d.labels, ["a", "b"], d.mean, d.std, "x")
    with pytest.raises(ValueError, match="dataset name"):
        load_dataset("mnist", None, "train")
    assert set(DATASETS) == {"fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder"}
    assert dataset_info("svhn")["splits"] == ("train", "extra", "train+extra", "test")


# ---------------------------------------------------------------------------------------------------------
# BatchLoader
# ---------------------------------------------------------------------------------------------------------


def _batches(loader, epoch, start_step=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start_step)]


def test_loader_deterministic_and_resumable():
    d = _toy(n=37)
    a = BatchLoader(d, 8, train=True, seed=3)
    b = BatchLoader(d, 8, train=True, seed=3)
    assert len(a) == 4  # drop_last by default in training
    e2a, e2b = _batches(a, 2), _batches(b, 2)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(e2a, e2b))
    assert not torch.equal(a.order(2), a.order(3))
    assert not torch.equal(a.order(2), BatchLoader(d, 8, train=True, seed=4).order(2))
    for k in range(len(a) + 1):
        resumed = _batches(a, 2, start_step=k)
        assert len(resumed) == len(a) - k
        assert all(torch.equal(x, e2a[k + i][0]) and torch.equal(y, e2a[k + i][1]) for i, (x, y) in enumerate(resumed))
    with pytest.raises(ValueError, match="start_step"):
        a.epoch(0, start_step=5)
    with pytest.raises(TypeError, match="epoch"):
        iter(a)


def test_loader_eval_is_sequential_unaugmented_and_normalised():
    d = _toy(n=21)
    loader = BatchLoader(d, 8, train=False, augment=True)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [8, 8, 5]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, d.labels) and x.dtype == torch.float32
    mean, std = torch.tensor(d.mean).view(1, 3, 1, 1), torch.tensor(d.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (d.images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(torch.cat([b[0] for b in _batches(loader, 7)]), x)  # the epoch does not matter


def test_loader_drop_last_and_sharding():
    d = _toy(n=21)
    assert len(BatchLoader(d, 8, train=True)) == 2
    assert len(BatchLoader(d, 8, train=True, drop_last=False)) == 3
    assert [len(y) for _, y in BatchLoader(d, 8, train=True, drop_last=False).epoch(0)] == [8, 8, 5]
    assert len(BatchLoader(d, 8, train=False, drop_last=True)) == 2
    # two ranks: disjoint shards of one permutation, equal sizes in training, full cover in evaluation
    r0, r1 = (BatchLoader(d, 4, train=True, rank=r, world_size=2, seed=1) for r in (0, 1))
    o0, o1 = r0.order(5), r1.order(5)
    assert len(o0) == len(o1) == 10 and not set(o0.tolist()) & set(o1.tolist())
    assert len(r0) == len(r1) == 2
    e0, e1 = (BatchLoader(d, 4, train=False, rank=r, world_size=2) for r in (0, 1))
    assert sorted(e0.order(0).tolist() + e1.order(0).tolist()) == list(range(21))
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(d, 4, train=True, rank=2, world_size=2)


def _windows(img: torch.Tensor, p: int):
    """Every crop (with and without flip) of img zero-padded by p."""
    c, h, w = img.shape
    padded = torch.nn.functional.pad(img, (p, p, p, p))
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            win = padded[:, dy:dy + h, dx:dx + w]
            yield (dy, dx, False), win
            yield (dy, dx, True), win.flip(2)


def test_augmentation_is_crop_of_padded_image_and_flip():
    d = _toy(n=64, h=6, w=7)
    loader = BatchLoader(d, 64, train=True, crop_padding=2, seed=0)
    order = loader.order(0)
    (x, y), = loader.epoch(0)
    assert torch.equal(y, d.labels[order])
    seen = set()
    for img, out in zip(d.images[order], x):
        matches = [key for key, win in _windows(img, 2) if torch.equal(loader.normalise(win[None])[0], out)]
        assert matches, "an augmented image is not a (flipped) window of the zero-padded image"
        seen.update(matches)
    assert {k[2] for k in seen} == {False, True} and len({k[:2] for k in seen}) > 10

    flips = torch.tensor([True, False])
    shifts = torch.tensor([[0, 0], [2, 1]])
    img = d.images[:2]
    out = crop_flip(img, shifts, flips, 1)
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:6, 0:7].flip(2))
    assert torch.equal(out[1], padded[1, :, 2:8, 1:8])


def test_augmentation_switches():
    d = _toy(n=16)
    plain = BatchLoader(d, 16, train=False)
    (ref, _), = plain.epoch(0)
    no_aug = BatchLoader(d, 16, train=True, augment=False)
    (x, _), = no_aug.epoch(0)
    assert torch.equal(x, ref[no_aug.order(0)])
    flip_only = BatchLoader(d, 16, train=True, crop_padding=0)
    (x, _), = flip_only.epoch(0)
    src = ref[flip_only.order(0)]
    flipped = torch.tensor([torch.equal(a, b.flip(2)) for a, b in zip(x, src)])
    assert all(torch.equal(a, b) or f for a, b, f in zip(x, src, flipped)) and flipped.any()
    crop_only = BatchLoader(d, 16, train=True, flip=False)
    (x, _), = crop_only.epoch(0)
    assert not torch.equal(x, ref[crop_only.order(0)])


def test_loader_dtype_and_channels_last():
    d = _toy(n=8)
    (x, y), = BatchLoader(d, 8, train=False, dtype=torch.bfloat16, channels_last=True)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    with pytest.raises(ValueError, match="floating-point"):
        BatchLoader(d, 8, train=False, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# streaming loader
# ---------------------------------------------------------------------------------------------------------


def test_stream_loader_on_png_tree(tmp_path):
    write_image_folder(tmp_path, classes=("b", "a"), per_class=3, size=(30, 20))
    write_image_folder(tmp_path, split="val", classes=("b", "a"), per_class=2, size=(30, 20))
    train = make_stream_loader(tmp_path, "train", 4, train=True, image_size=16, workers=0, seed=1)
    batches = list(train)
    assert len(batches) == 1  # 6 images, drop_last
    x, y = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = make_stream_loader(tmp_path, "train", 4, train=True, image_size=16, workers=0, seed=1)
    assert list(train.sampler) == list(again.sampler)
    train.sampler.set_epoch(1)
    assert sorted(train.sampler) == list(range(6))
    val = make_stream_loader(tmp_path, "val", 3, train=False, image_size=16, workers=0)
    ys = torch.cat([y for _, y in val])
    assert ys.tolist() == [0, 0, 1, 1]  # in order, not shuffled; classes sorted (a, b)
    shard = make_stream_loader(tmp_path, "train", 2, train=True, image_size=16, workers=0, rank=1, world_size=2)
    assert len(shard.sampler) == 3
    with pytest.raises(FileNotFoundError, match="test"):
        make_stream_loader(tmp_path, "test", 4, train=False, workers=0)
