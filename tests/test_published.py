"""Published weights: loaded by name from the package (no network), checked by hash and by fingerprint."""

import json
import os
from pathlib import Path

import pytest
import torch

import skipnet
from skipnet.published import fingerprint, publish, sha256
from skipnet.train import CheckpointError, load_config, train
from tests.test_train import DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "sp"
    cfg = load_config(None, ["train.stage=sp", "model.name=cifar_resnet8", "data.batch_size=16", "train.epochs=0.5",
                             "train.eval_every=0", "train.channels_last=false"])
    train(cfg, run, data=DATA, progress=False)
    return run


def test_published_weights_load_by_name_and_verify_their_hash(tmp_path, finished_run):
    record = {"title": "toy SkipNet-8", "data": "toy", "accuracy": 50.0}
    path = publish(finished_run, "toy8", record, root=tmp_path)
    assert skipnet.list_pretrained(root=tmp_path) == ["toy8"]
    model = skipnet.pretrained("toy8", root=tmp_path)
    assert not model.training and model.config.depth == 8
    info = skipnet.pretrained_info("toy8", root=tmp_path)
    assert info["sha256"] == sha256(path) and info["accuracy"] == 50.0
    assert fingerprint(model, info["tau"], (12, 12)) != info["fingerprint"]  # recorded at 32x32: the size matters
    with pytest.raises(ValueError, match="no published weights named 'nope'; known: toy8"):
        skipnet.pretrained("nope", root=tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        skipnet.pretrained("toy8", root=tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        skipnet.pretrained("toy8", root=tmp_path)


def test_only_finished_runs_are_published(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, ["model.name=cifar_resnet8", "data.batch_size=16", "train.epochs=1",
                             "train.eval_every=0", "train.channels_last=false"])
    train(cfg, run, data=DATA, progress=False, max_steps=1)
    with pytest.raises(CheckpointError, match="did not finish"):
        publish(run, "half", {}, root=tmp_path / "w")


@pytest.mark.parametrize("name", skipnet.list_pretrained())
def test_shipped_weights_compute_what_they_computed_when_published(name):
    model = skipnet.pretrained(name)
    info = skipnet.pretrained_info(name)
    got = fingerprint(model, info["tau"])
    assert got["decisions"] == info["fingerprint"]["decisions"]
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(info["fingerprint"]["logits"]),
                               atol=2e-3, rtol=1e-3)
    hub = torch.hub.load(str(REPO), name, source="local", trust_repo=True)
    assert sha256(skipnet.published.weights_dir() / info["file"]) == info["sha256"]
    for a, b in zip(hub.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


CIFAR = Path(os.environ.get("SKIPNET_CIFAR10", REPO.parent / "shared" / "datasets" / "cifar10-jpeg"))


@pytest.mark.parametrize("name", [n for n in skipnet.list_pretrained() if "cifar10" in n])
def test_shipped_cifar10_weights_reach_their_recorded_accuracy_on_a_slice(name):
    if not (CIFAR / "test.zip").is_file():
        pytest.skip(f"CIFAR-10 JPEG copy not at {CIFAR} (set SKIPNET_CIFAR10)")
    from skipnet.data import BatchLoader, load_dataset
    from skipnet.train import evaluate

    info = skipnet.pretrained_info(name)
    test = load_dataset("imagefolder", str(CIFAR), "test")
    sl = info["slice"]  # every k-th test image: all classes
    test = test.subset(torch.arange(sl["start"], len(test), sl["step"]))
    result = evaluate(skipnet.pretrained(name), BatchLoader(test, 500, train=False), tau=info["tau"], progress=False)
    assert result["images"] == sl["images"]
    assert result["accuracy"] == pytest.approx(sl["accuracy"], abs=0.3)
    assert result["mac_reduction"] == pytest.approx(sl["mac_reduction"], abs=0.5)
    assert json.dumps(info)  # the record is plain data
