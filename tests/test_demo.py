"""`butler-zoo demo` (= `make demo`): dense and TokenButler side by side on a 3.4K-token context, with the
real SmolLM2-135M-Instruct and the shipped predictor. Both must name the fact the prompt's first line holds,
and the sparse decode must read at most 30% of the KV cache."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from butler_zoo.cli import main
from butler_zoo.demo import FACT, demo_prompt

pytestmark = pytest.mark.slow


def test_demo_prompt_puts_the_fact_first_and_asks_at_the_end():
    p = demo_prompt()
    assert p.text.index(FACT) < 200 and p.text.endswith(p.question) and FACT not in p.text[200:]
    assert len(p.text) > 12_000  # a long context: the whole of Genesis 1-4


def test_demo_shows_a_sparse_long_context_answer():
    result = CliRunner().invoke(main, ["demo", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Both answers name the ship: yes" in out, out
    read = float(re.search(r"TokenButler read ([\d.]+)% of the KV cache", out).group(1))
    assert 0 < read <= 30.0, out
    context = int(re.search(r"Context: ([\d,]+) tokens", out).group(1).replace(",", ""))
    assert context > 3000
