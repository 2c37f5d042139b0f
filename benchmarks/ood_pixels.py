"""Is the MNIST sparse ensemble's weaker OOD detection (MNIST in, Fashion-MNIST out) caused by the
input pixels the group prior removes? One SGD network of ``runs/mnist_uncertainty`` is scored as
trained, with the first-layer weights of the pixels blank in every MNIST training image zeroed,
and seeing only the pixels a sparse member keeps (its ``input_index``). AUROC by predictive
entropy on the test sets. Needs ``runs/mnist_uncertainty`` (benchmarks/distill_uncertainty.py).

    python benchmarks/ood_pixels.py        # seconds; benchmarks/results/ood_pixels.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import write  # noqa: E402

from sparse_ensembles import checkpoint, uncertainty as U  # noqa: E402
from sparse_ensembles.data import load_idx_dataset  # noqa: E402

RUN = Path(__file__).resolve().parents[1] / "runs" / "mnist_uncertainty"


def flat(x):
    return x.reshape(len(x), -1).float()


@torch.no_grad()
def scores(model, x_in, y_in, x_out) -> dict:
    logits = model(x_in)
    h_in = U.predictive_entropy(torch.log_softmax(logits, -1))
    h_out = U.predictive_entropy(torch.log_softmax(model(x_out), -1))
    return {"ood_auroc": U.ood_metrics(h_in, h_out)["auroc"], "error": float((logits.argmax(1) != y_in).float().mean())}


@torch.no_grad()
def with_pixels(keep: torch.Tensor) -> torch.nn.Module:
    """The SGD network with the first-layer weights of the pixels outside ``keep`` zeroed."""
    model, _ = checkpoint.load_member(RUN / "sgd" / "member_000.pt", "cpu")
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    first.weight[:, ~keep] = 0
    return model


def main():
    torch.set_num_threads(1)
    x_train, _, x_test, y_test = load_idx_dataset("mnist")
    _, _, x_ood, _ = load_idx_dataset("fashion-mnist")
    x_train, x_test, x_ood = flat(x_train)[:50000], flat(x_test), flat(x_ood)  # the 50,000 training images
    blank = x_train.abs().amax(0) == 0
    sparse_member, _ = checkpoint.load_member(RUN / "pruned_88" / "member_000.pt", "cpu")
    kept = torch.zeros(x_train.shape[1], dtype=torch.bool)
    kept[sparse_member.input_index] = True
    rows = {
        "sgd_x1": scores(with_pixels(torch.ones_like(kept)), x_test, y_test, x_ood),
        "sgd_x1_blank_pixels_zeroed": scores(with_pixels(~blank), x_test, y_test, x_ood),
        "sgd_x1_only_the_sparse_members_pixels": scores(with_pixels(kept), x_test, y_test, x_ood),
        "sparse_member_0": scores(sparse_member, x_test, y_test, x_ood),
    }
    write("ood_pixels", {"run": str(RUN.name), "blank_pixels": int(blank.sum()), "pixels_kept_by_member_0": int(kept.sum()),
                         "fashion_test_images_with_ink_on_blank_pixels": float((x_ood[:, blank] > 0).any(1).float().mean()),
                         **rows})
    print(f"OOD AUROC (MNIST in, Fashion-MNIST out): SGD x1 {rows['sgd_x1']['ood_auroc']:.3f}; blank pixels "
          f"({int(blank.sum())}) zeroed {rows['sgd_x1_blank_pixels_zeroed']['ood_auroc']:.3f}; only the "
          f"{int(kept.sum())} pixels a sparse member keeps {rows['sgd_x1_only_the_sparse_members_pixels']['ood_auroc']:.3f}; "
          f"that sparse member alone {rows['sparse_member_0']['ood_auroc']:.3f}")


if __name__ == "__main__":
    main()
