"""DISA's Stage 3 inside TRL: GRPOTrainer's generation (transformers or vLLM), accelerate and logging; our loss.

    python examples/trl_disa.py                  # CPU, no flags: a tiny stand-in model, examples/tiny_math.jsonl,
                                                 # the math verifier, and a log Z table made here by Stages 1-2
    python examples/trl_disa.py --model <policy folder> --log-z runs/tiny_math/log_z/table.parquet
    python examples/trl_disa.py --model <policy folder> --log-z ... --vllm     # GPU: vLLM colocated, bf16

``--log-z`` is the table ``disa fit-z`` writes (``disa run -c examples/tiny_math.yaml --set
models.reference=<folder>`` makes it, with ``labels.parquet`` beside ``log_z/``, which the affine transform
needs: ``--labels``, default ``<run>/labels.parquet``). Without ``--log-z`` the example runs ``disa sample``,
``disa label`` and ``disa fit-z`` itself on the prompts, with ``examples/tiny_math.yaml``'s settings. beta and
the reward transform come from the target recorded in the table. The prompts are rendered exactly as Stage 1
rendered them (chat rows through the tokenizer's template: :func:`disa.integrations.trl.prompts_dataset`) and
scored by the registered verifier the labels were made with (``--verifier``, default ``math``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="policy = pi_ref folder (default: a tiny GPT-2 built here, CPU-sized)")
    ap.add_argument("--prompts", default=str(HERE / "tiny_math.jsonl"), help="disa prompt file (prompt or messages)")
    ap.add_argument("--verifier", default="math", help="registered verifier (the one Stage 1 labelled with)")
    ap.add_argument("--log-z", help="log_z/table.parquet from `disa fit-z` (default: made here by Stages 1-2)")
    ap.add_argument("--labels", help="labels.parquet (affine transform; default: <run>/labels.parquet)")
    ap.add_argument("--output-dir", default="runs/trl_disa")
    ap.add_argument("--objective", default="disa", choices=("disa", "tb", "flowrl", "flowrl_no_logz"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--vllm", action="store_true", help="generate with vLLM colocated on the GPU (needs CUDA, vllm)")
    return ap.parse_args(argv)


def grpo_kwargs(a, cuda: bool, bf16_supported: bool = True) -> dict:
    """The ``GRPOConfig`` arguments: bf16 only on a CUDA device that has it; ``--vllm``: vLLM colocated with
    TRL's default sequence-level importance correction (DisaGRPOTrainer applies it as a trajectory weight)."""
    if a.vllm and not cuda:
        raise SystemExit("--vllm needs a CUDA GPU (and `pip install vllm`); run without it on CPU")
    kwargs = dict(
        output_dir=str(Path(a.output_dir) / "trl"), num_generations=a.num_generations,
        per_device_train_batch_size=a.num_generations * a.prompts_per_step,
        max_completion_length=a.max_completion_length, learning_rate=a.lr, max_steps=a.steps, logging_steps=1,
        report_to=[], save_strategy="no", seed=0, disable_dropout=True,
        beta=0.04,  # non-zero so TRL computes log pi_ref; not used as a KL weight by DisaGRPOTrainer
        use_cpu=not cuda, bf16=cuda and bf16_supported, fp16=False,
    )
    if a.vllm:
        kwargs.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    return kwargs


def tiny_model(folder: Path, records, steps: int = 80) -> str:
    """A stand-in policy with no download: a random 2-layer GPT-2 (byte-level BPE trained on the prompts) warmed
    up for a few CPU seconds on "The answer is \\boxed{answer}." after each prompt, so that sampling gives the
    verifier a mix of right and wrong answers (with ``steps=80``, 3 in 16 of Stage 1's samples were right) and
    r~ is not all zero."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from disa.data import render_prompt

    texts = [render_prompt(r) + " The answer is \\boxed{" + str(r.answer) + "}." for r in records]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                          show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = tok.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
    batch = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: more threads only add synchronisation (a lot on a busy machine)
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(**batch, labels=labels).loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_log_z_table(a, model: str, run: Path) -> Path:
    """Stages 1-2 (`disa sample`, `label`, `fit-z`) on the prompts with examples/tiny_math.yaml's settings."""
    import yaml

    from disa import cli

    cfg = yaml.safe_load((HERE / "tiny_math.yaml").read_text())
    cfg["output_dir"] = str(run)
    cfg["data"].update(prompts=str(Path(a.prompts).resolve()), verifier=a.verifier)
    cfg["models"].update(reference=model, device="auto")
    cfg["sample"].update(max_new_tokens=a.max_completion_length)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    print(f"no --log-z: making one with `disa sample/label/fit-z -c {run / 'config.yaml'}`")
    for verb in ("sample", "label", "fit-z"):
        if cli.main([verb, "-c", str(run / "config.yaml")]) != 0:
            raise SystemExit(f"`disa {verb}` failed (see above)")
    return run / "log_z" / "table.parquet"


def main(argv=None):
    a = parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from disa.data import load_prompts
    from disa.integrations.trl import DisaGRPOTrainer, add_log_z_column, prompts_dataset
    from disa.verifiers import as_reward_function

    cuda = torch.cuda.is_available()
    config = grpo_kwargs(a, cuda, cuda and torch.cuda.is_bf16_supported())  # an impossible flag fails first
    out = Path(a.output_dir)
    records = load_prompts(a.prompts)
    model = a.model or tiny_model(out / "tiny_model", records)
    if a.log_z is None:
        table = make_log_z_table(a, model, out / "stages")
    else:
        table = Path(a.log_z)
        if not table.is_file():
            raise SystemExit(f"--log-z {table}: no such file. Make it with `disa run -c examples/tiny_math.yaml --set "
                             "models.reference=<model folder>` (Stages 1-2 write <output_dir>/log_z/table.parquet), "
                             "or leave --log-z out to make a tiny one here")
    labels = Path(a.labels) if a.labels else table.parent.parent / "labels.parquet"
    if a.model and not Path(a.model).is_dir():  # a hub id would make TRL download at run time: folders only
        raise SystemExit(f"--model {a.model}: not a folder; give a local model folder (README: Your own model)")
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    dataset, target = add_log_z_column(prompts_dataset(records, tokenizer), table,
                                       labels_path=labels if labels.is_file() else None)
    print(f"target: beta={target.beta}, reward_transform={target.reward_transform}; {len(dataset)} prompts")
    trainer = DisaGRPOTrainer(model=model, reward_funcs=as_reward_function(a.verifier), processing_class=tokenizer,
                              args=GRPOConfig(**config), train_dataset=dataset,
                              target=target, objective=a.objective)
    trainer.train()
    for h in trainer.state.log_history:
        if "disa/tb_residual_abs" in h:
            print(f"step {h['step']}: loss {h['loss']:.4g}  |residual| {h['disa/tb_residual_abs']:.4g}  "
                  f"reward {h['reward']:.3f}")
    rows = [h for h in trainer.state.log_history if "loss" in h]
    (out / "history.json").write_text(json.dumps(rows, indent=1))
    if not all(math.isfinite(h["loss"]) for h in rows):
        raise SystemExit("a non-finite loss was logged")
    return trainer


if __name__ == "__main__":
    main()
