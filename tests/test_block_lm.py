"""Block-pruned LSTM LMs run on the block-sparse layer: same outputs, same parameters, saved and
reloaded members, and the block-sparse ensemble."""
import copy
import math

import pytest
import torch

from sparse_ensembles import checkpoint, pruning
from sparse_ensembles.compact.block_lm import (BlockSparseLMEnsemble, NarrowSoftmax, block_density, block_sparse_lm,
                                               narrow_softmax)
from sparse_ensembles.compact.block_lstm import BlockSparseLSTM
from sparse_ensembles.models import LSTMLM


def _pruned_lm(seed: int, sparsity: float = 0.8) -> LSTMLM:
    torch.manual_seed(seed)
    model = LSTMLM(40, [48, 48], 48, block=(16, 16)).eval()
    params = dict(model.named_parameters())
    masks = pruning.random_group_masks(params, model.groups("block"), sparsity, torch.Generator().manual_seed(seed))
    pruning.apply_masks(model, masks)
    return model


def test_a_block_pruned_lm_gives_the_same_log_probs_on_the_block_sparse_layers_and_keeps_its_parameters():
    model = _pruned_lm(0)
    tokens = torch.randint(0, 40, (3, 11))
    with torch.no_grad():
        dense, _ = model(tokens)
    before = dict(model.named_parameters())
    block_sparse_lm(model, executor="numba")
    assert all(isinstance(l, BlockSparseLSTM) for l in model.lstms)
    after = dict(model.named_parameters())
    assert list(before) == list(after) and all(before[n] is after[n] for n in before)  # same Parameter objects
    with torch.no_grad():
        sparse, _ = model(tokens)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert block_density(model) == pytest.approx(0.2, abs=0.02)


