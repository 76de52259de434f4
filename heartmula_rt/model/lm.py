"""The HeartMuLa LM (SPEC §3): a Llama-3.2 backbone over prompt/frame rows and a small depth
decoder that expands each backbone step into the 8 codebook tokens of one audio frame.

Both transformers are torchtune-style decoders without token embedding or output head. KV caches
are not module state: a batch allocates an `LMCache` with `HeartMuLa.new_cache` and passes it (or
one song's rows of it) to every call, so one loaded model serves any number of rows (a song's 1,
or 2 with CFG, several songs' side by side) and any length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heartmula_rt.config import LlamaFlavor, LMConfig
from heartmula_rt.errors import UserError
from heartmula_rt.model.layers import apply_rope, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale, self.eps)

    def add_norm(self, residual: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The residual add before the norm: (s, norm(s)) for s = residual + delta, the sum in
        their dtype as `+` rounds it (the fused twin does both in one launch)."""
        s = residual + delta
        return s, self(s)


# Llama-3 RoPE scaling constants (scale_factor comes from the flavor).
_LOW_FREQ, _HIGH_FREQ, _OLD_CONTEXT = 1.0, 4.0, 8192.0


class RotaryEmbedding:
    """Llama-3 scaled RoPE on interleaved pairs (x[2i], x[2i+1]).

    Not an nn.Module and holds no state_dict entries: the cos/sin tables are float32 and built
    lazily on the device of first use, so the model can be constructed on the meta device.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float, scale_factor: float) -> None:
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scale_factor = scale_factor
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    def _inv_freq(self) -> Tensor:
        # float32 base frequencies, then the Llama-3 rescaling in float64 (as torchtune does it
        # in Python floats), stored back as float32.
        d, s = self.head_dim, self.scale_factor
        theta = (1.0 / (self.base ** (torch.arange(0, d, 2).float() / d))).double()
        wavelen = 2 * math.pi / theta
        smooth = (_OLD_CONTEXT / wavelen - _LOW_FREQ) / (_HIGH_FREQ - _LOW_FREQ)
        scaled = torch.where(
            wavelen > _OLD_CONTEXT / _LOW_FREQ, theta / s, (1 - smooth) * theta / s + smooth * theta
        )
        scaled = torch.where(wavelen < _OLD_CONTEXT / _HIGH_FREQ, theta, scaled)
        return scaled.float()

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin: float32 [max_seq_len, head_dim // 2] on `device`, built once per device."""
        if self._cos is None or self._cos.device != device:
            # Normal tensors even if first built under inference mode: they are kept.
            with torch.inference_mode(False):
                positions = torch.arange(self.max_seq_len, dtype=torch.float32)
                angles = torch.outer(positions, self._inv_freq())
                self._cos, self._sin = angles.cos().to(device), angles.sin().to(device)
        return self._cos, self._sin


