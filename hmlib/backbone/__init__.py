"""The backbone stage: a conv net trained with labels on the meta-training datasets, its embeddings, its per-task
modulation and its transductive adaptation to a held-out dataset."""
from hmlib.backbone.embeddings import EmbeddingSet, embed_images, embed_split, get_embeddings
from hmlib.backbone.model import ConvBackbone, augment, batch_statistics, blocks
from hmlib.backbone.train import adapt_batchnorm, get_all_backbones, get_backbone, load_backbone, train_backbone
from hmlib.backbone.transductive import get_transductive_backbone

__all__ = ["ConvBackbone", "EmbeddingSet", "adapt_batchnorm", "augment", "batch_statistics", "blocks", "embed_images",
           "embed_split", "get_all_backbones", "get_backbone", "get_embeddings", "get_transductive_backbone",
           "load_backbone", "train_backbone"]
