"""Compose `conf/` with the user's overrides into typed configs, once, at submit time.

Hydra errors are multi-line and carry tracebacks; each is turned into one `ConfigError` line that
names the key or group, the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.conf import FOLDER as BUILTIN_CONF
from orchestrator.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    JobConfig,
    JobSpec,
    RootConfig,
    TrainerConfig,
    dependency_job,
)
from orchestrator.config.typed import build, to_dict
from orchestrator.constants import CONF_DIR_ENV
from orchestrator.errors import ConfigError
from orchestrator.storage import to_uri

CONFIG_NAME = "config"
CONF_MODULE = "orchestrator.conf"  # the built-in groups ship inside the package (a wheel, an image)
SEARCHPATH_KEY = "hydra.searchpath"


def conf_dir() -> Path:
    """The built-in config folder: $ORCH_CONF_DIR, else the package's own (conf/, linked as orchestrator/conf)."""
    env = os.environ.get(CONF_DIR_ENV)
    path = Path(env) if env else BUILTIN_CONF
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        where = f"{CONF_DIR_ENV}={env}" if env else "the installed package"
        raise ConfigError(f"config folder {path} ({where}) has no {CONFIG_NAME}.yaml; "
                          f"unset {CONF_DIR_ENV}, or point it at a folder with the project's config.yaml")
    return path


@contextmanager
def hydra_context():
    """Hydra initialised on the built-in groups: the package (pkg://orchestrator.conf), or
    $ORCH_CONF_DIR. User folders come in through `hydra.searchpath` (see `with_config_dirs`)."""
    GlobalHydra.instance().clear()
    try:
        if os.environ.get(CONF_DIR_ENV):
            init = initialize_config_dir(config_dir=str(conf_dir().resolve()), version_base="1.3")
        else:
            conf_dir()  # a damaged installation fails in one line here
            init = initialize_config_module(config_module=CONF_MODULE, version_base="1.3")
        with init:
            yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().clear()


def with_config_dirs(overrides: Sequence[str], config_dirs: Sequence[str]) -> list[str]:
    """`overrides` with the user's config folders (`--config-dir`) added to `hydra.searchpath`, after
    any entries the user gave there. Like Hydra's own `--config-dir`, a folder adds options to the
    built-in groups (conf/model/my_model.yaml -> model=my_model); a built-in option of the same name wins."""
    if not config_dirs:
        return list(overrides)
    entries: list[str] = []
    for d in config_dirs:
        path = Path(os.path.expanduser(d)).resolve()
        if not path.is_dir():
            raise ConfigError(f"--config-dir {d}: no such folder; give a folder of config groups "
                              f"(e.g. DIR/model/my_model.yaml, used as model=my_model)")
        entries.append(f"file://{path}")
    out, given = [], []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if sep and key.strip() == SEARCHPATH_KEY:
            given = _searchpath_entries(value)
        else:
            out.append(ov)
    return out + [f"{SEARCHPATH_KEY}=[{','.join(quote_value(e) for e in given + entries)}]"]


def _searchpath_entries(value: str) -> list[str]:
    parsed = OverridesParser.create().parse_override(f"{SEARCHPATH_KEY}={value}").value()
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ConfigError(f"{SEARCHPATH_KEY}={value} must be a list of folders, e.g. "
                          f"{SEARCHPATH_KEY}=[file:///home/me/orch-conf,pkg://my_package.conf]")
    return list(parsed)


def _check_searchpath_warnings(caught) -> None:
    """Hydra only warns about a `hydra.searchpath` entry it cannot find (a typo): one line instead."""
    for w in caught:
        m = re.search(r"provider=hydra\.searchpath[^,]*, path=(.+) is not available", str(w.message))
        if m:
            raise ConfigError(f"{SEARCHPATH_KEY} entry {m.group(1)!r} is not available: no such folder or package; "
                              f"fix the path (file:///ABSOLUTE/DIR or pkg://package.module)")


