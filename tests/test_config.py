from __future__ import annotations

from pathlib import Path

import pytest

from denseqa.config import JobConfig, load_yaml
from denseqa.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_every_yaml_config_in_the_repo_loads():
    # Given every YAML file under configs/, found recursively (torchtune's test_configs missed nested ones)
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ holds no YAML file"
    for f in files:
        # When it is parsed and validated (a Serve config by Ray's own schema), Then it is accepted
        values = load_yaml(str(f))
        if "applications" in values:
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(values)
        else:
            JobConfig.from_dict(values, source=str(f))


def test_unknown_key_is_an_error_that_names_it():
    with pytest.raises(InputError, match=r"unknown key train\.learning_rat;"):
        JobConfig.from_dict({"train": {"learning_rat": 1e-5}}, source="x.yaml")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"scale": -1}}, r"x.yaml: train.scale must be > 0, got -1"),
        ({"train": {"batch_size": "8"}}, r"train.batch_size must be a int, got '8'"),
        ({"train": {"precision": "fp16"}}, r"train.precision must be auto, fp32 or bf16 without --use-gpu"),
        ({"train": {"checkpoint_metric": "map"}}, r"checkpoint_metric must be one of"),
        ({"data": {"heldout_fraction": 1.5}}, r"data.heldout_fraction must be in \(0, 1\)"),
        ({"model": {"pooling": "max"}}, r"model.pooling must be one of mean, cls, got 'max'"),
        # Issue 19: sentence-transformers' MNRL options that are ill-defined or do nothing are refused
        ({"train": {"directions": ["doc_to_query"]}}, r"train.directions must be a list that includes query_to_doc"),
        ({"train": {"directions": "query_to_doc,doc_to_dog"}},
         r"train.directions must be one of query_to_doc, query_to_query, doc_to_query, doc_to_doc, got .doc_to_dog."),
        ({"train": {"directions": ["query_to_doc", "doc_to_doc"], "partition_mode": "per_direction"}},
         r"train.partition_mode must be joint with the same-type directions doc_to_doc"),
        ({"train": {"hardness_mode": "in_batch_negatives"}}, r"train.hardness_strength must be > 0 exactly when "),
        ({"train": {"hardness_strength": 5.0}}, r"train.hardness_strength must be > 0 exactly when .*got 5.0"),
        ({"train": {"distill_weight": 0.5}}, r"train.distill_weight must be left at its default without "
                                             r"train.distill .*got 0.5"),
        ({"train": {"mini_batch_size": 8}}, r"train.mini_batch_size must be left at its default without "
                                            r"train.cached_loss .*got 8"),
        ({"train": {"eval_batch_size": 0}}, r"train.eval_batch_size must be >= 1, got 0"),
        ({"train": {"learning_rate": float("inf")}}, r"train.learning_rate must be a finite number \(> 0\), got inf"),
        ({"index": {"compact_threshold": float("nan")}},
         r"index.compact_threshold must be a finite number \(in \[0, 1\]\), got nan"),
        ({"index": {"bm25_stopwords": "EN"}}, r"index.bm25_stopwords must be a stopword list bm25s knows .* or "
                                               r"none, got 'EN'"),
        ({"mine": {"bm25_stopwords": "xx"}}, r"mine.bm25_stopwords must be a stopword list bm25s knows"),
        ({"mine": {"seed": -1}}, r"mine.seed must be >= 0, got -1"),
    ],
)
def test_bad_values_are_one_line_errors_naming_field_and_value(values, message):
    with pytest.raises(InputError, match=message) as e:
        JobConfig.from_dict(values, source="x.yaml")
    assert "\n" not in str(e.value)


def test_bm25_stopwords_none_keeps_every_word_and_a_known_name_is_kept():
    assert JobConfig.from_dict({"index": {"bm25_stopwords": "none"}}).index.bm25_stopwords is None
    assert JobConfig.from_dict({"mine": {"bm25_stopwords": "None"}}).mine.bm25_stopwords is None
    assert JobConfig.from_dict({"index": {"bm25_stopwords": "ko"}}).index.bm25_stopwords == "ko"


