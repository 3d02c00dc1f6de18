"""mPLUG-Owl2 (the model behind Q-Align, OneAlign and DeQA-Score), written from the specification.

The way of an image::

    pixels [N,3,448,448]
      -> vision_model      CLIP ViT-L/14 at 448 px: 1025 tokens (CLS + 32x32 patches), per-head
                           fused qkv, post_layernorm on ALL tokens
      -> visual_abstractor 64 learned queries cross-attend to [queries; image tokens] for 6 layers,
                           then visual_fc to the LLM width and one learned end token: 65 tokens
      -> spliced into the prompt at the -200 placeholder (a video: F x 65 tokens, frame-major)
      -> LLaMA-2 decoder   whose k_proj, v_proj and two RMSNorms have a text copy (multiway.0)
                           and a visual copy (multiway.1), chosen per token by its modality
      -> model.norm, lm_head

Parameter and buffer names are exactly those of the released checkpoints, so their state dicts
load with strict key matching. Batches are right-padded; every row is read at ITS last real
position (the upstream code read ``[:, -1]``, which lands on padding for the shorter of two
videos batched together).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from .configuration_mplug_owl2 import AbstractorSettings, MPLUGOwl2Config, VisionSettings

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init

IMAGE_TOKEN_INDEX = -200  # the placeholder id where image features are spliced in
IGNORE_INDEX = -100
TEXT, VISUAL = 0, 1  # multiway branch index: 0 = text (and padding), 1 = visual tokens


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, implementation: str) -> torch.Tensor:
    """Causal scaled dot-product attention over [B, H, L, d]. Eager computes the softmax in
    float32 and casts back, as the official LLaMA code did.

    ``k``/``v`` may be longer than ``q`` by a cached prefix of P positions: query i (absolute
    position P + i) then sees keys 0..P + i."""
    offset = k.shape[-2] - q.shape[-2]
    if implementation == "sdpa":
        if offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(offset)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(offset + 1)
    scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """1-D sin-cos table [len(positions), dim]: sines first, then cosines; float32 arithmetic."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.astype(np.float32).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def abstractor_position_tables(hidden_size: int, num_queries: int, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The abstractor's query table Pq [Q, D] and key table Pk [1 + G*G, D] (row 0: CLS, zeros).

    Pk row 1 + r*G + c = [table(D/2) at column c ; table(D/2) at row r]: the column comes first.
    """
    pq = _sincos_1d(hidden_size, np.arange(num_queries, dtype=np.float32))
    coords = np.arange(grid_size, dtype=np.float32)
    cols = np.tile(coords, grid_size)  # c varies fastest
    rows = np.repeat(coords, grid_size)
    pk_grid = np.concatenate([_sincos_1d(hidden_size // 2, cols), _sincos_1d(hidden_size // 2, rows)], axis=1)
    pk = np.concatenate([np.zeros((1, hidden_size), dtype=np.float32), pk_grid], axis=0)
    return torch.from_numpy(pq.astype(np.float32)), torch.from_numpy(pk.astype(np.float32))


def _as_visual_entries(pixel_values) -> list[torch.Tensor]:
    """Tensor [N,3,H,W] -> N single-frame entries; a list of [F,3,H,W] (or [3,H,W]) -> as given."""
    if pixel_values is None:
        return []
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.dim() == 3:
            return [pixel_values[None]]
        return [p[None] for p in pixel_values]
    return [p if p.dim() == 4 else p[None] for p in pixel_values]


class MultiwayNetwork(nn.Module):
    """Two copies of a module; each token goes through the copy of its modality (0 text, 1 visual)."""

    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, hidden_states: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        # modality: bool [B, L], True for visual tokens.
        if not modality.any():
            return self.multiway[TEXT](hidden_states)
        if modality.all():
            return self.multiway[VISUAL](hidden_states)
        visual_out = self.multiway[VISUAL](hidden_states[modality])
        text_out = self.multiway[TEXT](hidden_states[~modality])
        out = hidden_states.new_empty(*hidden_states.shape[:-1], text_out.shape[-1], dtype=text_out.dtype)
        out[modality] = visual_out
        out[~modality] = text_out
        return out


# ------------------------------------------------------------------------------------------------
# Vision encoder: CLIP ViT-L/14 at 448 px, mPLUG layout
# ------------------------------------------------------------------------------------------------


class MPLUGOwl2VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.hidden_size))
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, D, G, G]
        x = x.flatten(2).transpose(1, 2)  # row-major patches: index = row * G + col
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + self.position_embedding[:, : x.shape[1]].to(x.dtype)
        return self.pre_layernorm(x)


class MPLUGOwl2VisionAttention(nn.Module):
    """Self-attention with a fused qkv whose 3*D output rows are grouped per head as [q | k | v]."""

    def __init__(self, cfg: VisionSettings, implementation: str):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.implementation = implementation
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.query_key_value(x).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, N, hd]
        if self.implementation == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k, v)
        else:  # upstream: softmax in the activation dtype, no mask
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5, dim=-1)
            ctx = torch.matmul(probs, v)
        return self.dense(ctx.transpose(1, 2).reshape(b, n, d))


class MPLUGOwl2VisionMLP(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"unsupported vision activation {cfg.hidden_act!r} (expected quick_gelu)")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class MPLUGOwl2VisionLayer(nn.Module):
    def __init__(self, cfg: VisionSettings, implementation: str):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = MPLUGOwl2VisionAttention(cfg, implementation)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MPLUGOwl2VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MPLUGOwl2VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionSettings, implementation: str):
        super().__init__()
        self.layers = nn.ModuleList(MPLUGOwl2VisionLayer(cfg, implementation) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MPLUGOwl2VisionModel(nn.Module):
    def __init__(self, cfg: VisionSettings, implementation: str):
        super().__init__()
        self.embeddings = MPLUGOwl2VisionEmbeddings(cfg)
        self.encoder = MPLUGOwl2VisionEncoder(cfg, implementation)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + patches, D]: the last layer, post_layernorm on every token."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


# ------------------------------------------------------------------------------------------------
# Visual abstractor: 64 learned queries -> 65 LLM tokens per image
# ------------------------------------------------------------------------------------------------


class MPLUGOwl2AbstractorAttention(nn.Module):
    def __init__(self, cfg: AbstractorSettings, implementation: str):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("abstractor hidden_size must be a multiple of num_attention_heads")
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.implementation = implementation
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        # Persistent buffers (saved in the released checkpoints, which may hold bf16-rounded
        # values); computed from the formula here and overwritten by the file when present.
        pq, pk = abstractor_position_tables(cfg.hidden_size, cfg.num_learnable_queries, cfg.grid_size)
        device = torch.empty(0).device  # "meta" inside a meta-device context
        self.register_buffer("q_pos_embed", pq.to(device))
        self.register_buffer("k_pos_embed", pk.to(device))
        self.settings = cfg

    def fill_missing_position_tables(self, device=None, dtype=None) -> None:
        """Compute the position tables that are still on the meta device (absent from a file)."""
        if not (self.q_pos_embed.is_meta or self.k_pos_embed.is_meta):
            return
        s = self.settings
        pq, pk = abstractor_position_tables(s.hidden_size, s.num_learnable_queries, s.grid_size)
        if self.q_pos_embed.is_meta:
            self.q_pos_embed = pq.to(device=device, dtype=dtype)
        if self.k_pos_embed.is_meta:
            self.k_pos_embed = pk.to(device=device, dtype=dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        """queries: normalised queries [B, Q, D]; keys_values: [normalised queries; image] [B, Q+N, D]."""
        pq = self.q_pos_embed.to(queries.dtype)
        pk = torch.cat([pq, self.k_pos_embed[: keys_values.shape[1] - pq.shape[0]].to(queries.dtype)], dim=0)
        q = self._heads(self.query(queries + pq))
        k = self._heads(self.key(keys_values + pk))
        v = self._heads(self.value(keys_values))  # no position term on the values
        if self.implementation == "sdpa":
            ctx = F.scaled_dot_product_attention(q, k, v)
        else:  # upstream: softmax in the activation dtype; its masks are all zeros
            ctx = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1), v)
        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)


class MPLUGOwl2AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm (eps = config.layer_norm_eps) on the hidden activation."""

    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_ln = nn.LayerNorm(cfg.intermediate_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class MPLUGOwl2AbstractorOutput(nn.Module):
    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)  # eps 1e-5: the LayerNorm default, not the config's
        self.mlp = MPLUGOwl2AbstractorMLP(cfg)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = residual + self.out_proj(context)
        return x + self.mlp(self.norm2(x))


