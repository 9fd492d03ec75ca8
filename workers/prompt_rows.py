"""The contract between a forward pass and where each row's soft prompt comes from."""

from __future__ import annotations

from typing import Protocol

import torch


class PromptRows(Protocol):
    """Gives a batch its prompts: the soft-prompt bank, or a view of it (the ZeRO trainer's every-expert one).

    `workers.prompts.prompted_inputs` reads a batch's input prompts, their mask and its deep prefixes from it.
    """

    # Deep prefixes: train only the top K layers (None: every layer), `workers.prefix.prefix_cache`.
    trained_layers: int | None

    def rows(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """The B x L x D prompts of a batch's rows, one expert index a row (zeros where NO_EXPERT)."""
        ...

    def prompt_mask(self, expert_idx: torch.Tensor) -> torch.Tensor:
        """B x L: 1 on the slots of `rows` that hold a row's prompt, 0 on padding and NO_EXPERT rows."""
        ...

    def prefix_rows(self, expert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's deep prefixes (B x P x N x 2 x H x Dh) and their B x P mask; None if no row has one."""
        ...
