"""Validate: every artifact against the PyTorch reference, with per-precision tolerances and task agreement."""

from mbexport.validate.checks import tolerances_for
from mbexport.validate.reference import TorchRunner, load_reference
from mbexport.validate.report import ArtifactResult, Report
from mbexport.validate.suite import up_to_date, validate, validate_artifact, validate_task

__all__ = ["ArtifactResult", "Report", "TorchRunner", "load_reference", "tolerances_for", "up_to_date", "validate",
           "validate_artifact", "validate_task"]
