"""train_clip_tokenizer writes a CLIP folder transformers loads, the same every time."""
from __future__ import annotations

import json
import shutil

import pytest
import transformers
from tokenizers import pre_tokenizers

from clipmatch_export.tokenizer_build import DEFAULT_CORPUS, default_corpus, train_clip_tokenizer

FILES = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
SAMPLES = [
    "A red cube LEFT of a blue ball",
    "a dog, not a cat -- no-cat!!",
    "zorblax quintessential xylophone 1234",
    "café naïve Ünïcödé 日本語 🙂🐶",
    "multiple   spaces\nand\ttabs <|endoftext|> it's",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_clip_tokenizer(default_corpus(), tmp_path_factory.mktemp("tok") / "clip", context_length=64)


def test_writes_the_hugging_face_clip_files(folder):
    assert sorted(p.name for p in folder.iterdir()) == FILES
    assert (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert config["model_max_length"] == 64
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>",
    )
    special_map = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["bos_token"]["content"] == "<|startoftext|>"


def test_vocab_has_specials_first_and_every_byte(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == 0 and vocab["<|endoftext|>"] == 1
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for sym in pre_tokenizers.ByteLevel.alphabet():
        assert sym in vocab and sym + "</w>" in vocab
    assert len(vocab) <= 1000
    # Corpus words end up whole.
    for word in ("left", "right", "above", "below", "not", "without", "absent"):
        assert word + "</w>" in vocab


def test_vocab_size_is_respected(tmp_path):
    out = train_clip_tokenizer(default_corpus(), tmp_path, vocab_size=600)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 600
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert all(a + b in vocab for a, b in (m.split(" ") for m in merges))


def test_deterministic(tmp_path, folder):
    again = train_clip_tokenizer(default_corpus(), tmp_path / "again", context_length=64)
    for name in FILES:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_transformers_loads_it_with_and_without_tokenizer_json(folder, tmp_path):
    slim = tmp_path / "slim"
    shutil.copytree(folder, slim)
    (slim / "tokenizer.json").unlink()
    full_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    slim_tok = transformers.CLIPTokenizer.from_pretrained(slim)
    assert (full_tok.bos_token_id, full_tok.eos_token_id, full_tok.pad_token_id) == (0, 1, 1)
    assert full_tok.model_max_length == slim_tok.model_max_length == 64
    a = full_tok(SAMPLES, padding=True)
    b = slim_tok(SAMPLES, padding=True)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert full_tok.backend_tokenizer.to_str() == slim_tok.backend_tokenizer.to_str()


def test_any_text_encodes_without_unknown_tokens(folder):
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    for text in SAMPLES[:-1] + ["\x00\x7f\u200b", "ǅ ß İ ﬁ", "😀" * 3, "Ω≈ç√∫"]:
        ids = tok(text)["input_ids"]
        # <|endoftext|> is also unk: it may only appear at the end.
        assert ids[0] == 0 and ids[-1] == 1 and 1 not in ids[1:-1], text


def test_default_corpus():
    corpus = default_corpus()
    assert 200 <= len(corpus) <= 1000
    assert corpus == list(DEFAULT_CORPUS) and corpus == default_corpus()
    words = set(" ".join(corpus).replace(",", " ").split())
    for word in ("above", "below", "left", "right", "not", "no", "without", "but", "absent", "small", "big",
                 "red", "cube", "dog", "sitting"):
        assert word in words, word


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="single string"):
        train_clip_tokenizer("a red cube", tmp_path)
    with pytest.raises(ValueError, match="vocab_size=300"):
        train_clip_tokenizer(default_corpus(), tmp_path, vocab_size=300)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        train_clip_tokenizer(["a", 3], tmp_path)
    with pytest.raises(ValueError, match="no words"):
        train_clip_tokenizer(["   "], tmp_path)
