"""Print the component table of a ViT: parameters per component, and what a `trainable` choice trains.

    python -m apps.vit.components model.name=vit_base_patch16_224 model.pretrained=false trainable=[mha]

Components are the paper's LN1, MHA, LN2, FC1, FC2 per block, plus the embedding and the head
(arXiv 2602.06883, §3).
"""

from __future__ import annotations

import dataclasses

from vitef.config import cli_main, option
from vitef.errors import ConfigError, VitefError
from vitef.models import ModelConfig, build_model_from_config, canonical_list, component_table, set_trainable


@dataclasses.dataclass
class ComponentsConfig:
    """Build a model and print how its parameters split into components."""

    model: ModelConfig = option(ModelConfig(name="vit_tiny_patch16_224", pretrained=False), "the model")
    num_classes: int | None = option(None, "replace the head with a fresh one of this size")
    trainable: list[str] = option(["all"], "components to train: all, or a list of emb/ln1/mha/ln2/fc1/fc2")

    def validate(self) -> None:
        try:
            self.trainable = canonical_list(self.trainable)  # printed as the registry names
        except VitefError as e:
            raise ConfigError(f"trainable: {e}") from e
        if not self.trainable:
            raise ConfigError("trainable=[] trains nothing: use trainable=[all] or e.g. trainable=[mha]")


def main(cfg: ComponentsConfig) -> None:
    model = build_model_from_config(cfg.model, num_classes=cfg.num_classes)
    set_trainable(model, cfg.trainable)
    rows = component_table(model)
    total = sum(r["params"] for r in rows)
    print(f"{cfg.model.name}: {len(model.blocks)} blocks, {total:,} parameters, trainable={cfg.trainable}")
    print(f"{'component':<10}{'params':>14}{'trainable':>14}{'tensors':>9}  example")
    for r in rows:
        print(f"{r['component']:<10}{r['params']:>14,}{r['trainable']:>14,}{r['tensors']:>9}  {r['example']}")


CONFIG = ComponentsConfig

if __name__ == "__main__":
    cli_main(ComponentsConfig, main, prog="apps.vit.components")
