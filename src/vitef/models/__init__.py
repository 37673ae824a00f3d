"""ViT models with named components (arXiv 2602.06883, §3–4)."""

from vitef.models.build import (
    SHORT_NAMES,
    ModelConfig,
    build_model,
    build_model_from_config,
    model_label,
    save_timm_safetensors,
)
from vitef.models.components import (
    BLOCK_COMPONENTS,
    COMPONENTS,
    THEORETICAL_RANK,
    assign_components,
    block_module,
    canonical,
    canonical_list,
    component_of,
    component_table,
    count_parameters,
    embed,
    mlp_activation,
    num_blocks,
    set_trainable,
)
from vitef.models.convert import HFViTArch, hf_vit_to_timm

__all__ = [
    "BLOCK_COMPONENTS",
    "COMPONENTS",
    "SHORT_NAMES",
    "THEORETICAL_RANK",
    "HFViTArch",
    "ModelConfig",
    "assign_components",
    "block_module",
    "build_model",
    "build_model_from_config",
    "canonical",
    "canonical_list",
    "component_of",
    "component_table",
    "count_parameters",
    "embed",
    "hf_vit_to_timm",
    "mlp_activation",
    "model_label",
    "num_blocks",
    "save_timm_safetensors",
    "set_trainable",
]
