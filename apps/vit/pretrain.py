"""Pretrain a ViT from scratch and export it as a timm-layout ``.safetensors`` file with a model card.

    python -m apps.vit.pretrain config=apps/vit/configs/pretrain_digits.yaml

This is how the bundled offline model ``apps/vit/pretrained/vit_digits.safetensors`` was made: a small
ViT trained on the bundled ``digits_subset-01234`` (digits 0–4), playing the role of the paper's
ImageNet-21k checkpoint in the offline study (arXiv 2602.06883): plasticity is measured between its
pretraining distribution and downstream tasks (a corruption shift, new classes), and its components
are finetuned one type at a time.

It is the training app (``apps.vit.train``) — same config keys, run directory, resume — followed by an
export of the best-validation checkpoint and a JSON card next to it (test accuracy, config, SHA-256). The
training keys that only make sense for finetuning (``method``, ``lora.*``, ``select.*``) must keep their
defaults: any other value is refused before anything runs, and ``--help`` marks them. A finished run is
exported as it is, so one trained with another config is refused too (``overwrite=true`` retrains it).

Snapshots. The step checkpoints of ``keep_steps`` (log-spaced, e.g. 10, 30, 100, ...) are exported too, as
self-describing files ``<stem>_steps/<stem>_step<N>.safetensors`` with their cards, so that plasticity can be
measured through pretraining (``apps/vit/sweeps/digits_pretraining_dynamics.yaml``): a model whose linear maps are still
near their small initialisation has LayerNorms that change fastest, and the paper's ranking (MHA first) only
appears as pretraining goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, ClassVar

from apps.vit import train
from vitef.config import cli_main, flatten, load_config, option, to_dict
from vitef.errors import ConfigError
from vitef.models import ModelConfig
from vitef.monitor import RunDir
from vitef.utils import atomic_path, atomic_write_json, check_writable

# Keys of the training app's config that pretraining has no use for: it trains every parameter of a randomly
# initialised model, so there is no finetuning method to choose, no LoRA adapter and no unit selection. They stay
# in the config (at their defaults) so that a pretraining run is a training run to every reader of its config.yaml
# (resume, sweeps, a run's config.yaml given back as config=); validation refuses any other value, --help marks
# them. Key -> why it is refused.
UNSUPPORTED: dict[str, str] = {
    "method": "it trains every parameter from scratch",
    "lora": "LoRA adapters belong to method=lora, and pretraining trains every parameter from scratch",
    "select": "a selection criterion picks units of a pretrained model to finetune, and pretraining trains every unit",
}
UNSUPPORTED_HELP = "unused by apps.vit.pretrain (keep the default): "
# Keys that only say where and how the result is exported: a finished run can be exported again with others, and
# a sweep does not call a run stale for them (the sweep reads the app module's RESUME_FREE_KEYS).
EXPORT_KEYS = ("export", "card_analysis", "card_targets")
RESUME_FREE_KEYS = (*train.RESUME_FREE_KEYS, *EXPORT_KEYS)


def _train_default(name: str) -> Any:
    """The default of ``TrainConfig.<name>`` (a fresh copy)."""
    f = next(f for f in dataclasses.fields(train.TrainConfig) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    return value if isinstance(value, str) and value else repr(value)


def _refuse(changed: list[tuple[str, Any, Any]], why: str) -> None:
    """Raise one :class:`ConfigError` for the unsupported keys ``changed`` ((dotted key, value, default)), if any."""
    if not changed:
        return
    key, value, default = changed[0]
    others = f"; also remove {', '.join(k for k, *_ in changed[1:])}" if len(changed) > 1 else ""
    raise ConfigError(
        f"{key}={_shown(value)} is not supported by apps.vit.pretrain ({why}): remove {key}=... (its default is "
        f"{_shown(default)}){others}, or finetune with apps.vit.train"
    )


def _unsupported_group(key: str) -> type:
    """The config group ``TrainConfig.<key>`` as pretraining has it: same keys and defaults (a run's config.yaml
    reads the same), each shown by ``--help`` as unused, and a ``validate()`` that refuses any other value.

    The refusal wins over the group's own checks: ``lora.rank=0`` is refused as unsupported, not as too small.
    """
    default = _train_default(key)
    base = type(default)
    hints = typing.get_type_hints(base)
    fields = []
    for f in dataclasses.fields(base):
        value = getattr(default, f.name)
        initial = (
            {"default_factory": lambda v=value: copy.deepcopy(v)}
            if isinstance(value, (list, dict))
            else {"default": value}
        )
        metadata = {**f.metadata, "help": UNSUPPORTED_HELP + f.metadata.get("help", "")}
        fields.append((f.name, hints[f.name], dataclasses.field(metadata=metadata, **initial)))

    def refuse_changed(self) -> None:
        now, was = flatten(dataclasses.asdict(self)), flatten(dataclasses.asdict(type(self)()))
        _refuse([(f"{key}.{k}", now[k], was[k]) for k in now if now[k] != was[k]], UNSUPPORTED[key])

    def validate(self) -> None:
        try:
            base.validate(self)  # canonical values (e.g. a criterion alias) compare as the default does
        except ConfigError:
            refuse_changed(self)
            raise
        refuse_changed(self)

    name = f"Pretrain{base.__name__}"
    out = dataclasses.make_dataclass(name, fields, bases=(base,), namespace={"validate": validate})
    out.__module__ = __name__
    out.__doc__ = f"{(base.__doc__ or '').strip()} Unused by apps.vit.pretrain: every key keeps its default."
    return out


PretrainLoraConfig = _unsupported_group("lora")
PretrainSelectConfig = _unsupported_group("select")


@dataclasses.dataclass
class PretrainConfig(train.TrainConfig):
    """Pretrain a ViT (random init, every component trains) and export its best checkpoint."""

    resume_free_keys: ClassVar[tuple[str, ...]] = RESUME_FREE_KEYS

    # Random weights by default: pretraining refuses model.pretrained=true, so --help should not offer it.
    model: ModelConfig = option(
        dataclasses.replace(_train_default("model"), pretrained=False), "the ViT architecture, randomly initialised"
    )
    method: str = option("full", UNSUPPORTED_HELP + "pretraining trains every parameter (finetuning: apps.vit.train)")
    lora: PretrainLoraConfig = option(PretrainLoraConfig(), UNSUPPORTED_HELP + "LoRA adapters of method=lora")
    select: PretrainSelectConfig = option(PretrainSelectConfig(), UNSUPPORTED_HELP + "units to finetune")
    export: str = option("", "where to write the weights (.safetensors); a .json card is written beside it")
    card_analysis: str = option("", "analysis config (apps.vit.analysis) whose plasticity results go in the card")
    card_targets: list[str] = option([], "downstream datasets analysed for the card, in both modes")

    def validate(self) -> None:
        # Before the training app's checks, whose messages (e.g. on method=lora with select) are about finetuning.
        # (lora and select, validated before this, refuse their own keys.)
        default_method = _train_default("method")
        if self.method != default_method:
            _refuse([("method", self.method, default_method)], UNSUPPORTED["method"])
        super().validate()
        if not self.export.endswith(".safetensors"):
            raise ConfigError(f"export={self.export!r} must be a path ending in .safetensors")
        if self.model.pretrained or self.model.checkpoint:
            raise ConfigError("pretraining starts from random weights: set model.pretrained=false, no checkpoint")
        if self.card_targets and not Path(self.card_analysis).is_file():
            raise ConfigError(
                f"card_analysis={self.card_analysis!r} is not a file: give an analysis config for card_targets, "
                "e.g. apps/vit/configs/analysis/digits_pretrained.yaml"
            )


CONFIG = PretrainConfig


def card_path(export: str | Path) -> Path:
    """The JSON card written beside exported weights."""
    return Path(export).with_suffix(".json")


def snapshot_path(export: str | Path, step: int) -> Path:
    """Where the weights of pretraining step ``step`` go: ``<stem>_steps/<stem>_step<N>.safetensors`` (N 6 digits).

    The stem is repeated so that output folders named after a model file (analysis) say which model it is.
    """
    export = Path(export)
    return export.parent / f"{export.stem}_steps" / f"{export.stem}_step{step:06d}.safetensors"


def main(cfg: PretrainConfig) -> None:
    check_writable(Path(cfg.export).parent, "export")  # before training, not after it
    run = RunDir.from_log_dir(cfg.root, cfg.run_name)
    train.main(cfg)
    evaluation = json.loads(run.eval_path.read_text())
    common = {
        "model": {**to_dict(cfg.model), "pretrained": False},
        "dataset": cfg.dataset_name,
        "num_classes": _num_classes(cfg),
        "steps": cfg.steps,
        "seed": cfg.seed,
        "log_dir": cfg.run_name,
        "made_by": "python -m apps.vit.pretrain " + " ".join(sys.argv[1:]),
    }
    export(
        run.best_model_path,
        cfg.export,
        {
            **common,
            "test_acc": evaluation["acc"],
            "best_val_acc": evaluation["best_val_acc"],
            "best_step": evaluation["best_step"],
            "snapshot_steps": sorted(set(cfg.keep_steps)),
            "card_analysis": cfg.card_analysis,
        },
    )
    if cfg.card_targets:
        # Measured on the exported file itself (which needs its card to load), then added to that card.
        card = json.loads(card_path(cfg.export).read_text())
        atomic_write_json(card_path(cfg.export), {**card, "plasticity": card_plasticity(cfg)})
    snapshots = {snapshot_path(cfg.export, step): step for step in sorted(set(cfg.keep_steps))}
    folder = snapshot_path(cfg.export, 0).parent
    # Snapshots of an earlier export with other keep_steps would be mistaken for this run's.
    for stale in folder.glob(f"{Path(cfg.export).stem}_step*.*") if folder.is_dir() else ():
        if stale.with_suffix(".safetensors") not in snapshots:
            stale.unlink()
    for step in snapshots.values():
        export(run.step_dir(step) / "model.safetensors", snapshot_path(cfg.export, step), {**common, "step": step})
    print(f"exported {cfg.export} (test acc {100 * evaluation['acc']:.2f}%, card {card_path(cfg.export)})")
    if snapshots:
        print(f"exported {len(snapshots)} snapshots to {folder}")


def export(weights: Path, dest: str | Path, card: dict) -> None:
    """Copy ``weights`` to ``dest`` and write its card (file name and SHA-256 first), both atomically."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(weights, tmp)
    digest = hashlib.sha256(Path(dest).read_bytes()).hexdigest()
    atomic_write_json(card_path(dest), {"weights": Path(dest).name, "sha256": digest, **card})


