#!/bin/bash
# Start-up of the disa command: median wall seconds of 5 runs of each command, from a source tree.
#   bash bench/startup.sh src            (BAD_CONFIG: a config whose model folders and prompt file do not exist)
set -u
SRC=$(cd "${1:-src}" && pwd)
BAD_CONFIG=${BAD_CONFIG:-$(mktemp --suffix=.yaml)}
[ -s "$BAD_CONFIG" ] || printf 'models:\n  reference: /nonexistent/model\ndata:\n  prompts: /nonexistent/p.jsonl\noutput_dir: /tmp/disa-startup-out\n' > "$BAD_CONFIG"
PY=${PYTHON:-python}
for cmd in "--help" "config --help" "config -c /nonexistent/run.yaml" "train -c /nonexistent/run.yaml" "train -c $BAD_CONFIG"; do
  ts=()
  for i in 1 2 3 4 5; do
    s=$(date +%s.%N); PYTHONPATH=$SRC $PY -m disa.cli $cmd >/dev/null 2>&1; e=$(date +%s.%N)
    ts+=($(awk "BEGIN{printf \"%.2f\", $e - $s}"))
  done
  med=$(printf "%s\n" "${ts[@]}" | sort -n | sed -n 3p)
  echo "$med s  disa $cmd"
done
