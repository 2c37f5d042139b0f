"""Block-sparse LSTM (compact.block_lstm): numba kernels against torch, forward and backward against
autograd through nn.LSTM with the pruned blocks zeroed."""
import pytest
import torch
from torch import nn

from sparse_ensembles.compact import block_lstm as bl
from sparse_ensembles.compact.block_lstm import BlockSparseLSTM, block_keep_from_weight, expand_keep

# (input, hidden, block, batch, steps): whole blocks, and shapes that blocks do not divide
CASES = [(64, 64, (32, 32), 5, 4), (48, 40, (16, 16), 6, 3), (40, 48, (32, 1), 5, 3), (37, 50, (16, 16), 3, 5),
         (33, 40, (5, 3), 2, 3), (64, 70, (32, 32), 17, 4)]
IDS = ["32x32", "16x16", "32x1", "16x16_nondivisible_h50_in37", "5x3_odd",
       "32x32_batch17_h70"]  # 8-row, 4-row and single-row tiles; 68 input rows = two panels; an edge block row
EXECUTORS = ["numba", "numba_parallel"]


@pytest.fixture
def two_numba_threads():
    """The parallel paths run where numba has more than one thread (restored afterwards)."""
    import numba
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield numba.get_num_threads()
    numba.set_num_threads(old)


def _skip_single_thread(executor, threads):
    if executor == "numba_parallel" and threads < 2:
        pytest.skip("numba has one thread here: numba_parallel would run the serial loop")


