"""The ``codegen2 train`` config: six sections as dataclasses, read from TOML or YAML, with typed
``section.key=value`` overrides from the command line. Every field has a default; unknown keys are refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, from PyPI (train extra)
    import tomli as tomllib

from codegen2.train.objective import ObjectiveConfig


@dataclass
class ModelSection:
    init_from: str | None = None  # a checkpoint directory or hub id to fine-tune; else a new model:
    preset: str | None = None  # an official shape, e.g. "codegen2-1B" (fields in `shape` override it)
    family: str = "codegen2"  # "codegen2" or "llama" (CodeGen2.5) for a custom shape
    shape: dict = field(default_factory=dict)  # config fields, e.g. {n_layers = 4, dim = 256, n_heads = 4}


@dataclass
class LoRASection:
    rank: int = 0  # 0: full fine-tuning; else adapters of this rank on a frozen model.init_from (models/lora.py)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    targets: list | None = None  # layers by name (codegen2: wqkv wo w1 w2; llama: wq wk wv wo w1 w2 w3); None: all
    quant: str = "none"  # the frozen base: none = in the run's dtype (bf16 or fp32), int8 = weight-only int8
    merge: bool = False  # also export model/, the base with the adapters merged in (a plain HF directory)


@dataclass
class DataSection:
    corpus: str = ""  # a directory written by `codegen2 data build`
    seq_len: int = 1024  # tokens per training row


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine schedule ends here at max_steps
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1  # on matrices only, not on biases, norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    batch_size: int = 32  # rows per optimizer step, over all processes
    micro_batch_size: int = 8  # rows per forward pass in one process


@dataclass
class RunSection:
    out_dir: str = "runs/codegen2"
    seed: int = 0
    device: str = "auto"  # auto = cuda if available; with torchrun each process takes its local GPU
    dtype: str = "auto"  # bf16 autocast or fp32; auto = bf16 on GPU, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    data_workers: int = 0  # processes making rows ahead of the step (0: in the training process); same rows for any N
    log_every: int = 10
    eval_every: int = 200
    eval_rows: int = 32  # validation rows for the loss
    infill_examples: int = 16  # held-out single-line holes for the exact-match rate
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    export_dtype: str = "bf16"
    export_shard_size: str = "5GB"
    peak_tflops: float = 0.0  # for MFU; 0 = known GPUs only


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        o = self.optim
        if o.batch_size < 1 or o.micro_batch_size < 1 or o.max_steps < 1 or o.warmup_steps < 0:
            raise ValueError("optim.batch_size, micro_batch_size and max_steps must be >= 1, warmup_steps >= 0")
        if self.data.seq_len < 16:
            raise ValueError(f"data.seq_len must be >= 16, got {self.data.seq_len}")
        if self.run.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"run.dtype must be auto, bf16 or fp32, got {self.run.dtype!r}")
        if self.model.init_from and (self.model.preset or self.model.shape):
            raise ValueError("model.init_from fine-tunes an existing model: leave model.preset and model.shape empty")
        lora = self.lora
        if lora.rank < 0 or (lora.rank and not self.model.init_from):
            raise ValueError(f"lora.rank {lora.rank}: LoRA (rank >= 1) adapts a trained model: set model.init_from")
        if not lora.rank and (lora.quant != "none" or lora.merge or lora.targets is not None):
            raise ValueError("lora.quant, lora.merge and lora.targets apply to LoRA runs: set lora.rank >= 1")
        if lora.quant not in ("none", "int8") or not lora.alpha > 0:
            raise ValueError(f"lora.quant must be none or int8 (got {lora.quant!r}), lora.alpha > 0 "
                             f"(got {lora.alpha})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        """From the sections of a TOML / YAML file: every value checked against its field's type."""
        sections = {}
        for f in dataclasses.fields(TrainConfig):
            section, values = type(f.default_factory()), dict(raw.get(f.name) or {})
            known = {x.name: x for x in dataclasses.fields(section)}
            for key, value in values.items():
                if key not in known:
                    raise ValueError(f"unknown setting {f.name}.{key}; [{f.name}] has: {', '.join(known)}")
                want = known[key].type
                want = want if isinstance(want, str) else getattr(want, "__name__", str(want))
                values[key] = _coerce(f"{f.name}.{key}", want, value)
            sections[f.name] = section(**values)
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {', '.join(sections)}")
        return cls(**sections)


def _parse_value(text: str):
    """A command-line value: a TOML literal (1e-3, true, "x", [1, 2]) or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(where: str, want: str, value):
    """Check ``value`` against a field's annotation (a string such as "int", "str | None")."""
    names = {n.strip() for n in want.split("|")}
    if isinstance(value, str) and "str" not in names:
        value = _parse_value(value)  # a command-line override such as optim.lr=1e-3
    if isinstance(value, int) and not isinstance(value, bool) and "int" not in names and "float" in names:
        value = float(value)
    kind = "None" if value is None else type(value).__name__
    if kind not in names:
        raise ValueError(f"{where} must be {want}, got {value!r}")
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TOML or YAML file (sections model, lora, data, objective, optim, run) plus ``section.key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        if p.suffix in (".yaml", ".yml"):
            import yaml  # only needed for YAML configs

            raw = yaml.safe_load(p.read_text()) or {}
        else:
            raw = tomllib.loads(p.read_text())
    for item in overrides:
        key, eq, value = item.partition("=")
        parts = key.split(".")
        if not eq or len(parts) < 2:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        # section.key: typed by its field later; deeper keys (model.shape.n_layers) are TOML literals.
        node[parts[-1]] = value if len(parts) == 2 else _parse_value(value)
    return TrainConfig.from_dict(raw)
