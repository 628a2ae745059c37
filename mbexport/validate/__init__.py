"""Validate: every artifact against the PyTorch reference, with per-precision tolerances and task agreement."""

from mbexport.validate.checks import TOLERANCES, tolerances_for
from mbexport.validate.reference import TorchRunner, load_reference
from mbexport.validate.report import ArtifactResult, Report
from mbexport.validate.suite import previous_results, validate, validate_artifact, validate_task

__all__ = ["TOLERANCES", "ArtifactResult", "Report", "TorchRunner", "load_reference", "previous_results", "tolerances_for", "validate",
           "validate_artifact", "validate_task"]
