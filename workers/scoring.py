"""Option distributions from next-token logits of the option letters, and alignment with survey shares."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from workers.attention import windowed
from workers.base_model import FrozenBase
from workers.chat import chat_prompt
from workers.defaults import EVAL_BATCH_SIZE
from workers.prompt_rows import PromptRows
from workers.prompts import NO_EXPERT, prompted_inputs

LETTERS = string.ascii_uppercase
ANSWER_PREFIX = "Answer:"
INSTRUCTION = "Answer with the letter of one option."


def question_body(question: str, options: Sequence[str]) -> str:
    """The question, its lettered options and the instruction: what a user sends, in a chat or a survey."""
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(options)}")
    return "\n".join([question.strip(), *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)), INSTRUCTION])


def question_text(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    options: Sequence[str],
    persona: str | None = None,
    chat: bool = False,
) -> str:
    """The question and lettered options, through the chat template where there is one, then the answer
    prefix. With `chat`, what /v1/chat/completions renders for the question sent as the user's message: the
    assistant's turn opens with nothing of ours."""
    body = question_body(question, options)
    messages = ([{"role": "system", "content": persona}] if persona else []) + [
        {"role": "user", "content": body}
    ]
    if chat:
        return chat_prompt(tokenizer, messages)
    if tokenizer.chat_template:
        return chat_prompt(tokenizer, messages) + ANSWER_PREFIX
    return (f"{persona}\n\n" if persona else "") + f"Question: {body}\n{ANSWER_PREFIX}"


def option_token_ids(tokenizer: PreTrainedTokenizerBase, n: int = len(LETTERS)) -> torch.Tensor:
    """n x 2 token ids per option letter: the bare letter and the space-prefixed one (equal if one token)."""
    ids = []
    for letter in LETTERS[:n]:
        bare = tokenizer.encode(letter, add_special_tokens=False)[-1]
        spaced = tokenizer.encode(" " + letter, add_special_tokens=False)[-1]
        ids.append([bare, spaced])
    return torch.tensor(ids)


def option_log_probs(
    last_logits: torch.Tensor, letter_ids: torch.Tensor, n_options: torch.Tensor, normalised: bool = True
) -> torch.Tensor:
    """B x max_n log-distributions over each row's options (-inf beyond a row's own options). Unless
    `normalised`, each option's log-probability in the whole next-token distribution: their sum is the mass
    the answer puts on the options at all (`answer_loss`)."""
    last = last_logits.float()
    letter_logits = last[:, letter_ids]  # B x 26 x 2
    same = letter_ids[:, 0] == letter_ids[:, 1]
    letter_logits[:, same, 1] = float("-inf")  # count a letter once when bare and spaced are one token
    per_option = torch.logsumexp(letter_logits, dim=-1)[:, : int(n_options.max())]
    beyond = torch.arange(per_option.shape[1], device=per_option.device)[None, :] >= n_options[:, None]
    per_option = per_option.masked_fill(beyond.to(per_option.device), float("-inf"))
    if normalised:
        return torch.log_softmax(per_option, dim=-1)
    return per_option - torch.logsumexp(last, dim=-1, keepdim=True)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance with log base 2, in [0, 1]."""
    p, q = np.asarray(p, float) / np.sum(p), np.asarray(q, float) / np.sum(q)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def alignment(p: np.ndarray, q: np.ndarray) -> float:
    """1 - Jensen-Shannon distance (base 2): 1 is the survey's own distribution, 0 disjoint support."""
    return 1.0 - js_distance(p, q)


# Published GOQA/WVS numbers use scipy's JS distance, natural log. The divergence scales by ln 2 with the
# log's base, so the distance by its square root: d_e = sqrt(ln 2) * d_2, exactly, for every pair.
NATURAL_LOG_FACTOR = math.sqrt(math.log(2))


def natural_log_alignment(score: float) -> float:
    """An alignment (base 2) on the natural-log scale of published numbers: 1 - sqrt(ln 2) * (1 - score)."""
    return 1.0 - NATURAL_LOG_FACTOR * (1.0 - score)


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the mean."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A 95% paired-bootstrap interval of mean(a - b), a[i] and b[i] scored on the same record i.

    Resampling records with the same indices for both columns is resampling their differences: what the
    records share (an easy question, a hard country) cancels, so the interval is far tighter than two
    separate intervals would suggest.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired columns need one score a record each, got {len(a)} and {len(b)}")
    return bootstrap_ci(a - b, n_resamples, seed)


@dataclass
class EncodedQuestion:
    """A question ready for the model: token ids, its number of options, and the survey target if known.

    `reversed_ids` is the same question with its options in reverse order. Where it is set, the question's
    answer combines both orders' answers (`both_orders`, `order_averaged`): the model's preference for a
    letter's position cancels, so the answer does not depend on which end of a scale is written first.
    `renderings` are other ways to write the same question (with their targets), from which training draws one
    each epoch.
    """

    input_ids: list[int]
    n_options: int
    target: list[float] | None = None
    reversed_ids: list[int] | None = None
    renderings: list[EncodedQuestion] = field(default_factory=list)

    def orders(self) -> list[tuple[list[int], bool]]:
        """The token ids the answer reads, each with whether its options are reversed."""
        return [(self.input_ids, False)] + ([(self.reversed_ids, True)] if self.reversed_ids else [])


