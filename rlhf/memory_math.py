"""Bytes of a transformer's training and inference state, from plain numbers (stdlib only).

`rlhf.memory_plan` applies these to a config's roles; `bench/gpu_check.py` (a bare GPU
box: torch and transformers, no pydantic/yaml/Ray) imports this module on its own.

Activations follow Korthikanti et al. 2022 ("Reducing activation recomputation"), who
count 34*s*b*h + 5*a*s^2*b bytes per layer at 16 bits with dropout. The count here is
theirs with the changes our models make, each checked on CPU against the tensors
autograd keeps for an HF GPT-2 block (tests/unit/test_memory_plan.py):
- attention runs in SDPA's fused kernels, which keep their output and a float32
  logsumexp instead of the a*s^2 score and softmax tensors;
- HF's "gelu_new" is Python arithmetic that keeps 5 tensors of the MLP's 4h width
  (a fused GeLU keeps 2, ReLU 1);
- HF causal LMs build a KV cache unless told `use_cache=False`; the PPO forwards
  (rlhf.forward) do not say it, so every layer's K and V stay alive with the graph;
- PPO learners run without dropout (no masks); SFT/RM with dropout keep a 1-byte mask
  and a dropout output per residual branch.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9  # decimal, as GPU memory is sold ("80 GB")
FP32 = 4
# The MLP's 4h-wide tensors autograd keeps per activation function (see the docstring).
MLP_KEPT = {"gelu_new": 5, "gelu": 2, "gelu_pytorch_tanh": 2, "relu": 1}
# A CUDA process's memory outside PyTorch's tensors: context, cuBLAS workspaces, NCCL buffers.
CUDA_RUNTIME_BYTES = 2.0 * GB
# rlhf.forward's causal-LM forwards leave HF's use_cache on, so every forward keeps every
# layer's K and V until it returns (2 * layers * tokens * hidden); a unit test checks the code.
CAUSAL_LM_FORWARD_KEEPS_KV = False


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


@dataclass(frozen=True)
class ModelShape:
    """The numbers that size a decoder LM. `positions` 0 = rotary (no position table)."""
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    ffn: int
    positions: int
    activation: str = "gelu_new"
    attn_bias_vectors: int = 4    # h-sized attention biases: GPT-2/OPT 4 (q,k,v,out), GPT-Neo 1, GPT-J 0
    norms_per_block: int = 2      # GPT-J's parallel block has one
    tied_lm_head: bool = True
    lm_head_bias: bool = False
    position_offset: int = 0      # OPT's learned positions start at 2

    def block_params(self) -> int:
        h, f = self.hidden, self.ffn
        return (4 * h * h + self.attn_bias_vectors * h + 2 * h * f + f + h
                + self.norms_per_block * 2 * h)

    def root_params(self, head: str = "lm") -> int:
        """Everything outside the blocks: embeddings, final norm and the head."""
        h = self.hidden
        n = self.vocab * h + (self.positions + self.position_offset) * h + 2 * h
        if head == "lm" and not self.tied_lm_head:
            n += self.vocab * h + (self.vocab if self.lm_head_bias else 0)
        if head == "scalar":
            n += h  # the 1-output score head, no bias (HF *ForSequenceClassification)
        return n

    def params(self, head: str = "lm") -> int:
        """`head`: "lm" (causal LM) or "scalar" (reward / value model: no LM head)."""
        return self.layers * self.block_params() + self.root_params(head)


# ---------------------------------------------------------------- training state

@dataclass(frozen=True)
class TrainState:
    """Per-rank bytes of a trained model's state (not activations)."""
    master: float           # float32 master weights
    compute_copy: float     # the copy forwards run on: 16-bit casts (ddp) or gathered blocks (fsdp)
    grads: float            # float32 gradient buffers alive at the end of backward
    grads_gathered: float   # fsdp: whole float32 gradients of the root and a block before reduce-scatter
    grads_resident: float   # the ones that stay between steps (flat all-reduce buckets)
    optimizer: float        # Adam's two float32 moments (+ the policy's float32 EMA)
    step_transient: float   # extra during optimizer.step (foreach temporaries)


