#!/usr/bin/env bash
# Emulated linux/aarch64 check of qnrt (Raspberry Pi 4/5 with a 64-bit
# Debian bookworm OS) from an x86-64 Debian 12 root shell: qemu-user-static +
# binfmt_misc + an mmdebstrap'd bookworm arm64 root, aarch64 wheels from PyPI.
#
#   QNRT_SRC=$PWD bash ../shared/arm64/run.sh   # from the project root: build (cached) + all checks
#
# Checks: a) numpy/numba import + @njit(cache=True) 3x3 depthwise kernel,
#            bit-for-bit against the same kernel on x86;
#         b) numba.pycc AOT module built on arm64, imported without numba;
#         c) qnrt installed from a copy of $QNRT_SRC, `qnrt run` on the
#            shipped model, labels/probabilities against x86; first
#            (compiling) and second (cached) run timed;
#         d) `qnrt compile` on arm64 (numba.pycc, gcc, g++), then `qnrt run`
#            and a Session on that build: backend "aot", numba never imported,
#            labels/probabilities against x86 and against check c's arm JIT.
# Environment (defaults):
#   ARM64_CACHE=/tmp/arm64     root, wheels, logs, results (kept for reuse)
#   QNRT_SRC (required)        the project checkout; read only, copied, never written
#   HOST_VENV=(none)           an x86 venv with qnrt installed, as reference (made under the cache if absent)
#   ARM64_CPU=cortex-a72       QEMU_CPU and NUMBA_CPU_NAME (Pi 4; cortex-a76 = Pi 5)
#   ARM64_CHECKS="a b c d"     which checks to run (ARM64_CHECKS=c: a qnrt smoke test;
#                              "c d": qnrt's JIT and AOT paths)
#   ARM64_KEEP_BINFMT=0        1: leave binfmt_misc mounted (+ qemu-aarch64) at exit
#   ARM64_UPSTREAM_PYCC=0      1: also run numba's own test_pycc with its aarch64
#                              skips removed (~15-20 min; reported, not in the verdict)
#   ARM64_REBUILD=1            drop the cached root/venv first
# Every mount in the root is made inside a private mount namespace (unshare -m),
# so none outlives its command; binfmt_misc, if this run had to mount it, is
# unmounted at exit (dropping the qemu-aarch64 registration with it).
# The last line is "ARM64 VERDICT: PASS|FAIL ...".
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${ARM64_CACHE:-/tmp/arm64}
SRC=${QNRT_SRC:?set QNRT_SRC to the project checkout}
HOST_VENV=${HOST_VENV:-$CACHE/x86-venv}
CPU=${ARM64_CPU:-cortex-a72}
CHECKS=${ARM64_CHECKS:-a b c d}
ROOT=$CACHE/root
RUN=$CACHE/run            # this run's results (host side)
MODEL=models/quicknet_digits_dc.qnb
NICE="nice -n 10"
mkdir -p "$CACHE" && rm -rf "$RUN" && mkdir -p "$RUN"
SUMMARY=$RUN/summary.tsv
: >"$SUMMARY"
declare -A VERDICT

