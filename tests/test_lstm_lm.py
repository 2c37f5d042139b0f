"""The lstm_lm model kind: presets, spec round trip, the three groupings' exact coverage, the group
prior's gradient, cost, live units and physical shrinking (equal to the masked model)."""
import copy

import pytest
import torch
from torch import nn

from sparse_ensembles.models import LSTMLM, registry
from sparse_ensembles.priors import GroupLasso
from sparse_ensembles.pruning import apply_masks, group_masks, keep_masks

VOCAB = 50


def _model(tie, hidden=(8, 7), emb=6, seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return LSTMLM(VOCAB, list(hidden), hidden[-1] if tie else emb, dropout=dropout, tie=tie).eval()


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _run(model, tokens, segments=2):
    """Logits and states over ``segments`` BPTT segments, the state carried (and detached)."""
    state, logits, states = None, [], []
    for chunk in tokens.chunk(segments, dim=1):
        out, state = model(chunk, state)
        state = [(h.detach(), c.detach()) for h, c in state]
        logits.append(out)
        states.append(state)
    return torch.cat(logits, dim=1), states


@torch.no_grad()
def _masked(model, keep):
    """A copy of ``model`` with the weights of the dropped unit groups zeroed."""
    masked = copy.deepcopy(model)
    apply_masks(masked, keep_masks(dict(masked.named_parameters()), masked.unit_groups(), keep))
    return masked


def _random_keep(model, p=0.6):
    keep = [torch.rand(fam.size) < p for fam in model.unit_groups()]
    for k in keep:
        k[torch.randint(len(k), ())] = True  # at least one unit per family
    return keep


# ----- reference groups, written out from the definitions ---------------------------------------

def _reference_groups(model, grouping):
    """Each group as the set of (param, row, col) entries it holds, enumerated from the papers'
    definitions, in the order of ``model.groups(grouping)``."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ih = [f"lstms.{l}.weight_ih_l0" for l in range(len(model.hidden))]
    hh = [f"lstms.{l}.weight_hh_l0" for l in range(len(model.hidden))]
    softmax = "embedding.weight" if model.tie else "decoder.weight"

    def row(name, r):
        return {(name, r, c) for c in range(shapes[name][1])}

    def col(name, c, rows=None):
        return {(name, r, c) for r in (range(shapes[name][0]) if rows is None else rows)}

    groups = []
    if grouping == "block":  # (bh x bw) blocks of W_ih, then of W_hh, row-major; smaller at the edges
        bh, bw = model.block
        for l in range(len(model.hidden)):
            for w in (ih[l], hh[l]):
                rows, cols = shapes[w]
                groups += [{(w, r, c) for r in range(i, min(i + bh, rows)) for c in range(j, min(j + bw, cols))}
                           for i in range(0, rows, bh) for j in range(0, cols, bw)]
        return groups
    if grouping in ("untied", "tied"):
        for l, n in enumerate(model.hidden):
            if grouping == "untied":  # rows, then gate-major columns, of each gate matrix
                for w in (ih[l], hh[l]):
                    groups += [row(w, r) for r in range(4 * n)]
                    groups += [col(w, c, range(g * n, (g + 1) * n)) for g in range(4) for c in range(shapes[w][1])]
            else:  # rows and columns of [W_ih, W_hh]
                groups += [row(ih[l], r) | row(hh[l], r) for r in range(4 * n)]
                groups += [col(ih[l], c) for c in range(shapes[ih[l]][1])]
                groups += [col(hh[l], c) for c in range(n)]
        return groups
    if not model.tie:  # embedding feature j: what reads it and where it comes from
        groups += [col("embedding.weight", j) | col(ih[0], j) for j in range(model.emb)]
    for l, n in enumerate(model.hidden):
        reader = ih[l + 1] if l + 1 < len(model.hidden) else softmax
        for k in range(n):
            entries = set()
            for g in range(4):
                entries |= row(ih[l], g * n + k) | row(hh[l], g * n + k)
            entries |= col(hh[l], k) | col(reader, k)
            if model.tie and l == len(model.hidden) - 1:
                entries |= col(ih[0], k)
            groups.append(entries)
    return groups


def _index(entries, name):
    rc = [(r, c) for p, r, c in entries if p == name]
    return torch.tensor([r for r, _ in rc], dtype=torch.long), torch.tensor([c for _, c in rc], dtype=torch.long)


CASES = [(False, (6, 5), 4), (True, (6, 5), 5), (True, (5,), 5), (False, (4,), 3)]


@pytest.mark.parametrize("grouping", LSTMLM.groupings)
@pytest.mark.parametrize("tie,hidden,emb", CASES)
def test_each_grouping_holds_exactly_the_entries_its_definition_enumerates(grouping, tie, hidden, emb):
    torch.manual_seed(0)
    model = LSTMLM(20, list(hidden), emb, tie=tie, block=(3, 2))  # blocks that do not divide the shapes
    params = _params(model)
    families = model.groups(grouping)
    ref = _reference_groups(model, grouping)
    assert sum(f.size for f in families) == len(ref)
    assert all(params[n].dim() == 2 for f in families for n in f.params)  # no bias is in a group

    values = torch.rand(len(ref)) + 0.5
    got_count = {n: torch.zeros_like(p) for n, p in params.items()}
    got_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    start = 0
    for fam in families:
        block = ref[start:start + fam.size]
        for name in fam.params:
            got_count[name] += fam.broadcast(torch.ones(fam.size), name, params[name])
            got_sum[name] += fam.broadcast(values[start:start + fam.size], name, params[name])
        if grouping == "block":  # edge blocks are smaller; group_dim is the full block's
            assert max(len(e) for e in block) == fam.group_dim(params)
        else:
            assert {len(e) for e in block} == {fam.group_dim(params)}
        expected_sq = torch.stack([sum(params[n][_index(e, n)].pow(2).sum() for n in params if params[n].dim() == 2)
                                   for e in block])
        torch.testing.assert_close(fam.sq_norms(params), expected_sq)
        start += fam.size

    for name, p in params.items():
        exp_count, exp_sum = torch.zeros_like(p), torch.zeros_like(p)
        if p.dim() == 2:
            for g, entries in enumerate(ref):
                rows, cols = _index(entries, name)
                exp_count.index_put_((rows, cols), torch.ones(len(rows)), accumulate=True)
                exp_sum.index_put_((rows, cols), values[g].expand(len(rows)), accumulate=True)
        torch.testing.assert_close(got_count[name], exp_count, msg=f"{grouping}: group count of {name}")
        torch.testing.assert_close(got_sum[name], exp_sum, msg=f"{grouping}: groups holding {name}")


@pytest.mark.parametrize("tie", [False, True])
def test_sse_groupings_put_every_lstm_weight_in_one_row_and_one_column_group_and_nothing_else(tie):
    model = _model(tie)
    params = _params(model)
    for grouping in ("untied", "tied"):
        counts = {n: torch.zeros_like(p) for n, p in params.items()}
        for fam in model.groups(grouping):
            for name in fam.params:
                counts[name] += fam.broadcast(torch.ones(fam.size), name, params[name])
        for name, c in counts.items():
            in_lstm_matrix = "weight_" in name
            assert torch.equal(c, torch.full_like(c, 2.0 if in_lstm_matrix else 0.0)), (grouping, name)


@pytest.mark.parametrize("grouping", LSTMLM.groupings)
@pytest.mark.parametrize("tie", [False, True])
def test_group_lasso_gradient_over_each_grouping_matches_autograd(grouping, tie):
    model = _model(tie)
    params = {n: p.double() for n, p in _params(model).items()}
    prior = GroupLasso(model.groups(grouping), lam=0.01)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    prior.neg_log_prob(leaves).backward()
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    prior.add_grad_(grads, params, num_data=1)
    for n, leaf in leaves.items():
        expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        torch.testing.assert_close(grads[n], expected, msg=n)


def test_groups_default_to_the_configured_grouping_and_unit_groups_are_iss():
    torch.manual_seed(0)
    model = LSTMLM(VOCAB, [8, 7], 6, grouping="tied")
    assert [f.name for f in model.groups()] == [f.name for f in model.groups("tied")]
    assert [f.name for f in model.unit_groups()] == ["input", "layer0", "layer1"]
    assert [f.name for f in _model(True).unit_groups()] == ["layer0", "layer1"]
    with pytest.raises(ValueError, match="groupings"):
        model.groups("blocks")


# ----- construction ----------------------------------------------------------------------------

def test_presets_resolve_zaremba_hidden_dropout_and_init_and_overrides_win():
    torch.manual_seed(0)
    small = LSTMLM.from_config(LSTMLM.Config(), {"vocab": VOCAB})
    assert (small.hidden, small.emb, small.dropout, small.init_scale) == ([200, 200], 200, 0.0, 0.1)
    assert not small.tie and small.grouping == "iss" and small.drop.p == 0.0
    largest = max(p.abs().max() for p in small.parameters())
    assert 0.09 < largest <= 0.1  # uniform(-0.1, 0.1) on every weight and bias
    for size, hidden, dropout, init in (("medium", 650, 0.5, 0.05), ("large", 1500, 0.65, 0.04)):
        model = LSTMLM.from_config(LSTMLM.Config(size=size, layers=1), {"vocab": VOCAB})
        assert (model.hidden, model.dropout, model.init_scale) == ([hidden], dropout, init)
        assert max(p.abs().max() for p in model.parameters()) <= init
    cfg = LSTMLM.Config(size="large", hidden=10, layers=3, dropout=0.2, init_scale=0.3, tie_embeddings=True,
                        grouping="untied")
    model = LSTMLM.from_config(cfg, {"vocab": VOCAB})
    assert (model.hidden, model.emb, model.dropout, model.init_scale) == ([10, 10, 10], 10, 0.2, 0.3)
    assert model.tie and model.grouping == "untied"
    assert model.decoder.weight is model.embedding.weight
    assert "decoder.weight" not in dict(model.named_parameters())


@pytest.mark.parametrize("change,match", [
    ({"size": "huge"}, "model.size must be one of"),
    ({"layers": 0}, "model.layers must be an int >= 1"),
    ({"dropout": 1.0}, r"model.dropout must lie in \[0, 1\)"),
    ({"hidden": -5}, "model.hidden"),
    ({"init_scale": -0.1}, "model.init_scale"),
    ({"grouping": "rows"}, "model.grouping must be one of"),
    ({"softmax_block": [100, 1]}, "model.softmax_block needs model.block_softmax = true"),
    ({"softmax_block": [0, 1], "block_softmax": True}, r"model.softmax_block must be \[\]"),
])
def test_bad_config_values_are_rejected_naming_the_key_and_allowed_values(change, match):
    with pytest.raises(ValueError, match=match):
        LSTMLM.from_config(LSTMLM.Config(**change), {"vocab": VOCAB})


def test_missing_vocab_and_untieable_widths_are_rejected():
    with pytest.raises(ValueError, match="vocab"):
        LSTMLM.from_config(LSTMLM.Config(hidden=8), {})
    with pytest.raises(ValueError, match="emb == hidden"):
        LSTMLM(VOCAB, [8, 7], 6, tie=True)


def test_forward_returns_logits_and_per_layer_state_and_none_state_means_zeros():
    model = _model(False, hidden=(8, 7))
    torch.manual_seed(1)
    tokens = torch.randint(VOCAB, (3, 5))
    logits, state = model(tokens)
    assert logits.shape == (3, 5, VOCAB)
    assert [tuple(h.shape) for h, _ in state] == [(1, 3, 8), (1, 3, 7)]
    again, _ = model(tokens, model.init_state(3, torch.device("cpu")))
    torch.testing.assert_close(again, logits)


def test_dropout_is_active_in_training_mode_only():
    model = _model(False, dropout=0.5)
    torch.manual_seed(1)
    tokens = torch.randint(VOCAB, (2, 6))
    assert torch.equal(model(tokens)[0], model(tokens)[0])
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])


def test_prunable_weights_are_the_lstm_matrices_and_the_softmax_weight():
    lstm = ["lstms.0.weight_ih_l0", "lstms.0.weight_hh_l0", "lstms.1.weight_ih_l0", "lstms.1.weight_hh_l0"]
    assert list(_model(False).prunable_weights()) == lstm + ["decoder.weight"]
    tied = _model(True)
    assert list(tied.prunable_weights()) == lstm + ["embedding.weight"]
    assert tied.prunable_weights()["embedding.weight"] is tied.decoder.weight


@pytest.mark.parametrize("tie", [False, True])
def test_spec_and_state_dict_rebuild_identical_outputs_and_load_with_weights_only(tie, tmp_path):
    model = _model(tie)
    torch.manual_seed(2)
    model = model.shrink(_random_keep(model))  # per-layer hidden sizes differ
    spec = model.spec()
    assert spec["kind"] == "lstm_lm" and spec["hidden"] == model.hidden and spec["tie"] is tie
    assert all(isinstance(v, (str, int, float, bool, list)) for v in spec.values())
    tokens = torch.randint(VOCAB, (2, 8))
    expected, _ = _run(model, tokens)
    again = registry.from_spec(spec, model.state_dict()).eval()
    torch.testing.assert_close(_run(again, tokens)[0], expected, atol=0, rtol=0)
    torch.save({"spec": spec, "state_dict": model.state_dict()}, tmp_path / "member.pt")
    blob = torch.load(tmp_path / "member.pt", weights_only=True)
    loaded = registry.from_spec(blob["spec"], blob["state_dict"]).eval()
    torch.testing.assert_close(_run(loaded, tokens)[0], expected, atol=0, rtol=0)
    assert (loaded.decoder.weight is loaded.embedding.weight) is tie


# ----- cost ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_cost_of_a_dense_model_equals_the_hand_count(tie):
    model = _model(tie, hidden=(8, 6), emb=5)
    widths = [model.emb, 8, 6]
    matmul = sum(4 * n * i + 4 * n * n for i, n in zip(widths[:-1], widths[1:])) + VOCAB * 6
    biases = sum(2 * 4 * n for n in widths[1:]) + VOCAB
    assert model.cost() == {"params": matmul + biases, "flops": 2 * matmul, "nonzero_macs": matmul}


def test_cost_counts_flops_by_the_smallest_submatrix_holding_the_nonzeros():
    model = _model(False, hidden=(8, 6), emb=5)
    dense = model.cost()
    with torch.no_grad():
        model.decoder.weight[:, :2] = 0  # 2 of 6 columns gone: sub-matrix 50 x 4
        model.decoder.weight[7, 3] = 0  # a lone zero changes MACs, not the sub-matrix
    cost = model.cost()
    assert dense["flops"] - cost["flops"] == 2 * VOCAB * 2
    assert dense["nonzero_macs"] - cost["nonzero_macs"] == 2 * VOCAB + 1
    assert dense["params"] - cost["params"] == 2 * VOCAB + 1


def test_cost_raises_on_a_submodule_the_kind_does_not_know():
    model = _model(False)
    model.extra = nn.Conv1d(2, 2, 1)
    with pytest.raises(ValueError, match="extra"):
        model.cost()


# ----- live units and shrinking ----------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_shrunk_model_equals_masked_model_over_segments_with_carried_state(tie):
    model = _model(tie)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    torch.manual_seed(3)
    keep = _random_keep(model)
    masked, small = _masked(model, keep), model.shrink(keep)
    units = keep[-2:]
    assert small.hidden == [int(k.sum()) for k in units]
    assert small.emb == int((units[-1] if tie else keep[0]).sum())
    assert (small.decoder.weight is small.embedding.weight) is tie and not small.training
    tokens = torch.randint(VOCAB, (3, 12))
    (masked_logits, masked_states), (small_logits, small_states) = _run(masked, tokens, 3), _run(small, tokens, 3)
    torch.testing.assert_close(small_logits, masked_logits, atol=1e-5, rtol=0)
    for masked_state, small_state in zip(masked_states, small_states):
        for k, (hm, cm), (hs, cs) in zip(units, masked_state, small_state):
            torch.testing.assert_close(hs, hm[..., k], atol=1e-5, rtol=0)
            torch.testing.assert_close(cs, cm[..., k], atol=1e-5, rtol=0)
    for n, t in model.state_dict().items():  # shrinking leaves the model itself alone
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("tie", [False, True])
def test_live_units_find_exactly_the_unread_units_and_shrinking_to_them_keeps_the_function(tie):
    model = _model(tie)
    n0, n1 = model.hidden
    with torch.no_grad():
        model.lstms[0].weight_hh_l0[:, 2] = 0  # layer-0 unit 2: read by nobody
        model.lstms[1].weight_ih_l0[:, 2] = 0
        model.lstms[1].weight_hh_l0[:, 4] = 0  # layer-1 unit 4: read by nobody
        model.decoder.weight[:, 4] = 0  # (with SE also embedding feature 4)
        model.lstms[0].weight_ih_l0[5::n0] = 0  # layer-0 unit 5 reads nothing, but is read:
        model.lstms[0].weight_hh_l0[5::n0] = 0  # its cell still evolves from the biases
        model.lstms[1].weight_hh_l0[:, 1] = 0  # layer-1 unit 1: read by the softmax only
        model.lstms[1].weight_ih_l0[:, 6] = 0  # layer-0 unit 6: read by its own layer only
        if not tie:
            model.embedding.weight[:, 1] = 0  # feature 1: zero everywhere
            model.lstms[0].weight_ih_l0[:, 3] = 0  # feature 3: read by nobody
    live = model.live_units()
    expected = [torch.ones(n0, dtype=torch.bool), torch.ones(n1, dtype=torch.bool)]
    expected[0][2] = expected[1][4] = False
    if not tie:
        features = torch.ones(model.emb, dtype=torch.bool)
        features[[1, 3]] = False
        expected.insert(0, features)
    assert [k.tolist() for k in live] == [k.tolist() for k in expected]
    small = model.shrink(live)
    assert small.hidden == [n0 - 1, n1 - 1]
    torch.manual_seed(4)
    tokens = torch.randint(VOCAB, (2, 10))
    torch.testing.assert_close(_run(small, tokens)[0], _run(model, tokens)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_iss_group_masks_then_live_units_shrink_to_the_kept_sizes_with_the_masked_cost(tie):
    model = _model(tie)  # hidden 8, 7; emb 6 (untied) or 7 (tied)
    keep = [5, 3] if tie else [4, 5, 3]
    masks = group_masks(dict(model.named_parameters()), model.groups("iss"), keep=keep)
    apply_masks(model, masks)
    small = model.shrink(model.live_units())
    assert small.hidden == keep[-2:] and small.emb == (keep[-1] if tie else keep[0])
    torch.manual_seed(5)
    tokens = torch.randint(VOCAB, (2, 10))
    torch.testing.assert_close(_run(small, tokens)[0], _run(model, tokens)[0], atol=1e-5, rtol=0)
    masked_cost, small_cost = model.cost(), small.cost()
    assert small_cost["flops"] == masked_cost["flops"]
    assert small_cost["nonzero_macs"] == masked_cost["nonzero_macs"]
    # the masked model still holds the biases of its removed units (two biases x four gates each),
    # which nothing reads; the groups, as in the papers, hold weights only
    removed_units = (8 - keep[-2]) + (7 - keep[-1])
    assert small_cost["params"] == masked_cost["params"] - 8 * removed_units


def test_shrink_rejects_wrong_keep_vectors():
    model = _model(False)
    keep = [torch.ones(f.size, dtype=torch.bool) for f in model.unit_groups()]
    with pytest.raises(ValueError, match="3 keep vectors"):
        model.shrink(keep[:2])
    keep[1] = torch.zeros(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="no units"):
        model.shrink(keep)
    keep[1] = torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        model.shrink(keep)


@pytest.mark.parametrize("tie", [False, True])
def test_iss_member_flops_equal_the_hand_count_of_its_kept_units(tie):
    """Untied: keep input features {0, 1, 3} of 5, units {0, 2, 5} of layer 0 (8) and {1, 4} of
    layer 1 (6). Per token, by the sub-matrix rule: layer 0 reads 3 features and 3 recurrent units
    into 4 x 3 gate rows, layer 1 reads 3 + 2 into 4 x 2 rows, the softmax reads 2 units for 50
    words. Tied: the embedding width is layer 1's, so layer 0 reads the 2 kept layer-1 units."""
    model = _model(tie, hidden=(8, 6), emb=5)
    keep0, keep1 = torch.zeros(8, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
    keep0[[0, 2, 5]], keep1[[1, 4]] = True, True
    keep = [keep0, keep1]
    if not tie:
        features = torch.zeros(5, dtype=torch.bool)
        features[[0, 1, 3]] = True
        keep = [features] + keep
    inputs = 2 if tie else 3
    macs = (4 * 3 * inputs + 4 * 3 * 3) + (4 * 2 * 3 + 4 * 2 * 2) + VOCAB * 2
    apply_masks(model, keep_masks(dict(model.named_parameters()), model.groups("iss"), keep))
    small = model.shrink(model.live_units())
    assert small.hidden == [3, 2] and small.emb == inputs
    assert small.cost()["flops"] == model.cost()["flops"] == 2 * macs
    assert small.cost()["nonzero_macs"] == macs
