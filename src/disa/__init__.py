"""DISA: Decoupled Importance-Sampled Anchoring for distribution-matching RL of language models."""

__version__ = "0.1.0"