def train_state(shape: ModelShape, head: str, compute_bytes: int, shards: int, sharded: bool,
                grad_copies: int, resident_grad_copies: int, ema: bool, cuda: bool) -> TrainState:
    """`shards`: ranks the state is split over (1 unless `sharded`, FSDP2).

    Float32 master weights, gradients and Adam moments are divided by `shards`. The
    copy that computes exists only while forwards and backwards run: under DDP a 16-bit
    cast of every weight (autocast keeps them for backward); under FSDP the gathered
    root (embeddings, kept through backward) plus two blocks (the one running and the
    prefetched next), in the compute dtype, and the gathered float32 gradients of the
    root and one block before their reduce-scatter. `grad_copies`: float32 gradient
    buffers per rank (.grad plus the learners' flat buckets). Adam's step on CUDA uses
    foreach kernels, whose temporaries are one moment's size; on CPU it goes tensor by
    tensor (two of the largest parameter).
    """
    p = shape.params(head)
    n = shards if sharded else 1
    if sharded:
        copy = compute_bytes * (shape.root_params(head) + 2 * shape.block_params())
        gathered = FP32 * (shape.root_params(head) + shape.block_params())
    else:
        copy = compute_bytes * p if compute_bytes != FP32 else 0
        gathered = 0
    largest = max(shape.vocab * shape.hidden, shape.hidden * shape.ffn)
    return TrainState(
        master=FP32 * p / n, compute_copy=copy,
        grads=grad_copies * FP32 * p / n, grads_gathered=gathered,
        grads_resident=resident_grad_copies * FP32 * p / n,
        optimizer=(2 + (1 if ema else 0)) * FP32 * p / n,
        step_transient=FP32 * p / n if cuda else 2 * FP32 * largest)


# ---------------------------------------------------------------- activations

def layer_activation_bytes(shape: ModelShape, rows: int, seq: int, compute_bytes: int,
                           kv_kept: bool, dropout: bool, padded: bool) -> float:
    """What autograd keeps for one block's backward, for rows x seq tokens.

    In units of tokens*h elements: the block input, LN1 output, q, k, v, attention
    output, LN2 input and output (8; GPT-J's single LN: 6), the MLP's kept 4h-wide
    tensors, 2 for the KV cache when kept, and with dropout 2 outputs plus 2 one-byte
    masks. In float32: the attention's logsumexp (tokens*heads) and LN statistics
    (2 per LN per token). A padding mask is expanded per layer (rows*seq^2).
    """
    t, h = rows * seq, shape.hidden
    units = 8 - 2 * (2 - shape.norms_per_block) + 4 * MLP_KEPT[shape.activation]
    units += 2 if kv_kept else 0
    out = compute_bytes * t * h * (units + (2 if dropout else 0)) + (2 * t * h if dropout else 0)
    out += FP32 * (t * shape.heads + 2 * shape.norms_per_block * t)
    if padded:
        out += compute_bytes * rows * seq * seq
    return out


# Float32 vocab-wide tensors of the LM losses (units of tokens*vocab*4 bytes), measured on CPU:
# the one autograd keeps (log_softmax's output, or logsumexp's input), and the most alive on
# top of it in forward (logits, the float copy or reshape) and in backward (the softmax
# rebuilt, its gradient, the gradient padded back to the logits' shape).
HEAD_KEPT = {"logprobs": 1, "lm": 1, "scalar": 0}
HEAD_TRANSIENT = {"logprobs": 3, "lm": 2, "scalar": 0}
# Activation gradients of one block while its backward runs (units of tokens*h), measured.
BACKWARD_UNITS = 8


def train_activation_bytes(shape: ModelShape, rows: int, seq: int, compute_bytes: int, loss: str,
                           checkpointing: bool, kv_kept: bool, dropout: bool = False,
                           padded: bool = True) -> float:
    """Peak of one forward+backward on rows x seq tokens beyond the model's state.

    `loss`: "logprobs" (PPO: token logprobs and entropy), "lm" (cross entropy: ptx, SFT,
    pretraining) or "scalar" (RM, value). Kept through backward: every layer's
    activations (with checkpointing only each layer's input, and one layer rebuilt at a
    time), the embedding sum and final norm, the loss's float32 vocab-wide tensor. On top
    of that at the worst moment: the loss's vocab-wide temporaries or one block's
    activation gradients (checkpointed: its rebuilt activations).
    """
    t, h = rows * seq, shape.hidden
    layer = layer_activation_bytes(shape, rows, seq, compute_bytes, kv_kept, dropout, padded)
    embed = 2 * compute_bytes * t * h
    head_kept = HEAD_KEPT[loss] * FP32 * t * shape.vocab + (FP32 * t if loss == "scalar" else 0)
    backward = BACKWARD_UNITS * compute_bytes * t * h
    head = HEAD_TRANSIENT[loss] * FP32 * t * shape.vocab  # 16-bit logits are smaller than their float copies
    if not checkpointing:
        return shape.layers * layer + embed + head_kept + max(head, backward)
    # Checkpointed, a kept KV cache outlives the blocks until the model returns its logits.
    inputs = shape.layers * compute_bytes * t * h
    logits = compute_bytes * t * shape.vocab if loss != "scalar" else 0
    end_of_forward = inputs * (3 if kv_kept else 1) + embed + logits
    # In a rebuilt block's backward its activation gradients take the place of the saved
    # tensors they free: about one layer's activations at once (measured).
    return max(end_of_forward, inputs + embed + head_kept + max(head, layer))


