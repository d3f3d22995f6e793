"""Exit readouts: turn an intermediate layer's hidden state into next-token logits."""

from earlyexit.readouts.readout import ExitReadout, LayerAdapter

__all__ = ["ExitReadout", "LayerAdapter"]
