"""`butler-zoo generate`: prompt in, text out, optionally side by side with dense decode."""

from __future__ import annotations

import time

import click

from butler_zoo.cli.options import policy_options

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    return name


def _encode(tokenizer, prompt: str, chat: bool):
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"], ids["attention_mask"]
    enc = tokenizer(prompt, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _read_summary(stats, policy) -> str:
    """What the decode read, said plainly, including when no step was sparse."""
    if stats.fraction_read is None:
        return "no decode step was recorded (nothing was generated past the prompt)"
    if stats.sparse_layer_steps == 0:
        return (f"no decode step was sparse: every context fit in the policy ({policy.describe()}), so decode read "
                "100% of the KV cache, as dense does; use a longer prompt or a smaller --budget")
    return (f"KV positions read during decode: {stats.fraction_read:.1%} of dense (layers the predictor serves; "
            f"{stats.sparse_layer_steps} of {stats.layer_steps} layer steps sparse)")


def _agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@click.command("generate")
@click.argument("prompt")
@click.option("--predictor", "-p", default=None, metavar="PATH_OR_REPO_ID",
              help="Predictor folder or Hub repo id. Default: the SmolLM2-135M-Instruct predictor shipped with butler-zoo.")
@click.option("--base-model", default=None, metavar="PATH_OR_REPO_ID", help="Override the base model pinned in the predictor's config.")
@click.option("--revision", default=None, help="Revision (branch, tag or commit) of the predictor repo.")
@policy_options
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--compare-dense/--no-compare-dense", default=False, show_default=True,
              help="Also decode densely and show both outputs, where they diverge, and the fraction of KV read.")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the tokenizer's chat template if it has one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="auto: bfloat16 on CUDA, float32 on CPU.")
def generate_cmd(prompt, predictor, base_model, revision, budget, sinks, window, prediction_interval, max_new_tokens,
                 compare_dense, chat, device, dtype):
    """Generate text from PROMPT with TokenButler sparse decoding (greedy).

    \b
    Examples:
      butler-zoo generate "The capital of France is" --no-chat -n 8
      butler-zoo generate "Write a haiku about tea." --budget 10% --compare-dense
    """
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty; give the text to continue, e.g. butler-zoo generate \"Hello\"",
                                 param_hint="'PROMPT'")
    import torch

    from butler_zoo.auto import AutoButler
    from butler_zoo.zoo import default_predictor

    device = _device(device)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    predictor = predictor or str(default_predictor())
    click.echo(f"Loading {predictor} ...", err=True)
    model = AutoButler.from_pretrained(
        predictor, base_model=base_model, revision=revision, budget=budget, sinks=sinks, window=window,
        prediction_interval=prediction_interval, dtype=torch_dtype,
    ).to(device)
    tokenizer = AutoButler.tokenizer(predictor, base_model=base_model, revision=revision)
    input_ids, attention_mask = (t.to(device) for t in _encode(tokenizer, prompt, chat))
    if input_ids.shape[1] == 0:
        raise click.BadParameter(f"the prompt {prompt!r} encodes to no tokens; give some text (or drop --no-chat)",
                                 param_hint="'PROMPT'")
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    click.echo(f"Policy: {model.butler.policy.describe()}", err=True)

    stats = model.butler.track_stats()
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen)[0, input_ids.shape[1]:].tolist()
    t_sparse = time.perf_counter() - t0
    model.butler.stats = None  # the dense run below must not count
    read = _read_summary(stats, model.butler.policy)
    text = tokenizer.decode(out, skip_special_tokens=True)
    if not compare_dense:
        click.echo(text)
        click.echo(f"[{len(out)} tokens in {t_sparse:.2f}s; {read}]", err=True)
        return

    t0 = time.perf_counter()
    dense = model.generate(input_ids=input_ids, attention_mask=attention_mask, butler_enabled=False, **gen)[0, input_ids.shape[1]:].tolist()
    t_dense = time.perf_counter() - t0
    same = _agreement(out, dense)
    click.echo(click.style("== TokenButler", bold=True) + f" ({model.butler.policy.describe()})")
    click.echo(text)
    click.echo(click.style("== dense", bold=True))
    click.echo(tokenizer.decode(dense, skip_special_tokens=True))
    click.echo(click.style("== comparison", bold=True))
    click.echo(f"identical tokens before the first divergence: {same}/{min(len(out), len(dense))}"
               + (" (outputs identical)" if out == dense else ""))
    click.echo(read)
    click.echo(f"time: TokenButler {t_sparse:.2f}s, dense {t_dense:.2f}s ({device}; speed is measured by the benchmarks, not here)")


def register(main: click.Group) -> None:
    main.add_command(generate_cmd)