class MPLUGOwl2AbstractorCrossAttention(nn.Module):
    def __init__(self, cfg: AbstractorSettings, implementation: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size)  # eps 1e-5 (LayerNorm default)
        self.normk = nn.LayerNorm(cfg.encoder_hidden_size)  # eps 1e-5
        self.attention = MPLUGOwl2AbstractorAttention(cfg, implementation)
        self.output = MPLUGOwl2AbstractorOutput(cfg)

    def forward(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        qn = self.norm1(queries)
        kv = torch.cat([qn, self.normk(image_features)], dim=1)
        # The residual starts from the NORMALISED queries.
        return self.output(self.attention(qn, kv), residual=qn)


class MPLUGOwl2AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorSettings, implementation: str):
        super().__init__()
        self.crossattention = MPLUGOwl2AbstractorCrossAttention(cfg, implementation)

    def forward(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, image_features)


class MPLUGOwl2AbstractorEncoder(nn.Module):
    def __init__(self, cfg: AbstractorSettings, implementation: str):
        super().__init__()
        self.layers = nn.ModuleList(MPLUGOwl2AbstractorLayer(cfg, implementation) for _ in range(cfg.num_hidden_layers))

    def forward(self, queries: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, image_features)
        return queries


class MPLUGOwl2VisualAbstractor(nn.Module):
    def __init__(self, cfg: AbstractorSettings, language_hidden_size: int, implementation: str):
        super().__init__()
        self.query_embeds = nn.Parameter(torch.empty(1, cfg.num_learnable_queries, cfg.hidden_size))
        self.encoder = MPLUGOwl2AbstractorEncoder(cfg, implementation)
        self.visual_fc = nn.Linear(cfg.hidden_size, language_hidden_size)
        self.vit_eos = nn.Parameter(torch.empty(1, 1, language_hidden_size))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """[N, 1 + patches, Dv] -> [N, queries + 1, D]: query outputs, then the end token."""
        n = image_features.shape[0]
        queries = self.query_embeds.expand(n, -1, -1).to(image_features.dtype)
        out = self.visual_fc(self.encoder(queries, image_features))
        return torch.cat([out, self.vit_eos.expand(n, -1, -1).to(out.dtype)], dim=1)


