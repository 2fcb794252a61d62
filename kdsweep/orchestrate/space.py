"""Search-space files: YAML (data only) -> labelled ablation rows and Ray Tune samplers.

A file looks like::

    name: ablation_ssim
    description: ...
    metric: AP            # what a search optimises / what the table sorts by
    mode: max
    baseline: baseline    # the row the table's deltas refer to (default: the row labelled baseline)
    base:                 # ExperimentConfig overrides applied to every row (on top of the preset)
      train: {epochs: 4}
    rows:                 # labelled configurations; each one's keys override ``base``
      - label: baseline
        kd: []
      - label: ssim
        kd: [{loss: ssim, weight: 2.0}]
      - label: ssim without adapter
        presets: [paper]  # optional: the presets this row exists in (here: equal FPN widths)
        kd: [{loss: ssim, weight: 2.0}]
    space:                # optional samplers over dotted config paths, crossed with the rows
      kd.0.weight: {grid: [1, 2, 4]}
    search:               # optional: how Tune explores ``space``
      algorithm: random   # random | optuna
      scheduler: fifo     # fifo | asha
      num_samples: 1
    presets:              # optional: this file's own setting of a named preset
      paper:
        reproduces: "COCO 1x, RetinaNet R101 -> R50: baseline 36.4, SSIM 40.1 AP"
        experiment: {train: {freeze_backbone: 0.11}}   # merged over the preset, under base

``presets.<name>.experiment`` is merged over the named preset (``kdsweep.presets``) before
``base`` and the rows: each ablation states its own paper's setting beside its rows, and
``reproduces`` is the paper's number the launcher prints next to the result.

Samplers: ``grid: [v, ...]``, ``choice: [v, ...]``, ``uniform: [lo, hi]``,
``loguniform: [lo, hi]``, ``randint: [lo, hi]`` (hi exclusive).

A search over methods (``search_spaces/tune_methods.yaml``): a row lists every candidate term in
its ``kd`` (the menu, each at its default weight); ``kd.use`` samples which of them a trial keeps
(a list of loss names; ``[]`` keeps none), ``kd.<loss>.<field>`` sets a field of that term when the
trial kept it (``kd.pkd.weight``, ``kd.pkd.levels``) and ``kd.*.<field>`` of every kept term
(:func:`kdsweep.orchestrate.trials.apply_sampled`). Every problem raises
:class:`~kdsweep.config.ConfigError` naming the file and the field, before anything starts.

This module is the file format only; :mod:`kdsweep.orchestrate.trials` turns a space and a
preset into the typed configs of its rows and trials.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from kdsweep.config import ConfigError
from kdsweep.names import check_space_name

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = ("name", "description", "metric", "mode", "baseline", "base", "rows", "space", "search", "presets")
PRESET_KEYS = ("reproduces", "experiment")
SEARCH_KEYS = ("algorithm", "scheduler", "num_samples", "max_concurrent_trials", "grace_period", "reduction_factor", "seed")


@dataclass(frozen=True)
class Sampler:
    """One sampler: ``kind`` in SAMPLERS and its ``args`` (values or bounds)."""

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The equivalent ``ray.tune`` search-space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(self.encoded())
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(*self.args)

    @property
    def structured(self) -> bool:
        """A choice among lists/mappings (e.g. dilation-rate sets): Optuna takes only scalars."""
        return self.kind == "choice" and any(isinstance(a, (list, tuple, Mapping)) for a in self.args)

    def encoded(self) -> list[Any]:
        """Choice values as Tune sees them: JSON strings when :attr:`structured`."""
        return [json.dumps(a) for a in self.args] if self.structured else list(self.args)

    def decode(self, value: Any) -> Any:
        """The config value of a sampled (possibly encoded) value."""
        return json.loads(value) if self.structured and isinstance(value, str) else value

    def representative(self) -> Any:
        """A value the sampler can produce (used to validate configs before starting)."""
        if self.kind in ("grid", "choice"):
            return self.args[0]
        return self.args[0] if self.kind == "randint" else (self.args[0] + self.args[1]) / 2

    def values(self) -> list[Any]:
        """Every value of a grid/choice; the bounds otherwise."""
        return list(self.args)


@dataclass(frozen=True)
class Row:
    """A labelled ablation row: config overrides on top of the space's ``base``."""

    label: str
    overrides: Mapping[str, Any]
    presets: tuple[str, ...] | None = None  # the presets this row exists in (None: every preset)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed search-space file."""

    name: str
    source: str
    description: str = ""
    metric: str = "AP"
    mode: str = "max"
    baseline: str = "baseline"
    base: Mapping[str, Any] = field(default_factory=dict)
    rows: tuple[Row, ...] = ()
    space: Mapping[str, Sampler] = field(default_factory=dict)
    search: Mapping[str, Any] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def preset_experiment(self, preset: str) -> Mapping[str, Any]:
        """This file's overrides of preset ``preset`` (``presets.<name>.experiment``; empty if none)."""
        return (self.presets.get(preset) or {}).get("experiment") or {}

    def reproduces(self, preset: str) -> str:
        """The paper's number this file's rows should reproduce under ``preset`` ("" if none)."""
        return str((self.presets.get(preset) or {}).get("reproduces") or "")

    @property
    def labels(self) -> list[str]:
        return [row.label for row in self.rows] or ["default"]

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        if label == "default" and not self.rows:
            return Row("default", {})
        raise ConfigError(f"{self.source}: no row labelled '{label}'")

    @property
    def is_grid(self) -> bool:
        """True when every sampler is a grid (an ablation, no random search)."""
        return all(s.kind == "grid" for s in self.space.values())

    def for_preset(self, preset: str) -> "SearchSpace":
        """This space without the rows that name other presets (a row's ``presets: [paper]``: e.g.
        an adapter-off row that needs the paper's equal FPN widths)."""
        return dataclasses.replace(self, rows=tuple(r for r in self.rows if r.presets is None or preset in r.presets))

    def with_rows(self, wanted: list[str]) -> "SearchSpace":
        """This space restricted to the rows labelled ``wanted`` (``--rows``), in file order.

        Raises:
            ConfigError: a label that is not a row of the file.
        """
        missing = [r for r in wanted if r not in self.labels]
        if missing:
            raise ConfigError(f"--rows: '{missing[0]}' is not a row of {self.source}; rows: {', '.join(self.labels)}")
        return dataclasses.replace(self, rows=tuple(r for r in self.rows if r.label in wanted))


