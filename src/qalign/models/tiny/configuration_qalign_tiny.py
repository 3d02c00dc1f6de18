"""Configuration of qalign-tiny: EfficientNet-Lite0 -> visual abstractor -> SmolLM2 (LLaMA)."""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig


class QAlignTinyConfig(PretrainedConfig):
    """mPLUG-Owl2's shape at laptop size.

    The vision encoder is EfficientNet-Lite0; its stride-8, stride-16 and stride-32 feature maps
    are pooled to one ``grid_size`` x ``grid_size`` grid and concatenated, because image quality lives in low-level statistics
    (noise, blur, blocking) as much as in semantics. ``num_queries`` learned queries cross-attend
    to that grid (the abstractor); the result plus one learned end token is spliced into the
    language model at the image placeholder.

    ``resize`` says how a picture becomes ``image_size`` x ``image_size``: ``"squash"`` resizes
    both sides to it (every pixel is seen, the aspect ratio is not kept); ``"crop"`` resizes the
    SHORT side to it and takes the centre square, so a photo whose short side already is
    ``image_size`` (KADID-10k's 512 x 384) is not resampled at all, and noise, blocking and blur
    keep their pixel scale.
    """

    model_type = "qalign_tiny"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(
        self,
        image_size: int = 384,
        grid_size: int = 12,
        vision_feature_channels: tuple[int, ...] = (40, 112, 1280),
        abstractor_hidden_size: int = 256,
        abstractor_layers: int = 2,
        abstractor_heads: int = 4,
        abstractor_intermediate_size: int = 768,
        num_queries: int = 16,
        resize: str = "squash",
        text_config: dict | LlamaConfig | None = None,
        **kwargs,
    ):
        self.image_size = image_size
        self.grid_size = grid_size
        self.vision_feature_channels = list(vision_feature_channels)
        self.abstractor_hidden_size = abstractor_hidden_size
        self.abstractor_layers = abstractor_layers
        self.abstractor_heads = abstractor_heads
        self.abstractor_intermediate_size = abstractor_intermediate_size
        self.num_queries = num_queries
        if resize not in ("squash", "crop"):
            raise ValueError(f"resize must be 'squash' or 'crop', got {resize!r}")
        self.resize = resize
        if isinstance(text_config, dict):
            text_config = LlamaConfig(**text_config)
        self.text_config = text_config if text_config is not None else LlamaConfig()
        super().__init__(**kwargs)
