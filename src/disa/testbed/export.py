"""Write the testbed as a user's inputs: two Hugging Face model folders and two prompt files.

    python -m disa.testbed.export examples/countdown        # what examples/countdown.yaml reads

writes ``ref/`` (pi_ref) and ``proposal/`` (the stronger q), each a ``save_pretrained`` folder with its
character tokenizer, and ``prompts.jsonl`` / ``eval_prompts.jsonl`` with the ``numbers`` and ``target`` columns
the ``countdown`` verifier reads. The models are the quick testbed's (about 30k parameters, seconds to build
on one CPU thread), so the whole pipeline runs on them with nothing but the install.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from disa.testbed.models import build_testbed


def prompt_lines(prompts, prefix: str) -> list[str]:
    """One JSONL line per testbed prompt: ``id``, ``prompt`` and the verifier's ``numbers`` and ``target``."""
    return [json.dumps({"id": f"{prefix}-{i:03d}", "prompt": p.text, "numbers": list(p.numbers), "target": p.target})
            for i, p in enumerate(prompts)]


def export(out_dir: str | Path, *, cache_dir: str | Path | None = None, quick: bool = True) -> Path:
    """Build (or reuse) the testbed and copy its models and prompts into ``out_dir``; returns ``out_dir``."""
    out = Path(out_dir)
    tb = build_testbed(cache_dir, quick=quick)
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (("ref", tb.ref_path), ("proposal", tb.proposal_path)):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target)
    (out / "prompts.jsonl").write_text("\n".join(prompt_lines(tb.train_prompts, "train")) + "\n")
    (out / "eval_prompts.jsonl").write_text("\n".join(prompt_lines(tb.eval_prompts, "eval")) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disa.testbed.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write ref/, proposal/, prompts.jsonl, eval_prompts.jsonl into")
    parser.add_argument("--cache-dir", default=None, help="testbed cache (default: ~/.cache/disa/testbed)")
    parser.add_argument("--full", action="store_true", help="the demo's full-size testbed (minutes to build)")
    args = parser.parse_args(argv)
    out = export(args.out_dir, cache_dir=args.cache_dir, quick=not args.full)
    print(f"wrote {out}/ref, {out}/proposal, {out}/prompts.jsonl, {out}/eval_prompts.jsonl")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
