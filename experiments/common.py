"""What every experiment shares: the absl app (``--config``, ``--workdir``), config resolution, the workdir,
result files, the printed table."""
from __future__ import annotations

import importlib.util
import json
import logging as pylogging
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_collections

from designmodels import did_you_mean

# ----------------------------------------------------------------------------------------------------
# config: smoke settings, command-line overrides, typos
# ----------------------------------------------------------------------------------------------------


class ConfigFieldError(KeyError):
    """A config field that does not exist (a typo on the command line or in ``smoke_settings``)."""

    def __str__(self):
        return str(self.args[0])


def unknown_field(config: ml_collections.ConfigDict, path: str, *, prefix: str = "config") -> Optional[str]:
    """None if the dotted ``path`` names a field of ``config``, else a message naming the first unknown part,
    the closest fields and every field at that level."""
    node, walked = config, prefix
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            fields = sorted(node) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
            where = f"{walked} has no field {part!r}" if fields else f"{walked} is not a group of fields"
            return (f"{prefix}.{path}: {where}{did_you_mean(part, fields)}"
                    + (f"; its fields: {', '.join(fields)}." if fields else "."))
        node, walked = node[part], f"{walked}.{part}"
    return None


def _set_path(config: ml_collections.ConfigDict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


def resolve(config: ml_collections.ConfigDict,
            overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
    """The config an experiment runs with, as a locked copy: ``config.smoke_settings`` first (when
    ``config.smoke`` is set), then ``overrides`` (``{"dotted.path": value}``, the command line's
    ``--config.x=...``), which win: ``--config.smoke=True --config.models=...`` runs those models in smoke
    mode.

    The smoke settings are applied once: the copy keeps ``smoke`` and an emptied ``smoke_settings``, so
    resolving a resolved config changes nothing.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    overrides = {k: v for k, v in (overrides or {}).items() if k != "smoke" and k.split(".")[0] != "smoke_settings"}
    for path in overrides:
        message = unknown_field(config, path)
        if message:
            raise ConfigFieldError(message)
    if config.get("smoke") and config.get("smoke_settings"):
        for key, value in config.smoke_settings.items():
            if key not in config:
                raise ConfigFieldError(f"config.smoke_settings.{key}: not a field of the config"
                                       f"{did_you_mean(key, config)}; its fields: {', '.join(sorted(config))}.")
            config[key] = value
        config.smoke_settings = ml_collections.ConfigDict()
    for path, value in overrides.items():
        _set_path(config, path, value)
    config.lock()
    return config


def resolve_flags(flag_values=None, name: str = "config") -> ml_collections.ConfigDict:
    """`resolve` of the parsed ``--config`` flag with its command-line overrides."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    return resolve(flag_values[name].value, config_flags.get_override_values(flag_values[name]))


def check_choice(field: str, values: Iterable[str], accepted: Sequence[str]) -> None:
    bad = [v for v in values if v not in accepted]
    if bad:
        hints = "".join(did_you_mean(b, accepted) for b in bad)
        raise ValueError(f"config.{field}: {bad} not known{hints}; accepted: {', '.join(accepted)}.")


# ----------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------


def _load_config(spec: str) -> Optional[ml_collections.ConfigDict]:
    """``get_config()`` of a config file (``path`` or ``path:argument``), or None if it cannot be loaded
    here (ml_collections then reports why)."""
    path, _, argument = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    try:
        module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(argument) if argument else module.get_config()
    except Exception:  # noqa: BLE001: whatever fails here fails again, explained, in ml_collections
        return None


def check_command_line(argv: Sequence[str], default_config: str, name: str = "config") -> None:
    """Raise `ConfigFieldError` for a ``--config.x=...`` whose field the config does not have (ml_collections
    would raise an ``AttributeError`` with a traceback from inside absl's flag parsing)."""
    paths = []
    spec = default_config
    for arg in argv[1:]:
        if arg in ("--", "-"):
            break
        flag = arg.lstrip("-").split("=", 1)[0]
        if flag == name:
            spec = arg.split("=", 1)[1] if "=" in arg else spec
        for prefix in (f"{name}.", f"no{name}."):
            if arg.startswith("-") and flag.startswith(prefix):
                paths.append(flag[len(prefix):])
    if not paths:
        return
    config = _load_config(spec)
    if config is None:
        return
    for path in paths:
        message = unknown_field(config, path)
        if message:
            raise ConfigFieldError(f"--{message} (in {spec}); set a field as --{name}.<field>=<value>")


def last_override_wins(argv: Sequence[str], name: str = "config") -> list[str]:
    """``argv`` with only the last ``--config.<field>`` of each field (``=value``, ``value`` as the next
    argument, or the boolean ``--config.<field>`` / ``--noconfig.<field>``), as absl treats every other flag
    given twice. ml_collections would instead concatenate the values of a tuple field given twice
    (``--config.d_models='(64,)' --config.d_models='(128,)'`` becomes ``(64, 128)``): a silently different
    sweep, e.g. when a script's fixed flags are followed by a user's overrides."""
    groups, fields = [], []            # each option with its value argument, if separate; its field or None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("--", "-"):
            groups.append(list(argv[i:]))
            fields.append(None)
            break
        flag = arg.lstrip("-").split("=", 1)[0]
        field = next((flag[len(p):] for p in (f"{name}.", f"no{name}.") if arg.startswith("-") and
                      flag.startswith(p)), None)
        takes_next = (field is not None and "=" not in arg and not flag.startswith("no") and i + 1 < len(argv)
                      and not argv[i + 1].startswith("-"))
        groups.append(list(argv[i:i + 2]) if takes_next else [arg])
        fields.append(field)
        i += 2 if takes_next else 1
    last = {field: k for k, field in enumerate(fields) if field is not None}
    return [argv[0]] + [a for k, (group, field) in enumerate(zip(groups, fields))
                        if field is None or last[field] == k for a in group]


def deterministic_gpu_reductions() -> None:
    """Ask XLA for deterministic reductions on GPUs (``--xla_gpu_deterministic_ops=true`` in ``XLA_FLAGS``),
    unless ``XLA_FLAGS`` already sets that flag. An interrupted run resumes to the same bits only if every
    reduction is deterministic, and XLA's GPU scatter-add (the embedding gradient) is not by default.
    Takes effect only if called before jax starts a backend; no effect on a CPU."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags_now:
        os.environ["XLA_FLAGS"] = (flags_now + " --xla_gpu_deterministic_ops=true").strip()


class _NoTpuProbeLine(pylogging.Filter):
    """Drop JAX's INFO line "Unable to initialize backend 'tpu': ... libtpu.so ...".

    When ``JAX_PLATFORMS`` is unset, JAX tries every backend it knows, TPU included, and logs the failure of
    the ones that may fail quietly at INFO level; an absl app shows INFO lines, so every run on a CPU or a
    GPU machine printed one about a TPU it never asked for. Only that line goes: the platform choice is
    untouched (a GPU is still found and used), and a backend that fails loudly still raises."""

    def filter(self, record):
        return not (record.levelno <= pylogging.INFO
                    and record.getMessage().startswith("Unable to initialize backend 'tpu'"))


def quiet_tpu_probe() -> None:
    """Install `_NoTpuProbeLine` on JAX's backend logger (once; before JAX starts a backend)."""
    logger = pylogging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoTpuProbeLine) for f in logger.filters):
        logger.addFilter(_NoTpuProbeLine())


