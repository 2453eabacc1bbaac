"""Command-line overrides keep text as written; sections and presets are named in errors;
numeric keys without a valid range would fail only once a job runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from ssl_robust.cli import EXIT_USAGE, main
from ssl_robust.config import (
    SCHEMAS,
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    PretrainConfig,
    load_config,
)
from ssl_robust.pipelines.evaluate import check_config

ROOT = Path(__file__).resolve().parents[1]


def _never_run(cfg: DictConfig) -> None:
    raise AssertionError("the pipeline must not run")


# --- text values are taken as written -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("007", "007"),  # YAML: the integer 7
        ("on", "on"),  # YAML 1.1: true
        ("yes", "yes"),
        ("off", "off"),
        ("1e3", "1e3"),  # YAML: 1000.0
        ("0x1F", "0x1F"),
        ("null", "null"),  # YAML: None, which a text key refused
        ("~", "~"),
        ("1.50", "1.50"),
        ("a b", "a b"),  # key="a b" after the shell
        ("a=b", "a=b"),  # only the first '=' separates the key
        ("runs/pre-1", "runs/pre-1"),
        ("''", ""),  # key='' when the quotes get through the shell
        ('""', ""),
        ("", ""),  # key="" after the shell
        ('"a b"', "a b"),
        ("'007'", "007"),
        ("'it''s'", "it's"),
    ],
)
def test_text_overrides_keep_their_text(value: str, expected: str) -> None:
    cfg = load_config(FinetuneConfig, [f"encoder.run={value}"], job="finetune")
    assert cfg.encoder.run == expected
    assert isinstance(cfg.encoder.run, str)
    cfg = load_config(PretrainConfig, [f"wandb.name={value}"])
    assert cfg.wandb.name == expected


def test_text_overrides_of_every_job() -> None:
    cfg = load_config(PretrainConfig, ["wandb.group=1e3", "denoise.run=007", "run.dir=on"])
    assert (cfg.wandb.group, cfg.denoise.run, cfg.run.dir) == ("1e3", "007", "on")
    cfg = load_config(EvaluateConfig, ["classifier.run=0123", "shift.frost=yes"], job="evaluate")
    assert (cfg.classifier.run, cfg.shift.frost) == ("0123", "yes")
    # The shorthand and closed value sets still work (text, then the choice check).
    cfg = load_config(PretrainConfig, ["method=byol", "optim=lars", "data=cifar10"])
    assert (cfg.method.name, cfg.optim.name, cfg.data.name) == ("byol", "lars", "cifar10")
    cfg = load_config(FinetuneConfig, ["data.name=''", "data.like=007"], job="finetune")
    assert (cfg.data.name, cfg.data.like) == ("", "007")
    with pytest.raises(ConfigError, match=r"invalid value 'on' for 'wandb.mode'; choose from"):
        load_config(PretrainConfig, ["wandb.mode=on"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[01,on]", ["01", "on"]),
        ("[01, on, 1e3, yes, null]", ["01", "on", "1e3", "yes", "null"]),
        ("[]", []),
        ("[ ]", []),
        ("[a,]", ["a"]),
        ("['a,b', \"c d\", '']", ["a,b", "c d", ""]),
        ('["x\\"y", z]', ['x"y', "z"]),
        ("[single]", ["single"]),
    ],
)
def test_text_list_overrides_keep_each_elements_text(value: str, expected: list[str]) -> None:
    cfg = load_config(PretrainConfig, [f"wandb.tags={value}"])
    assert list(cfg.wandb.tags) == expected
    cfg = load_config(EvaluateConfig, [f"ood.datasets={value}"], job="evaluate")
    assert list(cfg.ood.datasets) == expected


def test_unterminated_quote_in_a_text_list() -> None:
    with pytest.raises(ConfigError, match=r"unterminated quote .* given to 'wandb.tags'"):
        load_config(PretrainConfig, ["wandb.tags=['a, b]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("shift.corruptions=[fog,,snow]", r"an empty element in the list '\[fog,,snow\]'"),
        ('wandb.tags=[a,"b"c]', r'cannot parse the element "b"c'),
        ("wandb.tags=[a]]", r"cannot parse the element a\]"),
        ("run.dir=runs/${b", r"cannot parse override 'run.dir=runs/\$\{b'"),
    ],
)
def test_malformed_text_overrides_are_refused(override: str, message: str) -> None:
    schema = EvaluateConfig if override.startswith("shift.") else PretrainConfig
    with pytest.raises(ConfigError, match=message):
        load_config(schema, [override])


def test_blanks_around_a_text_value_are_the_command_lines() -> None:
    cfg = load_config(PretrainConfig, ["method= byol", "run.dir= runs/x ", 'wandb.tags=[" a ",b]'])
    assert cfg.method.name == "byol" and cfg.run.dir == "runs/x"
    assert list(cfg.wandb.tags) == [" a ", "b"]  # quoted: kept


def test_non_text_overrides_are_still_yaml() -> None:
    cfg = load_config(
        PretrainConfig,
        [
            "trainer.max_epochs=007",
            "optim.base_lr=1e-3",
            "run.resume=off",
            "data.mean=[0.5, 0.25, 0.125]",
            "data.std=[1, 2, 3]",
        ],
    )
    assert cfg.trainer.max_epochs == 7
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.run.resume is False
    assert list(cfg.data.mean) == [0.5, 0.25, 0.125]
    assert list(cfg.data.std) == [1.0, 2.0, 3.0]
    cfg = load_config(EvaluateConfig, ["ood.held_out_classes=[01, 2]"], job="evaluate")
    assert list(cfg.ood.held_out_classes) == [1, 2]
    # A whole section as a YAML mapping still loads.
    cfg = load_config(PretrainConfig, ["method={name: byol, temperature: 0.2}"])
    assert (cfg.method.name, cfg.method.temperature) == ("byol", 0.2)
    # Later overrides win.
    cfg = load_config(PretrainConfig, ["wandb.name=a", "wandb.name=007"])
    assert cfg.wandb.name == "007"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=", r"empty value for 'trainer.max_epochs'.*expected int \(only text"),
        ("trainer.max_epochs=''", r"empty value for 'trainer.max_epochs'.*expected int"),
        ("optim.base_lr=", r"empty value for 'optim.base_lr'.*expected float"),
        ("run.resume=", r"empty value for 'run.resume'.*expected true or false"),
        ("data.mean=", r"empty value for 'data.mean'.*a list of float.*data.mean=\[\]"),
        ("wandb.tags=", r"empty value for 'wandb.tags'.*a list of str.*wandb.tags=\[\]"),
    ],
)
def test_empty_value_of_a_non_text_key_says_what_is_expected(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(PretrainConfig, [override])


def test_empty_list_overrides() -> None:
    cfg = load_config(PretrainConfig, ["wandb.tags=[a]", "wandb.tags=[]", "data.mean=[]"])
    assert list(cfg.wandb.tags) == [] and list(cfg.data.mean) == []


def test_unknown_key_with_a_text_like_value_is_still_unknown() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'wandb.nam'.*'wandb.name'"):
        load_config(PretrainConfig, ["wandb.nam="])


def test_script_keeps_text_values(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "pretrain.py"),
            "wandb.name=007",
            "wandb.tags=[01,on]",
            "wandb.group=",
            "--print-config",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "  name: '007'\n" in res.stdout
    assert "  tags:\n  - '01'\n  - 'on'\n" in res.stdout
    assert "  group: ''\n" in res.stdout


# --- a section given a value ------------------------------------------------------------------


def test_section_given_a_value_on_the_command_line_names_it_and_its_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, ["trainer=5"])
    msg = str(err.value)
    assert msg.startswith("'trainer' is a section with keys accelerator, accumulate_grad_batches")
    assert "max_epochs" in msg and "the command line gives it the value '5'" in msg
    assert msg.endswith("e.g. trainer.max_epochs=VALUE")
    assert "'?'" not in msg


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("wandb=online", "(did you mean wandb.mode=online?)"),  # used to set wandb.name
        ("wandb=myrun", "e.g. wandb.mode=VALUE"),
        ("monitor=3", "e.g. monitor.knn_k=VALUE"),
        ("views=0.5", "e.g. views.min_scale=VALUE"),
        ("trainer=gpu", "(did you mean trainer.accelerator=gpu?)"),
    ],
)
def test_shorthand_only_for_sections_whose_name_has_choices(override: str, hint: str) -> None:
    section = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^'{section}' is a section with keys ") as err:
        load_config(PretrainConfig, [override])
    assert str(err.value).endswith(hint)


def test_shorthand_per_job() -> None:
    # The finetune job's data.name has choices ("" among them); the evaluation job has no
    # section with a named choice.
    cfg = load_config(FinetuneConfig, ["data=cifar10"], job="finetune")
    assert cfg.data.name == "cifar10"
    with pytest.raises(ConfigError, match=r"^'purifier' is a section with keys"):
        load_config(EvaluateConfig, ["purifier=ddim"], job="evaluate")
    with pytest.raises(ConfigError, match=r"^'encoder' is a section with keys backbone, run"):
        load_config(FinetuneConfig, ["encoder=runs/pre"], job="finetune")


def test_section_given_a_value_in_a_preset_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad2.yaml"
    bad.write_text("method: byol\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, [str(bad)])
    msg = str(err.value)
    assert msg.startswith("'method' is a section with keys base_tau, joint_views, name, pred_hid")
    assert f"config file '{bad}' gives it the value 'byol'" in msg
    assert msg.endswith("(did you mean method: {name: byol}?)")
    # A section left empty (all its keys commented out) and one given a list.
    bad.write_text("trainer:\n#  max_epochs: 3\n")
    with pytest.raises(
        ConfigError, match=r"'trainer' is a section.*config file .*bad2.yaml' gives it no value"
    ):
        load_config(PretrainConfig, [str(bad)])
    bad.write_text("data:\n  name: digits\nviews: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"'views' is a section.*bad2.yaml' gives it the value"):
        load_config(PretrainConfig, [str(bad)])


def test_unknown_key_in_a_preset_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("data:\n  batchsize: 12\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, ["byol_cifar10", str(bad)])
    assert str(err.value).startswith(
        f"unknown config key 'data.batchsize' in config file '{bad}'; valid keys under 'data': "
    )
    assert str(err.value).endswith("(did you mean 'data.batch_size'?)")
    # A wrong type in a file names the file too; the command line keeps its wording.
    bad.write_text("trainer:\n  max_epochs: many\n")
    with pytest.raises(
        ConfigError,
        match=rf"invalid value for 'trainer.max_epochs' in config file '{bad}'.*expected int",
    ):
        load_config(PretrainConfig, [str(bad)])
    with pytest.raises(ConfigError, match=r"^unknown config key 'optim.lrr'; valid keys under"):
        load_config(PretrainConfig, ["optim.lrr=0.1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adv.linf_eps=8", "'adv.linf_eps' is a list of float: write adv.linf_eps=[8]"),
        (
            "shift.corruptions=fog,snow",
            "'shift.corruptions' is a list of str: write shift.corruptions=[fog,snow]",
        ),
        ("wandb.tags=a", "'wandb.tags' is a list of str: write wandb.tags=[a]"),
    ],
)
def test_a_list_key_given_one_value_says_to_write_a_list(
    override: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """OmegaConf's words were "AnyNode is not a ListConfig, list or tuple"."""
    with pytest.raises(ConfigError) as err:
        load_config(EvaluateConfig, [override], job="evaluate")
    assert str(err.value) == message
    assert main("evaluate", [override], pipeline=_never_run) == EXIT_USAGE
    assert capsys.readouterr().err == f"error: {message}\n"
    # The suggested fix loads.
    key, _, value = override.partition("=")
    fixed = load_config(EvaluateConfig, [f"{key}=[{value}]"], job="evaluate")
    assert len(OmegaConf.select(fixed, key)) == value.count(",") + 1


