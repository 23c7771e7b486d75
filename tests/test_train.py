"""The ``sparsekern-train`` CLI: argument errors, tiny runs on digits and on a fake CIFAR folder,
report keys, and an interrupted run leaving a valid partial report."""
import json
import pickle

import numpy as np
import pytest

from sparsekern import train


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["--epochs", "1", "--width", "8", "--quiet", "--no-plots", "--backend", "reference",
            "--out", str(out), *extra]
    return train.main(argv), out


@pytest.mark.parametrize("argv, fragment", [
    (["--sparsity", "1.5"], "--sparsity"),
    (["--epochs", "0"], "--epochs"),
    (["--method", "magic"], "--method"),
    (["--block-size", "2", "2", "2"], "--block-size"),
    (["--dataset", "cifar10"], "--data-dir"),
])
def test_bad_arguments_exit_with_message(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


def test_missing_cifar_folder_is_a_clear_error(tmp_path, capsys):
    code, _ = _run(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"))
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_malformed_cifar_folder_is_a_clear_error(tmp_path, capsys):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in train_batches() + ["test_batch"]:
        (d / name).write_bytes(b"not a pickle")
    code, _ = _run(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert code == 2
    assert "not a valid CIFAR-10" in capsys.readouterr().err


def train_batches():
    return [f"data_batch_{i}" for i in range(1, 6)]


def _write_fake_cifar(root, n=8):
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in train_batches() + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_tiny_run_on_fake_cifar_writes_report(tmp_path):
    _write_fake_cifar(tmp_path)
    code, out = _run(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path),
                     "--method", "rigl", "--delta-t", "2", "--batch-size", "8")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    assert set(report["runs"]) == {"rigl", "dense"}
    assert {"test_acc", "acc_gap", "step_time_ms"} <= set(report["comparison"])
    rigl = report["runs"]["rigl"]
    assert len(rigl["epochs"]) == 1
    assert {"train_loss", "test_acc", "density", "n_updates", "iou", "exploration",
            "step_time_ms"} <= set(rigl["epochs"][0])
    assert rigl["epochs"][0]["n_updates"] >= 1


def test_digits_run_with_plots(tmp_path):
    out = tmp_path / "out"
    code = train.main(["--epochs", "1", "--width", "8", "--quiet", "--method", "set",
                       "--backend", "reference",
                       "--delta-t", "5", "--no-dense-baseline", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert "dense" not in report["runs"] and "comparison" not in report
    for name in ("accuracy.png", "iou.png", "exploration.png", "layer_density.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    density = report["runs"]["set"]["epochs"][0]["density"]
    assert abs(density - 0.1) < 0.01


def test_interrupted_run_leaves_partial_report(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train.evaluate

    def interrupt_second_epoch(model, split, batch_size=256):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(model, split, batch_size)

    monkeypatch.setattr(train, "evaluate", interrupt_second_epoch)
    out = tmp_path / "out"
    code = train.main(["--epochs", "3", "--width", "8", "--quiet", "--no-plots",
                       "--backend", "reference",
                       "--method", "static", "--out", str(out)])
    assert code == 130
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    run = report["runs"]["static"]
    assert run["status"] == "interrupted" and len(run["epochs"]) == 1


@pytest.mark.parametrize("method", ["bidst", "mest", "gse"])
def test_delta_t_is_honoured_and_recorded(tmp_path, method):
    """``--delta-t`` spaces BiDST's refreshes, MEST's updates and GSE's updates (it used to be
    ignored for bidst/mest, which refreshed every 2 epochs and so never in a 1-epoch run)."""
    _write_fake_cifar(tmp_path, n=32)
    code, out = _run(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path),
                     "--method", method, "--delta-t", "1", "--batch-size", "8",
                     "--no-dense-baseline")
    assert code == 0
    run = json.loads((out / "report.json").read_text())["runs"][method]
    assert run["update_interval"] == 1
    assert run["epochs"][0]["n_updates"] >= 1
