"""ClipTokenizer: transformers' ids, EOT-preserving truncation, functional word positions."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from clipmatch.errors import IncompatibleModelError, InputError, ModelNotFoundError, TextError
from clipmatch.inputs.tokenizer import ClipTokenizer, TokenBatch
from clipmatch_export.tokenizer_build import default_corpus, train_clip_tokenizer

SDK = Path(__file__).resolve().parents[3] / "sdk"

TEXTS = [
    "a red cube left of a blue ball",
    "A RED Cube Above A Small Green Sphere",
    "Hello, World!",
    "it's a dog's life; they're here, we've gone, I'm done, you'll see, he'd go",
    "123 apples and 4567 pears",
    "3.14159 + 2.71828 = 5.85987",
    "café naïve résumé",
    "Cafe\u0301 in decomposed form",
    "emoji 🙂🐶 party 🎉",
    "multiple   spaces    between",
    "new\nline\n\ttab\r\nwindows",
    "  leading and trailing  ",
    "zorblax quintessential xylophone",
    "supercalifragilisticexpialidocious",
    "C'est la vie",
    "Ünïcödé ÄÖÜ straße",
    "日本語のテキスト",
    "Привет мир",
    "مرحبا بالعالم",
    "a—dash – and … ellipsis",
    'quotes "double" and \'single\'',
    "<|startoftext|> inside",
    "text with <|endoftext|> inside",
    "UPPER <|ENDOFTEXT|> special",
    "no-cat",
    "a dog, not a cat",
    "left-of the box",
    "x",
    "!!!",
    "#hashtag @mention",
    "snake_case and camelCase",
    "https://example.com/path?q=1&r=2",
    "e-mail: a.b@c.de",
    "ﬁ ligature and İstanbul",
    "ǅ titlecase",
    "1st 2nd 3rd 4th",
    "😀😀😀😀😀",
    "a" * 50,
    "mixed CASE Words With Numbers 42",
    "leftover cleft bereft",
]
LONG = " ".join(["a small red cube left of a big blue ball"] * 20)  # 200 words


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The trained folder, a vocab/merges copy with configs, and a bare vocab/merges copy."""
    root = tmp_path_factory.mktemp("tokenizers")
    full = train_clip_tokenizer(default_corpus(), root / "full")
    slim, bare = root / "slim", root / "bare"
    shutil.copytree(full, slim)
    (slim / "tokenizer.json").unlink()
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(full / name, bare / name)
    return {"full": full, "slim": slim, "bare": bare}


@pytest.fixture(scope="module")
def tok(folders):
    return ClipTokenizer.from_dir(folders["full"])


def _hf_pipeline(backend_json: str) -> dict:
    # Padding and truncation are call-time state in transformers, not the pipeline.
    data = json.loads(backend_json)
    data.pop("padding")
    data.pop("truncation")
    return data


# --- parity with transformers -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["full", "slim", "bare"])
def test_ids_match_transformers(folders, variant):
    ours = ClipTokenizer.from_dir(folders[variant])
    theirs = transformers.CLIPTokenizer.from_pretrained(folders[variant])
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.pad_id == theirs.pad_token_id
    assert ours.vocab_size == len(theirs)
    # The whole rebuilt pipeline, added-token flags included, is transformers'.
    assert _hf_pipeline(ours.backend.to_str()) == _hf_pipeline(theirs.backend_tokenizer.to_str())

    batch = ours(TEXTS)
    expected = theirs(TEXTS, padding=True)
    np.testing.assert_array_equal(batch.input_ids, np.array(expected["input_ids"]))
    np.testing.assert_array_equal(batch.attention_mask, np.array(expected["attention_mask"]))
    assert not batch.truncated.any()

    for n in (77, 16, 5):
        cut = ours(TEXTS + [LONG], max_length=n)
        expected = theirs(TEXTS + [LONG], padding=True, truncation=True, max_length=n)
        np.testing.assert_array_equal(cut.input_ids, np.array(expected["input_ids"]))
        np.testing.assert_array_equal(cut.attention_mask, np.array(expected["attention_mask"]))