def test_a_list_key_given_one_value_in_a_preset_says_to_write_a_list(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("adv:\n  linf_eps: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(EvaluateConfig, [str(preset)], job="evaluate")
    assert str(err.value) == (
        f"'adv.linf_eps' is a list of float, but config file '{preset}' gives it 8; write it as "
        "a list: [8]"
    )
    preset.write_text("shift:\n  corruptions:\n")
    with pytest.raises(ConfigError) as err:
        load_config(EvaluateConfig, [str(preset)], job="evaluate")
    assert str(err.value) == (
        f"'shift.corruptions' is a list of str, but config file '{preset}' gives it no value; "
        "write a list ([] for an empty one)"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer=5"], "error: 'trainer' is a section with keys"),
        (["wandb=online"], "(did you mean wandb.mode=online?)"),
        (["monitor.knn_t=0"], "error: invalid value 0.0 for 'monitor.knn_t': must be > 0"),
        (["monitor.knn_k=0"], "error: invalid value 0 for 'monitor.knn_k': must be >= 1"),
        (["trainer.max_epochs="], "error: empty value for 'trainer.max_epochs'"),
    ],
)
def test_cli_exits_2_before_any_work(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main("pretrain", args, pipeline=_never_run) == EXIT_USAGE
    assert expected in capsys.readouterr().err


def test_script_exits_2_on_a_section_value_and_on_knn_t(tmp_path: Path) -> None:
    bad = tmp_path / "bad2.yaml"
    bad.write_text("method: byol\n")
    for args, expected in [
        (["monitor.knn_t=0"], "error: invalid value 0.0 for 'monitor.knn_t': must be > 0\n"),
        (["wandb=online"], "error: 'wandb' is a section with keys"),
        ([str(bad)], f"config file '{bad}' gives it the value 'byol'"),
    ]:
        res = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == EXIT_USAGE, res.stderr
        assert expected in res.stderr
        assert "Traceback" not in res.stderr
        assert not (tmp_path / "runs").exists()


# --- ranges added at load ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "override", "must_be"),
    [
        ("pretrain", "monitor.knn_k=0", ">= 1"),  # OnlineMonitor raised at job start (exit 1)
        ("pretrain", "monitor.knn_t=0", "> 0"),
        ("pretrain", "monitor.knn_t=-0.1", "> 0"),
        ("pretrain", "run.seed=-1", "in 0..4294967295"),  # seed_everything's traceback
        ("pretrain", "run.seed=4294967296", "in 0..4294967295"),
        ("denoiser", "run.seed=-1", "in 0..4294967295"),
        ("finetune", "run.seed=-1", "in 0..4294967295"),
        ("evaluate", "run.seed=-1", "in 0..4294967295"),
        ("pretrain", "wandb.init_timeout_s=0", "> 0"),
        ("evaluate", "wandb.init_timeout_s=-5", "> 0"),
        ("pretrain", "data.std=[0.5, 0, 0.5]", "each > 0"),  # a division by zero
        ("finetune", "data.std=[-1]", "each > 0"),
    ],
)
def test_new_ranges_name_the_key(job: str, override: str, must_be: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"invalid value .* for '{key}': must be {must_be}"):
        load_config(SCHEMAS[job], [override], job=job)


def test_new_ranges_accept_their_edges() -> None:
    cfg = load_config(
        PretrainConfig,
        ["monitor.knn_k=1", "monitor.knn_t=1e-3", "run.seed=0", "data.std=[0.1]"],
    )
    assert (cfg.monitor.knn_k, cfg.monitor.knn_t, cfg.run.seed) == (1, 1e-3, 0)
    assert load_config(PretrainConfig, ["run.seed=4294967295"]).run.seed == 2**32 - 1


def test_help_shows_the_new_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("pretrain", ["--help", "monitor"], pipeline=_never_run) == 0
    out = capsys.readouterr().out
    assert "  monitor.knn_k = 200   (>= 1)\n" in out
    assert "  monitor.knn_t = 0.1   (> 0)\n" in out
    assert main("pretrain", ["--help", "run.seed"], pipeline=_never_run) == 0
    assert "  run.seed = 0   (in 0..4294967295)\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "must_be"),
    [
        ("eval.examples=17", "in 0..16"),
        ("eval.batch_size=0", ">= 1"),
        ("clean.draws=0", ">= 1"),
        ("adv.steps=0", ">= 1"),
        ("adv.shards=0", ">= 1"),
        ("cert.alpha=0.5", r"in \(0, 0.5\)"),
        ("calib.temperature_folds=1", ">= 2"),
        ("ood.bank_size=1", r"0 \(all\) or >= 2"),
        ("perf.iters=0", ">= 1"),
    ],
)
def test_evaluation_ranges_are_checked_when_the_config_loads(override: str, must_be: str) -> None:
    """Before, the evaluation job checked these only when it started (and --help showed none);
    a config built in code still meets the same check in the pipeline."""
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"invalid value {value} for '{key}': must be {must_be}"):
        load_config(SCHEMAS["evaluate"], ["classifier.run=x", override], job="evaluate")
    cfg = load_config(SCHEMAS["evaluate"], ["classifier.run=x"], job="evaluate")
    OmegaConf.update(cfg, key, float(value) if "." in value else int(value))
    with pytest.raises(ConfigError, match=rf"invalid value {value} for '{key}': must be {must_be}"):
        check_config(cfg)


