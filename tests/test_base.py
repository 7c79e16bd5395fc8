"""Loading a predictor's base: the GGUF tokenizer repair (same special tokens on every supported transformers)."""

from __future__ import annotations

from conftest import char_tokenizer

from butler_zoo.base import repair_gguf_tokenizer


def _write_gguf(path, bos=1, eos=2, unk=0, pad=None):
    """A GGUF file holding only tokenizer metadata (no tensors): all `repair_gguf_tokenizer` reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_repair_sets_the_special_tokens_the_gguf_names(tmp_path):
    # What transformers 5.6 and 5.17 build from a Llama GGUF: eos = the bos token, no pad, spaces cleaned up.
    tok = char_tokenizer()
    tok.eos_token = "<s>"
    tok.clean_up_tokenization_spaces = True
    assert tok.decode(tok("a .")["input_ids"]) == "a."
    repair_gguf_tokenizer(tok, _write_gguf(tmp_path / "m.gguf", bos=1, eos=2, unk=0, pad=2))
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.decode(tok("a .")["input_ids"]) == "a ."


def test_repair_leaves_a_correct_tokenizer_and_absent_keys_alone(tmp_path):
    tok = char_tokenizer()
    before = tok("hello world")["input_ids"]
    repair_gguf_tokenizer(tok, _write_gguf(tmp_path / "m.gguf", bos=1, eos=2, unk=0))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.pad_token is None  # the GGUF names no padding token
    assert tok("hello world")["input_ids"] == before