# ------------------------------------------------------------------------------------------------
# LLaMA-2 with modality-adaptive k/v projections and norms
# ------------------------------------------------------------------------------------------------


class MPLUGOwl2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotary_cos_sin(length: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [L, head_dim] for positions 0..L-1 (fp32 math, cast to the activation dtype)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class MPLUGOwl2Attention(nn.Module):
    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        d, kv = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = MultiwayNetwork(lambda: nn.Linear(d, kv, bias=bias))
        self.v_proj = MultiwayNetwork(lambda: nn.Linear(d, kv, bias=bias))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def forward(self, x, modality, cos, sin, past_kv=None, kv_out=None):
        """``past_kv``: cached (keys, values) [1 or B, kv heads, P, d] of a prefix that comes before
        ``x`` (``cos``/``sin`` then cover positions P..P+L-1); ``kv_out``: a list that receives this
        call's (keys, values), for building such a cache."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, modality).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, modality).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv_out is not None:
            kv_out.append((k, v))
        if past_kv is not None:
            pk, pv = past_kv
            k = torch.cat([pk.expand(b, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([pv.expand(b, -1, -1, -1).to(v.dtype), v], dim=2)
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        ctx = _causal_attention(q, k, v, self.config._attn_implementation or "sdpa")
        return self.o_proj(ctx.transpose(1, 2).reshape(b, n, -1))


class MPLUGOwl2MLP(nn.Module):
    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported LLM activation {config.hidden_act!r} (expected silu)")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MPLUGOwl2DecoderLayer(nn.Module):
    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        norm = lambda: MPLUGOwl2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        self.self_attn = MPLUGOwl2Attention(config)
        self.mlp = MPLUGOwl2MLP(config)
        self.input_layernorm = MultiwayNetwork(norm)
        self.post_attention_layernorm = MultiwayNetwork(norm)

    def forward(self, x, modality, cos, sin, past_kv=None, kv_out=None):
        x = x + self.self_attn(self.input_layernorm(x, modality), modality, cos, sin, past_kv, kv_out)
        return x + self.mlp(self.post_attention_layernorm(x, modality))


# ------------------------------------------------------------------------------------------------
# Pretrained-model wrappers (transformers conventions)
# ------------------------------------------------------------------------------------------------


class MPLUGOwl2PreTrainedModel(PreTrainedModel):
    config_class = MPLUGOwl2Config
    config: MPLUGOwl2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MPLUGOwl2DecoderLayer", "MPLUGOwl2VisionLayer", "MPLUGOwl2AbstractorLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    # The released files carry the RoPE inv_freq of every layer: recomputed here, so ignored.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # The abstractor's position tables fall back to the formula when a file lacks them.
    _keys_to_ignore_on_load_missing = [r"q_pos_embed", r"k_pos_embed"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, MPLUGOwl2RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MPLUGOwl2VisionEmbeddings):
            init.normal_(module.cls_token, mean=0.0, std=std)
            init.normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, MPLUGOwl2VisualAbstractor):
            init.normal_(module.query_embeds, mean=0.0, std=std)
            init.normal_(module.vit_eos, mean=0.0, std=std)
        elif isinstance(module, MPLUGOwl2AbstractorAttention):
            cfg = module.settings
            pq, pk = abstractor_position_tables(cfg.hidden_size, cfg.num_learnable_queries, cfg.grid_size)
            if hasattr(init, "copy_"):
                init.copy_(module.q_pos_embed, pq)
                init.copy_(module.k_pos_embed, pk)
            else:  # pragma: no cover - transformers 4.x
                module.q_pos_embed.copy_(pq)
                module.k_pos_embed.copy_(pk)


class MPLUGOwl2Model(MPLUGOwl2PreTrainedModel):
    """The LLaMA trunk plus ``vision_model`` and ``visual_abstractor`` (the checkpoints' ``model.``)."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__(config)
        impl = config._attn_implementation or "sdpa"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(MPLUGOwl2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = MPLUGOwl2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision_model = MPLUGOwl2VisionModel(config.vision_settings, impl)
        self.visual_abstractor = MPLUGOwl2VisualAbstractor(config.abstractor_settings, config.hidden_size, impl)
        self.vision_batch_size = 8  # frames per pass through the vision tower (memory, not results)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def set_attention_implementation(self, implementation: str) -> None:
        """Switch every attention (vision, abstractor, LLM) between "sdpa" and "eager"."""
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation must be 'sdpa' or 'eager', not {implementation!r}")
        self.config._attn_implementation = implementation
        for m in self.modules():
            if isinstance(m, (MPLUGOwl2VisionAttention, MPLUGOwl2AbstractorAttention)):
                m.implementation = implementation

    # -- images -----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 65, D] LLM tokens; frames go through the vision tower in chunks
        of ``chunk_size`` (default ``self.vision_batch_size``) to bound activation memory."""
        chunk_size = chunk_size or self.vision_batch_size
        outs = []
        for start in range(0, pixel_values.shape[0], chunk_size):
            feats = self.vision_model(pixel_values[start : start + chunk_size])
            outs.append(self.visual_abstractor(feats))
        return torch.cat(outs, dim=0)

    # -- splicing ---------------------------------------------------------------------------------
    def splice(
        self,
        input_ids: torch.Tensor,
        visual_tokens: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Replace each -200 by the next entry of ``visual_tokens`` ([T_i, D] each), row by row.

        Text padding (attention_mask 0) is dropped and every row is re-padded on the RIGHT with
        zero vectors. Returns (inputs_embeds [B, L, D], modality bool [B, L] (True = visual),
        valid bool [B, L], lengths [B], labels or None).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        embed = self.embed_tokens
        rows, mods, labs = [], [], []
        next_visual = 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b]
            ids = input_ids[b][keep]
            row_labels = labels[b][keep] if labels is not None else None
            cut = (ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[0].tolist()
            pieces, mod, lab, start = [], [], [], 0
            for pos in cut + [len(ids)]:
                text = ids[start:pos]
                if len(text):
                    pieces.append(embed(text))
                    mod.append(torch.zeros(len(text), dtype=torch.bool, device=ids.device))
                    if row_labels is not None:
                        lab.append(row_labels[start:pos])
                if pos < len(ids):
                    if next_visual >= len(visual_tokens):
                        raise ValueError("more image placeholders (-200) in input_ids than images given")
                    vis = visual_tokens[next_visual].to(embed.weight.dtype)
                    next_visual += 1
                    pieces.append(vis)
                    mod.append(torch.ones(vis.shape[0], dtype=torch.bool, device=ids.device))
                    if row_labels is not None:
                        lab.append(torch.full((vis.shape[0],), IGNORE_INDEX, dtype=row_labels.dtype, device=ids.device))
                start = pos + 1
            rows.append(torch.cat(pieces, dim=0))
            mods.append(torch.cat(mod))
            if row_labels is not None:
                labs.append(torch.cat(lab))
        if next_visual != len(visual_tokens):
            raise ValueError(f"{len(visual_tokens)} images given for {next_visual} image placeholders (-200)")
        lengths = torch.tensor([r.shape[0] for r in rows], device=input_ids.device)
        longest = int(lengths.max())
        bsz, dim = len(rows), rows[0].shape[-1]
        embeds = rows[0].new_zeros(bsz, longest, dim)
        modality = torch.zeros(bsz, longest, dtype=torch.bool, device=input_ids.device)
        valid = torch.arange(longest, device=input_ids.device)[None, :] < lengths[:, None]
        out_labels = None
        if labels is not None:
            out_labels = torch.full((bsz, longest), IGNORE_INDEX, dtype=labels.dtype, device=input_ids.device)
        for b, (r, m) in enumerate(zip(rows, mods)):
            embeds[b, : r.shape[0]] = r
            modality[b, : r.shape[0]] = m
            if labels is not None:
                out_labels[b, : r.shape[0]] = labs[b]
        return embeds, modality, valid, lengths, out_labels

    # -- decoder ----------------------------------------------------------------------------------
    def decode(self, inputs_embeds: torch.Tensor, modality: torch.Tensor, past=None, collect: list | None = None) -> torch.Tensor:
        """Run the decoder layers over right-padded rows; returns hidden states BEFORE model.norm.

        Rows are right-padded, so the causal mask alone keeps every real position away from the
        padding (which only ever comes after it); padded positions compute values never read.
        Positions are 0..L-1 over the spliced sequence (visual tokens count like text tokens).

        ``past``: per layer (keys, values) of a prefix shared by every row (see ``prefix_kv``);
        the rows then continue it at positions P..P+L-1. ``collect``: a list that receives each
        layer's (keys, values).
        """
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        x = inputs_embeds
        start = past[0][0].shape[-2] if past else 0
        cos, sin = rotary_cos_sin(start + x.shape[1], head_dim, self.config.rope_base, x.device, x.dtype)
        cos, sin = cos[start:], sin[start:]
        for i, layer in enumerate(self.layers):
            x = layer(x, modality, cos, sin, past[i] if past else None, collect)
        return x

    def prefix_kv(self, prefix_ids: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer (keys, values) [1, kv heads, P, d] of a text-only prefix (ids [P], no -200),
        to pass as ``past`` to rows that all start with it."""
        ids = torch.as_tensor(prefix_ids, device=self.embed_tokens.weight.device).reshape(1, -1)
        if (ids == IMAGE_TOKEN_INDEX).any():
            raise ValueError("a cached prefix must be text only (no image placeholder)")
        collected: list = []
        self.decode(self.embed_tokens(ids), torch.zeros_like(ids, dtype=torch.bool), collect=collected)
        return tuple(collected)

    def prepare_inputs(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        """Encode the images and splice them in: see ``splice`` for what comes back."""
        entries = _as_visual_entries(pixel_values)
        visual = []
        if entries:
            frames = torch.cat(entries, dim=0).to(self.embed_tokens.weight.device)
            tokens = self.encode_images(frames)  # [sum F, 65, D]
            counts = [e.shape[0] for e in entries]
            visual = [t.reshape(-1, t.shape[-1]) for t in torch.split(tokens, counts, dim=0)]
        return self.splice(input_ids, visual, attention_mask, labels)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> BaseModelOutput:
        """Final (normed) hidden states over the spliced, right-padded sequence."""
        embeds, modality, valid, _, _ = self.prepare_inputs(input_ids, pixel_values, attention_mask)
        return BaseModelOutput(last_hidden_state=self.norm(self.decode(embeds, modality)))


class MPLUGOwl2LlamaForCausalLM(MPLUGOwl2PreTrainedModel):
    """mPLUG-Owl2: ``model`` (LLaMA trunk + vision + abstractor) and an untied ``lm_head``.

    ``pixel_values``: a tensor [N, 3, H, W] (one image per -200 placeholder, in order) or a list
    of [F, 3, H, W] tensors (each placeholder takes one entry; F frames of a video are spliced
    frame after frame, 65 tokens each).
    """

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__(config)
        self.model = MPLUGOwl2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def set_attention_implementation(self, implementation: str) -> None:
        self.config._attn_implementation = implementation
        self.model.set_attention_implementation(implementation)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values=None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Full-vocabulary logits over the spliced (right-padded) sequence; loss when ``labels``.

        ``labels`` are per input id (the -200 position's label is ignored and the visual tokens
        get -100). No KV cache: this class scores, it does not generate.
        """
        embeds, modality, valid, _, spliced_labels = self.model.prepare_inputs(input_ids, pixel_values, attention_mask, labels)
        hidden = self.model.norm(self.model.decode(embeds, modality))
        logits = self.lm_head(hidden)
        loss = None
        if spliced_labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = spliced_labels[:, 1:].masked_fill(~valid[:, 1:], IGNORE_INDEX).reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def last_hidden(self, input_ids, pixel_values=None, attention_mask=None, past=None) -> torch.Tensor:
        """model.norm(hidden) at each row's last real position: [B, D] in the model dtype.

        ``past``: the cached keys/values of a text prefix shared by all rows (``model.prefix_kv``);
        ``input_ids`` are then the rest of each row, after that prefix."""
        embeds, modality, valid, lengths, _ = self.model.prepare_inputs(input_ids, pixel_values, attention_mask)
        hidden = self.model.decode(embeds, modality, past=past)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.model.norm(last)

    def level_logits(self, input_ids, token_ids: Sequence[int], pixel_values=None, attention_mask=None, past=None) -> torch.Tensor:
        """Logits of ``token_ids`` at each row's last real position: float32 [B, len(token_ids)].

        Only the requested lm_head rows are used (in float32), never the full vocabulary.
        ``past``: see ``last_hidden``.
        """
        h = self.last_hidden(input_ids, pixel_values, attention_mask, past=past)
        head = self.lm_head
        ids = torch.as_tensor(list(token_ids), device=h.device)
        if type(head) is nn.Linear:
            return h.float() @ head.weight[ids].float().T
        return head(h)[:, ids].float()  # quantised or wrapped heads


__all__ = [
    "IMAGE_TOKEN_INDEX",
    "MPLUGOwl2Config",
    "MPLUGOwl2Model",
    "MPLUGOwl2LlamaForCausalLM",
    "MPLUGOwl2PreTrainedModel",
    "abstractor_position_tables",
]
