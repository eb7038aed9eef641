#!/usr/bin/env bash
# bench_bulk.py on one GPU machine of the device tool, in the calls its carry limit needs
# (see benchmarks/gpu_wheels.md for the folders .gpu1-.gpu4). One call per step, each
# within 30 s of the last (the machine, /tmp/site and the checkpoint go when it idles):
#
#   bash benchmarks/gpu_bench_bulk.sh diffusers   # carry .gpu1: wheels, checkpoint, baseline
#   bash benchmarks/gpu_bench_bulk.sh carry       # carry .gpu2: the CUTLASS compiler, part 1
#   bash benchmarks/gpu_bench_bulk.sh carry       # carry .gpu4: its part 2, the DSL's FFI wheels
#   bash benchmarks/gpu_bench_bulk.sh dense       # carry .gpu3: Prefect, compiler part 3; dense+fresh
#   bash benchmarks/gpu_bench_bulk.sh sta         # nothing carried; sta+fresh_sta
#   bash benchmarks/gpu_bench_bulk.sh overlap     # nothing carried; a decode's cost to the DiT
#                                                 # (bench_decode_overlap.py)
#   bash benchmarks/gpu_bench_bulk.sh profile     # nothing carried; one whole STA denoise in
#                                                 # the engine's loop (profile_denoise.py)
#   bash benchmarks/gpu_bench_bulk.sh loadprofile # nothing carried; a fresh STA worker's load
#                                                 # under cProfile (FASTVIDEO_PROFILE_LOAD)
#   bash benchmarks/gpu_bench_bulk.sh vae         # nothing carried, after diffusers: the VAE
#                                                 # decode variants (bench_vae_decode.py)
#   bash benchmarks/gpu_bench_bulk.sh check       # nothing carried, after diffusers:
#                                                 # check_gpu_worker.py
#
# `dense` and `sta` take the bench phases to run as a second argument (defaults dense,fresh
# and sta,fresh_sta), so `dense sta,fresh_sta` measures STA alone on a machine where the
# baseline and dense are already measured.
#
# `prepare` instead of `diffusers` installs and builds the checkpoint without the baseline
# (for a machine lost mid-way, when the session's baseline is already measured) and runs
# bench_vae_decode.py instead (`VAE_BENCH=0` skips it).
#
# The shipped demo model (models/, 24 MB, tracked) travels with every call and puts every
# carry over the device tool's 64 MiB: move it out of the working tree for the calls
# (`mv models /tmp/`) and back after. The limit counts the tracked files too (~1.9 MB in
# 2026-12): a carry of 65.0 MB was refused then, so each folder stays under ~61 MB.
#
# `BENCH_PROMPTS=N` runs N prompts instead of 6 (a phase on a machine with little device
# time left; N >= 3 still gives a steady state).
#
# Results go to $OUT (bench_<step>.json, the flow and worker logs).
set -uo pipefail
step=$1
export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# Bytecode in one writable place for every process of the lease (see install below).
export PYTHONPYCACHEPREFIX=/tmp/pycache
install() {
    # The CUTLASS DSL's wheels share one top-level folder (nvidia_cutlass_dsl/), which
    # `pip --target` replaces (--upgrade) or skips (without) per wheel, losing the Python
    # package `cutlass`: unzip those into the folder instead; pip the rest.
    local wheel others=()
    for wheel in "$@"; do
        case $(basename "$wheel") in
        nvidia_cutlass_dsl*) python3 -m zipfile -e "$wheel" /tmp/site || return 1 ;;
        *) others+=("$wheel") ;;
        esac
    done
    [ ${#others[@]} -eq 0 ] || python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site "${others[@]}" || return 1
    # Bytecode once, as a normal pip install leaves it: otherwise every process (each fresh
    # worker: its first video) may compile torch's, diffusers', Prefect's and the CuTe DSL's
    # sources again if the image keeps Python from writing it (the line below says). A
    # worker imported torch in 6.6-10.7 s on the H200 against 2.5 s on a 2-core CPU here.
    local image_site
    image_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset};" \
        "the image's torch has $(find "$image_site/torch" -name '*.pyc' | wc -l) .pyc files"
    local start=$SECONDS
    python3 -m compileall -q -j 0 "$image_site" /tmp/site "$PWD/fastvideo" "$PWD/flows" \
        "$PWD/tasks" >/dev/null 2>&1
    echo "compiled into $PYTHONPYCACHEPREFIX in $((SECONDS - start)) s:" \
        "$(find "$PYTHONPYCACHEPREFIX" -name '*.pyc' | wc -l) .pyc files"
}
install_gpu3() {
    # The CUTLASS compiler's wheel, carried in three parts (`carry` twice, then .gpu3), the
    # wheels `carry` left in /tmp/cu, and .gpu3.
    local wheel=/tmp/cu/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
    cat /tmp/cu/cu13.part.* .gpu3/cu13.part.* > "$wheel"
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).testzip()" "$wheel" 2>/dev/null || {
        echo "the CUTLASS compiler's wheel is incomplete ($(ls /tmp/cu/ 2>/dev/null | tr '\n' ' ')):" \
            "run the carry step with .gpu2 and with .gpu4 carried first" >&2
        return 1
    }
    install .gpu3/*.whl /tmp/cu/*.whl
}
bench() {
    # A worker left by an earlier call (workers outlive their flow) would serve this one
    # with the code it loaded then: stop them. The pattern does not match this shell.
    pkill -f "entrypoints[.]warm_worker --spec" && sleep 2
    python3 benchmarks/bench_bulk.py --model-path /tmp/wan --num-prompts "${BENCH_PROMPTS:-6}" --workdir /tmp/bench \
        "$@" 2>&1 | grep -v -i warn | tail -40
    cp /tmp/bench/*.log "$OUT"/ 2>/dev/null
    for log in /tmp/bench/workers-*/*.log; do cp "$log" "$OUT/worker-$(basename "$(dirname "$log")").log"; done 2>/dev/null
}
case $step in
diffusers|prepare)
    install .gpu1/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
    python3 benchmarks/make_random_wan.py --output /tmp/wan --device cuda \
        --json-out "$OUT/build.json" 2>&1 | grep -v -i warn | tail -6
    if [ "$step" = prepare ]; then  # the VAE decode variants, while the GPU is free
        [ "${VAE_BENCH:-1}" = 0 ] ||
            python3 benchmarks/bench_vae_decode.py --json-out "$OUT/vae.json" 2>&1 | grep -v -i warn
    else
        bench --phases diffusers --json-out "$OUT/bench_diffusers.json"
    fi ;;