def test_evaluation_ranges_accept_their_edges_and_show_in_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    edges = ["eval.examples=16", "eval.examples=0", "ood.bank_size=0", "ood.bank_size=2"]
    for edge in edges:
        check_config(load_config(SCHEMAS["evaluate"], ["classifier.run=x", edge], job="evaluate"))
    assert main("evaluate", ["--help", "adv"], pipeline=_never_run) == 0
    out = capsys.readouterr().out
    assert "  adv.steps = 100   (>= 1)\n" in out
    assert "  adv.shards = 1   (>= 1)\n" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("samples.steps=2000", "samples.steps must be in [1, 1000] (denoiser.num_train_timesteps)"),
        ("samples.t_star=1001", "samples.t_star must be in [0, 1000]"),
        ("denoiser.beta_start=0.03", "denoiser.beta_start (0.03) must be <= denoiser.beta_end"),
    ],
)
def test_denoiser_bounds_across_keys_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    """Bounds that depend on another key exit 2 before any data is read (they raised a
    ValueError after loading the data: exit 1)."""
    run = tmp_path / "den"
    assert main("denoiser", [override, f"run.dir={run}"]) == EXIT_USAGE
    assert f"error: {message}" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("job", sorted(SCHEMAS))
def test_the_help_options_examples_are_keys_of_the_job(
    job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help's own line names a section and a key of this job, and both work."""
    from ssl_robust.cli import _HELP_EXAMPLES

    assert set(_HELP_EXAMPLES) == set(SCHEMAS)
    section, key = _HELP_EXAMPLES[job]
    assert main(job, ["--help"], pipeline=_never_run) == 0
    assert f"with a section ({section}) or a key ({key})" in capsys.readouterr().out
    for topic in (section, key):
        assert main(job, ["--help", topic], pipeline=_never_run) == 0
        assert f"  {key} = " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.backbone=resnet19_cifar", "model.backbone: unknown backbone 'resnet19_cifar'"),
        ("denoise.t_min=150", "denoise.t_min (150) must be <= denoise.t_max (100)"),
    ],
)
def test_pretraining_settings_that_failed_once_running_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    """They passed --print-config and chain --check, then failed with exit 1 (t_min > t_max
    without denoise.run even trained)."""
    run = tmp_path / "run"
    assert main("pretrain", [override, f"run.dir={run}"]) == EXIT_USAGE
    assert f"error: {message}" in capsys.readouterr().err
    assert not run.exists()
    from ssl_robust.pipelines.chain import check_steps, plan_chain

    (error,) = check_steps(plan_chain(tmp_path / "c", pretrain=override))
    assert error.startswith(f"pretrain: {message}")