def card_analysis_config(card_analysis: str | Path, weights: str | Path, target: str, mode: str, root: str | Path):
    """The ``apps.vit.analysis`` config that measures the card's plasticity of ``weights`` on ``target`` in
    ``mode`` (the card names ``card_analysis``: re-running this config on the shipped weights reproduces it)."""
    from apps.vit import analysis

    argv = [
        f"config={card_analysis}",
        f"model.name={weights}",
        f"dataset_name={target}",
        f"mode={mode}",
        f"root={root}",
    ]
    return load_config(analysis.AnalysisConfig, argv)


def card_plasticity(cfg: PretrainConfig) -> dict:
    """Kendall's tau (measured vs theoretical ranking) and per-component plasticity of the exported weights.

    One entry per target dataset and mode, measured by ``apps.vit.analysis`` with ``card_analysis`` (seeded, so
    re-running that analysis on the shipped weights gives the same numbers; a test checks it).
    """
    from apps.vit import analysis

    out: dict = {}
    for target in cfg.card_targets:
        for mode in analysis.MODES:
            acfg = card_analysis_config(cfg.card_analysis, cfg.export, target, mode, Path(cfg.root) / "card_analysis")
            result = json.loads((analysis.main(acfg) / "plasticity.json").read_text())
            out.setdefault(target, {})[mode] = {
                "kendall_tau": result["kendall_tau"],
                "kendall_pvalue": result["kendall_pvalue"],
                "n_pairs": result["n_pairs"],
                "mean_over_layers": {s["component"]: s["mean_over_layers"] for s in result["summary"]},
            }
    return out


def _num_classes(cfg: PretrainConfig) -> int:
    from vitef.data import num_classes

    return num_classes(cfg.dataset_name, cfg.data.root)


if __name__ == "__main__":
    cli_main(PretrainConfig, main, argv=sys.argv[1:], prog="apps.vit.pretrain")