log() { printf '[arm64 %s] %s\n' "$(date +%T)" "$*" >&2; }
secs() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
record() { printf '%-28s %8s s  %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY" >&2; }
# timed NAME CMD...: run, log to $RUN/NAME.log, record time + status; returns CMD's status
timed() {
    local name=$1 t0=$EPOCHREALTIME rc; shift
    "$@" >"$RUN/$name.log" 2>&1; rc=$?
    record "$name" "$(secs "$t0")" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc (log: $RUN/$name.log)")"
    return $rc
}
verdict() {
    local bad="" k line=""
    for k in $CHECKS; do line+="$k=${VERDICT[$k]:-not run} "; [ "${VERDICT[$k]:-}" = ok ] || bad=1; done
    [ -n "${VERDICT[setup]:-}" ] && bad=1
    cleanup; log "summary ($SUMMARY):"; cat "$SUMMARY" >&2
    echo "ARM64 VERDICT: $([ -z "$bad" ] && echo PASS || echo FAIL) [$CPU] $line$*"
    [ -z "$bad" ]; exit $?
}
OUR_BF=""
cleanup() { [ -z "$OUR_BF" ] || { umount "$OUR_BF" && log "unmounted $OUR_BF"; OUR_BF=""; }; }
trap cleanup EXIT
die() { log "setup failed: $*"; VERDICT[setup]=failed; verdict "setup failed: $*"; }
# the Debian mirror this machine's apt already uses (first URIs:/deb line)
apt_mirror() {
    sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 \
        || true
    awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true
}

# arm [VAR=value ...] CMD...: run in the arm64 root, /proc mounted privately.
arm() {
    unshare --mount --propagation private -- /bin/sh -c \
        'r=$1; shift; mount -t proc proc "$r/proc" && exec chroot "$r" "$@"' sh "$ROOT" \
        /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$CPU" NUMBA_CPU_NAME="$CPU" NUMBA_CACHE_DIR=/var/cache/numba "$@"
}
# x86 [VAR=value ...] CMD...: the host reference, never writing into $SRC.
x86() { env PYTHONDONTWRITEBYTECODE=1 NUMBA_CACHE_DIR="$CACHE/x86/numba" "$@"; }

# ---- 0. host tools ---------------------------------------------------------
t0=$EPOCHREALTIME
if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null \
   || ! command -v update-binfmts >/dev/null; then
    log "installing qemu-user-static mmdebstrap binfmt-support arch-test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive $NICE apt-get install -y -qq \
        qemu-user-static mmdebstrap binfmt-support arch-test; } >"$RUN/apt.log" 2>&1 \
        || die "apt-get install (see $RUN/apt.log)"
fi
record host-tools "$(secs "$t0")" "$(qemu-aarch64-static --version | head -1)"

# ---- 1. binfmt_misc --------------------------------------------------------
t0=$EPOCHREALTIME
BF=/proc/sys/fs/binfmt_misc
if ! mountpoint -q $BF; then
    mount -t binfmt_misc binfmt_misc $BF || die "cannot mount binfmt_misc"
    # ours: unmount at exit (which also unregisters qemu-aarch64) unless asked to keep it
    [ "${ARM64_KEEP_BINFMT:-0}" = 1 ] || OUR_BF=$BF
fi
if [ ! -e $BF/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
fi
if [ ! -e $BF/qemu-aarch64 ]; then  # register it by hand, F = open the interpreter now
    printf '%s' ':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:OCF' \
        >$BF/register || die "binfmt register"
fi
grep -q '^enabled' $BF/qemu-aarch64 || echo 1 >$BF/qemu-aarch64
FLAGS=$(sed -n 's/^flags: //p' $BF/qemu-aarch64)
record binfmt "$(secs "$t0")" "qemu-aarch64 flags=$FLAGS"

# ---- 2. the bookworm arm64 root (cached) -----------------------------------
[ "${ARM64_REBUILD:-0}" = 1 ] && { log "ARM64_REBUILD=1: dropping $ROOT"; rm -rf "$ROOT" "$ROOT.tmp"; }
# g++ too: numba.pycc compiles numba's nrt.cpp (without it: "cannot execute 'cc1plus'")
INCLUDE=python3,python3-venv,python3-dev,gcc,g++,libc6-dev,ca-certificates
if [ "$(head -1 "$ROOT/.ok" 2>/dev/null)" != "$INCLUDE" ]; then
    rm -rf "$ROOT.tmp"
    MIRROR=$(apt_mirror | head -1); [ -n "$MIRROR" ] || die "no Debian mirror found in apt sources"
    timed root-build $NICE mmdebstrap --arch=arm64 --variant=apt --include="$INCLUDE" \
        bookworm "$ROOT.tmp" "$MIRROR" || die "mmdebstrap"
    rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT" && { echo "$INCLUDE"; date -u +%FT%TZ; } >"$ROOT/.ok"
else
    record root-build 0 "cached ($ROOT, built $(tail -1 "$ROOT/.ok"))"
fi
case $FLAGS in *F*) ;; *)  # interpreter not preopened: it must exist inside the root
    interp=$(sed -n 's/^interpreter //p' $BF/qemu-aarch64)
    mkdir -p "$ROOT$(dirname "$interp")" && cp -L "$interp" "$ROOT$interp" ;;
