"""Checkpoints: our format (atomic, plain data only) and the foreign layouts we read.

Everything is read with ``torch.load(..., weights_only=True)``; ``argparse.Namespace`` (the paper
repository keeps its training arguments in one) is the only extra class allowed and becomes a dict.
Layouts read by ``load_checkpoint``:
- ours: ``{"format": "tgr-checkpoint/1", "model", "meta"[, "model_ema", "optimizer", ...]}``;
- training dicts with ``model``/``model_ema`` (the paper repository, torchvision's references);
- ``{"state_dict": ..., "best_prec1": ...}`` (dnn-benchmarks, keys prefixed with ``module.``);
- a bare state dict.
Foreign layouts do not record the architecture: ``model_name`` names it (the paper's ``args.model`` is
used when present); the head comes from the presence of ``logit_scale``, num_classes/embed_dim/in_chans
from the tensor shapes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli_shell import UserError

from .range_restriction import META_KEY as RANGE_RESTRICTION
from .range_restriction import restrict_ranges
from .registry import build_model, get_model_spec, list_models

CHECKPOINT_FORMAT = "tgr-checkpoint/1"
REQUIRED_META = ("model", "num_classes", "head")
_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the requested model (one-line message)."""


# ----------------------------------------------------------------------------------------------- saving


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/DataParallel (``module``) or ``torch.compile`` (``_orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _check_plain(obj: Any, where: str) -> None:
    """Reject anything ``weights_only`` loading would refuse, naming where it sits."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_SCALARS):
        raise TypeError(
            f"{where} is a {type(obj).__name__}; checkpoints hold only dicts, lists, numbers, strings and "
            f"tensors (convert it first, e.g. vars(args))"
        )


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``{"format", "model": state_dict, "meta", **extra}`` atomically (temp file + rename).

    ``meta`` needs at least "model", "num_classes" and "head" (see INTERFACES.md for the full set);
    ``extra`` may hold ``model_ema``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``args`` (a plain dict)...
    Only plain data is accepted (TypeError otherwise) so the file loads with ``weights_only=True``.
    """
    missing = [k for k in REQUIRED_META if meta.get(k) is None]
    if missing:
        raise ValueError(f"checkpoint meta lacks {', '.join(missing)}")
    reserved = {"format", "model", "meta"} & extra.keys()
    if reserved:
        raise ValueError(f"extra entries may not be named {', '.join(sorted(reserved))}")
    state = {"format": CHECKPOINT_FORMAT, "model": _unwrap(model).state_dict(), "meta": dict(meta), **extra}
    _check_plain(state, "checkpoint")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # same directory, so the final rename is atomic; "x" mode keeps the umask-based permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- reading


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(path: Path, allow_unsafe: bool, map_location: Any) -> Any:
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # neither a zip archive (torch.save) nor a legacy pickle
        raise CheckpointError(f"cannot read {path}: not a PyTorch checkpoint (it starts with {head!r})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not str(exc).startswith("Weights only load failed"):
            raise CheckpointError(f"cannot read {path}: {_first_line(exc)} (corrupt or truncated file?)") from exc
        inner = exc.__context__ or exc  # the weights-only unpickler's own reason
        found = re.search(r"GLOBAL ([\w.]+)", str(inner))
        if not allow_unsafe and found:
            raise CheckpointError(
                f"{path} refers to the Python object {found.group(1)}, and unpickling it could run arbitrary "
                f"code; if you trust the file's source, load it with --allow-unsafe-checkpoint (allow_unsafe=True)"
            ) from None
        if not allow_unsafe:
            raise CheckpointError(
                f"cannot read {path}: {_first_line(inner)} (corrupt or truncated file? a trusted checkpoint that "
                f"needs full unpickling loads with --allow-unsafe-checkpoint)"
            ) from None
    except Exception as exc:  # torch reports damaged files as RuntimeError, EOFError, KeyError...
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)} (corrupt or truncated file?)") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {_first_line(exc)}") from exc


