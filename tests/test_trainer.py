"""The packed trainer: same result as training alone, base untouched, learns, resumes exactly."""

import numpy as np
import pytest
import torch

from workers.prompts import SoftPromptBank
from workers.scoring import encode_question
from workers.trainer import PackedTrainer, TrainConfig

QUESTIONS = [
    "Do you think people can be trusted?",
    "How important is religion in your life?",
    "Is the economic situation in our country good or bad?",
    "Would you agree that most people are fair?",
    "How important is it to live in a democracy?",
    "Do you trust the national government?",
    "Is it important to have children?",
]
# Each culture leans to its own option, so a trained prompt has something to learn.
LEANING = {"Germany": 0, "Japan": 1, "Kenya": 2}


def _examples(tokenizer, culture, n, offset=0):
    rng = np.random.default_rng(LEANING[culture] * 100 + offset)
    examples = []
    for i in range(n):
        k = 3 + i % 2
        options = [f"option {j}" for j in range(k)]
        target = rng.dirichlet(np.ones(k)) * 0.3
        target[LEANING[culture] % k] += 0.7
        examples.append(encode_question(tokenizer, QUESTIONS[(i + offset) % len(QUESTIONS)], options, target))
    return examples


def _data(tokenizer, sizes):
    train = {c: _examples(tokenizer, c, n) for c, n in sizes.items()}
    val = {c: _examples(tokenizer, c, 4, offset=50) for c in sizes}
    return train, val


def test_packed_training_equals_training_each_expert_alone(tiny_base):
    # Unequal sizes: Japan runs out of rows before the others, so later steps carry fewer experts.
    sizes = {"Germany": 7, "Japan": 3, "Kenya": 5}
    train, val = _data(tiny_base.tokenizer, sizes)
    config = TrainConfig(
        epochs=3, batch_size=2, grad_accum=2, lr=0.05, weight_decay=0.01, patience=10, seed=7
    )
    start = SoftPromptBank.initialise(tiny_base, list(sizes), 4, init="random", seed=1)

    packed = SoftPromptBank(start.cultures, start.weight.detach())
    packed_result = PackedTrainer(tiny_base, packed, train, val, config).fit()
    for i, culture in enumerate(sizes):
        alone = SoftPromptBank([culture], start.weight.detach()[i : i + 1])
        alone_result = PackedTrainer(
            tiny_base, alone, {culture: train[culture]}, {culture: val[culture]}, config
        ).fit()
        torch.testing.assert_close(packed.prompts[i], alone.prompts[0], atol=2e-5, rtol=1e-4)
        assert packed_result.best_val_alignment[culture] == pytest.approx(
            alone_result.best_val_alignment[culture]
        )
    assert not torch.allclose(packed.weight, start.weight)  # it did train


def test_base_weights_are_bit_identical_after_training(tiny_base):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    train, val = _data(tiny_base.tokenizer, {"Germany": 4, "Kenya": 4})
    bank = SoftPromptBank.initialise(tiny_base, ["Germany", "Kenya"], 3)
    PackedTrainer(tiny_base, bank, train, val, TrainConfig(epochs=2, batch_size=2, lr=0.1)).fit()
    after = tiny_base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_raises_validation_alignment_and_reports_each_epoch(llama_dir):
    from workers.base_model import load_frozen_base

    base = load_frozen_base(str(llama_dir), device="cpu")
    train, val = _data(base.tokenizer, {"Germany": 12, "Japan": 12})
    bank = SoftPromptBank.initialise(base, ["Germany", "Japan"], 4)
    reports = []
    config = TrainConfig(epochs=5, batch_size=4, lr=0.1, patience=5)
    result = PackedTrainer(base, bank, train, val, config).fit(lambda report, trainer: reports.append(report))
    assert [r.epoch for r in reports] == [1, 2, 3, 4, 5]
    assert set(reports[0].val_alignment) == {"Germany", "Japan"}
    assert "val_alignment/Germany" in reports[-1].metrics()
    for culture in ("Germany", "Japan"):
        assert result.best_val_alignment[culture] > result.initial_val_alignment[culture] + 0.03


