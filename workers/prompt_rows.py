"""The contract between a forward pass and where each row's soft prompt comes from."""

from __future__ import annotations

from typing import Protocol

import torch


class PromptRows(Protocol):
    """Gives a batch its prompts: the soft-prompt bank, or a view of it (the ZeRO trainer's every-expert one)."""

    def rows(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """The B x L x D prompts of a batch's rows, one expert index a row (zeros where NO_EXPERT)."""
        ...
