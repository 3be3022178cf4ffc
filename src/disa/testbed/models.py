"""Tiny real causal LMs for the exact testbed: a character tokenizer, a GPT-2 reference policy and a
stronger proposal, trained here on CPU and cached on disk in Hugging Face format.

Why these data mixtures:

* ``pi_ref`` sees, for each prompt, a random canonical expression over the prompt's numbers (mostly
  wrong, teaches the grammar) or, with a per-prompt "familiarity" probability, a correct answer. Correct
  answers are drawn with a skew: strategy number ``k`` (ranked by shortest string, then label) gets weight
  ``strategy_skew ** k``, so the model has a dominant correct mode and a tail of rarer forms. Familiarity
  varies across prompts, so ``P_ref(correct | x)`` and hence ``log Z(x)`` vary too (there is something for
  the ``log Z`` regressor to learn).
* the proposal ``q`` starts from ``pi_ref`` and is fine-tuned on mostly correct answers spread uniformly
  over strategies (then strings), with some random expressions kept in: it is right far more often and
  covers the forms ``pi_ref`` rarely produces. ``pi_ref`` itself serves as the weak proposal.

Both are full-support by construction: a softmax at temperature 1 gives every token sequence a nonzero
probability, which is the absolute continuity the importance weights need.
"""

from __future__ import annotations

import logging
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from disa.scoring import pad_batch, token_logprobs
from disa.testbed.progress import ProgressLines, thread_note
from disa.threads import choose_threads, machine_load
from disa.testbed.task import (
    Prompt,
    make_prompts,
    random_expression,
    strategies,
)

