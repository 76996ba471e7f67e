#!/usr/bin/env bash
# The GPU check: one prepared script for one GPU, under 5 minutes, that writes one JSON file.
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE, on a machine with the package registry: fetch what the GPU
#                                            # machine lacks into bench-out/gpu-carry/ (wheels + Fashion-MNIST)
#   bash benchmarks/gpu_check.sh             # THERE, on the GPU machine (cold, no network), from the repo root
#
# What it does on the GPU machine:
#   1. checks that a GPU is there (nvidia-smi, then torch) and fails at once, clearly, when not;
#   2. finds a Python whose torch is a CUDA build: $LOSSGLASS_GPU_PYTHON, /tmp/gpuvenv, python3 on PATH,
#      /opt/torch/.venv/bin/python3 (this repo's .venv holds the CPU build of torch and is not used); with none, it
#      tries `pip install torch` into /tmp/gpuvenv (needs a registry) and otherwise stops saying what is missing;
#   3. adds lossglass's missing pure dependencies (pydantic, tomli-w, ...) from bench-out/gpu-carry/wheels (made by
#      --prepare) or pip, into /tmp/lgsite; runs lossglass from src/ (PYTHONPATH), nothing installed;
#   4. runs tests/test_device.py with LOSSGLASS_TEST_DEVICE=cuda (every result compared with the CPU's);
#   5. checks numbers: replicas' train loss after the same seed and steps on cuda vs cpu (<= 1e-4 relative), a
#      plane's losses (<= 1e-5), the top Hessian eigenvalue (<= 1e-4);
#   6. runs the quickstart preset with --device cuda and reduced sizes;
#   7. times each stage of the paper preset on cuda with reduced steps (from the run's progress.json), with the
#      factors that scale them to full size;
#   and writes everything to bench-out/gpu_check.json (and $OUT/gpu_check.json when $OUT is set). Exit code 0 when
#   every check passed, 1 when one failed (the JSON says which), 2 when there is no GPU or no usable torch.
#
# Environment: LOSSGLASS_GPU_PYTHON (a python with CUDA torch), LOSSGLASS_DATA (Fashion-MNIST folder; default
# bench-out/gpu-carry/fashion-mnist, then /usr/share/datasets/fashion-mnist; without it the synthetic 'teacher' data
# set is used), GPU_CHECK_BUDGET (seconds, default 285), GPU_CHECK_DEVICE (default cuda; "cpu" rehearses the whole
# script on a machine without a GPU: every step runs, on the CPU, and nothing is compared with anything else).
set -u
DEV="${GPU_CHECK_DEVICE:-cuda}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CARRY="$REPO/bench-out/gpu-carry"
RESULT="$REPO/bench-out/gpu_check.json"
WORK="${TMPDIR:-/tmp}/lossglass-gpu-check"
NEED_MODULES="numpy scipy pandas pyarrow safetensors pydantic matplotlib tqdm sklearn tomli_w psutil pytest"
# wheels the GPU image lacks (its python3 is 3.12): pydantic and its parts, tomli-w
WHEELS="pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 tomli-w==1.2.0"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
  PYV="${GPU_PYTHON_VERSION:-3.12}"
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$CARRY/wheels" "$w"
  done
  src="${LOSSGLASS_DATA:-/usr/share/datasets/fashion-mnist}"
  cp "$src"/*-ubyte* "$CARRY/fashion-mnist/" 2>/dev/null || echo "no Fashion-MNIST in $src: the check will use synthetic data"
  du -sh "$CARRY"
  echo "prepared $CARRY; on the GPU machine carry bench-out/gpu-carry and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-285}"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # a phase's timeout within the budget
mkdir -p "$WORK" "$(dirname "$RESULT")"
LOG="$WORK/log.txt"
: > "$LOG"
note() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

finish() {  # $1: exit code; writes the JSON from the parts gathered in $WORK
  local code="$1"
  "${PY:-python3}" - "$WORK" "$RESULT" "$code" <<'EOF' 2>>"$LOG" || cat > "$RESULT" <<EOF2
import json, os, sys, glob
work, out, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
res = {"exit_code": code}
for f in sorted(glob.glob(os.path.join(work, "part-*.json"))):
    try:
        res[os.path.basename(f)[5:-5]] = json.load(open(f))
    except Exception as e:
        res[os.path.basename(f)[5:-5]] = {"error": f"unreadable: {e}"}
res["log_tail"] = open(os.path.join(work, "log.txt")).read()[-6000:]
json.dump(res, open(out, "w"), indent=1, default=str)
EOF
{"exit_code": $code, "error": "could not assemble the JSON (no usable python); see $LOG"}
EOF2
  [ -n "${OUT:-}" ] && cp "$RESULT" "$OUT/gpu_check.json" 2>/dev/null
  [ -n "${OUT:-}" ] && cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
  note "wrote $RESULT (exit $code)"
  exit "$code"
}
part() { printf '%s' "$2" > "$WORK/part-$1.json"; }  # a JSON fragment for the result
rm -f "$WORK"/part-*.json

# 1. a GPU?
if [ "$DEV" = cpu ]; then
  note "rehearsal on the CPU (GPU_CHECK_DEVICE=cpu)"
  part gpu '{"rehearsal": "GPU_CHECK_DEVICE=cpu"}'
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  note "GPU: $GPU"
  part gpu "{\"nvidia_smi\": \"$GPU\"}"
else
  note "no GPU: nvidia-smi is missing or lists no device. This check needs one NVIDIA GPU."
  part gpu '{"error": "no GPU (nvidia-smi missing or lists no device)"}'
  finish 2
fi

# 2. a python whose torch is a CUDA build
probe='import torch,sys; assert torch.cuda.is_available(), "no cuda"; print(torch.__version__, torch.version.cuda, sys.version.split()[0])'
[ "$DEV" = cpu ] && probe='import torch,sys; print(torch.__version__, sys.version.split()[0])'
PY=""
TRIED=""
for cand in "${LOSSGLASS_GPU_PYTHON:-}" /tmp/gpuvenv/bin/python "$(command -v python3 || true)" /opt/torch/.venv/bin/python3 \
            /usr/local/bin/python3 /usr/bin/python3; do
  [ -n "$cand" ] && [ -x "$cand" ] || continue
  TRIED="$TRIED $cand"
  if out=$("$cand" -c "$probe" 2>/dev/null); then PY="$cand"; note "python with CUDA torch: $cand ($out)"; break; fi
done
if [ -z "$PY" ]; then
  note "no python with a CUDA build of torch among:$TRIED; trying pip install torch into /tmp/gpuvenv"
  if (python3 -m venv /tmp/gpuvenv && timeout "$(cap 150)" /tmp/gpuvenv/bin/pip install -q torch) >>"$LOG" 2>&1 \
     && out=$(/tmp/gpuvenv/bin/python -c "$probe" 2>>"$LOG"); then
    PY=/tmp/gpuvenv/bin/python; note "installed: $out"
  else
    note "MISSING: a CUDA build of torch (>= 2.6). None of$TRIED has one, and pip could not install it (no network?)."
    note "Give one with LOSSGLASS_GPU_PYTHON=/path/to/python (torch with CUDA), or make /tmp/gpuvenv by hand."
    part python "{\"error\": \"no CUDA torch\", \"tried\": \"$TRIED\"}"
    PY=""
    finish 2
  fi
fi

# 3. lossglass's dependencies
SITE="$WORK/site"
missing=$("$PY" - $NEED_MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  note "missing in $PY: $missing; installing into $SITE"
  mkdir -p "$SITE"
  if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/wheels/*.whl >>"$LOG" 2>&1 \
      || note "installing the carried wheels failed (see the log)"
  else
    timeout "$(cap 60)" "$PY" -m pip install -q --target "$SITE" pydantic tomli-w >>"$LOG" 2>&1 \
      || note "pip could not fetch pydantic/tomli-w (no network, and no bench-out/gpu-carry/wheels: run --prepare here first)"
  fi
fi
export PYTHONPATH="$REPO/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
still=$("$PY" - $NEED_MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
[ -n "$still" ] && note "still missing: $still (the parts that need them are skipped)"
part python "$("$PY" -c "
import json, sys, torch
print(json.dumps({'python': sys.executable, 'version': sys.version.split()[0], 'torch': torch.__version__,
                  'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0) if '$DEV' != 'cpu' else 'cpu',
                  'missing_modules': '$still'.split()}))")"
if ! "$PY" -c "import lossglass" >>"$LOG" 2>&1; then
  note "lossglass does not import with $PY (see the log)"
  finish 2
fi

# data
DATA=""
for d in "${LOSSGLASS_DATA:-}" "$CARRY/fashion-mnist" /usr/share/datasets/fashion-mnist; do
  [ -n "$d" ] && ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1 && { DATA="$d"; break; }
done
if [ -n "$DATA" ]; then export LOSSGLASS_DATA="$DATA"; note "Fashion-MNIST: $DATA"; else note "no Fashion-MNIST: synthetic data"; fi
FAIL=0

# 4. the device-sensitive tests on cuda
note "tests/test_device.py on $DEV"
if LOSSGLASS_TEST_DEVICE="$DEV" timeout "$(cap 90)" "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py \
     > "$WORK/pytest.txt" 2>&1; then rc=0; else rc=$?; FAIL=1; fi
tail -3 "$WORK/pytest.txt" | tee -a "$LOG"
part tests "$("$PY" -c "
import json; t = open('$WORK/pytest.txt').read()
print(json.dumps({'rc': $rc, 'summary': t.strip().splitlines()[-1] if t.strip() else '', 'tail': t[-3000:]}))")"

# 5. CPU vs GPU agreement, and 7's unit timings
note "agreement cpu vs cuda"
if ! GPU_CHECK_DEVICE="$DEV" timeout "$(cap 75)" "$PY" - "$WORK/part-agreement.json" > "$WORK/agree.txt" 2>&1 <<'EOF'
import json, os, sys, time
import torch
import lossglass as lg
from lossglass.protocols import curvature as K
out = {}
try:
    ds = lg.datasets.load("fashion-mnist", n_train=10000, n_test=1000, seed=0) if os.environ.get("LOSSGLASS_DATA") \
        else lg.datasets.load("teacher", n_train=10000, n_test=1000, in_dim=784, width=16, n_classes=10, seed=0)
    model = lg.models.mlp(784, 64, 10)
    dev = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    sync = torch.cuda.synchronize if dev != "cpu" else (lambda: None)
    cpu, gpu = lg.Problem(model, ds, device="cpu"), lg.Problem(model, ds, device=dev)
    rel = lambda a, b: float((torch.as_tensor(a).double().cpu() - torch.as_tensor(b).double().cpu()).abs().max()
                             / torch.as_tensor(b).double().cpu().abs().max())
    kw = dict(epochs=1, batch_size=128, lr=0.05, seed=0, progress=False)
    t = time.time(); rg = lg.train(gpu, 16, **kw); sync(); tg = time.time() - t
    t = time.time(); rc = lg.train(cpu, 16, **kw); tc = time.time() - t
    out["train_loss_rel"] = rel(rg.table["train_loss"].tolist(), rc.table["train_loss"].tolist())
    out["train_s"] = {"cuda": tg, "cpu": tc, "steps": len(ds.y_train) // 128, "replicas": 16}
    th = rc.theta[0]
    t = time.time(); pg = lg.plane(gpu, th.to(gpu.device), steps=21); sync(); t1 = time.time() - t
    t = time.time(); pc = lg.plane(cpu, th, steps=21); t2 = time.time() - t
    out["plane_loss_rel"] = rel(pg.train_loss, pc.train_loss)
    out["plane_s"] = {"cuda": t1, "cpu": t2}
    eg = K.top_eigenvalues(gpu, th.to(gpu.device), k=1, tol=1e-6).values
    ec = K.top_eigenvalues(cpu, th, k=1, tol=1e-6).values
    out["top_eigenvalue_rel"] = rel(eg, ec)
    out["ok"] = out["train_loss_rel"] <= 1e-4 and out["plane_loss_rel"] <= 1e-5 and out["top_eigenvalue_rel"] <= 1e-4
except Exception as e:  # noqa: BLE001
    import traceback
    out["error"] = traceback.format_exc()[-3000:]
    out["ok"] = False
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
sys.exit(0 if out["ok"] else 1)
EOF
then FAIL=1; note "agreement FAILED: $(tail -c 600 "$WORK/agree.txt")"; else note "agreement ok: $(tail -c 400 "$WORK/agree.txt")"; fi

# 6. the quickstart on cuda, reduced
run_study() {  # $1 name, $2 timeout, then arguments for 'lossglass run'
  local name="$1" to="$2"; shift 2
  local t0; t0=$(date +%s)
  local rc=0
  timeout "$to" "$PY" -m lossglass.cli run --device "$DEV" --quiet --force --out "$WORK/$name" "$@" \
    > "$WORK/$name.txt" 2>&1 || rc=$?
  part "$name" "$("$PY" -c "
import json, os
p = os.path.join('$WORK/$name', 'progress.json')
st = json.load(open(p)).get('stages', {}) if os.path.exists(p) else {}
print(json.dumps({'rc': $rc, 'wall_s': $(date +%s) - $t0, 'timed_out': $rc in (124, 137),
                  'stages': {k: {'state': v.get('state'), 'seconds': v.get('seconds')} for k, v in st.items()},
                  'tail': open('$WORK/$name.txt').read()[-2500:]}))")"
  return $rc
}
if [ -n "$still" ] && [[ " $still " == *" pydantic "* || " $still " == *" tomli_w "* ]]; then
  note "quickstart and paper runs skipped: the CLI needs pydantic and tomli-w (run --prepare here, carry bench-out/gpu-carry)"
  part quickstart '{"skipped": "pydantic/tomli-w missing"}'
  FAIL=1
else
  DATASET=(); [ -z "$DATA" ] && DATASET=(--set data.name=teacher)
  note "quickstart on cuda (reduced)"
  run_study quickstart "$(cap 90)" --preset quickstart "${DATASET[@]}" --set data.n_train=4000 --set train.replicas=8 \
    --set walk.steps=40 --set connect.bezier_steps=20 --set connect.plane_steps=11 --set reference.steps=200 \
    --set reference.sk_sweeps=200 --set reference.sk_samples=1 || { FAIL=1; note "quickstart FAILED (see the JSON)"; }
  # 7. each stage of the paper preset, reduced steps (scale factors in the JSON)
  note "paper preset on cuda, reduced steps"
  run_study paper "$(cap 150)" --preset paper "${DATASET[@]}" --set train.epochs=1 --set walk.steps=200 \
    --set walk.langevin_steps=100 --set connect.bezier_steps=100 --set connect.width_replicas=4 \
    --set replicas.basin_sweeps=100 --set reference.steps=300 --set reference.sk_sweeps=300 \
    --set reference.sk_samples=1 || { rc=$?; if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      note "paper run did not finish within its budget (the stages it finished are timed)"; else
      FAIL=1; note "paper run FAILED (exit $rc; see the JSON)"; fi; }
  part paper_scale '{"train": 20, "walk": 10, "walk_langevin": 10, "connect_bezier": 10, "connect_widths": 40, "replicas_basin": 10, "reference": 10, "note": "multiply a stage time by its factor for the full preset (train: 20 epochs; widths: 20 epochs x 2 for 8 replicas); the other parts of a stage run at full size"}'
fi
note "done in $(( $(date +%s) - START )) s"
finish "$FAIL"
