"""The options of an SAE training run (:class:`TrainConfig`) and what a run did (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError

METRIC_FIELDS = (
    "step", "tokens", "epoch", "tokens_per_s", "loss", "mse", "l1", "auxk", "fvu", "l0",
    "dead_fraction", "active_fraction", "resampled", "elapsed_s", "step_path", "threshold",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything that defines an SAE training run (saved beside the weights)."""

    kind: str = "relu"
    k: int | None = None
    l1_coefficient: float = 3e-5
    expansion: int = 8
    d_latent: int | None = None  # overrides expansion
    init: str = "paper"  # paper | default
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 4096
    epochs: float = 200.0
    steps: int | None = None  # overrides epochs
    seed: int = 49
    split: str = "training"
    fraction: float = 0.25
    shuffle_buffer_images: int = 64
    resample: bool = True  # ReLU: the paper's dead-latent resampling
    resample_every_epochs: float = 10.0
    resample_every_steps: int | None = None  # overrides resample_every_epochs
    resample_dataset_size: int = 20480
    k_aux: int | None = None  # TopK/BatchTopK AuxK (default d/2)
    auxk_coefficient: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent silent this many tokens counts as dead
    sparse_threshold: float = 0.4  # active-latent fraction above which the dense path runs
    pair_threshold: float = 0.03  # active (token, latent) pair fraction: sparse step up to this
    checkpoint_every: int = 1000
    log_every: int = 10
    device: str = "auto"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.kind not in ("relu", "topk", "batchtopk"):
            raise ConfigError(f"unknown SAE kind {self.kind!r}: use relu, topk or batchtopk")
        if self.kind != "relu" and not self.k:
            raise ConfigError(f"--kind {self.kind} needs --k (latents kept per token)")
        if self.batch_size < 1 or self.lr <= 0 or not 0 < self.fraction <= 1:
            raise ConfigError("batch size and lr must be positive and fraction in (0, 1]")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (TOML/JSON); ConfigError names unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(unknown)}: valid are {', '.join(sorted(names))}"
            )
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file (flat keys, or a [train] table)."""
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}") from exc
        return cls.from_dict(data.get("train", data))

    def to_toml(self) -> str:
        """The config as TOML text (None values left out)."""
        lines = []
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = json.dumps(value)
            elif isinstance(value, (tuple, list)):
                text = "[" + ", ".join(repr(float(v)) for v in value) + "]"
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        return "\n".join(lines) + "\n"


@dataclass
class TrainResult:
    """What a training run did."""

    out_dir: Path
    steps: int
    tokens: int
    interrupted: bool
    final_metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = float("nan")
    weights: Path | None = None
