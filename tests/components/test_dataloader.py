"""Packed, DP-sharded, stateful dataloader and the shard/text/demo sources."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hydra_titan.components import datasets
from hydra_titan.components.dataloader import (FILE_SOURCES, IndexPermutation, PackedWindows, TokenDataLoader,
                                               build_dataloader, load_windows)
from hydra_titan.components.datasets import TokenShard
from hydra_titan.components.tokenizer import Tokenizer, build_tokenizer

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]
WORDS = "and the of to in that he shall unto for his a lord they be is him not them it with all thou".split()


@pytest.fixture(scope="module")
def kjv() -> Tokenizer:
    return build_tokenizer("kjv_bpe_4k")


@pytest.fixture(scope="module")
def prepare_data():
    return load_script("prepare_data").main


def _documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "." for i in range(n)]


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, list[str]]:
    docs = _documents(200)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path, docs


def _text_loader(path, tmp_path, **overrides) -> TokenDataLoader:
    kwargs = dict(
        source="text",
        path=str(path),
        tokenizer="kjv_bpe_4k",
        seq_len=16,
        local_batch_size=2,
        dp_rank=0,
        dp_world_size=1,
        split="train",
        val_fraction=0.1,
        seed=0,
        cache_dir=tmp_path / "cache",
    )
    kwargs.update(overrides)
    return build_dataloader(**kwargs)


def _arange_loader(num_windows: int, seq_len: int = 4, **overrides) -> TokenDataLoader:
    """Token i == i, so a window's first input token // seq_len is its window id."""
    tokens = np.arange(num_windows * seq_len + 1, dtype=np.uint32)
    windows = PackedWindows([TokenShard(Path("mem"), {}, tokens)], seq_len)
    kwargs = dict(first_window=0, num_windows=num_windows, local_batch_size=2, dp_rank=0, dp_world_size=1, seed=0, train=True)
    kwargs.update(overrides)
    return TokenDataLoader(windows, **kwargs)


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _window_ids(batch: tuple[torch.Tensor, torch.Tensor], seq_len: int = 4) -> list[int]:
    return (batch[0][:, 0] // seq_len).tolist()


# ----------------------------------------------------------------------------- packing


def test_batch_shapes_dtype_and_shifted_labels(corpus, tmp_path):
    inputs, labels = next(iter(_text_loader(corpus[0], tmp_path, seq_len=32, local_batch_size=3)))
    assert inputs.shape == labels.shape == (3, 32)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])


def test_windows_are_slices_of_the_bos_eos_stream(corpus, tmp_path, kjv):
    path, docs = corpus
    stream = np.concatenate([kjv.encode(d, bos=True, eos=True) for d in docs])
    loader = _text_loader(path, tmp_path, val_fraction=0.0)
    assert loader.windows.num_tokens == len(stream)
    assert len(loader.windows) == (len(stream) - 1) // 16
    for step in range(5):
        ids = loader.window_indices(0, step)
        inputs, labels = loader._batch(0, step)
        for row, w in enumerate(ids.tolist()):
            assert inputs[row].tolist() == stream[w * 16 : w * 16 + 16].tolist()
            assert labels[row].tolist() == stream[w * 16 + 1 : w * 16 + 17].tolist()


# ---------------------------------------------------------------------- DP sharding


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dp_ranks_disjoint_and_complete(world):
    loaders = [_arange_loader(12, dp_rank=r, dp_world_size=world) for r in range(world)]
    assert {len(dl) for dl in loaders} == {12 // (2 * world)}
    per_rank = [{w for batch in _take(dl, len(dl)) for w in _window_ids(batch)} for dl in loaders]
    assert sum(len(s) for s in per_rank) == 12
    assert set().union(*per_rank) == set(range(12))


def test_global_batch_is_independent_of_world_size():
    single = _take(_arange_loader(48, local_batch_size=6), 5)
    ranks = [_take(_arange_loader(48, local_batch_size=2, dp_rank=r, dp_world_size=3), 5) for r in range(3)]
    for step in range(5):
        joined = torch.cat([ranks[r][step][0] for r in range(3)])
        assert torch.equal(joined, single[step][0])


def test_ranks_take_equal_steps_when_windows_do_not_divide():
    loaders = [_arange_loader(13, dp_rank=r, dp_world_size=3) for r in range(3)]
    assert [len(dl) for dl in loaders] == [2, 2, 2]


# ----------------------------------------------------------------------- splits


def test_train_and_val_are_disjoint_and_cover(corpus, tmp_path):
    train = _text_loader(corpus[0], tmp_path, local_batch_size=1)
    val = _text_loader(corpus[0], tmp_path, split="val", local_batch_size=1)
    total = len(train.windows)
    assert val.num_windows == math.ceil(0.1 * total)
    train_ids = {w for s in range(len(train)) for w in train.window_indices(0, s).tolist()}
    val_ids = {w for s in range(len(val)) for w in val.window_indices(0, s).tolist()}
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(total))


