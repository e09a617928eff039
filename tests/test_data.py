"""megalong.data: tokenizers, demo text, preprocessing to IndexedDataset, pretraining datasets on
megatron-core's GPTDataset, SFT label masks, flat token files, and the data CLIs' bad-input path
(one line, exit 2, nothing left on disk)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megalong.data.demo_text import demo_documents, repeat_chunks, write_demo_jsonl
from megalong.data.preprocess import (
    load_token_file, preprocess_to_indexed, read_index_summary, write_token_file,
)
from megalong.config.data import parse_data_prefix
from megalong.data.pretrain import check_pretrain_data, split_bounds
from megalong.data.sft import (
    LLAMA2_SYSTEM_PROMPT, SftDataset, build_sft_sample, collate_sft, llama2_chat_prompt,
    load_sft_records,
)
from megalong.data.tokenizer import load_tokenizer, train_sentencepiece
from megalong.errors import MegalongError
from megalong.spawn import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = os.path.join(ROOT, "tools", "preprocess_data.py")
TRAIN_TOKENIZER = os.path.join(ROOT, "tools", "train_tokenizer.py")


def documents_of(jsonl):
    with open(jsonl, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


# ---------------------------------------------------------------- tokenizer and demo text


def test_demo_text_is_deterministic_and_bounded(tmp_path):
    topics = list(demo_documents("topics"))
    assert len(topics) > 50 and sum(map(len, topics)) > 300_000
    assert list(demo_documents("topics")) == topics
    limited = list(demo_documents("stdlib", max_bytes=200_000))
    assert 200_000 <= sum(len(t.encode()) for t in limited) < 200_000 + max(len(t.encode()) for t in limited)
    count, _ = write_demo_jsonl(str(tmp_path / "d.jsonl"), "docstrings", max_bytes=50_000)
    assert count == len(documents_of(tmp_path / "d.jsonl")) > 0
    with pytest.raises(MegalongError, match="unknown demo text source"):
        list(demo_documents("novels"))
    assert repeat_chunks("abcde", 2) == "ababcdcdee" and repeat_chunks("", 3) == ""
    write_demo_jsonl(str(tmp_path / "r.jsonl"), "docstrings", max_bytes=50_000, repeat_chars=7)
    plain, repeated = documents_of(tmp_path / "d.jsonl"), documents_of(tmp_path / "r.jsonl")
    assert [repeat_chunks(t, 7) for t in plain] == repeated


def test_sentencepiece_round_trip(sp_model):
    for path in (sp_model, os.path.dirname(sp_model)):  # the file or its directory
        tok = load_tokenizer(path)
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eod, tok.pad_id) == (1000, 1, 2, 2, None)
    for text in demo_documents("topics"):
        ids = tok.encode(text)
        assert ids and tok.bos_id not in ids and tok.eos_id not in ids
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    # Byte fallback: characters never seen in training still round-trip.
    assert tok.decode(tok.encode("naïve → 東京 🚀\n\tx")) == "naïve → 東京 🚀\n\tx"


def test_hf_tokenizers_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.decoder = decoders.WordPiece()
    rust.add_special_tokens(["<s>", "</s>", "<pad>"])
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("hf-tokenizers", 6, 1, 2, 3)
    assert tok.encode("hello world") == [4, 5]
    assert tok.decode([4, 5]) == "hello world"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(MegalongError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(MegalongError, match="not a readable sentencepiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(MegalongError, match="no text"):
        train_sentencepiece(["", "  \n"], 500, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- preprocessing


def test_preprocess_reads_back_every_document(corpus, demo_jsonl, sp_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(sp_model)
    texts = documents_of(demo_jsonl)
    dataset = IndexedDataset(corpus)
    assert len(dataset) == len(texts)
    assert dataset.index.dtype == np.uint16
    for i, text in enumerate(texts):
        assert dataset[i].tolist() == tok.encode(text) + [tok.eos_id]
    summary = read_index_summary(corpus + ".bin")  # a file name works as the prefix
    assert summary.num_documents == len(texts)
    assert summary.num_tokens == sum(len(tok.encode(t)) + 1 for t in texts)
    assert summary.dtype == "uint16"


def test_preprocess_text_files_paragraphs_and_workers(tmp_path, sp_model, demo_jsonl, corpus):
    tok = load_tokenizer(sp_model)
    (tmp_path / "a.txt").write_text("First paragraph.\nStill first.\n\n\nSecond one.\n")
    (tmp_path / "b.txt").write_text("Another file.")
    (tmp_path / "empty.txt").write_text("")
    whole = preprocess_to_indexed([str(tmp_path / "*.txt")], str(tmp_path / "out" / "whole"), sp_model,
                                  append_eod=False, progress=None)
    paragraphs = preprocess_to_indexed([str(tmp_path / "a.txt")], str(tmp_path / "para"), sp_model,
                                       split_paragraphs=True, progress=None)
    assert (whole.documents, paragraphs.documents) == (2, 2)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # (Keep each IndexedDataset referenced while reading: items are views of its mmap.)
    whole_ds, para_ds = IndexedDataset(str(tmp_path / "out" / "whole")), IndexedDataset(str(tmp_path / "para"))
    assert whole_ds[1].tolist() == tok.encode("Another file.")
    assert para_ds[1].tolist() == tok.encode("Second one.") + [2]
    # Two tokenizing processes write byte-identical files.
    preprocess_to_indexed([demo_jsonl], str(tmp_path / "par"), sp_model, workers=2, progress=None)
    for suffix in (".bin", ".idx"):
        with open(corpus + suffix, "rb") as a, open(str(tmp_path / "par") + suffix, "rb") as b:
            assert a.read() == b.read()
    assert sorted(os.listdir(tmp_path / "out")) == ["whole.bin", "whole.idx"]


def test_preprocess_failure_leaves_nothing(tmp_path, sp_model):
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": "\\n"}\n')
    (tmp_path / "nokey.jsonl").write_text('{"body": "text"}\n')
    for name, fragment in (("blank.jsonl", "input is empty"), ("nokey.jsonl", "no key 'text'")):
        with pytest.raises(MegalongError, match=fragment):
            preprocess_to_indexed([str(tmp_path / name)], str(tmp_path / "new" / "x"), sp_model,
                                  progress=None)
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "nokey.jsonl"]


def run_tool(tool, *args):
    return subprocess.run([sys.executable, tool, *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_cli_bad_inputs_one_line_exit_2(tmp_path, sp_model, demo_jsonl):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "out" / "corpus"
    cases = [
        (["--input", tmp_path / "missing.jsonl", "--tokenizer", sp_model], "does not exist"),
        (["--input", tmp_path / "*.parquet", "--tokenizer", sp_model], "matches no files"),
        (["--input", tmp_path / "empty.jsonl", "--tokenizer", sp_model], "input is empty"),
        (["--input", demo_jsonl, "--tokenizer", tmp_path / "no_tokenizer"], "tokenizer"),
        (["--input", demo_jsonl, "--tokenizer", sp_model, "--workers", "0"], "--workers"),
    ]
    for args, fragment in cases:
        result = run_tool(PREPROCESS, *args, "--output-prefix", out)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), result.stderr
        assert fragment in result.stderr
    # An output directory that cannot be created (its parent is a file).
    result = run_tool(PREPROCESS, "--input", demo_jsonl, "--tokenizer", sp_model,
                      "--output-prefix", tmp_path / "a_file" / "corpus")
    assert result.returncode == 2 and ("not writable" in result.stderr or "not a directory" in result.stderr)
    if os.geteuid() != 0:  # root ignores permission bits
        (tmp_path / "locked").mkdir(mode=0o500)
        result = run_tool(PREPROCESS, "--input", demo_jsonl, "--tokenizer", sp_model,
                          "--output-prefix", tmp_path / "locked" / "corpus")
        assert result.returncode == 2 and "not writable" in result.stderr
        assert os.listdir(tmp_path / "locked") == []
    result = run_tool(TRAIN_TOKENIZER, "--vocab-size", "500", "--out", tmp_path / "tok")
    assert result.returncode == 2 and "--demo-text" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty.jsonl"] + (
        ["locked"] if os.geteuid() != 0 else [])


def test_train_tokenizer_cli(tmp_path):
    result = run_tool(TRAIN_TOKENIZER, "--demo-text", "--vocab-size", "600", "--out", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert load_tokenizer(str(tmp_path / "tok")).vocab_size == 600


# ---------------------------------------------------------------- flat token files


def test_flat_token_files(tmp_path):
    ids = np.array([0, 5, 65535, 17], dtype=np.int64)
    write_token_file(str(tmp_path / "a.bin"), ids, vocab_size=65536)
    assert os.path.getsize(tmp_path / "a.bin") == 8
    loaded = load_token_file(str(tmp_path / "a.bin"))
    assert loaded.dtype == np.uint16 and loaded.tolist() == ids.tolist()
    big = np.array([1, 128255], dtype=np.int64)
    write_token_file(str(tmp_path / "b.bin"), big, vocab_size=128256)
    assert load_token_file(str(tmp_path / "b.bin"), vocab_size=128256).tolist() == big.tolist()
    assert load_token_file(str(tmp_path / "b.bin"), np.uint32).dtype == np.uint32
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(MegalongError, match="whole number"):
        load_token_file(str(tmp_path / "odd.bin"))
    with pytest.raises(MegalongError, match="does not exist"):
        load_token_file(str(tmp_path / "none.bin"))
    with pytest.raises(MegalongError, match=r"\[0, 100\)"):
        write_token_file(str(tmp_path / "c.bin"), [100], vocab_size=100)


# ---------------------------------------------------------------- pretraining datasets


def test_data_prefix_parsing_and_checks(tmp_path, corpus):
    assert parse_data_prefix(["0.3 a", "0.7", "b.bin"]) == (["a", "b"], [0.3, 0.7])
    assert parse_data_prefix("a b c") == (["a", "b", "c"], None)
    assert split_bounds("98,2,0") == [(0.0, 0.98), (0.98, 1.0), None]
    assert check_pretrain_data([corpus], 128)[0].num_documents > 50
    with pytest.raises(MegalongError, match=str(tmp_path / "missing")):
        check_pretrain_data([str(tmp_path / "missing")], 128)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16)
    builder.finalize(str(tmp_path / "empty.idx"))
    with pytest.raises(MegalongError, match="empty.*no tokens"):
        check_pretrain_data([str(tmp_path / "empty")], 128)
    with pytest.raises(MegalongError, match="valid split"):
        check_pretrain_data([corpus], 128, split="999,1,0")
    with pytest.raises(MegalongError, match="fewer than one sample"):
        check_pretrain_data([corpus], 10**6, split="1,0,0")


def pretrain_samples(corpus, second, tokenizer_path, seq_length):
    """On one gloo rank: samples of a single-prefix dataset checked against the token stream,
    and a weighted blend of two prefixes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megalong import runtime
    from megalong.data.pretrain import build_pretrain_datasets

    runtime.init_distributed()
    train, valid = build_pretrain_datasets([corpus], seq_length, seed=7, split="90,10,0",
                                           num_samples=(40, 8), tokenizer=tokenizer_path)
    documents = IndexedDataset(corpus)
    mismatches = 0
    for dataset in (train, valid):
        stream = np.concatenate([documents[int(d)] for d in dataset.document_index])
        for idx in range(len(dataset)):
            item = dataset[idx]
            start = int(dataset.shuffle_index[idx]) * seq_length
            run = stream[start: start + seq_length + 1]
            mismatches += not (np.array_equal(item["tokens"].numpy(), run[:-1])
                               and np.array_equal(item["labels"].numpy(), run[1:]))
    item = train[0]
    valid_docs = set(valid.document_index.tolist())
    blend_train, blend_valid = build_pretrain_datasets(["0.25", corpus, "0.75", second], seq_length,
                                                       seed=7, split="90,10,0", num_samples=(40, 8),
                                                       tokenizer=tokenizer_path)
    return {
        "mismatches": mismatches, "lengths": (len(train), len(valid)),
        "dtypes": {k: str(v.dtype) for k, v in item.items()},
        "shapes": {k: tuple(v.shape) for k, v in item.items()},
        "loss_mask_sum": float(item["loss_mask"].sum()), "positions": item["position_ids"].tolist(),
        "valid_docs": valid_docs, "train_docs": set(train.document_index.tolist()),
        "blend": (type(blend_train).__name__, len(blend_train), len(blend_valid)),
        "blend_tokens": blend_train[3]["tokens"].shape[0],
    }


