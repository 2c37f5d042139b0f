"""Tasks: validation split, batches, carried state, and the streaming ensemble evaluation."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from sparse_ensembles import metrics
from sparse_ensembles.ensembles import mean_of_probs
from sparse_ensembles.models import LSTMLM, MLP
from sparse_ensembles.tasks import Classification, EnsembleStream, LanguageModel


def _classification(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Classification((x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:]), batch_size=32, eval_batch_size=20)


def test_streaming_ensemble_equals_the_stacked_ensemble_after_every_member():
    task = _classification()
    members = [MLP([16, 8, 3]) for _ in range(4)]
    stream = task.stream("test")
    x, y = task.data["test"]
    for k, m in enumerate(members, start=1):
        got = stream.add(m)
        stacked = mean_of_probs(torch.stack([metrics.predict_logprobs(mm, x) for mm in members[:k]]))
        expected = metrics.classification_metrics(stacked, y)
        for key in expected:
            assert math.isclose(got[key], expected[key], rel_tol=1e-5, abs_tol=1e-6), (k, key)
    assert len(stream.curve) == 4 and stream.result == stream.curve[-1]


def test_stream_memory_is_one_running_sum_whatever_the_number_of_members():
    scores = iter([torch.log_softmax(torch.randn(5, 3), -1) for _ in range(6)])
    stream = EnsembleStream(lambda m: next(scores), lambda logp: {"mass": float(logp.exp().sum())})
    for _ in range(6):
        stream.add(nn.Identity())
    assert stream._sum.shape == (5, 3)
    assert math.isclose(stream.result["mass"], 5.0, rel_tol=1e-5)  # each row is a distribution


def test_classification_task_batches_cover_the_training_set_once_per_epoch_and_loss_is_mean_ce():
    task = _classification()
    seen = torch.cat([y for _, y in task.train_batches(torch.Generator().manual_seed(1))])
    assert len(seen) == task.num_train == 200
    assert torch.equal(seen.sort().values, task.data["train"][1].sort().values)
    model = MLP([16, 8, 3])
    x, y = task.data["train"]
    loss, state = task.loss(model, (x, y))
    assert state is None and torch.isclose(loss, F.cross_entropy(model(x), y))
    assert task.splits == ["valid", "test"] and task.dims == {"in_features": 16, "classes": 3}


def _lm_task(tokens=400, vocab=20):
    g = torch.Generator().manual_seed(0)
    splits = {s: torch.randint(0, vocab, (tokens,), generator=g) for s in ("train", "valid", "test")}
    return LanguageModel(splits, [f"w{i}" for i in range(vocab)], batch_size=4, bptt=7, eval_batch_size=3)


def test_language_model_perplexity_is_exp_of_mean_nll_per_token_with_the_state_carried():
    torch.manual_seed(0)
    task = _lm_task()
    model = LSTMLM(20, [8, 8], 8).eval()
    got = task.stream("test").add(model)
    # reference: the whole test stream through the model in one call per row, state carried
    batched = task.batched["test"]
    with torch.no_grad():
        logits, _ = model(batched[:, :-1])
    nll = F.cross_entropy(logits.reshape(-1, 20), batched[:, 1:].reshape(-1)).item()
    assert math.isclose(got["nll"], nll, rel_tol=1e-5)
    assert math.isclose(got["ppl"], math.exp(got["nll"]), rel_tol=1e-12)


def test_language_model_training_carries_the_hidden_state_across_bptt_segments_detached():
    torch.manual_seed(0)
    task = _lm_task()
    model = LSTMLM(20, [8], 8)
    batches = list(task.train_batches())
    loss, state = task.loss(model, batches[0], None)
    assert state is not None and all(h.requires_grad for h, _ in state)
    loss2, _ = task.loss(model, batches[1], state)
    loss2.backward()  # the carried state is detached: no second backward through segment 0 needed
    fresh, _ = task.loss(model, batches[1], None)
    assert not torch.isclose(loss2, fresh)  # the state changed the prediction
    assert task.num_train == 4 * (100 - 1) and task.steps_per_epoch() == math.ceil(99 / 7)
