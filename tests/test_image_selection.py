"""--max-images K names the same images in every command; old spellings of the option keep working."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from test_campaign import tiny_checkpoint  # noqa: F401  (fixture: a random resnet20 checkpoint on Fashion-MNIST)

import data
import models
from resilience.bitflip import FORMATS
from resilience.golden import EvaluatedImages, evaluated_ids
from resilience.weights.fault_list import read_fault_list
from resilience.weights.runner import run_weight_faults, transient_images, weight_golden

SPLIT = 90  # images in the stand-in test split
K = 12


class RecordingSplit(torch.utils.data.Dataset):
    """A small seeded stand-in for a test split that records which images were read."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(SPLIT, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (SPLIT,), generator=g)
        self.read: set[int] = set()

    def __len__(self) -> int:
        return SPLIT

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.read.add(int(i))
        return self.x[i], int(self.y[i])


@pytest.fixture
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_checkpoint")


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> RecordingSplit:
    """Every command's ``data.build_dataset`` returns this split."""
    fake = RecordingSplit()
    monkeypatch.setattr(data, "build_dataset", lambda *args, **kwargs: fake)
    return fake


def expected_ids() -> set[int]:
    return set(evaluated_ids(SPLIT, K).tolist())


def test_evaluated_ids_is_a_fixed_subset_not_the_first_images() -> None:
    ids = evaluated_ids(SPLIT, K)
    assert torch.equal(ids, evaluated_ids(SPLIT, K)) and len(ids.unique()) == K
    assert not torch.equal(ids, torch.arange(K))
    assert torch.equal(evaluated_ids(SPLIT, None), torch.arange(SPLIT))


def test_test_py_evaluates_the_subset_and_accepts_subset(split: RecordingSplit, checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import test as test_cli

    common = ["--checkpoint", str(checkpoint), "-j", "0", "--device", "cpu", "-b", "5"]
    assert test_cli.cli([*common, "--max-images", str(K), "--out", str(tmp_path / "new.json")]) == 0
    assert split.read == expected_ids()
    assert "note:" not in capsys.readouterr().err
    split.read.clear()
    assert test_cli.cli([*common, "--subset", str(K), "--seed", "3", "--out", str(tmp_path / "old.json")]) == 0
    assert split.read == expected_ids()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "--max-images" in notes[0]
    new, old = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("new", "old"))
    assert new["n"] == K and new == old


@pytest.mark.parametrize("option", ["--max-images", "--test-subset"])
def test_train_py_evaluates_the_subset(split: RecordingSplit, option: str) -> None:
    import train

    args = train.parse_args(["--model", "resnet20", "--dataset", "fashion-mnist", option, str(K), "--test-only",
                             "--workers", "0", "--device", "cpu"])
    args.rank, args.world_size, args.distributed = 0, 1, False
    _, test_loader, _ = train.build_loaders(args, {}, 10)
    assert sorted(test_loader.dataset.indices) == sorted(expected_ids())


def test_inject_neurons_evaluates_the_subset(split: RecordingSplit, checkpoint: Path, tmp_path: Path) -> None:
    import inject

    out = tmp_path / "fi"
    assert inject.main(["neurons", "--checkpoint", str(checkpoint), "--injections", "4", "--seed", "0",
                        "--max-images", str(K), "--golden", "all", "--layers", "^linear$", "--out", str(out),
                        "--device", "cpu", "--no-progress", "-j", "0"]) == 0
    assert split.read == expected_ids()
    assert json.loads((out / "summary.json").read_text())["golden"]["evaluated_images"] == K
    assert set(pq.read_table(out / "faults.parquet").column("image").to_pylist()) <= expected_ids()


def write_fault_list(path: Path) -> Path:
    path.write_text("Injection,Layer,TensorIndex,Bit,n_injections,masked,non_critical,critical\n"
                    '0,conv1,"(0, 0, 1, 1)",30,,,,\n1,layer2.0.conv1,"(3, 2, 0, 1)",30,,,,\n'
                    '2,linear,"(4, 7)",30,,,,\n3,linear,"(2, 1)",22,,,,\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("fault_model", ["weight-bitflip", "weight-bitflip-transient"])
def test_inject_weights_evaluates_exactly_the_subset(split: RecordingSplit, checkpoint: Path, tmp_path: Path,
                                                     fault_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    import inject

    fault_list = write_fault_list(tmp_path / "fl.csv")
    out = tmp_path / "wf"
    argv = ["weights", "--fault-model", fault_model, "--fault-list", str(fault_list), "--checkpoint", str(checkpoint),
            "--max-images", str(K), "--out", str(out), "--device", "cpu", "--no-progress", "-j", "0", "-b", "8",
            "--chunk-images", "8"]
    assert inject.main(argv) == 0
    assert split.read == expected_ids()
    table = pd.read_csv(out / "faults.csv")
    if fault_model == "weight-bitflip":
        # the same counts as a run handed exactly those images by another route
        model, _ = models.load_checkpoint(checkpoint)
        model.eval()
        ids = evaluated_ids(SPLIT, K)
        images = EvaluatedImages.from_tensors(split.x[ids], split.y[ids])
        golden = weight_golden(model, images, FORMATS["fp32"], batch_size=8, chunk_images=8)
        faults = read_fault_list(fault_list).faults
        direct = run_weight_faults(model, faults, images, golden, chunk_images=8, batch_size=8)
        assert read_fault_list(out / "fault_list.csv").counts.tolist() == direct.outcomes.counts().tolist()
        assert (table["n_injections"] == K).all()
    else:
        hit = transient_images(len(table), K, 0, list(range(len(table))))  # positions within the subset
        assert table["image"].tolist() == evaluated_ids(SPLIT, K)[hit].tolist()  # written as split ids
        # a folder written when --max-images meant the first K images is not taken for this run
        for name in ("run.json", "summary.json"):
            record = json.loads((out / name).read_text())
            del record["config"]["image_subset"]
            (out / name).write_text(json.dumps(record))
        assert inject.main(argv) == 2
        assert "image_subset" in capsys.readouterr().err


@pytest.mark.parametrize("memory_limit", [0, 1 << 20])
def test_chunks_and_chunked_batches_follow_id_order(memory_limit: int) -> None:
    x, y = torch.randn(12, 1, 4, 4), torch.arange(12) % 3
    ids = torch.tensor([0, 2, 3, 5, 8, 11])
    images = EvaluatedImages(torch.utils.data.TensorDataset(x, y), ids, memory_limit=memory_limit)
    assert len(images) == 6
    chunk_x, chunk_y = images.chunk(1, 4)
    assert torch.equal(chunk_x, x[[2, 3, 5]]) and torch.equal(chunk_y, y[[2, 3, 5]])
    batches = list(images.batches(2, chunk_size=3))  # a weight-fault run's composition: 2+1 per chunk of 3
    assert [len(b) for b, _ in batches] == [2, 1, 2, 1]
    assert torch.equal(torch.cat([b for b, _ in batches]), x[ids])
