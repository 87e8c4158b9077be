#!/usr/bin/env bash
# Run the accuracy gate of ort-int8-s8s8 (and FP32) on aarch64 under QEMU user emulation (issue #10).
#
#   bash bench/arm_emulation.sh [ROOT]        # ROOT: the arm64 Debian root (default /tmp/arm/root)
#
# Needs root (apt-get, debootstrap, chroot, binfmt_misc), PyPI and a Debian mirror. Idempotent:
# every step is skipped when its result is already there, so a rerun only runs the emulated part.
# Not part of the test suite: a benchmark-style script (tens of minutes, most of it QEMU).
# Knobs (environment): WORK (default /tmp/arm: build, wheels, data, results), N (validation slices,
# default 240), FP32_N (slices for emulated FP32, which QEMU runs ~7x slower than int8; default 60),
# CPUS (QEMU CPU models for the s8s8 run, default "max neoverse-n1 cortex-a72"), MIRROR (default:
# the first URI in /etc/apt/sources.list.d/debian.sources), THREADS (default 2). See docs/arm.md.
set -euo pipefail

ROOT=${1:-/tmp/arm/root}
WORK=${WORK:-/tmp/arm}
N=${N:-240}
FP32_N=${FP32_N:-60}
CPUS=${CPUS:-"max neoverse-n1 cortex-a72"}
THREADS=${THREADS:-2}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY="$REPO/.venv/bin/python"
MODEL="$REPO/models/mr-brain-cls"
BUILD="$WORK/build"
GATE_DIR=/opt/arm-gate            # inside ROOT
say() { printf '\n== %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "run as root (apt-get, debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$WORK"/{wheels,data,results}

say "1. qemu-user-static and debootstrap"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap
fi
qemu-aarch64-static --version | head -1

say "2. binfmt_misc entry for aarch64 (debootstrap's second stage runs arm64 binaries)"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # flags F (interpreter opened now, so it works inside the chroot too), as Debian ships it
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi

say "3. arm64 Debian bookworm root in $ROOT"
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    MIRROR=${MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    debootstrap --arch=arm64 --variant=minbase --include=python3 bookworm "$ROOT" "$MIRROR"
fi
cp -u /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
"$ROOT/usr/bin/qemu-aarch64-static" -L "$ROOT" "$ROOT/usr/bin/python3.11" --version

say "4. aarch64 wheels (versions of the project venv) unpacked into $ROOT$GATE_DIR/site"
ORT_V=$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')
NP_V=$("$PY" -c 'import numpy; print(numpy.__version__)')
SITE="$ROOT$GATE_DIR/site"
if [ ! -f "$SITE/onnxruntime/__init__.py" ] || ! grep -q "$ORT_V" "$SITE"/onnxruntime-*.dist-info/METADATA 2>/dev/null; then
    # onnxruntime's runtime Requires-Dist: flatbuffers, numpy, packaging, protobuf
    pins=()
    for p in flatbuffers packaging protobuf; do
        pins+=("$p==$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))")")
    done
    "$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.11 --implementation cp \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
        -d "$WORK/wheels" "onnxruntime==$ORT_V" "numpy==$NP_V" "${pins[@]}"
    rm -rf "$SITE" && mkdir -p "$SITE"
    for w in "$WORK"/wheels/*.whl; do (cd "$SITE" && unzip -qo "$w"); done
fi

say "5. variant files in $BUILD (edge-deploy calibrate + quantize) and the x86 gate"
if [ ! -f "$BUILD/model.int8-s8s8.qdq.onnx" ] || [ ! -f "$BUILD/model.fp32.onnx" ]; then
    "$REPO/.venv/bin/edge-deploy" calibrate "$MODEL" --build "$BUILD"
    "$REPO/.venv/bin/edge-deploy" quantize "$MODEL" --build "$BUILD" --variants fp32,ort-int8-s8s8
fi
if [ ! -f "$BUILD/gate.json" ]; then
    "$REPO/.venv/bin/edge-deploy" gate "$MODEL" --build "$BUILD" --variants fp32,ort-int8-s8s8 --n "$N" \
        2>&1 | grep -v '%|' || true   # s8s8 is expected to FAIL on an x86 without VNNI
fi

say "6. validation tensors, x86 references and the self-test vector -> $WORK/data/gate-data.npz"
DATA="$WORK/data/gate-data.npz"
if [ ! -f "$DATA" ]; then
    "$PY" "$REPO/bench/arm_gate.py" export --model "$MODEL" --build "$BUILD" --n "$N" --out "$DATA"
fi
mkdir -p "$ROOT$GATE_DIR"/{models,data,results}
cp -u "$REPO/bench/arm_gate.py" "$ROOT$GATE_DIR/"
cp -u "$BUILD/model.fp32.onnx" "$BUILD/model.int8-s8s8.qdq.onnx" "$ROOT$GATE_DIR/models/"
cp -u "$DATA" "$ROOT$GATE_DIR/data/"

say "7. x86 figures (same script, project venv)"
"$PY" "$REPO/bench/arm_gate.py" run --data "$DATA" --models "$BUILD" --threads "$THREADS" --kernels \
    --where "x86 native ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))" \
    --json "$WORK/results/x86.json" >/dev/null

# One emulated run. /proc and /sys are deliberately NOT mounted in the root: with them, the
# pytorch cpuinfo inside ORT parses the host's x86 /proc/cpuinfo as ARM and crashes (SIGSEGV);
# without them its init fails cleanly and ORT reads AT_HWCAP/AT_HWCAP2, i.e. the EMULATED CPU's
# features, to choose its MLAS kernels. QEMU_CPU also reaches any arm64 child process (binfmt).
emulate() {  # CPU_MODEL NAME ARGS...
    local cpu=$1 name=$2; shift 2
    local t0=$SECONDS
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin QEMU_CPU="$cpu" PYTHONPATH="$GATE_DIR/site" OMP_NUM_THREADS="$THREADS" \
        chroot "$ROOT" /usr/bin/qemu-aarch64-static -cpu "$cpu" /usr/bin/python3 "$GATE_DIR/arm_gate.py" run \
        --data "$GATE_DIR/data/gate-data.npz" --models "$GATE_DIR/models" --threads "$THREADS" --kernels \
        --where "aarch64 qemu-user -cpu $cpu" --json "$GATE_DIR/results/$name.json" "$@" \
        2> >(grep -v -e '/sys/devices/system/cpu' -e 'cpuinfo' -e 'CPU vendor' -e '^  [a-z0-9-]*: [0-9]*/' >&2) >/dev/null
    cp "$ROOT$GATE_DIR/results/$name".* "$WORK/results/"
    echo "   $name: $((SECONDS - t0)) s" >&2
}

say "8. emulated runs"
for cpu in $CPUS; do
    [ -f "$WORK/results/s8s8-$cpu.json" ] || emulate "$cpu" "s8s8-$cpu" --variants ort-int8-s8s8 --limit "$N"
done
[ -f "$WORK/results/fp32-max.json" ] || emulate max fp32-max --variants fp32 --limit "$FP32_N"

say "9. are the kernel paths bit-identical? (first 40 slices, logits saved per CPU model)"
for cpu in $CPUS; do
    [ -f "$WORK/results/cmp40-$cpu.npz" ] || emulate "$cpu" "cmp40-$cpu" --variants ort-int8-s8s8 --limit 40 \
        --save-logits "$GATE_DIR/results/cmp40-$cpu.npz"
done
(cd "$WORK/results" && "$PY" -c '
import sys, numpy as np
runs = {c: np.load(f"cmp40-{c}.npz")["ort_int8_s8s8"] for c in sys.argv[1:]}
for a in runs:
    print(f"   max |logit diff| {a}:", {b: float(np.abs(runs[a] - runs[b]).max()) for b in runs})
' $CPUS)

say "10. figures"
files=("$WORK/results/x86.json" "$WORK/results/fp32-max.json")
for cpu in $CPUS; do files+=("$WORK/results/s8s8-$cpu.json"); done
"$PY" "$REPO/bench/arm_gate.py" table "${files[@]}"
