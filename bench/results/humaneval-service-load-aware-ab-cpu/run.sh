#!/bin/bash
# The exact sequence behind this folder (2026-11-27, 15:53-16:49 UTC), from the repository root.
# The service and the bench client ran from a snapshot of commit 6e6cbf0 (`git archive 6e6cbf0`
# unpacked in a scratch folder and put first on PYTHONPATH), because the working tree was being
# refactored by others at the same time; the commands are otherwise exactly these.
#   hsd-serve serve bench/service_config_load_aware_ab.yaml --num-cpus 4 &
# phases.log: UTC start/end and `uptime` of every phase.
OUT=bench/results/humaneval-service-load-aware-ab-cpu
run() {  # rep on|off streams
  local app=hsd_load_aware; [ "$2" = off ] && app=hsd_fixed_k
  hsd-serve bench --endpoint grpc://127.0.0.1:19000 --application $app \
    --dataset humaneval --data-dir /work/shared/assets/datasets --limit 20 --max-new-tokens 64 \
    --methods ar,slem --lookahead 4 --concurrency $3 --duration 20 --drafter-head-ids 16384 \
    --no-plots --no-progress --out $OUT/r$1-$2-c$3
}
run 1 on 8;  run 1 off 8;  run 1 on 32; run 1 off 32
run 2 off 8; run 2 on 8;   run 2 off 32; run 2 on 32
run 3 on 8;  run 3 off 8;  run 3 on 32; run 3 off 32
run 4 off 8; run 4 on 8;   run 4 off 32; run 4 on 32
run 5 on 8;  run 5 off 8;  run 5 on 32; run 5 off 32
run 6 off 8; run 6 on 8;   run 6 off 32; run 6 on 32
# reference: fixed k = 1 and 2 (load-aware off) at 32 streams: what drafted/round looks like per k
hsd-serve bench --endpoint grpc://127.0.0.1:19000 --application hsd_fixed_k \
  --dataset humaneval --data-dir /work/shared/assets/datasets --limit 20 --max-new-tokens 64 \
  --methods ar,slem --lookahead 1,2 --concurrency 32 --duration 20 --drafter-head-ids 16384 \
  --no-plots --no-progress --out $OUT/ref-off-k1-k2-c32
run 7 on 8;  run 7 off 8;  run 7 on 32; run 7 off 32
run 8 off 8; run 8 on 8;   run 8 off 32; run 8 on 32
python $OUT/summarize.py   # writes $OUT/summary.md
