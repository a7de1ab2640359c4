"""``cheers paper-tables``: the aggregation rule, and a two-seed run of two rows that resumes per run."""

import json
import math

import pytest

from cheers_pl import paper_tables
from cheers_pl.cli import main


def test_mean_std_and_spread_rule():
    m, s = paper_tables.mean_std([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and s == pytest.approx(0.1)  # sample std (ddof 1)
    assert paper_tables.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in paper_tables.mean_std([None, math.nan]))
    assert paper_tables.exceeds_spread([0.9, 0.91, 0.92], [0.5, 0.51, 0.52])
    assert not paper_tables.exceeds_spread([0.5, 0.7, 0.9], [0.6, 0.65, 0.7])  # gap 0.05 < 0.2 + 0.05


def test_tables_from_results():
    results = []
    for seed in range(3):
        for i, row in enumerate(paper_tables.ROWS):
            r = {m: 0.1 * i + 0.01 * seed for m in paper_tables.METRICS}
            r.update(
                row=row.name,
                seed=seed,
                hfi_curve=[0.0, 0.5 + 0.1 * seed, 1.0] if row.name == "joint_hfi" else None,
            )
            results.append(r)
    text, summary = paper_tables.tables(results)
    assert summary["seeds"] == [0, 1, 2]
    mean, std, values = summary["rows"]["joint_hfi"]["t2i_acc"]
    assert mean == pytest.approx(0.21) and std == pytest.approx(0.01) and len(values) == 3
    hfi = [c for c in summary["comparisons"] if c["a"] == "joint_hfi" and c["b"] == "joint_no_hfi"]
    assert hfi and all(c["exceeds_seed_spread"] and c["diff"] == pytest.approx(0.1) for c in hfi)
    assert summary["fig5b"][1] == pytest.approx([0.6, 0.1])
    assert "| und_only: Table 5 row 1" in text and "(0.010 ± 0.010)" in text  # und-only T2I is marked
    assert "Figure 5b" in text and "Paper (Table 5)" in text


def test_two_seed_run_resumes_per_run(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    assert main(["data", "demo", "--out", str(data), "--digits", "30", "--texts", "4", "--heldout", "6",
                 "--reading", "10", "--heldout-reading", "4"]) == 0  # fmt: skip
    args = ["paper-tables", "--out", str(out), "--data", str(data), "--seeds", "2", "--stage1-steps", "2",
            "--stage2-steps", "3", "--per-digit", "1", "--curve-steps", "3", "--vae-steps", "2",
            "--rows", "joint_hfi", "und_only"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "tables.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert len(summary["rows"]["joint_hfi"]["t2i_acc"][2]) == 2 and len(summary["fig5b"]) == 3
    assert (out / "fig5b.png").is_file() and "exceeds seed spread" in (out / "tables.md").read_text()
    results = sorted(out.glob("seed*/*/result.json"))
    assert len(results) == 4 and (out / "seed0" / "stage1_decode" / "done").is_file()
    stamps = [p.stat().st_mtime_ns for p in results]
    assert main(args) == 0  # every run is done: nothing retrains
    assert [p.stat().st_mtime_ns for p in results] == stamps


def test_a_failed_demo_build_stops_with_a_message_before_any_training(tmp_path, monkeypatch, capsys):
    import cheers_pl.demo_vae
    import data_recipes.demo

    monkeypatch.setattr(data_recipes.demo, "main", lambda argv: 1)  # it printed its error and returned 1
    monkeypatch.setattr(cheers_pl.demo_vae, "fit_and_save", lambda *a, **k: pytest.fail("went on to train"))
    with pytest.raises(SystemExit) as exit_:
        main(["paper-tables", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"cheers paper-tables: error: building the demo data in {tmp_path / 'data'} failed" in err
