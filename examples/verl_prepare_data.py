"""Turn disa's prompts + the frozen log Z table into a veRL parquet whose rows carry log Z in ``extra_info``.

    python examples/verl_prepare_data.py --prompts prompts.jsonl --run runs/disa --out data/train.parquet

Rows follow veRL's format (``data_source, prompt, ability, reward_model, extra_info``); ``extra_info`` gets
``disa_log_z, disa_beta, disa_reward_scale, disa_reward_shift`` (``disa.integrations.verl.verl_extra_info``)
and the prompt id. beta and the reward transform are the ones the table was made with.
"""

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from disa.integrations.log_z_column import read_affine_map, read_table_target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-source", default="disa")
    a = ap.parse_args()
    log_z, target = read_table_target(Path(a.run) / "log_z" / "table.parquet")
    affine = read_affine_map(Path(a.run) / "labels.parquet") if target.reward_transform == "affine" else {}
    if target.reward_transform == "group":
        raise SystemExit("reward_transform=group is recomputed per rollout group: use raw or affine with veRL")
    rows = []
    for i, line in enumerate(Path(a.prompts).read_text().splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["id"] not in log_z:
            raise SystemExit(f"{a.prompts} line {i + 1}: prompt id {r['id']!r} is not in the log Z table")
        scale, shift = affine.get(r["id"], (1.0, 0.0))
        from disa.integrations.verl import verl_extra_info  # needs veRL installed

        rows.append({
            "data_source": a.data_source,
            "prompt": r.get("messages") or [{"role": "user", "content": r["prompt"]}],
            "ability": "disa",
            "reward_model": {"style": "rule", "ground_truth": str(r.get("answer", ""))},
            "extra_info": {"prompt_id": r["id"], **verl_extra_info(log_z[r["id"]], target.beta, scale, shift)},
        })
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), a.out)
    print(f"{len(rows)} rows -> {a.out} (beta {target.beta}, reward_transform {target.reward_transform})")


if __name__ == "__main__":
    main()
