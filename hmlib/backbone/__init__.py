"""The backbone stage: a conv net trained with labels on the meta-training datasets, and its embeddings."""
from hmlib.backbone.embeddings import EmbeddingSet, embed_images, embed_split, get_embeddings, setting_backbone
from hmlib.backbone.model import ConvBackbone, augment, batch_statistics
from hmlib.backbone.train import (adapt_batchnorm, get_all_backbones, get_backbone, load_backbone,
                                   train_backbone)

__all__ = ["ConvBackbone", "EmbeddingSet", "adapt_batchnorm", "augment", "batch_statistics", "embed_images", "embed_split",
           "get_all_backbones", "get_backbone", "get_embeddings", "load_backbone", "setting_backbone", "train_backbone"]