class KVCache:
    """Static keys/values of one attention layer for one request: [B, H_kv, max_len, D].

    Only positions below the current end are ever read, so reusing a cache from position 0 (the
    depth decoder does it every frame) needs no clearing.
    """

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    @classmethod
    def zeros(
        cls,
        rows: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (rows, num_kv_heads, max_len, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v [B, H_kv, T, D] at positions start..start+T-1; return the filled prefix."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache of length {self.k.shape[2]} cannot hold position {end - 1}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_at(self, pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Write each row's one new k/v [B, H_kv, 1, D] at that row's device-held position
        `pos` [B] (int64); return the first `kv_len` positions (the caller masks, per row,
        those past its position)."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, pos] = k[:, :, 0]
        self.v[rows, :, pos] = v[:, :, 0]
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]

    def rows(self, first: int, count: int) -> KVCache:
        """A view of rows first..first+count-1: one allocation serves every song of a batch."""
        return KVCache(self.k[first : first + count], self.v[first : first + count])


class Rope(nn.Module):
    """RoPE on one layer's queries and keys, q [B, T, H, D] and k [B, T, H_kv, D], by the
    angles of their positions, cos/sin [T, D/2]: `apply_rope` as a parameterless module, so its
    fused twin (`kernels.fused_layers`) can be swapped in."""

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]: broadcast over heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def to_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        start: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache,
        kv_len: int | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE on q [B, T, H, D] and k [B, T, H_kv, D], then k and v [B, T, H_kv, D] written
        into `cache` at their positions (an int `start`: start.., every row; device-held
        positions `start` [B]: one per row, cos/sin [B, D/2]): (the rotated q [B, T, H, D], the
        cached keys and values to read, [B, H_kv, L, D]). The fused twin writes the cache in the
        same launch as the rotation."""
        b = q.shape[0]
        if isinstance(start, Tensor):
            # One position per row, cos/sin [B, D/2]: rows as the positions of one sequence.
            q, k = self(q.view(1, b, *q.shape[2:]), k.view(1, b, *k.shape[2:]), cos, sin)
            q, k = q.view(b, 1, *q.shape[2:]), k.view(b, 1, *k.shape[2:])
        else:
            q, k = self(q, k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if isinstance(start, Tensor):  # each row's one position, held on the device
            k, v = cache.write_at(start, k, v, kv_len)
        else:
            k, v = cache.update(start, k, v)
        return q, k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        start: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache,
        kv_len: int | None,
        mask: AttentionMask | None,
    ) -> Tensor:
        """What follows the projections in `Attention`: `to_cache`, then each new query's
        softmax attention over the cached keys up to its own position → [B, T, H, D]. Here
        because the fused twin does all of it in one launch for decode steps."""
        b, t, h, d = q.shape
        q, k, v = self.to_cache(q, k, v, start, cos, sin, cache, kv_len)
        # GQA: query head j reads kv head j // g, g = h / h_kv.
        if isinstance(start, Tensor) and k.device.type in SPLIT_DECODE_DEVICES:
            # The split-key kernel reads each row's keys only up to its own position, and rounds
            # a row alike whatever `kv_len` and the other rows (kernels/decode_attention.py).
            from heartmula_rt.kernels import decode_attention  # needs triton: only on its path

            return decode_attention.decode_attention(q.view(b, h, d), k, v, start).view(b, 1, h, d)
        additive = None if mask is None else mask.get()  # (the split-key kernel needs none)
        if t == 1:
            # Decode: each kv head's g query heads become g query rows over that head, so SDPA
            # reads every cached key once, with no expanded copy, on any backend.
            y = F.scaled_dot_product_attention(
                q.view(b, k.shape[1], -1, d), k, v, attn_mask=additive
            )
            return y.view(b, 1, h, d)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=additive, enable_gqa=True
        )
        return y.transpose(1, 2)


def attention_mask(
    start: int | Tensor, t: int, kv_len: int | None, *, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """The additive mask (0 where attended, -inf where not) of `t` new positions at `start`
    over the cached ones, in the activations' dtype, or None when every cached key is attended.

    Made once per forward for all layers: SDPA would turn a boolean mask into this in every
    layer. Device-held positions `start` [B] (one per row) read `kv_len` positions, each row's
    past its own position masked: [B, 1, 1, kv_len]; an int `start` with several positions
    (prefill) is causal: [t, start + t].
    """
    if isinstance(start, Tensor):
        attended = torch.arange(kv_len, device=device)[None, :] <= start[:, None]
        attended = attended.view(-1, 1, 1, kv_len)
    elif t > 1:
        q_pos = torch.arange(start, start + t, device=device)
        attended = torch.arange(start + t, device=device)[None, :] <= q_pos[:, None]
    else:
        return None
    return torch.zeros(attended.shape, dtype=dtype, device=device).masked_fill_(
        ~attended, -math.inf
    )


class AttentionMask:
    """`attention_mask(...)` of one forward, made when a layer first asks for it and then kept
    for the others: the fused decode kernels mask each row at its position themselves and never
    ask, so their steps launch nothing for it."""

    def __init__(
        self,
        start: int | Tensor,
        t: int,
        kv_len: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._args = (start, t, kv_len)
        self._dtype, self._device = dtype, device
        self._mask: Tensor | None = None
        self._made = False

    def get(self) -> Tensor | None:
        if not self._made:
            self._mask = attention_mask(*self._args, dtype=self._dtype, device=self._device)
            self._made = True
        return self._mask


# Devices whose decode steps at device-held positions (the static engine's) run the split-key
# Triton kernel instead of SDPA over every cached position; tests add "cpu" for the interpreter.
SPLIT_DECODE_DEVICES = frozenset({"cuda"})


class Attention(nn.Module):
    def __init__(self, f: LlamaFlavor) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = f.num_heads, f.num_kv_heads, f.head_dim
        self.q_proj = nn.Linear(f.embed_dim, f.num_heads * f.head_dim, bias=False)
        self.k_proj = nn.Linear(f.embed_dim, f.num_kv_heads * f.head_dim, bias=False)
        self.v_proj = nn.Linear(f.embed_dim, f.num_kv_heads * f.head_dim, bias=False)
        self.output_proj = nn.Linear(f.num_heads * f.head_dim, f.embed_dim, bias=False)
        self.rope = Rope()

    def merge(self, qkv: nn.Module | None = None) -> None:
        """Replace q_proj, k_proj and v_proj by one `qkv_proj` whose output is theirs side by
        side (`merge_projections`): `qkv`, or an nn.Linear of their weights concatenated."""
        merge_parts(self, "qkv_proj", qkv)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, H, D], k and v [B, T, H_kv, D] of x [B, T, dim] (views of one matmul's
        output once merged)."""
        b, t, _ = x.shape
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if "qkv_proj" in self._modules:
            q, k, v = self.qkv_proj(x).split((h * d, h_kv * d, h_kv * d), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.view(b, t, h, d), k.view(b, t, h_kv, d), v.view(b, t, h_kv, d)

    def forward(
        self,
        x: Tensor,
        start: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache,
        kv_len: int | None,
        mask: AttentionMask | None,
    ) -> Tensor:
        q, k, v = self.project(x)
        y = self.rope.attend(q, k, v, start, cos, sin, cache, kv_len, mask)
        return self.output_proj(y.reshape(*x.shape[:2], -1))


class SiluMul(nn.Module):
    """`silu(gate) · up`, the SwiGLU product, as a module so its fused twin can be swapped in."""

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.silu_mul = SiluMul()

    def merge(self, w13: nn.Module | None = None) -> None:
        """Replace w1 and w3 by one `w13` whose output is theirs side by side
        (`merge_projections`): `w13`, or an nn.Linear of their weights concatenated."""
        merge_parts(self, "w13", w13)

    def forward(self, x: Tensor) -> Tensor:
        if "w13" in self._modules:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(self.silu_mul(gate, up))
        return self.w2(self.silu_mul(self.w1(x), self.w3(x)))


# Matmuls that share their input, merged into one at load (`merge_projections`): each merged
# module's output is its parts' outputs side by side, in this order. Checkpoints and LoRA
# adapters keep the parts' names (`merged_part` maps a part to its rows of the merged weight).
MERGED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "w13": ("w1", "w3")}
_PART_OF = {part: merged for merged, parts in MERGED_PARTS.items() for part in parts}


