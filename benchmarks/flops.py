"""Analytic FLOP counts of starkit's ScaleTransformer (STAR / VAR generator).

One multiply-add is 2 FLOPs. Counted, per forward pass over ``B`` sequences of
``L = sum(pn**2)`` tokens (width C, depth D, FFN width F = mlp_ratio * C, T text tokens of
width Dt, codebook V, latent width Cvae):

    per token and block   2 * (C*3C  [self-attn qkv] + C*C [self-attn proj]
                               + C*C [cross-attn q] + C*C [cross-attn proj] + 2*C*F [FFN])
                          + 4*C*T                     [cross-attn scores + values, all T keys]
    per sequence, block   4*C * pairs                 [self-attn scores + values]
                          + T * 2*Dt*2C               [text K/V projection]
    per token             2*C*V                       [logits head]
    per sequence          2*Dt*C + (L - pn_0**2) * 2*Cvae*C  [start token, word embedding]

``pairs`` is the number of (query, key) pairs that the block-causal mask lets through
(``sum_k pn_k**2 * prefix_k``, prefix_k = tokens of scales <= k): the useful work. A fused
kernel given a boolean mask still computes all ``L**2`` pairs; ``attention="dense"`` counts
those instead (this is what ``torch.utils.flop_counter`` reports for the math backend).
In KV-cached sampling, scale k's queries meet exactly ``prefix_k`` keys, so one generation
does the same pair count as a teacher-forced pass; with classifier-free guidance every
row is doubled. Training = 3 x forward (backward ~ 2 x forward). Biases, norms, RoPE,
softmax and other element-wise work are not counted (they are not matrix-unit FLOPs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

P256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
P512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

H200_BF16_PEAK = 789e12  # measured large bf16 matmul rate on the workplace's H200 (ENGINEERING.md)


@dataclass(frozen=True)
class GeneratorArch:
    """What the FLOP count needs to know about a ScaleTransformer."""

    depth: int
    width: int
    num_heads: int
    patch_nums: Tuple[int, ...]
    vocab_size: int = 4096
    latent_dim: int = 32
    text_dim: int = 1024
    text_len: int = 77
    mlp_ratio: float = 4.0
    cross_attention: bool = True

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def ffn_width(self) -> int:
        return round(self.width * self.mlp_ratio)

    @classmethod
    def from_transformer(cls, net, text_len: int) -> "GeneratorArch":
        """Read the sizes off a built ``ScaleTransformer``."""
        blk = net.blocks[0]
        cross = blk.cross_attn is not None
        return cls(depth=net.depth, width=net.width, num_heads=net.num_heads, patch_nums=tuple(net.patch_nums),
                   vocab_size=net.vocab_size, latent_dim=net.word_embed.in_features,
                   text_dim=blk.cross_attn.mat_kv.in_features if cross else 0, text_len=text_len if cross else 0,
                   mlp_ratio=blk.ffn.fc1.out_features / net.width, cross_attention=cross)


def attended_pairs(patch_nums: Sequence[int], attention: str = "block_causal") -> int:
    """(query, key) pairs of one sequence: block-causal (useful) or dense ``L**2``."""
    L = sum(p * p for p in patch_nums)
    if attention == "dense":
        return L * L
    if attention != "block_causal":
        raise ValueError(f"attention must be 'block_causal' or 'dense', got {attention!r}")
    pairs, prefix = 0, 0
    for p in patch_nums:
        prefix += p * p
        pairs += p * p * prefix
    return pairs


def forward_flops(arch: GeneratorArch, batch: int, attention: str = "block_causal") -> Dict[str, float]:
    """FLOPs of one forward pass over ``batch`` full sequences, by part (and ``total``)."""
    C, D, Fw, L = arch.width, arch.depth, arch.ffn_width, arch.seq_len
    N = batch * L  # tokens
    cross = arch.cross_attention
    T, Dt = (arch.text_len, arch.text_dim) if cross else (0, 0)
    parts = {
        "self_attn_linear": D * N * 2 * (C * 3 * C + C * C),
        "cross_attn_linear": D * N * 2 * (C * C + C * C) if cross else 0,
        "ffn": D * N * 2 * (2 * C * Fw),
        "self_attn_sdpa": D * batch * 4 * C * attended_pairs(arch.patch_nums, attention),
        "cross_attn_sdpa": D * N * 4 * C * T,
        "text_kv": D * batch * T * 2 * Dt * 2 * C,
        "head": N * 2 * C * arch.vocab_size,
        "embed": batch * (2 * (Dt or C) * C + (L - arch.patch_nums[0] ** 2) * 2 * arch.latent_dim * C),
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def train_step_flops(arch: GeneratorArch, batch: int) -> float:
    """Training step of the transformer: 3 x forward (block-causal pairs)."""
    return 3.0 * forward_flops(arch, batch)["total"]


def generate_flops(arch: GeneratorArch, batch: int, guided: bool = True) -> float:
    """One cached generation of ``batch`` images: a forward over 2B rows with guidance."""
    return forward_flops(arch, 2 * batch if guided else batch)["total"]


def transformer_params(arch: GeneratorArch) -> int:
    """Matrix parameters of the blocks and head (no biases / embeddings), for a sanity check."""
    C, Fw = arch.width, arch.ffn_width
    per_block = 4 * C * C + 2 * C * Fw + ((2 * C * C + 2 * arch.text_dim * C) if arch.cross_attention else 0)
    return arch.depth * per_block + C * arch.vocab_size


def describe(arch: GeneratorArch) -> dict:
    d = asdict(arch)
    d.update(seq_len=arch.seq_len, pairs_block_causal=attended_pairs(arch.patch_nums),
             pairs_dense=attended_pairs(arch.patch_nums, "dense"), matrix_params=transformer_params(arch))
    return d


def check_against_flop_counter(net, text_len: int, batch: int = 2, seed: int = 0) -> dict:
    """Count one teacher-forced forward of ``net`` (a ScaleTransformer, on CPU) with
    ``torch.utils.flop_counter.FlopCounterMode`` and compare with :func:`forward_flops`.

    Two runs: the default SDPA kernel (on CPU FlopCounterMode has no formula for it, so
    attention counts 0: compared with our count minus both SDPA terms), and the math
    backend (plain matmuls over all L x L pairs: compared with ``attention='dense'``).
    """
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    arch = GeneratorArch.from_transformer(net, text_len)
    g = torch.Generator().manual_seed(seed)
    dev = next(net.parameters()).device
    pooled = torch.randn(batch, arch.text_dim or arch.width, generator=g).to(dev)
    tokens = torch.randn(batch, text_len, arch.text_dim, generator=g).to(dev) if arch.cross_attention else None
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=dev) if arch.cross_attention else None
    inputs = torch.randn(batch, arch.seq_len - arch.patch_nums[0] ** 2, arch.latent_dim, generator=g).to(dev)

    def count(backend=None):
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx, FlopCounterMode(display=False) as fc:
            net.logits(net(pooled, tokens, mask, inputs))
        return float(fc.get_total_flops())

    ours_bc = forward_flops(arch, batch)
    ours_dense = forward_flops(arch, batch, attention="dense")
    no_sdpa = ours_bc["total"] - ours_bc["self_attn_sdpa"] - ours_bc["cross_attn_sdpa"]
    measured_default = count()
    measured_math = count(SDPBackend.MATH)
    return {
        "batch": batch,
        "flop_counter_default_kernel": measured_default,
        "ours_without_sdpa": no_sdpa,
        "ratio_default_vs_ours_without_sdpa": measured_default / no_sdpa,
        "flop_counter_math_backend": measured_math,
        "ours_dense": ours_dense["total"],
        "ratio_math_vs_ours_dense": measured_math / ours_dense["total"],
        "ours_block_causal": ours_bc["total"],
        "ratio_math_vs_ours_block_causal": measured_math / ours_bc["total"],
        "useful_pair_share": attended_pairs(arch.patch_nums) / attended_pairs(arch.patch_nums, "dense"),
    }


if __name__ == "__main__":  # print the counts of the real sizes
    for name, depth in (("d16", 16), ("d30", 30)):
        for pn in (P256, P512):
            a = GeneratorArch(depth=depth, width=64 * depth, num_heads=depth, patch_nums=pn)
            f = forward_flops(a, 1)
            print(f"{name} L={a.seq_len}: fwd/img {f['total'] / 1e12:.3f} TFLOP, train/img {3 * f['total'] / 1e12:.3f}, "
                  f"gen/img (CFG) {generate_flops(a, 1) / 1e12:.3f}; matrix params {transformer_params(a) / 1e9:.3f} B; "
                  f"useful pair share {attended_pairs(pn) / attended_pairs(pn, 'dense'):.3f}")
