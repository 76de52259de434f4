"""The flow-matching half of HeartCodec (SPEC §5.4–5.5): conditioning from codes, the estimator
DiT, and the Euler sampler with classifier-free guidance and an in-context prefix.

Matmuls and convolutions run in the weights' dtype (bfloat16 for `codec_dtype="mixed"`); the
residual streams, the modulations, the ODE state, RoPE tables, timestep features and norm
statistics stay float32 whatever that dtype is. With float32 weights every cast is a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heartmula_rt.config import TIMESTEP_DIM, CodecConfig
from heartmula_rt.model.codec.vq import ResidualVQ
from heartmula_rt.model.layers import apply_rope, rms_norm

NORM_EPS = 1e-6
ROPE_BASE = 10000.0
SIGMA_MIN = 1e-6  # the prefix path is (1 - (1 - SIGMA_MIN)·t)·noise + t·ic


class DecodeCancelled(Exception):  # noqa: N818 (a stop asked for, not a failure)
    """The window being decoded was given up between two ODE steps: its song's `stop` said so
    (a cancelled song). The decoder that raised it is left mid-window; make a new one to decode
    the song again. `pieces`: each decoder's audio of the windows it finished before
    (`WindowDecoder.decode_rounds`), which is the song's."""

    pieces: list = []  # noqa: RUF012 (set on the instance by decode_rounds)


def rope_tables(n: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim/2] of pos·theta_i, theta_i = base^(-2i/head_dim), in float32."""
    i2 = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
    theta = ROPE_BASE ** (-i2 / head_dim)
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * theta[None, :]
    return angles.cos(), angles.sin()


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, statistics in float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=NORM_EPS).to(x.dtype)


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """t [B] in [0, 1] → [B, 512] float32 = [cos | sin] of t·1000·exp(−ln(10⁴)·i/256)."""
    half = TIMESTEP_DIM // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * 1000.0 * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, NORM_EPS)


class ProjectLayer(nn.Module):
    """ffn_2(conv_k3(x)·3^−0.5) over time, on x [B, T, C]; no activation in between."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.ffn_1 = nn.Conv1d(in_dim, out_dim, kernel_size=3, padding=1)
        self.ffn_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, in_dim] in any dtype → float32 [B, T, out_dim]."""
        x = x.to(self.ffn_2.weight.dtype)
        h = self.ffn_1(x.transpose(1, 2)).transpose(1, 2) * 3**-0.5
        return self.ffn_2(h).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class AdaLNSingle(nn.Module):
    """Timestep → (per-block modulation [B, 6, D], embedding e [B, D] for the final norm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepEmbedder(dim)})
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 features [B, 512] → float32 (mod [B, 6, D], e [B, D]); B may be 1."""
        # A matmul's rounding depends on its row count (on this project's CPU 1 row, 2–3 and 4
        # or more differ; 1 row also on the weights' memory alignment). One time for a batch is
        # computed at 2 rows, as one song's [uncond; cond] pair always was: a song's audio is
        # then the same alone, in a batch of any size, and with its weights anywhere.
        one = features.shape[0] == 1
        e = self.emb["timestep_embedder"](
            features.expand(2 if one else -1, -1).to(self.linear.weight.dtype)
        )
        mod = self.linear(F.silu(e)).unflatten(-1, (6, -1)).float()
        return (mod[:1], e[:1].float()) if one else (mod, e.float())


class Attention(nn.Module):
    """Full (non-causal) bias-free attention with RoPE over the whole head_dim."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] in the weights' dtype → the same."""
        B, T, D = x.shape
        q, k, v = (
            proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """AdaLN-single transformer block: modulated RMSNorm → attention / MLP, gated residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(
        self, x: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x [B, T, D] float32 (the residual stream) → the same; only the matmuls are narrow."""
        dtype = self.attn.q_proj.weight.dtype
        mods = (self.scale_shift_table[None].float() + mod)[:, :, None]  # [B, 6, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.unbind(1)
        h = self.attn_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h.to(dtype), cos, sin).float()
        h = self.mlp_norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h.to(dtype)).float()