def merge_parts(owner: nn.Module, merged: str, module: nn.Module | None = None) -> None:
    """`owner`'s parts of `merged` (MERGED_PARTS) replaced by `module`, or by an nn.Linear of
    their weights concatenated (on their device, in their dtype); a no-op once merged."""
    if merged in owner._modules:
        return
    parts = [owner.get_submodule(p) for p in MERGED_PARTS[merged]]
    if module is None:
        if not all(type(p) is nn.Linear for p in parts):
            kinds = ", ".join(sorted({type(p).__name__ for p in parts}))
            raise ValueError(f"merge plain nn.Linear parts, before quantizing or LoRA ({kinds})")
        weight = torch.cat([p.weight.detach() for p in parts])
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        module.weight = nn.Parameter(weight, requires_grad=False)
    for p in MERGED_PARTS[merged]:
        delattr(owner, p)
    owner.add_module(merged, module)


def merged_of(name: str) -> str | None:
    """The merged module a part's module name belongs to once merged ("backbone.layers.0.attn.
    q_proj" → "backbone.layers.0.attn.qkv_proj"); None where `name` is no part."""
    owner_name, _, leaf = name.rpartition(".")
    merged = _PART_OF.get(leaf)
    return None if merged is None else f"{owner_name}.{merged}"


