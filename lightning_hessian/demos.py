"""Real-model shapes for tests, benchmarks and examples: a ResNet-style CNN with BatchNorm and small Transformers.

Everything here is a plain ``nn.Module`` plus seeded random data of the right shape (no downloads, no Lightning), so
the engine can be measured on the architectures users train and not only on small MLPs:

* :class:`ResNetCNN`: CIFAR-shaped residual CNN (BasicBlocks with BatchNorm, He et al. 2016); ``width=64`` has about
  1.2 M parameters, ``width=4`` a few thousand (tests).
* :class:`TransformerLM`: causal language model built from ``nn.TransformerEncoderLayer`` (its attention runs
  ``F.scaled_dot_product_attention`` internally).
* :class:`SDPAttentionLM`: the same idea with a hand-written block that calls
  ``torch.nn.functional.scaled_dot_product_attention`` directly.
* :func:`image_batches` / :func:`token_batches`: seeded random data for them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "BasicBlock",
    "ResNetCNN",
    "SDPAttentionBlock",
    "SDPAttentionLM",
    "TransformerLM",
    "image_batches",
    "lm_loss",
    "token_batches",
]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of BasicBlocks (widths ``w, 2w, 4w``), global pooling, a Linear.

    Args:
        width: channels of the first stage (64: about 1.2 M parameters with one block per stage).
        blocks: BasicBlocks per stage.
        num_classes: outputs.
        in_channels: input channels.
    """

    def __init__(
        self, width: int = 16, blocks: tuple[int, int, int] = (1, 1, 1), num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c_in = width
        for stage, count in enumerate(blocks):
            c_out = width * 2**stage
            for index in range(count):
                layers.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and index == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of a ``(B, C, H, W)`` image batch."""
        return self.head(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


class TransformerLM(nn.Module):
    """Causal Transformer language model from ``nn.TransformerEncoderLayer`` (pre-norm, GELU, no dropout by default).

    Args:
        vocab_size: number of tokens.
        d_model: embedding width.
        nhead: attention heads.
        num_layers: encoder layers.
        max_len: longest sequence (learned positional embedding).
        dropout: dropout of the layers.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        d_model: int = 32,
        nhead: int = 4,
        num_layers: int = 2,
        max_len: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward=4 * d_model,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``(B, T, vocab)`` of a ``(B, T)`` token batch."""
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=self.position.dtype)
        hidden = self.embed(tokens) + self.position[:length]
        return self.head(self.norm(self.encoder(hidden, mask=mask, is_causal=True)))


class SDPAttentionBlock(nn.Module):
    """Pre-norm Transformer block that calls ``F.scaled_dot_product_attention(..., is_causal=True)`` itself."""

    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        """One block on ``(B, T, d_model)``."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class SDPAttentionLM(nn.Module):
    """Causal language model of :class:`SDPAttentionBlock` layers."""

    def __init__(self, vocab_size: int = 64, d_model: int = 32, nhead: int = 4, num_layers: int = 2, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, d_model))
        self.blocks = nn.Sequential(*(SDPAttentionBlock(d_model, nhead) for _ in range(num_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``(B, T, vocab)``."""
        hidden = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(hidden)))


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of a ``(tokens, targets)`` batch (the ``loss_fn(model, batch)`` contract)."""
    tokens, targets = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def image_batches(
    num_batches: int = 2,
    batch_size: int = 16,
    *,
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[Tensor, Tensor]]:
    """Seeded CIFAR-shaped ``(images, labels)`` batches."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, *shape, generator=gen).to(dtype),
            torch.randint(0, num_classes, (batch_size,), generator=gen),
        )
        for _ in range(num_batches)
    ]


def token_batches(
    num_batches: int = 2, batch_size: int = 8, *, length: int = 16, vocab_size: int = 64, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Seeded ``(tokens, next tokens)`` batches of random token sequences."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        seq = torch.randint(0, vocab_size, (batch_size, length + 1), generator=gen)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out
