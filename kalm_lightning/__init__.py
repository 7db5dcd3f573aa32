"""KALM (Key Area Localization Mechanism, Huang et al., ICASSP 2020) on PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
