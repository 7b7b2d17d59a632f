"""Small modules that are pipeline components besides the diffusers denoisers."""

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class ClassTokenEmbedding(ModelMixin, ConfigMixin):
    """Maps class labels to cross-attention tokens, the stand-in for a text encoder.

    Index num_classes is the learned "null" class used for classifier-free guidance.
    Output shape: (batch, num_tokens, embedding_dim), i.e. `encoder_hidden_states`.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, embedding_dim: int = 64, num_tokens: int = 1):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, num_tokens * embedding_dim)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        tokens = self.table(labels)
        return tokens.view(labels.shape[0], self.config.num_tokens, self.config.embedding_dim)
