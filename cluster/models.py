"""Model facts: from a local config.json (+ safetensors sizes), the built-in catalog, or the configured hub (hub.py)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from . import knowledge
from .errors import ConfigError

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1, "fp8": 1}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                     "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    id: str
    architecture: str
    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    dtype: str
    tie_embeddings: bool
    weight_bytes: int
    gated: bool = False
    local_path: str | None = None   # set when read from a directory on this machine
    remote_code: bool = False       # config.json has `auto_map`: the repository ships its own modelling code

    @property
    def params(self) -> float:
        return self.weight_bytes / DTYPE_BYTES.get(self.dtype, 2)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)


def host_dir_name(model: str) -> str:
    """Folder name of a hub model under model_dir: `Qwen/Qwen2.5-7B` -> `Qwen--Qwen2.5-7B`."""
    return model.strip("/").replace("/", "--")


def is_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~"))


def _first(cfg: dict, *keys: str, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def from_config(model_id: str, cfg: dict, weight_bytes: int, *, local_path: str | None = None) -> ModelFacts:
    """Normalise a Hugging Face config.json (Llama, Qwen, Mistral, Falcon, Baichuan...)."""
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads"))
    hidden = int(_first(cfg, "hidden_size", "d_model", "n_embd"))
    kv = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv is None:
        kv = 1 if cfg.get("multi_query") else heads
    return ModelFacts(
        id=model_id,
        architecture=(cfg.get("architectures") or [cfg.get("architecture", "?")])[0],
        model_type=str(cfg.get("model_type", "?")),
        layers=int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers")),
        heads=heads,
        kv_heads=int(kv),
        head_dim=int(_first(cfg, "head_dim", default=hidden // heads)),
        hidden=hidden,
        intermediate=int(_first(cfg, "intermediate_size", "ffn_hidden_size", default=4 * hidden)),
        vocab=int(cfg["vocab_size"]),
        max_positions=int(_first(cfg, "max_position_embeddings", "model_max_length", "max_seq_len",
                                 "seq_length", default=2048)),
        dtype=str(_first(cfg, "torch_dtype", "dtype", default="float16")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_bytes=int(weight_bytes),
        gated=bool(cfg.get("gated", False)),
        local_path=local_path,
        remote_code=bool(cfg.get("auto_map")),
    )


def _safetensors_bytes(path: Path) -> int:
    """Sum of tensor sizes from a safetensors header (no tensor data is read)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        total += end - start
    return total


def weight_bytes_of(folder: Path) -> int:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        size = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if size:
            return int(size)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return sum(_safetensors_bytes(p) for p in files)
    return sum(p.stat().st_size for p in folder.glob("*.bin"))


@dataclass(frozen=True)
class Lookup:
    """Facts for a model, or None; `problem`: why the hub could not tell (one line), if it was asked."""

    facts: ModelFacts | None
    problem: str | None = None


def lookup(model: str, *, source=None, field: str = "deploy.model", file: str | None = None,
           line: int | None = None) -> Lookup:
    """A local directory, else the catalog, else (with a `source`) the hub's cache, else the hub unless offline."""
    if is_local(model):
        folder = Path(model).expanduser()
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise ConfigError(f"{folder} has no config.json", file=file, field=field, line=line,
                              fix="point deploy.model at a model directory, or use a hub id")
        try:
            cfg = json.loads(cfg_path.read_text())
            return Lookup(from_config(str(folder), cfg, weight_bytes_of(folder), local_path=str(folder)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {cfg_path}: {e}", file=file, field=field) from None
    entry = knowledge.catalog().get(model)
    if entry is not None:   # a catalog model never touches the network
        return Lookup(_from_catalog(model, entry))
    if source is None or source.kind == "local":
        return Lookup(None)
    from . import hub   # urllib only when a model outside the catalog is planned
    try:
        return Lookup(hub.facts(model, source))
    except hub.HubError as e:
        return Lookup(None, str(e))


def load(model: str, *, source=None, field: str = "deploy.model", file: str | None = None,
         line: int | None = None) -> ModelFacts | None:
    """Facts for `model` (see `lookup`), or None when nothing knows it."""
    return lookup(model, source=source, field=field, file=file, line=line).facts


def _from_catalog(model: str, entry: dict) -> ModelFacts:
    return ModelFacts(
        id=model, architecture=entry["architecture"], model_type=entry["model_type"],
        layers=entry["num_hidden_layers"], heads=entry["num_attention_heads"],
        kv_heads=entry["num_key_value_heads"],
        head_dim=entry.get("head_dim") or entry["hidden_size"] // entry["num_attention_heads"],
        hidden=entry["hidden_size"], intermediate=entry["intermediate_size"], vocab=entry["vocab_size"],
        max_positions=entry["max_position_embeddings"], dtype=entry["torch_dtype"],
        tie_embeddings=entry.get("tie_word_embeddings", False), weight_bytes=entry["weight_bytes"],
        gated=entry.get("gated", False), remote_code=bool(entry.get("trust_remote_code", False)),
    )
