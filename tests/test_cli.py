"""The job scripts' command line: --help with every key, --print-config, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig

from ssl_robust.cli import EXIT_ERROR, EXIT_USAGE, PIPELINES, ArgumentParser, main, script_name
from ssl_robust.config import SCHEMAS, ConfigError, job_choices, load_config, schema_keys, to_dict
from ssl_robust.config.common import DataConfig
from ssl_robust.config.describe import field_comments, format_value
from ssl_robust.config.finetune import FinetuneDataConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "pretrain": "pretrain.py",
    "denoiser": "train_denoiser.py",
    "finetune": "finetune.py",
    "evaluate": "evaluate.py",
}


def _never_run(cfg: DictConfig) -> None:
    raise AssertionError("the pipeline must not run")


@dataclass
class _Commented:
    # The comment of a.
    a: int = 0
    b: int = 1


def test_field_comments_come_from_the_schema_source() -> None:
    data = field_comments(DataConfig)
    assert data["augment"].startswith("Pretraining only (fine-tuning and denoiser training")
    assert data["augment"].endswith("works on the CPU too).")
    assert field_comments(_Commented) == {"a": "The comment of a.", "b": ""}
    # A subclass redeclaring a field has its own comment; inherited fields keep the base's.
    sub = field_comments(FinetuneDataConfig)
    assert sub["name"].startswith('"" fine-tunes on the data the encoder was pretrained on')
    assert sub["augment"] == data["augment"]
    assert set(sub) == {f for f in FinetuneDataConfig.__dataclass_fields__}


@pytest.mark.parametrize("job", sorted(PIPELINES))
def test_every_key_has_a_description(job: str, capsys: pytest.CaptureFixture[str]) -> None:
    for key in schema_keys(SCHEMAS[job]):
        assert main(job, ["--help", key], pipeline=_never_run) == 0
        lines = capsys.readouterr().out.split("keys (")[1].splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {key} = "))
        assert lines[at + 1 : at + 2] and lines[at + 1].startswith("      "), f"{key}: no text"


def test_format_value() -> None:
    assert format_value("") == '""'
    assert format_value("digits") == "digits"
    assert format_value(True) == "true"
    assert format_value([1, 2.5]) == "[1, 2.5]"
    assert format_value(None) == "null"


@pytest.mark.parametrize("job", sorted(PIPELINES))
def test_help_lists_every_key_with_its_value_and_choices(
    job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(job, ["--help"], doc="Doc line.", prog="x.py", pipeline=_never_run) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: x.py [PRESET ...] [KEY=VALUE ...]")
    assert "Doc line." in out
    cfg = load_config(SCHEMAS[job], [], job=job)
    lines = out.splitlines()
    for key in schema_keys(SCHEMAS[job]):
        value = format_value(cfg_value(cfg, key))
        line = next((ln for ln in lines if ln.startswith(f"  {key} = ")), None)
        assert line is not None, f"{key} missing from --help"
        assert line.startswith(f"  {key} = {value}"), line
        if key in job_choices(job):
            shown = ", ".join(format_value(c) for c in job_choices(job)[key])
            assert line.endswith("{" + shown + "}"), line
    assert "run.resume = true\n      Rerunning with the same directory continues" in out


def test_help_shows_an_empty_choice_and_gives_top_level_keys_their_own_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main("finetune", ["--help"], pipeline=_never_run) == 0
    out = capsys.readouterr().out
    assert '  data.name = ""   {"", cifar10, cifar100, digits, imagefolder, stl10}\n' in out
    # mode is no key of the run section printed above it.
    assert (
        "what its first piece began.\n\ntop-level keys:\n  mode = linear   {full, linear}\n" in out
    )
    assert "{full, linear}\n      linear: a linear head on frozen, cached features; full: " in out
    assert "\n\nencoder:\n  encoder.run = " in out


def cfg_value(cfg: DictConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = node[part]  # type: ignore[index]
    return node


def test_help_shows_the_values_the_presets_give_and_filters_by_section(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["byol_cifar10", "optim.base_lr=0.5", "--help", "optim"]
    assert main("pretrain", args, pipeline=_never_run) == 0
    out = capsys.readouterr().out
    assert "keys (byol_cifar10, optim.base_lr=0.5;" in out
    assert "  optim.base_lr = 0.5   (> 0)\n" in out
    assert "  optim.name = sgd   {lars, sgd}" in out
    assert "method." not in out.split("keys (")[1]
    # A single key; and a section listing with its docstring.
    assert main("pretrain", ["--help", "method.base_tau"], pipeline=_never_run) == 0
    out = capsys.readouterr().out.split("keys (")[1]
    assert [ln for ln in out.splitlines() if " = " in ln] == [
        "  method.base_tau = 0.99   (in [0, 1])"
    ]
    assert main("pretrain", ["-h", "views"], pipeline=_never_run) == 0
    assert "views:\n  Parameters of lightly's SimCLR/BYOL view" in capsys.readouterr().out


def test_help_on_an_unknown_section_names_the_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("evaluate", ["--help", "ad"], pipeline=_never_run) == EXIT_USAGE
    assert capsys.readouterr().err == (
        "error: no config key 'ad' in the evaluate job; valid keys at the top level: run, "
        "classifier, purifier, eval, clean, shift, natural, adv, cert, calib, ood, perf, wandb "
        "(did you mean 'adv'?)\n"
    )


@pytest.mark.parametrize(
    ("topic", "hint"),
    [
        ("trainer.max_epoch", " (did you mean 'trainer.max_epochs'?)"),  # was: 'trainer'
        ("trainer.progress", " (did you mean 'trainer.progress_bar'?)"),
        ("trainer.zzz", ""),
    ],
)
def test_help_on_an_unknown_key_suggests_the_closest_full_key(
    topic: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main("pretrain", ["--help", topic], pipeline=_never_run) == EXIT_USAGE
    keys = [k.split(".")[1] for k in schema_keys(SCHEMAS["pretrain"]) if k.startswith("trainer.")]
    assert capsys.readouterr().err == (
        f"error: no config key {topic!r} in the pretrain job; valid keys under 'trainer': "
        f"{', '.join(keys)}{hint}\n"
    )
    assert main("pretrain", ["--help", "traner.max_epochs"], pipeline=_never_run) == EXIT_USAGE
    assert capsys.readouterr().err.endswith(" (did you mean 'trainer.max_epochs'?)\n")


@pytest.mark.parametrize(
    ("argv0", "shown"),
    [
        ("scripts/x.py", "scripts/x.py"),  # relative to the working directory: as it is
        ("../main/scripts/x.py", "scripts/x.py"),  # back into it: relative
        ("../other/scripts/x.py", "../other/scripts/x.py"),  # climbing out: as typed
        ("{cwd}/scripts/x.py", "scripts/x.py"),  # absolute, below the working directory
        ("{parent}/other/x.py", "{parent}/other/x.py"),  # absolute, elsewhere: as typed
    ],
)
def test_usage_shows_the_script_as_typed_when_its_path_climbs_out(
    argv0: str,
    shown: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cwd = tmp_path / "main"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fill = {"cwd": str(cwd), "parent": str(tmp_path)}
    monkeypatch.setattr(sys, "argv", [argv0.format(**fill)])
    assert main("pretrain", ["--help", "run"], pipeline=_never_run) == 0
    assert capsys.readouterr().out.startswith(f"usage: {shown.format(**fill)} [PRESET ...]")
    assert script_name("d.py") == shown.format(**fill)
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert script_name("d.py") == "d.py"


def test_argument_parser_errors_are_one_line_naming_the_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["scripts/tool.py"])
    parser = ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="x")
    parser.add_argument("--mode", choices=["a", "b"])
    for argv, message in [
        (["r", "--bogus"], "unrecognized arguments: --bogus; valid options: --help, --out, --mode"),
        ([], "the following arguments are required: runs"),
        (["r", "--mode", "c"], "argument --mode: invalid choice: 'c' (choose from 'a', 'b')"),
    ]:
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == EXIT_USAGE
        assert capsys.readouterr().err == (
            f"error: {message}\nscripts/tool.py --help lists every option\n"
        )


def test_unknown_option_and_bad_config_exit_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main("pretrain", ["--dry-run"], pipeline=_never_run) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown option '--dry-run'" in err and "--print-config" in err
    assert main("pretrain", ["trainer.max_epoch=3"], pipeline=_never_run) == EXIT_USAGE
    assert "did you mean 'trainer.max_epochs'" in capsys.readouterr().err
    assert main("pretrain", ["method=mocov9"], pipeline=_never_run) == EXIT_USAGE
    assert "choose from ['byol', 'simclr']" in capsys.readouterr().err
    # A required key left empty is found by the pipeline before it loads or writes anything.
    assert main("finetune", [f"run.dir={tmp_path / 'ft'}"]) == EXIT_USAGE
    assert "error: encoder.run is empty" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_print_config_prints_the_resolved_config_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = ["simclr_cifar10", "trainer.max_epochs=7", f"run.dir={run_dir}"]
    assert main("pretrain", [*args, "--print-config"], pipeline=_never_run) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(SCHEMAS["pretrain"], args, job="pretrain"))
    assert printed["trainer"]["max_epochs"] == 7
    assert printed["model"]["backbone"] == "resnet18_cifar"
    assert not run_dir.exists()


def test_bad_input_while_running_is_one_line_and_library_errors_keep_their_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real pipeline, stopped by the data layer: one line naming the path, exit 1.
    missing = tmp_path / "nothing-here"
    args = ["data=imagefolder", f"data.root={missing}", f"run.dir={tmp_path / 'run'}"]
    assert main("pretrain", args) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"error: image folder '{missing}' does not exist" in err
    assert "Traceback" not in err

    # An error raised outside the package is a bug to debug: it propagates with its traceback.
    def library_error(cfg: DictConfig) -> None:
        raise ValueError("shape mismatch deep in a library")

    with pytest.raises(ValueError, match="shape mismatch"):
        main("pretrain", [], pipeline=library_error)

    # SSL_ROBUST_TRACEBACK=1 shows the traceback of the package's own errors too.
    monkeypatch.setenv("SSL_ROBUST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main("pretrain", args)


def test_a_finished_or_failed_job_releases_its_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    def distributed_job(cfg: DictConfig) -> None:
        # What a DDP fit leaves behind: an initialised process group (here of one rank).
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", world_size=1, rank=0
        )
        assert dist.is_initialized()

    assert main("pretrain", [], pipeline=distributed_job) == 0
    assert not dist.is_initialized()

    def failing_job(cfg: DictConfig) -> None:
        distributed_job(cfg)
        raise RuntimeError("a crash")

    (tmp_path / "pg").unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match="a crash"):
        main("pretrain", [], pipeline=failing_job)
    assert not dist.is_initialized()


@pytest.mark.parametrize("job", sorted(SCRIPTS))
def test_every_job_script_answers_help(job: str) -> None:
    res = subprocess.run(
        [sys.executable, f"scripts/{SCRIPTS[job]}", "--help", "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: scripts/{SCRIPTS[job]} [PRESET ...]")
    assert "  run.dir = " in res.stdout and "--print-config" in res.stdout
    assert f"python scripts/{SCRIPTS[job]} --help [SECTION]" in res.stdout  # the docstring


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("compare.py", [], "give run directories (or folders holding them), or --wandb-project"),
        ("chain.py", ["runs"], "one of the arguments --pretrain --encoder is required"),
    ],
)
def test_compare_and_chain_usage_errors_are_one_line_like_the_job_scripts(
    script: str, args: list[str], message: str
) -> None:
    res = subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == EXIT_USAGE
    assert res.stderr == f"error: {message}\nscripts/{script} --help lists every option\n"


def test_summary_prints_every_written_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssl_robust.pipelines.common import print_summary

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "encoder.safetensors").write_bytes(b"")
    extra = {"Encoder": "runs/x/encoder.safetensors", "Fit time": "4.2 s"}
    print_summary("t", Path("runs/x"), {"val/knn_acc": 0.5}, extra)
    out = capsys.readouterr().out
    assert f"Run directory: {tmp_path / 'runs' / 'x'}\n" in out
    assert f"Encoder: {tmp_path / 'runs' / 'x' / 'encoder.safetensors'}\n" in out
    assert "Fit time: 4.2 s\n" in out


def test_a_job_finishes_its_wandb_run_before_it_returns(tmp_path: Path) -> None:
    """Left open, wandb's service closed it at exit with its own coloured lines in the log."""
    wandb = pytest.importorskip("wandb")
    from tests.conftest import TINY_PRETRAIN

    args = [*TINY_PRETRAIN, "trainer.max_epochs=1", "wandb.mode=offline", f"run.dir={tmp_path}"]
    assert main("pretrain", args) == 0
    assert wandb.run is None
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(folder.glob("run-*.wandb"))


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, 0), (ConfigError("bad"), 2), (RuntimeError("a bug"), 1), (KeyboardInterrupt(), 130)],
)
def test_the_wandb_run_ends_with_the_jobs_exit_status(
    monkeypatch: pytest.MonkeyPatch, error: BaseException | None, status: int
) -> None:
    """A failed or interrupted job showed in wandb as finished (exit code 0)."""
    wandb = pytest.importorskip("wandb")
    codes: list[int] = []
    monkeypatch.setattr(wandb, "run", object())  # a run the job opened
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None: codes.append(exit_code))

    def job(cfg: DictConfig) -> None:
        if error is not None:
            raise error

    if isinstance(error, RuntimeError):  # not ours: it keeps its traceback
        with pytest.raises(RuntimeError):
            main("evaluate", ["classifier.run=x"], pipeline=job)
    else:
        assert main("evaluate", ["classifier.run=x"], pipeline=job) == status
    assert codes == [status]