def group_options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The options of a config group: the built-in ones and those of the user's folders
    (`hydra.searchpath` among `overrides`)."""
    searchpath = [ov for ov in overrides if ov.partition("=")[0].strip() == SEARCHPATH_KEY]
    with hydra_context() as gh:
        return sorted(set(gh.config_loader().get_group_options(group, config_name=CONFIG_NAME,
                                                                overrides=searchpath)))


def quote_value(value: str) -> str:
    """A Hydra override value taken literally (commas, brackets, spaces, non-ASCII and all)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_override_syntax(overrides: Sequence[str]) -> list[str]:
    """The overrides, each parsed once here so a bad one fails in one line that says how to write it.
    A plain value with non-ASCII characters (a path like /data/ü), which Hydra's grammar refuses
    unquoted, is quoted for the user."""

    parser = OverridesParser.create()
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep and key.startswith("~") and _parses(parser, ov):  # Hydra's delete: ~pipeline.jobs.x
            out.append(ov)
            continue
        if not sep:
            raise ConfigError(
                f"malformed override {ov!r}: expected key=value (e.g. trainer.max_steps=40 or model=gpt_tiny)"
            )
        if not key.strip().lstrip("+~"):
            raise ConfigError(f"malformed override {ov!r}: nothing before '='; "
                              f"write key=value, e.g. trainer.max_steps=40")
        literal = f"{key}={quote_value(value)}"
        bracketed = value.lstrip().startswith(("[", "{"))  # a list or a mapping
        plain = not bracketed and not value.lstrip().startswith(("'", '"'))
        try:
            parser.parse_override(ov)
        except Exception as e:  # hydra's OverrideParseException, multi-line
            if plain and not value.isascii() and _parses(parser, literal):
                out.append(literal)
                continue
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            detail = detail.split(" expecting ")[0]  # Hydra goes on to list every token of its grammar
            if bracketed and "token recognition" in detail:
                fix = "quote the items with non-ASCII characters inside the brackets, e.g. key=['ü',b]"
            elif bracketed:
                fix = "close the brackets: a list is key=[a,b], a mapping key={a:1,b:2}"
            else:
                fix = f"write key=value, quoting a value with special characters: \"{literal}\""
            raise ConfigError(f"malformed override {ov!r}: {detail}; {fix}") from None
        out.append(ov)
    return out


def _parses(parser, override: str) -> bool:
    try:
        parser.parse_override(override)
        return True
    except Exception:  # noqa: BLE001 - hydra's OverrideParseException
        return False


def _translate_hydra_error(e: Exception, overrides: Sequence[str]) -> ConfigError:
    msg = str(e)
    m = re.search(r"Could not find '([^']+)/([^']*)'", msg)
    if m:
        group, option = m.group(1).split("/")[-1], m.group(2)
        try:
            choices = group_options(group, overrides)
        except Exception:  # noqa: BLE001 - a searchpath Hydra refuses: the generic line below names it
            choices = []
        if choices:
            return ConfigError(f"unknown option {option!r} for config group '{group}'; "
                               f"valid choices: {', '.join(choices)}")
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _valid_keys(parent)
        if key.rsplit(".", 1)[-1] in valid:  # in the schema, but not in the YAML the override targets
            return ConfigError(f"config key '{key}' is not set in conf/ for this choice; add it with +{key}=...")
        where = f"under '{parent}'" if parent else "at the top level"
        choices = f"valid keys {where}: {', '.join(valid)}" if valid else "see `orch run --dry-run` for the valid keys"
        return ConfigError(f"unknown config key '{key}'; {choices}")
    m = re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        return ConfigError(f"unknown config key '{m.group(1)}'; see `orch run --dry-run` for the valid keys")
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        return ConfigError(f"{m.group(1)} has several values: a sweep needs -m (`orch submit -m ...`, `orch run -m "
                           f"...`: one pipeline per value); one list value needs brackets, key=[a,b]")
    return ConfigError(f"cannot compose the configuration: {first}")


_PER_JOB = {"trainer": TrainerConfig, "deepspeed": DeepSpeedConfig}  # JobSpec's dicts of per-job overrides


def _valid_keys(path: str) -> list[str]:
    """The field names of the schema dataclass at a dotted path of RootConfig, if there is one."""

    cls: object = RootConfig
    skip_key = False  # the next part is a key of a dict (a job name), not a field
    for part in [p for p in path.split(".") if p]:
        if skip_key:
            skip_key = False
            continue
        if not dataclasses.is_dataclass(cls):
            return []
        if cls is JobSpec and part in _PER_JOB:  # per-job overrides take the top-level section's keys
            cls = _PER_JOB[part]
            continue
        tp = typing.get_type_hints(cls).get(part)
        if typing.get_origin(tp) is dict:
            skip_key = True
        args = [a for a in typing.get_args(tp) if a is not type(None)] if tp is not None else []
        cls = next((a for a in args if dataclasses.is_dataclass(a)), tp)
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


def compose_dict(overrides: Sequence[str] = ()) -> dict:
    """Compose conf/ + overrides into a resolved plain dict (state_dir made absolute first)."""

    overrides = check_override_syntax(overrides)
    try:
        with hydra_context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
        _check_searchpath_warnings(caught)
    except ConfigError:
        raise
    except Exception as e:  # hydra raises several unrelated classes here
        raise _translate_hydra_error(e, overrides) from None
    OmegaConf.set_struct(cfg, False)
    try:
        cfg.state_dir = os.path.abspath(os.path.expanduser(str(cfg.state_dir)))
        if os.path.exists(cfg.state_dir) and not os.path.isdir(cfg.state_dir):
            raise ConfigError(f"state_dir={cfg.state_dir} is a file; give --state-dir (or state_dir=) a folder")
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        if type(e).__name__ == "MissingMandatoryValue":
            raise ConfigError(f"config key '{key}' has no value (??? in conf/); set it with {key}=...") from None
        raise ConfigError(f"config key '{key}' cannot be resolved: {str(e).strip().splitlines()[0]}") from None
    _elastic_shorthand(data)
    return data  # type: ignore[return-value]


