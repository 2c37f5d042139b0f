"""Group families: coverage, overlap counted once, broadcast, gradients and masks with stacked gates."""
import pytest
import torch

from sparse_ensembles.priors import GroupLasso
from sparse_ensembles.pruning import group_masks
from sparse_ensembles.structure import Part, SliceFamily, TileFamily, norms


def _iss_family(n=3, inp=2):
    """One LSTM layer's ISS groups: unit k = rows k, n+k, 2n+k, 3n+k of both gate matrices, plus
    column k of the recurrent matrix (the entries in both count once)."""
    return SliceFamily("units", n, (Part("w_ih", 0, stack=4), Part("w_hh", 0, stack=4), Part("w_hh", 1)))


def _params(n=3, inp=2):
    g = torch.Generator().manual_seed(0)
    return {"w_ih": torch.randn(4 * n, inp, generator=g), "w_hh": torch.randn(4 * n, n, generator=g)}


def _owner_sets(n=3):
    """Reference by enumeration: the (param, index) entries of each ISS group."""
    groups = []
    for k in range(n):
        entries = {("w_ih", r, c) for r in range(k, 4 * n, n) for c in range(2)}
        entries |= {("w_hh", r, c) for r in range(k, 4 * n, n) for c in range(n)}
        entries |= {("w_hh", r, k) for r in range(4 * n)}
        groups.append(entries)
    return groups


def test_iss_group_with_rows_and_recurrent_column_counts_each_entry_once():
    fam, params = _iss_family(), _params()
    ref = _owner_sets()
    assert fam.group_dim(params) == len(ref[0]) == 4 * 2 + 4 * 3 + 4 * 3 - 4
    expected = torch.stack([sum(params[p][r, c] ** 2 for p, r, c in entries) for entries in ref])
    torch.testing.assert_close(fam.sq_norms(params), expected)


def test_iss_broadcast_sums_distinct_groups_and_keep_is_the_and_of_them():
    fam, params = _iss_family(), _params()
    values = torch.tensor([1.0, 10.0, 100.0])
    keep = torch.tensor([True, False, True])
    ref = _owner_sets()
    for name in ("w_ih", "w_hh"):
        got = fam.broadcast(values, name, params[name])
        got_keep = fam.broadcast_keep(keep, name, params[name])
        for r in range(params[name].shape[0]):
            for c in range(params[name].shape[1]):
                owners = [k for k, e in enumerate(ref) if (name, r, c) in e]
                assert got[r, c] == sum(values[k] for k in owners)
                assert bool(got_keep[r, c]) == all(keep[k] for k in owners)


def test_group_lasso_gradient_over_overlapping_iss_groups_matches_autograd():
    fam, params = _iss_family(), _params()
    prior = GroupLasso([fam], lam=0.3)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    prior.neg_log_prob(leaves).backward()
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    prior.add_grad_(grads, params, num_data=7)
    for n in params:
        torch.testing.assert_close(grads[n], leaves[n].grad / 7)


def test_group_masks_on_stacked_gates_remove_a_unit_in_all_four_gates_and_its_column():
    fam, params = _iss_family(), _params()
    params["w_hh"][:, 1] *= 1e-3  # unit 1 is weak: its rows and its column
    params["w_ih"][1::3] *= 1e-3
    params["w_hh"][1::3] *= 1e-3
    masks = group_masks(params, [fam], keep=[2])
    assert not masks["w_ih"][1::3].any() and masks["w_ih"][0::3].all()
    assert not masks["w_hh"][1::3].any() and not masks["w_hh"][:, 1].any()
    assert int(masks["w_hh"].sum()) == (4 * 3 * 3) - 4 * 3 - 4 * 2


def test_tile_family_rows_columns_and_blocks_cover_the_matrix_exactly_once():
    w = torch.arange(24.0).reshape(4, 6)
    for tile, size in (((1, 6), 4), ((4, 1), 6), ((2, 3), 4)):
        fam = TileFamily("t", "w", (4, 6), tile)
        assert fam.size == size and fam.group_dim({"w": w}) * fam.size == w.numel()
        assert torch.isclose(fam.sq_norms({"w": w}).sum(), w.pow(2).sum())
        ids = fam.broadcast(torch.arange(float(size)), "w", w)
        assert sorted(torch.bincount(ids.long().flatten()).tolist()) == [w.numel() // size] * size
    rows = TileFamily("rows", "w", (4, 6), (1, 6))
    torch.testing.assert_close(norms(rows, {"w": w}), w.norm(dim=1))
    with pytest.raises(ValueError, match="must be positive"):
        TileFamily("bad", "w", (4, 6), (0, 3))


def test_tiles_that_do_not_divide_the_matrix_cover_it_exactly_once_with_smaller_edge_tiles():
    torch.manual_seed(0)
    w = torch.randn(7, 10)
    fam = TileFamily("b", "w", (7, 10), (3, 4))
    assert fam.grid == (3, 3) and fam.size == 9
    ids = fam.broadcast(torch.arange(9.0), "w", w)
    counts = torch.bincount(ids.long().flatten(), minlength=9).reshape(3, 3)
    # rows 3, 3, 1 and columns 4, 4, 2
    assert counts.tolist() == [[12, 12, 6], [12, 12, 6], [4, 4, 2]]
    torch.testing.assert_close(fam.sq_norms({"w": w}).sum(), w.pow(2).sum())
    torch.testing.assert_close(fam.sq_norms({"w": w})[8], w[6:, 8:].pow(2).sum())
    keep = torch.ones(9, dtype=torch.bool)
    keep[8] = False
    mask = fam.broadcast_keep(keep, "w", w)
    assert not mask[6:, 8:].any() and int(mask.sum()) == 70 - 2


def test_a_parameter_covered_twice_along_the_same_dimension_is_rejected():
    with pytest.raises(ValueError, match="covered by 2 parts"):
        SliceFamily("bad", 3, (Part("w", 0), Part("w", 0, stack=4)))


@pytest.mark.parametrize("shape,dim,stack", [((12, 20), 0, 1), ((12, 20), 1, 1), ((12, 20), 0, 4), ((12, 20), 1, 5),
                                             ((6, 4, 3, 3), 0, 1), ((6, 4, 3, 3), 1, 2), ((8, 5, 1, 1), 1, 1), ((7,), 0, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "chains"])
def test_group_norms_equal_their_definition_for_rows_columns_stacks_convs_and_strided_or_vmapped_tensors(
        shape, dim, stack, layout):
    """The fused path (a norm over the dims contiguous in memory) and the square-and-sum path give
    the definition: group k of a part along ``dim`` is slice k of every one of the ``stack`` blocks."""
    torch.manual_seed(0)
    size = shape[dim] // stack
    fam = SliceFamily("f", size, (Part("w", dim, stack),))

    def definition(w):
        blocks = w.movedim(dim, 0).reshape(stack, size, -1)
        return (blocks ** 2).sum(dim=(0, 2))

    if layout == "chains":  # as the vectorised sampler calls it: vmapped over a leading chain dim
        w = torch.randn(3, *shape)
        got = torch.func.vmap(lambda t: fam.sq_norms({"w": t}))(w)
        want = torch.stack([definition(t) for t in w])
    else:
        w = torch.randn(*shape)
        if layout == "transposed" and w.dim() >= 2:  # the same values in a column-major view
            w = w.t().contiguous().t() if w.dim() == 2 else w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
        got, want = fam.sq_norms({"w": w}), definition(w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
