"""The reference pretrainer's encoder: a profile in, an embedding out.

The predicted distance between two samples is a distance between their embeddings
(:func:`reference_trainer.loss.embedding_distances`). The encoder normalises per sample (LayerNorm, not
BatchNorm), so a sample's embedding never depends on which other samples share its batch or its rank:
DDP on W ranks and one process on the same global batch compute the same embeddings.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

__all__ = ["ProfileEncoder"]

InputTransform = Literal["sqrt", "log", "none"]


class ProfileEncoder(nn.Module):
    """An MLP mapping a relative-abundance profile to an embedding.

    Layers: an input transform, then for each hidden width ``Linear -> LayerNorm -> GELU -> Dropout``,
    then a final ``Linear`` to ``embedding_dim``. Parameters are initialised from the global torch RNG;
    seed it before construction for a reproducible model.

    Args:
        num_features: Length of an input profile.
        hidden_dims: Widths of the hidden layers (may be empty: a linear encoder).
        embedding_dim: Size of the embedding.
        dropout: Dropout probability after each hidden layer, in ``[0, 1)``.
        input_transform: ``"sqrt"`` (Hellinger-style; tames the skew of abundances, default),
            ``"log"`` (``log(x + 1e-6)`` rescaled) or ``"none"``.

    Raises:
        ValueError: A non-positive size, a dropout outside ``[0, 1)`` or an unknown transform.
    """

    def __init__(
        self,
        num_features: int,
        *,
        hidden_dims: Sequence[int] = (512, 512),
        embedding_dim: int = 64,
        dropout: float = 0.1,
        input_transform: InputTransform = "sqrt",
    ) -> None:
        super().__init__()
        sizes = [num_features, *hidden_dims, embedding_dim]
        if any(int(s) < 1 for s in sizes):
            raise ValueError(
                f"num_features, hidden_dims and embedding_dim must all be positive, got {sizes}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if input_transform not in ("sqrt", "log", "none"):
            raise ValueError(f"unknown input_transform {input_transform!r}; choose 'sqrt', 'log' or 'none'.")
        self.num_features = int(num_features)
        self.embedding_dim = int(embedding_dim)
        self.input_transform: InputTransform = input_transform
        layers: list[nn.Module] = []
        for width_in, width_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [
                nn.Linear(width_in, width_out),
                nn.LayerNorm(width_out),
                nn.GELU(),
                nn.Dropout(dropout),
            ]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.layers = nn.Sequential(*layers)

    def forward(self, profiles: torch.Tensor) -> torch.Tensor:
        """Embed a batch of profiles.

        Args:
            profiles: ``(B, num_features)`` non-negative abundances.

        Returns:
            ``(B, embedding_dim)`` embeddings.

        Raises:
            ValueError: ``profiles`` does not have shape ``(B, num_features)``.
        """
        if profiles.dim() != 2 or profiles.shape[1] != self.num_features:
            raise ValueError(
                f"expected profiles of shape (batch, {self.num_features}), got {tuple(profiles.shape)}; "
                "the encoder's num_features must match the dataset's."
            )
        x = profiles
        if self.input_transform == "sqrt":
            x = torch.sqrt(x.clamp_min(0.0))
        elif self.input_transform == "log":
            # log(1e-6) ~ -13.8: shift and scale so absent features map to 0 and inputs stay O(1).
            x = (torch.log(x.clamp_min(0.0) + 1e-6) + 13.815511) / 13.815511
        out: torch.Tensor = self.layers(x)
        return out
