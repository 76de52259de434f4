"""The ResidualVQ lookup of HeartCodec (SPEC §5.4): codes → project_out(Σ_k codebook_k[code_k]).

Only decoding is needed, so the module keeps just the codebooks and project_out; project_in and
the EMA statistics of the official checkpoint are not loaded.
"""

from __future__ import annotations

import torch
from torch import nn


class Codebook(nn.Module):
    """One quantizer's codebook, stored as the checkpoint does: [1, codebook_size, codebook_dim]."""

    def __init__(self, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.empty(1, codebook_size, codebook_dim))


class Quantizer(nn.Module):
    def __init__(self, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(codebook_size, codebook_dim)


class ResidualVQ(nn.Module):
    def __init__(self, num_quantizers: int, codebook_size: int, codebook_dim: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            Quantizer(codebook_size, codebook_dim) for _ in range(num_quantizers)
        )
        self.project_out = nn.Linear(codebook_dim, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., num_quantizers, T] (valid ids) → [..., T, dim]."""
        q = sum(
            nn.functional.embedding(codes[..., k, :], layer._codebook.embed[0])
            for k, layer in enumerate(self.layers)
        )
        return self.project_out(q.to(self.project_out.weight.dtype))
