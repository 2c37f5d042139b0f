"""Typed experiment configuration, read from TOML.

Unknown keys and wrong types are errors that name the key. ``--set section.key=value`` overrides
take TOML literals (``--set sgld.lr=0.1``, ``--set prune.sparsities=[0.9]``).
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what is allowed."""


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion-mnist
    path: str = ""  # a directory with the IDX files; empty = search (see data.registry)
    download: bool = False  # opt-in fetch from the canonical mirror, checksum-verified
    batch_size: int = 100
    train_subset: int = 0  # use the first n training examples (0 = all); for quick runs
    test_subset: int = 0


@dataclass
class ModelConfig:
    sizes: list[int] = field(default_factory=lambda: [784, 300, 100, 10])
    activation: str = "relu"


@dataclass
class SGDConfig:
    """Independently trained SGD baselines (SSE paper: lr 0.5 halved every 10 epochs, 100 epochs)."""
    members: int = 18
    epochs: int = 100
    lr: float = 0.5
    lr_decay: float = 0.5
    decay_every: int = 10
    weight_decay: float = 0.0


@dataclass
class SGLDConfig:
    """Per prior, ``chains`` independent chains share ``samples``; each chain collects its share
    after epoch burn_in + thin * k, k = 1..samples / chains."""
    lr: float = 0.5
    schedule: str = "constant"  # constant | cyclical (cosine cycles of `thin` epochs after burn-in)
    temperature: float = 1.0
    burn_in: int = 10
    thin: int = 5
    samples: int = 18
    chains: int = 1  # independent chains (own init and noise): more diverse samples, one burn-in each
    prior_precision: float = 1.0  # Gaussian prior N(0, 1/precision) on every weight and bias
    plain_chain: bool = True  # also run a chain with the Gaussian prior only (the "SGLD xM" row)
    prefetch_noise: bool = True
    noise: str = "gaussian"  # gaussian | rademacher (+-1: same covariance, ~3x cheaper; see SGLD docs)

    @property
    def epochs_per_chain(self) -> int:
        return self.burn_in + self.thin * (self.samples // self.chains)


@dataclass
class GSPConfig:
    """SGLD + group sparse prior (Zhang & Ou 2018): R = lam * sum_g sqrt(dim_g) ||theta_g||."""
    enabled: bool = True
    lam: float = 3.0


@dataclass
class PruneConfig:
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.96])
    scope: str = "global"  # global | layer: one magnitude threshold, or the same fraction per layer
    group_threshold: float = 0.0  # also drop whole neurons whose RMS weight is below this (0 = off)
    # structured members: keep only this many input pixels and hidden units per layer (largest RMS
    # group norm) before magnitude pruning, gradually if retrain.ramp_epochs > 0; [] = off. Small
    # dense members run fast when fused.
    widths: list[int] = field(default_factory=list)