def test_early_stopping_keeps_the_best_prompt(tiny_base):
    train, _ = _data(tiny_base.tokenizer, {"Germany": 8})
    # Validation that leans the other way: the more it learns Germany's lean, the worse it scores.
    val = {"Germany": _examples(tiny_base.tokenizer, "Japan", 4, offset=50)}
    bank = SoftPromptBank.initialise(tiny_base, ["Germany"], 3)
    trainer = PackedTrainer(
        tiny_base, bank, train, val, TrainConfig(epochs=8, batch_size=2, lr=0.3, patience=2)
    )
    result = trainer.fit()
    assert result.epochs_run < 8
    assert trainer.validate(["Germany"])["Germany"] == pytest.approx(result.best_val_alignment["Germany"])


def test_resume_from_state_dict_continues_exactly(tiny_base, tmp_path):
    train, val = _data(tiny_base.tokenizer, {"Germany": 5, "Japan": 4})
    config = TrainConfig(epochs=3, batch_size=2, lr=0.05, patience=10)
    start = SoftPromptBank.initialise(tiny_base, ["Germany", "Japan"], 3, init="random")

    straight = SoftPromptBank(start.cultures, start.weight.detach())
    PackedTrainer(tiny_base, straight, train, val, config).fit()

    def crash_after_first_epoch(report, trainer):
        torch.save(trainer.state_dict(), tmp_path / "state.pt")
        raise KeyboardInterrupt  # the process dies right after its epoch-1 checkpoint

    crashed = SoftPromptBank(start.cultures, start.weight.detach())
    with pytest.raises(KeyboardInterrupt):
        PackedTrainer(tiny_base, crashed, train, val, config).fit(crash_after_first_epoch)
    resumed_bank = SoftPromptBank(start.cultures, start.weight.detach())
    resumed = PackedTrainer(tiny_base, resumed_bank, train, val, config)
    # Plain tensors, numbers and strings: it loads without unpickling arbitrary objects.
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.fit().epochs_run == 3
    torch.testing.assert_close(resumed_bank.weight, straight.weight)


def test_length_buckets_sort_each_run_of_an_epoch_and_keep_every_row_once():
    from workers.trainer import length_bucketed

    lengths = [5, 1, 4, 2, 3, 9, 7, 8]
    order = [0, 1, 2, 3, 4, 5, 6, 7]
    assert length_bucketed(order, lengths, 4) == [1, 3, 2, 0, 4, 6, 7, 5]
    assert length_bucketed(order, lengths, 1) == order  # one-row runs: the plain shuffle


def test_group_selection_keeps_one_epoch_for_every_expert_chosen_on_their_mean(tiny_base):
    cultures = ["Germany", "Japan", "Kenya"]
    train, val = _data(tiny_base.tokenizer, dict.fromkeys(cultures, 8))
    # Germany's validation leans the other way: alone, it keeps its starting prompt.
    val["Germany"] = _examples(tiny_base.tokenizer, "Japan", 4, offset=50)
    start = SoftPromptBank.initialise(tiny_base, cultures, 3, init="random", seed=1)

    def fit(select):
        bank = SoftPromptBank(start.cultures, start.weight.detach())
        config = TrainConfig(epochs=4, batch_size=2, lr=0.3, patience=4, select=select)
        kept = {}
        trainer = PackedTrainer(tiny_base, bank, train, val, config)
        result = trainer.fit(lambda report, t: kept.update({report.epoch: t.current_prompts()}))
        return bank, result, kept

    alone, alone_result, _ = fit("expert")
    assert alone_result.best_epoch["Germany"] == 0
    torch.testing.assert_close(alone.prompts[0], start.prompts[0])

    group, result, kept = fit("group")
    means = [np.mean(list(result.initial_val_alignment.values()))]
    means += [np.mean(list(report.val_alignment.values())) for report in result.history]
    chosen = int(np.argmax(means))
    assert chosen > 0  # the group gained, so Germany trained with it
    assert set(result.best_epoch.values()) == {chosen}
    for i, culture in enumerate(cultures):
        torch.testing.assert_close(group.prompts[i], kept[chosen][culture])
