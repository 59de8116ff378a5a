"""Shell completion: `orch completion bash|zsh|tcsh` prints a script that shtab makes from the real
argparse parser (commands, options), completing Hydra overrides and job ids through the hidden,
fast `orch _complete overrides|jobs` (the standard library and SQLite only: no Hydra, Ray or torch).

    source <(orch completion bash)        # in ~/.bashrc
    orch completion zsh > ~/.zfunc/_orch  # a folder on $fpath
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import typing
from pathlib import Path

from orchestrator.conf import FOLDER as CONF
from orchestrator.constants import DEFAULT_STATE_DIR, JOBS_DB, STATE_DIR_ENV

SHELLS = ("bash", "zsh", "tcsh")

JOBS = "orch _complete jobs"  # the commands the scripts run for the words to offer
OVERRIDES = "orch _complete overrides"


def config_groups(conf: Path = CONF, extra: list[str] = ()) -> dict[str, list[str]]:
    """{group: [option, ...]}: the folders of conf/ (and of --config-dir folders) and their YAML files."""
    groups: dict[str, set[str]] = {}
    for base in (conf, *map(Path, extra)):
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            options = {f.stem for f in folder.glob("*.yaml")} | {f.stem for f in folder.glob("*.yml")}
            if options:
                groups.setdefault(folder.name, set()).update(options)
    return {g: sorted(o) for g, o in sorted(groups.items())}


def setting_paths(cls: type | None = None, prefix: str = "") -> list[str]:
    """Dotted paths of the settings of the root config (`trainer.max_steps`, `data.seq_len`, ...):
    the keys an override can set. Nested dataclasses are walked; dict-valued ones (pipeline jobs) are not."""
    from orchestrator.config.schema import RootConfig  # (dataclasses only; no Hydra)

    cls = RootConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            out += setting_paths(kind, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def override_words(conf: Path = CONF) -> list[str]:
    """What an override may start with: `group=option` for every option, and `setting=` for every
    setting (the shell filters them by what was typed)."""
    words = [f"{g}={o}" for g, options in config_groups(conf).items() for o in options]
    return words + [f"{p}=" for p in setting_paths()]


def job_ids(state_dir: str | None = None) -> list[str]:
    """The ids of the jobs (and pipelines) in the state folder, newest first; none when it has none."""
    state_dir = state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    path = os.path.join(os.path.expanduser(state_dir), JOBS_DB)
    if not os.path.exists(path):
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            rows = db.execute("SELECT id, pipeline_id FROM jobs ORDER BY seq DESC").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []  # completion never fails loudly
    return list(dict.fromkeys([job for job, _ in rows] + [pipeline for _, pipeline in rows]))


def script(parser, shell: str) -> str:
    """The completion script of `parser` for `shell`: job-id positionals complete from the state
    folder, override positionals from conf/."""
    import shtab

    _mark(parser)
    text = shtab.complete(parser, shell=shell)
    return text + _BASH_EQUALS if shell == "bash" else text


# bash splits `model=gpt` at '=' (COMP_WORDBREAKS): shtab's function is given the words as typed,
# and bash is handed back only the part after the last '=', the part it replaces.
_BASH_EQUALS = r"""
_orch_complete() {
  local line="${COMP_LINE:0:COMP_POINT}"
  local -a words
  read -ra words <<< "$line"
  [[ "$line" == *[[:space:]] ]] && words+=("")
  COMP_WORDS=("${words[@]}")
  COMP_CWORD=$(( ${#words[@]} - 1 ))
  _shtab_orch "$@"
  local cur="${COMP_WORDS[COMP_CWORD]}"
  if [[ "$cur" == *=* && "$COMP_WORDBREAKS" == *=* ]]; then
    COMPREPLY=("${COMPREPLY[@]#"${cur%=*}="}")
  fi
}
complete -o bashdefault -F _orch_complete orch
"""


# positional arguments (by dest) whose words come from the state folder or conf/
_JOB_DESTS = {"job", "target", "checkpoint"}
_OVERRIDE_DESTS = {"overrides"}


def _mark(parser) -> None:
    import argparse

    import shtab

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark(sub)
        elif not action.option_strings and action.dest in _JOB_DESTS:
            action.complete = shtab.cmd(JOBS)
        elif not action.option_strings and action.dest in _OVERRIDE_DESTS:
            action.complete = shtab.cmd(OVERRIDES)
        elif action.dest in ("state_dir", "config_dir", "dir"):
            action.complete = shtab.DIRECTORY
        elif action.dest == "after":
            action.complete = shtab.cmd(JOBS)