@dataclass
class RetrainConfig:
    """Masked retraining of every pruned sample (SSE: 20 epochs, lr 0.01 divided by 1.15 per epoch).

    ``ramp_epochs`` > 0 prunes gradually instead of at once: over the first ``ramp_epochs``
    epochs (of ``epochs``) the sparsity rises along Zhu & Gupta's cubic schedule from that of the
    group-pruned sample to the target, the mask re-chosen by magnitude each epoch (and
    ``prune.widths``, if set, shrink from the live widths along the same schedule)."""
    epochs: int = 20
    lr: float = 0.01
    lr_decay: float = 1.15
    ramp_epochs: int = 0  # 0 = one-shot pruning (the paper)


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sgd: SGDConfig = field(default_factory=SGDConfig)
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    gsp: GSPConfig = field(default_factory=GSPConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {inner.__name__}, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    if not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _validate(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.data.name in ("mnist", "fashion-mnist"), "data.name", f"unknown dataset {cfg.data.name!r}; use 'mnist' or 'fashion-mnist'")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.data.train_subset >= 0 and cfg.data.test_subset >= 0, "data.train_subset", "must be >= 0 (0 = all)")
    need(len(cfg.model.sizes) >= 2 and all(s >= 1 for s in cfg.model.sizes), "model.sizes", "needs >= 2 positive widths")
    need(cfg.sgd.members >= 0, "sgd.members", "must be >= 0")
    need(cfg.sgd.epochs >= 1, "sgd.epochs", "must be >= 1")
    need(cfg.sgd.decay_every >= 1, "sgd.decay_every", "must be >= 1")
    for k in ("lr",):
        need(getattr(cfg.sgd, k) > 0, f"sgd.{k}", "must be > 0")
        need(getattr(cfg.sgld, k) > 0, f"sgld.{k}", "must be > 0")
    need(cfg.sgld.schedule in ("constant", "cyclical"), "sgld.schedule", "use 'constant' or 'cyclical'")
    need(cfg.sgld.temperature >= 0, "sgld.temperature", "must be >= 0")
    need(cfg.sgld.burn_in >= 0 and cfg.sgld.thin >= 1 and cfg.sgld.samples >= 0, "sgld.samples",
         "need burn_in >= 0, thin >= 1, samples >= 0")
    need(cfg.sgld.noise in ("gaussian", "rademacher"), "sgld.noise", "use 'gaussian' or 'rademacher'")
    need(1 <= cfg.sgld.chains <= 60, "sgld.chains", "must be between 1 and 60")
    need(cfg.sgld.samples % cfg.sgld.chains == 0, "sgld.samples",
         f"{cfg.sgld.samples} samples cannot be shared evenly by {cfg.sgld.chains} chains; use a multiple of sgld.chains")
    need(cfg.sgld.prior_precision > 0, "sgld.prior_precision", "must be > 0")
    need(cfg.gsp.lam > 0, "gsp.lam", "must be > 0")
    need(all(0 <= s < 1 for s in cfg.prune.sparsities), "prune.sparsities", "each is the fraction removed, in [0, 1)")
    need(cfg.prune.scope in ("global", "layer"), "prune.scope", "use 'global' or 'layer'")
    need(cfg.prune.group_threshold >= 0, "prune.group_threshold", "must be >= 0")
    if cfg.prune.widths:
        fams = cfg.model.sizes[:-1]
        need(len(cfg.prune.widths) == len(fams) and all(1 <= w <= n for w, n in zip(cfg.prune.widths, fams)),
             "prune.widths", f"give one width per input/hidden layer of model.sizes = {cfg.model.sizes}, each between "
             f"1 and that layer's size (e.g. {[max(1, n // 4) for n in fams]}), or [] for no structured pruning")
    need(cfg.retrain.epochs >= 0 and cfg.retrain.lr > 0 and cfg.retrain.lr_decay > 0, "retrain", "need epochs >= 0, lr > 0, lr_decay > 0")
    # the target mask is set at the start of epoch ramp_epochs, so at least one epoch must follow
    need(cfg.retrain.ramp_epochs == 0 or 0 < cfg.retrain.ramp_epochs < cfg.retrain.epochs, "retrain.ramp_epochs",
         f"must be 0 (one-shot pruning) or below retrain.epochs = {cfg.retrain.epochs}, so that the "
         "members retrain at the target sparsity for at least one epoch")


def from_dict(raw: dict) -> Config:
    cfg = Config()
    hints = typing.get_type_hints(Config)
    for section, values in raw.items():
        if section not in hints:
            raise ConfigError(f"unknown config section [{section}]; known: {sorted(hints)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        target = getattr(cfg, section)
        fields = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown config key {section}.{key}; known in [{section}]: {sorted(fields)}")
            setattr(target, key, _check_type(f"{section}.{key}", value, fields[key]))
    _validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with a TOML literal value (bare words are taken as strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, literal = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {literal}")["v"]
    except tomllib.TOMLDecodeError:
        value = literal
    return section, key, value


def load(path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; shipped configs are in configs/") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return from_dict(raw)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (every key written, so a run documents itself)."""
    def lit(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {lit(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