def _plain(obj: Any) -> Any:
    """JSON-friendly copy of foreign metadata (Namespace -> dict, tensors -> numbers, others -> str)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, str | int | float | bool | type(None)):
        return obj
    return str(obj)


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unpack(raw: Any, use_ema: bool, path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(layout, model state dict, foreign metadata) of a loaded checkpoint object."""
    if isinstance(raw, nn.Module):  # a whole pickled model, only reachable with allow_unsafe
        raw = raw.state_dict()
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict")
    fmt = raw.get("format")
    info: dict[str, Any] = {}
    if isinstance(fmt, str) and fmt.startswith("tgr-checkpoint/"):
        if fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} has format {fmt!r}; this version reads {CHECKPOINT_FORMAT!r}")
        layout = "tgr"
    elif isinstance(raw.get("model"), Mapping):
        layout = "training-dict"
        info = {k: _plain(raw[k]) for k in ("args", "epoch") if k in raw}
    elif isinstance(raw.get("state_dict"), Mapping):
        layout = "state_dict-entry"
        info = {k: _plain(v) for k, v in raw.items() if k != "state_dict" and not isinstance(v, Mapping)}
    elif _is_state_dict(raw):
        layout = "state-dict"
    else:
        raise CheckpointError(f"{path} is not a model checkpoint (top-level keys: {', '.join(map(str, list(raw)[:8]))})")

    if layout in ("state_dict-entry", "state-dict"):
        if use_ema:
            raise CheckpointError(f"{path} has no EMA weights (model_ema)")
        state = raw["state_dict"] if layout == "state_dict-entry" else raw
    else:
        key = "model_ema" if use_ema else "model"
        if not isinstance(raw.get(key), Mapping):
            raise CheckpointError(f"{path} has no {key!r} entry")
        state = raw[key]
    if use_ema:
        # EMA wrappers (AveragedModel) store a step counter and prefix the model keys with "module."
        state = {k: v for k, v in state.items() if k != "n_averaged"}
    state = _strip_prefix(state, "module.")  # DDP and EMA wrappers
    if not _is_state_dict(state):
        raise CheckpointError(f"{path}: the model entry is not a state dict of tensors")
    return layout, state, info


def _check_expected(path: Path, found: Mapping[str, Any], **expected: Any) -> None:
    for key, want in expected.items():
        if want is not None and found.get(key) != want:
            raise CheckpointError(f"{path} holds {key}={found.get(key)!r} but {key}={want!r} was requested")


def _last_matrix(state: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """The last 2-D weight in state-dict order: the classifier of every registered backbone."""
    mats = [v for k, v in state.items() if k.startswith(prefix) and k.endswith("weight") and v.ndim == 2]
    if not mats:
        raise CheckpointError("the checkpoint has no linear layer to read the number of classes from")
    return mats[-1]


def _default_dataset(model_name: str, num_classes: int) -> str | None:
    """The dataset a foreign checkpoint is assumed to be for, when the caller gives none."""
    if num_classes == 1000:
        return "imagenet"
    if get_model_spec(model_name).small_input == "native":
        return {10: "cifar10", 100: "cifar100"}.get(num_classes)
    return None


def _foreign_meta(
    path: Path,
    layout: str,
    state: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    *,
    model_name: str | None,
    num_classes: int | None,
    head: str | None,
    embed_dim: int | None,
    dataset: str | None,
    small_input: bool | None,
) -> dict[str, Any]:
    args = info.get("args")
    name = model_name or (args.get("model") if isinstance(args, Mapping) else None)
    if name is None:
        raise CheckpointError(f"{path} ({layout} layout) does not record its architecture; pass model_name (--model)")
    if name not in list_models():
        raise CheckpointError(f"unknown model {name!r} for {path} (see models.list_models())")
    found_head = "text" if "logit_scale" in state and "head.weight" in state else "linear"
    if found_head == "text":
        found_classes, found_embed = state["head.weight"].shape
    else:
        found_classes, found_embed = _last_matrix(state).shape[0], None
    found = {"head": found_head, "num_classes": int(found_classes), "embed_dim": found_embed}
    _check_expected(path, found, head=head, num_classes=num_classes, embed_dim=embed_dim)
    convs = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4]
    native = get_model_spec(name).small_input == "native"
    dataset = dataset or _default_dataset(name, found["num_classes"])
    meta = {
        "model": name,
        **found,
        "in_chans": int(convs[0].shape[1]) if convs else 3,
        "small_input": native or bool(small_input),
        "dataset": dataset,
        "text_features": None,
        "source": layout,
        "source_info": dict(info),
    }
    meta["preset"] = _eval_preset(meta)
    return meta


