"""`torch.export` of the predictor: the programs reload with `torch.export.load` and match eager."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from butler_kernels.reference import score_tokens
from butler_zoo.cli import main
from butler_zoo.errors import ButlerError
from butler_zoo.export import check_exported, export_predictor, load_exported, score_path_for
from butler_zoo.hub import EXPORT_FILES
from conftest import TINY_BASE_ID, make_tiny_predictor


@pytest.mark.parametrize("query_heads", ["kv", "query"])
@pytest.mark.parametrize("producer", [None, 1])
def test_producer_step_reloads_and_matches_eager(tmp_path, query_heads, producer):
    predictor = make_tiny_predictor(TINY_BASE_ID, seed=3, query_heads=query_heads).eval()
    (path, score_path) = export_predictor(predictor, tmp_path / "predictor.pt2", producer=producer)
    program, meta = load_exported(path)  # torch.export.load + the metadata written next to the graph
    assert meta["step"] == "producer" and meta["producer"] == producer and meta["config"] == predictor.config.to_dict()
    module = program.module()
    c = predictor.config
    gen = torch.Generator().manual_seed(0)
    assert meta["inputs"]["cos"] == meta["inputs"]["sin"] == f"[B, {c.head_dim // 2}]"  # format 2: the token's angles
    for batch in (1, 2, 5):  # the batch dimension is dynamic
        angles = torch.rand(batch, c.head_dim // 2, generator=gen) * 100
        rope = (angles.cos(), angles.sin())
        if producer is None:
            hidden = torch.randn(c.num_producers, batch, c.hidden_size, generator=gen)
            got = module(hidden, *rope)
            want = [predictor.position_queries(predictor.producer_queries(k, hidden[k]), rope) for k in range(c.num_producers)]
        else:
            hidden = torch.randn(batch, c.hidden_size, generator=gen)
            got, want = [module(hidden, *rope)], [predictor.position_queries(predictor.producer_queries(producer, hidden), rope)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape == (batch, w.shape[1], c.num_query_heads, c.sketch_dim)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert score_path == score_path_for(path) and score_path.is_file()


def test_score_step_has_a_dynamic_context_length(tmp_path):
    predictor = make_tiny_predictor(TINY_BASE_ID, query_heads="query")
    _, score_path = export_predictor(predictor, tmp_path / "p.pt2")
    program, meta = load_exported(score_path)
    assert meta["step"] == "score" and meta["inputs"]["sketch"] == "[B, 2, T, 8]"
    c = predictor.config
    gen = torch.Generator().manual_seed(1)
    for batch, context in ((1, 1), (3, 17), (2, 1000)):
        q = torch.randn(batch, c.num_query_heads, c.sketch_dim, generator=gen)
        sketch = torch.randn(batch, c.num_key_value_heads, context, c.sketch_dim, generator=gen)
        got = program.module()(q, sketch)
        assert got.dtype == torch.float32 and got.shape == (batch, c.num_key_value_heads, context)
        torch.testing.assert_close(got, score_tokens(q, sketch, c.num_key_value_heads), rtol=1e-5, atol=1e-6)


def test_exported_queries_score_like_the_runtime(tmp_path):
    """Producer program -> slice a layer's queries -> score program == the predictor's own path."""
    predictor = make_tiny_predictor(TINY_BASE_ID, seed=5).eval()
    producer_path, score_path = export_predictor(predictor, tmp_path / "p.pt2", producer=0)
    produce, score = load_exported(producer_path)[0].module(), load_exported(score_path)[0].module()
    c = predictor.config
    hidden = torch.randn(2, c.hidden_size)
    keys = torch.randn(2, c.num_key_value_heads, 33, c.head_dim)
    # the base's angles of positions 0..32; the decoded token is the last
    angles = torch.arange(33.0)[:, None] * 10000.0 ** (-torch.arange(0, c.head_dim, 2) / c.head_dim)
    key_rope = (angles.cos()[None], angles.sin()[None])
    query_rope = (angles[-1:].cos().expand(2, -1), angles[-1:].sin().expand(2, -1))
    queries = predictor.position_queries(predictor.producer_queries(0, hidden), query_rope)
    for layer in c.served_layers(0):
        sketch = predictor.project_keys(layer, keys, key_rope)
        want = score_tokens(predictor.layer_queries(layer, queries), sketch, c.num_key_value_heads)
        got = score(produce(hidden, *query_rope)[:, c.producer_of(layer)[1]], sketch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cli_export_writes_checks_and_reports(tiny_predictor_dir, tmp_path):
    out = tmp_path / "out" / EXPORT_FILES[0]
    result = CliRunner().invoke(main, ["export", str(tiny_predictor_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (out.parent / EXPORT_FILES[1]).is_file()
    assert result.output.count("reloaded with torch.export.load, max |exported - eager| = 0") == 2
    result = CliRunner().invoke(main, ["export", str(tiny_predictor_dir), "--out", str(tmp_path / "one.pt2"), "--producer", "1", "--no-score"])
    assert result.exit_code == 0, result.output
    assert load_exported(tmp_path / "one.pt2")[1]["served_layers"] == {"1": [3]}
    assert not score_path_for(tmp_path / "one.pt2").exists()


def test_export_refuses_bad_requests(tmp_path):
    predictor = make_tiny_predictor(TINY_BASE_ID)
    with pytest.raises(ButlerError, match="producers 0..1"):
        export_predictor(predictor, tmp_path / "x.pt2", producer=2)
    with pytest.raises(ButlerError, match=r"\.pt2"):
        export_predictor(predictor, tmp_path / "x.pt")
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), str(plain))
    with pytest.raises(ButlerError, match="not written by butler-zoo"):
        load_exported(plain)


def test_bfloat16_export_matches_eager_bfloat16(tmp_path):
    predictor = make_tiny_predictor(TINY_BASE_ID).to(torch.bfloat16).eval()
    path, score_path = export_predictor(predictor, tmp_path / "bf16.pt2")
    assert load_exported(path)[1]["dtype"] == "bfloat16"
    assert check_exported(path, predictor) < 1e-2  # bfloat16 tolerance (bit-identical on this CPU)
    assert check_exported(score_path, predictor) < 1e-5


@pytest.mark.slow
def test_aot_inductor_compiles_the_exported_producer_step(tmp_path):
    """What the .pt2 is for: ahead-of-time compilation (AOTInductor, needs a C++ compiler; ~50 s on 2 CPU cores)."""
    predictor = make_tiny_predictor(TINY_BASE_ID, seed=7).eval()
    (path,) = export_predictor(predictor, tmp_path / "predictor.pt2", score=False)
    package = torch._inductor.aoti_compile_and_package(load_exported(path)[0], package_path=str(tmp_path / "predictor-aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    hidden = torch.randn(predictor.config.num_producers, 3, predictor.config.hidden_size)
    angles = torch.rand(3, predictor.config.head_dim // 2) * 100
    rope = (angles.cos(), angles.sin())
    with torch.no_grad():
        for k, got in enumerate(compiled(hidden, *rope)):
            want = predictor.position_queries(predictor.producer_queries(k, hidden[k]), rope)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