def _parse_sampler(source: str, path: str, spec: Any) -> Sampler:
    where = f"{source}: space.{path}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where} must be one sampler like {{grid: [1, 2]}}; samplers: {', '.join(SAMPLERS)}")
    kind, args = next(iter(spec.items()))
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: sampler '{kind}' is unknown; use one of {', '.join(SAMPLERS)}")
    if not isinstance(args, list):
        raise ConfigError(f"{where}.{kind} must be a list, got {args!r}")
    if kind in ("grid", "choice"):
        if not args:
            raise ConfigError(f"{where}.{kind} is empty; give at least one value")
        return Sampler(kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}.{kind} needs two numbers [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}.{kind} bounds [{low}, {high}] need low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform bounds [{low}, {high}] must be > 0")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}.randint bounds [{low}, {high}] must be integers")
    return Sampler(kind, (low, high))


def _parse_rows(source: str, rows: Any) -> tuple[Row, ...]:
    if not isinstance(rows, list):
        raise ConfigError(f"{source}: rows must be a list of {{label: ..., <overrides>}}")
    parsed: list[Row] = []
    for i, item in enumerate(rows):
        if not isinstance(item, Mapping) or not isinstance(item.get("label"), str) or not item["label"]:
            raise ConfigError(f"{source}: rows[{i}] needs a non-empty 'label'")
        overrides = {k: v for k, v in item.items() if k not in ("label", "presets")}
        presets = item.get("presets")
        if presets is not None:
            from kdsweep.presets import PRESETS

            if not isinstance(presets, list) or not presets or any(p not in PRESETS for p in presets):
                raise ConfigError(f"{source}: rows[{i}] ('{item['label']}') presets must be a non-empty list of "
                                  f"{', '.join(PRESETS)}, got {presets!r}")
            presets = tuple(presets)
        # one label may name rows of disjoint presets (a method's paper row and its CPU rows)
        if any(r.label == item["label"] and (r.presets is None or presets is None or set(r.presets) & set(presets))
               for r in parsed):
            raise ConfigError(f"{source}: rows[{i}] label '{item['label']}' is used twice; labels must be unique "
                              "(or the rows' presets disjoint)")
        parsed.append(Row(item["label"], overrides, presets))
    return tuple(parsed)


