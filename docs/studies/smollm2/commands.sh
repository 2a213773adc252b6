# score
patchbay score --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --sample 650 --stratify --template tak --shots tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --out runs/studies/score
# probe
patchbay probe --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --sample 1300 --stratify --sample-seed 1 --template tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --sites attn_out,mlp_out,resid_post --positions -1 --C auto --alpha auto --inner-folds 5 --out runs/studies/probe
# patch
patchbay patch --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --sample 650 --stratify --template tak --shots tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --random-pairs 100 --different-labels --only-correct --sites attn_out,mlp_out,resid_post --window 5 --positions -1 --out runs/studies/patch
# appraisal-dirs
patchbay directions --method probe --probe-weights runs/studies/probe/probes/blocks.15.hook_resid_post.safetensors --labels pleasantness,other_responsblt --out runs/studies/appraisal-dirs
# steer
patchbay steer --mode labels --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --sample 104 --stratify --sample-seed 2 --template tak --shots tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --vector runs/studies/appraisal-dirs/directions.safetensors:pleasantness,other_responsblt --site resid_post --layers 15 --positions all --betas=-64,-32,32,64 --normalise --out runs/studies/steer
# sev-dirs
patchbay directions --method context-averaged --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/sev/sev.jsonl --limit 1000000 --template tak --sites resid_post --out runs/studies/sev-dirs
# emotion-dirs
patchbay directions --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --sample 1300 --stratify --sample-seed 1 --template tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --sites resid_post --out runs/studies/emotion-dirs
# contrib
patchbay components contrib --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --sample 260 --stratify --sample-seed 3 --template tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --vector runs/studies/emotion-dirs/directions.safetensors:joy --site resid_post --layer 15 --positions last --out runs/studies/contrib
# topk
patchbay ablate --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --dataset ../shared/data/envent/envent_gen.csv --preset envent --filter emotion=joy --limit 52 --template tak --labels anger,boredom,disgust,fear,guilt,joy,neutral,pride,relief,sadness,shame,surprise,trust --ranking runs/studies/contrib/heads.csv --ranking runs/studies/contrib/neurons.csv --ranking-label joy --top-k 1,2,4,8,16,32,64 --random-draws 5 --op zero --positions all --projection runs/studies/emotion-dirs/directions.safetensors:joy --projection-layer 15 --out runs/studies/topk
# generate
patchbay steer --mode generate --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --sev ../shared/data/sev/sev.jsonl --limit 40 --template '{text} I feel' --vector runs/studies/emotion-dirs/directions.safetensors:joy,anger,sadness,fear --site resid_post --layers 15 --positions last:4+generated --betas=32,64 --normalise --max-new-tokens 24 --judge-probe runs/studies/probe/probes/blocks.27.hook_resid_post.safetensors --judge-template tak --out runs/studies/generate