def _eval_preset(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    import data  # imported on use: the data package imports torchvision datasets

    if meta["dataset"] not in data.DATASETS:
        return None
    try:
        preset = data.eval_preset(meta["dataset"], meta["model"], small_input=meta["small_input"], in_chans=meta["in_chans"])
    except ValueError:  # e.g. a channel count the dataset cannot feed; evaluation reports that itself
        return None
    return dict(preset)


def _summary(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, meta: Mapping[str, Any]) -> None:
    """Strict load with a one-line account of what does not fit."""
    expected = model.state_dict()
    for key in expected:
        # checkpoints from PyTorch < 0.4.1 (dnn-benchmarks) predate the batch-norm step counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {_summary(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", mismatched)) if keys]
        what = f"{meta['model']} ({meta['head']} head, {meta['num_classes']} classes, small_input={meta['small_input']})"
        raise CheckpointError(f"{path} does not fit {what}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    head: str | None = None,
    embed_dim: int | None = None,
    dataset: str | None = None,
    small_input: bool | None = None,
    use_ema: bool = False,
    allow_unsafe: bool = False,
    map_location: Any = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights strictly; returns ``(model.eval(), meta)``.

    Our format needs no argument (any given must agree with the file). Foreign layouts need
    ``model_name`` unless the paper's ``args.model`` is inside; ``small_input`` says whether they were
    trained with the small-input adaptation (never guessed; CIFAR ResNets always are); ``dataset``
    picks the default preset (else ImageNet for 1000 classes, CIFAR-10/100 for CIFAR ResNets).
    ``meta`` is our meta dict plus ``checkpoint_sha256``. A checkpoint whose meta holds
    ``range_restriction`` gives the range-restricted model (:mod:`models.range_restriction`). Any problem
    raises ``CheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {'is a folder, not a file' if path.is_dir() else 'not found'}: {path}")
    raw = _read(path, allow_unsafe, map_location)
    layout, state, info = _unpack(raw, use_ema, path)
    if layout == "tgr":
        meta = dict(raw["meta"]) if isinstance(raw.get("meta"), Mapping) else {}
        missing = [k for k in REQUIRED_META if meta.get(k) is None]
        if missing:
            raise CheckpointError(f"{path}: meta lacks {', '.join(missing)}")
        if meta["model"] not in list_models():
            raise CheckpointError(f"{path} holds unknown model {meta['model']!r} (see models.list_models())")
        if get_model_spec(meta["model"]).small_input == "native":
            small_input = None  # the flag means nothing for networks designed for small inputs
        _check_expected(
            path, meta, model=model_name, num_classes=num_classes, head=head, embed_dim=embed_dim, small_input=small_input
        )
    else:
        meta = _foreign_meta(
            path, layout, state, info, model_name=model_name, num_classes=num_classes, head=head,
            embed_dim=embed_dim, dataset=dataset, small_input=small_input,
        )
    try:
        model = build_model(
            meta["model"],
            int(meta["num_classes"]),
            head=meta["head"],
            embed_dim=int(meta.get("embed_dim") or 512),
            in_chans=int(meta.get("in_chans") or 3),
            small_input=bool(meta.get("small_input")),
        )
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild the model of {path}: {_first_line(exc)}") from exc
    _load_state(model, state, path, meta)
    restriction = meta.get(RANGE_RESTRICTION)
    if restriction is not None:
        try:
            model = restrict_ranges(model, restriction["bounds"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"cannot restrict the ranges of {path}: {_first_line(exc)}") from exc
    if isinstance(map_location, str | torch.device):
        model.to(map_location)
    meta["checkpoint_sha256"] = sha256_file(path)
    meta["ema"] = use_ema
    return model.eval(), meta


def require_head(meta: Mapping[str, Any], head: str, option: str, path: str | os.PathLike) -> None:
    """Refuse a checkpoint given for ``option`` (e.g. ``--text``) whose classifier head is not ``head``."""
    if meta.get("head") != head:
        raise CheckpointError(f"{option} {path} has a {meta.get('head')} head; {option} needs a {head} head")
