"""The packed trainer: same result as training alone for every prompt kind, base untouched, learns, resumes
exactly."""

import numpy as np
import pytest
import torch

from tests.conftest import PROMPTS, random_expert, token_ids
from workers.prompts import SoftPromptBank, prompted_inputs
from workers.scoring import encode_question, left_pad
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
        # One order: the lean is a position ("option j" says nothing), which averaging both orders would halve.
        question = QUESTIONS[(i + offset) % len(QUESTIONS)]
        examples.append(encode_question(tokenizer, question, options, target, both_orders=False))
    return examples


def _data(tokenizer, sizes):
    train = {c: _examples(tokenizer, c, n) for c, n in sizes.items()}
    val = {c: _examples(tokenizer, c, 4, offset=50) for c in sizes}
    return train, val


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _config(**changes):
    return TrainConfig(
        epochs=2, batch_size=2, grad_accum=2, lr=0.05, weight_decay=0.01, patience=10, seed=7
    ).model_copy(update=changes)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["deep", "composed", "on a frozen shared prefix"])
def test_packed_training_of_prefixes_equals_training_each_expert_alone(llama_base, kind):
    sizes = {"Germany": 5, "Japan": 3, "Kenya": 4}
    train, val = _data(llama_base.tokenizer, sizes)
    shapes = {"deep": [(0, 2), (0, 5), (0, 3)], "composed": [(3, 2), (1, 4), (2, 1)]}
    shapes["on a frozen shared prefix"] = [(3, 0), (1, 0), (2, 0)]
    experts = [
        random_expert(llama_base, c, n, p, s) for s, (c, (n, p)) in enumerate(zip(sizes, shapes[kind]))
    ]
    shared = random_expert(llama_base, "all", 0, 3, seed=11).prefix if kind.endswith("prefix") else None

    def bank(chosen):
        made = SoftPromptBank(
            [e.meta.culture for e in chosen], [e.prompt for e in chosen], [e.prefix for e in chosen], shared
        )
        if shared is not None:
            made.shared_prefix.requires_grad_(False)
        return made

    packed = bank(experts)
    packed_result = PackedTrainer(llama_base, packed, train, val, _config()).fit()
    for i, expert in enumerate(experts):
        culture = expert.meta.culture
        alone = bank([expert])
        alone_result = PackedTrainer(
            llama_base, alone, {culture: train[culture]}, {culture: val[culture]}, _config()
        ).fit()
        torch.testing.assert_close(packed.prompts[i], alone.prompts[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(packed.prefix(i), alone.prefix(0), atol=2e-5, rtol=1e-4)
        assert packed_result.best_val_alignment[culture] == pytest.approx(
            alone_result.best_val_alignment[culture]
        )
    moved = [
        not torch.allclose(packed.prompts[i], e.prompt) for i, e in enumerate(experts) if e.prompt.numel()
    ]
    moved += [
        not torch.allclose(packed.prefix(i), e.prefix) for i, e in enumerate(experts) if e.prefix is not None
    ]
    assert all(moved)  # it did train
    if shared is not None:
        torch.testing.assert_close(packed.shared_prefix, shared)  # frozen: untouched


@pytest.mark.slow
def test_a_tied_prefix_trains_on_every_row_and_its_experts_stop_together(llama_base):
    train, val = _data(llama_base.tokenizer, {"Germany": 4, "Japan": 4})
    shared = random_expert(llama_base, "all", 0, 3, seed=4).prefix
    empty = torch.zeros(0, llama_base.hidden_size)
    bank = SoftPromptBank(["Germany", "Japan"], [empty, empty], shared_prefix=shared)
    trainer = PackedTrainer(llama_base, bank, train, val, _config(epochs=3, patience=1, lr=0.3))
    result = trainer.fit()
    assert not torch.allclose(bank.shared_prefix, shared)
    assert result.best_epoch["Germany"] == result.best_epoch["Japan"]
    best = trainer.best_bank()
    assert best.prefix(0) is best.prefix(1)
    torch.testing.assert_close(best.shared_prefix, bank.shared_prefix)


def test_prefix_layers_trains_only_the_top_layers_and_backpropagates_no_lower(llama_base):
    train, val = _data(llama_base.tokenizer, {"Germany": 4, "Japan": 3})
    start = SoftPromptBank.initialise(llama_base, ["Germany", "Japan"], 3, init="random", kind="deep")
    layers = start.prefixes[0].shape[1]
    assert layers >= 2
    bank = SoftPromptBank(start.cultures, list(start.prompts), [p.detach() for p in start.prefixes])
    PackedTrainer(llama_base, bank, train, val, _config(weight_decay=0.0, prefix_layers=1)).fit()
    for i in range(2):
        torch.testing.assert_close(bank.prefix(i)[:, :-1], start.prefix(i)[:, :-1], rtol=0, atol=0)
        assert not torch.allclose(bank.prefix(i)[:, -1], start.prefix(i)[:, -1])  # the top layer learned

    # Same outputs as the whole prefix; backward reaches the top layer only, so it leaves the lower ones
    # a zero gradient and builds no graph below (the saving).
    ids, mask = left_pad([token_ids(llama_base, PROMPTS[0])], llama_base.tokenizer.pad_token_id)
    bank.trained_layers = None
    whole = prompted_inputs(llama_base.model, ids, mask, bank, torch.tensor([0]))
    bank.trained_layers = 1
    top = prompted_inputs(llama_base.model, ids, mask, bank, torch.tensor([0]))
    out = llama_base.model(**top, use_cache=False, output_hidden_states=True)
    logits = out.logits
    torch.testing.assert_close(logits, llama_base.model(**whole, use_cache=False).logits)
    # hidden_states[i] is what layer i-1 outputs: no graph until the top layer, which attends to the prefix.
    assert [h.requires_grad for h in out.hidden_states] == [False] * layers + [True]
    logits.sum().backward()
    grad = bank.prefix(0).grad
    assert bool(grad[:, :-1].eq(0).all()) and bool(grad[:, -1].abs().sum() > 0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(prefix_layers=2, weight_decay=0.01)


def test_a_checkpoint_restores_the_prefixes(llama_base, tmp_path):
    train, val = _data(llama_base.tokenizer, {"Germany": 4})
    trained = SoftPromptBank.initialise(llama_base, ["Germany"], 3, init="random", kind="deep")
    trainer = PackedTrainer(llama_base, trained, train, val, _config(epochs=1))
    trainer.fit()
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    fresh = SoftPromptBank.initialise(llama_base, ["Germany"], 3, init="random", kind="deep", seed=1)
    resumed = PackedTrainer(llama_base, fresh, train, val, _config(epochs=1))
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    torch.testing.assert_close(fresh.prefix(0), trained.prefix(0))
    torch.testing.assert_close(resumed.best_prefixes["Germany"], trainer.best_prefixes["Germany"])