def test_val_is_one_repeatable_pass(corpus, tmp_path):
    val = _text_loader(corpus[0], tmp_path, split="val")
    first, second = list(val), list(val)
    assert len(first) == len(val) > 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


def test_train_reshuffles_each_epoch_and_covers_it():
    loader = _arange_loader(40, local_batch_size=4)
    batches = _take(loader, 20)
    epoch0 = [w for b in batches[:10] for w in _window_ids(b)]
    epoch1 = [w for b in batches[10:] for w in _window_ids(b)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1 and epoch0 != list(range(40))
    assert loader.state_dict()["epoch"] == 1


def test_seed_changes_order():
    a = [_window_ids(b) for b in _take(_arange_loader(40, seed=1), 5)]
    b = [_window_ids(b) for b in _take(_arange_loader(40, seed=2), 5)]
    assert a != b


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 100, 1000, 4097])
def test_index_permutation_is_a_bijection(n):
    perm = IndexPermutation(n, seed=n)
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(perm(np.arange(n)[::-1]), out[::-1])  # a pure function of the position


# ---------------------------------------------------------------------- state


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("taken", [0, 3, 5, 9, 10, 17])
def test_resume_yields_exactly_the_next_batches(taken):
    """steps_per_epoch is 5: covers mid-epoch, exact epoch ends and later epochs."""
    reference = _take(_arange_loader(20, local_batch_size=4), taken + 8)
    first = _arange_loader(20, local_batch_size=4)
    _take(first, taken)
    state = first.state_dict()
    resumed = _arange_loader(20, local_batch_size=4)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # plain ints survive any serialisation
    _assert_same_batches(_take(resumed, 8), reference[taken:])


def test_resume_on_text_source(corpus, tmp_path):
    reference = _take(_text_loader(corpus[0], tmp_path, dp_rank=1, dp_world_size=2), 30)
    first = _text_loader(corpus[0], tmp_path, dp_rank=1, dp_world_size=2)
    _take(first, 12)
    resumed = _text_loader(corpus[0], tmp_path, dp_rank=1, dp_world_size=2)
    resumed.load_state_dict(first.state_dict())
    _assert_same_batches(_take(resumed, 18), reference[12:])


def test_state_is_rank_independent_and_survives_new_dp_degree():
    ranks = [_arange_loader(48, local_batch_size=3, dp_rank=r, dp_world_size=2) for r in range(2)]
    for dl in ranks:
        _take(dl, 3)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = _arange_loader(48, local_batch_size=6)
    reference = _take(single, 6)[3:]
    resumed = _arange_loader(48, local_batch_size=6)
    resumed.load_state_dict(ranks[0].state_dict())
    _assert_same_batches(_take(resumed, 3), reference)


def test_state_from_other_data_or_batch_is_refused():
    src = _arange_loader(20, local_batch_size=4)
    _take(src, 1)
    with pytest.raises(ValueError, match="num_windows"):
        _arange_loader(21, local_batch_size=4).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="seed"):
        _arange_loader(20, local_batch_size=4, seed=5).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="global batch"):
        _arange_loader(20, local_batch_size=3).load_state_dict(src.state_dict())


# ----------------------------------------------------------- shards and prepare_data


def test_shards_match_text_source(corpus, tmp_path, prepare_data):
    out = tmp_path / "shards" / "corpus.bin"
    assert prepare_data(["--input", str(corpus[0]), "--output", str(out)]) == 0
    header = json.loads(out.with_suffix(".json").read_text())
    assert header["dtype"] == "uint16" and header["vocab_size"] == 4096 and header["num_documents"] == 200
    assert out.stat().st_size == 2 * header["num_tokens"]
    for split in ("train", "val"):
        text = _take(_text_loader(corpus[0], tmp_path, split=split), 4)
        shard = _take(_text_loader(out, tmp_path, source="shards", split=split), 4)
        _assert_same_batches(shard, text)


