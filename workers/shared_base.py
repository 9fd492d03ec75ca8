"""One frozen checkpoint shared by every process on a node: weights as numpy arrays in Ray's object store.

The driver loads the base model once and turns every parameter and buffer into a numpy array. Put in the
object store (`ray.put` or `tune.with_parameters`), those arrays are mapped read-only and zero-copy by
every worker on a node; a worker builds the model skeleton on the meta device and points it at them,
so no trial holds a private copy of the weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from workers.base_model import DTYPES, FrozenBase, freeze, load_frozen_base, resolve_device

# numpy has no bfloat16: such tensors travel as int16 bits and are viewed back without a copy.
_BITS = {torch.bfloat16: np.int16}


@dataclass
class SharedBase:
    """Everything a worker needs to rebuild the frozen base without loading it: config, tokenizer, weights."""

    name: str
    dtype: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    tensors: dict[str, np.ndarray]

    @classmethod
    def from_model(cls, base: FrozenBase, dtype: str) -> SharedBase:
        """Turn a loaded base model into shareable arrays (parameters and buffers, tied ones once)."""
        tensors = {}
        seen = set()
        for name, tensor in [*base.model.named_parameters(), *base.model.named_buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            t = tensor.detach().cpu().contiguous()
            tensors[name] = t.view(torch.int16).numpy() if t.dtype in _BITS else t.numpy()
        return cls(base.name, dtype, base.model.config, base.tokenizer, tensors)

    @classmethod
    def load(cls, name: str, dtype: str = "float32") -> SharedBase:
        """Load a base model once (in the driver) and make it shareable."""
        return cls.from_model(load_frozen_base(name, dtype, device="cpu"), dtype)

    def materialise(self, device: str = "auto") -> FrozenBase:
        """A frozen model whose weights are these arrays (zero-copy on the CPU; one copy onto a GPU)."""
        dtype = DTYPES[self.dtype]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, array in self.tensors.items():
                tensor = torch.from_numpy(array)
                if array.dtype == np.int16 and dtype in _BITS:
                    tensor = tensor.view(dtype)
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                if attr in module._parameters:
                    module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
                else:
                    module._buffers[attr] = tensor
        model.tie_weights()  # tied output embeddings point at the shared input embeddings again
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"shared base is missing tensors: {left[:5]}")
        target = resolve_device(device)
        if target.type != "cpu":
            model = model.to(target)
        return freeze(self.name, model, self.tokenizer)
