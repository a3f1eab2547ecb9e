"""The image pool (``inject.py neurons --image-pool K``): two-stage sampling of the golden set.

A campaign with a pool first draws K of the N golden images (without replacement, from a generator seeded
by the campaign seed alone), then every layer draws its fault sites with the image uniform over the pool,
whatever the sampling (uniform or stratified). Given the pool, each layer's estimate and its Moments
(:mod:`resilience.intervals`) are those of the unpooled design over a golden set of K images; their mean
over pools is the all-image mean, so the estimate stays unbiased, and its variance gains the variance of
the pool's own mean, the *between-image component* (docs/image_pool.md):

    Var(θ̂) = E[Var(θ̂ | pool)] + (1 − K/N) · S²_img / K,

S²_img being the variance of the per-image means of the linearised estimate over the golden set. It is
estimated from pairs of faults that hit the same pool image (their products are unbiased for the image
effect, whatever the heavy tail of single faults), so layers that share the pool also give the covariance
of their image effects, which the network-level mean over layers needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cli_shell import positive_int
from resilience.intervals import Moments, ratio_moments, uniform_layer_moments
from resilience.sampling import stable_seed

POOL_STREAM = "<image-pool>"  # not a module name: layer streams can never collide with it
MIN_POOL = 2  # the between-image variance needs two images


def check_pool_size(size: int | None) -> None:
    """Raise ValueError unless ``size`` is None (all images) or at least ``MIN_POOL``."""
    if size is not None and size < MIN_POOL:
        raise ValueError(f"--image-pool must be at least {MIN_POOL} images (the between-image variance needs two), "
                         f"got {size}")


def pool_size_arg(text: str) -> int:
    """argparse type of ``--image-pool``: an integer >= ``MIN_POOL``."""
    value = positive_int(text)
    try:
        check_pool_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--image-pool ")) from None
    return value


def draw_pool(seed: int, golden_set: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` images of ``golden_set`` drawn without replacement from the campaign seed alone, in id order."""
    check_pool_size(size)
    generator = torch.Generator().manual_seed(stable_seed(seed, POOL_STREAM))
    chosen = torch.randperm(len(golden_set), generator=generator)[:size]
    return golden_set[chosen.sort().values]


def pool_entries(seed: int, golden_set: torch.Tensor, size: int | None) -> dict[str, Any]:
    """What campaign.json records of the pool: nothing when it holds every golden image (today's campaigns)."""
    check_pool_size(size)
    if size is None or size >= len(golden_set):
        return {}
    images = draw_pool(seed, golden_set, size)
    return {"image_pool": {"size": size, "population": len(golden_set), "images": images.tolist()}}


def campaign_images(record: dict[str, Any], golden_set: torch.Tensor) -> torch.Tensor:
    """The images a campaign's faults hit: its recorded pool, else the whole ``golden_set``."""
    entry = record.get("image_pool")
    return golden_set if entry is None else torch.tensor(entry["images"], dtype=torch.int64)


def pool_matches(record: dict[str, Any], size: int | None) -> bool:
    """Whether a stored campaign record was run with ``--image-pool size``."""
    entry = record.get("image_pool")
    if entry is None:
        return size is None or size >= record["golden"]["golden_set_size"]
    return entry["size"] == size


POOL_INTERVALS = ("the ΔLoss intervals (per layer and network) add the between-image variance (1 − K/N)·S²/K of the "
                  "pool mean to the variance given the pool; mismatch intervals are given the pool (docs/image_pool.md)")


def pool_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The pool's entry of summary.json (its size, the golden-set size, what the intervals hold), or nothing."""
    entry = record.get("image_pool")
    if entry is None:
        return {}
    return {"image_pool": {"size": entry["size"], "population": entry["population"], "intervals": POOL_INTERVALS}}