def test_a_config_rebuilt_from_all_its_values_is_the_same_config():
    # What every Ray Train worker does with the driver's config: no rule may depend on which keys were given
    for values in ({}, {"train": {"distill": "kl", "distill_weight": 0.5, "hardness_mode": "all_negatives",
                                  "hardness_strength": 5.0}}):
        cfg = JobConfig.from_dict(values, source="x.yaml")
        assert JobConfig.from_dict(cfg.to_dict(), source="worker").to_dict() == cfg.to_dict()


def test_loss_options_from_the_command_line_reach_the_loss():
    import argparse

    from denseqa.config import add_config_arguments, config_from_args
    from denseqa.train import build_loss

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ("train",))
    args = parser.parse_args(["--directions", "query_to_doc,doc_to_query", "--partition-mode", "per_direction",
                              "--hardness-mode", "in_batch_negatives", "--hardness-strength", "9"])
    cfg = config_from_args(args, ("train",))
    loss = build_loss(None, None, cfg.train)
    assert loss.directions == ("query_to_doc", "doc_to_query") and loss.partition_mode == "per_direction"
    assert (loss.hardness_mode, loss.hardness_strength) == ("in_batch_negatives", 9.0)


def test_readme_configuration_reference_is_generated_from_the_config_classes():
    from denseqa.config import config_reference_markdown

    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert readme.split(start, 1)[1].split(end, 1)[0] == config_reference_markdown(), (
        "README's configuration reference is stale: regenerate it with python scripts/update_readme_config.py")


def test_a_command_refuses_a_section_it_does_not_read():
    # A build-index config with a train: section is a mistake (the key would be silently ignored otherwise)
    with pytest.raises(InputError, match=r"unknown section 'train'; valid: corpus, model, embed, index"):
        JobConfig.from_dict({"train": {"batch_size": 8}}, source="x.yaml",
                            sections=("corpus", "model", "embed", "index"))
    cfg = JobConfig.from_dict({"index": {"shards": 2}}, sections=("corpus", "model", "embed", "index"))
    assert set(cfg.to_dict()) == {"corpus", "model", "embed", "index"} and cfg.index.shards == 2


@pytest.mark.parametrize("key, value", [("scale", 10.0), ("gather", False), ("mask_duplicates", False),
                                        ("distill", "kl"), ("directions", ["query_to_doc", "doc_to_query"])])
def test_the_reranker_refuses_a_bi_encoder_loss_option_instead_of_ignoring_it(key, value):
    from denseqa.config import COMMAND_SECTIONS
    from denseqa.train_reranker import RerankerTask

    # Given a train-reranker config that sets an option only the bi-encoder's loss has
    cfg = JobConfig.from_dict({"train": {key: value}}, "reranker.yaml", COMMAND_SECTIONS["train-reranker"])
    # When the reranker checks it, Then it is refused, naming the key
    with pytest.raises(InputError, match=rf"^train\.{key}: an option of the bi-encoder's loss, which the reranker "
                                         r"does not use \(its own: rerank.in_batch_negatives, rerank.loss_scale\)"):
        RerankerTask.check_config(cfg)
    # And the same config without it gets past that check (to the missing data)
    with pytest.raises(InputError, match=r"^no data given"):
        RerankerTask.check_config(JobConfig.from_dict({}, "reranker.yaml", COMMAND_SECTIONS["train-reranker"]))


def test_pipeline_marks_are_field_metadata():
    from denseqa.config import OPERATIONAL, PIPELINE_OWNED, TrainConfig

    # Owned and operational keys are read from the fields, not from hand-kept lists
    assert "index.output" in PIPELINE_OWNED and "mine.method" in PIPELINE_OWNED
    assert "train.epochs" not in PIPELINE_OWNED
    assert "train.log_every_steps" in OPERATIONAL and "train.batch_size" not in OPERATIONAL
    assert TrainConfig.model_fields["log_every_steps"].json_schema_extra == {"operational": True}