def encode_question(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    options: Sequence[str],
    target: Sequence[float] | None = None,
    persona: str | None = None,
    max_length: int = 512,
    both_orders: bool = True,
    chat: bool = False,
) -> EncodedQuestion:
    """Tokenise one question (keeping its end if it is too long), and with `both_orders` its options reversed;
    with `chat`, as a chat asks it (`question_text`)."""

    def ids(shown: Sequence[str]) -> list[int]:
        text = question_text(tokenizer, question, shown, persona, chat)
        return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]

    return EncodedQuestion(
        ids(options),
        len(options),
        list(target) if target is not None else None,
        ids(list(reversed(options))) if both_orders and len(options) > 1 else None,
    )


def order_averaged(probs: Sequence[np.ndarray], reversed_flags: Sequence[bool]) -> np.ndarray:
    """One question's answer from its answers in several option orders, each mapped back to the written order:
    their mean in log space, renormalised (a normalised geometric mean; each answer's own scale cancels).

    A letter's position multiplies the probability of whichever option stands there (PriDe, ICLR 2024), so in
    log space the orders share each position's pull out over the options. The arithmetic mean does not: an
    option one order favours by position alone ("Don't know" written first) keeps half that order's mass.
    """
    logs = np.mean(
        [np.log(np.clip(p[::-1] if rev else p, 1e-300, None)) for p, rev in zip(probs, reversed_flags)], 0
    )
    answer = np.exp(logs - logs.max())
    return answer / answer.sum()


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask for a batch of token lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def batch_log_probs(
    base: FrozenBase,
    bank: PromptRows | None,
    questions: Sequence[EncodedQuestion],
    expert_idx: Sequence[int],
    letter_ids: torch.Tensor,
    normalised: bool = True,
) -> torch.Tensor:
    """One forward pass over a batch: B x max_n option log-probabilities, each row with its own expert
    (`option_log_probs`)."""
    ids, mask = left_pad([q.input_ids for q in questions], base.tokenizer.pad_token_id)
    inputs = prompted_inputs(
        base.model, ids.to(base.device), mask.to(base.device), bank, torch.tensor(list(expert_idx))
    )
    out = base.model(**windowed(base.model, inputs), use_cache=False, logits_to_keep=1)
    n_options = torch.tensor([q.n_options for q in questions], device=base.device)
    return option_log_probs(out.logits[:, -1], letter_ids.to(base.device), n_options, normalised)


@torch.no_grad()
def option_distributions(*args, **kwargs) -> list[np.ndarray]:
    """The model's distribution over each question's options, batched (rows sorted by length), each combined
    over its option orders (`EncodedQuestion.orders`, `order_averaged`). A row asked twice (the same ids and
    expert) runs once. Takes `option_answers`' arguments; leaves out the mass on the options."""
    return option_answers(*args, **kwargs)[0]


@torch.no_grad()
def option_answers(
    base: FrozenBase,
    bank: PromptRows | None,
    questions: Sequence[EncodedQuestion],
    expert_idx: Sequence[int] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    progress: str | None = None,
) -> tuple[list[np.ndarray], list[float]]:
    """`option_distributions`, and each answer's mass on its options: the share of the next token's
    probability that goes to an option's letter at all (a chat's answer may start with other words)."""
    expert_idx = list(expert_idx) if expert_idx is not None else [NO_EXPERT] * len(questions)
    letter_ids = option_token_ids(base.tokenizer)
    rows: dict[tuple[tuple[int, ...], int], EncodedQuestion] = {}
    for q, expert in zip(questions, expert_idx):
        for ids, _ in q.orders():
            rows.setdefault((tuple(ids), expert), EncodedQuestion(ids, q.n_options))
    keys = sorted(rows, key=lambda key: len(key[0]))
    probs: dict[tuple[tuple[int, ...], int], np.ndarray] = {}
    starts = range(0, len(keys), batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch", leave=False):
        chunk = keys[start : start + batch_size]
        log_probs = batch_log_probs(
            base, bank, [rows[k] for k in chunk], [k[1] for k in chunk], letter_ids, normalised=False
        )
        for row, key in enumerate(chunk):
            probs[key] = log_probs[row, : rows[key].n_options].cpu().double().exp().numpy()
    dists, masses = [], []
    for q, e in zip(questions, expert_idx):
        answers = [probs[(tuple(ids), e)] for ids, _ in q.orders()]
        dists.append(order_averaged([a / a.sum() for a in answers], [rev for _, rev in q.orders()]))
        masses.append(float(np.mean([a.sum() for a in answers])))
    return dists, masses


def mean_alignment(
    base: FrozenBase,
    bank: PromptRows | None,
    questions: Sequence[EncodedQuestion],
    expert: int = NO_EXPERT,
    batch_size: int = EVAL_BATCH_SIZE,
) -> float:
    """One expert's mean alignment over questions that carry their survey targets (validation alignment)."""
    dists = option_distributions(base, bank, questions, [expert] * len(questions), batch_size)
    return float(np.mean([alignment(d, q.target) for d, q in zip(dists, questions)]))
