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
  --stquant                      # pack Adam's moments (without it: stock Megatron)
  --stquant-avg-bits 4.0         # scheduler budget, bits per element incl. scales; omit for fixed bits
  --stquant-bits 4               # width when --stquant-avg-bits is not given (N, or M,V per moment)
  --stquant-warmup-steps 100 --stquant-interval 100
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