def pool_note(record: dict[str, Any], network: dict[str, Any]) -> str:
    """The lines layers.md adds for a pooled campaign (nothing otherwise)."""
    entry = record.get("image_pool")
    if entry is None:
        return ""
    interval = (f"; network-level 99% CI [{network['ci_low']:.4g}, {network['ci_high']:.4g}], between-image SE "
                f"{network['between_image_se']:.3g}" if "ci_low" in network else "")
    return (f"\nImage pool: faults hit {entry['size']} of the {entry['population']} golden images (two-stage "
            f"sampling); the ΔLoss CIs include the between-image variance of the pool mean{interval} "
            "(docs/image_pool.md).\n")


@dataclass(frozen=True)
class ImagePool:
    """The K pool images (ids, ascending) out of a golden set of ``population``."""

    images: np.ndarray
    population: int

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ImagePool | None:
        """The pool of a campaign record, or None for a campaign over all golden images."""
        entry = record.get("image_pool")
        return None if entry is None else cls(np.asarray(entry["images"], dtype=np.int64), int(entry["population"]))

    @property
    def size(self) -> int:
        """K."""
        return len(self.images)

    @property
    def scale(self) -> float:
        """(1 − K/N)·K/(K − 1): turns the same-image products (which estimate the pool's spread of image
        effects over K) into the variance of the pool mean under sampling without replacement."""
        k = self.size
        return (1.0 - k / self.population) * k / (k - 1)

    def positions(self, image: np.ndarray) -> np.ndarray:
        """Position in the pool of every image id (ValueError for an image outside the pool)."""
        image = np.asarray(image, dtype=np.int64)
        pos = np.searchsorted(self.images, image).clip(max=self.size - 1)
        if len(image) and not np.array_equal(self.images[pos], image):
            raise ValueError("a fault hit an image outside the campaign's image pool")
        return pos


@dataclass(frozen=True)
class ImageEffect:
    """One layer's linearised estimate split by pool image: what its between-image variance is made of.

    ``totals[i]`` sums the influence of the faults on pool image i; ``cross`` is the sum of products of
    the influences of distinct faults on the same image (same-cell pairs rescaled by n_c/(n_c − 1),
    since a fault is never paired with itself).
    """

    totals: np.ndarray
    cross: float


def image_effect(pool: ImagePool, image: np.ndarray, delta_loss: np.ndarray, finite: np.ndarray,
                 cell: np.ndarray, cell_weight: np.ndarray) -> ImageEffect:
    """The image effect of a combined ratio estimate R = Σ W_c ȳ_c / Σ W_c x̄_c over cells c.

    ``cell`` numbers each fault's cell (a bit of a uniform layer, a (round, stratum) of a stratified one),
    ``cell_weight`` holds W_c; y = ΔLoss·finite, x = finite. A fault's influence is
    z = W_c (d − d̄_c) / (n_c X̂) with d = y − R̂x, X̂ = Σ W_c x̄_c: θ̂ − θ ≈ Σ z.
    """
    finite = np.asarray(finite, dtype=bool)
    cell = np.asarray(cell, dtype=np.int64)
    cell_weight = np.asarray(cell_weight, dtype=np.float64)
    y, x = np.where(finite, delta_loss, 0.0), finite.astype(np.float64)
    cells = len(cell_weight)
    counts = np.bincount(cell, minlength=cells).astype(np.float64)
    per = np.divide(cell_weight, counts, out=np.zeros(cells), where=counts > 0)  # W_c / n_c
    total_x = float(per @ np.bincount(cell, weights=x, minlength=cells))
    if not total_x > 0:
        return ImageEffect(np.zeros(pool.size), 0.0)
    ratio = float(per @ np.bincount(cell, weights=y, minlength=cells)) / total_x
    d = y - ratio * x
    cell_mean = np.divide(np.bincount(cell, weights=d, minlength=cells), counts, out=np.zeros(cells), where=counts > 0)
    z = per[cell] * (d - cell_mean[cell]) / total_x
    pos = pool.positions(image)
    totals = np.bincount(pos, weights=z, minlength=pool.size)
    by_cell = np.bincount(cell * pool.size + pos, weights=z, minlength=cells * pool.size).reshape(cells, pool.size)
    squares = np.bincount(cell, weights=z * z, minlength=cells)
    same_cell = (by_cell**2).sum(axis=1) - squares
    correction = np.divide(same_cell, counts - 1, out=np.zeros(cells), where=counts > 1)
    return ImageEffect(totals, float(totals @ totals - squares.sum() + correction.sum()))


