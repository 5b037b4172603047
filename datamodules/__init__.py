"""Lightning DataModules: layer batches for the two fit loops (and, later, evaluation data)."""
from didi.datamodules.layers import LayerBatchDataModule, LayerBatches

__all__ = ["LayerBatchDataModule", "LayerBatches"]