def merged_part(model: nn.Module, name: str) -> tuple[str, slice] | None:
    """For a part's module name in a merged model ("backbone.layers.0.attn.q_proj"): the merged
    module's name and the part's rows of its output; None where `name` is no merged part."""
    owner_name, _, leaf = name.rpartition(".")
    merged = _PART_OF.get(leaf)
    if merged is None:
        return None
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    if merged not in owner._modules:
        return None
    sizes = part_sizes(owner, merged)
    i = MERGED_PARTS[merged].index(leaf)
    first = sum(sizes[:i])
    return f"{owner_name}.{merged}", slice(first, first + sizes[i])


def part_sizes(owner: nn.Module, merged: str) -> list[int]:
    """The output sizes of `merged`'s parts in `owner` (an Attention or an MLP)."""
    if merged == "qkv_proj":
        kv = owner.num_kv_heads * owner.head_dim
        return [owner.num_heads * owner.head_dim, kv, kv]
    half = owner.w13.out_features // 2
    return [half, half]


def merge_projections(model: nn.Module) -> nn.Module:
    """Merge every layer's q/k/v projections into one matmul and w1/w3 into one (the weights
    concatenated: one launch and one weight read where there were three and two), in place;
    returns `model`. Called where an LM is loaded (before quantizing, so the formats quantize
    the concatenated weights, and after merged LoRAs); a matmul's output rows are computed
    alike whatever rows sit beside them, so the merged model computes what the parts did."""
    for module in model.modules():
        if isinstance(module, Attention | MLP):
            module.merge()
    return model


