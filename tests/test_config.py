from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssl_robust.config import (
    SCHEMAS,
    ConfigError,
    PretrainConfig,
    config_root,
    job_choices,
    job_ranges,
    load_config,
    schema_keys,
)
from ssl_robust.config.common import COMMON_RANGES

YAMLS = sorted(config_root().glob("*/*.yaml"))


def test_there_are_presets() -> None:
    names = {p.stem for p in YAMLS}
    assert {
        "default",
        "simclr_cifar10",
        "byol_cifar10",
        "simclr_cifar100",
        "byol_cifar100",
    } <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_validates_against_its_schema(path: Path) -> None:
    job = path.parent.name
    assert job in SCHEMAS, f"configs/{job}/ has no schema; known jobs: {sorted(SCHEMAS)}"
    by_name = load_config(SCHEMAS[job], [path.stem], job=job)
    by_path = load_config(SCHEMAS[job], [str(path)], job=job)
    assert by_name == by_path


def test_default_preset_equals_schema_defaults() -> None:
    assert load_config(PretrainConfig, ["default"]) == load_config(PretrainConfig, [])


def test_precedence_schema_then_preset_then_command_line() -> None:
    cfg = load_config(
        PretrainConfig, ["byol_cifar10", "trainer.max_epochs=3", "data.batch_size=64"]
    )
    assert cfg.method.name == "byol"  # preset
    assert cfg.model.backbone == "resnet18_cifar"  # preset
    assert cfg.trainer.max_epochs == 3  # command line beats preset (200)
    assert cfg.data.batch_size == 64
    assert cfg.monitor.knn_k == 200  # schema default kept


def test_group_shorthand_selects_by_name() -> None:
    cfg = load_config(PretrainConfig, ["method=byol", "data=cifar10", "trainer.max_epochs=200"])
    assert (cfg.method.name, cfg.data.name, cfg.trainer.max_epochs) == ("byol", "cifar10", 200)


def test_typo_names_key_and_valid_choices() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'optim.lrr'; valid keys under 'optim': "
        r"base_lr, decay_norm_bias, lr_scaling",
    ):
        load_config(PretrainConfig, ["optim.lrr=0.1"])
    with pytest.raises(
        ConfigError, match=r"'trainer.max_epoch'.*did you mean 'trainer.max_epochs'"
    ):
        load_config(PretrainConfig, ["trainer.max_epoch=3"])


def test_typo_in_yaml_names_file_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batchsize: 12\n")
    with pytest.raises(ConfigError, match=r"'data.batchsize'.*batch_size"):
        load_config(PretrainConfig, [str(bad)])


def test_wrong_type_names_key_and_expected_type() -> None:
    with pytest.raises(ConfigError, match=r"'trainer.max_epochs'.*expected int"):
        load_config(PretrainConfig, ["trainer.max_epochs=many"])
    with pytest.raises(ConfigError, match=r"'run.resume'.*true or false"):
        load_config(PretrainConfig, ["run.resume=perhaps"])


def test_bad_choice_lists_valid_values() -> None:
    with pytest.raises(ConfigError, match=r"'method.name'.*\['byol', 'simclr'\]"):
        load_config(PretrainConfig, ["method=mocov3"])
    with pytest.raises(ConfigError, match=r"'wandb.mode'.*disabled.*offline.*online"):
        load_config(PretrainConfig, ["wandb.mode=cloud"])


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_epochs=0",  # Lightning would train nothing and export the untrained model
        "trainer.accumulate_grad_batches=0",  # a ZeroDivisionError deep in the fit
        "trainer.limit_train_batches=0",  # a warm-up longer than the run
        "trainer.limit_val_batches=1.5",  # neither a fraction nor a number of batches
        "trainer.gradient_clip_val=-1",
        "trainer.log_every_n_steps=0",
        "trainer.curves_every_s=-5",
        "trainer.num_nodes=0",
    ],
)
@pytest.mark.parametrize("job", ["pretrain", "denoiser", "finetune"])
def test_out_of_range_trainer_values_name_the_key_and_the_range(job: str, override: str) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"invalid value {value}(\.0)? for '{key}': must be "):
        load_config(SCHEMAS[job], [override], job=job)


@pytest.mark.parametrize(
    "override",
    [
        "method.temperature=0",  # lightly's NT-Xent refuses it only once training starts
        "monitor.every_n_epochs=0",  # a ZeroDivisionError in the first epoch
        "data.image_size=-4",
        "model.width=0",  # a convolution with no filters
        "views.hf_prob=2",
        "method.base_tau=1.5",
    ],
)
def test_out_of_range_pretraining_values_name_the_key(override: str) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"invalid value {value}(\.0)? for '{key}': must be "):
        load_config(PretrainConfig, [override])


@pytest.mark.parametrize(
    ("job", "override"),
    [
        ("denoiser", "samples.every_n_epochs=0"),  # failed only once the fit started (exit 1)
        ("denoiser", "denoiser.lr=0"),
        ("denoiser", "denoiser.ema_decay=1.5"),
        ("denoiser", "denoiser.beta_end=2"),
        ("finetune", "subset.fraction=0"),
        ("finetune", "subset.fraction=1.5"),
        ("finetune", "optim.momentum=1"),
        ("finetune", "augment.hflip_prob=-0.1"),
        ("finetune", "purify.ddim_steps=0"),
        ("pretrain", "optim.base_lr=0"),
        ("pretrain", "optim.warmup_epochs=-1"),
        ("pretrain", "data.batch_size=0"),
        ("pretrain", "data.val_fraction=1"),
    ],
)
def test_out_of_range_values_of_each_job_name_the_key(job: str, override: str) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"invalid value {value}(\.0)? for '{key}': must be "):
        load_config(SCHEMAS[job], [override], job=job)


