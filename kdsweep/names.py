"""Names a launch turns into paths and MLflow queries: the search space's and the experiment's.

A space's ``name`` becomes the Tune experiment's folder under the Ray storage path, the default
MLflow experiment ``kdsweep-<name>`` (whose artifacts are a folder of that name under
``KDSWEEP_HOME``) and a quoted value in ``--resume``'s MLflow filter string; so it keeps to
:data:`SPACE_NAME`. An ``--experiment`` name may be any text a folder name can be: no path
separator, not ``.`` or ``..`` (the embedded store puts its artifacts in that folder).
"""

from __future__ import annotations

import re

from kdsweep.config import ConfigError

__all__ = ["REPLAYED", "check_experiment_name", "check_space_name"]

REPLAYED = "replayed"
"""Key of a result that a resumed worker reports again from its checkpoint's ``metrics.json``
(value 1): the epoch it resumes after. Every resume does it (``--resume``, and a refit after lost
workers); the report matters where an interrupted launcher never received that epoch (the workers
outlived it long enough to save it). MLflow logs it only where that epoch is missing
(:class:`kdsweep.report.tracking.MLflowTrialCallback`)."""

SPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""Letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit."""


def check_space_name(name: str, source: str, from_file_name: bool = False) -> str:
    """``name`` when it matches :data:`SPACE_NAME`.

    Raises:
        ConfigError: one line naming ``source`` and the field, with a name that would do.
    """
    if SPACE_NAME.fullmatch(name):
        return name
    field = "name (taken from the file name; set name:)" if from_file_name else "name"
    suggestion = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-") or "my_space"
    raise ConfigError(f"{source}: {field} {name!r} may hold only letters, digits, '_', '-' and '.', starting with a "
                      f"letter or digit (it names folders and MLflow queries); use e.g. {suggestion!r}")


def check_experiment_name(name: str) -> str:
    """``name`` (``--experiment``) when it can name one folder under the artifact root.

    Raises:
        ConfigError: one line naming the option and the fix.
    """
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"--experiment {name!r}: an experiment name must not contain '/', '\\' or NUL nor be '.' "
                          "or '..' (its artifacts are the folder of that name under KDSWEEP_HOME); use e.g. kdsweep-mine")
    return name