# Alive at once inside one block of a no-grad forward (units of tokens*h), measured on CPU: the
# residual, norm, q/k/v, attention output and projection (6) plus the MLP's 4h-wide tensors
# (gelu_new's Python arithmetic holds its input, 0.5*input and two temporaries: 16).
INFERENCE_MLP_UNITS = {"gelu_new": 16, "gelu": 8, "gelu_pytorch_tanh": 8, "relu": 8}


def inference_bytes(shape: ModelShape, rows: int, seq: int, compute_bytes: int, head: str,
                    kv_kept: bool) -> float:
    """Peak of a no-grad forward (scoring) beyond the weights, the largest of: one block's
    working tensors on top of the KV cache of every layer (when HF keeps it); the logits
    made while the cache is still alive; the losses' work on the logits once the model's
    output (and its cache) is dropped: a float32 logsumexp temporary, or for 16-bit logits
    an upcast row at a time."""
    t, h = rows * seq, shape.hidden
    block = compute_bytes * t * h * (6 + INFERENCE_MLP_UNITS[shape.activation]) + compute_bytes * rows * seq * seq
    cache = 2 * shape.layers * compute_bytes * t * h if kv_kept else 0
    if head == "scalar":
        return cache + block
    logits = compute_bytes * t * shape.vocab
    after = logits + (logits if compute_bytes == FP32 else seq * shape.vocab * 2 * FP32)
    return max(cache + block, cache + compute_bytes * t * h + logits, after)


def kv_bytes_per_token(shape: ModelShape, compute_bytes: int) -> float:
    """K and V of every layer for one token (what a generator caches)."""
    return 2 * shape.layers * shape.hidden * compute_bytes


# ---------------------------------------------------------------- known shapes

# Presets name open models of GPT-3's sizes by hub name; their shapes from the models' configs,
# so a plan needs no download. Anything else is read from a local config.json.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "EleutherAI/gpt-neo-1.3B": ModelShape("EleutherAI/gpt-neo-1.3B", layers=24, hidden=2048, heads=16,
                                          vocab=50257, ffn=8192, positions=2048, attn_bias_vectors=1),
    "EleutherAI/gpt-j-6b": ModelShape("EleutherAI/gpt-j-6b", layers=28, hidden=4096, heads=16, vocab=50400,
                                      ffn=16384, positions=0, attn_bias_vectors=0, norms_per_block=1,
                                      tied_lm_head=False, lm_head_bias=True),
    "facebook/opt-175b": ModelShape("facebook/opt-175b", layers=96, hidden=12288, heads=96, vocab=50272,
                                    ffn=49152, positions=2048, activation="relu", position_offset=2),
}


def shape_from_hf_config(name: str, c: dict) -> ModelShape | None:
    """A ModelShape from an HF config.json's fields (GPT-2, GPT-Neo, GPT-J, OPT); None if unknown."""
    kind = c.get("model_type")
    if kind == "gpt2":
        h = c["n_embd"]
        return ModelShape(name, c["n_layer"], h, c["n_head"], c["vocab_size"], c.get("n_inner") or 4 * h,
                          c["n_positions"], c.get("activation_function", "gelu_new"))
    if kind == "gpt_neo":
        h = c["hidden_size"]
        return ModelShape(name, c["num_layers"], h, c["num_heads"], c["vocab_size"],
                          c.get("intermediate_size") or 4 * h, c["max_position_embeddings"],
                          c.get("activation_function", "gelu_new"), attn_bias_vectors=1)
    if kind == "gptj":
        h = c["n_embd"]
        return ModelShape(name, c["n_layer"], h, c["n_head"], c["vocab_size"], c.get("n_inner") or 4 * h, 0,
                          c.get("activation_function", "gelu_new"), attn_bias_vectors=0, norms_per_block=1,
                          tied_lm_head=False, lm_head_bias=True)
    if kind == "opt" and c.get("word_embed_proj_dim", c["hidden_size"]) == c["hidden_size"]:
        return ModelShape(name, c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                          c["vocab_size"], c["ffn_dim"], c["max_position_embeddings"],
                          c.get("activation_function", "relu"), position_offset=2)
    return None
