"""MURA loading: index, Dataset, DataModule, cache and the synthetic MURA-layout generator."""

from kalm_lightning.data.dataset import MURADataset
from kalm_lightning.data.index import read_mura_index
from kalm_lightning.data.mura import MURADataModule

__all__ = ["MURADataModule", "MURADataset", "read_mura_index"]
