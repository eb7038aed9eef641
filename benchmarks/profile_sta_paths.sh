#!/usr/bin/env bash
# STA in a compiled Wan DiT forward three ways, one process each (profile_dit.py, same
# random weights): the custom op with padding rescaled (the engine's path), the op with
# padding masked in the kernel, and the attention outside the compiled graphs (a graph break
# at every STA call, the engine's path before the op). Needs the CuTe kernels installed
# (gpu_bench_bulk.sh install1, carry with .gpu2, carry with .gpu4, install3).
set -uo pipefail
export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD:$PWD/benchmarks
export PYTHONUNBUFFERED=1
window=${1:-4,3,6}
run() {
    python3 -c "
import runpy, sys
if sys.argv[1] == 'graph_break':
    from fastvideo.attention.backends.sliding_tile import SlidingTileAttentionImpl as Impl
    Impl.forward = lambda self, q, k, v, metadata=None: self._forward_eager(q, k, v, metadata)
sys.argv = ['profile_dit.py'] + sys.argv[2:]
runpy.run_path('benchmarks/profile_dit.py', run_name='__main__')
" "$@" 2>&1 | grep -v -i warn | grep -E "forward|idle|attention|matmul|element|other|total" | head -12
}
FASTVIDEO_STA_PADDING=rescale run op --compile --sta-window "$window" --json-out "$OUT/op_rescale.json"
FASTVIDEO_STA_PADDING=mask run op --compile --sta-window "$window" --json-out "$OUT/op_mask.json"
FASTVIDEO_STA_PADDING=rescale run graph_break --compile --sta-window "$window" --json-out "$OUT/graph_break_rescale.json"
