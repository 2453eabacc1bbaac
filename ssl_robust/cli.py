"""The command line shared by the job scripts (``scripts/{pretrain,train_denoiser,finetune,
evaluate}.py``): presets and ``key=value`` overrides into the job's config, ``--help`` with every
key's value, choices and meaning, ``--print-config``, and one-line errors for bad input.

    sys.exit(main("pretrain", doc=__doc__))
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from ssl_robust.config import (
    SCHEMAS,
    ConfigError,
    available_presets,
    job_choices,
    job_ranges,
    load_config,
    schema_keys,
)
from ssl_robust.config.describe import describe

# Each job's pipeline, imported only when the job runs (``--help`` stays fast).
PIPELINES: dict[str, str] = {
    "pretrain": "ssl_robust.pipelines.pretrain:pretrain",
    "denoiser": "ssl_robust.pipelines.denoiser:train_denoiser",
    "finetune": "ssl_robust.pipelines.finetune:finetune",
    "evaluate": "ssl_robust.pipelines.evaluate:evaluate",
}
HELP_FLAGS = ("-h", "--help")
PRINT_FLAG = "--print-config"
TRACEBACK_ENV = "SSL_ROBUST_TRACEBACK"
_PACKAGE_DIR = Path(__file__).resolve().parent

# Exit statuses: bad command line or config (nothing ran), and bad input found while running.
EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a command a scheduler stopped


def _load_pipeline(job: str) -> Callable[[DictConfig], Any]:
    module, _, name = PIPELINES[job].partition(":")
    fn: Callable[[DictConfig], Any] = getattr(importlib.import_module(module), name)
    return fn


# A section and a key of each job, the examples of --help's own help.
_HELP_EXAMPLES = {
    "pretrain": ("optim", "optim.base_lr"),
    "denoiser": ("denoiser", "denoiser.lr"),
    "finetune": ("optim", "optim.lr"),
    "evaluate": ("adv", "adv.steps"),
}


def _options_text(job: str) -> str:
    section, key = _HELP_EXAMPLES[job]
    return (
        "options:\n"
        f"  -h, --help [SECTION]  this text; with a section ({section}) or a key ({key})\n"
        "                        only the keys under it\n"
        f"  {PRINT_FLAG}        print the config the arguments give (YAML) and exit; nothing runs"
    )


def script_name(default: str) -> str:
    """The script as the usage line shows it: its path relative to the working directory, or as
    typed (``sys.argv[0]``) when that path would climb out of it (``../../x/scripts/a.py``);
    ``default`` when there is no script (an interactive interpreter, ``python -c``)."""
    typed = sys.argv[0] if sys.argv else ""
    if not typed or typed == "-c":
        return default
    try:
        rel = os.path.relpath(typed)
    except ValueError:  # another drive (Windows)
        return typed
    return typed if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the job scripts' error style: one ``error: ...`` line (an unknown option
    names the valid ones) and one line pointing to ``--help``, exit 2; ``prog`` is the script
    as :func:`script_name` shows it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prog", script_name(os.path.basename(sys.argv[0]) if sys.argv else ""))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            options = [
                opt for action in self._actions for opt in action.option_strings if "--" in opt
            ]
            message += f"; valid options: {', '.join(options)}"
        self.exit(EXIT_USAGE, f"error: {message}\n{self.prog} --help lists every option\n")


def usage(prog: str) -> str:
    return f"usage: {prog} [PRESET ...] [KEY=VALUE ...] [{PRINT_FLAG}] [--help [SECTION]]"


def help_text(job: str, prog: str, doc: str, cfg: DictConfig, args: list[str], topic: str) -> str:
    """Usage, the script's examples, presets, options and the keys (under ``topic``)."""
    shown = ", ".join(args) if args else "the schema defaults"
    parts = [usage(prog)]
    if doc.strip():
        parts.append(doc.strip())
    presets = ", ".join(available_presets(job))
    text = (
        f"PRESET: a name from configs/{job}/ ({presets}) or a path to a YAML file. Presets apply"
        " in order, then the KEY=VALUE overrides."
    )
    choices = job_choices(job)
    named = [k.removesuffix(".name") for k in schema_keys(SCHEMAS[job]) if k.endswith(".name")]
    examples = [
        f"{n}={next(c for c in choices[n + '.name'] if c)}" for n in named if n + ".name" in choices
    ]
    if examples:
        text += f" SECTION=VALUE is short for SECTION.name=VALUE ({', '.join(examples)})."
    parts.append("\n".join(textwrap.wrap(text, 96, break_on_hyphens=False)))
    parts.append(_options_text(job))
    parts.append(
        f"keys ({shown}; {{...}} lists the valid values, (...) their range):\n"
        + describe(SCHEMAS[job], cfg, choices, prefix=topic, ranges=job_ranges(job))
    )
    return "\n\n".join(parts) + "\n"


def _is_preset(arg: str, job: str) -> bool:
    return arg in available_presets(job) or arg.endswith((".yaml", ".yml")) or os.sep in arg


def _user_facing(err: BaseException) -> bool:
    """Raised deliberately by this package (not a bug deep in a library)?"""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return True
    try:
        Path(last.tb_frame.f_code.co_filename).resolve().relative_to(_PACKAGE_DIR)
    except ValueError:
        return False
    return True