log = logging.getLogger(__name__)

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
# Every character a prompt or a canonical response can contain. Prompts use digits, spaces, "->" and "=".
ALPHABET = "0123456789+-*() >="
BUILD_FORMAT_VERSION = 2  # bump when the build recipe changes so old caches are not reused
# (2: a build on 1 thread is the unsuffixed one, and the build records its thread count; caches of version 1
# named a 2-thread full build without a suffix)
DOCUMENTED_BUILD_THREADS = 1  # docs/results/demo.md was made on this build; float results depend on the count
_COMPLETE_MARKER = "build.json"


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def make_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: one token per character, plus pad/eos/unk.

    Built with the ``tokenizers`` library (a WordLevel model over single characters, a pre-tokenizer that
    isolates every character, a Fuse decoder so ``decode`` concatenates without spaces). The vocabulary is
    fixed, not learned from data, so the same ids come out of every build.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN
    )


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_responses(tokenizer, responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each response followed by EOS: the sequence whose probability is ``pi(y | x)``."""
    return [ids + [tokenizer.eos_token_id] for ids in encode_texts(tokenizer, responses)]


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that determines a build; its hash names the cache directory."""

    __test__ = False  # not a pytest class, despite the name

    # few prompts, seen often: the models memorise per-prompt answers, and with 256 prompts neither pi_ref nor
    # q got past ~7% correct in 2000 steps (measured); with 96, q is right about twice as often as pi_ref
    n_train_prompts: int = 96
    n_eval_prompts: int = 32
    n_embd: int = 64  # model width
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 40  # longest prompt (15) + longest response (11) + EOS fits with room
    ref_steps: int = 2000  # optimizer steps for pi_ref
    proposal_steps: int = 1500  # extra fine-tuning steps for q, starting from pi_ref
    batch_size: int = 64
    lr: float = 3e-3
    familiarity_levels: tuple[float, ...] = (0.0, 0.1, 0.3, 0.6)  # per-prompt P(show a correct answer)
    strategy_skew: float = 0.3  # weight of the k-th ranked strategy in pi_ref's correct answers: skew**k
    proposal_correct_frac: float = 0.85  # share of q's fine-tuning data that is correct
    proposal_lr_scale: float = 1.0  # q's fine-tuning learning rate, relative to lr
    seed: int = 0

    def __post_init__(self):
        for name in ("n_train_prompts", "n_eval_prompts", "n_embd", "n_layer", "n_head", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TestbedConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ref_steps", "proposal_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TestbedConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"TestbedConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 < self.strategy_skew <= 1:
            raise ValueError(f"TestbedConfig.strategy_skew must be in (0, 1], got {self.strategy_skew}")
        if not 0 <= self.proposal_correct_frac <= 1:
            raise ValueError(f"TestbedConfig.proposal_correct_frac must be in [0, 1], got {self.proposal_correct_frac}")
        if not self.familiarity_levels or not all(0 <= f <= 1 for f in self.familiarity_levels):
            raise ValueError(f"TestbedConfig.familiarity_levels must be non-empty values in [0, 1], got {self.familiarity_levels}")

    def fingerprint(self) -> str:
        payload = json.dumps({"version": BUILD_FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


FULL_CONFIG = TestbedConfig()
# Seconds on one CPU thread: enough for a model that knows the grammar and some answers.
QUICK_CONFIG = TestbedConfig(
    n_train_prompts=24,
    n_eval_prompts=8,
    n_embd=32,
    n_layer=2,
    n_head=2,
    ref_steps=250,
    proposal_steps=100,
    batch_size=32,
    lr=1e-2,
    familiarity_levels=(0.3, 0.6),
    proposal_lr_scale=0.3,
)


def default_cache_root() -> Path:
    """``$DISA_CACHE_DIR/testbed`` if set, else ``~/.cache/disa/testbed``."""
    base = os.environ.get("DISA_CACHE_DIR")
    return Path(base) / "testbed" if base else Path.home() / ".cache" / "disa" / "testbed"


# --------------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------------


def ranked_strategies(prompt: Prompt) -> list[str]:
    """The prompt's strategies, simplest first (shortest string, then label): the order of pi_ref's skew."""
    table = strategies(prompt)
    shortest: dict[str, int] = {}
    for response, form in table.items():
        shortest[form] = min(shortest.get(form, 10**9), len(response))
    return sorted(shortest, key=lambda form: (shortest[form], form))


@dataclass
class _PromptData:
    """Per-prompt sampling tables for the training mixtures."""

    prompt: Prompt
    familiarity: float
    forms: list[str]  # ranked strategies
    responses_by_form: dict[str, list[str]]


def _prompt_data(prompts: Sequence[Prompt], familiarity_levels: Sequence[float], rng: random.Random) -> list[_PromptData]:
    out = []
    for p in prompts:
        table = strategies(p)
        by_form: dict[str, list[str]] = {}
        for response, form in table.items():
            by_form.setdefault(form, []).append(response)
        out.append(_PromptData(p, rng.choice(list(familiarity_levels)), ranked_strategies(p), by_form))
    return out


def _sample_ref_example(d: _PromptData, skew: float, rng: random.Random) -> str:
    """One response from pi_ref's training mixture for this prompt."""
    if rng.random() < d.familiarity:
        weights = [skew**k for k in range(len(d.forms))]
        form = rng.choices(d.forms, weights=weights)[0]
        return rng.choice(d.responses_by_form[form])
    return random_expression(d.prompt.numbers, rng)


def _sample_proposal_example(d: _PromptData, correct_frac: float, rng: random.Random) -> str:
    """One response from q's fine-tuning mixture: mostly correct, uniform over strategies."""
    if rng.random() < correct_frac:
        form = rng.choice(d.forms)
        return rng.choice(d.responses_by_form[form])
    return random_expression(d.prompt.numbers, rng)


# --------------------------------------------------------------------------------------------------
# training loop
# --------------------------------------------------------------------------------------------------


def make_model(config: TestbedConfig, tokenizer):
    """A freshly initialised tiny GPT-2 (dropout off: the data are infinite, and exact scoring wants
    deterministic forward passes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(model_config)


def response_nll(model, tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Mean over rollouts of ``-log pi(y + EOS | x) / (|y| + 1)``: the per-token response cross-entropy.

    Prompt tokens are not trained: only the conditional ``pi(y | x)`` matters for the testbed.
    """
    batch = pad_batch(encode_texts(tokenizer, prompts), encode_responses(tokenizer, responses), tokenizer.pad_token_id)
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (B, L-1)
    mask = batch["response_mask"]
    return -((logp * mask).sum(1) / mask.sum(1)).mean()


def train_lm(
    model,
    tokenizer,
    data: Sequence[_PromptData],
    sample_response,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rng: random.Random,
    desc: str,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay on a stream of fresh (prompt, response) draws.

    Each batch is drawn anew from the mixture, so the model fits the mixture's distribution rather than a
    finite sample of it. Returns the loss of every step.
    """
    if steps == 0:
        return []
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=None)  # a live bar on a terminal
    report = ProgressLines(desc, steps) if bar.disable else None  # else a line every 10% with the ETA
    for step in bar:
        rows = [rng.choice(data) for _ in range(batch_size)]
        prompts = [r.prompt.text for r in rows]
        responses = [sample_response(r, rng) for r in rows]
        loss = response_nll(model, tokenizer, prompts, responses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if report is not None:
            report.update(step + 1, losses[-1])
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# sampling (exact temperature-1 ancestral sampling, for Monte Carlo checks and demos)
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def sample_responses(
    model,
    tokenizer,
    prompt: str,
    n: int,
    *,
    max_new_tokens: int = 16,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> list[str | None]:
    """``n`` independent samples ``y ~ pi(. | prompt)`` at temperature 1, no top-k/top-p.

    Returns the decoded text before EOS, or ``None`` for a sample that did not emit EOS within
    ``max_new_tokens`` (it is no canonical answer: every correct string is shorter than the default cap).
    Special tokens other than EOS are decoded literally (``"<pad>"``), so they make a response incorrect.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    prompt_ids = encode_texts(tokenizer, [prompt])[0]
    if not prompt_ids:
        raise ValueError("prompt is empty")
    eos = tokenizer.eos_token_id
    out: list[str | None] = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.tensor([prompt_ids] * b, dtype=torch.long)
        generated = torch.empty((b, 0), dtype=torch.long)
        past = None
        step_input = ids
        for _ in range(max_new_tokens):
            result = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            probs = torch.softmax(result.logits[:, -1, :].float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (b, 1)
            generated = torch.cat([generated, nxt], dim=1)
            step_input = nxt
            if bool((generated == eos).any(dim=1).all()):
                break
        for row in generated.tolist():
            if eos in row:
                out.append(tokenizer.decode(row[: row.index(eos)], skip_special_tokens=False))
            else:
                out.append(None)
    return out


# --------------------------------------------------------------------------------------------------
# build + cache
# --------------------------------------------------------------------------------------------------


@dataclass
class Testbed:
    """A built testbed: where its models live and which prompts it uses."""

    __test__ = False  # not a pytest class, despite the name

    root: Path
    ref_path: Path
    proposal_path: Path
    tokenizer_path: Path
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    config: TestbedConfig
    tokenizer: object = field(repr=False, default=None)

    def load_ref(self):
        """pi_ref (also the weak proposal), in eval mode."""
        return _load_model(self.ref_path)

    def load_proposal(self):
        """The strong proposal q, in eval mode."""
        return _load_model(self.proposal_path)

    def familiarity(self) -> dict[str, float]:
        """Prompt text -> the probability with which pi_ref's training data showed a correct answer."""
        return json.loads((self.root / _COMPLETE_MARKER).read_text())["familiarity"]


def prompt_rows(prompts: Sequence[Prompt]) -> list[dict]:
    """One dict per prompt with the columns the ``countdown`` verifier reads: prompt, numbers, target."""
    return [{"prompt": p.text, "numbers": list(p.numbers), "target": p.target} for p in prompts]


def _load_model(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    model.eval()
    return model


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_testbed(root: Path, config: TestbedConfig) -> Testbed:
    from transformers import PreTrainedTokenizerFast

    meta = json.loads((root / _COMPLETE_MARKER).read_text())

    def prompts(key: str) -> list[Prompt]:
        return [Prompt(tuple(r["numbers"]), r["target"]) for r in meta[key]]

    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer", local_files_only=True)
    return Testbed(
        root=root,
        ref_path=root / "ref",
        proposal_path=root / "proposal",
        tokenizer_path=root / "tokenizer",
        train_prompts=prompts("train_prompts"),
        eval_prompts=prompts("eval_prompts"),
        config=config,
        tokenizer=tokenizer,
    )


def build_testbed(
    cache_dir: str | os.PathLike | None = None,
    *,
    quick: bool = False,
    seed: int = 0,
    config: TestbedConfig | None = None,
    num_threads: int | str | None = None,
) -> Testbed:
    """Build (or load from cache) the testbed: tokenizer, ``pi_ref``, proposal ``q``, prompt splits.

    The result lives in ``<cache_dir>/<fingerprint of the config>/`` (``cache_dir`` defaults to
    :func:`default_cache_root`) and is rebuilt only if that directory is missing or incomplete. ``quick``
    selects :data:`QUICK_CONFIG` (seconds; for tests) instead of :data:`FULL_CONFIG` (a few minutes);
    ``config`` overrides both, and ``seed`` replaces the config's seed. ``num_threads`` sets torch's CPU
    threads during training: None builds on :data:`DOCUMENTED_BUILD_THREADS` (1), whatever the machine, so the
    models do not depend on how busy it was; float results depend on the count, so another one builds another
    testbed, cached in ``<fingerprint>-threads<n>``. ``"auto"`` takes every free core
    (:func:`disa.threads.choose_threads`): a faster build on an idle machine, of a variant testbed.
    """
    base = config if config is not None else (QUICK_CONFIG if quick else FULL_CONFIG)
    cfg = dataclasses.replace(base, seed=seed)
    root_parent = Path(cache_dir) if cache_dir is not None else default_cache_root()
    documented = DOCUMENTED_BUILD_THREADS
    cores, load = machine_load()
    if num_threads is None:
        threads = documented
    elif num_threads == "auto":
        threads = choose_threads(cores, cores, load)
    elif isinstance(num_threads, int) and not isinstance(num_threads, bool) and num_threads >= 1:
        threads = num_threads
    else:
        raise ValueError(f"num_threads must be an int >= 1, 'auto' or None, got {num_threads!r}")
    # another thread count is another testbed, cached apart
    root = root_parent / (cfg.fingerprint() + ("" if threads == documented else f"-threads{threads}"))
    if (root / _COMPLETE_MARKER).exists():
        return _read_testbed(root, cfg)

    log.info(f"testbed: building {root} ({cfg.ref_steps} + {cfg.proposal_steps} training steps) with "
             f"{thread_note(threads, documented, cores, load)}")
    root_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root_parent))
    try:
        with torch_threads(threads):
            _build_into(staging, cfg, threads)
        try:
            staging.rename(root)
        except OSError:  # another process finished the same build first: keep theirs
            if not (root / _COMPLETE_MARKER).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return _read_testbed(root, cfg)


def _build_into(out: Path, cfg: TestbedConfig, threads: int) -> None:
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    prompts = make_prompts(cfg.n_train_prompts + cfg.n_eval_prompts, cfg.seed)
    train, evaluation = prompts[: cfg.n_train_prompts], prompts[cfg.n_train_prompts :]
    rng = random.Random(cfg.seed + 1)
    data = _prompt_data(prompts, cfg.familiarity_levels, rng)

    torch.manual_seed(cfg.seed)
    model = make_model(cfg, tokenizer)
    ref_losses = train_lm(
        model, tokenizer, data, lambda d, r: _sample_ref_example(d, cfg.strategy_skew, r),
        steps=cfg.ref_steps, batch_size=cfg.batch_size, lr=cfg.lr, rng=rng, desc="testbed pi_ref",
    )
    model.save_pretrained(out / "ref")
    tokenizer.save_pretrained(out / "ref")

    proposal_losses = train_lm(
        model, tokenizer, data, lambda d, r: _sample_proposal_example(d, cfg.proposal_correct_frac, r),
        steps=cfg.proposal_steps, batch_size=cfg.batch_size, lr=cfg.lr * cfg.proposal_lr_scale, rng=rng, desc="testbed proposal",
    )
    model.save_pretrained(out / "proposal")
    tokenizer.save_pretrained(out / "proposal")

    meta = {
        "version": BUILD_FORMAT_VERSION,
        "build_threads": threads,
        "config": dataclasses.asdict(cfg),
        "train_prompts": prompt_rows(train),
        "eval_prompts": prompt_rows(evaluation),
        "familiarity": {d.prompt.text: d.familiarity for d in data},
        "n_params": sum(p.numel() for p in model.parameters()),
        "ref_final_loss": sum(ref_losses[-20:]) / max(1, len(ref_losses[-20:])),
        "proposal_final_loss": sum(proposal_losses[-20:]) / max(1, len(proposal_losses[-20:])),
    }
    # written last: its presence marks a complete build
    (out / _COMPLETE_MARKER).write_text(json.dumps(meta, indent=1))
