"""Hostile and careless input to every entry point: each case must end with exit code 2 and exactly one
``error:`` line naming the problem, and must leave the files it was pointed at as they were."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from reference_assets import require_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import analyze  # noqa: E402
import inject  # noqa: E402
import report as report_cli  # noqa: E402
import test as test_cli  # noqa: E402
import train  # noqa: E402
import visualize  # noqa: E402
from resilience.weights import cli as weights  # noqa: E402
from text_features import build as features_build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = REPO / "configs" / "fashion_mnist" / "resnet20.yaml"
FL_HEADER = "Injection,Layer,TensorIndex,Bit\n"


def run(entry: Callable[[Sequence[str]], int], argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run an entry point in-process; assert exit code 2 and one ``error:`` line, and return that line."""
    try:
        code = entry(list(argv))
    except SystemExit as exc:  # argparse refuses a bad value after printing its usage
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that nothing was overwritten or left behind)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny baseline and text checkpoints, a fault list, and two finished campaigns (seeds 3 and 4)."""
    data = require_fashion_mnist()
    models = pytest.importorskip("models")
    root = tmp_path_factory.mktemp("adversarial")
    torch.manual_seed(0)
    preset = data.eval_preset("fashion-mnist", "resnet20", in_chans=1)
    found = {}
    for head in ("linear", "text"):
        model = models.build_model("resnet20", 10, head=head, embed_dim=8, in_chans=1)
        meta = {"model": "resnet20", "num_classes": 10, "head": head, "embed_dim": 8 if head == "text" else None,
                "in_chans": 1, "small_input": False, "dataset": "fashion-mnist", "preset": preset,
                "text_features": None}
        found[head] = models.save_checkpoint(root / f"{head}.pth", model, meta)
    found["fault_list"] = root / "faults.csv"
    found["fault_list"].write_text(FL_HEADER + "0,conv1,\"(0, 0, 0, 0)\",30\n1,conv1,\"(1, 0, 0, 0)\",31\n"
                                   "2,linear,\"(0, 0)\",30\n")
    for sampling in SAMPLING:
        for seed in (3, 4):
            out = found[f"{sampling}{seed}"] = root / f"fi_{sampling}{seed}"
            assert inject.main(campaign_argv(found["linear"], out, sampling, "--seed", str(seed))) == 0
    return found


SAMPLING = {"uniform": ["--injections", "8"],
            "stratified": ["--sampling", "stratified", "--max-injections", "128", "--pilot", "2", "--target-ci", "10"]}


def campaign_argv(checkpoint: Path, out: Path, sampling: str = "uniform", *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), *SAMPLING[sampling], "--out", str(out), "--max-images", "24",
            "--golden", "all", "--layers", "^(conv1|linear)$", "--batch-size", "4", "--chunk-size", "4",
            "--device", "cpu", "--no-progress", "-j", "0", *extra]


def copy_campaign(src: Path, dst: Path) -> Path:
    """A copy of a finished campaign without its final files (so a rerun resumes it)."""
    shutil.copytree(src, dst)
    for name in ("summary.json", "faults.parquet", "layers.csv", "layers.md"):
        (dst / name).unlink()
    return dst


# ------------------------------------------------------------------------------ data loss, silently wrong


def test_train_refuses_a_folder_holding_another_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.yaml").write_text("model: resnet20\nlr: 0.1\nepochs: 90\n")
    (out / "checkpoint.pth").write_bytes(b"the finished run")
    before = snapshot(out)
    line = run(train.cli, ["-c", str(RECIPE), "--epochs", "1", "--lr", "5", "--output-dir", str(out),
                           "--device", "cpu", "--workers", "0"], capsys)
    assert "lr: 0.1 -> 5.0" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(out) == before


def test_weight_run_refuses_other_arguments_in_its_folder(assets: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wf"
    argv = ["--fault-model", "weight-bitflip", "--fault-list", str(assets["fault_list"]), "--checkpoint",
            str(assets["linear"]), "--max-images", "8", "--out", str(out), "--no-progress", "-j", "0",
            "--device", "cpu"]
    assert inject.main([*argv, "--limit-faults", "3"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    for other in (["--limit-faults", "2"], ["--limit-faults", "3", "--fault-model", "weight-stuck1"]):
        line = run(inject.main, [*argv, *other], capsys)
        assert str(out) in line and "other arguments" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("command", ["resume", "merge"])
def test_foreign_part_is_refused(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 command: str, sampling: str) -> None:
    out = copy_campaign(assets[f"{sampling}4"], tmp_path / "fi")
    part = sorted((out / "parts").glob("*.parquet"))[0]
    shutil.copyfile(assets[f"{sampling}3"] / "parts" / part.name, part)
    if command == "merge":
        argv = ["merge", str(out), "--out", str(tmp_path / "merged")]
    else:
        argv = campaign_argv(assets["linear"], out, sampling, "--seed", "4")
    line = run(inject.main, argv, capsys)
    assert str(part) in line and "another campaign" in line
    assert not (out / "summary.json").exists() and not (tmp_path / "merged" / "summary.json").exists()


@pytest.mark.parametrize(("command", "damage"), [("resume", "truncate"), ("merge", "truncate"),
                                                 ("resume", "flip"), ("merge", "flip")])
def test_damaged_part_is_refused(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 command: str, damage: str) -> None:
    out = copy_campaign(assets["uniform4"], tmp_path / "fi")
    part = sorted((out / "parts").glob("*.parquet"))[-1]
    raw = bytearray(part.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 3] ^= 0xFF
    part.write_bytes(bytes(raw))
    argv = ["merge", str(out)] if command == "merge" else campaign_argv(assets["linear"], out, "uniform", "--seed", "4")
    line = run(inject.main, argv, capsys)
    assert str(part) in line and "damaged" in line and "delete it" in line
    assert not (out / "summary.json").exists()


def test_limit_faults_reads_only_the_rows_it_runs(tmp_path: Path) -> None:
    from resilience.weights.fault_list import FaultListError, read_fault_list

    path = tmp_path / "fl.csv"
    path.write_text(FL_HEADER + "0,conv1,\"(0, 0, 0, 0)\",30\n1,conv1,\"(1, 0, 0, 0)\",31\nnot,a,row\n")
    assert [f.bit for f in read_fault_list(path, limit=2).faults] == [30, 31]
    with pytest.raises(FaultListError, match="line 4"):
        read_fault_list(path)


def test_an_unwritable_or_damaged_profile_cache_keeps_the_profile(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from resilience.profile import cached_profile

    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    assert cached_profile(blocker / "cache", {"k": 1}, lambda: {"conv1": 2.0}) == {"conv1": 2.0}
    assert "not cached" in capsys.readouterr().err
    cache = tmp_path / "cache"
    assert cached_profile(cache, {"k": 1}, lambda: {"conv1": 2.0}) == {"conv1": 2.0}
    (entry,) = cache.iterdir()
    entry.write_text("{damaged")
    assert cached_profile(cache, {"k": 1}, lambda: {"conv1": 3.0}) == {"conv1": 3.0}


def write_result(folder: Path, layers: Sequence[str], last: Sequence[str], *, images: int = 200,
                 stratified: dict | None = None) -> Path:
    """A finished campaign's summary.json and layers.csv with the given layers (ΔLoss 1 each)."""
    folder.mkdir(parents=True)
    rows = ["layer,order,kind,neurons,n,non_finite,mismatches,mean_delta_loss,mismatch_rate"]
    rows += [f"{name},{i},conv,10,8,0,1,1.0,0.125" for i, name in enumerate(layers)]
    (folder / "layers.csv").write_text("\n".join(rows) + "\n")
    summary = {"network": {"delta_loss": 1.0}, "model": "resnet20", "dataset": "fashion-mnist", "split": "test",
               "format": "fp32", "clamp": "none", "last_layers": list(last), "fused_text_head": False,
               "fault_model": "neuron-bitflip-transient", "stratified": stratified,
               "config": {"max_images": images, "golden": "correct", "injections": 8},
               "golden": {"accuracy": 0.9, "mean_top2diff": 50.0, "evaluated_images": images},
               "n_per_layer": dict.fromkeys(layers, 8)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.mark.parametrize(("text_kw", "message"), [
    ({"images": 50}, "differ in images"),
    ({"stratified": {"grouping": "bit"}}, "differ in sampling"),
    ({"layers": ["backbone.conv1", "backbone.linear", "head"]}, "inject different layers"),
])
def test_compare_refuses_campaigns_that_measure_different_things(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text_kw: dict, message: str) -> None:
    base = write_result(tmp_path / "base", ["conv1", "layer1.0.conv1", "linear"], ["linear"])
    layers = text_kw.pop("layers", ["backbone.conv1", "backbone.layer1.0.conv1", "backbone.linear", "head"])
    text = write_result(tmp_path / "text", layers, ["backbone.linear", "head"], **text_kw)
    line = run(report_cli.main, ["compare", str(base), str(text), "--out", str(tmp_path / "o")], capsys)
    assert message in line
    assert not (tmp_path / "o").exists()


def test_compare_of_a_common_layer_subset(tmp_path: Path) -> None:
    base = write_result(tmp_path / "base", ["conv1", "layer1.0.conv1", "linear"], ["linear"])
    text = write_result(tmp_path / "text", ["backbone.conv1", "backbone.linear", "head"], ["backbone.linear", "head"])
    assert report_cli.main(["compare", str(base), str(text), "--out", str(tmp_path / "o"), "--layers", "^conv1$"]) == 0
    assert (tmp_path / "o" / "table1.csv").is_file()


@pytest.mark.parametrize("command", ["value-ranges", "top2diff-sweep"])
def test_analyses_refuse_swapped_checkpoints(assets: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], command: str) -> None:
    line = run(analyze.main, [command, "--baseline", str(assets["text"]), "--text", str(assets["linear"]),
                              "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert "--baseline" in line and "needs a linear head" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- unbounded requests


@pytest.mark.parametrize("extra", [
    ["--injections", "100000000000"],
    ["--sampling", "stratified", "--pilot", "10000000000", "--max-injections", "400000000000"],
])
def test_unbounded_fault_plans_are_refused_up_front(assets: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    out = tmp_path / "fi"
    line = run(inject.main, ["--checkpoint", str(assets["linear"]), "--out", str(out), *extra], capsys)
    assert "GiB" in line and "available" in line
    assert not out.exists()


# --------------------------------------------------------------------------- bad values, one line each


def bad_bytes(tmp_path: Path, name: str, text: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text)
    return str(path)


CASES: list[tuple[str, Callable[[Sequence[str]], int], Callable[[dict[str, Path], Path], list[str]], str]] = [
    ("test --subset -5", test_cli.cli, lambda a, t: ["--checkpoint", str(a["linear"]), "--subset", "-5"],
     "--subset: must be at least 1"),
    ("test --subset 0", test_cli.cli, lambda a, t: ["--checkpoint", str(a["linear"]), "--subset", "0"],
     "--subset: must be at least 1"),
    ("test --out DIR", test_cli.cli, lambda a, t: ["--checkpoint", str(a["linear"]), "--out", str(t)], "is a folder"),
    ("test checkpoint is a folder", test_cli.cli, lambda a, t: ["--checkpoint", str(t)], "checkpoint is a folder"),
    ("inject --layers (([", inject.main, lambda a, t: campaign_argv(a["linear"], t / "o", "uniform", "--layers", "(["),
     "not a regular expression"),
    ("inject --device tpu", inject.main, lambda a, t: campaign_argv(a["linear"], t / "o", "uniform", "--device", "tpu"),
     "unknown --device 'tpu'"),
    ("inject --seed -1", inject.main, lambda a, t: campaign_argv(a["linear"], t / "o", "uniform", "--seed", "-1"),
     "--seed: must be at least 0"),
    ("inject --out is a file", inject.main, lambda a, t: campaign_argv(a["linear"], a["fault_list"]),
     "faults.csv"),
    ("inject --fault-list without --fault-model", inject.main,
     lambda a, t: ["--fault-list", str(a["fault_list"]), "--checkpoint", str(a["linear"]), "--out", str(t / "o")],
     "--fault-list needs a weight fault model"),
    ("weight run: fault list not UTF-8", inject.main,
     lambda a, t: ["--fault-model", "weight-bitflip", "--checkpoint", str(a["linear"]), "--out", str(t / "o"),
                   "--fault-list", bad_bytes(t, "fl.csv", FL_HEADER.encode() + b"0,conv\xff1,\"(0, 0, 0, 0)\",3\n")],
     "not UTF-8"),
    ("weight run: header-only fault list", inject.main,
     lambda a, t: ["--fault-model", "weight-bitflip", "--checkpoint", str(a["linear"]), "--out", str(t / "o"),
                   "--fault-list", bad_bytes(t, "fl.csv", FL_HEADER.encode())], "no fault rows"),
    ("weight run: Injection -5", inject.main,
     lambda a, t: ["--fault-model", "weight-bitflip", "--checkpoint", str(a["linear"]), "--out", str(t / "o"),
                   "--fault-list", bad_bytes(t, "fl.csv", FL_HEADER.encode() + b"-5,conv1,\"(0, 0, 0, 0)\",3\n")],
     "Injection -5 is negative"),
    ("weight run: --seed -1", inject.main,
     lambda a, t: ["--fault-model", "weight-bitflip-transient", "--checkpoint", str(a["linear"]),
                   "--fault-list", str(a["fault_list"]), "--out", str(t / "o"), "--seed", "-1"],
     "--seed: must be at least 0"),
    ("generate --seed -1", weights.main,
     lambda a, t: ["generate", "--model", "resnet20", "--num-classes", "10", "--out", str(t / "fl.csv"), "--seed", "-1"],
     "--seed: must be at least 0"),
    ("generate --out under a file", weights.main,
     lambda a, t: ["generate", "--checkpoint", str(a["linear"]), "--out", str(a["fault_list"] / "fl.csv")],
     "faults.csv"),
    ("visualize --seed -1", visualize.cli,
     lambda a, t: ["--baseline", str(a["linear"]), "--text", str(a["text"]), "--indices", "0", "--flips", "2",
                   "--seed", "-1", "--out", str(t / "cam.png")], "--seed: must be at least 0"),
    ("visualize fault list not UTF-8", visualize.cli,
     lambda a, t: ["--baseline", str(a["linear"]), "--text", str(a["text"]), "--indices", "0", "--injection", "0",
                   "--fault-list", bad_bytes(t, "fl.csv", b"Injection,Layer,TensorIndex,Bit\n0,c\xfe,\"[0]\",1\n"),
                   "--out", str(t / "cam.png"), "--device", "cpu"], "not UTF-8"),
    ("analyze --batch-size 0", analyze.main,
     lambda a, t: ["value-ranges", "--baseline", str(a["linear"]), "--text", str(a["text"]), "--out", str(t / "o"),
                   "--batch-size", "0"], "--batch-size: must be at least 1"),
    ("analyze --deltas nan", analyze.main,
     lambda a, t: ["top2diff-sweep", "--baseline", str(a["linear"]), "--text", str(a["text"]), "--out", str(t / "o"),
                   "--deltas", "1", "nan"], "--deltas must be increasing"),
    ("ablation --train-args with an open quote", analyze.main,
     lambda a, t: ["ablation", "-c", str(RECIPE), "--dataset", "fashion-mnist", "--out", str(t / "o"),
                   "--train-args", "'x", "--dry-run"], "--train-args"),
    ("features --class-names not UTF-8", features_build.main,
     lambda a, t: ["--class-names", bad_bytes(t, "names.txt", b"shirt\n\xffboot\n"), "--variant", "random",
                   "--out", str(t / "f.pth")], "not UTF-8"),
    ("features --embed-dim 0", features_build.main,
     lambda a, t: ["--dataset", "fashion-mnist", "--variant", "random", "--embed-dim", "0", "--out", str(t / "f.pth")],
     "--embed-dim: must be at least 1"),
    ("train --seed -1", train.cli,
     lambda a, t: ["-c", str(RECIPE), "--seed", "-1", "--output-dir", str(t / "o")], "--seed: must be at least 0"),
]


@pytest.mark.parametrize(("entry", "argv", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_error_line(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     entry: Callable[[Sequence[str]], int],
                                     argv: Callable[[dict[str, Path], Path], list[str]], message: str) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    line = run(entry, argv(assets, folder), capsys)
    assert message in line
    assert not list(folder.rglob(".*.tmp*")), "a temporary file was left behind"
    assert not (folder / "o").exists()
