"""MURA loading: index, Dataset, DataModule, cache and the synthetic MURA-layout generator."""

from kalm_lightning.data.mura import MURADataModule, MURADataset, read_mura_index

__all__ = ["MURADataModule", "MURADataset", "read_mura_index"]