class TransformerBlock(nn.Module):
    def __init__(self, f: LlamaFlavor) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(f.embed_dim, f.norm_eps)
        self.attn = Attention(f)
        self.mlp_norm = RMSNorm(f.embed_dim, f.norm_eps)
        self.mlp = MLP(f.embed_dim, f.intermediate_dim)

    def forward(
        self,
        x: Tensor,
        start: int | Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache,
        kv_len: int | None,
        mask: AttentionMask | None,
        delta: Tensor | None = None,
        *,
        split: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The layer's output h + m; with `split`, (h, m) with the last addition left to the
        caller, and the input `x + delta` (`delta` None: x). `Transformer` leaves each addition
        to the next norm, which makes it in the same launch (`RMSNorm.add_norm`): the sums are
        the plain `h = x + attn`, `out = h + mlp`, in the same order."""
        if delta is None:
            normed = self.sa_norm(x)
        else:
            x, normed = self.sa_norm.add_norm(x, delta)
        h, normed = self.mlp_norm.add_norm(
            x, self.attn(normed, start, cos, sin, cache, kv_len, mask)
        )
        return (h, self.mlp(normed)) if split else h + self.mlp(normed)


class Transformer(nn.Module):
    """Llama-3.2 decoder stack + final norm, over embeddings at positions start..start+T-1."""

    def __init__(self, f: LlamaFlavor) -> None:
        super().__init__()
        self.flavor = f
        self.layers = nn.ModuleList(TransformerBlock(f) for _ in range(f.num_layers))
        self.norm = RMSNorm(f.embed_dim, f.norm_eps)
        self.rope = RotaryEmbedding(f.head_dim, f.max_seq_len, f.rope_base, f.scale_factor)

    def new_cache(
        self, rows: int, max_len: int, *, dtype: torch.dtype, device: torch.device
    ) -> list[KVCache]:
        f = self.flavor
        return [
            KVCache.zeros(rows, max_len, f.num_kv_heads, f.head_dim, dtype=dtype, device=device)
            for _ in range(f.num_layers)  # not self.layers: iterating offloaded layers streams them
        ]

    def forward(
        self, x: Tensor, start: int | Tensor, cache: list[KVCache], kv_len: int | None = None
    ) -> Tensor:
        """`start` is an int (every row at positions start..start+T-1), or for one new
        position per row an int64 device tensor [B] of each row's position; then the first
        `kv_len` cached positions are read, each row's past its own masked (a static shape that
        a CUDA graph or torch.compile can keep while the positions move)."""
        cos, sin = self.rope.tables(x.device)
        if isinstance(start, Tensor):
            cos, sin = cos[start], sin[start]
        else:
            cos, sin = cos[start : start + x.shape[1]], sin[start : start + x.shape[1]]
        mask = AttentionMask(start, x.shape[1], kv_len, x.dtype, x.device)
        delta = None
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, delta = layer(x, start, cos, sin, layer_cache, kv_len, mask, delta, split=True)
        return self.norm(x) if delta is None else self.norm.add_norm(x, delta)[1]


@dataclass
class LMCache:
    """A batch's KV caches, one row per LM row: the backbone's over whole songs, the decoder's for
    one frame."""

    backbone: list[KVCache]
    decoder: list[KVCache]
    rows: int

    def rows_view(self, first: int, count: int) -> LMCache:
        """Views of rows first..first+count-1 of every cache (one song's, in a batch)."""
        return LMCache(
            backbone=[c.rows(first, count) for c in self.backbone],
            decoder=[c.rows(first, count) for c in self.decoder],
            rows=count,
        )


class HeartMuLa(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        bb, dec = config.backbone, config.decoder
        n, vocab = config.audio_num_codebooks, config.audio_vocab_size
        self.backbone = Transformer(bb)
        self.decoder = Transformer(dec)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, bb.embed_dim)
        # Codebook k's token t lives at row t + k * audio_vocab_size.
        self.audio_embeddings = nn.Embedding(vocab * n, bb.embed_dim)
        self.unconditional_text_embedding = nn.Embedding(1, bb.embed_dim)
        self.projection = nn.Linear(bb.embed_dim, dec.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(bb.embed_dim, vocab, bias=False)
        # Input-major [n-1, decoder_dim, vocab], used as `d @ audio_head[i-1]` (not Linear layout).
        self.audio_head = nn.Parameter(torch.empty(n - 1, dec.embed_dim, vocab))
        self.muq_linear = nn.Linear(config.muq_dim, bb.embed_dim)
        self._frame_offsets: dict[torch.device, Tensor] = {}  # codebook k's row offset, per device

    @property
    def device(self) -> torch.device:
        """Where the LM computes: the audio embeddings' device (the text embeddings, used only
        for the prompt, may stay on the CPU; see planner.py)."""
        return self.audio_embeddings.weight.device

    def new_cache(self, rows: int, backbone_len: int) -> LMCache:
        """Caches for one request, on the device and in the dtype of the activations."""
        kw = {"dtype": self.audio_embeddings.weight.dtype, "device": self.device}
        return LMCache(
            backbone=self.backbone.new_cache(rows, backbone_len, **kw),
            decoder=self.decoder.new_cache(rows, self.config.audio_num_codebooks, **kw),
            rows=rows,
        )

    def embed_prompt(
        self, ids: Tensor, slot_index: int, rows: int, reference: Tensor | None = None
    ) -> Tensor:
        """Prompt rows [rows, P, D] from the text column ids [P].

        Row 0 is conditional: text embeddings with the SLOT set to `muq_linear(reference)`
        (`Prompt.reference`: a reference clip's scaled MuQ-MuLan embedding [muq_dim]), or with
        none to `muq_linear(zeros)`, which is its bias: taken as is, so a prompt without a
        reference is bit for bit what it was before references existed. Row 1, with guidance,
        is the unconditional row: every position, SLOT included, is the unconditional text
        embedding, whatever the reference.
        """
        # The text embeddings may sit on the CPU: look up there, compute on the LM's device.
        cond = self.text_embeddings(ids.to(self.text_embeddings.weight.device)).to(self.device)
        if reference is None:
            cond[slot_index] = self.muq_linear.bias
        else:
            if reference.shape != (self.config.muq_dim,):
                raise UserError(
                    f"a reference embedding of {list(reference.shape)} numbers does not fit "
                    f"this LM, whose reference slot takes {self.config.muq_dim}"
                )
            weight = self.muq_linear.weight
            cond[slot_index] = self.muq_linear(reference.to(weight.device, weight.dtype))
        embedded = [cond]
        if rows == 2:
            embedded.append(self.unconditional_text_embedding.weight[0].expand_as(cond))
        return torch.stack(embedded)

    def embed_audio(self, tokens: Tensor, codebook: int) -> Tensor:
        """Embeddings of codebook `codebook`'s tokens (any shape) → [..., D]: rows of the
        codebook's slice of the table (the same rows as `tokens + codebook · vocab`, without
        the launch that adds the offset)."""
        vocab = self.config.audio_vocab_size
        table = self.audio_embeddings.weight[codebook * vocab : (codebook + 1) * vocab]
        return F.embedding(tokens, table)

    def embed_frame(self, frame: Tensor) -> Tensor:
        """One frame row per cache row: frame [B, n] → sum of its codebook embeddings [B, 1, D]."""
        return self.audio_embeddings(frame + self._codebook_offsets(frame)).sum(dim=1, keepdim=True)

    def _codebook_offsets(self, frame: Tensor) -> Tensor:
        """Codebook k's first row of the table, k · audio_vocab_size, [n] on frame's device: made
        once per device (a CUDA graph's step launches nothing for it; the shape's first step,
        eager, makes it), and under torch.compile in the graph, which fuses it into the add."""
        n, vocab = frame.shape[1], self.config.audio_vocab_size
        if torch.compiler.is_compiling():
            return torch.arange(n, device=frame.device) * vocab
        offsets = self._frame_offsets.get(frame.device)
        if offsets is None:
            with torch.inference_mode(False):  # kept: a normal tensor, as RoPE's tables
                offsets = torch.arange(n, device=frame.device) * vocab
            self._frame_offsets[frame.device] = offsets
        return offsets

    def backbone_step(
        self, rows: Tensor, start: int | Tensor, cache: LMCache, kv_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Backbone over rows [B, T, D] at positions start..: (last hidden [B, D], c0 logits).
        Device-held positions `start` [B] take one position per row and read `kv_len` cached
        positions."""
        last = self.backbone(rows, start, cache.backbone, kv_len)[:, -1]
        return last, self.codebook0_head(last)

    def decoder_step(self, x: Tensor, start: int, cache: LMCache, codebook: int) -> Tensor:
        """Depth decoder over backbone-width inputs x [B, T, D] at positions start..: logits of
        codebook `codebook` (1..n-1), [B, audio_vocab_size]."""
        d = self.decoder(self.projection(x), start, cache.decoder)[:, -1]
        return self.audio_head_logits(d, codebook)

    def audio_head_logits(self, d: Tensor, codebook: int) -> Tensor:
        """Codebook `codebook`'s logits from decoder outputs d [B, decoder_dim]; the head is the
        stored Parameter or a quantized module that maps (d, codebook) the same way."""
        head = self.audio_head
        return d @ head[codebook - 1] if isinstance(head, Tensor) else head(d, codebook)
