"""ONNX Runtime inference on CPU for the bi-encoder and the reranker: export once, quantise to int8 if asked, cache,
run.

``model.backend`` is ``torch``, ``onnx`` (the transformer exported to ONNX, fp32) or ``onnx-int8`` (the same with
its weights quantised to int8 by ONNX Runtime's dynamic quantisation: activations are quantised per batch at run
time, so no calibration data is needed). Only the transformer runs in ONNX Runtime; tokenisation, pooling,
normalisation, prompts and ``encode()``'s length-sorted batching (or a cross-encoder's ``predict()`` and its
activation) stay sentence-transformers' own, so the three backends differ in nothing but the arithmetic of the
forward pass.

Why this is written here and not ``SentenceTransformer(..., backend="onnx")``: sentence-transformers loads and
exports ONNX models through optimum-onnx, whose only release (0.1.0) requires transformers<4.58, while
sentence-transformers 6 requires transformers>=5; the two cannot be installed together. What optimum did for us
is small: ``torch.onnx.export`` of the Hugging Face model with dynamic batch and sequence axes, and
``onnxruntime.quantization.quantize_dynamic``. Both are the libraries' own; only the glue is ours.

The exported file is cached beside the model folder (``.<name>.onnx/<weights sha256>/``, or under
``$DENSEQA_CACHE/onnx``, default ``~/.cache/denseqa/onnx``, when that folder is not writable), keyed
by the weights' hash so a retrained model is never served a stale export. Its sha256 goes into the index manifest
with the backend's name, so the queries are encoded with the very file that embedded the passages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from denseqa.errors import InputError

logger = logging.getLogger(__name__)

# The backends are model.backend's values (denseqa.config). Measured (BENCHMARKS.md, "ONNX Runtime on CPU"): the
# default where the model runs on a CPU. On a GPU it is torch.
CPU_DEFAULT_BACKEND = "onnx"
OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def resolve_backend(configured: str | None, device: str | None) -> str:
    """The backend to run: the configured one, else torch on a GPU and :data:`CPU_DEFAULT_BACKEND` on a CPU."""
    if configured:
        return configured
    return "torch" if device and str(device).startswith("cuda") else CPU_DEFAULT_BACKEND


def cache_dir(source: str, weights_sha256: str) -> Path:
    """Where the exports of these weights live: beside a writable model folder, else in denseqa's cache (for a
    read-only folder, and for the local copy of a model at a URI, which lives in that cache already)."""
    from denseqa.storage import cache_root

    folder, root = Path(source).resolve(), Path(cache_root()).resolve()
    if folder.is_dir() and os.access(folder.parent, os.W_OK) and not folder.is_relative_to(root):
        return folder.parent / f".{folder.name}.onnx" / weights_sha256[:16]
    return root / "onnx" / weights_sha256[:16]


def exported_file(model, name: str, source: str, weights_sha256: str, backend: str) -> Path:
    """The ONNX file of ``model``'s transformer for ``backend`` (onnx or onnx-int8), exported and quantised on first
    use. ``name`` is the model as the user named it, for the error of a model that cannot be exported."""
    folder = cache_dir(source, weights_sha256)
    fp32 = folder / "model.onnx"
    target = fp32 if backend == "onnx" else folder / "model_qint8.onnx"
    stamp = folder / EXPORT_STAMP
    try:
        graph = _graph_key(model)
        # The weights name the folder; what else shapes the graph (the config: activation, layers) is checked here,
        # so a config.json changed in place beside the same weights is exported again, not served stale.
        current = stamp.is_file() and json.loads(stamp.read_text()).get("graph") == graph
        if current and target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        if not current or not fp32.is_file():
            _publish(fp32, lambda tmp: _export(model, tmp))
        if backend == "onnx-int8":
            _publish(target, lambda tmp: _quantize(fp32, tmp))
        if not current:
            stale = folder / "model_qint8.onnx"
            if backend == "onnx" and stale.is_file():
                stale.unlink()  # quantised from the export just replaced
            _publish(stamp, lambda tmp: Path(tmp).write_text(json.dumps({"graph": graph})))
    except Exception as e:  # the exporter's errors are many and deep; the user needs the model and the way out
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise InputError(f"model {name!r}: cannot be exported to ONNX for --model.backend {backend} ({reason}); "
                         "use --model.backend torch") from None
    logger.info("exported %s for %s to %s", backend, name, target)
    return target


EXPORT_STAMP = "export.json"


def _graph_key(model) -> str:
    """What an export of these weights also depends on: the transformer's config (without the fields that name
    where or by which version it was saved) and the opset."""
    config = transformer_module(model).model.config.to_dict()
    for incidental in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(incidental, None)
    return hashlib.sha256(json.dumps({"config": config, "opset": OPSET}, sort_keys=True, default=str).encode()
                          ).hexdigest()


def _publish(target: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file, and two
    processes exporting at once both end with the same complete file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is its owner's only; an export is shared like the model
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _TensorsToOutput(torch.nn.Module):
    """The Hugging Face model as a function of tensors to one tensor, which is what the ONNX exporter traces."""

    def __init__(self, model, names: tuple[str, ...], output: str) -> None:
        super().__init__()
        self.model, self.names, self.output = model, names, output

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors, strict=True)), return_dict=True)[self.output]


def output_name(first) -> str:
    """What sentence-transformers reads of the Hugging Face model's output: ``last_hidden_state`` for a
    bi-encoder, ``logits`` for a cross-encoder."""
    name = first.modality_config["text"]["method_output_name"]
    if not isinstance(name, str):
        raise ValueError(f"its transformer's output is read as {name!r}, not one tensor")
    return name


def transformer_module(model):
    """The sentence-transformers Transformer module whose Hugging Face model ONNX Runtime replaces; ValueError for
    a model without one (static embeddings, a custom first module)."""
    from sentence_transformers.base.modules.transformer import Transformer

    first = model[0]
    if not isinstance(first, Transformer) or not isinstance(getattr(first, "model", None), torch.nn.Module):
        raise ValueError(f"its first module is {type(first).__name__}, not a Hugging Face transformer")
    return first


def _export(model, path: str) -> None:
    first = transformer_module(model)
    features = model.preprocess(["a probe sentence", "a second, somewhat longer probe sentence for the export"])
    names = tuple(n for n in _INPUTS if n in features)
    output = output_name(first)
    hf_model = first.model
    attention = getattr(hf_model.config, "_attn_implementation", None)
    # The eager attention traces to plain ONNX ops with a dynamic mask; fused kernels may not.
    hf_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            torch.onnx.export(
                _TensorsToOutput(hf_model.eval(), names, output), tuple(features[n] for n in names), path,
                input_names=list(names), output_names=[output], opset_version=OPSET, dynamo=False,
                dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                              output: {0: "batch", 1: "sequence"} if output == "last_hidden_state" else {0: "batch"}},
            )
    finally:
        hf_model.config._attn_implementation = attention


def _quantize(fp32: Path, path: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Signed int8 weights, per output channel: the accuracy of the matrix products is what rankings depend on.
    quantize_dynamic(str(fp32), path, weight_type=QuantType.QInt8, per_channel=True)


class OnnxRuntimeModel(torch.nn.Module):
    """Stands in for the Hugging Face model inside sentence-transformers' Transformer module: same inputs (the
    tokenizer's tensors), same output (``last_hidden_state`` or ``logits``), computed by an ONNX Runtime session."""

    def __init__(self, path: Path, config: Any, threads: int, output: str) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output = output
        self.config = config  # sentence-transformers reads the config (hidden size, output_hidden_states)

    def forward(self, **features):
        feeds = {n: features[n].detach().cpu().numpy().astype("int64", copy=False) for n in self.input_names}
        (result,) = self.session.run([self.output], feeds)
        return {self.output: torch.from_numpy(result)}


def run_on_onnx_runtime(model, backend: str, name: str, source: str, weights_sha256: str) -> dict[str, str]:
    """Switch ``model`` (a SentenceTransformer or CrossEncoder) to ONNX Runtime for ``backend``, from the cached
    export of these weights; returns the backend's description, ``{"name", "sha256"}`` of the exported file."""
    from denseqa.model import sha256_file

    path = exported_file(model, name, source, weights_sha256, backend)
    use_onnx_runtime(model, path)
    return {"name": backend, "sha256": sha256_file(path)}


def use_onnx_runtime(model, path: Path, threads: int | None = None) -> None:
    """Run ``model``'s transformer through ONNX Runtime from now on (``path`` from :func:`exported_file`)."""
    first = transformer_module(model)
    first.model = OnnxRuntimeModel(path, first.model.config, threads or torch.get_num_threads(), output_name(first))
    # The Hugging Face model's own argument list no longer applies: pass every tokenizer tensor through.
    first.model_forward_params = None
    first._declared_forward_params = set()
