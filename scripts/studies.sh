#!/usr/bin/env bash
# Both emotion studies end to end on a real pretrained model (default SmolLM2-135M-Instruct, the
# GGUF of scripts/fetch-smollm2.sh), as the patchbay commands a user would type; each command is
# echoed before it runs. Then scripts/studies_report.py writes OUT/report.md from the outputs.
#
#   scripts/studies.sh --small                       # bundled data, small sizes (CI: tests/studies.rs)
#   scripts/studies.sh --envent ../shared/data/envent/envent_gen.csv \
#                      --sev ../shared/data/sev/sev.jsonl --out runs/studies   # full size (README figures)
#
# Tak et al. 2025 (crowd-enVENT): the model's own 13-way answer with the study's prompt and
#   few-shot examples (score); logistic probes of the emotion and ridge probes of the appraisals,
#   layer by layer with bootstrap intervals and the penalty chosen by inner cross-validation
#   (probe); activation patching of attn_out / mlp_out / resid_post in 5-layer windows between
#   correctly predicted prompts of different emotions (patch); steering along the ridge probes'
#   pleasantness and other-responsibility directions and the label shares it moves (steer).
# Wang et al. 2025 (SEV): valence directions context-averaged over SEV's scenarios and emotion
#   directions (class means on crowd-enVENT) (directions); every head's and neuron's contribution
#   to the emotion direction (components contrib); top-k ablation curves against random sets of
#   the same size (ablate --ranking); steered generation from SEV's neutral scenarios, judged by
#   the crowd-enVENT emotion probe, against a same-norm random direction (steer --mode generate).
#
# Options: --model FILE (a GGUF file or HF directory), --envent CSV (crowd-enVENT; default the
# bundled synthetic corpus demo/corpus.csv, its test split), --sev JSONL (default the 5 bundled
# scenarios of tests/data/sev_tiny.jsonl), --out DIR (default studies-out), --small, --layer L (the
# layer of directions, contributions and steering; default the model's middle layer), --device D
# and --precision P (every command's engine: cpu, emu, cuda, cuda:N; f32, bf16), --bin PATH (the
# patchbay binary; default `patchbay` on PATH, else target/release/patchbay).
# A stage whose OUT/<stage>/.done exists is skipped: a killed run resumes at the stage it was in.
set -euo pipefail
# Paths given on the command line are relative to the current directory; the bundled files are
# found through the script's own location.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOLLM2=$ROOT/.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL=$SMOLLM2
ENVENT=""
SEV=$ROOT/tests/data/sev_tiny.jsonl
OUT=studies-out
SMALL=0
LAYER=""
BIN=""
ENGINE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --envent) ENVENT=$2; shift 2 ;;
        --sev) SEV=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --small) SMALL=1; shift ;;
        --layer) LAYER=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --device) ENGINE+=(--device "$2"); shift 2 ;;
        --precision) ENGINE+=(--precision "$2"); shift 2 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "studies.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$BIN" ]; then
    BIN=$(command -v patchbay || echo "$ROOT/target/release/patchbay")
fi
[ -x "$BIN" ] || { echo "studies.sh: no patchbay binary at '$BIN' (cargo build --release, or --bin PATH)" >&2; exit 1; }
if [ "$MODEL" = "$SMOLLM2" ] && [ ! -f "$MODEL" ]; then
    "$ROOT/scripts/fetch-smollm2.sh"
fi
[ -e "$MODEL" ] || { echo "studies.sh: no model at '$MODEL'" >&2; exit 1; }
[ -f "$SEV" ] || { echo "studies.sh: no SEV file at '$SEV'" >&2; exit 1; }
PY=$(command -v python3 || command -v python || true)
[ -n "$PY" ] || { echo "studies.sh: needs python3 for the report (scripts/studies_report.py)" >&2; exit 1; }

