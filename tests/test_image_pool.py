"""The image pool (--image-pool K): a seeded pool recorded with the campaign, faults only on its images,
K = all gives today's files byte for byte, resume and merge keep the pool, and the between-image
variance vanishes with K = N and grows as K shrinks on a population with a known image effect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_campaign import FINAL, config, run_all, tiny_setup

from resilience import stratified as st
from resilience.bitflip import FORMATS
from resilience.campaign import CampaignError, parse_shard
from resilience.image_pool import (
    ImagePool,
    between_variance,
    draw_pool,
    pool_size_arg,
    stratified_layer,
    uniform_layer_set,
)
from resilience.improvement_ci import layer_set
from resilience.runner import StratifiedSampling, merge

POOL = 6


def faults_of(folder: Path) -> pa.Table:
    return pq.read_table(folder / "faults.parquet")


def record_of(folder: Path) -> dict:
    return json.loads((folder / "campaign.json").read_text())


def test_same_seed_and_k_give_the_same_pool_and_faults_on_pool_images_only(tmp_path: Path) -> None:
    run_all(tmp_path / "a", config(), image_pool=POOL).assemble()
    run_all(tmp_path / "b", config(), image_pool=POOL).assemble()
    assert faults_of(tmp_path / "a").equals(faults_of(tmp_path / "b"))
    golden_set = tiny_setup()[2].golden_set("correct")
    pool = record_of(tmp_path / "a")["image_pool"]
    assert pool["images"] == draw_pool(3, golden_set, POOL).tolist() and pool["population"] == len(golden_set)
    assert set(pool["images"]) < set(golden_set.tolist()) and len(set(pool["images"])) == POOL
    images = set(faults_of(tmp_path / "a").column("image").to_pylist())
    assert images <= set(pool["images"])
    other = draw_pool(4, golden_set, POOL)
    assert other.tolist() != pool["images"], "another seed draws another pool"
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (summary["image_pool"]["size"], summary["image_pool"]["population"]) == (POOL, len(golden_set))
    assert {"ci_low", "ci_high", "between_image_se"} <= set(summary["network"])
    note = (tmp_path / "a" / "layers.md").read_text().splitlines()[-1]
    assert note.startswith(f"Image pool: faults hit {POOL} of the {len(golden_set)} golden images")


def test_a_pool_of_all_images_is_todays_campaign_byte_for_byte(tmp_path: Path) -> None:
    run_all(tmp_path / "plain", config()).assemble()
    run_all(tmp_path / "all", config(), image_pool=10_000).assemble()
    for name in (*FINAL, "campaign.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "all" / name).read_bytes(), name


def test_resume_shards_and_merge_keep_the_pool(tmp_path: Path) -> None:
    run_all(tmp_path / "full", config(), image_pool=POOL).assemble()
    run_all(tmp_path / "s0", config(), image_pool=POOL, shard=parse_shard("0/2"))
    run_all(tmp_path / "s1", config(), image_pool=POOL, shard=(1, 2))
    merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    for name in FINAL:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes(), name
    with pytest.raises(CampaignError, match="image_pool differs"):
        run_all(tmp_path / "full", config(), image_pool=POOL + 1)
    with pytest.raises(CampaignError, match="image_pool differs"):
        run_all(tmp_path / "full", config())
    run_all(tmp_path / "other", config(), image_pool=POOL + 1)
    with pytest.raises(CampaignError, match="different campaign"):
        merge([tmp_path / "s0", tmp_path / "other"], tmp_path / "mixed")


def test_pooled_tables_show_the_intervals_with_the_between_image_variance(tmp_path: Path) -> None:
    run_all(tmp_path / "p", config(injections=48, batch_size=12, chunk_size=24), image_pool=POOL).assemble()
    layers = layer_set(tmp_path / "p")
    assert layers.pool is not None and layers.pool.size == POOL
    rows = [line.split(",") for line in (tmp_path / "p" / "layers.csv").read_text().splitlines()]
    head = rows[0]
    for row in rows[1:]:
        name = row[head.index("layer")]
        low, high = layers.layer(name).interval(0.99)
        assert float(row[head.index("ci_low")]) == pytest.approx(low, rel=1e-12, abs=1e-300)
        assert float(row[head.index("ci_high")]) == pytest.approx(high, rel=1e-12, abs=1e-300)
        assert layers.layer(name).variance >= layers.within[name].variance


def test_stratified_sampling_composes_with_the_pool(tmp_path: Path) -> None:
    model, x, golden, source = tiny_setup()
    from resilience.layers import discover_layers
    from resilience.runner import execute

    adaptive = st.AdaptiveConfig(target_rel=None, max_injections=160, pilot=2, min_round=32)
    cfg = config(batch_size=16, chunk_size=32)
    opened, _ = execute(tmp_path / "s", cfg, model, discover_layers(model, x[:1]), golden, source,
                        sampling=StratifiedSampling(adaptive), progress=False, image_pool=POOL)
    opened.assemble()
    pool = record_of(tmp_path / "s")["image_pool"]["images"]
    faults = faults_of(tmp_path / "s")
    assert set(faults.column("image").to_pylist()) <= set(pool)
    strata = [s.name for s in st.make_strata(FORMATS["fp32"], "bit")]
    for name, result in opened.results.items():
        table = faults.filter(pa.compute.equal(faults.column("layer"), name))
        within, _ = stratified_layer(ImagePool.from_record(record_of(tmp_path / "s")), table, strata)
        # the fault records rebuild the estimate the stratified run made given the pool
        assert within.value == pytest.approx(result.loss.value, rel=1e-9)
        assert within.variance == pytest.approx(result.loss.variance, rel=1e-9)
    assert "between_image_se" in (tmp_path / "s" / "layers.csv").read_text().splitlines()[0]


def synthetic_layer(rng: np.random.Generator, factor: np.ndarray, pool: ImagePool, n: int,
                    name: str = "l") -> pa.Table:
    """n faults on pool images: ΔLoss = image factor × exponential noise, bit uniform over 32."""
    image = pool.images[rng.integers(0, pool.size, n)]
    return pa.table({"layer": [name] * n, "delta_loss": factor[image] * rng.exponential(1.0, n),
                     "finite": np.ones(n, dtype=bool), "bit": rng.integers(0, 32, n), "image": image})


def mean_between(factor: np.ndarray, k: int, seeds: int, n: int = 2048) -> tuple[float, float]:
    """(mean estimated between-image variance over seeds, the exact (1 − K/N)·S²/K of the design)."""
    population = len(factor)
    estimates = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        pool = ImagePool(np.sort(rng.choice(population, k, replace=False)), population)
        layers = uniform_layer_set(synthetic_layer(rng, factor, pool, n), 32, pool)
        estimates.append(between_variance(pool, [layers.effects["l"]], [1.0]))
    return float(np.mean(estimates)), (1 - k / population) * factor.var(ddof=1) / k


def test_between_image_variance_is_zero_for_all_images_and_grows_as_the_pool_shrinks() -> None:
    factor = np.random.default_rng(7).lognormal(0.0, 0.8, 400)
    assert mean_between(factor, 400, 3)[0] == 0.0
    small, small_exact = mean_between(factor, 16, 60)
    large, large_exact = mean_between(factor, 128, 60)
    assert small > large > 0
    # unbiased up to O(1/n): the mean over 60 seeds is within a third of the exact value
    assert small == pytest.approx(small_exact, rel=0.35) and large == pytest.approx(large_exact, rel=0.35)


def test_network_level_counts_the_shared_pool_once() -> None:
    rng = np.random.default_rng(3)
    factor = rng.lognormal(0.0, 0.8, 400)
    pool = ImagePool(np.sort(rng.choice(400, 32, replace=False)), 400)
    table = pa.concat_tables([synthetic_layer(rng, factor, pool, 4096, name) for name in ("a", "b")])
    layers = uniform_layer_set(table, 32, pool)
    own = [between_variance(pool, [layers.effects[n]], [1.0]) for n in ("a", "b")]
    shared = between_variance(pool, [layers.effects["a"], layers.effects["b"]], [0.5, 0.5])
    # both layers carry the same image effect: the mean over them keeps it whole (independent layers would
    # give a quarter of the sum)
    assert shared > 0.35 * sum(own)
    network = layers.mean()
    assert network.variance == pytest.approx(layers.given_pool().mean().variance + shared, rel=1e-12)


@pytest.mark.parametrize(("text", "message"), [("1", "at least 2"), ("0", "at least 1"), ("many", "not an integer")])
def test_bad_pool_sizes_are_refused(text: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        pool_size_arg(text)
    import inject

    with pytest.raises(SystemExit) as exc:
        inject.main(["neurons", "--checkpoint", "c.pth", "--out", "x", "--image-pool", text])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "--image-pool" in errors[0] and message in errors[0]


def test_draw_pool_is_a_subset_in_id_order() -> None:
    golden_set = torch.arange(0, 300, 3)
    pool = draw_pool(11, golden_set, 40)
    assert torch.equal(pool, draw_pool(11, golden_set, 40))
    assert torch.all(pool[1:] > pool[:-1]) and set(pool.tolist()) <= set(golden_set.tolist())


def test_bench_simulation_runs_and_reports_coverage(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_image_pool

    out = tmp_path / "sim.json"
    assert bench_image_pool.main(["--simulate", "--sim-seeds", "4", "--sim-images", "200", "--pools", "16", "all",
                                  "--injections", "256", "--json", str(out)]) == 0
    pools = json.loads(out.read_text())["pools"]
    assert set(pools) == {"16", "200"}
    assert all(0 <= row["layer_coverage"] <= 1 for row in pools.values())
    assert pools["200"]["between_share"] == 0 and pools["16"]["between_share"] > 0


def test_bench_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_image_pool

    from cli_shell import run_cli

    argv = ["--checkpoint", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "out")]
    assert run_cli(lambda: bench_image_pool.main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint not found: {tmp_path / 'absent.pth'}"]
    assert not (tmp_path / "out").exists()
