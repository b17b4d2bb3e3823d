#!/usr/bin/env bash
# AddressSanitizer and ThreadSanitizer runs of sdtree's concurrent tests: the stress tests
# (crates/sdtree/tests/stress.rs) and the concurrent differential test
# (crates/sdtree/tests/linearizable.rs), on the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks
# -Zsanitizer and -Zbuild-std).
#
# ThreadSanitizer is run with -Zbuild-std, so that std (thread spawning and joining, scoped
# threads, the thread-locals crossbeam-epoch's default collector keeps its handles in) is
# instrumented too, as the rustc book's sanitizer chapter recommends: synchronization
# inside an uninstrumented std is invisible to TSan and can yield false race reports. That
# needs the rust-src component (`rustup component add rust-src`); it works on the stable
# toolchain here. (ASan needs no instrumented std and is built without it.)
#
# The tests' operation counts are scaled by SDTREE_TEST_SCALE (a percentage, default here
# 200: sanitized, they still run in about 30 s, so they do twice the plain runs' work);
# every test runs a fixed number of operations, not for a time. From clean target
# directories the whole script took 1 min 33 s on two shared cores at scale 25 (about
# 1 min of it building, mostly std for ThreadSanitizer), about 2 min at 200.
#
# Each sanitizer builds into its own target directory (target/asan, target/tsan). Usage:
#   .ci/sanitizers.sh            # both
#   .ci/sanitizers.sh asan|tsan  # one
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
tests=(--test stress --test linearizable)
export RUSTC_BOOTSTRAP=1
export SDTREE_TEST_SCALE="${SDTREE_TEST_SCALE:-200}"
# LeakSanitizer (on by default with ASan) also runs: the tests leak nothing.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1}"

which="${1:-all}"

if [[ $which == all || $which == asan ]]; then
    echo "== AddressSanitizer: sdtree stress + linearizable (scale ${SDTREE_TEST_SCALE}%)"
    RUSTFLAGS="-Zsanitizer=address" RUSTDOCFLAGS="-Zsanitizer=address" \
        CARGO_TARGET_DIR=target/asan \
        cargo test -p sdtree --release --target "$target" "${tests[@]}"
fi

if [[ $which == all || $which == tsan ]]; then
    if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
        echo "ThreadSanitizer needs -Zbuild-std, which needs: rustup component add rust-src" >&2
        exit 1
    fi
    echo "== ThreadSanitizer (-Zbuild-std): sdtree stress + linearizable (scale ${SDTREE_TEST_SCALE}%)"
    RUSTFLAGS="-Zsanitizer=thread" RUSTDOCFLAGS="-Zsanitizer=thread" \
        CARGO_TARGET_DIR=target/tsan \
        cargo test -Zbuild-std -p sdtree --release --target "$target" "${tests[@]}"
fi
