"""A plain `tokenizers` tokenizer saved beside a Qwen2 config loads as itself (transformers 5's AutoTokenizer would
take Qwen2's byte-level class and encode a word-level vocabulary to nothing)."""

from transformers import Qwen2Config

from grpo.bench.assets import write_prompts, write_word_tokenizer
from grpo.data import load_pretrained_tokenizer, read_rows


def test_word_level_tokenizer_beside_a_qwen2_config(tmp_path):
    write_word_tokenizer(tmp_path, 50)
    Qwen2Config(vocab_size=50).save_pretrained(str(tmp_path))
    tok = load_pretrained_tokenizer(tmp_path)
    assert tok("w5 w7 w49")["input_ids"] == [5, 7, 49]
    assert tok.decode([5, 7]) == "w5 w7"
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_prompt_file_has_exact_token_lengths(tmp_path):
    write_word_tokenizer(tmp_path, 50)
    write_prompts(tmp_path / "p.jsonl", num=5, length=12, vocab_size=50)
    tok = load_pretrained_tokenizer(tmp_path)
    rows = read_rows(tmp_path / "p.jsonl")
    assert len(rows) == 5
    assert all(len(tok(r["prompt"][0]["content"])["input_ids"]) == 12 for r in rows)