def test_purification_sigma_means_the_same_in_fine_tuning_and_evaluation() -> None:
    """0 = use t_star in both (fine-tuning's -1 was off and 0 there meant t* = 0)."""
    from ssl_robust.config import EvaluateConfig

    ft = load_config(FinetuneConfig, [], job="finetune")
    ev = load_config(EvaluateConfig, [], job="evaluate")
    assert ft.purify.sigma == ev.purifier.sigma == 0.0
    for job, key in (("finetune", "purify.sigma"), ("evaluate", "purifier.sigma")):
        with pytest.raises(ConfigError, match=rf"'{key}': must be >= 0; 0 = use "):
            load_config(SCHEMAS[job], [f"{key}=-1"], job=job)


def test_fine_tunings_purifier_takes_t_star_at_sigma_0_and_sigmas_t_star_above(
    tmp_path: Path,
) -> None:
    from ssl_robust.pipelines.finetune import build_purifier
    from tests.eval_runs import tiny_denoiser

    den = tiny_denoiser(tmp_path / "den")
    for sigma, t_star in ((0.0, 7), (0.1, 58)):  # 58: sigma 0.1 on the linear 1000-step schedule
        cfg = load_config(
            FinetuneConfig,
            [f"purify.run={den}", "purify.t_star=7", f"purify.sigma={sigma}"],
            job="finetune",
        )
        purifier = build_purifier(cfg.purify, 8)
        assert purifier is not None and purifier.t_star == t_star


def test_the_pretraining_checks_leave_the_random_state_alone() -> None:
    """The backbone-name check builds a throwaway backbone; in the seeded random stream it
    changed the run's initial weights (the default job's kNN accuracy went from 0.928 to
    0.894)."""
    import torch

    from ssl_robust.pipelines.pretrain import check_config

    cfg = load_config(PretrainConfig, [])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    check_config(cfg)
    assert torch.equal(torch.get_rng_state(), state)