def test_special_token_ids(folders, tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.context_length == 77
    vocab = json.loads((folders["full"] / "vocab.json").read_text(encoding="utf-8"))
    assert tok.vocab_size == len(vocab)


def test_identity_is_stable_and_source_independent(folders, tok, tmp_path):
    assert len(tok.identity) == 64 and int(tok.identity, 16) >= 0
    assert ClipTokenizer.from_dir(folders["full"]).identity == tok.identity
    # Same vocabulary, merges and added-token flags: same identity.
    assert ClipTokenizer.from_dir(folders["slim"]).identity == tok.identity
    # No config: transformers flags the specials normalized=False, a different tokenizer.
    assert ClipTokenizer.from_dir(folders["bare"]).identity != tok.identity
    other = train_clip_tokenizer(default_corpus()[:50], tmp_path / "other")
    assert ClipTokenizer.from_dir(other).identity != tok.identity


def test_context_length_from_config_and_argument(folders, tmp_path):
    short = train_clip_tokenizer(default_corpus(), tmp_path / "short", context_length=32)
    assert ClipTokenizer.from_dir(short).context_length == 32
    assert ClipTokenizer.from_dir(short, context_length=20).context_length == 20
    # transformers writes model_max_length=1e30 when nothing says; that is not a length.
    assert ClipTokenizer.from_dir(folders["bare"]).context_length == 77
    with pytest.raises(InputError, match="context_length"):
        ClipTokenizer.from_dir(short, context_length=1)


# --- truncation and padding ---------------------------------------------------------------


def test_long_text_is_cut_to_context_length_ending_in_eot(tok):
    batch = tok([LONG, "a red cube"])
    assert batch.input_ids.shape == (2, 77)
    assert batch.truncated.tolist() == [True, False]
    assert batch.lengths.tolist()[0] == 77
    assert batch.input_ids[0, 0] == tok.bos_id and batch.input_ids[0, -1] == tok.eos_id
    assert batch.attention_mask[0].all()
    # The short row is right-padded with pad_id and masked.
    n = int(batch.lengths[1])
    assert batch.input_ids[1, n - 1] == tok.eos_id
    assert (batch.input_ids[1, n:] == tok.pad_id).all() and not batch.attention_mask[1, n:].any()
    assert batch.attention_mask[1, :n].all()


def test_max_length_override(tok):
    batch = tok([LONG, "a red cube"], max_length=10)
    assert batch.input_ids.shape == (2, 10)
    assert batch.truncated.tolist() == [True, False]
    assert batch.input_ids[0, -1] == tok.eos_id
    # Exactly the limit is not a cut.
    exact = int(tok(["a red cube"]).lengths[0])
    assert not tok(["a red cube"], max_length=exact).truncated[0]
    assert tok(["a red cube"], max_length=exact - 1).truncated[0]
    for bad in (1, 78, "10", 2.5):
        with pytest.raises(InputError, match="max_length"):
            tok(["a red cube"], max_length=bad)


def test_dtypes_and_shapes(tok):
    batch = tok(["a red cube", "a dog"])
    for a in (batch.input_ids, batch.attention_mask, batch.functional_ids, batch.lengths):
        assert a.dtype == np.int64
    assert batch.truncated.dtype == np.bool_ and batch.truncated.shape == (2,)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.functional_ids.shape
    assert len(batch) == 2
    np.testing.assert_array_equal(batch.lengths, batch.attention_mask.sum(axis=1))


# --- functional words ----------------------------------------------------------------------


def _marked_tokens(tok, batch, row, value):
    ids = batch.input_ids[row][batch.functional_ids[row] == value]
    return "".join(tok.backend.id_to_token(int(i)) for i in ids)


def test_functional_word_is_found_by_its_own_tokens(tok):
    texts = ["a cube left of a ball", "leftover cleft", "a dog, not a cat", "no-cat", "LEFT of it", "left's edge"]
    batch = tok(texts, functional_words=["left", "not", "no"])
    assert _marked_tokens(tok, batch, 0, 1) == "left</w>"
    assert not batch.functional_ids[1].any()
    assert _marked_tokens(tok, batch, 2, 2) == "not</w>" and set(batch.functional_ids[2].tolist()) == {0, 2}
    assert _marked_tokens(tok, batch, 3, 3) == "no</w>" and set(batch.functional_ids[3].tolist()) == {0, 3}
    assert _marked_tokens(tok, batch, 4, 1) == "left</w>"
    assert _marked_tokens(tok, batch, 5, 1) == "left</w>"
    # BOS, EOT and padding are never functional.
    assert not batch.functional_ids[:, 0].any()
    assert not batch.functional_ids[batch.attention_mask == 0].any()
    for row, n in enumerate(batch.lengths.tolist()):
        assert batch.functional_ids[row, n - 1] == 0


def test_functional_word_split_into_several_tokens(tok):
    batch = tok(["a zorblax above a Zorblax"], functional_words=["zorblax"])
    marked = np.flatnonzero(batch.functional_ids[0])
    pieces = tok.backend.encode("zorblax", add_special_tokens=False).tokens
    assert len(pieces) > 1  # out of corpus, so BPE splits it
    assert len(marked) == 2 * len(pieces)
    assert _marked_tokens(tok, batch, 0, 1) == "".join(pieces) * 2


def test_functional_ids_follow_list_positions(tok):
    words = ["above", "below", "left", "right", "not", "no"]
    batch = tok(["no cube above a ball, not below the right one"], functional_words=words)
    ids = batch.input_ids[0]
    found = {tok.backend.id_to_token(int(i)): int(f) for i, f in zip(ids, batch.functional_ids[0]) if f}
    assert found == {"no</w>": 6, "above</w>": 1, "not</w>": 5, "below</w>": 2, "right</w>": 4}
    # A repeated word keeps its first position.
    again = tok(["left"], functional_words=["left", "LEFT"])
    assert again.functional_ids[0].tolist() == [0, 1, 0]


def test_functional_ids_survive_truncation(tok):
    full = tok([LONG], max_length=77, functional_words=["left"])
    wide = tok([LONG + " end"], functional_words=["left"])  # same prefix, also cut
    cut = tok([LONG], max_length=20, functional_words=["left"])
    assert cut.truncated[0] and cut.functional_ids[0, -1] == 0  # the EOT put back at the end
    np.testing.assert_array_equal(cut.functional_ids[0, :19], full.functional_ids[0, :19])
    np.testing.assert_array_equal(wide.functional_ids, full.functional_ids)
    assert (cut.functional_ids[0] == 1).sum() == 2  # "left" twice in the first 18 tokens


def test_functional_words_must_be_single_words(tok):
    for bad in ["left of", "", "no-cat", "it's", "<|endoftext|>", 3]:
        with pytest.raises(ValueError, match="functional word 0"):
            tok(["a cube"], functional_words=[bad])
    with pytest.raises(ValueError, match="not the string"):
        tok(["a cube"], functional_words="left")


# --- errors --------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="nope") as info:
        ClipTokenizer.from_dir(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_folder_with_only_vocab_names_merges(folders, tmp_path):
    shutil.copyfile(folders["full"] / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(ModelNotFoundError) as info:
        ClipTokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert "lacks tokenizer.json and merges.txt:" in message
    assert "needs tokenizer.json, or vocab.json and merges.txt" in message
    assert str(tmp_path) in message


def test_empty_folder_names_every_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="lacks tokenizer.json and vocab.json and merges.txt"):
        ClipTokenizer.from_dir(tmp_path)


def test_garbage_files(folders, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(IncompatibleModelError, match="tokenizer.json"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}', encoding="utf-8")
    with pytest.raises(IncompatibleModelError, match="WordPiece"):
        ClipTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    shutil.copyfile(folders["full"] / "vocab.json", tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot a pair line\n", encoding="utf-8")
    with pytest.raises(IncompatibleModelError, match="merges.txt"):
        ClipTokenizer.from_dir(tmp_path)


def test_tokenizer_without_clip_special_tokens(folders, tmp_path):
    vocab = json.loads((folders["full"] / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copyfile(folders["full"] / "merges.txt", tmp_path / "merges.txt")
    with pytest.raises(IncompatibleModelError, match=r"<\|startoftext\|>.*<\|endoftext\|>"):
        ClipTokenizer.from_dir(tmp_path)


def test_bad_texts(tok):
    with pytest.raises(InputError, match="no texts given") as info:
        tok([])
    assert info.value.index is None
    with pytest.raises(TextError, match="pass \\[text\\]"):
        tok("a red cube")
    cases = [(["a", 7], 1, "int"), (["a", "b", ""], 2, "empty"), (["a", " \n\t "], 1, "whitespace"),
             (["a", None], 1, "NoneType"), ([b"bytes"], 0, "bytes")]
    for texts, index, word in cases:
        with pytest.raises(TextError, match=word) as info:
            tok(texts)
        assert info.value.index == index
        assert str(info.value).startswith(f"item {index}:")


# --- TokenBatch.fit ------------------------------------------------------------------------


def test_fit_pads(tok):
    batch = tok(["a red cube left of a ball", "a dog"], functional_words=["left"])
    wide = batch.fit(20)
    t = batch.input_ids.shape[1]
    assert wide.input_ids.shape == wide.attention_mask.shape == wide.functional_ids.shape == (2, 20)
    np.testing.assert_array_equal(wide.input_ids[:, :t], batch.input_ids)
    assert (wide.input_ids[:, t:] == tok.pad_id).all()
    assert not wide.attention_mask[:, t:].any() and not wide.functional_ids[:, t:].any()
    np.testing.assert_array_equal(wide.functional_ids[:, :t], batch.functional_ids)
    np.testing.assert_array_equal(wide.lengths, batch.lengths)
    np.testing.assert_array_equal(wide.truncated, batch.truncated)
    assert wide.input_ids.dtype == np.int64


def test_fit_cuts_without_putting_eot_back(tok):
    batch = tok(["a red cube left of a ball", "a dog"])
    short_len = int(batch.lengths[1])
    cut = batch.fit(short_len)
    assert cut.input_ids.shape == (2, short_len)
    np.testing.assert_array_equal(cut.input_ids, batch.input_ids[:, :short_len])
    assert cut.input_ids[0, -1] != tok.eos_id  # a prefix, no EOT re-inserted
    assert cut.truncated.tolist() == [True, False]
    assert cut.lengths.tolist() == [short_len, short_len]
    np.testing.assert_array_equal(cut.lengths, cut.attention_mask.sum(axis=1))
    assert not batch.truncated.any()  # the original is untouched
    assert batch.fit(batch.input_ids.shape[1]).truncated.tolist() == [False, False]
    with pytest.raises(InputError, match="fit length"):
        batch.fit(0)


def test_token_batch_is_a_plain_dataclass():
    b = TokenBatch(np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64), np.zeros((1, 2), np.int64),
                   np.array([False]), np.array([2]), pad_id=9)
    assert b.fit(3).input_ids.tolist() == [[0, 0, 9]]


# --- no torch ------------------------------------------------------------------------------


def test_import_does_not_pull_in_torch_or_transformers():
    code = ("import clipmatch.inputs.tokenizer, sys; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'transformers' not in sys.modules, 'transformers'")
    env = {**os.environ, "PYTHONPATH": str(SDK)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
