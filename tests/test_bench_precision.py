"""scripts/bench_precision.py on a small random-weight model: both sides reach the width, the reference
by doubling its uniform lists, and bad input is one error line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_precision  # noqa: E402

from cli_shell import run_cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pool", [[], ["--image-pool", "10"]], ids=["all-images", "pool"])
def test_both_sides_reach_the_width(tmp_path, pool: list[str]) -> None:
    out = tmp_path / "p.json"
    argv = ["--model", "resnet20", "--num-classes", "10", "--input-size", "8", "--images", "12", "--layers",
            r"^layer3\.2\.conv[12]$", "--width", "0.6", "--start", "32", "--pilot", "2", "--strata", "field",
            "--threads", "1", "--json", str(out), *pool]
    assert bench_precision.main(argv) == 0
    figures = json.loads(out.read_text())
    ref, fast = figures["reference"], figures["fast"]
    per_layer = [s["per_layer"] for s in ref["steps"]]
    assert per_layer == [32 * 2**i for i in range(len(per_layer))]
    assert ref["rel_half_width"] <= 0.6 and all(s["rel_half_width"] > 0.6 for s in ref["steps"][:-1])
    assert ref["ci_low"] <= ref["estimate"] <= ref["ci_high"]
    assert fast["reached"] and fast["rel_half_width"] <= 0.6
    assert figures["ratio"] == pytest.approx(ref["seconds"] / fast["seconds"])
    if pool:  # the stratified side's faults all land on the pool's 10 images
        assert fast["faults_per_image"] == pytest.approx(fast["injections"] / 10)


@pytest.mark.parametrize("extra", [["--width", "1.5"], ["--start", "0"], ["--model", "nosuchnet"]])
def test_bad_input_is_one_error_line(extra, capsys) -> None:
    assert run_cli(lambda: bench_precision.main(["--model", "resnet20", *extra])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
