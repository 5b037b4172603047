"""Lightning DataModules: layer batches for the two fit loops (and, later, evaluation data)."""

from didi.datamodules.causal_lm import CausalLMDataModule
from didi.datamodules.image import ImageClassificationDataModule
from didi.datamodules.layers import LayerBatchDataModule, LayerBatches
from didi.datamodules.text import ShardSampler, TextClassificationDataModule

__all__ = [
    "CausalLMDataModule",
    "ImageClassificationDataModule",
    "LayerBatchDataModule",
    "LayerBatches",
    "ShardSampler",
    "TextClassificationDataModule",
]
