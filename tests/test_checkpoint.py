"""Crash-safe writes and device-independent members."""
import pytest
import torch

from sparse_ensembles import checkpoint
from sparse_ensembles.models import MLP


def test_a_write_that_fails_midway_leaves_the_old_file_intact_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "member.pt"
    checkpoint.atomic_save({"v": torch.ones(3)}, path)

    def crash(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"v": torch.zeros(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member.pt"]
    assert torch.equal(checkpoint.load(path)["v"], torch.ones(3))


def test_json_and_text_writes_are_atomic_too(tmp_path, monkeypatch):
    path = tmp_path / "done.json"
    checkpoint.atomic_write_json(path, {"a": 1})
    monkeypatch.setattr(type(path), "write_text", lambda self, text: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        checkpoint.atomic_write_json(path, {"a": 2})
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert len(list(tmp_path.iterdir())) == 1


def test_member_saved_from_any_device_reloads_through_the_registry_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MLP([6, 5, 3]).eval()
    checkpoint.save_member(tmp_path / "m.pt", model, note="x")
    again, meta = checkpoint.load_member(tmp_path / "m.pt")
    x = torch.rand(4, 6)
    assert isinstance(again, MLP) and meta == {"note": "x"}
    assert torch.equal(again(x), model(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_member_saved_on_cuda_is_stored_as_cpu_tensors_and_loads_on_cpu(tmp_path):
    model = MLP([6, 5, 3]).cuda().eval()
    checkpoint.save_member(tmp_path / "m.pt", model)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in blob["state_dict"].values())
    again, _ = checkpoint.load_member(tmp_path / "m.pt", "cpu")
    x = torch.rand(4, 6)
    torch.testing.assert_close(again(x), model(x.cuda()).cpu())


def test_loading_a_missing_or_foreign_file_is_a_run_file_error_with_path_cause_and_fix(tmp_path):
    from sparse_ensembles.checkpoint import RunFileError, load, load_member, read_json
    with pytest.raises(RunFileError, match="the file is missing; delete it and run") as e:
        load_member(tmp_path / "member_000.pt")
    assert e.value.path == tmp_path / "member_000.pt"
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(RunFileError, match="holds a list, not the dict"):
        load(tmp_path / "list.pt")
    torch.save({"spec": {"kind": "no_such_kind"}, "state_dict": {}}, tmp_path / "alien.pt")
    with pytest.raises(RunFileError, match="do not build a model"):
        load_member(tmp_path / "alien.pt")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RunFileError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    assert read_json(tmp_path / "absent.json", default=[]) == []
