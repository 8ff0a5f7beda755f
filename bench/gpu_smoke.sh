#!/usr/bin/env bash
# Sharded DPO on one GPU machine, a few steps each: DeepSpeed ZeRO-3 and FSDP2, full copy and LoRA, then a resume.
# NOT RUN on the CPU-only development machine (it has no GPU); there, tests/test_train_dpo.py runs FSDP2 over gloo
# on 2 CPU processes instead. Run it when a GPU machine is at hand, before trusting a long sharded run:
#
#   bash bench/gpu_smoke.sh                      # every GPU of the machine, Qwen/Qwen2.5-0.5B-Instruct
#   MODEL=meta-llama/Llama-3.2-1B-Instruct bash bench/gpu_smoke.sh
#
# Each run trains 4 steps with a checkpoint at step 2, samples the reference's poems from the prepared model
# (ZeRO-3 gathers its shards; FSDP loads non-zero ranks on the meta device) and then the policy's at step 2
# and 4, and saves a model that must load with plain transformers / PEFT. It needs the Hub (the model) and
# `pip install deepspeed` for ZeRO-3. Output: data/gpu_smoke/<engine>_<full|lora>/; the last line says PASS or FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_smoke.sh: no CUDA device here; this script is for a GPU machine" >&2
    exit 1
fi
python -c "import deepspeed" 2>/dev/null || { echo "gpu_smoke.sh: pip install deepspeed first (ZeRO-3)" >&2; exit 1; }
[ -d data/pairs_five_char ] || python build_dataset.py

launch() {  # launch <accelerate config> <output dir> <extra train_dpo.py arguments...>
    local config=$1 out=$2
    shift 2
    python -m accelerate.commands.launch --config_file "configs/accelerate/$config" --num_processes "$GPUS" \
        train_dpo.py --config configs/dpo_qwen_lora_gpu.yaml --model_name_or_path "$MODEL" --output_dir "$out" \
        --max_train_pairs 256 --max_eval_pairs 32 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
        --save_steps 2 --eval_steps 2 --logging_steps 1 --sample_titles 8 --report_to none "$@"
}

status=PASS
for engine in deepspeed_zero3 fsdp; do
    for variant in full lora; do
        out=data/gpu_smoke/${engine}_${variant}
        rm -rf "$out"
        peft=$([ "$variant" = lora ] && echo true || echo false)
        start=$(date +%s)
        if launch "$engine.yaml" "$out" --use_peft "$peft" --max_steps 4 \
            && launch "$engine.yaml" "$out" --use_peft "$peft" --max_steps 6 --resume_from_checkpoint true \
            && grep -q "## step 6" "$out/samples.md" \
            && python - "$out" "$variant" <<'EOF'
import sys
from transformers import AutoModelForCausalLM
out, variant = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(out)  # an adapter directory loads onto its base with PEFT installed
print(f"{out}: {type(model).__name__} loads ({variant})")
EOF
        then
            echo "gpu_smoke.sh: $engine $variant ok in $(( $(date +%s) - start )) s"
        else
            echo "gpu_smoke.sh: $engine $variant FAILED (see above)" >&2
            status=FAIL
        fi
    done
done
echo "gpu_smoke.sh: $status"
[ "$status" = PASS ]