class Estimator(nn.Module):
    """The velocity DiT: [x | ic | mu] [B, T, in_channels] and t [B] or [1] → velocity
    [B, T, out]."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        d, d2, heads = cfg.inner_dim, 2 * cfg.inner_dim, cfg.num_attention_heads
        self.num_heads = heads
        self.proj_in = ProjectLayer(cfg.in_channels, d)
        self.adaln_single = AdaLNSingle(d)
        self.transformer_blocks = nn.ModuleList(
            Block(d, heads, cfg.mlp_hidden) for _ in range(cfg.num_layers)
        )
        self.scale_shift_table = nn.Parameter(torch.empty(2, d))
        self.connection_proj = ProjectLayer(cfg.in_channels + d, d2)
        self.adaln_single_2 = AdaLNSingle(d2)
        self.transformer_blocks_2 = nn.ModuleList(
            Block(d2, heads, cfg.mlp_hidden_2) for _ in range(cfg.num_layers_2)
        )
        self.scale_shift_table_2 = nn.Parameter(torch.empty(2, d2))
        self.proj_out = ProjectLayer(d2, cfg.out_channels)

    def _stage(
        self,
        s: torch.Tensor,
        features: torch.Tensor,
        adaln: AdaLNSingle,
        blocks: nn.ModuleList,
        table: torch.Tensor,
    ) -> torch.Tensor:
        mod, e = adaln(features)
        cos, sin = rope_tables(s.shape[1], s.shape[-1] // self.num_heads, s.device)
        for block in blocks:
            s = block(s, mod, cos, sin)
        shift, scale = (table[None].float() + e[:, None]).unbind(1)
        return layer_norm(s) * (1 + scale[:, None]) + shift[:, None]

    def forward(self, inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t [B], or [1] for one time broadcast to every row; returns float32 velocities
        whatever the weights' dtype."""
        features = timestep_features(t)
        s = self.proj_in(inp)
        s = self._stage(
            s, features, self.adaln_single, self.transformer_blocks, self.scale_shift_table
        )
        s = self.connection_proj(torch.cat([inp, s], dim=-1))
        s = self._stage(
            s, features, self.adaln_single_2, self.transformer_blocks_2, self.scale_shift_table_2
        )
        return self.proj_out(s)


class FlowMatching(nn.Module):
    """Codes → conditioning mu, and the guided Euler ODE from noise to latents."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.latent_channels = cfg.out_channels
        self.vq_embed = ResidualVQ(cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim, cfg.dim)
        self.cond_feature_emb = nn.Linear(cfg.dim, cfg.dim)
        self.estimator = Estimator(cfg)
        # The optional fast path (graphed.GraphedEstimator) called in the estimator's place.
        self.fast_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def condition(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, n] (valid ids) → float32 mu [B, 2n, dim]: two latent frames per code."""
        q = self.vq_embed(codes).to(self.cond_feature_emb.weight.dtype)
        return self.cond_feature_emb(q).float().repeat_interleave(2, dim=1)

    def sample(
        self,
        mu: torch.Tensor,
        noise: torch.Tensor,
        ic: torch.Tensor,
        prefix: int | Sequence[int],
        *,
        num_steps: int,
        guidance_scale: float | Sequence[float],
        stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Integrate dx/dt = v from x = noise at t = 0 to t = 1; returns float32 latents [B, T, C].

        Each row is a window of its own song: `prefix` and `guidance_scale` are one for every row
        or one per row. A row's first `prefix` frames follow the straight path from noise to the
        in-context target `ic` (float32, zeros past the prefix) and end exactly on it. Guidance
        is batched as [uncond of every row; cond of every row], the unconditional half with
        mu = 0. The rows share the time grid, and a row's result does not depend on the others.
        `stop` (None: never) is asked before every step: True gives the window up there
        (`DecodeCancelled`), so a cancelled song's codec work ends within one ODE step.
        """
        estimator = self.fast_estimator or self.estimator
        device = noise.device
        prefix = torch.as_tensor(prefix, device=device).reshape(-1, 1, 1)
        in_prefix = torch.arange(noise.shape[1], device=device)[None, :, None] < prefix
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device)
        scale = scale.reshape(-1, 1, 1)
        x = noise
        mu_in = torch.cat([torch.zeros_like(mu), mu])
        t_span = torch.linspace(0, 1, num_steps + 1, device=device)
        for t, t_next in zip(t_span[:-1], t_span[1:], strict=True):
            if stop is not None and stop():
                raise DecodeCancelled("the song was cancelled")
            x = torch.where(in_prefix, (1 - (1 - SIGMA_MIN) * t) * noise + t * ic, x)
            inp = torch.cat([x, ic], dim=-1).repeat(2, 1, 1)
            # One time for every row, embedded once and broadcast (AdaLNSingle says why).
            v = estimator(torch.cat([inp, mu_in], dim=-1), t[None])
            v_uncond, v_cond = v.chunk(2)
            x = x + (t_next - t) * (v_uncond + scale * (v_cond - v_uncond))
        return torch.where(in_prefix, ic, x)