def parse_space(data: Any, source: str) -> SearchSpace:
    """Parse the mapping of a search-space file; ``source`` names it in errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the file must hold a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{source}: key '{unknown[0]}' is unknown; known keys: {', '.join(TOP_KEYS)}")
    if data.get("mode", "max") not in ("max", "min"):
        raise ConfigError(f"{source}: mode must be max or min")
    space_spec = data.get("space") or {}
    if not isinstance(space_spec, Mapping):
        raise ConfigError(f"{source}: space must map dotted config paths to samplers")
    search = dict(data.get("search") or {})
    bad = [k for k in search if k not in SEARCH_KEYS]
    if bad:
        raise ConfigError(f"{source}: search.{bad[0]} is unknown; known: {', '.join(SEARCH_KEYS)}")
    if search.get("algorithm", "random") not in ("random", "optuna"):
        raise ConfigError(f"{source}: search.algorithm must be random or optuna")
    if search.get("scheduler", "fifo") not in ("fifo", "asha"):
        raise ConfigError(f"{source}: search.scheduler must be fifo or asha")
    space = {str(p): _parse_sampler(source, str(p), s) for p, s in space_spec.items()}
    grids = [p for p, s in space.items() if s.kind == "grid"]
    if search.get("algorithm") == "optuna" and grids:
        raise ConfigError(f"{source}: space.{grids[0]}: optuna cannot search a grid sampler; use choice, or a separate grid sweep")
    for key, low in (("num_samples", 1), ("max_concurrent_trials", 1), ("grace_period", 1), ("reduction_factor", 2), ("seed", 0)):
        value = search.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"{source}: search.{key} must be an integer >= {low}, got {value!r}")
    if search.get("algorithm") == "optuna" and len(data.get("rows") or []) > 1:
        raise ConfigError(f"{source}: optuna searches one configuration; keep one row (or run the rows as an ablation)")
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"{source}: base must be a mapping of config overrides")
    presets = _parse_presets(source, data.get("presets") or {})
    return SearchSpace(
        name=check_space_name(str(data.get("name") or Path(source).stem), source, from_file_name=not data.get("name")),
        source=source,
        description=str(data.get("description") or ""),
        metric=str(data.get("metric", "AP")),
        mode=str(data.get("mode", "max")),
        baseline=str(data.get("baseline", "baseline")),
        base=dict(base),
        rows=_parse_rows(source, data.get("rows") or []),
        space=space,
        search=search,
        presets=presets,
    )


def _parse_presets(source: str, presets: Any) -> dict[str, dict[str, Any]]:
    """``presets:``: known preset names, each ``{reproduces: str, experiment: mapping}``."""
    from kdsweep.presets import PRESETS  # data only; here to keep the file format's imports small

    if not isinstance(presets, Mapping):
        raise ConfigError(f"{source}: presets must map preset names ({', '.join(PRESETS)}) to {{reproduces, experiment}}")
    out = {}
    for name, spec in presets.items():
        where = f"{source}: presets.{name}"
        if name not in PRESETS:
            raise ConfigError(f"{where} is not a preset; use one of {', '.join(PRESETS)}")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping with keys {', '.join(PRESET_KEYS)}")
        bad = [k for k in spec if k not in PRESET_KEYS]
        if bad:
            raise ConfigError(f"{where}.{bad[0]} is unknown; known keys: {', '.join(PRESET_KEYS)}")
        if not isinstance(spec.get("experiment") or {}, Mapping):
            raise ConfigError(f"{where}.experiment must be a mapping of config overrides")
        if not isinstance(spec.get("reproduces", ""), str):
            raise ConfigError(f"{where}.reproduces must be a string: the paper's number, e.g. \"36.4 -> 40.1 AP\"")
        out[str(name)] = dict(spec)
    return out


def load_space(path: str | Path) -> SearchSpace:
    """Read and parse a search-space YAML file: plain data only, no tag (``!!python/object:...``
    and any other ``!tag``: safe_load refuses some with a traceback-free error and crashes on
    others, ``!!int x``, so none is constructed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such search-space file; check the path (e.g. search_spaces/ablation_ssim.yaml)")
    text = path.read_text()
    try:
        tagged = next((event for event in yaml.parse(text, Loader=yaml.SafeLoader) if getattr(event, "tag", None)), None)
        data = yaml.safe_load(text) if tagged is None else None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if tagged is not None:
        tag = tagged.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(f"{path}: the YAML tag {tag} at line {tagged.start_mark.line + 1} is not allowed: a search-space "
                          "file holds plain data (mappings, lists, strings, numbers); remove the tag")
    return parse_space(data, str(path))