def test_an_optimizer_built_before_the_swap_still_trains_the_block_sparse_model_and_pruned_blocks_get_no_gradient():
    model = _pruned_lm(1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    block_sparse_lm(model, executor="numba")
    tokens = torch.randint(0, 40, (2, 8))
    logits, _ = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    w = model.lstms[0].weight_hh_l0
    zero = w.detach() == 0
    assert w.grad is not None and torch.equal(w.grad[zero], torch.zeros(int(zero.sum())))
    old = w.detach().clone()
    opt.step()
    assert not torch.equal(w.detach(), old) and torch.equal(w.detach()[zero], torch.zeros(int(zero.sum())))


def test_a_saved_block_sparse_member_reloads_and_runs_block_sparse_with_the_same_outputs(tmp_path):
    model = _pruned_lm(2)
    tokens = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        expected, _ = model(tokens)
    checkpoint.save_member(tmp_path / "member_000.pt", model)
    loaded, _ = checkpoint.load_member(tmp_path / "member_000.pt")
    block_sparse_lm(loaded, executor="numba").eval()
    with torch.no_grad():
        got, _ = loaded(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_block_sparse_ensemble_is_the_log_of_the_mean_of_the_members_probabilities():
    members = [_pruned_lm(s) for s in range(3)]
    tokens = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(tokens)[0], -1) for m in members]).mean(0)
    ens = BlockSparseLMEnsemble(members, executor="numba")
    logp, state = ens(tokens)
    torch.testing.assert_close(logp, probs.log(), atol=1e-5, rtol=1e-5)
    assert len(state) == 3
    logp2, _ = ens(tokens[:, 3:], None)
    assert torch.isfinite(logp2).all() and math.isclose(float(logp2.exp().sum(-1).mean()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_block_softmax_tiles_the_softmax_weight_so_a_block_pruned_member_shrinks_below_a_quarter(tie):
    """Without it the dense softmax keeps block-pruned members near the dense size; with it every
    matrix the cost counts is tiled, and the pruned model reloads with the option and runs
    block-sparse with the same outputs."""
    torch.manual_seed(0)
    model = LSTMLM(160, [32, 32], 32, tie=tie, block=(16, 16), block_softmax=True).eval()
    fams = model.groups("block")
    softmax = fams[-1]
    assert softmax.name == "softmax_blocks" and softmax.param == ("embedding.weight" if tie else "decoder.weight")
    params = dict(model.named_parameters())
    dense = model.cost()["params"]
    masks = pruning.random_group_masks(params, fams, 0.8, torch.Generator().manual_seed(0))
    assert masks[softmax.param].float().mean().item() == pytest.approx(0.2, abs=0.03)  # 4 of 20 blocks
    pruning.apply_masks(model, masks)
    assert model.cost()["params"] < 0.26 * dense
    without = LSTMLM(160, [32, 32], 32, tie=tie, block=(16, 16))
    assert len(without.groups("block")) == len(fams) - 1
    tokens = torch.randint(0, 160, (2, 7))
    with torch.no_grad():
        before, _ = model(tokens)
    again = LSTMLM.from_spec(model.spec())
    again.load_state_dict(model.state_dict())
    assert again.block_softmax and len(again.groups("block")) == len(fams)
    block_sparse_lm(again.eval(), executor="numba")
    with torch.no_grad():
        after, _ = again(tokens)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_softmax_block_of_whole_columns_prunes_the_softmax_input_and_survives_save_and_shrink():
    """model.softmax_block = [vocab, 1]: the softmax's blocks are whole columns (each reads one hidden
    unit), covering the matrix once; pruning 80% of them leaves 20% of the columns, the LSTM keeps its
    own blocks, and the option survives spec round trips and shrinking."""
    torch.manual_seed(0)
    model = LSTMLM(160, [40, 40], 40, block=(16, 16), block_softmax=True, softmax_block=(160, 1)).eval()
    fams = model.groups("block")
    softmax = fams[-1]
    assert softmax.param == "decoder.weight" and softmax.size == 40  # one group per column
    assert [f.size for f in fams[:-1]] == [f.size for f in LSTMLM(160, [40, 40], 40, block=(16, 16)).groups("block")]
    params = dict(model.named_parameters())
    masks = pruning.group_masks(params, [softmax], sparsity=0.8)
    keep = masks["decoder.weight"]
    assert torch.equal(keep, keep[:1].expand_as(keep))  # whole columns
    assert int(keep[0].sum()) == 8
    again = LSTMLM.from_spec(model.spec())
    assert again.softmax_block == [160, 1] and again.groups("block")[-1].size == 40
    small = model.shrink(model.live_units())
    assert small.softmax_block == [160, 1]
    # inference reads only the kept columns, with the same logits; the ensemble runs members so
    pruning.apply_masks(model, masks)
    tokens = torch.randint(0, 160, (3, 6))
    with torch.no_grad():
        full, _ = model(tokens)
        narrowed = narrow_softmax(copy.deepcopy(model))
        assert isinstance(narrowed.decoder, NarrowSoftmax) and narrowed.decoder.kept_fraction == pytest.approx(0.2)
        assert narrowed.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(narrowed(tokens)[0], full, atol=1e-5, rtol=1e-5)
        ens = BlockSparseLMEnsemble([copy.deepcopy(model)], executor="numba")
        assert isinstance(ens.members[0].decoder, NarrowSoftmax)
        torch.testing.assert_close(ens(tokens)[0], torch.log_softmax(full, -1), atol=1e-5, rtol=1e-5)
    assert not isinstance(narrow_softmax(LSTMLM(160, [40, 40], 40)).decoder, NarrowSoftmax)  # nothing pruned
    with pytest.raises(ValueError, match="softmax_block"):
        LSTMLM(160, [40, 40], 40, block_softmax=True, softmax_block=(160,))


def test_a_softmax_pruned_in_32x1_blocks_runs_on_the_block_sparse_product_with_the_same_logits():
    """BlockSparseSoftmax: logits over the kept blocks only equal the dense product (edge blocks
    included: 650 rows are not a multiple of 32); narrow_softmax picks it or the dense layer by
    speed, with the same outputs and state-dict keys either way."""
    from sparse_ensembles.compact.block_lm import BlockSparseSoftmax
    torch.manual_seed(0)
    model = LSTMLM(650, [40], 40, block=(16, 16), block_softmax=True, softmax_block=(32, 1)).eval()
    params = dict(model.named_parameters())
    pruning.apply_masks(model, pruning.group_masks(params, model.groups("block"), sparsity=0.8))
    tokens = torch.randint(0, 650, (3, 7))
    with torch.no_grad():
        full, _ = model(tokens)
        layer = BlockSparseSoftmax(model.decoder, (32, 1))
        assert layer.kept_fraction == pytest.approx(0.2, abs=0.02)
        h = torch.randn(5, 7, 40)
        torch.testing.assert_close(layer(h), torch.nn.functional.linear(h, model.decoder.weight, model.decoder.bias),
                                   atol=1e-5, rtol=1e-5)
        fast = narrow_softmax(copy.deepcopy(model))
        assert isinstance(fast.decoder, (BlockSparseSoftmax, torch.nn.Linear))
        assert fast.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(fast(tokens)[0], full, atol=1e-5, rtol=1e-5)
        ens = BlockSparseLMEnsemble([copy.deepcopy(model), copy.deepcopy(model)], executor="numba")
        torch.testing.assert_close(ens(tokens)[0], torch.log_softmax(full, -1), atol=1e-5, rtol=1e-5)


def test_on_block_kernel_restores_layers_training_flags_threads_and_leaves_the_global_rng_alone():
    import numba
    from sparse_ensembles.compact.block_lm import on_block_kernel
    torch.manual_seed(0)
    model = LSTMLM(40, [32, 32], 32, block=(16, 16))
    with torch.no_grad():
        model.lstms[0].weight_hh_l0[:16, :16] = 0  # one zero block
    originals = list(model.lstms)
    threads = numba.get_num_threads()
    tokens = torch.randint(0, 40, (3, 6))
    rng = torch.get_rng_state()
    with on_block_kernel(model, "auto"):  # "auto" times candidates on freshly initialised trial layers
        assert all(isinstance(l, BlockSparseLSTM) for l in model.lstms)
        model.eval()
        model(tokens)
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(model.lstms) == originals and not any(l.training for l in model.lstms)
    assert numba.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="inside"):
        with on_block_kernel(model, "numba"):
            raise RuntimeError("inside")
    assert list(model.lstms) == originals and numba.get_num_threads() == threads
