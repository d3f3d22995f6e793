"""Exit policies: decide, layer by layer, which rows of a batch stop here."""

from earlyexit.policies.adainfer import AdaInferPolicy, fit_adainfer
from earlyexit.policies.base import ExitPolicy, readout_features
from earlyexit.policies.simple import ConfidencePolicy, FullPolicy, StaticPolicy

__all__ = [
    "AdaInferPolicy",
    "ConfidencePolicy",
    "ExitPolicy",
    "FullPolicy",
    "StaticPolicy",
    "fit_adainfer",
    "readout_features",
]
