"""Prompt embedders: mask-aware mean pooling on a tiny real GPT-2, the offline MiniLM, the id-keyed cache."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from disa.embeddings import (
    ModelPoolEmbedder,
    PromptEmbedder,
    SentenceEmbedder,
    embed_with_cache,
    make_embedder,
    masked_mean_pool,
)

CORPUS = [
    "what is two plus three",
    "compute the sum of the digits of 1234",
    "a train leaves the station at noon",
    "find x such that 2x + 3 = 11",
    "write a function that reverses a list",
    "how many primes are below twenty",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls on a shared 2-core box: extra intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_gpt2():
    """A randomly initialised 2-layer GPT-2 and a BPE tokenizer trained here with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval(), tokenizer


def test_masked_mean_pool_ignores_padding_numbers():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = masked_mean_pool(hidden.to(torch.bfloat16), mask)
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled, torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    with pytest.raises(ValueError, match=r"rows \[1\] have no tokens"):
        masked_mean_pool(hidden, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="does not match"):
        masked_mean_pool(hidden, torch.ones(2, 2))


def test_model_pool_is_mean_of_last_hidden_states(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    embedder = ModelPoolEmbedder(model, tokenizer, batch_size=4)
    text = CORPUS[3]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(dim=1)
    got = embedder.embed([text])
    assert got.shape == (1, 32) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
    assert embedder.dim == 32 and embedder.fingerprint.startswith("reference:")


def test_model_pool_padding_does_not_change_a_prompt(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    tokenizer.padding_side = "left"  # the embedder pads by hand on the right whatever the tokenizer says
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in CORPUS]
    assert len(set(lengths)) > 2, "the batch must actually need padding"
    alone = torch.cat([ModelPoolEmbedder(model, tokenizer, batch_size=1).embed([t]) for t in CORPUS])
    batched = ModelPoolEmbedder(model, tokenizer, batch_size=len(CORPUS)).embed(CORPUS)
    assert batched.shape == (len(CORPUS), 32)
    assert torch.allclose(alone, batched, atol=1e-5)
    # distinct prompts get distinct vectors (pooling did not collapse to padding)
    assert torch.cdist(batched, batched).fill_diagonal_(1.0).min() > 1e-3
    # output is an ordinary tensor: usable under autograd downstream
    assert not batched.is_inference()


def test_model_pool_from_path_matches_object(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    model.save_pretrained(tmp_path / "ref")
    tokenizer.save_pretrained(tmp_path / "ref")
    from_path = make_embedder("reference", model=str(tmp_path / "ref"), batch_size=3)
    from_object = make_embedder("reference", model=model, tokenizer=tokenizer)
    assert torch.allclose(from_path.embed(CORPUS), from_object.embed(CORPUS), atol=1e-5)
    assert from_path.fingerprint == f"reference:{(tmp_path / 'ref').resolve()}"


def test_embedder_argument_errors(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    with pytest.raises(ValueError, match="tokenizer: required"):
        ModelPoolEmbedder(model)
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        ModelPoolEmbedder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="kind: unknown embedder 'bert'"):
        make_embedder("bert")
    with pytest.raises(ValueError, match="model: the 'reference' embedder needs"):
        make_embedder("reference")
    with pytest.raises(FileNotFoundError, match="sentence-embedding model directory"):
        SentenceEmbedder(tmp_path / "nothing")
    embedder = ModelPoolEmbedder(model, tokenizer)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str"):
        embedder.embed(["ok", 3])
    with pytest.raises(TypeError, match="texts: expected a list of str"):
        embedder.embed("just one string")
    assert embedder.embed([]).shape == (0, 32)


class CountingEmbedder(PromptEmbedder):
    """Length/vowel features; records every text it is asked to embed."""

    batch_size = 4

    def __init__(self, fingerprint="counting"):
        self.fingerprint = fingerprint
        self.seen = []

    @property
    def dim(self):
        return 2

    def _embed_batch(self, texts):
        self.seen.extend(texts)
        return torch.tensor([[len(t), sum(c in "aeiou" for c in t)] for t in texts], dtype=torch.float32)


def test_embed_with_cache_reuses_and_invalidates(tmp_path):
    cache = tmp_path / "cache" / "emb.safetensors"
    embedder = CountingEmbedder()
    first = embed_with_cache(embedder, ["a", "b", "c"], ["xx", "yyy", "aaaa"], cache)
    assert first.tolist() == [[2, 0], [3, 0], [4, 4]] and sorted(embedder.seen) == ["aaaa", "xx", "yyy"]
    embedder.seen.clear()
    again = embed_with_cache(embedder, ["c", "a"], ["aaaa", "xx"], cache)
    assert embedder.seen == [] and again.tolist() == [[4, 4], [2, 0]]
    # a new id and an edited text are embedded; the rest is read from disk
    mixed = embed_with_cache(embedder, ["a", "b", "d"], ["xx", "yyyyy", "oo"], cache)
    assert sorted(embedder.seen) == ["oo", "yyyyy"] and mixed.tolist() == [[2, 0], [5, 0], [2, 2]]
    other = CountingEmbedder(fingerprint="other-model")
    embed_with_cache(other, ["a"], ["xx"], cache)
    assert other.seen == ["xx"], "a cache from another embedder must not be reused"
    with pytest.raises(ValueError, match=r"duplicate prompt ids \['a'\]"):
        embed_with_cache(embedder, ["a", "a"], ["x", "y"], cache)
    assert embed_with_cache(embedder, [1], ["zz"]).tolist() == [[2, 0]]  # no cache path: plain embed


def test_fit_z_end_to_end_on_reference_embeddings(tiny_gpt2, tmp_path):
    """Stage 2 on pi_ref features: labels -> fit -> save -> FrozenLogZ reproduces the held-out numbers."""
    from disa.stages.fit_z import FrozenLogZ, run_fit_z

    model, tokenizer = tiny_gpt2
    words = " ".join(CORPUS).split()
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(words), (240, 6), generator=gen).tolist()
    prompts = {f"q{i}": " ".join(words[j] for j in row) for i, row in enumerate(picks)}
    embedder = ModelPoolEmbedder(model, tokenizer, batch_size=16)
    ids = list(prompts)
    feats = embedder.embed([prompts[i] for i in ids])
    direction = torch.randn(feats.shape[1], generator=gen)
    log_z = ((feats - feats.mean(0)) / feats.std(0) @ direction / math.sqrt(feats.shape[1]) * 2.0 + 4.0).tolist()
    pq.write_table(pa.table({"prompt_id": ids, "log_z": log_z}), tmp_path / "labels.parquet")
    report = run_fit_z(tmp_path / "labels.parquet", prompts, embedder, tmp_path / "log_z",
                       hidden=64, lr=3e-3, max_epochs=200, patience=20, progress=False, verbose=False)
    assert report.val_r2 > 0.9, report
    frozen = FrozenLogZ(tmp_path / "log_z", ModelPoolEmbedder(model, tokenizer))
    val_ids = json.loads((tmp_path / "log_z" / "report.json").read_text())["val_prompt_ids"]
    pred = frozen([prompts[i] for i in val_ids])
    target = torch.tensor([log_z[ids.index(i)] for i in val_ids])
    assert not pred.requires_grad
    assert math.isclose(float(((pred - target) ** 2).mean()), report.val_mse, rel_tol=1e-4)


@pytest.fixture(scope="module")
def minilm():
    return SentenceEmbedder(batch_size=2)


def test_sentence_embedder_offline_unit_vectors_and_similarity(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [
        "What is the sum of 2 and 3?",
        "Compute 2 + 3.",
        "The weather in Paris is rainy today.",
    ]
    emb = minilm.embed(texts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and minilm.dim == 384
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4)
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[1, 2] + 0.2
    assert minilm.fingerprint.startswith("sentence:") and minilm.fingerprint.endswith("model")
    # batching does not change vectors (3 texts, batch_size=2 -> a short last batch)
    assert torch.allclose(torch.cat([minilm.embed([t]) for t in texts]), emb, atol=1e-5)


def test_log_z_table_reads_values_by_id_and_names_missing_ids():
    from disa.stages.fit_z import LogZTable

    table = LogZTable({"a": 1.5, 7: -2.0})
    out = table(["text a", "text 7", "text a"], ["a", 7, "a"])
    assert out.dtype == torch.float32 and out.tolist() == [1.5, -2.0, 1.5]
    with pytest.raises(KeyError, match="'b'"):
        table(["x"], ["b"])
