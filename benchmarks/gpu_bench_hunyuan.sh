#!/usr/bin/env bash
# bench_hunyuan_dit.py and bench_encoders.py on one H200 of the device tool, one call per
# step, each within 30 s of the last (the machine and "$SITE" go when it idles); see
# benchmarks/gpu_wheels.md for the folders .gpu1-.gpu4:
#
#   bash benchmarks/gpu_bench_hunyuan.sh encoders   # carry .gpu1: diffusers (+ small CuTe wheels); encoders
#   bash benchmarks/gpu_bench_hunyuan.sh carry      # carry .gpu2: the CUTLASS compiler, part 1
#   bash benchmarks/gpu_bench_hunyuan.sh carry      # carry .gpu4: its part 2, the DSL's FFI wheels
#   bash benchmarks/gpu_bench_hunyuan.sh cute       # carry .gpu3: compiler part 3; check the CuTe kernels
#   bash benchmarks/gpu_bench_hunyuan.sh compiled   # ours compiled vs diffusers compiled (~6.5 min)
#   bash benchmarks/gpu_bench_hunyuan.sh sta        # STA (~12% of key tiles) vs our dense, compiled (~4.5 min)
#   bash benchmarks/gpu_bench_hunyuan.sh eager      # ours vs diffusers, eager (~4.5 min)
#
# `carry` and `cute` may be left out: ours then runs cuDNN/flash SDPA and STA the flex
# kernel (the JSON's attention_backends says which). `compiled`, `sta` and `eager` take
# more bench_hunyuan_dit.py options after the step, e.g. `compiled --shape 544x960x129`.
# Each step installs .gpu1 if "$SITE" lacks diffusers (so it can start a fresh machine).
# Results go to $OUT/<step>.json (rewritten after every run: a step cut short keeps what
# ended) and $OUT/<step>.log.
set -uo pipefail
step=$1
shift
SITE=${SITE:-/tmp/site}  # where the wheels go
export PYTHONPATH=$SITE/nvidia_cutlass_dsl/dsl_packages:$SITE:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
install() {
    # The CUTLASS DSL's wheels share one top-level folder (nvidia_cutlass_dsl/): unzipped
    # into it, as gpu_bench_bulk.sh does; pip the rest.
    local wheel others=()
    for wheel in "$@"; do
        case $(basename "$wheel") in
        nvidia_cutlass_dsl*) python3 -m zipfile -e "$wheel" "$SITE" || return 1 ;;
        *) others+=("$wheel") ;;
        esac
    done
    [ ${#others[@]} -eq 0 ] || python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "${others[@]}"
}
ensure_diffusers() {
    [ -d "$SITE/diffusers" ] && return 0
    [ -d .gpu1 ] || { echo "diffusers is not installed: carry .gpu1" >&2; return 1; }
    install .gpu1/*.whl
}
run() {  # run NAME ARGS...: a benchmark, its log and JSON to $OUT
    local name=$1
    shift
    nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
    python3 -c "from fastvideo.attention.backends.flash_cute import cute_unavailable_reason as r; print('CuTe kernels:', r('cuda') or 'available')" 2>&1 | tail -1
    "$@" --json-out "$OUT/$name.json" 2>&1 | grep -v -i warn | tee "$OUT/$name.log" | tail -40
}
dit=(python3 benchmarks/bench_hunyuan_dit.py)
case $step in
encoders)
    ensure_diffusers || exit 1
    run encoders python3 benchmarks/bench_encoders.py "$@" ;;
carry)  # whichever of .gpu2, .gpu4 this call carried, as gpu_bench_bulk.sh
    mkdir -p /tmp/cu && for d in .gpu2 .gpu4; do [ ! -d $d ] || cp $d/* /tmp/cu/; done
    ls -la /tmp/cu ;;
cute)
    ensure_diffusers || exit 1
    cat /tmp/cu/cu13.part.* .gpu3/cu13.part.* \
        > /tmp/cu/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
    install /tmp/cu/*.whl || exit 1  # after .gpu1's DSL wheels, as gpu_bench_bulk.sh
    python3 -c "from fastvideo.attention.backends.flash_cute import cute_unavailable_reason as r; print('CuTe kernels:', r('cuda') or 'available')" ;;
compiled)
    ensure_diffusers || exit 1
    run compiled "${dit[@]}" --runs ours_compiled,diffusers_compiled "$@" ;;
sta)
    ensure_diffusers || exit 1
    run sta "${dit[@]}" --runs ours_compiled,sta "$@" ;;
eager)
    ensure_diffusers || exit 1
    run eager "${dit[@]}" --runs ours,diffusers "$@" ;;
*)
    echo "usage: $0 encoders|carry|cute|compiled|sta|eager [options]" >&2; exit 2 ;;
esac