def between_variance(pool: ImagePool, effects: Sequence[ImageEffect], weights: Sequence[float]) -> float:
    """The between-image variance of Σ_l w_l θ̂_l over layers sharing ``pool`` (0 when negative by chance).

    Products of faults of different layers on the same image estimate the covariance of the layers'
    image effects; within a layer, ``cross`` stands for the product of the layer with itself.
    """
    w = np.asarray(weights, dtype=np.float64)
    if not len(effects):
        return 0.0
    totals = np.stack([e.totals for e in effects])
    joint = w @ totals
    own = np.einsum("l,li,li->", w**2, totals, totals)
    cross = float(w**2 @ np.array([e.cross for e in effects]))
    return max(0.0, pool.scale * (float(joint @ joint) - float(own) + cross))


def pooled_moments(pool: ImagePool, given_pool: Moments, effects: Sequence[ImageEffect],
                   weights: Sequence[float]) -> Moments:
    """The estimate Σ_l w_l θ̂_l over layers sharing ``pool``, whose moments given the pool are ``given_pool``,
    with the between-image variance added.

    The third cumulant stays the faults' own: the ultimate-cluster estimate K²/((K − 1)(K − 2))·Σ_i T_i³
    of the whole is less precise than the post-stratified one and covers worse in the simulation of
    docs/image_pool.md.
    """
    return Moments(given_pool.value, given_pool.variance + between_variance(pool, effects, weights), given_pool.third,
                   given_pool.variance_of_variance)


@dataclass
class LayerSet:
    """The layers of one campaign: each layer's estimate given the pool, and its image effect (pooled only)."""

    within: dict[str, Moments]
    pool: ImagePool | None = None
    effects: dict[str, ImageEffect] = field(default_factory=dict)

    def layer(self, name: str) -> Moments:
        """A layer's estimate with the between-image variance of its own pool mean."""
        if self.pool is None:
            return self.within[name]
        return pooled_moments(self.pool, self.within[name], [self.effects[name]], [1.0])

    def given_pool(self) -> LayerSet:
        """The same layers without their between-image variance (the estimates' spread given the pool)."""
        return LayerSet(self.within)

    def mean(self, names: Sequence[str] | None = None, weights: Sequence[float] | None = None) -> Moments:
        """Σ w_l θ̂_l / Σ w_l over ``names`` (default: every layer, equal weights), layers independent given the
        pool plus their joint between-image variance."""
        names = list(self.within) if names is None else list(names)
        w = np.ones(len(names)) if weights is None else np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        combined = Moments.weighted_sum(w, [self.within[n] for n in names])
        if self.pool is None:
            return combined
        return pooled_moments(self.pool, combined, [self.effects[n] for n in names], w)


