"""A sweep (`orch submit -m` / `orch run -m`): the user's overrides expanded into one list of
overrides per combination, with Hydra's own override grammar and its BasicSweeper's expansion
(the cartesian product, in the order given): comma lists `a=1,2`, `range(1,4)`, `choice(a,b)`,
`glob(gpt_*)` over a config group's options (those of `--config-dir` folders included), and the
rest of the grammar (quoting, `key=[a,b]` as one value). Each combination is composed like the
overrides of a plain `orch submit`.
"""

from __future__ import annotations

from typing import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from orchestrator.config.compose import (
    CONFIG_NAME,
    SEARCHPATH_KEY,
    check_override_syntax,
    hydra_context,
    with_config_dirs,
)
from orchestrator.errors import ConfigError


class _Groups:
    """The config loader as `glob()` asks it for a group's options, with the user's config folders
    (`hydra.searchpath`) searched too (Hydra's own sweeps get them from the composed config)."""

    def __init__(self, loader, searchpath: list[str]):
        self.loader, self.searchpath = loader, searchpath

    def get_group_options(self, group: str, results_filter=None, config_name=None, overrides=None) -> list[str]:
        return self.loader.get_group_options(group, results_filter=results_filter, config_name=CONFIG_NAME,
                                             overrides=self.searchpath)


def _is_searchpath(override: str) -> bool:
    return override.partition("=")[0].strip() == SEARCHPATH_KEY


def expand_sweep(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> list[list[str]]:
    """One list of overrides per combination, in Hydra's order (the last key varies fastest).
    `hydra.searchpath` is not swept: it goes with every combination; `glob()` sees the options of
    its folders and of `config_dirs` (`--config-dir`)."""
    searchpath = [ov for ov in overrides if _is_searchpath(ov)]
    swept = [ov for ov in overrides if not _is_searchpath(ov)]
    checked = check_override_syntax(swept)
    search = [ov for ov in with_config_dirs(searchpath, config_dirs) if _is_searchpath(ov)]
    with hydra_context() as gh:
        parser = OverridesParser.create(config_loader=_Groups(gh.config_loader(), search))  # type: ignore[arg-type]
        try:
            parsed = parser.parse_overrides(checked)
            (combinations,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        except Exception as e:  # Hydra's OverrideParseException, HydraException: multi-line, with its grammar
            raise ConfigError(_one_line(e, checked)) from None
    if not combinations:  # a key swept over no values (an empty range, a glob that matches nothing)
        empty = next((ov.input_line for ov in parsed if ov.is_sweep_override()
                      and not list(ov.sweep_string_iterator())), " ".join(swept))
        raise ConfigError(f"the sweep {empty} has no values (an empty range, or a glob that matches no option); "
                          f"give each swept key at least one, e.g. trainer.lr=1e-3,3e-3")
    return [list(c) + searchpath for c in combinations]


def _one_line(e: Exception, overrides: list[str]) -> str:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" expecting ")[0]
    if "does not support sweep type" in detail:
        return (f"this sweep cannot be listed ({detail}): an interval() sweep needs an optimizing sweeper; "
                f"give the values (a=1,2,3), a range(start,stop,step) or choice(...)")
    return (f"bad sweep {' '.join(overrides)}: {detail}; write key=a,b (comma list), key=range(1,4), "
            f"key=choice(a,b) or group=glob(pattern)")