def _random_keep(shape, block, density, g):
    bh, bw = block
    return torch.rand(-(-shape[0] // bh), -(-shape[1] // bw), generator=g) < density


def _pair(inp, hidden, block, density=0.5, seed=0, executor="numba"):
    """A BlockSparseLSTM (numba) and the nn.LSTM with the same weights, pruned blocks zeroed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lstm = nn.LSTM(inp, hidden, batch_first=True)
    k_ih = _random_keep((4 * hidden, inp), block, density, g)
    k_hh = _random_keep((4 * hidden, hidden), block, density, g)
    m = BlockSparseLSTM.from_lstm(lstm, block, k_ih, k_hh, executor=executor)
    ref = nn.LSTM(inp, hidden, batch_first=True)
    w_ih, w_hh = m.masked_weights()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(w_ih)
        ref.weight_hh_l0.copy_(w_hh)
        ref.bias_ih_l0.copy_(lstm.bias_ih_l0)
        ref.bias_hh_l0.copy_(lstm.bias_hh_l0)
    return m, ref


def _inputs(batch, steps, inp, hidden, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, inp, generator=g).requires_grad_()
    h0 = torch.randn(1, batch, hidden, generator=g).requires_grad_()
    c0 = torch.randn(1, batch, hidden, generator=g).requires_grad_()
    return x, h0, c0


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("inp,hidden,block,batch,steps", CASES, ids=IDS)
def test_forward_outputs_and_states_equal_masked_nn_lstm(inp, hidden, block, batch, steps, executor, two_numba_threads):
    _skip_single_thread(executor, two_numba_threads)
    m, ref = _pair(inp, hidden, block, executor=executor)
    x, h0, c0 = _inputs(batch, steps, inp, hidden)
    out, (h, c) = m(x, (h0, c0))
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    assert out.shape == out_r.shape and h.shape == h_r.shape and c.shape == c_r.shape
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-5, rtol=0)
    out0, (h0_, _) = m(x)  # zero initial state by default
    torch.testing.assert_close(out0, ref(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("inp,hidden,block,batch,steps", CASES, ids=IDS)
def test_gradients_equal_autograd_through_masked_nn_lstm_and_zero_on_pruned_blocks(inp, hidden, block, batch, steps,
                                                                                   executor, two_numba_threads):
    _skip_single_thread(executor, two_numba_threads)
    m, ref = _pair(inp, hidden, block, executor=executor)
    x, h0, c0 = _inputs(batch, steps, inp, hidden)
    g = torch.Generator().manual_seed(2)
    out, (h, c) = m(x, (h0, c0))
    w_out, w_h, w_c = (torch.randn(t.shape, generator=g) for t in (out, h, c))
    params = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0]
    grads = torch.autograd.grad((out * w_out).sum() + (h * w_h).sum() + (c * w_c).sum(), [x, h0, c0, *params])
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    params_r = [ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0]
    grads_r = torch.autograd.grad((out_r * w_out).sum() + (h_r * w_h).sum() + (c_r * w_c).sum(), [x, h0, c0, *params_r])
    for name, a, b in zip(["x", "h0", "c0", "b_ih", "b_hh"], grads[:3] + grads[5:], grads_r[:3] + grads_r[5:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"gradient wrt {name}")
    for name, gw, gw_r, keep in (("W_ih", grads[3], grads_r[3], m.keep_ih), ("W_hh", grads[4], grads_r[4], m.keep_hh)):
        mask = expand_keep(keep, gw.shape, block)
        assert gw.shape == gw_r.shape
        torch.testing.assert_close(gw[mask], gw_r[mask], atol=1e-5, rtol=0, msg=f"gradient wrt {name} on kept blocks")
        assert (gw[~mask] == 0).all(), f"gradient wrt {name} nonzero on a pruned block"


@pytest.mark.parametrize("block", [(32, 32), (16, 16), (32, 1), (1, 32), (5, 3)])
@pytest.mark.parametrize("rows", [1, 5, 20, 107])  # 107: 8-row tiles, three panels, leftovers
def test_product_kernels_equal_torch_matmuls(block, rows, two_numba_threads):
    g = torch.Generator().manual_seed(3)
    R, C = 100, 70  # not multiples of any block
    W = torch.randn(R, C, generator=g)
    keep = _random_keep((R, C), block, 0.4, g)
    Wm = W * expand_keep(keep, W.shape, block)
    X = torch.randn(rows, C, generator=g)
    b = torch.randn(R, generator=g)
    lay = bl.block_layout(keep, (R, C), block)
    data = bl.gather_blocks(lay, W)
    for parallel in (False, True):
        torch.testing.assert_close(bl.block_matmul(lay, data, X, parallel=parallel), X @ Wm.t(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(bl.block_matmul(lay, data, X, b, parallel=parallel), X @ Wm.t() + b,
                                   atol=1e-4, rtol=1e-5)
    # the transposed product dX = dY @ W through the layout of W^T
    lay_t = lay.transposed(keep)
    dY = torch.randn(rows, R, generator=g)
    torch.testing.assert_close(bl.block_matmul(lay_t, bl.gather_blocks(lay_t, W.t()), dY), dY @ Wm, atol=1e-4, rtol=1e-5)
    # the kept-block gradient dY^T X
    dW = bl.block_grad(lay, dY, X)
    mask = expand_keep(keep, W.shape, block)
    torch.testing.assert_close(dW, (dY.t() @ X) * mask, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kept", [False, True], ids=["all_pruned", "all_kept"])
def test_all_pruned_and_all_kept_matrices(kept):
    inp, hidden, block = 20, 24, (16, 16)
    lstm = nn.LSTM(inp, hidden, batch_first=True)
    k_ih = torch.full((-(-4 * hidden // 16), -(-inp // 16)), kept)
    k_hh = torch.full((-(-4 * hidden // 16), -(-hidden // 16)), kept)
    m = BlockSparseLSTM.from_lstm(lstm, block, k_ih, k_hh, executor="numba")
    ref = nn.LSTM(inp, hidden, batch_first=True)
    ref.load_state_dict(lstm.state_dict())
    if not kept:
        with torch.no_grad():
            ref.weight_ih_l0.zero_()
            ref.weight_hh_l0.zero_()
    x, h0, c0 = _inputs(3, 4, inp, hidden)
    out, (h, c) = m(x, (h0, c0))
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-5, rtol=0)
    gx, gw = torch.autograd.grad(out.sum(), [x, m.weight_hh_l0])
    gx_r, gw_r = torch.autograd.grad(out_r.sum(), [x, ref.weight_hh_l0])
    torch.testing.assert_close(gx, gx_r, atol=1e-5, rtol=0)
    if kept:
        torch.testing.assert_close(gw, gw_r, atol=1e-5, rtol=0)
    else:
        assert (gw == 0).all() and (gx == 0).all()


def test_keep_from_weight_finds_blocks_with_any_nonzero_and_from_lstm_uses_it():
    lstm = nn.LSTM(40, 24, batch_first=True)
    with torch.no_grad():
        lstm.weight_hh_l0[:16, :16] = 0  # block (0, 0) pruned
        lstm.weight_hh_l0[16:32, 16:] = 0  # edge block (1, 1) (16 x 8) pruned
        lstm.weight_hh_l0[32:48, 16:] = 0
        lstm.weight_hh_l0[40, 20] = 1.0  # ... but one nonzero keeps block (2, 1)
    keep = block_keep_from_weight(lstm.weight_hh_l0, (16, 16))
    assert keep.shape == (6, 2)
    assert not keep[0, 0] and not keep[1, 1] and keep[2, 1] and keep.sum() == 10
    m = BlockSparseLSTM.from_lstm(lstm, (16, 16), executor="numba")
    assert torch.equal(m.keep_hh, keep) and bool(m.keep_ih.all())
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(m(x)[0], lstm(x)[0], atol=1e-5, rtol=0)


def test_dense_and_bsr_executors_match_numba(two_numba_threads):
    m, ref = _pair(30, 32, (16, 16), density=0.4)
    x, h0, c0 = _inputs(4, 5, 30, 32)
    with torch.no_grad():
        expect = ref(x, (h0, c0))
        for ex in ("dense", "bsr", "numba", "numba_parallel"):
            m.executor = ex
            out, (h, c) = m(x, (h0, c0))
            torch.testing.assert_close(out, expect[0], atol=1e-5, rtol=0, msg=ex)
            torch.testing.assert_close(c, expect[1][1], atol=1e-5, rtol=0, msg=ex)


def test_auto_executor_returns_a_candidate_and_caches_it_per_shape():
    bl._AUTO_CACHE.clear()
    choice = bl.choose_executor(16, 16, 2, steps=3, block=(16, 16), density=0.5, threads=1, training=False, repeats=1)
    assert choice in ("numba", "numba_parallel", "dense", "bsr")
    assert list(bl._AUTO_CACHE.values()) == [choice]
    assert bl.choose_executor(16, 16, 2, steps=3, block=(16, 16), density=0.5, threads=1, training=False) == choice
    m, ref = _pair(16, 16, (16, 16))
    m.executor = "auto"
    x, h0, c0 = _inputs(2, 3, 16, 16)
    torch.testing.assert_close(m(x, (h0, c0))[0], ref(x, (h0, c0))[0], atol=1e-5, rtol=0)


def test_bad_dtype_or_device_raises_a_clear_error():
    m, _ = _pair(16, 16, (16, 16))
    with pytest.raises(ValueError, match="float32 tensors on CPU"):
        m(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="nn.LSTM"):
        m(torch.randn(2, 3, 16, device="meta"))
    with pytest.raises(ValueError, match="keep masks"):
        BlockSparseLSTM(16, 16, (16, 16), keep_ih=torch.ones(3, 3, dtype=torch.bool))


def test_bias_gradients_are_separate_tensors_so_in_place_clipping_touches_each_once():
    m, ref = _pair(16, 16, (16, 16))
    x, h0, c0 = _inputs(2, 3, 16, 16)
    m(x, (h0, c0))[0].sum().backward()
    ref(x, (h0, c0))[0].sum().backward()
    assert m.bias_ih_l0.grad.data_ptr() != m.bias_hh_l0.grad.data_ptr()
    with torch.no_grad():  # the dense reference has gradients on its zeroed blocks; the pruned layer has none
        for name in ("weight_ih_l0", "weight_hh_l0"):
            keep = expand_keep(getattr(m, "keep_" + name[7:9]), getattr(m, name).shape, m.block)
            getattr(ref, name).grad.mul_(keep)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    torch.testing.assert_close(m.bias_hh_l0.grad, ref.bias_hh_l0.grad, atol=1e-6, rtol=0)
