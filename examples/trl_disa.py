"""DISA's Stage 3 inside TRL: GRPOTrainer's generation, accelerate/DeepSpeed and logging, our loss.

    disa sample -c cfg.yaml && disa label -c cfg.yaml && disa fit-z -c cfg.yaml   # Stages 1 and 2
    python examples/trl_disa.py --model <policy folder> --prompts prompts.jsonl --run runs/disa

The prompt file is disa's JSONL (``id``, ``prompt``); the log Z column is looked up by ``id`` in
``<run>/log_z/table.parquet`` and beta / the reward transform come from the target recorded there.
With ``--smoke`` it builds a tiny random model and a made-up table and trains 4 CPU steps.
"""

import argparse
import json
import tempfile
from pathlib import Path


def length_reward(completions, **kw):
    """Stand-in verifier: swap in disa.verifiers' math / code / countdown or your own TRL reward function."""
    return [float(len(c) < 40) for c in completions]


def smoke_inputs(tmp: Path):
    """A tiny GPT-2 and a log Z table made up for the smoke run (no hub, no Stage 1)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from disa.stages.fit_z import write_log_z_table

    vocab = {w: i for i, w in enumerate(["<|endoftext|>"] + [f"w{i}" for i in range(200)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                       eos_token_id=0, bos_token_id=0, pad_token_id=0))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"w{i} w{i + 1}"}) + "\n" for i in range(8)))
    ids = [f"p{i}" for i in range(8)]
    (tmp / "run" / "log_z").mkdir(parents=True)
    write_log_z_table(tmp / "run" / "log_z" / "table.parquet", ids, torch.zeros(8), torch.zeros(8), set(),
                      {"target": {"beta": 1.0, "reward_transform": "raw"}})
    return str(tmp / "model"), str(prompts), str(tmp / "run")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--prompts")
    ap.add_argument("--run", help="the disa run directory (log_z/table.parquet, labels.parquet)")
    ap.add_argument("--objective", default="disa", choices=("disa", "tb", "flowrl", "flowrl_no_logz"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.model, a.prompts, a.run = smoke_inputs(Path(tempfile.mkdtemp()))

    import datasets
    from trl import GRPOConfig

    from disa.integrations.trl import DisaGRPOTrainer, add_log_z_column

    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    ds = datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "prompt_id": [r["id"] for r in rows]})
    labels = Path(a.run) / "labels.parquet"
    ds, target = add_log_z_column(ds, Path(a.run) / "log_z" / "table.parquet",
                                  labels_path=labels if labels.exists() else None)
    args = GRPOConfig(
        output_dir=str(Path(a.run) / "trl"), num_generations=4, per_device_train_batch_size=8,
        max_completion_length=16, learning_rate=1e-4, max_steps=a.steps, logging_steps=1, report_to=[],
        beta=0.04,  # non-zero so TRL computes log pi_ref; not used as a KL weight by DisaGRPOTrainer
        use_cpu=a.smoke, save_strategy="no",
    )
    trainer = DisaGRPOTrainer(model=a.model, reward_funcs=length_reward, args=args, train_dataset=ds,
                              target=target, objective=a.objective)
    trainer.train()
    for h in trainer.state.log_history:
        if "disa/tb_residual_abs" in h:
            print(f"step {h['step']}: |residual| {h['disa/tb_residual_abs']:.3f}  loss {h['loss']:.3f}")


if __name__ == "__main__":
    main()
