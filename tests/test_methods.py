"""The registry of KD terms (kdsweep.methods): one builder signature, the config entry reaches the
term, one-line errors for an unknown name or what a builder rejects, and a new method that is its
own class plus one registry line."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from kdsweep.config import ConfigError, ExperimentConfig, KDTermConfig, ModelConfig, from_dict
from kdsweep.kd.feature import FeatureTerm
from kdsweep.kd.step import KDStep
from kdsweep.kd.term import KDTerm, Need, TermSpec
from kdsweep.methods import TERMS, build_term, term_names_known
from kdsweep.methods.ssim import ssim_feature_loss
from kdsweep.models.detectors import build_detector
from kdsweep.train.engine import train_one_epoch
from kdsweep.train.model import build_model
from kdsweep.train.optim import build_optimization


def _model(channels: int) -> SimpleNamespace:
    """What build_term reads of a detector: its FPN width."""
    return SimpleNamespace(backbone=SimpleNamespace(out_channels=channels))


def _levels(channels: int, sizes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, s, s, generator=g) for s in sizes]


def test_every_builder_takes_one_spec() -> None:
    """The contract: one builder signature, so the registry needs no inspection of arguments."""
    assert term_names_known() == sorted(TERMS)
    for name, builder in TERMS.items():
        params = list(inspect.signature(builder).parameters.values())
        assert len(params) == 1 and params[0].annotation in (TermSpec, "TermSpec"), name


def test_the_config_entry_reaches_the_term() -> None:
    cfg = from_dict(KDTermConfig, {"loss": "ssim", "weight": 2.0, "adapter": True, "params": {"alpha": 0, "beta": 0}})
    term = build_term(cfg, name="ssim", levels=("p3", "p4"), student=_model(3), teacher=_model(6))
    assert isinstance(term, FeatureTerm) and isinstance(term, KDTerm)
    assert term.params == {"alpha": 0, "beta": 0} and term.adapters is not None and len(term.adapters) == 2
    s, t = _levels(3, (8, 4), 1), _levels(6, (8, 4), 2)
    expected = sum(ssim_feature_loss(a(x), y, alpha=0, beta=0) for a, x, y in zip(term.adapters, s, t))
    assert term.compare(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["l2", "pkd", "mgd", "fgd"])
def test_adapter_auto_adds_the_adapter_exactly_when_the_widths_differ(loss: str) -> None:
    cfg = from_dict(KDTermConfig, {"loss": loss, "adapter": "auto"})
    student = build_detector(ModelConfig(fpn_channels=8), 3) if loss == "fgd" else _model(8)  # FGD reads its strides
    assert build_term(cfg, name=loss, levels=("p3",), student=student, teacher=_model(8)).adapters is None
    assert len(build_term(cfg, name=loss, levels=("p3",), student=student, teacher=_model(16)).adapters) == 1
    with pytest.raises(ConfigError, match="kd.l2.adapter 'yes' is unknown; use true, false or auto"):
        from_dict(KDTermConfig, {"loss": "l2", "adapter": "yes"})


def test_adapter_auto_compares_the_widths_the_term_compares() -> None:
    """R18 and R34 bodies are both 512 wide while their FPNs here are 8 and 16: on C5 ``auto`` adds nothing."""
    student = build_detector(ModelConfig(backbone="resnet18", fpn_channels=8), 3)
    teacher = build_detector(ModelConfig(backbone="resnet34", fpn_channels=16), 3)
    body = from_dict(KDTermConfig, {"loss": "l2", "adapter": "auto", "params": {"source": "body"}})
    assert build_term(body, name="l2", levels=("p3",), student=student, teacher=teacher).adapters is None
    fpn = from_dict(KDTermConfig, {"loss": "l2", "adapter": "auto"})
    assert len(build_term(fpn, name="l2", levels=("p3",), student=student, teacher=teacher).adapters) == 1


def test_an_unknown_name_is_one_line_listing_the_known_ones() -> None:
    cfg = KDTermConfig(loss="ssimm")
    known = ", ".join(sorted(TERMS))
    with pytest.raises(ConfigError) as info:
        build_term(cfg, name="ssimm", levels=("p3",), student=_model(8), teacher=_model(8), index=0)
    assert str(info.value) == f"kd[0].loss 'ssimm' is unknown; known: {known}"
    with pytest.raises(ConfigError, match=rf"^kd\.loss 'ssimm' is unknown; known: {known}$"):
        build_term(cfg, name="ssimm", levels=("p3",), student=_model(8), teacher=_model(8))


def test_what_a_builder_rejects_passes_through() -> None:
    with pytest.raises(ConfigError, match="alfa is unknown"):
        build_term(KDTermConfig(loss="ssim", params={"alfa": 1}), name="ssim", levels=("p3",), student=_model(8),
                   teacher=_model(8))
    with pytest.raises(ConfigError, match="adapter: true"):
        build_term(KDTermConfig(loss="l1"), name="l1", levels=("p3",), student=_model(8), teacher=_model(16))


class _Probe(KDTerm):
    """A new method written against the contract alone: it needs the student's targets and both
    backbone bodies, and brings its own optimizer, which steps only from half-way through."""

    needs = frozenset({Need.TARGETS, Need.BODY})

    def __init__(self, spec: TermSpec) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.seen: list[KDStep] = []

    def forward(self, step: KDStep) -> torch.Tensor:
        self.seen.append(step)
        s, t = step.student_body, step.teacher_out.body
        return self.gain * (s.mean() - t.mean()) ** 2

    def own_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.gain], lr=0.5)

    def steps_at(self, progress: float) -> bool:
        return progress >= 0.5


def test_a_new_method_is_its_own_class_and_one_registry_line(monkeypatch) -> None:
    """The redesign's promise: registering a term is all the trainer needs. Its declared needs are
    captured (targets, both bodies), its optimizer owns its parameter (the main one never sees
    it) and steps only when its schedule says so; nothing else in kdsweep knows of it."""
    monkeypatch.setitem(TERMS, "probe", _Probe)
    small = {"backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64}
    exp = from_dict(ExperimentConfig, {"student": small, "teacher": dict(small, fpn_channels=32),
                                       "train": {"epochs": 1, "batch_size": 2, "warmup_iters": 0},
                                       "kd": [{"loss": "probe", "weight": 1.0}]})
    torch.manual_seed(0)
    teacher_state = build_detector(exp.teacher, 3).state_dict()
    distiller = build_model(exp, 3, teacher_state)
    term = distiller.trainable.terms["probe"]
    assert isinstance(term, _Probe)
    optimization = build_optimization(distiller.trainable, distiller.student, exp.train, torch.device("cpu"), steps_per_epoch=4)
    main = {id(p) for group in optimization.optimizer.param_groups for p in group["params"]}
    assert id(term.gain) not in main and len(optimization.term_optimizers) == 1

    g = torch.Generator().manual_seed(0)
    batch = ([torch.rand(3, 64, 64, generator=g) for _ in range(2)],
             [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2)
    gains = []
    for i in range(4):
        train_one_epoch(distiller, optimization, [batch], device=torch.device("cpu"), epoch=1, step_offset=i,
                        total_steps=4)
        gains.append(term.gain.item())
    assert gains[0] == gains[1] == 1.0  # progress 0 and 0.25: its optimizer does not step
    assert gains[2] != 1.0 and gains[3] != gains[2]  # from progress 0.5 on it does
    step = term.seen[0]
    assert step.targets is not None and len(step.targets) == 2 and step.targets[0]["boxes"].shape == (1, 4)
    assert step.student_body is not None and step.student_body.shape[:2] == (2, 512)
    assert step.teacher_out.body is not None and step.teacher_out.body.shape[:2] == (2, 512)
    assert step.head_outputs is None and step.proposals is None  # not declared: not captured
