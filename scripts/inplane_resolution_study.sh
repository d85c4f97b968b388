#!/usr/bin/env bash
# In-plane resolution study, prepared for a GPU session (not yet run to the end; dry-run on a CPU):
# does stage 2 find small tumors better on a 1 mm in-plane grid than on the `cpu` preset's 2 mm?
# Both arms train the `cpu` recipe from scratch on the same phantoms, with the same 20 mm mask,
# the 1 mm arm with crops twice as many pixels (the same field of view in mm):
#   arm 1: --set preprocessing={...1 mm...} --set crop_stage1=320 --set crop_stage2=224
#   arm 2: --set preprocessing={...2 mm...}
# The phantoms are those of the recent runs: training masks case_00000..00119 with extra tumors
# (scripts/phantoms_extra_tumors.json), validation case_00120..00149 (scripts/phantoms_blob_medulla.json),
# seed 0. Score both RUN/model.kseg files afterwards on the same images, end to end on the CT's grid
# (`kits-seg predict` then `kits-seg evaluate`), beside the shipped model.
#
#   bash scripts/inplane_resolution_study.sh     # on a CUDA machine with 16 cores: ~10 min
#
# Env: MASKS (KiTS19 masks, default ../shared/data/kits19), W (work folder, default /tmp/kx),
# R (report folder, default W/report), PY (python), JOBS (processes), DEVICE (default cuda),
# TRAIN_CASES / VAL_CASES (case names), STEPS (extra train options, e.g. for a dry run:
# "--stage1-steps 2 --stage2-steps 2 --steps-per-epoch 1"). W/done1 and W/done mark each arm's end.
# On a machine without ../shared, carry the masks in an ignored folder of the repo: recompressed
# (`zcat segmentation.nii.gz | gzip -9`) the 150 take 12 MB instead of 47 MB; then MASKS=that folder.
# The first try (2026-12-04) stalled preparing the cases; fixed since (docs/gpu_check_2026-12-04b.md).
set -uo pipefail
cd "$(dirname "$0")/.."
W=${W:-/tmp/kx}; R=${R:-$W/report}; PY=${PY:-python3}; JOBS=${JOBS:-16}; MASKS=${MASKS:-../shared/data/kits19}
mkdir -p "$W" "$R"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%T) +$SECONDS s] $*" | tee -a "$R/timeline.txt"; }
TRAIN=${TRAIN_CASES:-$(seq -f 'case_%05g' 0 119)}
VAL=${VAL_CASES:-$(seq -f 'case_%05g' 120 149)}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
stamp "phantoms"
gen() {  # gen PARAMS CASES...
  local params=$1; shift
  printf '%s\n' "$@" | xargs -P "$JOBS" -n 2 $PY -m kitseg.cli phantom --masks "$MASKS" --out "$W/data" --seed 0 \
    --params "$params" --cases > "$R/phantom_$(basename "$params" .json).txt" 2>&1
}
gen scripts/phantoms_extra_tumors.json $TRAIN
gen scripts/phantoms_blob_medulla.json $VAL
stamp "phantoms done: $(ls "$W/data" | wc -l) cases"
$PY - "$W/data" <<'EOF2' > "$R/phantom_hashes.txt" 2>&1
import hashlib, sys
from pathlib import Path
import nibabel as nib, numpy as np
for case in sorted(Path(sys.argv[1]).iterdir())[::15]:
    a = np.asarray(nib.load(case / "imaging.nii.gz").dataobj)
    print(case.name, a.dtype, a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16])
EOF2

MASK='mask={"threshold":0.5,"radius":20,"radius_unit":"mm"}'
P1='preprocessing={"slice_spacing_mm":5.0,"inplane_spacing_mm":1.0,"context_slices":1}'
P2='preprocessing={"slice_spacing_mm":5.0,"inplane_spacing_mm":2.0,"context_slices":1}'
STEPS=${STEPS:-}
cache() {  # cache N: the stage-grid cases of arm N, JOBS processes
  local pp=P$1
  $PY - "$W/data" "$W/cache$1" "${!pp#preprocessing=}" "$JOBS" <<'EOF3' > "$R/cache$1.txt" 2>&1
import json, sys
from pathlib import Path
from kitseg.config import PreprocessingConfig
from kitseg.training.data import load_cases
cases = load_cases(Path(sys.argv[1]), PreprocessingConfig.from_dict(json.loads(sys.argv[3])), Path(sys.argv[2]),
                   progress=False, workers=int(sys.argv[4]))
print(len(cases), "cases, e.g.", cases[0].image.shape)
EOF3
  stamp "cache $1 exit $?"
}
run_arm() {  # run_arm N EXTRA...
  local n=$1; shift
  OMP_NUM_THREADS=8 $PY -m kitseg.cli train --data "$W/data" --out "$W/run$n" --cache "$W/cache$n" --preset cpu \
    --device ${DEVICE:-cuda} --no-progress --val-cases $VAL --set "$MASK" $STEPS "$@" > "$R/train$n.txt" 2>&1
  stamp "arm $n exit $?"
  mkdir -p "$R/run$n"
  cp "$W/run$n/model.kseg" "$W/run$n/split.json" "$W/run$n/config.json" "$R/run$n/" 2>/dev/null
  for s in fold1 fold2 stage1 stage2; do cp "$W/run$n/$s/log.csv" "$R/run$n/$s-log.csv" 2>/dev/null; done
}
stamp "arm 1: 1 mm"
cache 1
run_arm 1 --set "$P1" --set crop_stage1=320 --set crop_stage2=224
touch "$W/done1"
stamp "arm 2: 2 mm"
cache 2
run_arm 2 --set "$P2"
stamp "done"
touch "$W/done"