# The dataset's flags: crowd-enVENT through its preset, or the bundled corpus's columns.
if [ -n "$ENVENT" ]; then
    [ -f "$ENVENT" ] || { echo "studies.sh: no crowd-enVENT file at '$ENVENT'" >&2; exit 1; }
    DATA=(--dataset "$ENVENT" --preset envent)
    DATA_NAME="crowd-enVENT ($ENVENT)"
else
    DATA=(--dataset "$ROOT/demo/corpus.csv" --filter split=test --label-col emotion --text-col text
          --numeric-cols suddenness,pleasantness,goal_relevance,self_responsblt,other_responsblt,chance_responsblt,self_control,attention,effort)
    DATA_NAME="the bundled synthetic corpus (demo/corpus.csv, split=test)"
fi
EMOTIONS=anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust
N_LAYERS=$("$BIN" inspect --model "$MODEL" | sed -n 's/^layers  *\([0-9][0-9]*\)$/\1/p')
[ -n "$N_LAYERS" ] || { echo "studies.sh: could not read the number of layers of '$MODEL'" >&2; exit 1; }
[ -n "$LAYER" ] || LAYER=$((N_LAYERS / 2))

# Sizes: --small is a smoke run of every stage (CI); the default is the size of the README figures.
if [ "$SMALL" = 1 ]; then
    SCORE_N=26; PROBE_N=130; INNER=2; PAIRS=3; STEER_N=8; DIR_N=130; CONTRIB_N=26
    TOPK=1,4; DRAWS=2; ABLATE_N=8; GEN_SCENARIOS=2; GEN_TOKENS=8; SEV_LIMIT=5
else
    SCORE_N=650; PROBE_N=1300; INNER=5; PAIRS=100; STEER_N=104; DIR_N=1300; CONTRIB_N=260
    TOPK=1,2,4,8,16,32,64; DRAWS=5; ABLATE_N=52; GEN_SCENARIOS=40; GEN_TOKENS=24; SEV_LIMIT=1000000
fi
SITE=blocks.$LAYER.hook_resid_post
QUIET=(); [ -t 2 ] || QUIET=(--quiet)
mkdir -p "$OUT"
printf '{"model": "%s", "engine": "%s", "data": "%s", "sev": "%s", "layer": %s, "n_layers": %s, "small": %s}\n' \
    "$MODEL" "${ENGINE[*]:-the default (cpu, f32)}" "$DATA_NAME" "$SEV" "$LAYER" "$N_LAYERS" "$SMALL" > "$OUT/studies.json"

# shell_word ARG: ARG as one word of a shell command line, quoted only where it needs it.
shell_word() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
        printf ' %s' "$1"
    else
        printf " '%s'" "${1//\'/\'\\\'\'}"
    fi
}

# stage NAME CMD...: runs a patchbay command into OUT/NAME unless OUT/NAME/.done exists; then
# writes its command line (the binary as `patchbay`) to OUT/NAME/command.sh (the report gathers
# them into OUT/commands.sh) and its seconds to OUT/NAME/.done.
stage() {
    local name=$1; shift
    if [ -f "$OUT/$name/.done" ]; then
        echo "studies.sh: $name done earlier (remove $OUT/$name/.done to run it again)" >&2
        return
    fi
    echo "studies.sh: [$name] patchbay $*" >&2
    local t0=$SECONDS
    rm -rf "$OUT/$name"
    "$BIN" "$@" --out "$OUT/$name" "${QUIET[@]}"
    { printf 'patchbay'; for arg in "$@" --out "$OUT/$name"; do shell_word "$arg"; done; printf '\n'; } > "$OUT/$name/command.sh"
    echo "$((SECONDS - t0))" > "$OUT/$name/.done"
}

# ---- Tak et al. 2025 ----
# The model's own answer: the study's prompt with its few-shot examples (joy and sadness).
stage score score --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --sample "$SCORE_N" --stratify \
    --template tak --shots tak --labels "$EMOTIONS"