def test_pretrain_datasets_on_one_gloo_rank(tmp_path, corpus, sp_model, demo_jsonl):
    second = str(tmp_path / "second")
    preprocess_to_indexed([demo_jsonl], second, sp_model, split_paragraphs=True, progress=None)
    seq_length = 64
    (out,) = run_on_ranks(pretrain_samples, 1, corpus, second, sp_model, seq_length, timeout_s=120)
    assert out["mismatches"] == 0
    assert out["lengths"][0] >= 40 and out["lengths"][1] >= 8
    assert out["dtypes"] == {"tokens": "torch.int64", "labels": "torch.int64",
                             "loss_mask": "torch.float32", "position_ids": "torch.int64"}
    assert set(out["shapes"].values()) == {(seq_length,)}
    assert out["loss_mask_sum"] == seq_length and out["positions"] == list(range(seq_length))
    assert not out["valid_docs"] & out["train_docs"]  # the split is by documents
    assert out["blend"][0] == "BlendedDataset" and out["blend"][1:] == (40, 8)
    assert out["blend_tokens"] == seq_length
    assert os.path.isdir(os.path.join(os.path.dirname(corpus), "index-cache"))


# ---------------------------------------------------------------- SFT


def test_sft_sample_layout_on_known_ids():
    sample = build_sft_sample([10, 11, 12], [20, 21], bos_id=1, eos_id=2, pad_id=0,
                              seq_length=16, group_size=4)
    assert sample["tokens"].tolist() == [1, 10, 11, 12, 20, 21, 2, 0]
    assert sample["labels"].tolist() == [10, 11, 12, 20, 21, 2, 0, 0]
    # Counted exactly where the label is an answer token (20, 21) or the EOS.
    assert sample["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert sample["position_ids"].tolist() == list(range(8))
    # Truncated to seq_length: the EOS falls off, the surviving answer tokens still count.
    cut = build_sft_sample([10, 11, 12], [20, 21, 22, 23, 24], bos_id=1, eos_id=2, pad_id=0,
                           seq_length=6, group_size=2)
    assert cut["tokens"].tolist() == [1, 10, 11, 12, 20, 21]
    assert cut["loss_mask"].tolist() == [0, 0, 0, 1, 1, 0]
    gone = build_sft_sample([10] * 9, [20], bos_id=1, eos_id=2, pad_id=0, seq_length=8, group_size=4)
    assert gone["loss_mask"].sum() == 0
    full = build_sft_sample([10], [20], bos_id=1, eos_id=2, pad_id=0, seq_length=12, group_size=4,
                            pad_to_seq_length=True)
    assert full["tokens"].shape == (12,) and full["loss_mask"].tolist() == [0, 1, 1] + [0] * 9
    with pytest.raises(MegalongError, match="not a multiple of group size 4"):
        build_sft_sample([1], [2], bos_id=1, eos_id=2, pad_id=0, seq_length=10, group_size=4)


def test_sft_dataset_masks_the_prompt(tmp_path, sp_model):
    records = [
        {"instruction": "Which keyword starts a loop?", "input": "", "output": "The keyword is for."},
        {"instruction": "Summarise the text.", "input": "A long paper " * 30, "output": "It is long."},
    ]
    path = tmp_path / "longalpaca.json"
    path.write_text(json.dumps(records))
    tok = load_tokenizer(sp_model)
    group_size = 16
    dataset = SftDataset(str(path), sp_model, seq_length=1024, group_size=group_size)
    assert len(dataset) == 2
    prompt = tok.encode("[INST]Which keyword starts a loop?[/INST]")
    answer = tok.encode("The keyword is for.")
    item = dataset[0]
    used = 1 + len(prompt) + len(answer) + 1
    length = item["tokens"].shape[0]
    assert length % group_size == 0 and length - group_size < used <= length
    assert item["tokens"][:used].tolist() == [1] + prompt + answer + [2]
    assert item["labels"][:-1].tolist() == item["tokens"][1:].tolist()
    mask = item["loss_mask"].tolist()
    counted = [label for label, m in zip(item["labels"].tolist(), mask) if m]
    assert counted == answer + [2]  # the answer and its EOS, nothing of the prompt or padding
    assert mask == [0.0] * len(prompt) + [1.0] * (len(answer) + 1) + [0.0] * (length - used + 1)
    assert tok.decode(item["tokens"][: 1 + len(prompt)].tolist()) == "[INST]Which keyword starts a loop?[/INST]"
    # With an input the system prompt block is used.
    with_input = llama2_chat_prompt(records[1]["instruction"], records[1]["input"])
    assert with_input.startswith("[INST] <<SYS>>\n" + LLAMA2_SYSTEM_PROMPT + "\n<</SYS>> \n\n Summarise")
    assert with_input.endswith(" \n" + records[1]["input"] + " [/INST]")
    second = dataset[1]
    assert second["loss_mask"].sum() == len(tok.encode("It is long.")) + 1
    batch = dataset.collate([dataset[0], dataset[1]])
    width = max(length, second["tokens"].shape[0])
    assert batch["tokens"].shape == (2, width) and width % group_size == 0
    assert batch["loss_mask"].sum() == item["loss_mask"].sum() + second["loss_mask"].sum()
    assert batch["position_ids"][0].tolist() == list(range(width))
    assert (batch["tokens"][0, length:] == dataset.pad_id).all()


def test_sft_collate_pads_and_masks():
    a = build_sft_sample([5], [6], bos_id=1, eos_id=2, pad_id=0, seq_length=16, group_size=4)
    b = build_sft_sample([5] * 6, [6], bos_id=1, eos_id=2, pad_id=0, seq_length=16, group_size=4)
    batch = collate_sft([a, b], pad_id=0)
    assert batch["tokens"].shape == (2, 12)
    assert batch["tokens"][0].tolist() == [1, 5, 6, 2] + [0] * 8
    assert batch["loss_mask"][0].tolist() == [0, 1, 1] + [0] * 9
    assert batch["labels"].dtype == batch["tokens"].dtype


def test_sft_records_errors(tmp_path):
    with pytest.raises(MegalongError, match="does not exist"):
        load_sft_records(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text('[{"instruction": "q"}]')
    with pytest.raises(MegalongError, match=r"bad.json\[0\] lacks a string 'output'"):
        load_sft_records(str(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(MegalongError, match="no records"):
        load_sft_records(str(tmp_path / "empty.json"))
    (tmp_path / "ok.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    assert load_sft_records(str(tmp_path / "ok.jsonl")) == [{"instruction": "q", "output": "a"}]


def first_items(corpus, tokenizer_path, cache_dir):
    from megalong import runtime
    from megalong.data.pretrain import build_pretrain_datasets

    runtime.init_distributed()
    train, valid = build_pretrain_datasets(corpus, 32, seed=11, num_samples=(20, 4),
                                           tokenizer=tokenizer_path, cache_dir=cache_dir)
    return [train[i]["tokens"].tolist() for i in range(3)] + [valid[0]["labels"].tolist()]


@pytest.mark.slow
def test_pretrain_datasets_two_ranks_agree(tmp_path, corpus, sp_model):
    """Rank 0 builds the index caches while rank 1 waits at megatron's barriers; both then read
    the same samples, equal to a single-rank build."""
    two = run_on_ranks(first_items, 2, corpus, sp_model, str(tmp_path / "cache2"), timeout_s=120)
    (one,) = run_on_ranks(first_items, 1, corpus, sp_model, str(tmp_path / "cache1"), timeout_s=120)
    assert two[0] == two[1] == one


def test_a_tokenizer_without_bos_feeds_every_data_path(no_bos_tokenizer, demo_jsonl, tmp_path):
    """Qwen's tokenizers have no BOS ("bos_token": null, even with a "<s>" in the vocabulary):
    pretraining documents, SFT samples and passkey prompts are built without one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megalong.data.preprocess import preprocess_to_indexed
    from megalong.data.sft import SftDataset
    from megalong.eval.passkey import fit_passkey_prompt

    tok = load_tokenizer(no_bos_tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 0, 0) and tok.vocab_size == 400
    assert tok.describe()["bos_id"] is None
    texts = documents_of(demo_jsonl)[:5]
    prefix = str(tmp_path / "docs")
    records = [{"text": t} for t in texts]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    preprocess_to_indexed([str(tmp_path / "docs.jsonl")], prefix, no_bos_tokenizer, progress=None)
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(5)] == [tok.encode(t) + [0] for t in texts]
    sft = SftDataset([{"instruction": "Say hi.", "output": "hi there"}], tok, seq_length=512,
                     group_size=64)
    sample = sft.encode(0)
    prompt = tok.encode(llama2_chat_prompt("Say hi.", ""))
    answer = tok.encode("hi there")
    used = len(prompt) + len(answer) + 1
    assert sample["tokens"][:used].tolist() == prompt + answer + [0]
    assert sample["loss_mask"].sum() == len(answer) + 1  # the answer and its EOS, from label 0 on
    fitted = fit_passkey_prompt(tok.encode, 300, 0.5, "48213", extra_tokens=0)
    assert 250 < len(tok.encode(fitted.text)) <= 300