def run_app(experiment: Callable[[ml_collections.ConfigDict, str], Any], *, config: str, outputs: str,
            check: Optional[Callable[[ml_collections.ConfigDict], None]] = None, x64: bool = False) -> None:
    """Run ``experiment(config, workdir)`` as an absl program with the flags ``--config`` (default the file
    ``config``; override any field with ``--config.field=value``) and ``--workdir`` (required: where
    ``outputs`` go).

    A field given twice takes its last value (`last_override_wins`). Before anything runs, a misspelled field, a stray argument, a missing workdir, or a config that
    ``check(config)`` refuses (a ``ValueError``) is a usage error that says what to write instead, without a
    traceback; so is a `RunError` raised by the experiment (one line, exit status ``error.exit_status``:
    1 for a run file that cannot be used, 3 for diverged runs). ``x64`` enables float64 first."""
    from absl import app, flags
    from ml_collections import config_flags

    deterministic_gpu_reductions()
    quiet_tpu_probe()
    sys.argv[:] = last_override_wins(sys.argv)
    try:   # before the flags are defined: ml_collections applies the overrides to a default config then
        check_command_line(flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False), config)
    except ConfigFieldError as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on "
                         "flags.\n")
        sys.exit(1)
    config_flags.DEFINE_config_file("config", config, "Experiment config; override a field with "
                                                      "--config.field=value.")
    flags.DEFINE_string("workdir", None, f"Where {outputs} go.")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; the config file is --config=PATH and a field "
                                 "is --config.field=value.")
        if not flags.FLAGS.workdir:
            raise app.UsageError(f"--workdir is required: the folder for {outputs}.")
        resolved = resolve_flags(flags.FLAGS)
        if check is not None:
            try:
                check(resolved)
            except ValueError as error:
                raise app.UsageError(str(error)) from None
        if x64:
            import jax
            jax.config.update("jax_enable_x64", True)
        try:
            experiment(resolved, prepare_workdir(flags.FLAGS.workdir))
        except RunError as error:       # its message says what is wrong and what to do: no traceback
            sys.stderr.write(f"ERROR {error}\n")
            sys.exit(error.exit_status)

    app.run(main)


# ----------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------


class RunError(Exception):
    """A run that cannot go on, for a cause its one-line message names together with what to do (a run file
    that is corrupt or was written by other settings, no readable checkpoint, diverged runs). The apps print
    the message and exit with `exit_status`, without a traceback."""

    exit_status = 1


class RunFileError(RunError, ValueError):
    """A file of a run folder that cannot be used: empty, truncated, corrupt, or written with other
    settings. The message names the file (or the folder) and what to do."""


class Diverged(RunError):
    """Runs whose training loss became non-finite: they are recorded (``status: diverged``) and reported as
    such; the app exits with status 3 after writing its report."""

    exit_status = 3


def read_json(path: str, remedy: str):
    """``json.load`` of ``path``; a `RunFileError` naming the file, what is wrong with it (empty, truncated,
    not JSON) and ``remedy`` (what to do) when it cannot be parsed, instead of a bare ``JSONDecodeError``."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        what = "empty" if not text.strip() else f"truncated or corrupt ({error.msg} at character {error.pos})"
        raise RunFileError(f"{path}: {what}; {remedy}") from None


def prepare_workdir(workdir: str) -> str:
    os.makedirs(workdir, exist_ok=True)
    return workdir


def write_json(path: str, payload) -> None:
    """Write ``payload`` to ``path`` atomically: a process killed while writing (a sweep's time limit)
    leaves the previous file or none, never a truncated one that would mark a run as finished."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
