#!/usr/bin/env bash
# Release check: build the sdist and the wheel, `twine check` them, install the wheel in a fresh venv and use it from
# a directory outside the repo (so only the installed wheel can be imported): `hmamba --help`, `import hmamba`, the
# package data, the shipped model's save -> AutoModelForCausalLM round trip and `hmamba generate`, then the sdist's own
# tests of saving and the Hub against the installed wheel. Needs python3 with venv and pip access. Usage:
#   scripts/check_wheel.sh [WORKDIR]    (default: a temporary folder, removed afterwards)
#   TRANSFORMERS=5.23.0 scripts/check_wheel.sh    (pin transformers; default: the newest the wheel allows)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
[ $# -ge 1 ] || trap 'rm -rf "$work"' EXIT
start=$SECONDS
step() { echo "== [$((SECONDS - start))s] $*"; }
logged() { "$@" > "$work/last.log" 2>&1 || { tail -40 "$work/last.log"; echo "FAILED: $*"; exit 1; }; }  # quiet unless it fails

step "fresh venv in $work/venv"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
logged "$py" -m pip install torch==2.13.0  # first, pinned: resolves to the CPU wheel (unpinned pulls GBs of CUDA)
logged "$py" -m pip install build twine

step "python -m build (the wheel is built from the sdist)"
rm -rf "$work/dist"
logged "$py" -m build --outdir "$work/dist" "$repo"
"$py" -m twine check --strict "$work/dist"/*
wheel=$(ls "$work/dist"/hmamba-*.whl)
sdist=$(ls "$work/dist"/hmamba-*.tar.gz)

step "install $(basename "$wheel") with the test extra"
[ -z "${TRANSFORMERS:-}" ] || logged "$py" -m pip install "transformers==$TRANSFORMERS"
logged "$py" -m pip install "$wheel[test]"
"$py" -c "import torch, transformers; print('torch', torch.__version__, '/ transformers', transformers.__version__)"

step "use the installed wheel from outside the repo"
mkdir -p "$work/outside" && cd "$work/outside"
"$work/venv/bin/hmamba" --help > help.txt
grep -q "generate" help.txt && grep -q "convert" help.txt && grep -q "export" help.txt
HF_HUB_OFFLINE=1 "$py" - <<'PY'
import os, sys, tempfile
import torch
import hmamba
from importlib import metadata, resources
from transformers import AutoModelForCausalLM
from hmamba.generate import PRETRAINED, save_shipped_model

site = os.path.realpath(os.path.dirname(os.path.dirname(hmamba.__file__)))
assert site.endswith("site-packages"), f"hmamba imported from {hmamba.__file__}, not the installed wheel"
assert metadata.version("hmamba") == hmamba.__version__
assert (resources.files("hmamba") / "configs" / "tiny.json").is_file()
pretrained = resources.files("hmamba") / "pretrained"
shipped = sorted(p.name for p in pretrained.iterdir()) if pretrained.is_dir() else []
assert PRETRAINED in shipped, f"the wheel lacks the shipped model hmamba/pretrained/{PRETRAINED}: {shipped}"
with tempfile.TemporaryDirectory() as d:
    save_shipped_model(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()  # through the Auto classes hmamba registers
    remote = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    ids = torch.randint(3, 259, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, model(ids).logits, atol=0, rtol=0)
print(f"hmamba {hmamba.__version__} from {hmamba.__file__}: round trip OK; shipped pretrained models: {shipped}")
PY
HF_HUB_OFFLINE=1 "$work/venv/bin/hmamba" generate --save-dir "$work/outside/shipped" --max-new-tokens 8 > generate.txt
tail -3 generate.txt

step "the sdist's tests of saving and the Hub, against the installed wheel"
tar xzf "$sdist" -C "$work"
cd "$work/$(basename "$sdist" .tar.gz)"
# the pytest script, not `python -m pytest`: the sdist's root must not be on sys.path (hmamba comes from the wheel)
HF_HUB_OFFLINE=1 "$work/venv/bin/pytest" -q -p no:cacheprovider tests/test_saving.py tests/test_hub.py

step "wheel check OK: $(basename "$wheel"), $(basename "$sdist")"
