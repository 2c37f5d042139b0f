import re
from pathlib import Path

import torch

from sparse_ensembles.compact import CompactMLP
from sparse_ensembles.metrics import nonzero_params


def test_readme_library_snippet_runs_and_builds_a_shrunk_ensemble(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- snippet:library -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    members, ensemble, x = scope["members"], scope["ensemble"], scope["x"]
    assert len(members) == 3 and all(isinstance(m, CompactMLP) for m in members)
    dense = 784 * 100 + 100 + 100 * 10 + 10
    assert all(m.widths[-1] == 10 and nonzero_params(m) < 0.15 * dense for m in members)
    probs = ensemble(x[:5]).exp().sum(-1)
    torch.testing.assert_close(probs, torch.ones(5))


def test_readme_block_snippet_runs_a_pruned_lstm_on_the_block_sparse_layer_and_keeps_blocks_at_zero(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- snippet:block -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 25
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    layer, lstm, x, masks = scope["layer"], scope["lstm"], scope["x"], scope["masks"]
    assert abs(float(layer.density()) - 0.2) < 0.02
    for name, keep in masks.items():  # the step kept pruned blocks at exactly zero
        w = getattr(layer, name).detach()
        assert torch.equal(w[~keep], torch.zeros(int((~keep).sum())))
    with torch.no_grad():  # the block-sparse layer computes what nn.LSTM computes with those weights
        lstm.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("keep")})
        torch.testing.assert_close(layer(x)[0], lstm(x)[0], atol=1e-5, rtol=1e-5)


def test_readme_fit_snippet_runs_and_reloads_the_chosen_ensemble(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- snippet:fit -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)  # the snippet writes runs/ where it runs
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ens, logp, x = scope["ens"], scope["logp"], scope["x"]
    assert "<- chosen" in capsys.readouterr().out
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(ens(x[:5]), logp)  # the reloaded ensemble computes what was saved
    assert ens.chosen["params_ratio"] <= 1.0
