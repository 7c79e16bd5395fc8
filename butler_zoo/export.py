"""``torch.export`` of the predictor: its producer step and its score step as ``.pt2`` programs.

What it is for: running the predictor without butler-zoo's Python model code. An exported program
is a self-contained graph of ATen operators plus the weights; it reloads with
``torch.export.load(path).module()`` in any Python that has torch, and it is the input of
ahead-of-time compilation (``torch._inductor.aoti_compile_and_package``), of serving runtimes that
consume ``.pt2`` files, and of graph-level inspection.

Two programs:

* **producer step** (``predictor.pt2``): the residual stream of the token being decoded in, the
  predicted queries out. ``producer=None`` exports every producer at once:
  ``hidden [P, B, E] -> tuple of P tensors [B, n_k, H_sel, d']`` (``hidden[k]`` is the residual
  stream after layer ``k*G``; ``n_k`` the layers producer ``k`` serves); this suits batch scoring
  of a teacher-forced pass. A decode loop calls producer ``k`` right after layer ``k*G``, before the
  next producer's input exists: export one producer per file with ``producer=k``
  (``hidden [B, E] -> [B, n_k, H_sel, d']``). The batch dimension is dynamic. A position-consistent
  predictor (format 2) also takes the base's rotary angles of the decoded token, ``cos, sin [B, D/2]``,
  and returns its queries rotated to that position (``ButlerPredictor.position_queries``).
* **score step** (``predictor-score.pt2``): ``(q_sel [B, H_sel, d'], sketch [B, H_kv, T, d']) ->
  float32 scores [B, H_kv, T]``, the function decode ranks cached tokens with
  (``butler_kernels.reference.score_tokens``); batch and context length ``T`` are dynamic. It has no
  weights: it is fixed by ``H_kv``, ``H_sel`` and ``d'``.

The key projection (the sketch written next to each layer's keys) is one matrix per layer,
``key_proj[l-1]`` in ``model.safetensors`` (format 2: applied to the un-rotated keys, then rotated on
``rope_pairs``, ``butler_kernels.reference.project_sketch``); it is not exported. Each file carries
``butler_export.json`` (step, producer, shapes, the predictor's config) as an extra file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from butler_kernels.reference import score_tokens
from butler_zoo.config import ButlerConfig
from butler_zoo.errors import ButlerError
from butler_zoo.predictor import ButlerPredictor

__all__ = [
    "ProducerStep",
    "ScoreStep",
    "export_producer_step",
    "export_score_step",
    "export_predictor",
    "load_exported",
    "check_exported",
    "score_path_for",
    "META_NAME",
]

META_NAME = "butler_export.json"
EXPORT_FORMAT = 1
_MAX_BATCH = 1 << 16
_MAX_CONTEXT = 1 << 24


class ProducerStep(nn.Module):
    """The producer step as a module ``torch.export`` can trace (see the module docstring)."""

    def __init__(self, predictor: ButlerPredictor, producer: int | None = None):
        super().__init__()
        n = predictor.config.num_producers
        if producer is not None and not 0 <= producer < n:
            raise ButlerError(f"producer {producer} does not exist: this predictor has producers 0..{n - 1}")
        self.predictor = predictor
        self.producer = producer

    def forward(self, hidden: torch.Tensor, *rope: torch.Tensor):
        position = self.predictor.position_queries
        rope = tuple(rope) or None
        if self.producer is not None:
            return position(self.predictor.producer_queries(self.producer, hidden), rope)
        return tuple(position(self.predictor.producer_queries(k, hidden[k]), rope) for k in range(len(self.predictor.producers)))


class ScoreStep(nn.Module):
    """``(q_sel [B, H_sel, d'], sketch [B, H_kv, T, d']) -> scores [B, H_kv, T]`` (float32)."""

    def __init__(self, num_kv_heads: int):
        super().__init__()
        self.num_kv_heads = num_kv_heads

    def forward(self, q_sel: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
        return score_tokens(q_sel, sketch, self.num_kv_heads)


def _param(predictor: ButlerPredictor) -> torch.Tensor:
    return next(predictor.parameters())


def producer_example(predictor: ButlerPredictor, producer: int | None, batch: int = 2, generator=None) -> tuple:
    """Random inputs of the producer step (batch ``batch``, the predictor's dtype and device): ``(hidden,)``,
    plus the rotary ``(cos, sin)`` of random positions for a position-consistent predictor."""
    c, p = predictor.config, _param(predictor)
    shape = (batch, c.hidden_size) if producer is not None else (c.num_producers, batch, c.hidden_size)
    hidden = torch.randn(shape, generator=generator).to(device=p.device, dtype=p.dtype)
    if not predictor.position_consistent:
        return (hidden,)
    angles = torch.rand(batch, c.head_dim // 2, generator=generator) * 1000.0
    return hidden, angles.cos().to(device=p.device, dtype=p.dtype), angles.sin().to(device=p.device, dtype=p.dtype)


def score_example(config: ButlerConfig, batch: int = 2, context: int = 17, dtype=torch.float32, device="cpu", generator=None):
    """Random ``(q_sel, sketch)`` inputs of the score step."""
    q = torch.randn(batch, config.num_query_heads, config.sketch_dim, generator=generator)
    sketch = torch.randn(batch, config.num_key_value_heads, context, config.sketch_dim, generator=generator)
    return q.to(device=device, dtype=dtype), sketch.to(device=device, dtype=dtype)


def export_producer_step(predictor: ButlerPredictor, producer: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` the producer step of one producer (``producer=k``) or of all (``None``)."""
    predictor = predictor.eval()
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    example = producer_example(predictor, producer)
    dims = ({0: batch} if producer is not None else {1: batch},) + ({0: batch},) * (len(example) - 1)
    with torch.no_grad():
        return torch.export.export(ProducerStep(predictor, producer), example, dynamic_shapes={"hidden": dims[0], "rope": dims[1:]})


def export_score_step(config: ButlerConfig, dtype: torch.dtype = torch.float32, device="cpu") -> torch.export.ExportedProgram:
    """``torch.export`` the score step with dynamic batch and context length."""
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    context = torch.export.Dim("context", min=1, max=_MAX_CONTEXT)
    example = score_example(config, dtype=dtype, device=device)
    return torch.export.export(
        ScoreStep(config.num_key_value_heads), example, dynamic_shapes={"q_sel": {0: batch}, "sketch": {0: batch, 2: context}}
    )


def score_path_for(path: str | Path) -> Path:
    """Where the score step goes next to a producer-step file: ``x.pt2 -> x-score.pt2``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-score{path.suffix or '.pt2'}")


def _meta(config: ButlerConfig, step: str, producer: int | None, dtype: torch.dtype) -> dict:
    if step == "producer":
        c = config
        if producer is None:
            inputs = {"hidden": f"[{c.num_producers}, B, {c.hidden_size}]"}
            outputs = [f"[B, {len(c.served_layers(k))}, {c.num_query_heads}, {c.sketch_dim}]" for k in range(c.num_producers)]
        else:
            inputs = {"hidden": f"[B, {c.hidden_size}]"}
            outputs = [f"[B, {len(c.served_layers(producer))}, {c.num_query_heads}, {c.sketch_dim}]"]
        if c.format_version >= 2:
            inputs.update(cos=f"[B, {c.head_dim // 2}]", sin=f"[B, {c.head_dim // 2}]")
        served = {k: config.served_layers(k) for k in ([producer] if producer is not None else range(config.num_producers))}
    else:
        inputs = {"q_sel": f"[B, {config.num_query_heads}, {config.sketch_dim}]",
                  "sketch": f"[B, {config.num_key_value_heads}, T, {config.sketch_dim}]"}
        outputs = [f"[B, {config.num_key_value_heads}, T] float32"]
        served = None
    return {
        "butler_export": EXPORT_FORMAT,
        "step": step,
        "producer": producer,
        "served_layers": served,
        "dtype": str(dtype).removeprefix("torch."),
        "inputs": inputs,
        "outputs": outputs,
        "torch": torch.__version__,
        "config": config.to_dict(),
    }


def _save(ep: torch.export.ExportedProgram, path: Path, meta: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path), extra_files={META_NAME: json.dumps(meta, indent=2, sort_keys=True)})
    return path


def export_predictor(
    predictor: ButlerPredictor | str | Path,
    out: str | Path,
    *,
    producer: int | None = None,
    score: bool = True,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Export the producer step to ``out`` and (``score=True``) the score step next to it.

    ``predictor`` is a :class:`ButlerPredictor`, a folder or a Hub repo id. Returns the written paths."""
    if not isinstance(predictor, ButlerPredictor):
        predictor = ButlerPredictor.from_pretrained(predictor, revision=revision)
    if dtype is not None:
        predictor = predictor.to(dtype)
    dtype = _param(predictor).dtype
    out = Path(out)
    if out.suffix != ".pt2":
        raise ButlerError(f"{out}: exported programs are saved as .pt2 files (torch.export.save); use e.g. {out.with_suffix('.pt2').name}")
    config = predictor.config
    paths = [_save(export_producer_step(predictor, producer), out, _meta(config, "producer", producer, dtype))]
    if score:
        device = _param(predictor).device
        paths.append(_save(export_score_step(config, dtype, device), score_path_for(out), _meta(config, "score", None, dtype)))
    return paths


def load_exported(path: str | Path) -> tuple[torch.export.ExportedProgram, dict]:
    """``(program, metadata)`` of a file written by :func:`export_predictor`."""
    path = Path(path)
    if not path.is_file():
        raise ButlerError(f"no exported program at {path}")
    extra = {META_NAME: ""}
    ep = torch.export.load(str(path), extra_files=extra)
    if not extra[META_NAME]:
        raise ButlerError(f"{path} was not written by butler-zoo export (no {META_NAME} inside)")
    return ep, json.loads(extra[META_NAME])


@torch.no_grad()
def check_exported(path: str | Path, predictor: ButlerPredictor, *, trials: int = 3, seed: int = 0) -> float:
    """Reload ``path`` and compare it with eager ``predictor`` on random inputs of several batch sizes
    (and context lengths for the score step); returns the largest absolute difference."""
    ep, meta = load_exported(path)
    module = ep.module()
    gen = torch.Generator().manual_seed(seed)
    p = _param(predictor)
    worst = 0.0
    for trial in range(trials):
        batch = 1 + trial * 2
        if meta["step"] == "producer":
            x = producer_example(predictor, meta["producer"], batch=batch, generator=gen)
            got, want = module(*x), ProducerStep(predictor, meta["producer"])(*x)
        else:
            args = score_example(predictor.config, batch=batch, context=1 + 23 * trial, dtype=p.dtype, device=p.device, generator=gen)
            got, want = module(*args), ScoreStep(predictor.config.num_key_value_heads)(*args)
        got, want = (got,) if torch.is_tensor(got) else tuple(got), (want,) if torch.is_tensor(want) else tuple(want)
        if [g.shape for g in got] != [w.shape for w in want]:
            raise ButlerError(f"{path}: exported outputs have shapes {[tuple(g.shape) for g in got]}, eager {[tuple(w.shape) for w in want]}")
        worst = max([worst] + [float((g.float() - w.float()).abs().max()) for g, w in zip(got, want)])
    return worst

