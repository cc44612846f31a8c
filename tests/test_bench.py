import json

from infmoe.bench import SHAPES, layer_variants, markdown
from infmoe.cli import main


def test_quick_bench_reports_every_variant_as_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--markdown", str(tmp_path / "bench.md")]) == 0
    result = json.loads(out.read_text())
    names = [r["variant"] for r in result["layers"]]
    assert names == list(layer_variants(SHAPES["quick"]))
    base = result["layers"][0]
    assert base["vs_dense"] == 1.0
    for row in result["layers"]:
        assert row["fwd_bwd_ms"] > row["fwd_ms"] > 0
        assert row["vs_dense"] > 0 and 0 < row["gflops"] and row["saved_mb"] >= 0
    unions = [r["union"] for r in result["layers"] if "sparse" in r["variant"]]
    assert unions[0] == 0.5 and unions == sorted(unions) and unions[-1] <= 1  # K = 1, 2, 4, 8
    assert [r["config"] for r in result["models"]] == ["tiny-dense", "tiny-moe", "tiny-infmoe"]
    assert (tmp_path / "bench.md").read_text() == markdown(result)
    assert "| tiny-infmoe |" in capsys.readouterr().out


def test_bad_shape_is_one_line(capsys):
    assert main(["bench", "--shapes", "huge"]) == 2
    err = capsys.readouterr().err
    assert "--shapes='huge'" in err and err.count("\n") == 1
