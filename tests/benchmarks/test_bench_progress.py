"""``make bench`` / ``make bench-data``: a progress line per row on stderr, the tables alone on stdout;
bench-data stops when the demo shards cannot be built."""

import pytest

from benchmarks import bench, bench_data


def test_bench_says_which_row_it_measures(monkeypatch, capsys):
    train = dict(seconds=0.01, samples_s=300.0, mem_mib=1.0, mem_how="test", seq=40, n=3)
    sampler = dict(ours=0.1, ref=0.3, speedup=3.0, ceiling=2.0, vision_share=0.5, diff=0.0, scale=1.0,
                   prompts=4, steps=10)  # fmt: skip
    monkeypatch.setattr(bench, "bench_train", lambda model, repeats: train)
    monkeypatch.setattr(bench, "bench_sampler", lambda model, n, steps, repeats: sampler)
    row = dict(fast=1.0, ref=2.0, speedup=2.0, diff=1e-7, scale=1.0, dominates="mkldnn_convolution 80%",
               dominates_ref="mkldnn_convolution 85%", peak_reference=1024, peak_fast=1024)  # fmt: skip
    monkeypatch.setattr(bench, "bench_fast", lambda repeats: {name: row for name in bench.FAST_TASKS})
    assert bench.main(["--sizes", "tiny", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"bench: row {k}/4" for k in (1, 2, 3, 4)]
    assert "tiny: build, then the training step" in lines[0] and "tiny: sampler" in lines[1]
    assert "fast paths at the release size" in lines[2] and "attention mask" in lines[3]
    assert captured.out.startswith("## Sizes") and "row " not in captured.out
    assert "## Fast paths at the release size" in captured.out
    assert "| answering, 1 image, 16 new tokens (greedy) | 1.000 | 2.000 | 2.00x |" in captured.out
    assert "| t2i vs the release" in captured.out


def test_bench_fast_rows_can_be_skipped(monkeypatch, capsys):
    train = dict(seconds=0.01, samples_s=300.0, mem_mib=1.0, mem_how="test", seq=40, n=3)
    sampler = dict(ours=0.1, ref=0.3, speedup=3.0, ceiling=2.0, vision_share=0.5, diff=0.0, scale=1.0,
                   prompts=4, steps=10)  # fmt: skip
    monkeypatch.setattr(bench, "bench_train", lambda model, repeats: train)
    monkeypatch.setattr(bench, "bench_sampler", lambda model, n, steps, repeats: sampler)
    monkeypatch.setattr(bench, "bench_fast", lambda repeats: pytest.fail("ran the fast rows"))
    assert bench.main(["--sizes", "tiny", "--repeats", "1", "--no-fast"]) == 0
    assert "Fast paths" not in capsys.readouterr().out


def test_bench_data_says_which_row_it_measures(tmp_path, monkeypatch, capsys):
    for task in bench_data.TASKS:
        (tmp_path / task).mkdir()
    monkeypatch.setattr(bench_data, "expand_shards", lambda urls: urls)
    monkeypatch.setattr(bench_data, "raw_rate", lambda shards, size: (10.0, 5.0))
    monkeypatch.setattr(bench_data, "loader_rate", lambda root, size, w, batches, bs: (20.0 + w, 8.0))
    assert bench_data.main(["--shards", str(tmp_path), "--workers", "0", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"bench-data: row {k}/3" for k in (1, 2, 3)]
    assert "raw decode" in lines[0] and "0 workers" in lines[1] and "2 workers" in lines[2]
    assert "| CheersDataModule                   |       2 |      22.0 |      8.0 |" in captured.out


def test_bench_data_stops_when_the_demo_build_fails(monkeypatch, capsys):
    import data_recipes.demo

    monkeypatch.setattr(data_recipes.demo, "main", lambda argv: 1)
    monkeypatch.setattr(bench_data, "raw_rate", lambda *a: pytest.fail("measured without shards"))
    assert bench_data.main([]) == 1
    captured = capsys.readouterr()
    assert "bench-data: error: building the demo shards failed" in captured.err and captured.out == ""
