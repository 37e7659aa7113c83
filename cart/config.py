"""Loading a config: a small YAML file (which may start from another), `key=value` overrides, every key and
type checked against the stages' settings (`cart.settings`), the checks that span two stages.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cart.errors import CartError
from cart.settings import (CaptionConfig, CorpusConfig, EmbedConfig, EvalConfig, GenerateConfig, IdsConfig,
                           InvalidValue, ModelConfig, RetrieveConfig, TrainConfig, at_least, below, folder_name)

MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred lines: a larger file is something else (/dev/zero)


@dataclass
class Config:
    run: str = "emoji"  # outputs go to <output_dir>/<run>/
    output_dir: str = "checkpoints"
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ids: IdsConfig = field(default_factory=IdsConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def __post_init__(self):
        if self.model.tune_layers and self.train.tune_after >= self.train.epochs:
            raise InvalidValue("train.tune_after", f"({self.train.tune_after}) leaves no epoch of train.epochs "
                                                   f"({self.train.epochs}) to tune model.tune_layers in")
        if self.retrieve.rerank and self.embed.encoder not in ("minilm-text", "imagebind"):
            raise InvalidValue("retrieve.rerank", f"needs an item encoder with a text side (embed.encoder "
                                                  f"minilm-text or imagebind), got {self.embed.encoder}")
        if self.train.distill_texts and self.embed.encoder not in ("minilm-text", "imagebind"):
            raise InvalidValue("train.distill_texts", f"needs an item encoder with a text side to label them "
                                                      f"(embed.encoder minilm-text or imagebind), got {self.embed.encoder}")
        if self.train.interpolation and not (self.embed.encoder == "minilm-text" and self.model.encoder == "minilm"
                                             and self.model.freeze_encoder and self.train.cache_encoder
                                             and not self.model.tune_layers):
            raise InvalidValue("train.interpolation", "mixes a query's frozen, cached MiniLM states toward its item's "
                                                      "MiniLM embedding: it needs embed.encoder minilm-text, model.encoder "
                                                      "minilm, model.freeze_encoder, train.cache_encoder and no model.tune_layers")
        at_least(self, 0, "seed")
        below(self, 2**32, "seed")  # NumPy's seeds are 32-bit
        if not self.run:
            raise InvalidValue("run", "must name the run folder, got ''")
        folder_name(self, "run")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.run


def load_config(path: str | Path | None = None, overrides: list[str] = (), named: bool = False) -> Config:
    """Read a YAML config, apply `a.b=value` overrides (values parsed as YAML), check every key and type.
    A config may start from another: `base: emoji.yaml` (beside it) and only the keys that differ. A config
    file, and with `named` any config, must name its run or its corpus: an empty one is a mistake, not the
    emoji demo's defaults."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = _read_yaml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CartError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CartError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            node[leaf] = value
    if (path is not None or named) and not {"run", "corpus"} & data.keys():
        raise CartError(f"{source}: names no run and no corpus: say which run folder (run: NAME) and which data "
                        f"(corpus: ...) it is about; the demo's config is configs/emoji.yaml")
    return _build(Config, data, source, prefix="")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file's keys, over those of its `base` (followed to the first config)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise CartError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise CartError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise CartError(f"--config {path} is a folder: give a YAML file") from None
    except OSError as e:
        raise CartError(f"config file {path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CartError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise CartError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CartError(f"{path}: expected a mapping of config keys at the top level")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise CartError(f"{path}: base should name another config file, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in seen:
        raise CartError(f"{path}: base {base} leads back to itself")
    return _merged(_read_yaml(base_path, (*seen, path.resolve())), data)


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls, data: dict, source: str, prefix: str):
    if not isinstance(data, dict):
        raise CartError(f"{source}: {prefix.rstrip('.')} should be a section (a mapping), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise CartError(
                f"{source}: unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})"
            )
    values = {key: _check(hints[key], value, source, prefix + key) for key, value in data.items()}
    try:
        return cls(**values)
    except InvalidValue as e:
        raise CartError(f"{source}: {prefix}{e.key} {e.message}") from None


def _check(hint, value, source: str, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise CartError(f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise CartError(f"{source}: {key} should be a list, got {value!r}")
        return [_check(item_type, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CartError(f"{source}: {key} should be a mapping, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise CartError(f"{source}: {key} must be a finite number, got {value!r}")
            return number
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise CartError(f"{source}: {key} should be {hint.__name__}, got {type(value).__name__} {value!r}")
