#!/usr/bin/env bash
# Short libFuzzer runs of every target (CI: PQ_FUZZ_SECONDS each, default 20). Builds them with
# clang, ASan and UBSan into build-fuzz/ (needs clang: deploy/dev/install-deps.sh does not
# install it; .ci/run does). Each target starts from a copy of its seed corpus, so the tree's
# corpus is not changed; a crash leaves its input in build-fuzz/findings/<target>/ and fails.
# Longer local runs: PQ_FUZZ_SECONDS=600 tests/fuzz/run-short.sh (figures in RELIABILITY.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${PQ_FUZZ_SECONDS:-20}"
CC=clang cmake -S . -B build-fuzz -DPQ_FUZZ=ON -DPQ_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    >/dev/null
targets=(envelope stream provider rate_hints conf spool jscan multipart callback_url)
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]/#/fuzz_}" >/dev/null
failed=0
for t in "${targets[@]}"; do
    work="build-fuzz/findings/$t"
    rm -rf "$work" && mkdir -p "$work/corpus"
    cp tests/fuzz/corpus/"$t"/* "$work/corpus/"
    if (cd "$work" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        "../../tests/fuzz/fuzz_$t" -max_total_time="$secs" -print_final_stats=1 corpus \
        >log 2>&1); then
        echo "fuzz_$t: $(grep -o 'number_of_executed_units: [0-9]*' "$work/log" | cut -d' ' -f2)" \
            "runs in ${secs}s, no finding"
    else
        echo "fuzz_$t: FINDING (input and log in $work):" >&2
        grep -E 'ERROR|SUMMARY|#[0-9]+ 0x.* in (pq_|LLVMFuzzer)' "$work/log" | head -12 >&2 || true
        failed=1
    fi
done
exit "$failed"
