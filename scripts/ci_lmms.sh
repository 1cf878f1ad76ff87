#!/usr/bin/env bash
# lmms-eval end to end, offline, on the bundled model: the FlowCut model registered with lmms-eval
# (llava_hf_flowcut, keep=64) must score on the local shapes-VQA task exactly what `flowcut eval`
# scores on the same questions; then the lmms-eval tests (tests_lmms/) run.
#
# lmms-eval is heavy (torchvision, accelerate, datasets, ...), so it gets its own environment in
# .venv-lmms. torch==2.13.0 is installed first and pinned: on the project's machines it is a local
# CPU wheel, while any other torch requirement pulls several GB of CUDA packages.
# FLOWCUT_LMMS_COUNT sets the number of questions (default 200).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
venv=.venv-lmms
build=build/ci-lmms
count=${FLOWCUT_LMMS_COUNT:-200}
keep=64

step() { echo "== [${SECONDS}s] $*"; }

# Every package of the environment is pinned (scripts/locks/lmms.txt, torch included), so a new release of
# any dependency cannot change what this script verifies (filelock 4.3 removed the module lmms-eval 0.7.3 reads).
lock=scripts/locks/lmms.txt
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ] || [ "$lock" -nt "$venv/.installed" ]; then
	step "building $venv (log: $venv/install.log)"
	rm -rf "$venv"
	"$python" -m venv "$venv"
	{
		"$venv/bin/pip" install --upgrade pip &&
			"$venv/bin/pip" install torch==2.13.0 &&
			"$venv/bin/pip" install -c "$lock" -e ".[lmms,test]"
	} >"$venv/install.log" 2>&1 || {
		tail -40 "$venv/install.log"
		exit 1
	}
	touch "$venv/.installed"
fi

rm -rf "$build"
mkdir -p "$build/cpu-torchvision"
# Test environment only (docs/lmms_eval.md): the registry's torchvision wheel has no kernels for this
# CPU torch, so `import torchvision` fails on its nms fake registration and transformers then cannot
# import CLIPImageProcessor. Declaring the two op schemas first lets it import; nothing here runs nms.
# Where torchvision's own extension loads (a normal GPU install), this does nothing.
cat >"$build/cpu-torchvision/sitecustomize.py" <<'EOF'
import glob
import importlib.util
import os

import torch

_spec = importlib.util.find_spec("torchvision")
if _spec is not None and _spec.submodule_search_locations:
    _extensions = glob.glob(os.path.join(_spec.submodule_search_locations[0], "_C*.so"))
    try:
        torch.ops.load_library(_extensions[0])
    except (IndexError, OSError):
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
EOF
export PYTHONPATH="$root/$build/cpu-torchvision"
# No network to the Hub: everything below is local, and any attempt to download fails at once.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$root/$build/hf-home"
model=$("$venv/bin/python" -c "from flowcut.reference import bundled_model_path; print(bundled_model_path())")

step "writing the offline task ($count shapes-VQA test questions)"
"$venv/bin/python" -m flowcut.integrations.lmms_eval write-task "$build/task" --count "$count"

step "lmms-eval: llava_hf_flowcut keep=$keep"
"$venv/bin/python" -m lmms_eval --model llava_hf_flowcut \
	--model_args "pretrained=$model,keep=$keep,method=flowcut,device=cpu" \
	--tasks flowcut_shapes_vqa --include_path "$build/task" --batch_size 1 \
	--output_path "$build/lmms-eval" >"$build/lmms-eval.log" 2>&1 || {
	tail -40 "$build/lmms-eval.log"
	exit 1
}
grep "flowcut_shapes_vqa|" "$build/lmms-eval.log"

step "flowcut eval: flowcut keep=$keep"
"$venv/bin/flowcut" eval --methods flowcut --budgets "$keep" --count "$count" --no-plot \
	--device cpu --dtype float32 --output "$build/flowcut-eval" >"$build/flowcut-eval.log" 2>&1 || {
	tail -40 "$build/flowcut-eval.log"
	exit 1
}

step "comparing"
"$venv/bin/python" -m flowcut.integrations.lmms_eval compare --lmms-output "$build/lmms-eval" \
	--eval-json "$build/flowcut-eval/eval.json" --method flowcut --keep "$keep"

step "tests_lmms"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests_lmms
step "done"
