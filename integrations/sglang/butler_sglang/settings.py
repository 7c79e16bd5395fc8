"""Launch flags, environment variables, and every startup check of the ``tokenbutler`` backend.

Values travel from the command line to the scheduler processes on the ``ServerArgs`` object itself
(attribute ``_tokenbutler``, a plain dict, which survives the pickling to the spawned scheduler).
``sgl.Engine(**kwargs)`` builds ``ServerArgs`` without the command line, so the same values can come
from environment variables (inherited by the scheduler processes); flags win over variables.

Nothing here reads a device tensor: the checks run in the launcher (before any process is spawned)
and again in each scheduler, where the predictor's config is compared with the served model.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from butler_sglang import BACKEND_NAME, SUPPORTED_SGLANG_VERSIONS

__all__ = [
    "ENV_VARS",
    "SERVER_ARGS_ATTR",
    "TokenButlerStartupError",
    "Resolved",
    "add_cli_args",
    "parse_budget",
    "values_from_namespace",
    "requested_values",
    "backend_selected",
    "sglang_version",
    "check_sglang_version",
    "unsupported_reasons",
    "resolve",
    "served_model_config",
    "validate_server_args",
]

SERVER_ARGS_ATTR = "_tokenbutler"
# flag dest -> environment variable (for sgl.Engine, which has no command line)
ENV_VARS = {
    "predictor": "TOKENBUTLER_PREDICTOR",
    "budget": "TOKENBUTLER_BUDGET",
    "sinks": "TOKENBUTLER_SINKS",
    "window": "TOKENBUTLER_WINDOW",
    "max_budget": "TOKENBUTLER_MAX_BUDGET",
}
# Prefill backends whose KV writes go through the pool's set_kv_buffer (where the sketch is
# written) and that were tested with this backend.
PREFILL_BACKENDS = ("triton", BACKEND_NAME)


class TokenButlerStartupError(RuntimeError):
    """A setting or model the ``tokenbutler`` backend cannot serve. Raised in a scheduler process
    (SGLang logs it and stops the server); the launcher turns it into ``SystemExit``."""


# ----- flags -------------------------------------------------------------------------------------
def parse_budget(text: str) -> int | float:
    """``--tokenbutler-budget``: ``512`` (positions read per decode step, layer and KV head in all, sinks and
    window included), ``0.1`` or ``10%`` (a fraction of each request's context);
    :func:`butler_zoo.policy.parse_budget` as an argparse type."""
    from butler_zoo.errors import BudgetError
    from butler_zoo.policy import parse_budget as parse

    try:
        return parse(text)
    except BudgetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_int(text: str) -> int:
    v = _non_negative_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--tokenbutler-*`` flags (shown in ``launch_server --help``). Idempotent."""
    if any("--tokenbutler-predictor" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group(
        "TokenButler sparse decoding (butler-zoo plugin)",
        "Used with --decode-attention-backend tokenbutler (or --attention-backend tokenbutler): decode "
        "attends, per layer and KV head, to sinks + a local window + the top-B tokens a learned predictor "
        "scores highest; the full KV cache is kept. Defaults come from the predictor's config.",
    )
    g.add_argument(
        "--tokenbutler-predictor",
        type=str,
        metavar="PATH_OR_REPO",
        default=None,
        help="TokenButler predictor for the served model: a folder, a Hub repo id (ORG/NAME) or the name of a "
        "predictor shipped with butler-zoo. Its config must match the model (checked at startup). "
        f"Env: {ENV_VARS['predictor']}.",
    )
    g.add_argument(
        "--tokenbutler-budget",
        type=parse_budget,
        metavar="TOKENS_OR_FRACTION",
        default=None,
        help="Positions each decode step reads per layer and KV head in all, sinks and window included (the predictor "
        "picks the rest): a count (512) or a fraction of each request's context (0.1 or 10%%). Requests whose "
        f"context fits in the budget decode densely (exactly the dense result). Env: {ENV_VARS['budget']}.",
    )
    g.add_argument(
        "--tokenbutler-sinks",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help=f"First tokens of the context always attended. Env: {ENV_VARS['sinks']}.",
    )
    g.add_argument(
        "--tokenbutler-window",
        type=_positive_int,
        metavar="N",
        default=None,
        help=f"Most recent tokens always attended (the current one included). Env: {ENV_VARS['window']}.",
    )
    g.add_argument(
        "--tokenbutler-max-budget",
        type=_positive_int,
        metavar="N",
        default=None,
        help="Cap, in positions read in all, of a fractional budget. It fixes the static shapes of the CUDA graphs and their "
        "scratch memory; the default is the fraction of the model's context length (--context-length). "
        f"Env: {ENV_VARS['max_budget']}.",
    )


def values_from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The flag values of a parsed namespace (``None`` where not given)."""
    return {k: getattr(args, f"tokenbutler_{k}", None) for k in ENV_VARS}


def _env_values() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, var in ENV_VARS.items():
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            out[key] = None
            continue
        try:
            if key == "predictor":
                out[key] = raw
            elif key == "budget":
                out[key] = parse_budget(raw)
            elif key == "sinks":
                out[key] = _non_negative_int(raw)
            else:
                out[key] = _positive_int(raw)
        except argparse.ArgumentTypeError as e:
            raise TokenButlerStartupError(f"environment variable {var}={raw!r}: {e}") from None
    return out


def requested_values(server_args) -> dict[str, Any]:
    """Flag values carried by ``server_args``, completed by the ``TOKENBUTLER_*`` variables."""
    flags = dict(getattr(server_args, SERVER_ARGS_ATTR, None) or {})
    env = _env_values()
    return {k: flags.get(k) if flags.get(k) is not None else env.get(k) for k in ENV_VARS}


def backend_selected(server_args) -> bool:
    """True when ``tokenbutler`` serves decode (``--decode-attention-backend`` or ``--attention-backend``)."""
    decode = getattr(server_args, "decode_attention_backend", None) or getattr(server_args, "attention_backend", None)
    return decode == BACKEND_NAME


def _mentions_backend(server_args) -> bool:
    return BACKEND_NAME in (
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
    )


# ----- SGLang release ------------------------------------------------------------------------------
def sglang_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version() -> str | None:
    """``None`` when the installed SGLang is supported, else the reason."""
    v = sglang_version()
    if v in SUPPORTED_SGLANG_VERSIONS:
        return None
    return (
        f"the tokenbutler backend of butler-zoo supports SGLang {', '.join(SUPPORTED_SGLANG_VERSIONS)}, "
        f"but SGLang {v or '(not installed)'} is installed. Install a supported release "
        f"(`pip install sglang=={SUPPORTED_SGLANG_VERSIONS[-1]}`) or drop the tokenbutler flags."
    )


# ----- unsupported combinations ------------------------------------------------------------------
def unsupported_reasons(server_args) -> list[str]:
    """Every server setting the backend does not support (tested), each with its fix. Settings are read
    as the installed SGLang resolved them (``compat.api().setting``)."""
    from butler_sglang.compat import api

    adapter = api()
    sa = server_args
    g = lambda name, default=None: adapter.setting(sa, name, default)  # noqa: E731
    out = []
    prefill = g("prefill_attention_backend") or g("attention_backend")
    if g("prefill_attention_backend") == BACKEND_NAME and g("decode_attention_backend") not in (None, BACKEND_NAME):
        out.append(
            "tokenbutler is a decode backend: use --decode-attention-backend tokenbutler (prefill stays on triton) "
            "or --attention-backend tokenbutler"
        )
    elif prefill not in PREFILL_BACKENDS:
        out.append(
            f"prefill attention backend {prefill!r} is not supported with tokenbutler (the sketch cache is written "
            "where the KV cache is, and only the triton prefill path is tested): pass --attention-backend triton"
        )
    if g("speculative_algorithm"):
        out.append(f"speculative decoding (--speculative-algorithm {g('speculative_algorithm')}) is not supported")
    kv = str(g("kv_cache_dtype", "auto"))
    if kv not in ("auto", "bf16", "bfloat16", "float16", "fp16", "half"):
        out.append(f"--kv-cache-dtype {kv} is not supported (fp8/fp4 KV caches are untested): use auto")
    if (g("page_size") or 1) != 1:
        out.append(f"--page-size {g('page_size')} is not supported (only page size 1 is tested)")
    if g("enable_dp_attention"):
        out.append(
            "--enable-dp-attention is not supported with tokenbutler: attention data parallelism moves the tokens between "
            "attention-DP groups at every layer boundary, so a producer's residual stream does not hold its rank's decode "
            "rows (untested); for Llama/Mistral use --tp-size, and --dp-size for independent replicas"
        )
    for name, flag in (
        ("enable_torch_compile", "--enable-torch-compile"),
        ("enable_two_batch_overlap", "--enable-two-batch-overlap"),
        ("enable_pdmux", "--enable-pdmux"),
        ("enable_hierarchical_cache", "--enable-hierarchical-cache"),
        ("enable_deterministic_inference", "--enable-deterministic-inference"),
    ):
        if g(name):
            out.append(f"{flag} is not supported with tokenbutler")
    if g("disaggregation_mode", "null") not in (None, "null"):
        out.append(f"--disaggregation-mode {g('disaggregation_mode')} is not supported (the sketch cache is not transferred)")
    # --tp-size and --dp-size (replicas) are supported; --pp-size depends on the partition (resolve)
    if (g("attn_cp_size") or 1) > 1:
        out.append(
            f"--attention-context-parallel-size {g('attn_cp_size')} is not supported with tokenbutler: it splits a request's "
            "KV cache over ranks, and the selection ranks a request's whole context"
        )
    if g("dllm_algorithm"):
        out.append("diffusion LLM decoding is not supported")
    out += adapter.extra_unsupported(sa)
    return out


# ----- predictor and policy ----------------------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    """Everything the backend needs, checked."""

    predictor: str  # folder or Hub id as given (resolved to a folder if shipped)
    config: Any  # butler_zoo.ButlerConfig
    policy: Any  # butler_zoo.SparsePolicy (prediction_interval 1)
    max_budget: int | None
    notes: tuple[str, ...] = ()

    def static_budget(self, table_len: int) -> int:
        """The top-k every decode step selects (static: it shapes the CUDA graphs): what the budget (and the
        cap, both counted in positions read in all) leaves after the sinks and the window."""
        b = self.policy.max_budget(table_len)
        if self.max_budget is not None:
            b = min(b, self.max_budget - self.policy.sinks - self.policy.window)
        return max(int(b), 0)

    def sketch_bytes_per_token(self, num_layers: int, start_layer: int, num_kv_heads: int, element_size: int) -> int:
        """Sketch cache bytes per token slot over the layers ``[start_layer, start_layer + num_layers)``
        (layer 0 runs dense and has no sketch)."""
        served = sum(1 for l in range(start_layer, start_layer + num_layers) if l >= 1)
        return served * num_kv_heads * self.config.sketch_dim * element_size


def _locate_predictor(name: str) -> str:
    from butler_zoo import zoo

    shipped = zoo.shipped_predictors()
    if name in shipped:
        return str(shipped[name])
    return name


def _load_config(predictor: str):
    from butler_zoo.config import ButlerConfig
    from butler_zoo.errors import ButlerError
    from butler_zoo.hub import resolve_predictor_files

    try:
        config_path, weights_path = resolve_predictor_files(predictor, local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")))
        return ButlerConfig.load(config_path), weights_path
    except ButlerError as e:
        raise TokenButlerStartupError(f"--tokenbutler-predictor {predictor}: {e}") from None
    except Exception as e:  # network errors and the like: never let them pass silently
        raise TokenButlerStartupError(f"--tokenbutler-predictor {predictor}: cannot load its config ({type(e).__name__}: {e})") from None


def resolve(server_args, hf_config=None) -> Resolved:
    """Check everything that can be checked without a GPU; raise :class:`TokenButlerStartupError`
    with every problem found. ``hf_config`` defaults to the served model's (``server_args``)."""
    problems = []
    reason = check_sglang_version()
    if reason:
        raise TokenButlerStartupError(reason)
    problems += unsupported_reasons(server_args)
    values = requested_values(server_args)
    if not values["predictor"]:
        problems.append(
            "no predictor: pass --tokenbutler-predictor FOLDER_OR_REPO_ID (or set TOKENBUTLER_PREDICTOR), the "
            "predictor trained for the served model (see `butler-zoo list`)"
        )
    if problems:
        raise TokenButlerStartupError("cannot serve with tokenbutler:\n  - " + "\n  - ".join(problems))

    predictor = _locate_predictor(values["predictor"])
    config, _ = _load_config(predictor)
    if hf_config is None:
        hf_config = _served_hf_config(server_args)
    _check_model(config, hf_config, predictor)
    _check_parallel(config, server_args)

    from butler_zoo.errors import BudgetError

    notes = []
    try:
        policy = config.default_policy.with_overrides(budget=values["budget"], sinks=values["sinks"], window=values["window"])
        if policy.prediction_interval != 1:
            notes.append(
                f"the predictor's default prediction_interval {policy.prediction_interval} is not implemented in the "
                "SGLang backend: the predictor runs at every decode step"
            )
            policy = policy.with_overrides(prediction_interval=1)
    except BudgetError as e:
        raise TokenButlerStartupError(f"invalid TokenButler policy: {e}") from None
    max_budget = values["max_budget"]
    if max_budget is not None and isinstance(policy.budget, int) and policy.budget > max_budget:
        raise TokenButlerStartupError(
            f"--tokenbutler-max-budget {max_budget} is below the token budget {policy.budget}: drop it or raise it"
        )
    return Resolved(predictor=predictor, config=config, policy=policy, max_budget=max_budget, notes=tuple(notes))


def served_model_config(server_args):
    """The served model's SGLang ``ModelConfig`` (``compat.api().model_config``)."""
    from butler_sglang.compat import api

    return api().model_config(server_args)


def _served_hf_config(server_args):
    try:
        return served_model_config(server_args).hf_config
    except Exception as e:
        raise TokenButlerStartupError(f"cannot read the served model's config ({type(e).__name__}: {e})") from None


def _check_model(config, hf_config, predictor: str) -> None:
    from butler_zoo.attach import check_compatible
    from butler_zoo.errors import ButlerError

    arch = " ".join(getattr(hf_config, "architectures", None) or [])
    if getattr(hf_config, "kv_lora_rank", None) is not None or "Deepseek" in arch:
        raise TokenButlerStartupError(f"{arch or 'this model'} uses MLA attention, which tokenbutler does not support (MHA/GQA only)")
    try:
        check_compatible(config, hf_config)
    except ButlerError as e:
        raise TokenButlerStartupError(f"--tokenbutler-predictor {predictor} does not fit the served model: {e}") from None
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, name, None):
            raise TokenButlerStartupError(f"models with {name} are not supported by tokenbutler")


def _check_parallel(config, server_args) -> None:
    """Tensor parallelism: the KV heads must split over (or replicate evenly on) the attention-TP ranks.
    Pipeline parallelism: every stage must be able to run the producers of the layers it serves
    (``parallel.pipeline_problem``, on the partition SGLang will build)."""
    from butler_sglang.compat import api
    from butler_sglang.parallel import kv_heads_of_rank, pipeline_problem

    adapter = api()
    tp = int(adapter.setting(server_args, "tp_size", 1) or 1)
    try:
        kv_heads_of_rank(config.num_key_value_heads, tp, 0)
    except ValueError as e:
        raise TokenButlerStartupError(f"--tp-size {tp}: {e}") from None
    pp = int(adapter.setting(server_args, "pp_size", 1) or 1)
    if pp > 1:
        try:
            problem = pipeline_problem(config, pp, lambda rank: adapter.pp_indices(config.num_hidden_layers, rank, pp))
        except ValueError as e:  # a malformed SGLANG_PP_LAYER_PARTITION
            raise TokenButlerStartupError(f"--pp-size {pp}: {e}") from None
        if problem:
            raise TokenButlerStartupError(problem)


def validate_server_args(server_args) -> Resolved | None:
    """Launcher-side check (an AFTER hook of ``ServerArgs.check_server_args``): ``None`` when the
    backend is not used; raises :class:`TokenButlerStartupError` otherwise."""
    values = getattr(server_args, SERVER_ARGS_ATTR, None) or {}
    given = sorted(f"--tokenbutler-{k.replace('_', '-')}" for k, v in values.items() if v is not None)
    if not _mentions_backend(server_args):
        if given:
            raise TokenButlerStartupError(
                f"{', '.join(given)} given, but the tokenbutler backend is not selected: add "
                "--decode-attention-backend tokenbutler"
            )
        return None
    return resolve(server_args)


def describe(resolved: Resolved, table_len: int) -> str:
    """One log line: predictor, policy and the static top-k."""
    p = resolved.policy
    cap = f" (the {p.budget:.0%} budget capped at {resolved.static_budget(table_len)} tokens)" if isinstance(p.budget, float) else ""
    return (
        f"TokenButler: predictor {resolved.predictor}; {p.describe()}{cap}; sketch width "
        f"{resolved.config.sketch_dim}, producer stride {resolved.config.producer_stride}"
    )
