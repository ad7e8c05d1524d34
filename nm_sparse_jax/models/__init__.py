"""Small Flax models with the naming the policy presets know (used by the demo and tests)."""

from nm_sparse_jax.models.vit import VisionTransformer, ViTConfig

__all__ = ["ViTConfig", "VisionTransformer"]