def _elastic_shorthand(data: dict) -> None:
    """`pipeline.jobs.X.workers=[MIN,MAX]` means workers=MIN, max_workers=MAX (Ray Train's elastic
    `num_workers=(min, max)`)."""
    for name, spec in ((data.get("pipeline") or {}).get("jobs") or {}).items():
        w = spec.get("workers") if isinstance(spec, dict) else None
        if isinstance(w, list):
            if len(w) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in w) or w[0] > w[1]:
                raise ConfigError(f"pipeline.jobs.{name}.workers={w} must be a number or [MIN,MAX] with MIN <= MAX, "
                                  f"e.g. pipeline.jobs.{name}.workers=[2,4]")
            spec["workers"], spec["max_workers"] = w[0], w[1]


def compose_root(overrides: Sequence[str] = ()) -> RootConfig:
    """Compose and build the typed root config."""
    return build(RootConfig, compose_dict(overrides))


def resolve_jobs(root: RootConfig, after: Sequence[str] = ()) -> list[JobConfig]:
    """Each job of the pipeline as a self-contained, validated `JobConfig`, in dependency order.
    `after`: ids of jobs already submitted that every job without a dependency here waits for."""
    jobs = []
    for name in root.pipeline.job_order():
        spec = root.pipeline.jobs[name]
        trainer = build(TrainerConfig, {**to_dict(root.trainer), **spec.trainer}, f"pipeline.jobs.{name}.trainer")
        deepspeed = build(DeepSpeedConfig, {**to_dict(root.deepspeed), **spec.deepspeed},
                          f"pipeline.jobs.{name}.deepspeed")
        data: DataConfig = spec.data or root.data
        init_from = to_uri(spec.init_from) if spec.init_from else None
        if data.kind == "sft" and not data.tokenizer_uri and init_from:
            data = dataclasses.replace(data, tokenizer_uri=init_from)  # fine-tune with the model's own tokenizer
        elif data.tokenizer_uri:  # a relative path means the submitting shell's, not the runner's, folder
            data = dataclasses.replace(data, tokenizer_uri=to_uri(data.tokenizer_uri))
        if data.source and not data.source.startswith("generated:"):  # (likewise)
            data = dataclasses.replace(data, source=to_uri(data.source))
        deps = tuple(spec.depends_on) or tuple(after)
        triggers = [d.partition("@")[2] for d in deps if "@" in d]  # (JobConfig: one dependency, then)
        fields = dict(
            name=name,
            kind=spec.kind,
            pipeline=root.pipeline.name,
            depends_on=tuple(map(dependency_job, deps)),
            trigger=triggers[0] if triggers else None,
            workers=spec.workers,
            max_workers=spec.max_workers,
            priority=spec.priority,
            max_failures=spec.max_failures,
            state_dir=root.state_dir,
            model=root.model,
            deepspeed=deepspeed,
            data=data,
            trainer=trainer,
            checkpoint=root.checkpoint,
            storage=root.storage,
            tracking=root.tracking,
            cluster=root.cluster,
            init_from=init_from,
            resume_from=to_uri(spec.resume_from) if spec.resume_from else None,
            from_scratch=spec.from_scratch,
            step_time_s=spec.step_time_s,
        )
        try:
            jobs.append(JobConfig(**fields))
        except ValueError as e:
            raise ConfigError(f"job '{name}': {e}") from None
        _check_commits(root, jobs[-1], spec.depends_on)
    return jobs


def _check_commits(root: RootConfig, job: JobConfig, deps: Sequence[str]) -> None:
    """A trigger on a job of this pipeline whose checkpoints never land on its steps is refused:
    `pretrain@every:100` needs a commit at each multiple of 100 (checkpoint.interval a divisor of
    100); with interval 0 (the final checkpoint only) it would start once, or never."""
    interval = root.checkpoint.interval
    if not job.trigger or job.depends_on[0] not in root.pipeline.jobs or not isinstance(interval, int):
        return
    kind, n = job.trigger.split(":")
    if interval == 0 or int(n) % interval:
        source = job.depends_on[0]
        raise ConfigError(f"job '{job.name}': {deps[0]} needs a checkpoint of {source} at "
                          f"{'each multiple of ' if kind == 'every' else 'step '}{n}, but {source} commits "
                          + ("only its final one" if interval == 0 else f"every {interval} steps")
                          + f" (checkpoint.interval={interval}); set checkpoint.interval={n} or a divisor of it")


def job_config_from_dict(data: dict) -> JobConfig:
    """Rebuild a frozen job config from its record (JSON)."""
    return build(JobConfig, data, "job")
