"""DVPT-MLOps: Dynamic Visual Prompt Tuning of frozen vision transformers, as an MLOps workflow."""

__version__ = "0.1.0"