esac
arm /usr/bin/true || die "cannot execute arm64 binaries (binfmt)"
record root-exec 0 "$(arm /usr/bin/uname -m) $(arm /usr/bin/python3 -V 2>&1)"

# ---- 3. aarch64 wheels (host pip, cached) ----------------------------------
if [ -x "$HOST_VENV/bin/python" ]; then
    PINS=$("$HOST_VENV/bin/python" -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("numpy", "numba", "llvmlite", "pillow")))' 2>/dev/null)
fi
PINS=${PINS:-numpy==2.4.6 numba==0.68.1 llvmlite==0.50.0 pillow==13.0.0}
# onnxruntime (23 MB) only for an import check: a reference the tests may want on arm64
ORTPIN=$("$HOST_VENV/bin/python" -c 'from importlib.metadata import version as v
print("onnxruntime==" + v("onnxruntime"))' 2>/dev/null || echo onnxruntime)
WHEELS=$CACHE/wheels
WANT="$PINS $ORTPIN setuptools wheel"
if [ "$(cat "$WHEELS/.ok" 2>/dev/null)" != "$WANT" ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    timed wheels-download python3 -m pip download -q -d "$WHEELS" --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
        --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp \
        --abi cp311 --abi abi3 --abi none $WANT || die "pip download"
    echo "$WANT" >"$WHEELS/.ok"
else
    record wheels-download 0 "cached ($(ls "$WHEELS" | grep -c whl) wheels)"
fi

# ---- 4. the arm64 venv (cached) --------------------------------------------
if [ "$(cat "$ROOT/opt/venv/.ok" 2>/dev/null)" != "$WANT" ]; then
    rm -rf "$ROOT/opt/venv" "$ROOT/opt/wheels" && mkdir -p "$ROOT/opt"
    cp -r "$WHEELS" "$ROOT/opt/wheels"
    # shellcheck disable=SC2086
    timed venv-install arm $NICE /bin/sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip \
        install -q --no-index --find-links /opt/wheels $PINS $ORTPIN" || die "venv install"
    echo "$WANT" >"$ROOT/opt/venv/.ok"
else
    record venv-install 0 "cached (/opt/venv: $PINS)"
fi
rm -rf "$ROOT/opt/checks" && cp -r "$HERE/checks" "$ROOT/opt/checks"
rm -rf "$ROOT/opt/checks/__pycache__"

# ---- 5. qnrt from a fresh copy of $SRC -------------------------------------
rm -rf "$CACHE/qnrt-src" "$ROOT/opt/qnrt-src" && mkdir -p "$CACHE/qnrt-src"
tar -C "$SRC" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=build \
    -cf - . | tar -C "$CACHE/qnrt-src" -xf - || die "copy $SRC"
cp -r "$CACHE/qnrt-src" "$ROOT/opt/qnrt-src"
timed qnrt-install arm $NICE /opt/venv/bin/pip install -q --no-index --find-links /opt/wheels \
    /opt/qnrt-src || die "pip install qnrt on arm64"
if [ ! -x "$HOST_VENV/bin/qnrt" ]; then  # no reference venv: make one under the cache
    HOST_VENV=$CACHE/x86-venv
    [ -x "$HOST_VENV/bin/qnrt" ] || timed x86-venv sh -c "python3 -m venv '$HOST_VENV' && \
        '$HOST_VENV/bin/pip' install -q $PINS $ORTPIN '$CACHE/qnrt-src'" || die "x86 venv"
fi

# ---- a. numba JIT kernel, bit-for-bit --------------------------------------
check_a() {
    local A=$RUN/a ok=1 d
    mkdir -p "$A/x86" && rm -rf "$ROOT/out/a" "$ROOT/var/cache/numba" "$CACHE/x86/numba"
    mkdir -p "$ROOT/out/a"
    timed a-import arm $NICE python -c "import numpy, numba, PIL; print(numpy.__version__, \
numba.__version__, PIL.__version__)" || ok=0
    x86 "$HOST_VENV/bin/python" "$HERE/checks/kernel.py" "$A/x86" >"$RUN/a-x86.log" 2>&1 || ok=0
    timed a-kernel-compile arm $NICE python /opt/checks/kernel.py /out/a/first || ok=0
    timed a-kernel-cached arm $NICE python /opt/checks/kernel.py /out/a/second || ok=0
    # the same with LLVM's own host-CPU guess (no NUMBA_CPU_NAME), still on a $CPU core
    timed a-kernel-hostcpu arm /usr/bin/env -u NUMBA_CPU_NAME NUMBA_CACHE_DIR=/tmp/nc-host \
        $NICE python /opt/checks/kernel.py /out/a/hostcpu || ok=0
    cp -r "$ROOT/out/a"/* "$A/" 2>/dev/null
    for d in first second hostcpu; do
        [ -e "$A/$d/meta.json" ] && python3 "$HERE/checks/compare.py" kernel "$A/x86" "$A/$d" \
            >"$A/compare-$d.json" || ok=0
    done
    grep -q '"cache_hits": 1' "$A/second/meta.json" 2>/dev/null \
        || { ok=0; log "a: second run missed the cache"; }
    VERDICT[a]=$([ $ok = 1 ] && echo ok || echo FAIL)
    record a-verdict - "${VERDICT[a]} $(cat "$A/compare-first.json" 2>/dev/null)"
}

# ---- b. numba.pycc AOT -----------------------------------------------------
check_b() {
    local B=$RUN/b ok=1 tail
    mkdir -p "$B/x86/build" && rm -rf "$ROOT/out/b" && mkdir -p "$ROOT/out/b/build"
    x86 "$HOST_VENV/bin/python" "$HERE/checks/aot_build.py" "$B/x86/build" >"$RUN/b-x86.log" 2>&1 \
        && x86 "$HOST_VENV/bin/python" "$HERE/checks/aot_use.py" "$B/x86/build" "$B/x86" \
        >>"$RUN/b-x86.log" 2>&1 || log "b: (x86 reference AOT failed, see $RUN/b-x86.log)"
    timed b-aot-build arm $NICE python /opt/checks/aot_build.py /out/b/build || ok=0
    # a fresh process that never imports numba
    timed b-aot-import arm python /opt/checks/aot_use.py /out/b/build /out/b || ok=0
    cp -r "$ROOT/out/b"/* "$B/" 2>/dev/null
    cp "$RUN/a/first/y_plain.npy" "$B/y_plain.npy" 2>/dev/null  # arm JIT output, if check a ran
    python3 "$HERE/checks/compare.py" aot "$B/x86" "$B" >"$B/compare.json" 2>"$B/compare.err" || ok=0
    [ $ok = 1 ] || grep -hiE 'error|exception|undefined|relocat' "$RUN"/b-aot-*.log | tail -5 >&2
    VERDICT[b]=$([ $ok = 1 ] && echo ok || echo FAIL)
    record b-verdict - "${VERDICT[b]} $(cat "$B/aot.json" "$B/compare.json" 2>/dev/null | tr '\n' ' ')"
    if [ "${ARM64_UPSTREAM_PYCC:-0}" = 1 ]; then
        timed b-upstream-pycc arm $NICE sh /opt/checks/upstream_pycc.sh
        tail=$(grep -E '^(Ran [0-9]+ test|OK|FAILED)' "$RUN/b-upstream-pycc.log" | tr '\n' ' ')
        record b-upstream-verdict - "numba test_pycc, aarch64 skips removed: $tail"
    fi
}

# ---- c. qnrt run on the shipped model --------------------------------------
check_c() {
    local C=$RUN/c ok=1 r
    local QRUN="qnrt run $MODEL examples/ --json --top 10"
    mkdir -p "$C" "$ROOT/out" && rm -rf "$ROOT/var/cache/numba" "$CACHE/x86/numba" "$ROOT"/out/c-*.jsonl
    timed c-x86-first sh -c "cd '$CACHE/qnrt-src' && exec env PYTHONDONTWRITEBYTECODE=1 \
        NUMBA_CACHE_DIR='$CACHE/x86/numba' '$HOST_VENV/bin/'$QRUN >'$C/x86.jsonl'" || ok=0
    timed c-arm-first arm $NICE /bin/sh -c "cd /opt/qnrt-src && $QRUN >/out/c-first.jsonl" || ok=0
    timed c-arm-cached arm $NICE /bin/sh -c "cd /opt/qnrt-src && $QRUN >/out/c-second.jsonl" || ok=0
    cp "$ROOT"/out/c-*.jsonl "$C/" 2>/dev/null
    for r in first second; do
        python3 "$HERE/checks/compare.py" qnrt "$C/x86.jsonl" "$C/c-$r.jsonl" \
            >"$C/compare-$r.json" 2>>"$C/compare.err" || ok=0
    done
    VERDICT[c]=$([ $ok = 1 ] && echo ok || echo FAIL)
    record c-verdict - "${VERDICT[c]} $(cat "$C/compare-first.json" 2>/dev/null)"
}

# ---- d. qnrt compile (AOT) on arm64 ----------------------------------------
check_d() {
    local D=$RUN/d ok=1 r KD=/var/cache/qnrt-kernels
    local QRUN="qnrt run $MODEL examples/ --json --top 10"
    mkdir -p "$D" "$ROOT/out" && rm -rf "$ROOT$KD" "$ROOT"/out/d-*
    [ -e "$RUN/c/x86.jsonl" ] || timed d-x86-ref sh -c "cd '$CACHE/qnrt-src' && exec env \
        PYTHONDONTWRITEBYTECODE=1 NUMBA_CACHE_DIR='$CACHE/x86/numba' '$HOST_VENV/bin/'$QRUN \
        >'$D/x86.jsonl'" || ok=0
    [ -e "$RUN/c/x86.jsonl" ] && cp "$RUN/c/x86.jsonl" "$D/x86.jsonl"
    timed d-arm-compile arm QNRT_KERNEL_DIR=$KD $NICE /bin/sh -c \
        "cd /opt/qnrt-src && qnrt compile --input-shape 1,3,32,32" || ok=0
    timed d-arm-aot-run arm QNRT_KERNEL_DIR=$KD $NICE /bin/sh -c \
        "cd /opt/qnrt-src && $QRUN >/out/d-aot.jsonl" || ok=0
    timed d-arm-aot-session arm QNRT_KERNEL_DIR=$KD python -c "
import sys, numpy as np, qnrt
s = qnrt.Session('/opt/qnrt-src/$MODEL')
s.run(None, {'input': np.zeros((1, 3, 32, 32), np.float32)})
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite'))
print('backend', s.kernel_backend, 'heavy', heavy)
assert s.kernel_backend == 'aot' and not heavy" || ok=0
    cp "$ROOT"/out/d-*.jsonl "$D/" 2>/dev/null
    python3 "$HERE/checks/compare.py" qnrt "$D/x86.jsonl" "$D/d-aot.jsonl" \
        >"$D/compare-x86.json" 2>>"$D/compare.err" || ok=0
    [ -e "$RUN/c/c-first.jsonl" ] && { python3 "$HERE/checks/compare.py" qnrt \
        "$RUN/c/c-first.jsonl" "$D/d-aot.jsonl" >"$D/compare-arm-jit.json" \
        2>>"$D/compare.err" || ok=0; }
    VERDICT[d]=$([ $ok = 1 ] && echo ok || echo FAIL)
    record d-verdict - "${VERDICT[d]} vs x86: $(cat "$D/compare-x86.json" 2>/dev/null) vs arm JIT: $(cat "$D/compare-arm-jit.json" 2>/dev/null)"
}

for k in $CHECKS; do
    case $k in a | b | c | d) "check_$k" ;; *) die "unknown check '$k' in ARM64_CHECKS" ;; esac
done

# ---- extras: onnxruntime import, disk --------------------------------------
timed ort-import arm $NICE python -c "import onnxruntime as o; print(o.__version__, \
o.get_available_providers())" || log "onnxruntime import failed (not part of the verdict)"
record disk - "root $(du -sh "$ROOT" | cut -f1) (venv $(du -sh "$ROOT/opt/venv" | cut -f1)), wheels $(du -sh "$WHEELS" | cut -f1), cache total $(du -sh "$CACHE" | cut -f1)"
verdict "(results: $RUN)"