def test_prepare_data_uses_uint32_for_large_vocab(corpus, tmp_path, prepare_data):
    out = tmp_path / "o200k.bin"
    assert prepare_data(["--input", str(corpus[0]), "--tokenizer", "o200k_base", "--output", str(out)]) == 0
    header = json.loads(out.with_suffix(".json").read_text())
    assert header["dtype"] == "uint32" and header["vocab_size"] == 200020
    tok = build_tokenizer("o200k_base")
    expected = [i for d in corpus[1] for i in tok.encode(d, bos=True, eos=True)]
    assert np.fromfile(out, dtype=np.uint32).tolist() == expected


def test_prepare_data_refuses_to_overwrite(corpus, tmp_path, prepare_data):
    out = tmp_path / "c.bin"
    assert prepare_data(["--input", str(corpus[0]), "--output", str(out)]) == 0
    with pytest.raises(SystemExit):
        prepare_data(["--input", str(corpus[0]), "--output", str(out)])
    before = out.stat().st_mtime_ns
    assert prepare_data(["--input", str(corpus[0]), "--output", str(out), "--overwrite"]) == 0
    assert out.stat().st_mtime_ns >= before
    with pytest.raises(SystemExit) as info:
        prepare_data(["--help"])
    assert info.value.code == 0


def test_shard_vocab_mismatch_fails_clearly(corpus, tmp_path, prepare_data):
    out = tmp_path / "c.bin"
    prepare_data(["--input", str(corpus[0]), "--output", str(out)])
    with pytest.raises(ValueError, match=r"kjv_bpe_4k.*4096.*cl100k_base.*100278"):
        _text_loader(out, tmp_path, source="shards", tokenizer="cl100k_base")