def _unknown_topic(job: str, topic: str) -> str:
    """``--help TOPIC`` for a key the job lacks: the keys of the deepest section that TOPIC
    names, and the closest full key (``trainer.max_epoch`` -> ``trainer.max_epochs``)."""
    keys = schema_keys(SCHEMAS[job])
    sections = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    parts = topic.split(".")
    parents = [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]
    parent = next((p for p in parents if p in sections), "")
    if parent:
        below = [k[len(parent) + 1 :].split(".")[0] for k in keys if k.startswith(parent + ".")]
        children = list(dict.fromkeys(below))
        near = difflib.get_close_matches(topic[len(parent) + 1 :], children, n=1)
        hint = f"{parent}.{near[0]}" if near else ""
        where = f"under {parent!r}"
    else:
        children = [f.name for f in fields(SCHEMAS[job])]
        near = difflib.get_close_matches(topic, [*keys, *sorted(sections)], n=1)
        hint = near[0] if near else ""
        where = "at the top level"
    return (
        f"no config key {topic!r} in the {job} job; valid keys {where}: "
        + ", ".join(children)
        + (f" (did you mean {hint!r}?)" if hint else "")
    )


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def main(
    job: str,
    argv: list[str] | None = None,
    doc: str = "",
    prog: str | None = None,
    pipeline: Callable[[DictConfig], Any] | None = None,
) -> int:
    """Run a job from command-line arguments and return the exit status.

    Args:
        job: a key of ``PIPELINES`` (``pretrain``, ``denoiser``, ``finetune``, ``evaluate``).
        argv: the arguments (default ``sys.argv[1:]``): presets, ``key=value`` overrides and
            the flags ``--help [KEY]`` / ``--print-config``.
        doc: the script's docstring, shown by ``--help``.
        prog: the program name in the usage line (default: the script path).
        pipeline: the function that runs the job (default: ``PIPELINES[job]``).

    Invalid arguments and bad input found while running (missing data, a run directory
    without the expected files, ...) print one ``error:`` line naming the problem and the
    valid choices (exit 2 before any work, 1 once running). Errors raised outside this
    package keep their traceback, as does every error with ``SSL_ROBUST_TRACEBACK=1``.
    """
    if job not in PIPELINES:
        raise ValueError(f"unknown job {job!r}; choose from {sorted(PIPELINES)}")
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog is None:
        prog = script_name(f"{job}.py")
    show_help, print_config, topic = False, False, ""
    args: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in HELP_FLAGS:
            show_help = True
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            if nxt and not nxt.startswith("-") and "=" not in nxt and not _is_preset(nxt, job):
                topic = nxt
                i += 1
        elif arg == PRINT_FLAG:
            print_config = True
        elif arg.startswith("-") and "=" not in arg:
            _error(
                f"unknown option {arg!r}; valid options: -h/--help [SECTION], {PRINT_FLAG} "
                "(everything else is a preset or key=value)"
            )
            print(usage(prog), file=sys.stderr)
            return EXIT_USAGE
        else:
            args.append(arg)
        i += 1

    try:
        cfg = load_config(SCHEMAS[job], args, job=job)
    except ConfigError as err:
        _error(str(err))
        return EXIT_USAGE
    if show_help:
        try:
            text = help_text(job, prog, doc, cfg, args, topic)
        except KeyError:
            _error(_unknown_topic(job, topic))
            return EXIT_USAGE
        print(text, end="")
        return 0
    if print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0

    run = pipeline or _load_pipeline(job)
    status = EXIT_ERROR  # an exception that propagates
    try:
        run(cfg)
        status = 0
    except ConfigError as err:
        _error(str(err))
        status = EXIT_USAGE
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get(TRACEBACK_ENV) == "1" or not _user_facing(err):
            raise
        _error(str(err))
        status = EXIT_ERROR
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        _error(
            "interrupted; the run directory keeps what was finished (checkpoints, stored "
            "units): run the same command again to resume"
        )
    except SystemExit as exit_:
        if _stopped_by_sigterm(exit_):
            # Lightning stops a fit on SIGTERM with a SystemExit of no code, which would
            # otherwise end the process with status 0, as if the job had finished.
            status = EXIT_TERMINATED
            _error(
                "stopped by SIGTERM; the run directory keeps what was finished (checkpoints, "
                "stored units): run the same command again to resume"
            )
            return status
        status = exit_.code if isinstance(exit_.code, int) else EXIT_ERROR  # a requeue: 0
        raise
    finally:
        release_process_group()
        finish_wandb(status)
    return status


def _stopped_by_sigterm(exit_: SystemExit) -> bool:
    """Whether ``exit_`` is a stop on SIGTERM: Lightning's in a fit, or
    ``launch.distributed.Terminated`` in a job without a Trainer (looked up in
    ``sys.modules``: a job that never imported a module cannot have raised its exception)."""
    kinds = [
        getattr(sys.modules.get(module), name, None)
        for module, name in (
            ("pytorch_lightning.utilities.exceptions", "SIGTERMException"),
            ("ssl_robust.launch.distributed", "Terminated"),
        )
    ]
    return any(kind is not None and isinstance(exit_, kind) for kind in kinds)


def finish_wandb(status: int = 0) -> None:
    """Finish the job's wandb run, if it has one, with the job's exit status (wandb shows a
    non-zero one as failed), before the process exits: left open, wandb's service closes it at
    exit with its own coloured lines in the job's log. Looked up in ``sys.modules``: a job
    without wandb never imports it here."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=status)


def release_process_group() -> None:
    """Tear down the job's torch.distributed process group, if it made one.

    Left to interpreter shutdown, a process group can abort the process after the job is
    done (gloo: "terminate called without an active exception"), which turns a finished
    multi-node SLURM job into a failed one; PyTorch asks for the explicit call too. Looked up
    in ``sys.modules`` so that a job that never imported torch does not import it here.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
