"""Adding a generation engine, a verifier or a benchmark loader is one new file outside the package, named in the
config's ``plugins``; ``disa eval`` then uses all three (each written to a tmp dir by the test)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

ENGINE_PLUGIN = '''
from disa.generation import RolloutEngine, Sample, encode_prompt, pad_token_id, register_engine
from disa.generation.engine import EngineOption, eos_token_ids

SYNCED = []  # every module sync_weights received
DRAWN = []   # every prompt generate received


@register_engine("canned")
class CannedEngine(RolloutEngine):
    """Answers every prompt with a fixed string (a test engine)."""

    OPTIONS = {"answer": EngineOption("0", "the answer every response gives")}

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer = tokenizer, answer
        self._eos = eos_token_ids(tokenizer)

    @classmethod
    def create(cls, model, tokenizer=None, *, batch_size, device, dtype, seed, progress, answer="0"):
        return cls(tokenizer, answer)

    @property
    def pad_id(self):
        return pad_token_id(self.tokenizer, self._eos)

    @property
    def eos_ids(self):
        return self._eos

    def generate(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, stop=None, seed=None):
        DRAWN.extend(prompts)
        return [[Sample(self.answer if "odd" not in p else "no idea", encode_prompt(self.tokenizer, p), [5], -1.5,
                        "eos") for _ in range(n)] for p in prompts]

    def sync_weights(self, policy):
        SYNCED.append(policy)
'''

VERIFIER_PLUGIN = '''
from disa.verifiers import register_verifier


@register_verifier("gold_match", columns=("gold",))
def gold_match(prompts, completions, gold=None, **_columns):
    return [float(c.strip() == str(g)) for c, g in zip(completions, gold)]
'''

BENCHMARK_PLUGIN = '''
from disa.benchmarks import BenchmarkError, register_benchmark
from disa.data import PromptRecord


@register_benchmark("quiz", domain="math", verifier="gold_match")
def quiz_records(rows, source):
    out = []
    for i, row in enumerate(rows):
        if "q" not in row:
            raise BenchmarkError(f"{source}, row {i}: missing field q")
        out.append(PromptRecord(id=f"quiz-{i}", prompt=row["q"], extra={"gold": row.get("gold")}))
    return out
'''


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_disa_eval_uses_a_plugin_engine_verifier_and_benchmark(tiny_gpt2_path, tmp_path):
    import sys

    from disa import cli

    plugins = []
    for name, text in (("canned_engine", ENGINE_PLUGIN), ("gold_verifier", VERIFIER_PLUGIN),
                       ("quiz_benchmark", BENCHMARK_PLUGIN)):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
        plugins.append(str(tmp_path / f"{name}.py"))
    prompts = _write(tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": f"{i} + {i} =", "gold": "7"}
                                                for i in range(3)])
    quiz = _write(tmp_path / "quiz.jsonl", [{"q": "3 + 4 =", "gold": 7}, {"q": "odd one", "gold": 7},
                                            {"q": "1 + 6 =", "gold": 7}, {"q": "2 * 4 =", "gold": 8}])
    run = tmp_path / "run"
    config = {
        "output_dir": str(run), "plugins": plugins, "data": {"prompts": prompts, "verifier": "gold_match"},
        "models": {"reference": tiny_gpt2_path, "device": "cpu"},
        "eval": {"k": 2, "pass_at": [1, 2], "max_new_tokens": 4, "bootstrap": 0,
                 "benchmarks": [{"name": "quiz", "path": quiz}],
                 "generation": {"engine": "canned", "options": {"answer": "7"}}},
        "sample": {"max_new_tokens": 4}, "train": {"max_new_tokens": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["eval", "-c", str(path), "--checkpoint", tiny_gpt2_path]) == 0

    engine_module = sys.modules["disa_plugin_canned_engine"]
    assert len(engine_module.SYNCED) == 1  # the evaluated weights were handed to the engine once
    assert engine_module.DRAWN == ["3 + 4 =", "odd one", "1 + 6 =", "2 * 4 ="]
    out = run / "eval" / Path(tiny_gpt2_path).name  # eval/<evaluated folder's name>/
    table = json.loads((out / "benchmarks.json").read_text())
    assert table["benchmarks"]["quiz"]["prompts"] == 4
    assert table["benchmarks"]["quiz"]["mean_at_k"]["value"] == 0.5  # "7" is right for rows 0 and 2 only
    summary = json.loads((out / "quiz" / "eval.json").read_text())["summary"]
    assert summary["verifier"] == "gold_match"

    # the plugin's declared column is enforced on a benchmark that does not give it
    from disa.benchmarks import BenchmarkError, load_benchmark

    with pytest.raises(BenchmarkError, match=r"row 0 \(id 'quiz-0'\): benchmark 'quiz' gave no 'gold', which its "
                                             r"verifier 'gold_match' requires"):
        load_benchmark("quiz", _write(tmp_path / "nogold.jsonl", [{"q": "1 + 1 ="}]))

    # an engine name nothing registered is a config error naming the field (exit code 2)
    config["eval"]["generation"]["engine"] = "canned2"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["eval", "-c", str(path), "--checkpoint", tiny_gpt2_path]) == 2
