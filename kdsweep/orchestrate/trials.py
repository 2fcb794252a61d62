"""The typed configs of a search space's rows and trials: built once, then handed down.

Configuration flows down once: the launcher builds each row's :class:`~kdsweep.config.ExperimentConfig`
(preset <- the space's ``base`` <- the row's overrides), validates it, and hands it down through
the Tune run to the workers as the typed object. A trial's config is its row's with the values
Tune sampled (``space:`` block) and its seed applied (:func:`trial_config`), by this module alone;
the Tune trial driver and the MLflow callback call the same function.

A teacher is keyed by its own config hash (:func:`teacher_hash`: its model, its training, the
data's paths, version and limits), so rows may distil from different teachers; each is trained once and reused by every row,
every later launch and every experiment of the MLflow store.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kdsweep.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    from_dict,
    merge,
    run_hash_dict,
    teacher_model,
    to_dict,
)
from kdsweep.methods import TERMS
from kdsweep.orchestrate.space import Sampler, SearchSpace

__all__ = ["DATA_KEYS", "apply_sampled", "count_trials", "distinct_teachers", "row_configs", "set_path",
           "teacher_hash", "trial_config", "tune_param_space", "variants", "with_seed"]


def set_path(config: dict[str, Any], path: str, value: Any, source: str) -> None:
    """Set dotted ``path`` (list indices allowed, e.g. ``kd.0.weight``) in a nested dict."""
    keys = path.split(".")
    node: Any = config
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{source}: space.{path}: '{'.'.join(keys[: i + 1])}' does not exist in this row")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: space.{path}: index {last} does not exist in this row")
        node[int(last)] = value
    else:
        node[last] = value


def _typed(data: Mapping[str, Any], where: str) -> ExperimentConfig:
    try:
        exp = from_dict(ExperimentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for i, term in enumerate(exp.kd):
        if term.loss not in TERMS:
            raise ConfigError(f"{where}: kd[{i}].loss '{term.loss}' is unknown; known: {', '.join(sorted(TERMS))}")
    return exp


def row_configs(space: SearchSpace, preset: Mapping[str, Any]) -> dict[str, ExperimentConfig]:
    """Row label -> its typed config: ``preset`` <- ``space.base`` <- the row's overrides.

    Raises:
        ConfigError: ``<file>: row '<label>': <field>: <problem and fix>``.
    """
    out = {}
    for label in space.labels:
        data = merge(merge(copy.deepcopy(dict(preset)), space.base), space.row(label).overrides)
        out[label] = _typed(data, f"{space.source}: row '{label}'")
    return out


def apply_sampled(exp: ExperimentConfig, sampled: Mapping[str, Any], samplers: Mapping[str, Sampler],
                  source: str = "space", where: str | None = None) -> ExperimentConfig:
    """``exp`` with each sampled value (Tune's, possibly encoded: see :meth:`Sampler.decode`) set
    at its dotted path; the result is validated as a whole. ``source`` names the space file in
    path errors, ``where`` (default ``source``) in config errors."""
    if not sampled:
        return exp
    data = to_dict(exp)
    menu = [term["loss"] for term in data.get("kd") or []]
    if KD_USE in sampled:
        indexed = next((p for p in sampled if re.fullmatch(r"kd\.\d+(\..*)?", p)), None)
        if indexed:
            raise ConfigError(f"{source}: space.{indexed}: with kd.use the kd list depends on the trial; name the term "
                              f"instead (kd.<loss>.{'.'.join(indexed.split('.')[2:])})")
    for path, value in sorted(sampled.items(), key=lambda item: item[0] != KD_USE):  # the selection first
        sampler = samplers.get(path)
        value = sampler.decode(value) if sampler is not None else value
        keys = path.split(".")
        if path == KD_USE:
            data["kd"] = select_terms(data.get("kd") or [], value, f"{source}: space.{KD_USE}")
        elif keys[0] == "kd" and len(keys) > 2 and not keys[1].isdigit():
            if keys[1] != "*" and keys[1] not in menu:
                raise ConfigError(f"{source}: space.{path}: the row has no kd term '{keys[1]}'; its terms: "
                                  f"{', '.join(menu) or '(none)'}")
            for i, term in enumerate(data.get("kd") or []):  # the selected terms of that loss (or all: *)
                if keys[1] in ("*", term["loss"]):
                    set_path(data, ".".join(["kd", str(i), *keys[2:]]), value, source)
        else:
            set_path(data, path, value, source)
    return _typed(data, where or source)


KD_USE = "kd.use"
"""The space path that picks which of a row's ``kd`` terms a trial uses (a search over methods)."""


def select_terms(kd: list[dict[str, Any]], use: Any, where: str) -> list[dict[str, Any]]:
    """The entries of ``kd`` whose ``loss`` is in ``use`` (a name or a list of names), in the row's
    order; ``[]`` keeps none (the no-KD baseline).

    Raises:
        ConfigError: a name the row's ``kd`` list does not have, or a name given twice.
    """
    names = [use] if isinstance(use, str) else list(use or [])
    known = [term["loss"] for term in kd]
    for name in names:
        if name not in known:
            raise ConfigError(f"{where}: '{name}' is not one of the row's kd terms ({', '.join(known) or 'none'}); "
                              "list every candidate term in the row's kd, with its default weight")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: {names} names a term twice")
    return [term for term in kd if term["loss"] in names]


def with_seed(exp: ExperimentConfig, seed: int | None) -> ExperimentConfig:
    """``exp`` with the student's training seed (the teacher's training keeps its own)."""
    return exp if seed is None else dataclasses.replace(exp, train=dataclasses.replace(exp.train, seed=int(seed)))


def trial_config(rows: Mapping[str, ExperimentConfig], samplers: Mapping[str, Sampler], config: Mapping[str, Any],
                 source: str = "space") -> ExperimentConfig:
    """The typed config of one Tune trial: its row's (``config["row"]``) with the sampled values
    (``config["params"]``) and the seed (``config["seed"]``) applied."""
    exp = apply_sampled(rows[config["row"]], config.get("params") or {}, samplers, source)
    return with_seed(exp, config.get("seed"))


def variants(space: SearchSpace, rows: Mapping[str, ExperimentConfig]) -> list[tuple[str, ExperimentConfig]]:
    """Every configuration the trials can take, for validation before anything starts: each row
    with each grid and choice value of the space, and a representative value of the other
    samplers. Configurations that come out the same (e.g. a level sampled for a term ``kd.use``
    did not pick) are listed once. Returns ``[(row label, config), ...]``."""
    out = []
    seen: set[tuple[str, str]] = set()
    for label, exp in rows.items():
        combos: list[dict[str, Any]] = [{}]
        for path, sampler in space.space.items():
            values = sampler.values() if sampler.kind in ("grid", "choice") else [sampler.representative()]
            combos = [dict(c, **{path: value}) for c in combos for value in values]
        for sampled in combos:
            variant = apply_sampled(exp, sampled, {}, space.source, f"{space.source}: row '{label}'")
            if exp.kd and _teacher_defining(variant) != _teacher_defining(exp):
                changed = next(p for p in sampled if _teacher_defining(apply_sampled(exp, {p: sampled[p]}, {}))
                               != _teacher_defining(exp))
                raise ConfigError(
                    f"{space.source}: space.{changed} changes the teacher of row '{label}' (its model, resolution, "
                    "training or data), but a row's teacher is trained or reused once, before its trials sample; "
                    "give each teacher its own row instead (rows may override teacher, teacher_train and teacher_scale)")
            key = (label, config_hash(to_dict(variant)))
            if key not in seen:
                seen.add(key)
                out.append((label, variant))
    return out


def _teacher_defining(exp: ExperimentConfig) -> dict[str, Any]:
    """The config part of what :func:`teacher_hash` hashes (the data config, which
    :func:`teacher_hash` replaces by the resolved data and its limits)."""
    return {"teacher": run_hash_dict(teacher_model(exp)), "teacher_train": run_hash_dict(exp.teacher_train),
            "data": to_dict(exp.data)}


DATA_KEYS = ("train_ann", "val_ann", "train_images", "val_images", "version")
"""The keys of the launch's resolved data that :func:`teacher_hash` needs: the absolute paths and
:func:`~kdsweep.data.coco.data_version`."""


def teacher_hash(exp: ExperimentConfig, data: Mapping[str, str]) -> str:
    """The config hash that identifies ``exp``'s teacher: its model at the resolution it is trained
    and run at (:func:`~kdsweep.config.teacher_model`: ``teacher_scale`` counts), its training, and
    what it learnt from: the data as the launch resolved it on the driver (``data``: the absolute
    paths and ``version``, the content of the annotation files and the image folders' listing,
    :func:`~kdsweep.data.coco.data_version`) with the run's limits ``data.max_train_images`` and
    ``data.max_val_images``. A dataset regenerated or edited at the same path, or a limit changed,
    names another teacher (issue 24: before, the paths alone stood for the data, so a teacher
    trained on 50 images or on an earlier version of the files was reused). Rows with the same hash
    share one teacher. How the data is loaded and when it is evaluated do not count
    (:func:`~kdsweep.config.run_hash_dict`).

    Raises:
        ValueError: ``data`` lacks one of :data:`DATA_KEYS` (a caller that did not resolve the data).
    """
    missing = [key for key in DATA_KEYS if key not in data]
    if missing:
        raise ValueError(f"teacher_hash: the resolved data lacks {', '.join(missing)}; pass the launch's data "
                         "(kdsweep.orchestrate.launch.prepare: paths from resolve_data, version from data_version)")
    resolved = {key: str(data[key]) for key in DATA_KEYS}
    limits = {"max_train_images": exp.data.max_train_images, "max_val_images": exp.data.max_val_images}
    return config_hash({**_teacher_defining(exp), "data": {**resolved, **limits}})


def distinct_teachers(rows: Mapping[str, ExperimentConfig], data: Mapping[str, str]) -> dict[str, ExperimentConfig]:
    """Teacher hash -> a row config with that teacher, for the rows that distil (in row order)."""
    out: dict[str, ExperimentConfig] = {}
    for exp in rows.values():
        if exp.kd:
            out.setdefault(teacher_hash(exp, data), exp)
    return out


def count_trials(space: SearchSpace, seeds: int, num_samples: int = 1) -> int:
    """Trials Tune will start: rows x seeds x grid sizes x num_samples (before a scheduler stops any)."""
    total = len(space.labels) * seeds * num_samples
    for sampler in space.space.values():
        if sampler.kind == "grid":
            total *= len(sampler.args)
    return total


def tune_param_space(space: SearchSpace, seeds: Sequence[int]) -> dict[str, Any]:
    """Ray Tune ``param_space``: rows x seeds as grids, plus the space's samplers."""
    from ray import tune  # lazy: ray is heavy, and validation and --dry-run never need it

    return {
        "row": tune.grid_search(list(space.labels)),
        "seed": tune.grid_search(list(seeds)),
        "params": {path: sampler.to_tune() for path, sampler in space.space.items()},
    }
