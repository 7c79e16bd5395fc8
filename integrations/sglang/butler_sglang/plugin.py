"""Entry point of the ``sglang.srt.plugins`` group: ``butler_sglang.plugin:register``.

SGLang runs it in the launcher before the command line is parsed and again in each scheduler
process, and swallows (logs) any ``Exception`` a plugin raises: failures that must stop the launch
are raised as ``SystemExit`` with a message. When the backend is not asked for, a failure here only
logs a warning, and every hook passes straight through, so installing butler-zoo never changes a
server that does not use TokenButler.

Registered on a supported SGLang release:

* attention backend ``tokenbutler`` (``attention_registry.register_attention_backend`` and the
  ``--*-attention-backend`` choices);
* AROUND ``ServerArgs.add_cli_args``: the ``--tokenbutler-*`` flags;
* AROUND ``ServerArgs.from_cli_args``: their values on ``server_args._tokenbutler``, and
  ``--attention-backend triton`` for prefill when only ``--decode-attention-backend tokenbutler``
  is given (SGLang's default prefill backend on Hopper, fa3, is not supported);
* AFTER ``ServerArgs.check_server_args`` (launcher): every startup check, ``SystemExit`` on failure;
* AROUND ``DefaultPoolConfigurator._compute_cell_size`` (scheduler): the sketch cache's bytes per
  token, so the KV pool is sized with the sketch in it.

The hook targets are the same in every supported release; what the hooks receive differs, and goes
through ``butler_sglang.compat`` (e.g. ``_compute_cell_size`` gets the ModelRunner in 0.5.12 and the
KVCacheConfigurator in 0.5.23).
"""

from __future__ import annotations

import logging
import os
import sys

from butler_sglang import BACKEND_NAME, settings

logger = logging.getLogger(__name__)

__all__ = ["register"]

_registered = False
_resolved_cache: dict[int, settings.Resolved] = {}


def _requested_on_command_line(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return any(a.startswith("--tokenbutler") or a == BACKEND_NAME or a.endswith("=" + BACKEND_NAME) for a in argv) or any(
        os.environ.get(v) for v in settings.ENV_VARS.values()
    )


def register() -> None:
    """Register the backend, the flags and the hooks (idempotent)."""
    global _registered
    if _registered:
        return
    wanted = _requested_on_command_line()
    reason = settings.check_sglang_version()
    if reason:
        if wanted:
            raise SystemExit(f"butler-zoo: {reason}")
        logger.warning("butler-zoo: tokenbutler backend not registered: %s", reason)
        return
    try:
        _register()
    except SystemExit:
        raise
    except Exception as e:  # SGLang would swallow it: stop the launch if the backend was asked for
        if wanted:
            raise SystemExit(f"butler-zoo: the tokenbutler plugin failed to load: {type(e).__name__}: {e}") from e
        logger.warning("butler-zoo: tokenbutler backend not registered: %s: %s", type(e).__name__, e)
        return
    _registered = True


def _register() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(_create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    sa = "sglang.srt.server_args.ServerArgs"
    HookRegistry.register(f"{sa}.add_cli_args", _add_cli_args_hook, HookType.AROUND)
    HookRegistry.register(f"{sa}.from_cli_args", _from_cli_args_hook, HookType.AROUND)
    HookRegistry.register(f"{sa}.check_server_args", _check_server_args_hook, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _cell_size_hook,
        HookType.AROUND,
    )


# ----- hooks ---------------------------------------------------------------------------------------
def _add_cli_args_hook(original, parser, *args, **kwargs):
    result = original(parser, *args, **kwargs)
    settings.add_cli_args(parser)
    return result


def _from_cli_args_hook(original, cls, args, *rest, **kwargs):
    values = settings.values_from_namespace(args)
    if (
        getattr(args, "decode_attention_backend", None) == BACKEND_NAME
        and getattr(args, "attention_backend", None) is None
        and getattr(args, "prefill_attention_backend", None) is None
    ):
        logger.info("TokenButler: --decode-attention-backend tokenbutler without a prefill backend: prefill uses triton")
        args.attention_backend = "triton"
    server_args = original(cls, args, *rest, **kwargs)
    setattr(server_args, settings.SERVER_ARGS_ATTR, values)  # pickled to the scheduler processes with the rest
    return server_args


def _check_server_args_hook(result, server_args, *args, **kwargs):
    try:
        resolved = settings.validate_server_args(server_args)
    except settings.TokenButlerStartupError as e:
        raise SystemExit(f"butler-zoo tokenbutler: {e}") from None
    if resolved is not None:
        from butler_sglang.compat import release_note

        _resolved_cache[id(server_args)] = resolved
        logger.info(
            "TokenButler checks passed on %s: %s",
            release_note(),
            settings.describe(resolved, settings.served_model_config(server_args).context_len),
        )
    return None


def _cell_size_hook(original, self, arg, num_layers, *args, **kwargs):
    # arg: the ModelRunner (0.5.12) or the KVCacheConfigurator (0.5.23), see compat.cell_size_inputs
    size = original(self, arg, num_layers, *args, **kwargs)
    if not settings.backend_selected(arg.server_args):
        return size
    from butler_sglang.compat import api

    inputs = api().cell_size_inputs(arg)
    resolved = _resolved_cache.get(id(inputs.server_args))
    if resolved is None:
        resolved = _resolved_cache[id(inputs.server_args)] = settings.resolve(inputs.server_args, inputs.hf_config)
    extra = resolved.sketch_bytes_per_token(num_layers, inputs.start_layer, inputs.num_kv_heads, inputs.element_size)
    logger.info("TokenButler: the KV pool counts %d sketch bytes per token on top of %d KV bytes", extra, size)
    return size + extra


def _create_backend(model_runner):
    from butler_sglang.backend import create_backend

    return create_backend(model_runner)
