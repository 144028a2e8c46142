"""GPU check (NCCL, bf16/fp16): denseqa's gathered, duplicate-masked MNRL, uncached and cached (GradCache), under
autocast, against fp32 on the same batch: loss and gradients. Run on a GPU machine with sentence-transformers:

    MODEL=path/to/all-MiniLM-L6-v2 PAIRS_JSON=pairs.json python scripts/gpu_loss_check.py

PAIRS_JSON holds {"q": [...], "a": [...]} (the first 128 English Debian pairs were used); DEV=cpu runs it on gloo."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
from sentence_transformers import SentenceTransformer

from denseqa.losses import (
    CachedDuplicateMaskedMultipleNegativesRankingLoss,
    DuplicateMaskedMultipleNegativesRankingLoss,
    duplicate_labels,
)

if not {"MODEL", "PAIRS_JSON"} <= set(os.environ):
    sys.exit('set MODEL (a SentenceTransformer folder) and PAIRS_JSON (a file of {"q": [...], "a": [...]})')
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
DEV = os.environ.get("DEV", "cuda")
dist.init_process_group("nccl" if DEV == "cuda" else "gloo", rank=0, world_size=1)
print("torch", torch.__version__, torch.cuda.get_device_name() if DEV == "cuda" else "cpu")
pairs = json.load(open(os.environ["PAIRS_JSON"]))
n = int(os.environ.get("PAIRS", 64))
qs, ans = pairs["q"][:n], pairs["a"][:n]
model = SentenceTransformer(os.environ["MODEL"], device=DEV).float()
model.max_seq_length = 128
for p in model[0].auto_model.pooler.parameters() if getattr(model[0].auto_model, "pooler", None) else []:
    p.requires_grad_(False)
labels = duplicate_labels(qs, ans).to(DEV)


def feats():
    return [{k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in model.tokenize(t).items()} for t in (qs, ans)]


def run(cached, dtype):
    model.zero_grad(set_to_none=True)
    loss_fn = (
        CachedDuplicateMaskedMultipleNegativesRankingLoss(model, mini_batch_size=16)
        if cached
        else DuplicateMaskedMultipleNegativesRankingLoss(model)
    )
    DEV == "cuda" and torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(DEV, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(feats(), labels)
    with torch.autocast(DEV, dtype=dtype or torch.float32, enabled=dtype is not None and cached):
        loss.backward()
    DEV == "cuda" and torch.cuda.synchronize()
    g = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
    return float(loss), g, time.perf_counter() - t


res = {}
for name, cached, dtype in [
    ("fp32", False, None),
    ("fp32-cached", True, None),
    ("bf16", False, torch.bfloat16),
    ("bf16-cached", True, torch.bfloat16),
    ("fp16-cached", True, torch.float16),
]:
    run(cached, dtype)
    res[name] = run(cached, dtype)
ref = res["fp32"][1]
out = {}
for name, (loss, g, s) in res.items():
    rel = float((g - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
    out[name] = {
        "loss": round(loss, 5),
        "grad_rel_err_vs_fp32": round(rel, 5),
        "grad_cos_vs_fp32": round(cos, 6),
        "s": round(s, 3),
    }
    print(name, out[name], flush=True)
out["bf16_cached_vs_bf16_rel"] = float((res["bf16-cached"][1] - res["bf16"][1]).norm() / res["bf16"][1].norm())
print("bf16 cached vs uncached rel", out["bf16_cached_vs_bf16_rel"])
assert (
    out["fp32-cached"]["grad_rel_err_vs_fp32"] < 1e-3 and abs(out["fp32-cached"]["loss"] - out["fp32"]["loss"]) < 1e-4
)
assert out["bf16-cached"]["grad_cos_vs_fp32"] > 0.99 and abs(out["bf16-cached"]["loss"] - out["fp32"]["loss"]) < 0.05
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "gpu-loss.json"), "w"), indent=1)
dist.destroy_process_group()
print("GPU CHECK OK")
