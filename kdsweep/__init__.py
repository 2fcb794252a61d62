"""kdsweep: knowledge distillation sweeps for object detectors."""

__version__ = "0.1.0"

__all__ = ["load_student"]


def load_student(path_or_uri, *, tracking_uri=None, device="cpu"):
    """The distilled detector in eval mode, from a file of ``kdsweep export``, a ``runs:/`` or
    ``models:/`` URI, or a run id: :func:`kdsweep.export.load_student` (imported on first use, so
    that ``import kdsweep`` stays light)."""
    from kdsweep.export import load_student as load

    return load(path_or_uri, tracking_uri=tracking_uri, device=device)
