#!/usr/bin/env bash
# Megatron-LM GPT pre-training with STQuant packed Adam moments, fork-free.
# Run from a Megatron-LM checkout (it provides pretrain_gpt.py), on GPU nodes, with
# stquant-megatron installed (pip install stquant-megatron, or pip install -e /path/to/it).
#
#   bash examples/pretrain_gpt_stquant.sh /path/to/Megatron-LM /path/to/data_prefix /path/to/tokenizer
#
# Two equivalent ways in:
#   python -m stquant_megatron.launch pretrain_gpt.py ...        (below)
#   PYTHONPATH=/path/to/stquant-megatron/patches:$PYTHONPATH torchrun ... pretrain_gpt.py ...
set -euo pipefail
MEGATRON_LM=${1:?Megatron-LM checkout}; DATA=${2:?data prefix}; TOKENIZER=${3:?tokenizer model}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

STQUANT_ARGS=(
  --stquant                      # pack Adam's moments (without it: stock Megatron); alone, it gives the default:
                                 # STQuantConfig(), scheduled at DEFAULT_AVG_BITS (stquant_megatron/config.py: 3.5
                                 # bits per element, scales included), first decision after 100 steps, then every 100
  # Alternatives (at most one of the two; together they are refused):
  # --stquant-avg-bits 4.0       # another scheduler budget, bits per element incl. scales
  # --stquant-bits 4             # fixed widths, no scheduler (N, or M,V per moment)
  # --stquant-warmup-steps 200 --stquant-interval 50   # scheduler timing (defaults 100 and 100)
)

cd "$MEGATRON_LM"
torchrun --nproc_per_node "$GPUS_PER_NODE" -m stquant_megatron.launch pretrain_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \
  --max-position-embeddings 2048 --micro-batch-size 2 --global-batch-size 256 \
  --train-iters 10000 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 500 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
  --optimizer adam --use-distributed-optimizer \
  --data-path "$DATA" --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER" \
  --split 98,2,0 --log-interval 10 --eval-interval 1000 --eval-iters 10 \
  --ckpt-format torch_dist --save checkpoints/gpt_stquant --load checkpoints/gpt_stquant \
  --tensorboard-dir tensorboard/gpt_stquant \
  "${STQUANT_ARGS[@]}"