check)  # after diffusers or prepare: the worker's GPU paths against their plain versions
    # (lanes overlapped or in turn, progress snapshots, threaded weight moves; ~1 minute)
    python3 benchmarks/check_gpu_worker.py --json-out "$OUT/check_worker.json" 2>&1 |
        grep -v -i warn | tail -12 ;;
loadprofile)  # after sta: a fresh STA worker (no warm-up) with its load under cProfile and
    # each module's import time in its log (Python's -X importtime)
    PYTHONPROFILEIMPORTTIME=1 FASTVIDEO_WARM_UP=0 FASTVIDEO_PROFILE_LOAD=$OUT/load.prof bench --phases fresh_sta \
        --json-out "$OUT/bench_fresh_sta_profiled.json" ;;
profile)  # after sta (its compile cache and window file): one whole STA denoise in the
    # engine's loop, its steps timed and profiled (profile_denoise.py); `profile dense` without STA
    # PROFILE_ARGS go to profile_denoise.py (e.g. --batch-cfg); PROFILE_TAG names the output.
    sta=(--sta-config /tmp/bench/sta.json); [ "${2:-sta}" = dense ] && sta=()
    [ -f /tmp/bench/sta.json ] || { mkdir -p /tmp/bench && echo '{"tile_size": "auto", "num_full_steps": 10, "default_window": [4, 3, 6]}' > /tmp/bench/sta.json; }  # bench_bulk.py's STA_CONFIG
    python3 benchmarks/profile_denoise.py --model-path /tmp/wan --compile \
        --compile-cache-dir /tmp/bench/compile-cache "${sta[@]}" ${PROFILE_ARGS:-} \
        --json-out "$OUT/profile_${2:-sta}${PROFILE_TAG:-}.json" 2>&1 | grep -v -i warn | tail -40 ;;
vae)  # after diffusers or prepare: the VAE decode as diffusers runs it, channels-last, and as
    # the engine runs it (channels-last + lean ops), the engine's kernels profiled (~1 minute)
    python3 benchmarks/bench_vae_decode.py --variants diffusers,channels_last,engine \
        --profile engine --json-out "$OUT/vae_engine.json" 2>&1 | grep -v -i warn | tail -34 ;;
overlap)  # after dense or sta (the CuTe kernels installed): a decode's cost to the DiT
    python3 benchmarks/bench_decode_overlap.py --compile --compile-cache-dir /tmp/bench/compile-cache \
        --json-out "$OUT/overlap.json" 2>&1 | grep -v -i warn | tail -5 ;;
install1)  # the wheels of .gpu1 alone (kernel work without the checkpoint)
    install .gpu1/*.whl ;;
install3)  # after install1 and carry (twice): the CUTLASS compiler joined, and .gpu3
    install_gpu3 ;;
carry)  # whichever of .gpu2, .gpu4 this call carried (one copied again is the same file)
    mkdir -p /tmp/cu && for d in .gpu2 .gpu4; do [ ! -d $d ] || cp $d/* /tmp/cu/; done
    ls -la /tmp/cu ;;
dense)
    install_gpu3 || exit 1
    reason=$(python3 -c "from fastvideo.attention.backends.flash_cute import cute_unavailable_reason as r; print(r('cuda'))" 2>&1 | tail -1)
    echo "CuTe kernels: ${reason}"
    [ "$reason" = "None" ] || { echo "the CuTe kernels cannot run: not benchmarking"; exit 1; }
    # STA's two padding modes on the kernel, same inputs (STA_PADDING_CHECK=0 skips it).
    [ "${STA_PADDING_CHECK:-1}" = 0 ] ||
        python3 benchmarks/check_gpu_sta_padding.py --json-out "$OUT/sta_padding.json" 2>&1 |
        grep -v -i warn
    phases=${2:-dense,fresh}
    bench --phases "$phases" --json-out "$OUT/bench_${phases//,/_}.json" ;;
sta)
    phases=${2:-sta,fresh_sta}
    bench --phases "$phases" --json-out "$OUT/bench_${phases//,/_}.json" ;;
*)
    echo "usage: $0 diffusers|prepare|install1|carry|install3|dense|sta|vae|overlap|profile|loadprofile|check" >&2
    exit 2 ;;
esac