@pytest.mark.parametrize("job", sorted(SCHEMAS))
def test_every_range_names_a_real_key_of_its_job(job: str) -> None:
    """A misspelt key in a range table would silently check nothing."""
    keys = set(schema_keys(SCHEMAS[job]))
    own = set(job_ranges(job)) - set(COMMON_RANGES)
    assert own <= keys
    every_job_key = set().union(*(schema_keys(s) for s in SCHEMAS.values()))
    assert set(COMMON_RANGES) <= every_job_key


def test_edge_values_in_range_load() -> None:
    edges = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=0.25"]
    edges += ["trainer.gradient_clip_val=0", "trainer.curves_every_s=0", "trainer.max_epochs=1"]
    cfg = load_config(PretrainConfig, edges)
    assert cfg.trainer.limit_train_batches == 3 and cfg.trainer.curves_every_s == 0


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown pretrain preset 'simclr_cifar11'.*simclr_cifar10"
    ):
        load_config(PretrainConfig, ["simclr_cifar11"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, ["/nonexistent/x.yaml"])


def test_a_misspelt_preset_gets_the_closest_name() -> None:
    from ssl_robust.config import available_presets

    with pytest.raises(ConfigError) as err:
        load_config(SCHEMAS["evaluate"], ["quik"], job="evaluate")
    assert str(err.value) == (
        f"unknown evaluate preset 'quik'; choose from {available_presets('evaluate')} or give a "
        "path to a YAML file (did you mean 'quick'?)"
    )
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, ["zzz"])
    assert str(err.value).endswith("or give a path to a YAML file")


def test_choices_match_the_code_that_implements_them() -> None:
    from ssl_robust.data.datasets import DATASETS
    from ssl_robust.methods import METHODS
    from ssl_robust.methods.optim import LR_SCALING, OPTIMIZERS

    choices = job_choices("pretrain")
    assert set(choices["method.name"]) == set(METHODS)
    assert set(choices["data.name"]) == set(DATASETS)
    assert set(choices["optim.name"]) == set(OPTIMIZERS)
    assert set(choices["optim.lr_scaling"]) == set(LR_SCALING)


def _own_choices() -> dict[str, dict[str, tuple[str, ...]]]:
    from ssl_robust.config import denoiser, evaluate, finetune, pretrain

    return {
        "pretrain": pretrain.CHOICES,
        "denoiser": denoiser.CHOICES,
        "finetune": finetune.CHOICES,
        "evaluate": evaluate.CHOICES,
    }


def test_the_shared_choices_name_keys_of_some_job() -> None:
    from ssl_robust.config import COMMON_CHOICES

    assert set(_own_choices()) == set(SCHEMAS)
    every_key = set().union(*(schema_keys(schema) for schema in SCHEMAS.values()))
    assert set(COMMON_CHOICES) <= every_key
    # The jobs with data and trainer sections check the shared choices; evaluate has neither.
    for job in ("pretrain", "denoiser", "finetune"):
        assert set(COMMON_CHOICES) <= set(schema_keys(SCHEMAS[job])), job


@pytest.mark.parametrize("job", sorted(SCHEMAS))
def test_every_job_choice_names_a_real_key(job: str) -> None:
    from omegaconf import OmegaConf

    from ssl_robust.config import COMMON_CHOICES

    keys = set(schema_keys(SCHEMAS[job]))
    own = _own_choices()[job]
    assert own and set(own) <= keys
    assert job_choices(job) == {**COMMON_CHOICES, **own}
    defaults = load_config(SCHEMAS[job], [], job=job)
    for key, values in job_choices(job).items():
        if key not in keys:
            continue  # a shared section this job does not have
        # The schema default is one of the choices; each choice loads and reads back; any other
        # value is refused, naming the key.
        assert OmegaConf.select(defaults, key) in values, key
        for value in values:
            written = value or "''"  # an empty choice is written ''
            cfg = load_config(SCHEMAS[job], [f"{key}={written}"], job=job)
            assert OmegaConf.select(cfg, key) == value, (key, value)
        with pytest.raises(ConfigError, match=re.escape(f"invalid value 'nonsense' for '{key}'")):
            load_config(SCHEMAS[job], [f"{key}=nonsense"], job=job)


def test_unknown_job() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown job 'train'; choose from \['denoiser', 'evaluate', 'finetune', 'pre",
    ):
        job_choices("train")


def test_evaluation_default_grid_is_the_corruption_registry() -> None:
    from ssl_robust.config.evaluate import BENCHMARK_CORRUPTIONS
    from ssl_robust.evaluate.corruptions import CORRUPTIONS

    assert list(CORRUPTIONS) == BENCHMARK_CORRUPTIONS


def test_evaluation_frost_source_defaults_to_procedural() -> None:
    from ssl_robust.config import EvaluateConfig

    assert load_config(EvaluateConfig, [], job="evaluate").shift.frost == "procedural"
    cfg = load_config(EvaluateConfig, ["shift.frost=package"], job="evaluate")
    assert cfg.shift.frost == "package"