# Probes of every layer's attn_out, mlp_out and resid_post at the last token of the zero-shot
# prompt (the prompt the judge below renders generated text with), penalties chosen by inner CV.
stage probe probe --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --sample "$PROBE_N" --stratify --sample-seed 1 \
    --template tak --labels "$EMOTIONS" --sites attn_out,mlp_out,resid_post --positions -1 \
    --C auto --alpha auto --inner-folds "$INNER"
# Patching between correctly predicted prompts of different emotions, 5-layer windows.
stage patch patch --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --sample "$SCORE_N" --stratify \
    --template tak --shots tak --labels "$EMOTIONS" --random-pairs "$PAIRS" --different-labels \
    --only-correct --sites attn_out,mlp_out,resid_post --window 5 --positions -1
# Appraisal directions: the ridge probes' rows at the steering layer.
stage appraisal-dirs directions --method probe --probe-weights "$OUT/probe/probes/$SITE.safetensors" \
    --labels pleasantness,other_responsblt
# Steering along them (unit directions, strengths in residual-norm units) and a same-norm random one.
stage steer steer --mode labels --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --sample "$STEER_N" --stratify --sample-seed 2 \
    --template tak --shots tak --labels "$EMOTIONS" \
    --vector "$OUT/appraisal-dirs/directions.safetensors:pleasantness,other_responsblt" \
    --site resid_post --layers "$LAYER" --positions all --betas=-64,-32,32,64 --normalise

# ---- Wang et al. 2025 ----
# Valence directions on SEV: x(scenario, positive|negative) - x(scenario, neutral), averaged, each
# scenario read through the same tak prompt as the emotion directions below (so they compare).
stage sev-dirs directions --method context-averaged --model "$MODEL" "${ENGINE[@]}" --dataset "$SEV" --limit "$SEV_LIMIT" \
    --template tak --sites resid_post
# Emotion directions: class means on the emotion dataset, each emotion against the rest.
stage emotion-dirs directions --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --sample "$DIR_N" --stratify --sample-seed 1 \
    --template tak --labels "$EMOTIONS" --sites resid_post
# Each head's and neuron's contribution to the joy direction at the steering layer.
stage contrib components contrib --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --sample "$CONTRIB_N" --stratify --sample-seed 3 \
    --template tak --labels "$EMOTIONS" --vector "$OUT/emotion-dirs/directions.safetensors:joy" \
    --site resid_post --layer "$LAYER" --positions last
# Top-k ablation curves: the top components for joy zeroed together, against random sets.
stage topk ablate --model "$MODEL" "${ENGINE[@]}" "${DATA[@]}" --filter emotion=joy --limit "$ABLATE_N" \
    --template tak --labels "$EMOTIONS" \
    --ranking "$OUT/contrib/heads.csv" --ranking "$OUT/contrib/neurons.csv" --ranking-label joy \
    --top-k "$TOPK" --random-draws "$DRAWS" --op zero --positions all \
    --projection "$OUT/emotion-dirs/directions.safetensors:joy" --projection-layer "$LAYER"
# Steered generation from SEV's neutral scenarios along four emotion directions, judged by the
# emotion probe of the resid_post layer with the best held-out accuracy (the zero-shot tak prompt
# around each generated text, as the probe's own prompts).
JUDGE_LAYER=$(awk -F, '$1 == "resid_post" && $4 == "accuracy" && $5 > best { best = $5; layer = $2 } END { print layer }' \
    "$OUT/probe/probe_results.csv")
stage generate steer --mode generate --model "$MODEL" "${ENGINE[@]}" --sev "$SEV" --limit "$GEN_SCENARIOS" \
    --template '{text} I feel' \
    --vector "$OUT/emotion-dirs/directions.safetensors:joy,anger,sadness,fear" \
    --site resid_post --layers "$LAYER" --positions 'last:4+generated' --betas=32,64 --normalise \
    --max-new-tokens "$GEN_TOKENS" \
    --judge-probe "$OUT/probe/probes/blocks.$JUDGE_LAYER.hook_resid_post.safetensors" --judge-template tak

"$PY" "$ROOT/scripts/studies_report.py" "$OUT"
echo "studies.sh: report in $OUT/report.md" >&2