def test_every_command_takes_the_qualified_flag_and_the_short_one_where_unambiguous():
    from denseqa.cli import build_parser

    parser = build_parser()
    # train reads one batch_size: both spellings; run reads two: the qualified ones only
    assert vars(parser.parse_args(["train", "--train.batch-size", "8"]))["train.batch_size"] == 8
    assert vars(parser.parse_args(["train", "--batch-size", "8"]))["train.batch_size"] == 8
    assert vars(parser.parse_args(["build-index", "--embed.batch-size", "64"]))["embed.batch_size"] == 64
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--batch-size", "8"])


def test_serve_limits_are_defined_once_and_the_shipped_serve_config_states_them():
    from denseqa.config import EncoderSettings, Limits, ServeConfig
    from denseqa.drivers.serve import application, deployment, load_serve_config

    # The serve section's overrides carry the limits' own constraints (a 0 is refused the same way)
    for key, model in [("max_queries", Limits), ("max_candidates", Limits), ("max_batch_size", EncoderSettings)]:
        assert ServeConfig.model_fields[key].metadata == model.model_fields[key].metadata
    # And configs/serve.yaml, which shows the knobs to operators, states exactly the code's defaults
    config = load_serve_config()
    args = application(config)["args"]
    assert {k: args[k] for k in Limits.model_fields} == Limits().model_dump()
    from denseqa.serve import SearchAppArgs, SearcherSettings, encoding_deployment

    assert args["separate_encoder"] == SearchAppArgs.model_fields["separate_encoder"].default
    assert deployment(config, encoding_deployment(args))["user_config"] == SearcherSettings().model_dump()
    assert SearcherSettings().model_dump(exclude={"index"}) == EncoderSettings().model_dump()
    from denseqa.serve import AuthSettings

    assert deployment(config, "SearchAPI")["user_config"] == AuthSettings.model_construct().model_dump()


@pytest.mark.parametrize("text, message", [
    ("train: 5\n", r"c.yaml: section 'train' must be a mapping of keys, got 5"),
    ("train: [x]\n", r"c.yaml: section 'train' must be a mapping of keys, got \['x'\]"),
    ("train: {1: 2}\n", r"c.yaml: train.1 is not a key name"),
    ("1: {}\nfoo: {}\n", r"c.yaml: 1 is not a section name; valid: data, "),
    ("[train]\n", r"c.yaml: expected a mapping of sections"),
])
def test_a_config_file_of_the_wrong_shape_is_one_line_even_with_flags_merged_into_it(tmp_path, text, message):
    import argparse

    from denseqa.config import config_from_args

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as e:
        config_from_args(argparse.Namespace(config=str(path), **{"train.epochs": 2}))
    assert "\n" not in str(e.value)


def test_a_config_file_that_is_not_text_and_a_bad_flag_beside_a_good_file_are_named_as_they_are(tmp_path):
    import argparse

    from denseqa.config import config_from_args

    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\x81\xfe\xff")
    with pytest.raises(InputError, match=r"model.bin: not UTF-8 text \(byte 0\)"):
        config_from_args(argparse.Namespace(config=str(binary)))
    # A bad value from a flag is the command line's, not the (good) file's
    good = tmp_path / "d.yaml"
    good.write_text("train:\n  epochs: 2\n")
    with pytest.raises(InputError, match=r"^command line: train.batch_size must be >= 2"):
        config_from_args(argparse.Namespace(config=str(good), **{"train.batch_size": 1}))
    good.write_text("train:\n  batch_size: 1\n")
    with pytest.raises(InputError, match=r"d.yaml: train.batch_size must be >= 2"):
        config_from_args(argparse.Namespace(config=str(good), **{"train.epochs": 2}))
