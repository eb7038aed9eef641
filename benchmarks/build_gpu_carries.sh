#!/usr/bin/env bash
# Builds the carry folders .gpu1-.gpu4 that gpu_bench_bulk.sh (and gpu_bench_hunyuan.sh) need
# on the offline GPU machine, from a machine that can reach PyPI. See gpu_wheels.md for what
# each holds and why; run from the repo root. About 5 minutes on 2 cores (most of it the
# recompression of imageio-ffmpeg's wheel, which is too large to carry as PyPI ships it).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .whl2 .gpu1 .gpu2 .gpu3 .gpu4; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
DL="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT"
rm -rf .whl .whl2 .gpu1 .gpu2 .gpu3 .gpu4 .cute
# The Prefect set: sed pulls the versions out of gpu_wheels.md so the list lives in one place.
prefect_set=$(sed -n '/^\$DL -d .whl aiosqlite/,/^\$DL -d .whl2/p' benchmarks/gpu_wheels.md |
    grep -v '^\$DL -d .whl2' | sed 's/^\$DL -d .whl //; s/\\$//' | tr '\n' ' ')
$DL -d .whl $prefect_set
$DL -d .whl2 diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0 imageio-ffmpeg==0.8.1
$DL -d .cute flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
# imageio-ffmpeg: the recompression step of gpu_wheels.md, run from the text there.
sed -n "/^python3 - .whl2\/imageio_ffmpeg/,/^PY\$/p" benchmarks/gpu_wheels.md > /tmp/recompress.sh
bash /tmp/recompress.sh
mkdir .gpu1 .gpu2 .gpu3 .gpu4
cu13=$(ls .cute/nvidia_cutlass_dsl_libs_cu13-*.whl)
# Each folder under ~61 MB: the device tool's 64 MiB counts the tracked files too.
mv .whl2/*.whl .gpu1/ && mv .cute/apache_tvm_ffi-*.whl .cute/torch_c_dlpack_ext-*.whl .gpu4/
mv $(ls .cute/*.whl | grep -v libs_cu13) .gpu1/
head -c 60000000 "$cu13" > .gpu2/cu13.part.1
tail -c +60000001 "$cu13" | head -c 25000000 > .gpu4/cu13.part.2
tail -c +85000001 "$cu13" > .gpu3/cu13.part.3
mv .whl/*.whl .gpu3/
rm -rf .whl .whl2 .cute
du -sh --apparent-size .gpu1 .gpu2 .gpu3 .gpu4