def test_truncated_shard_is_detected(corpus, tmp_path, prepare_data):
    out = tmp_path / "c.bin"
    prepare_data(["--input", str(corpus[0]), "--output", str(out)])
    out.write_bytes(out.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        _text_loader(out, tmp_path, source="shards")


def test_an_id_outside_the_vocabulary_names_the_file_and_offset(corpus, tmp_path, prepare_data):
    out = tmp_path / "c.bin"
    prepare_data(["--input", str(corpus[0]), "--output", str(out)])
    tokens = np.fromfile(out, dtype=np.uint16)
    tokens[1234] = 4096  # the first id the 4k vocabulary does not have
    tokens[2000] = 60000
    tokens.tofile(out)
    with pytest.raises(ValueError, match=r"c.bin: id 4096 at token offset 1234 is outside the vocabulary"):
        _text_loader(out, tmp_path, source="shards")
    from hydra_titan.components.datasets import first_at_or_above
    assert first_at_or_above(tokens, 4096, chunk=1000) == 1234 and first_at_or_above(tokens, 60001) is None


def test_a_shard_of_another_tokenizer_with_the_same_vocab_size_fails(corpus, tmp_path, prepare_data):
    out = tmp_path / "c.bin"
    prepare_data(["--input", str(corpus[0]), "--output", str(out)])
    header = json.loads(out.with_suffix(".json").read_text())
    header["tokenizer"], header["tokenizer_fingerprint"] = "other_bpe_4k", "0" * 64
    out.with_suffix(".json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=r"c.bin was written with tokenizer 'other_bpe_4k'.*different ids"):
        _text_loader(out, tmp_path, source="shards")


def test_an_unreadable_shard_is_a_clear_error(corpus, tmp_path, prepare_data):
    out = tmp_path / "c.bin"
    prepare_data(["--input", str(corpus[0]), "--output", str(out)])
    out.with_suffix(".json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match=r"token shard .*c.bin cannot be read"):
        _text_loader(out, tmp_path, source="shards")


def test_folder_of_shards_is_concatenated(tmp_path, prepare_data):
    folder = tmp_path / "many"
    for i in range(2):
        src = tmp_path / f"part{i}.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents(60, seed=i)))
        prepare_data(["--input", str(src), "--output", str(folder / f"part{i}.bin")])
    loader = _text_loader(folder, tmp_path, source="shards", val_fraction=0.0, local_batch_size=1)
    assert [s.path.name for s in loader.windows.shards] == ["part0.bin", "part1.bin"]
    assert len(loader.windows) == sum((s.num_tokens - 1) // 16 for s in loader.windows.shards)
    last_of_first = (loader.windows.shards[0].num_tokens - 1) // 16 - 1
    window = loader.windows.get(np.array([last_of_first, last_of_first + 1]))
    assert window[1].tolist() == loader.windows.shards[1].tokens[:17].tolist()


# ------------------------------------------------------------------- sources, errors


@pytest.mark.parametrize("source", ["text", "shards"])
def test_missing_path_names_it(tmp_path, source):
    missing = tmp_path / "no_such_dir" / "*.jsonl"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        _text_loader(missing, tmp_path, source=source)


def test_jsonl_text_field(tmp_path, kjv):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "In the beginning", "text": "ignored"}) + "\n\n")
    loader = _text_loader(path, tmp_path, text_field="body", seq_len=2, local_batch_size=1, val_fraction=0.0)
    assert loader.windows.num_tokens == len(kjv.encode("In the beginning")) + 2
    with pytest.raises(KeyError, match=r"c.jsonl:1: no field 'title'"):
        _text_loader(path, tmp_path, text_field="title")


def test_txt_folder_one_document_per_file(tmp_path, kjv):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file\n\nwith two paragraphs")
    (folder / "sub" / "a.txt").write_text("first file")
    (folder / "notes.md").write_text("not picked up")
    loader = _text_loader(folder, tmp_path, seq_len=2, local_batch_size=1, val_fraction=0.0)
    expected = kjv.encode("second file\n\nwith two paragraphs", bos=True, eos=True) + kjv.encode("first file", bos=True, eos=True)
    assert loader.windows.shards[0].tokens.tolist() == expected


def test_cache_is_reused_and_invalidated(corpus, tmp_path, monkeypatch):
    _text_loader(corpus[0], tmp_path)

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized although cached")

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    _text_loader(corpus[0], tmp_path)  # cache hit: no tokenization
    corpus[0].write_text(corpus[0].read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(AssertionError, match="re-tokenized"):
        _text_loader(corpus[0], tmp_path)
    assert not list((tmp_path / "cache" / "tokens").glob(".*.tmp"))  # failed write left no temp file


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_TITAN_CACHE", str(tmp_path / "envcache"))
    assert datasets.cache_dir() == tmp_path / "envcache"
    assert datasets.cache_dir(tmp_path / "x") == tmp_path / "x"


def test_demo_source_is_kjv_and_fast(tmp_path):
    start = time.perf_counter()
    loader = build_dataloader(
        source="demo", path="", tokenizer="kjv_bpe_4k", seq_len=256, local_batch_size=4, dp_rank=0,
        dp_world_size=1, split="train", val_fraction=0.01, seed=0, cache_dir=tmp_path,
    )  # fmt: skip
    assert time.perf_counter() - start < 20
    header = loader.windows.shards[0].header
    assert header["num_documents"] == 1189 and 900_000 < header["num_tokens"] < 1_200_000
    inputs, _ = next(iter(loader))
    text = build_tokenizer("kjv_bpe_4k").decode(inputs[0])
    assert sum(w in text.split() for w in ("the", "and", "of")) >= 2


def test_hf_source_needs_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (the torchtitan extra brings it)
    with pytest.raises(ImportError, match="'datasets'"):
        _text_loader("", tmp_path, source="hf", hf_name="some/dataset")


def test_too_little_data_for_one_global_batch(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("In the beginning")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _text_loader(path, tmp_path, seq_len=64, val_fraction=0.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"split": "test"}, "split"),
        ({"source": "s3"}, "unknown data source"),
        ({"dp_rank": 2, "dp_world_size": 2}, "dp_rank"),
        ({"split": "val", "val_fraction": 0.0}, "val_fraction > 0"),
    ],
)
def test_bad_arguments_fail_clearly(corpus, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _text_loader(corpus[0], tmp_path, **overrides)


@pytest.mark.parametrize("source", FILE_SOURCES)
def test_a_file_source_without_a_path_names_the_source_and_its_path_forms(source, kjv):
    forms = {"text": r"\.txt/\.jsonl file", "shards": r"\.bin file"}[source]
    with pytest.raises(ValueError, match=rf"data source '{source}' needs a path \(a {forms}"):
        load_windows(source=source, path="", tokenizer=kjv, seq_len=8)
