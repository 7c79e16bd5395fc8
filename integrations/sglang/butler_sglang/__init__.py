"""SGLang plugin: the ``tokenbutler`` decode attention backend of butler-zoo.

Installing butler-zoo registers ``butler_sglang.plugin:register`` in SGLang's
``sglang.srt.plugins`` entry-point group. SGLang calls it in the launcher (before the command line
is parsed) and again in every scheduler process. It adds

* the attention backend name ``tokenbutler`` (``--decode-attention-backend tokenbutler`` or
  ``--attention-backend tokenbutler``),
* the launch flags ``--tokenbutler-predictor``, ``--tokenbutler-budget``, ``--tokenbutler-sinks``,
  ``--tokenbutler-window`` and ``--tokenbutler-max-budget`` (environment variables
  ``TOKENBUTLER_PREDICTOR`` ... for ``sgl.Engine(**kwargs)``, which rejects unknown keywords),
* the sketch cache's bytes in the KV pool sizing.

Without the backend name nothing changes: the hooks pass straight through. See ``docs/sglang.md``.
Only the SGLang releases in :data:`SUPPORTED_SGLANG_VERSIONS` are supported; asking for the backend
on another release stops the launch with a message. Where they differ, the plugin goes through the
version adapters of ``butler_sglang.compat``; ``compat.GPU_TESTED`` names the releases the GPU checks
ran on (0.5.12), the others are CPU-tested only (the startup log lines say so).
"""

SUPPORTED_SGLANG_VERSIONS = ("0.5.12", "0.5.23")
BACKEND_NAME = "tokenbutler"

__all__ = ["SUPPORTED_SGLANG_VERSIONS", "BACKEND_NAME"]
