"""RQ-VAE: an MLP encoder, M residual codebooks (vector-quantize-pytorch's ResidualVQ), an MLP decoder.

CART quantises what K-Means leaves over: each item's residual (embedding minus
its centroid) becomes M fine tokens v1..vM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from vector_quantize_pytorch import ResidualVQ


class RQVAE(nn.Module):
    def __init__(self, *, dim: int, hidden: int, latent: int, levels: int, codebook_size: int,
                 commitment_weight: float = 0.25, dead_code: float = 0.5):
        super().__init__()
        self.args = dict(dim=dim, hidden=hidden, latent=latent, levels=levels, codebook_size=codebook_size,
                         commitment_weight=commitment_weight, dead_code=dead_code)
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, latent))
        self.quantizer = ResidualVQ(
            dim=latent, num_quantizers=levels, codebook_size=codebook_size,
            kmeans_init=True, kmeans_iters=10,  # codebooks start from k-means of the first batch
            # codes used less than this (EMA count per batch) are replaced by batch samples; at 2, with a few
            # uses per code per batch, codes churned and the reconstruction error rose (0.76 -> 0.90 on 100k)
            threshold_ema_dead_code=dead_code,
            decay=0.99, commitment_weight=commitment_weight,
        )
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # inputs are divided by one global scale so the MLPs see unit-variance values
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor):
        """x (B, D) -> reconstruction (B, D), codes (B, M), loss (reconstruction + commitment)."""
        target = x / self.scale
        quantized, codes, commitment = self.quantizer(self.encoder(target))
        reconstruction = self.decoder(quantized)
        loss = F.mse_loss(reconstruction, target) + commitment.sum()
        return reconstruction * self.scale, codes, loss

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """x (N, D) -> codes (N, M), in batches."""
        self.eval()
        return torch.cat([self.quantizer(self.encoder(x[i: i + batch_size] / self.scale))[1]
                          for i in range(0, len(x), batch_size)])

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, M) -> reconstruction (N, D): the inverse of encode up to quantisation."""
        self.eval()
        return self.decoder(self.quantizer.get_output_from_indices(codes)) * self.scale


def train(x: torch.Tensor, *, hidden: int, latent: int, levels: int, codebook_size: int,
          commitment_weight: float, dead_code: float, steps: int, batch_size: int, lr: float, seed: int) -> RQVAE:
    """Fit an RQ-VAE to the rows of x with batches drawn with replacement; deterministic for a seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RQVAE(dim=x.shape[1], hidden=hidden, latent=latent, levels=levels, codebook_size=codebook_size,
                  commitment_weight=commitment_weight, dead_code=dead_code)
    model.scale.fill_(x[torch.randint(len(x), (min(len(x), 65536),), generator=generator)].std().clamp_min(1e-8))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batch_size = min(batch_size, len(x))
    model.train()
    with tqdm(range(steps), desc="rq-vae", unit=" steps", leave=False) as bar:
        for step in bar:
            batch = x[torch.randint(len(x), (batch_size,), generator=generator)]
            _, _, loss = model(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()

