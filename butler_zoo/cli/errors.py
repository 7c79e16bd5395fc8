"""How the CLI words an exception for the one ``Error: ...`` line every command prints."""

from __future__ import annotations

import os

from butler_zoo.errors import ButlerError, network_cause


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def network_message(e: BaseException, what: str = "the Hugging Face Hub") -> str:
    return (f"could not reach {what} at {hub_endpoint()} ({type(e).__name__}: {_first_line(str(e), 160) or 'no answer'}); "
            "check the network connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only what is in the local cache")


def user_message(e: BaseException) -> str:
    """One message for ``e`` that names the problem and, where we know it, the fix."""
    if isinstance(e, ButlerError):
        return str(e).strip() or type(e).__name__
    net = network_cause(e)
    if net is not None:
        return network_message(net)
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}; choose a path you can write to"
    if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return f"{e.filename or e}: {e.strerror or e}; a file and a folder are in each other's way: choose another path"
    if isinstance(e, FileNotFoundError):
        return f"no such file or folder: {e.filename or e}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, batch, budget or --max-new-tokens"
    return (f"{type(e).__name__}: {_first_line(str(e)) or 'no message'} (an unexpected error: `butler-zoo --debug ...` "
            "shows the traceback; please report it)")
