"""The demo: the seed network, training pieces, a small run checked file by file, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import qpack
from qpack.demo.mnist import DemoData, load_demo_data
from qpack.demo.net import SEED_PARAMETER_COUNT, SeedNet
from qpack.demo.run import DemoConfig, format_table, run_demo, write_plots
from qpack.demo.train import (
    TrainConfig,
    codebooks_from_state_dict,
    train_centroids,
)
from qpack.errors import InputError

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared/data/mnist"

SEED_KEYS = [
    f"{block}.{part}"
    for layer in ("layer1", "layer2", "layer3")
    for block, part in (
        [(f"{layer}.0", p) for p in ("weight", "bias")]
        + [(f"{layer}.1", p) for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    )
] + ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread: small work, and it stays fast when other jobs share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seed_net_parameters_and_keys() -> None:
    net = SeedNet()
    assert sum(p.numel() for p in net.parameters()) == SEED_PARAMETER_COUNT == 481_214
    assert list(net.state_dict()) == SEED_KEYS
    assert net.fc1.weight.shape == (300, 1568) and net.fc2.weight.shape == (10, 300)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_train_centroids_keeps_assignments_and_sums_gradients() -> None:
    torch.manual_seed(0)
    net = SeedNet()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    levels = torch.tensor([-0.02, -0.01, 0.0, 0.01, 0.02])
    for name, _ in net.named_parameters():
        state[name] = levels[torch.randint(0, 5, state[name].shape)]
    net.load_state_dict(state)
    books = codebooks_from_state_dict(net, state, 8)
    assert len(books) == len(list(net.parameters()))
    before = {k: b.index.clone() for k, b in books.items()}
    x, y = torch.rand(40, 1, 28, 28), torch.arange(40) % 10
    train_centroids(net, books, x, y, epochs=1, seed=0, config=TrainConfig(batch_size=20))
    for name, p in net.named_parameters():
        book = books[name]
        assert torch.equal(book.index, before[name])  # assignments fixed
        assert torch.equal(p.detach().flatten(), book.centroids[book.index])  # weights are the centroids
        assert not torch.equal(book.centroids, levels[: len(book.centroids)])  # and they moved
        assert p.detach().unique().numel() <= 5

    # one SGD step on the centroids equals the members' summed gradient
    net.load_state_dict(state)
    books = codebooks_from_state_dict(net, state, 8)
    reference = SeedNet()
    reference.load_state_dict(state)
    reference.train()
    torch.nn.functional.cross_entropy(reference(x[:20]), y[:20]).backward()
    name = "fc2.weight"
    expected = torch.zeros(5).index_add_(0, books[name].index, reference.fc2.weight.grad.flatten())
    net.train()
    torch.nn.functional.cross_entropy(net(x[:20]), y[:20]).backward()
    got = torch.zeros(5).index_add_(0, books[name].index, net.fc2.weight.grad.flatten())
    torch.testing.assert_close(got, expected)


# --- a small run on real MNIST ------------------------------------------------------------


def _small_mnist() -> DemoData:
    if not (REAL_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the real MNIST test set is not at {REAL_MNIST}")
    return load_demo_data(REAL_MNIST).subset(600, 400)


SMALL = DemoConfig(epochs=5, retrain_epochs=1, bits=(1, 3))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoData, Path, dict[str, Any], list[str]]:
    data = _small_mnist()
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped, so before the autouse fixture runs
    try:
        results = run_demo(data, out, SMALL, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return data, out, results, lines


def test_small_run_reaches_sane_accuracy(small_run: tuple[DemoData, Path, dict[str, Any], list[str]]) -> None:
    _, _, results, _ = small_run
    fp32 = results["rows"][0]
    assert fp32["method"] == "fp32" and fp32["file"] == "fp32.pt"
    assert fp32["accuracy"] > 0.6


def test_every_accuracy_comes_from_its_file(small_run: tuple[DemoData, Path, dict[str, Any], list[str]]) -> None:
    data, out, results, _ = small_run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert {r["variant"] for r in results["rows"]} >= {
        "fp32 (torch.save)",
        "uniform w8/b1 (seed)",
        "k-means w3/b3 (seed)",
        "k-means w3/b3 retrained 1 ep",
        "k-means w3/b3 centroids trained 1 ep",
        "uniform w1",
        "k-means w3",
    }
    assert len({r["file"] for r in results["rows"]}) == len(results["rows"])
    for row in results["rows"]:
        path = out / row["file"]
        if path.suffix == ".pt":
            state = torch.load(path, weights_only=True)
        else:
            assert path.suffix == ".qpk"
            state = qpack.load(path)
        net = SeedNet()
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            predicted = net(data.eval_x).argmax(1)
        accuracy = (predicted == data.eval_y).sum().item() / len(data.eval_y)
        assert row["accuracy"] == accuracy, row["variant"]
        assert row["file_bytes"] == path.stat().st_size
        assert row["bits_per_weight"] == row["file_bytes"] * 8 / SEED_PARAMETER_COUNT
        assert 0.0 <= row["accuracy"] <= 1.0


def test_trained_centroids_are_packed_exactly(small_run: tuple[DemoData, Path, dict[str, Any], list[str]]) -> None:
    _, out, results, _ = small_run
    row = next(r for r in results["rows"] if r["training"] == "trained-centroids")
    assert row["exact_repack"] is True and row["centroid_tensors"] == 16
    state = qpack.load(out / row["file"])
    for name, p in SeedNet().named_parameters():
        assert state[name].unique().numel() <= 8, name


def test_seed_uniform_setting_quantizes_biases_to_two_values(
    small_run: tuple[DemoData, Path, dict[str, Any], list[str]],
) -> None:
    _, out, results, _ = small_run
    row = next(r for r in results["rows"] if r["variant"] == "uniform w8/b1 (seed)")
    state = qpack.load(out / row["file"])
    assert state["layer1.1.weight"].unique().numel() <= 2
    assert state["fc1.bias"].unique().numel() <= 2
    assert state["fc1.weight"].unique().numel() <= 256
    raw = torch.load(out / "fp32.pt", weights_only=True)
    assert torch.equal(state["layer1.1.running_var"], raw["layer1.1.running_var"])  # BN statistics stay raw


def test_results_record_the_data_and_the_table(small_run: tuple[DemoData, Path, dict[str, Any], list[str]]) -> None:
    _, _, results, lines = small_run
    assert results["data"]["source"] == "mnist"
    assert results["data"]["train"] == {"file": "t10k-images-idx3-ubyte.gz", "start": 0, "stop": 600, "count": 600}
    assert results["data"]["eval"] == {"file": "t10k-images-idx3-ubyte.gz", "start": 8000, "stop": 8400, "count": 400}
    assert results["parameters"] == SEED_PARAMETER_COUNT
    for key in ("method", "bits_per_weight", "file", "file_bytes", "accuracy"):
        assert all(key in row for row in results["rows"])
    table = format_table(results)
    assert any(line.startswith("uniform w8/b1 (seed)") and "8/1" in line for line in table)
    assert "[8000:8400]" in lines[0]
    assert any("sweep" in line for line in lines)


def test_plots_written_or_skipped(
    small_run: tuple[DemoData, Path, dict[str, Any], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out, results, _ = small_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots" not in results or results["plots"] == []
    else:
        assert results["plots"] == ["accuracy_vs_bits.png", "fc1_histogram.png"]
        assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in results["plots"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines: list[str] = []
    assert write_plots(results, out, log=lines.append) == []
    assert "skipped the plots" in lines[0]


# --- the CLI ---------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    from qpack.demo.__main__ import main

    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_cli_digits_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QPACK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the demo keeps the autouse fixture's one thread
    argv = ["--quick", "--bits", "2", "--split-test", "1000", "--no-plots", "--out", str(out)]
    assert _main(argv) == 0
    text = capsys.readouterr().out
    assert "scikit-learn's 8x8 handwritten digits" in text
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["source"] == "sklearn-digits"
    assert results["data"]["train"]["count"] == 1000 and results["data"]["eval"]["count"] == 797
    assert results["config"]["epochs"] == 1 and results["config"]["bits"] == [2]
    assert results["rows"][0]["accuracy"] > 0.5
    assert "sklearn.datasets.load_digits[1000:1797]" in text


def test_cli_bad_data_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == InputError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("qpack demo: error: ") and "no such folder" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_rejects_bad_options(tmp_path: Path) -> None:
    for argv in (["--bits", "0,3"], ["--bits", "x"], ["--epochs", "0"], ["--split-test", "-1"]):
        with pytest.raises(SystemExit):
            _main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cli_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["--device", "cuda", "--out", str(tmp_path)]) == InputError.exit_code
    assert "no CUDA device" in capsys.readouterr().err


def test_core_cli_registers_demo() -> None:
    import argparse

    from qpack.demo.cli import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--quick", "--data", "d", "--split-test", "5"])
    assert (args.quick, args.data, args.split_test, args.epochs, args.out) == (True, "d", 5, None, "qpack-demo-out")


@pytest.mark.parametrize("load, expected", [(0.0, 4), (0.4, 4), (1.2, 3), (3.6, 1), (9.0, 1)])
def test_threads_leave_busy_cpus_alone(monkeypatch: pytest.MonkeyPatch, load: float, expected: int) -> None:
    import os

    from qpack.demo.cli import choose_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    threads, why = choose_threads()
    assert threads == expected and "4 CPUs" in why