def uniform_cells(bit: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The cells of a uniform layer's post-stratified mean: its bits, or one cell when a bit has fewer than 2
    draws (as :func:`resilience.intervals.uniform_layer_moments` falls back to the plain mean)."""
    bit = np.asarray(bit, dtype=np.int64)
    if np.bincount(bit, minlength=bits).min() < 2:
        return np.zeros(len(bit), dtype=np.int64), np.ones(1)
    return bit, np.full(bits, 1.0 / bits)


def uniform_layer_set(faults: pa.Table, bits: int, pool: ImagePool | None) -> LayerSet:
    """Every layer of a uniform campaign's fault records (columns layer, delta_loss, finite, bit and, with a
    pool, image), in the order they first appear."""
    layer = np.asarray(faults.column("layer").to_pylist())
    delta = faults.column("delta_loss").to_numpy().astype(np.float64)
    finite = faults.column("finite").to_numpy(zero_copy_only=False)
    bit = faults.column("bit").to_numpy()
    image = faults.column("image").to_numpy() if pool is not None else None
    layers = LayerSet({}, pool)
    for name in dict.fromkeys(layer.tolist()):
        mask = layer == name
        layers.within[name] = uniform_layer_moments(delta[mask], finite[mask], bit[mask], bits)
        if pool is not None:
            layers.effects[name] = image_effect(pool, image[mask], delta[mask], finite[mask], *uniform_cells(bit[mask], bits))
    return layers


def stratified_layer(pool: ImagePool | None, faults: pa.Table,
                     strata: Sequence[str]) -> tuple[Moments, ImageEffect | None]:
    """A stratified layer's estimate given the pool and its image effect (None without a pool), from its fault
    records with their
    ``weight`` (λ_r·W_b·n/n_rb), ``round`` and ``stratum`` columns (round 0, the pilot, has weight 0).

    The cells are (round, stratum) with W_c = weight·n_c/n; each cell's spread comes from every draw of its
    stratum, as in :func:`resilience.stratified.run_adaptive`.
    """
    index = {name: b for b, name in enumerate(strata)}
    stratum = np.array([index[s] for s in faults.column("stratum").to_pylist()], dtype=np.int64)
    rounds = faults.column("round").to_numpy().astype(np.int64)
    weight = faults.column("weight").to_numpy()
    delta = faults.column("delta_loss").to_numpy().astype(np.float64)
    finite = faults.column("finite").to_numpy(zero_copy_only=False).astype(bool)
    cell = rounds * len(strata) + stratum
    cells = (int(rounds.max()) + 1) * len(strata) if len(rounds) else 0
    counts = np.bincount(cell, minlength=cells)
    cell_weight = np.bincount(cell, weights=weight, minlength=cells) / len(cell)  # Σ_c weight = n_c·W_c·n/n_c
    y, x = np.where(finite, delta, 0.0), finite.astype(np.float64)
    present = np.flatnonzero(counts)
    spread = (present % len(strata), [y[stratum == b] for b in range(len(strata))],
              [x[stratum == b] for b in range(len(strata))])
    within, _ = ratio_moments(cell_weight[present], [y[cell == c] for c in present], [x[cell == c] for c in present],
                              spread)
    if pool is None:
        return within, None
    return within, image_effect(pool, faults.column("image").to_numpy(), delta, finite, cell, cell_weight)


def stratified_layer_set(pool: ImagePool | None, faults: dict[str, pa.Table], strata: Sequence[str]) -> LayerSet:
    """Every layer of a stratified campaign from its weighted fault records (:func:`stratified_layer`)."""
    layers = LayerSet({}, pool)
    for name, table in faults.items():
        layers.within[name], effect = stratified_layer(pool, table, strata)
        if effect is not None:
            layers.effects[name] = effect
    return layers


def pooled_tables(layers: LayerSet, rows: list[dict[str, Any]], network: dict[str, Any],
                  confidence: float) -> None:
    """Put the pooled intervals into a campaign's per-layer rows and network figures (in place).

    Every row's ci_low/ci_high (and half-widths, where the table has them) become those of the layer
    estimate with its between-image variance, and ``between_image_se`` is added, to the rows and to the
    network figures (the mean over the layers with a finite mean).
    """
    for row in rows:
        moments = layers.layer(row["layer"])
        low, high = moments.interval(confidence)
        row |= {"ci_low": low, "ci_high": high,
                "between_image_se": float(np.sqrt(max(0.0, moments.variance - layers.within[row["layer"]].variance)))}
        if "ci_half_width" in row:
            row["ci_half_width"] = (high - low) / 2
            row["ci_rel_half_width"] = row["ci_half_width"] / abs(moments.value) if moments.value else float("nan")
    names = [r["layer"] for r in rows if np.isfinite(r["mean_delta_loss"])]
    if names:  # the network's interval itself comes from improvement_ci.network_interval of the same layers
        between = layers.mean(names).variance - layers.given_pool().mean(names).variance
        network["between_image_se"] = float(np.sqrt(max(0.0, between)))
