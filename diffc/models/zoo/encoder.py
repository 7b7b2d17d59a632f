"""The zoo's text encoder: a word-level tokenizer and a one-layer transformer over the tokens, so the
denoisers are conditioned on a sequence (cross- or joint-attention), as text-to-image models are."""

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

PAD = 0  # token id of padding, and of the empty prompt used for classifier-free guidance


class AttributeEncoder(ModelMixin, ConfigMixin):
    """Encodes prompts made of a fixed vocabulary into (batch, max_length, dim) hidden states and a
    (batch, dim) pooled vector. Words outside the vocabulary are dropped, as a tokenizer's unknown
    pieces would carry no meaning this model learned."""

    @register_to_config
    def __init__(self, vocabulary: list[str] = (), max_length: int = 6, dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.words = {word: index + 1 for index, word in enumerate(vocabulary)}
        self.token_embedding = nn.Embedding(len(vocabulary) + 1, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        self.layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            ids = [self.words[word] for word in prompt.lower().split() if word in self.words]
            ids = ids[: self.config.max_length]
            rows.append(ids + [PAD] * (self.config.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.position_embedding.device)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.token_embedding(token_ids) + self.position_embedding
        hidden = self.norm(self.layer(hidden))
        return hidden, hidden.mean(dim=1)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(self.tokenize(prompts))
