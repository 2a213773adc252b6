#!/usr/bin/env python3
"""Build tiny random Hugging Face checkpoints and record golden tensors from transformers.

For each of six families (llama, mistral, qwen2, gemma2, phi3, olmo2) this writes, under
<out>/<family>/:

  config.json, model.safetensors (bf16)   -- laid out exactly like a Hub checkpoint
  tokenizer.json, tokenizer_config.json   -- shared tiny byte-level BPE, family specials + chat template
  generation_config.json                  -- llama only
  prompts.json                            -- texts, HF token ids, chat messages / ids / text
  golden.safetensors                      -- per-layer activations recorded with hooks on the HF modules
  interventions.json / .safetensors       -- logits under a few hook-based interventions

Everything is deterministic (fixed seeds, single thread); rerunning gives identical files.
The oracle is transformers itself: every tensor comes from HF's own forward pass (eager attention,
float32), captured with forward (pre-)hooks at module boundaries.

Usage:  python scripts/golden/make_goldens.py [--out DIR] [--families llama ...]
        (DIR defaults to <repo root>/tests/fixtures; only the six family subdirectories are replaced)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

GENERATOR = "scripts/golden/make_goldens.py"
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "phi3", "olmo2"]

# ----------------------------------------------------------------------------------------------
# Shared sizes
# ----------------------------------------------------------------------------------------------
VOCAB = 384  # total, including special tokens
N_SPECIAL = 8  # special-token slots per family (unused ones get reserved names)
BPE_VOCAB = VOCAB - N_SPECIAL
D_MODEL = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
D_MLP = 96

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=N_HEADS,
    num_key_value_heads=N_KV_HEADS,
    intermediate_size=D_MLP,
    max_position_embeddings=256,
)

# ----------------------------------------------------------------------------------------------
# Tokenizer corpus and prompts
# ----------------------------------------------------------------------------------------------
CORPUS = [
    "I got the job I wanted.",
    "My dog died last week.",
    "We got married in the spring and everyone cried.",
    "She passed the exam and felt so proud.",
    "He lost his wallet on the train and felt angry.",
    "The baby was born early this morning.",
    "I was nervous before the interview.",
    "They moved to a new city and felt lonely at first.",
    "My best friend forgot my birthday.",
    "We won the game in the last minute!",
    "I failed the driving test again.",
    "Her grandmother is very sick.",
    "I am so happy for you.",
    "He felt ashamed after the argument.",
    "The house burned down and we lost everything.",
    "I finally finished my thesis.",
    "We had coffee at the little cafe after work.",
    "She was surprised by the party.",
    "My brother got sick and I was worried.",
    "I feel calm when I walk by the sea.",
    "They laughed at my joke and I felt proud.",
    "The flight was cancelled and we were stuck.",
    "I miss my old friends from school.",
    "He was scared of the dark when he was a child.",
    "We adopted a cat last month.",
    "I lost my job and I feel afraid.",
    "She got a letter from her father after ten years.",
    "The concert was wonderful and we danced all night.",
    "I broke my leg while skiing.",
    "He was jealous when his friend won the prize.",
    "Our team lost the final and everyone was sad.",
    "I feel grateful for my family.",
    "My sister had a baby girl.",
    "The storm destroyed our garden.",
    "We found a lost dog and took it home.",
    "I was angry when they lied to me.",
    "She felt relieved when the test came back clean.",
    "I am excited about the trip next week.",
    "He cried at the wedding.",
    "The news made me feel hopeful.",
]

# Token lengths (without / with BOS): 5/6, 13/14, 21/22 -- shorter than the sliding window 8, between
# 8 and 16, longer than 16 (Phi-3 longrope switches to long factors for sequences longer than 16).
TEXTS = [
    "I got the job",
    "My dog died last week and I cried.",
    "We had coffee at the café after the wedding.",
]

CHAT_MESSAGES = [{"role": "user", "content": "My dog died last week. What should I do?"}]


# ----------------------------------------------------------------------------------------------
# Chat templates (our own text, in the style of each family; HF renders with
# trim_blocks=True, lstrip_blocks=True, which the gemma2 template relies on)
# ----------------------------------------------------------------------------------------------
LLAMA_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Multi-line without '-' markers: the output is only right with trim_blocks + lstrip_blocks.
GEMMA2_TEMPLATE = r"""{{ bos_token }}{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Turns must alternate user/assistant, starting with user.') }}
    {% endif %}
    {% if message['role'] == 'assistant' %}
        {% set role = 'model' %}
    {% elif message['role'] == 'user' %}
        {% set role = 'user' %}
    {% else %}
        {{ raise_exception('Unsupported role for this template: ' + message['role']) }}
    {% endif %}
<start_of_turn>{{ role }}
{{ message['content'] | trim }}<end_of_turn>
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
{% endif %}
"""

QWEN2_TEMPLATE = r"""{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Like the real Mistral templates, this one ignores add_generation_prompt ([/INST] is the prompt).
MISTRAL_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

# The tokenizer adds no BOS, but the template starts with one (as OLMo 2 Instruct does).
OLMO2_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] in ['system', 'user', 'assistant'] -%}
        {{- '<|' ~ message['role'] ~ '|>\n' ~ message['content'] -}}
        {%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}
        {{- '\n' -}}
    {%- else -%}
        {{- raise_exception('Unknown role: ' ~ message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}
"""


# ----------------------------------------------------------------------------------------------
# Family descriptions
# ----------------------------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    seed: int
    specials: list[str]  # family special tokens, padded with reserved names to N_SPECIAL
    special_position: str  # "start": ids 0..7 (BPE shifted up) / "end": ids 376..383
    bos: str
    eos: str
    pad: str | None
    post_processor: str  # "bos" | "bytelevel+bos" | "bytelevel" | "template_nobos" | "none"
    normalizer: str | None  # None | "nfc"
    chat_template: str
    make_config: Callable[[dict], transformers.PreTrainedConfig]
    layout: str  # "classic" (rewrite config.json like pre-v5 Hub files) | "new" (as transformers 5 writes)
    classic_rope_scaling: str = "key"  # classic layout: "key" (rope_scaling present, maybe null) | "absent"
    classic_extra: dict = field(default_factory=dict)
    # Where the TransformerLens-style sites live inside a decoder layer (attribute names).
    attn_out_module: str = "self_attn"  # output = what attention adds to the residual
    resid_mid_module: str = "post_attention_layernorm"  # its input = residual after the attention add
    mlp_out_module: str = "mlp"  # output = what the MLP adds to the residual
    has_input_layernorm: bool = True
    qkv: str = "separate"  # "separate" | "fused" (phi3 qkv_proj) | "normed" (olmo2 q_norm/k_norm)
    gemma_norms: bool = False  # RMSNorm computes x * (1 + w)
    qk_gain: float = 1.5
    qk_norm_range: tuple[float, float] = (1.2, 1.8)


def special_list(names: list[str]) -> list[str]:
    assert len(names) <= N_SPECIAL
    return names + [f"<|reserved_{i}|>" for i in range(N_SPECIAL - len(names))]


def llama_config(ids: dict) -> LlamaConfig:
    return LlamaConfig(
        **COMMON,
        head_dim=16,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # 64 (not 16) so that the 8 frequencies of head_dim 16 hit all three llama3 branches:
            # wavelengths 2*pi*500000^(i/8) = 6.3 (< 64/4: kept), 32.6 (smoothed), 169+ (> 64: divided).
            "original_max_position_embeddings": 64,
        },
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
    )


def mistral_config(ids: dict) -> MistralConfig:
    return MistralConfig(
        **COMMON,
        head_dim=24,  # != 64 / 4
        sliding_window=8,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )


def qwen2_config(ids: dict) -> Qwen2Config:
    return Qwen2Config(
        **COMMON,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )


def gemma2_config(ids: dict) -> Gemma2Config:
    return Gemma2Config(
        **COMMON,
        head_dim=32,
        query_pre_attn_scalar=24,  # != head_dim on purpose
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        sliding_window=8,  # layer_types default: layer 0 sliding, layer 1 full
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        pad_token_id=ids["<pad>"],
    )


PHI3_ROTARY_DIM = 12  # int(16 * 0.75)
PHI3_SHORT_FACTOR = [1.0, 1.15, 1.35, 1.7, 2.25, 3.1]
PHI3_LONG_FACTOR = [1.3, 2.05, 3.4, 5.25, 7.9, 11.6]


def phi3_config(ids: dict) -> Phi3Config:
    return Phi3Config(
        **{**COMMON, "max_position_embeddings": 64},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        # Phi3Config has its own top-level original_max_position_embeddings (default 4096!) that
        # overrides the one inside rope_parameters, so it must be set here.
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": PHI3_SHORT_FACTOR,
            "long_factor": PHI3_LONG_FACTOR,
            "original_max_position_embeddings": 16,
        },
        sliding_window=12,  # Phi3Model uses create_sliding_window_causal_mask when this is set
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def olmo2_config(ids: dict) -> Olmo2Config:
    return Olmo2Config(
        **COMMON,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|pad|>"],
    )


# One declarative entry per family (field values, no logic): the entries look alike to a
# duplicate scan by shape only, which is intended; what differs between families is the data.
FAMILY_SPECS = {
    "llama": Family(
        name="llama",
        seed=1001,
        specials=special_list(
            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        ),
        special_position="end",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        post_processor="bytelevel+bos",
        normalizer=None,
        chat_template=LLAMA_TEMPLATE,
        make_config=llama_config,
        layout="classic",
    ),
    "mistral": Family(
        name="mistral",
        seed=1002,
        specials=special_list(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]),
        special_position="start",
        bos="<s>",
        eos="</s>",
        pad=None,
        post_processor="bos",
        normalizer=None,
        chat_template=MISTRAL_TEMPLATE,
        make_config=mistral_config,
        layout="classic",
        classic_rope_scaling="absent",
    ),
    "qwen2": Family(
        name="qwen2",
        seed=1003,
        specials=special_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        special_position="end",
        bos="<|endoftext|>",
        eos="<|im_end|>",
        pad="<|endoftext|>",
        post_processor="bytelevel",
        normalizer="nfc",
        chat_template=QWEN2_TEMPLATE,
        make_config=qwen2_config,
        layout="classic",
        # As on the Hub: a sliding_window value is present but disabled by use_sliding_window=false.
        classic_extra={"sliding_window": 4, "max_window_layers": 2, "use_sliding_window": False},
    ),
    "gemma2": Family(
        name="gemma2",
        seed=1004,
        specials=special_list(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]),
        special_position="start",
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        post_processor="bos",
        normalizer=None,
        chat_template=GEMMA2_TEMPLATE,
        make_config=gemma2_config,
        layout="classic",
        classic_rope_scaling="absent",
        classic_extra={"hidden_act": "gelu_pytorch_tanh", "cache_implementation": "hybrid"},
        attn_out_module="post_attention_layernorm",
        resid_mid_module="pre_feedforward_layernorm",
        mlp_out_module="post_feedforward_layernorm",
        gemma_norms=True,
        qk_gain=1.6,
    ),
    "phi3": Family(
        name="phi3",
        seed=1005,
        specials=special_list(["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
        special_position="end",
        bos="<|endoftext|>",
        eos="<|end|>",
        pad="<|endoftext|>",
        post_processor="template_nobos",
        normalizer=None,
        chat_template=PHI3_TEMPLATE,
        make_config=phi3_config,
        layout="new",
        qkv="fused",
    ),
    "olmo2": Family(
        name="olmo2",
        seed=1006,
        specials=special_list(["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]),
        special_position="end",
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|pad|>",
        post_processor="none",
        normalizer=None,
        chat_template=OLMO2_TEMPLATE,
        make_config=olmo2_config,
        layout="new",
        attn_out_module="post_attention_layernorm",
        resid_mid_module="mlp",  # no pre-norms: the MLP input is the residual itself
        mlp_out_module="post_feedforward_layernorm",
        has_input_layernorm=False,
        qkv="normed",
    ),
}


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def train_base_tokenizer() -> dict:
    """Byte-level BPE with BPE_VOCAB entries (256 bytes + merges), no special tokens. Returns its JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == BPE_VOCAB, tok.get_vocab_size()
    return json.loads(tok.to_str())


def family_tokenizer(base: dict, fam: Family) -> Tokenizer:
    tj = copy.deepcopy(base)
    vocab = tj["model"]["vocab"]
    if fam.special_position == "start":
        # Specials take ids 0..7 and also live in the model vocab (like Gemma / Mistral files).
        new_vocab = {s: i for i, s in enumerate(fam.specials)}
        new_vocab.update({t: i + N_SPECIAL for t, i in vocab.items()})
        special_ids = list(range(N_SPECIAL))
    else:
        # Specials appended after the BPE vocab, only as added tokens (like Llama 3 / Qwen files).
        new_vocab = dict(vocab)
        special_ids = [BPE_VOCAB + i for i in range(N_SPECIAL)]
    tj["model"]["vocab"] = new_vocab
    tj["added_tokens"] = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, s in zip(special_ids, fam.specials)
    ]
    tok = Tokenizer.from_str(json.dumps(tj))
    if fam.normalizer == "nfc":
        tok.normalizer = normalizers.NFC()
    bos_id = tok.token_to_id(fam.bos)
    bos_template = processors.TemplateProcessing(
        single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B:1", special_tokens=[(fam.bos, bos_id)]
    )
    if fam.post_processor == "bos":
        tok.post_processor = bos_template
    elif fam.post_processor == "bytelevel+bos":
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos_template])
    elif fam.post_processor == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif fam.post_processor == "template_nobos":
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    else:
        assert fam.post_processor == "none"
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    return tok


def tokenizer_config(fam: Family, tok: Tokenizer) -> dict:
    cfg = {
        "add_bos_token": fam.post_processor in ("bos", "bytelevel+bos"),
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for s in fam.specials
        },
        "bos_token": fam.bos,
        "chat_template": fam.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": fam.eos,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if fam.pad is not None:
        cfg["pad_token"] = fam.pad
    return cfg


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def randomise_(model, fam: Family, gen: torch.Generator) -> None:
    """Re-draw every parameter (HF init leaves norms at 1/0 and biases at 0, which hides bugs),
    then round everything to bf16 so the checkpoint stores the exact values used here."""

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = p.shape
        if name.endswith("embed_tokens.weight"):
            new = normal(shape, 0.3)
        elif name == "lm_head.weight":
            new = normal(shape, 0.3)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            new = uniform(shape, *fam.qk_norm_range)  # sharpen attention (q/k are unit-RMS after the norm)
        elif "norm" in name:
            new = uniform(shape, -0.3, 0.3) if fam.gemma_norms else uniform(shape, 0.7, 1.3)
        elif name.endswith(".bias"):
            new = normal(shape, 0.1)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            new = normal(shape, fam.qk_gain / math.sqrt(shape[1]))
        elif name.endswith("qkv_proj.weight"):
            new = normal(shape, 1.0 / math.sqrt(shape[1]))
            n_qk = (N_HEADS + N_KV_HEADS) * (shape[0] // (N_HEADS + 2 * N_KV_HEADS))
            new[:n_qk] *= fam.qk_gain
        else:
            assert name.endswith(".weight") and p.dim() == 2, name
            new = normal(shape, 1.0 / math.sqrt(shape[1]))
        p.copy_(new.to(torch.bfloat16).to(torch.float32))


# ----------------------------------------------------------------------------------------------
# Checkpoint writing
# ----------------------------------------------------------------------------------------------
def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file, but with the header's metadata keys in a fixed order
    (safetensors serialises the metadata map in hash order, which changes from run to run)."""
    raw = safetensors_bytes(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def classic_config(saved: dict, fam: Family) -> dict:
    """Rewrite a transformers-5 config.json into the pre-v5 Hub layout
    (top-level rope_theta / rope_scaling, torch_dtype, no layer_types / rope_parameters / dtype)."""
    cfg = dict(saved)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] == "default":
        if fam.classic_rope_scaling == "key":
            cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg.pop("use_bidirectional_attention", None)
    if cfg.get("pad_token_id", 0) is None:
        cfg.pop("pad_token_id")
    cfg.update(fam.classic_extra)
    return dict(sorted(cfg.items()))


def save_checkpoint(model, fam: Family, out_dir: str) -> None:
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(out_dir)
    gen_cfg = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        saved = json.load(f)
    if fam.layout == "classic":
        write_json(cfg_path, classic_config(saved, fam))
    if fam.name == "llama":
        cfg = model.config
        GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, do_sample=False).save_pretrained(
            out_dir
        )


# ----------------------------------------------------------------------------------------------
# Hook sites (shared by recording and interventions)
# ----------------------------------------------------------------------------------------------
LAYER_SITES = [
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]


def site_module(model, fam: Family, layer: int, site: str):
    """(module, "in"|"out"): the TL site is the module's first input / (first) output."""
    L = model.model.layers[layer]
    return {
        "hook_resid_pre": (L, "in"),
        "ln1.hook_normalized": (L.self_attn, "in"),
        "attn.hook_z": (L.self_attn.o_proj, "in"),
        "hook_attn_out": (getattr(L, fam.attn_out_module), "out"),
        "hook_resid_mid": (getattr(L, fam.resid_mid_module), "in"),
        "ln2.hook_normalized": (L.mlp, "in"),
        "mlp.hook_post": (L.mlp.down_proj, "in"),
        "hook_mlp_out": (getattr(L, fam.mlp_out_module), "out"),
        "hook_resid_post": (L, "out"),
    }[site]


def parse_site(name: str) -> tuple[int, str]:
    assert name.startswith("blocks."), name
    _, layer, rest = name.split(".", 2)
    return int(layer), rest


def hook_tensor(module, kind: str, fn) -> torch.utils.hooks.RemovableHandle:
    """Register fn(tensor) -> tensor | None on a module's first input ("in") or first output ("out").
    Returning a tensor replaces the value inside HF's forward."""
    if kind == "in":

        def pre(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        new = fn(x)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(post)


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------
def forward_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0]


def record_activations(model, fam: Family, ids_list: list[list[int]]) -> dict[str, torch.Tensor]:
    """Run each prompt alone through HF's forward with hooks; return TL-named tensors concatenated
    over prompts along the token axis."""
    cfg = model.config
    n_heads, n_kv, d_head = cfg.num_attention_heads, cfg.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    store: dict[str, torch.Tensor] = {}
    handles = []

    def saver(key, transform=lambda x: x):
        def fn(x):
            assert key not in store, key
            store[key] = transform(x.detach()[0].clone())

        return fn

    heads = lambda n: (lambda x: x.reshape(x.shape[0], n, d_head))  # noqa: E731  [T, n*d] -> [T, n, d]

    for l, layer in enumerate(model.model.layers):
        for site in LAYER_SITES:
            mod, kind = site_module(model, fam, l, site)
            handles.append(hook_tensor(mod, kind, saver(f"blocks.{l}.{site}")))
        attn = layer.self_attn
        # Projections before RoPE.
        if fam.qkv == "fused":
            nq, nk = n_heads * d_head, n_kv * d_head

            def split_qkv(x, l=l, nq=nq, nk=nk):
                x = x.detach()[0]
                store[f"blocks.{l}.attn.hook_q"] = x[:, :nq].reshape(-1, n_heads, d_head).clone()
                store[f"blocks.{l}.attn.hook_k"] = x[:, nq : nq + nk].reshape(-1, n_kv, d_head).clone()
                store[f"blocks.{l}.attn.hook_v"] = x[:, nq + nk :].reshape(-1, n_kv, d_head).clone()

            handles.append(hook_tensor(attn.qkv_proj, "out", split_qkv))
        else:
            q_mod, k_mod = (attn.q_norm, attn.k_norm) if fam.qkv == "normed" else (attn.q_proj, attn.k_proj)
            handles.append(hook_tensor(q_mod, "out", saver(f"blocks.{l}.attn.hook_q", heads(n_heads))))
            handles.append(hook_tensor(k_mod, "out", saver(f"blocks.{l}.attn.hook_k", heads(n_kv))))
            handles.append(hook_tensor(attn.v_proj, "out", saver(f"blocks.{l}.attn.hook_v", heads(n_kv))))
        # Attention probabilities: eager attention returns them as the 2nd output of self_attn.
        handles.append(
            attn.register_forward_hook(
                lambda m, a, out, l=l: store.__setitem__(f"blocks.{l}.attn.pattern_raw", out[1].detach()[0].clone())
            )
        )
        # Auxiliary (not saved): o_proj output, and input_layernorm output for cross-checks.
        handles.append(hook_tensor(attn.o_proj, "out", saver(f"aux.{l}.o_proj_out")))
        if fam.has_input_layernorm:
            handles.append(hook_tensor(layer.input_layernorm, "out", saver(f"aux.{l}.input_layernorm_out")))
        handles.append(
            attn.register_forward_pre_hook(lambda m, a, l=l: store.__setitem__("aux.current_layer", l))
        )
    handles.append(hook_tensor(model.model.norm, "out", saver("ln_final.hook_normalized")))

    # RoPE: wrap the modeling module's own apply_rotary_pos_emb (called by HF's attention forward with
    # HF's own cos/sin) and record what it returns.
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original_rope = modeling.apply_rotary_pos_emb

    def recording_rope(q, k, cos, sin, *args, **kwargs):
        q_embed, k_embed = original_rope(q, k, cos, sin, *args, **kwargs)
        l = store["aux.current_layer"]
        store[f"blocks.{l}.attn.hook_rot_q"] = q_embed.detach()[0].transpose(0, 1).clone()
        store[f"blocks.{l}.attn.hook_rot_k"] = k_embed.detach()[0].transpose(0, 1).clone()
        return q_embed, k_embed

    per_prompt = []
    modeling.apply_rotary_pos_emb = recording_rope
    try:
        for ids in ids_list:
            store.clear()
            store["logits"] = forward_logits(model, ids)
            per_prompt.append(dict(store))
    finally:
        modeling.apply_rotary_pos_emb = original_rope
        for h in handles:
            h.remove()

    max_len = max(len(ids) for ids in ids_list)
    out: dict[str, torch.Tensor] = {}
    for l, layer in enumerate(model.model.layers):
        w_o = layer.self_attn.o_proj.weight.detach()  # [d_model, n_heads * d_head]
        assert layer.self_attn.o_proj.bias is None
        for rec in per_prompt:
            z = rec[f"blocks.{l}.attn.hook_z"].reshape(-1, n_heads, d_head)
            rec[f"blocks.{l}.attn.hook_z"] = z
            rec[f"blocks.{l}.attn.hook_result"] = torch.einsum("thd,mhd->thm", z, w_o.reshape(-1, n_heads, d_head))
            pat = rec.pop(f"blocks.{l}.attn.pattern_raw").transpose(0, 1)  # [T, H, T]
            rec[f"blocks.{l}.attn.hook_pattern"] = torch.nn.functional.pad(pat, (0, max_len - pat.shape[-1]))
    keys = [k for k in per_prompt[0] if not k.startswith("aux.")]
    for k in keys:
        out[k] = torch.cat([rec[k] for rec in per_prompt], dim=0).contiguous()
    offsets = [0]
    for ids in ids_list:
        offsets.append(offsets[-1] + len(ids))
    out["prompt_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    check_activations(model, fam, ids_list, per_prompt, out)
    return out


def check_activations(model, fam: Family, ids_list, per_prompt, out) -> None:
    cfg = model.config
    for p, (ids, rec) in enumerate(zip(ids_list, per_prompt)):
        T = len(ids)
        for l in range(cfg.num_hidden_layers):
            b = f"blocks.{l}."
            # HF adds the residual exactly like this, so these are bitwise identities.
            assert torch.equal(rec[b + "hook_resid_mid"], rec[b + "hook_resid_pre"] + rec[b + "hook_attn_out"])
            assert torch.equal(rec[b + "hook_resid_post"], rec[b + "hook_resid_mid"] + rec[b + "hook_mlp_out"])
            if l + 1 < cfg.num_hidden_layers:
                assert torch.equal(rec[b + "hook_resid_post"], rec[f"blocks.{l + 1}.hook_resid_pre"])
            if fam.has_input_layernorm:
                assert torch.equal(rec[b + "ln1.hook_normalized"], rec[f"aux.{l}.input_layernorm_out"])
            else:
                assert torch.equal(rec[b + "ln1.hook_normalized"], rec[b + "hook_resid_pre"])
            if fam.resid_mid_module == "mlp":
                assert torch.equal(rec[b + "ln2.hook_normalized"], rec[b + "hook_resid_mid"])
            # Per-head results sum to the o_proj output.
            summed = rec[b + "attn.hook_result"].sum(1)
            torch.testing.assert_close(summed, rec[f"aux.{l}.o_proj_out"], rtol=1e-5, atol=1e-5)
            if fam.attn_out_module == "self_attn":
                assert torch.equal(rec[b + "hook_attn_out"], rec[f"aux.{l}.o_proj_out"])
            # Pattern: rows sum to 1, causal, sliding window where configured.
            pat = rec[b + "attn.hook_pattern"][:, :, :T]
            assert (pat.sum(-1) - 1).abs().max().item() < 1e-6
            assert (rec[b + "attn.hook_pattern"][:, :, T:] == 0).all()
            window = sliding_window_of(model, l)
            i = torch.arange(T)[:, None]
            j = torch.arange(T)[None, :]
            visible = j <= i
            if window is not None:
                visible = visible & (i - j < window)  # query i sees key j iff 0 <= i - j < window
            assert (pat.permute(1, 0, 2)[:, ~visible] == 0).all(), (fam.name, l, p)
            assert (pat.permute(1, 0, 2)[:, visible] > 0).all(), (fam.name, l, p)
        # Final norm and logits (Gemma 2: soft-capped).
        logits = rec["ln_final.hook_normalized"] @ model.lm_head.weight.detach().T
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        torch.testing.assert_close(logits, rec["logits"], rtol=1e-5, atol=1e-5)
    for k, v in out.items():
        if v.dtype.is_floating_point:
            assert torch.isfinite(v).all(), k


def sliding_window_of(model, layer: int) -> int | None:
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return window


# ----------------------------------------------------------------------------------------------
# Interventions
# ----------------------------------------------------------------------------------------------
def intervention_cases(golden: dict, gen: torch.Generator) -> tuple[list[dict], dict[str, torch.Tensor]]:
    d = D_MODEL
    offsets = golden["prompt_offsets"].tolist()
    tensors: dict[str, torch.Tensor] = {}
    cases = []

    tensors["case0.v"] = torch.randn(d, generator=gen)
    cases.append(
        {"name": "add_vector", "site": "blocks.1.hook_resid_pre", "op": "add", "positions": [-1], "beta": 3.0,
         "tensors": {"v": "case0.v"}}
    )
    cases.append(
        {"name": "zero_ablate_heads", "site": "blocks.0.attn.hook_z", "op": "zero_heads", "positions": "all",
         "heads": [1, 3], "tensors": {}}
    )
    cases.append(
        {"name": "scale_neurons", "site": "blocks.1.mlp.hook_post", "op": "scale_neurons", "positions": "all",
         "neurons": [0, 5, 7, 50], "alpha": 2.5, "tensors": {}}
    )
    clean = golden["blocks.0.hook_resid_post"]
    tensors["case3.v"] = clean[offsets[3] - 1].clone()  # prompt 2, last position
    cases.append(
        {"name": "patch_last_position", "site": "blocks.0.hook_resid_post", "op": "patch", "positions": [-1],
         "target_prompt": 0, "source_prompt": 2, "source_position": -1, "tensors": {"v": "case3.v"},
         "note": "only prompt 0 is changed; v is the clean value of this site at the last position of prompt 2"}
    )
    u, _ = torch.linalg.qr(torch.randn(d, 3, generator=gen))
    tensors["case4.P"] = (u @ u.T).contiguous()
    tensors["case4.v"] = torch.randn(d, generator=gen) * 0.5
    cases.append(
        {"name": "project_out_and_add", "site": "blocks.0.hook_attn_out", "op": "project_out_add",
         "positions": [-1, -2], "beta": 1.0, "tensors": {"P": "case4.P", "v": "case4.v"},
         "note": "x <- x - beta * P x + v, P = U U^T for a random orthonormal U of rank 3"}
    )
    tensors["case5.mean"] = golden["blocks.1.hook_mlp_out"].mean(0).clone()
    cases.append(
        {"name": "mean_ablate", "site": "blocks.1.hook_mlp_out", "op": "set", "positions": "all",
         "tensors": {"mean": "case5.mean"},
         "note": "x <- mean at every position; mean = average of the clean site over all tokens of all prompts"}
    )
    for i, c in enumerate(cases):
        c["logits"] = f"case{i}.logits"
    return cases, tensors


def apply_op(x: torch.Tensor, case: dict, tensors: dict, prompt: int, n_heads: int) -> torch.Tensor | None:
    """x: [1, T, ...] value at the site for one prompt; returns the replacement (or None = untouched)."""
    if case["op"] == "patch" and prompt != case["target_prompt"]:
        return None
    T = x.shape[1]
    pos = list(range(T)) if case["positions"] == "all" else [p % T for p in case["positions"]]
    x = x.clone()
    op = case["op"]
    t = {k: tensors[v] for k, v in case["tensors"].items()}
    for p in pos:
        if op == "add":
            x[0, p] = x[0, p] + case["beta"] * t["v"]
        elif op == "zero_heads":
            z = x[0, p].view(n_heads, -1)
            z[case["heads"]] = 0.0
        elif op == "scale_neurons":
            x[0, p, case["neurons"]] = x[0, p, case["neurons"]] * case["alpha"]
        elif op == "patch":
            x[0, p] = t["v"]
        elif op == "project_out_add":
            x[0, p] = x[0, p] - case["beta"] * (t["P"] @ x[0, p]) + t["v"]
        elif op == "set":
            x[0, p] = t["mean"]
        else:
            raise ValueError(op)
    return x


def run_interventions(model, fam: Family, ids_list, cases, tensors) -> dict[str, torch.Tensor]:
    out = {}
    n_heads = model.config.num_attention_heads
    for i, case in enumerate(cases):
        layer, site = parse_site(case["site"])
        mod, kind = site_module(model, fam, layer, site)
        logits = []
        for p, ids in enumerate(ids_list):
            h = hook_tensor(mod, kind, lambda x, p=p: apply_op(x, case, tensors, p, n_heads))
            try:
                logits.append(forward_logits(model, ids))
            finally:
                h.remove()
        out[f"case{i}.logits"] = torch.cat(logits).contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# Per-family driver
# ----------------------------------------------------------------------------------------------
def check_rope(model, fam: Family, ids_list) -> dict:
    """Checks on HF's RoPE setup that the fixtures are meant to exercise; returns facts for the log."""
    rot = model.model.rotary_emb
    facts = {"attention_scaling": float(rot.attention_scaling)}
    if fam.name == "llama":
        rp = model.config.rope_parameters
        dim = model.config.head_dim
        base = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        inv = rot.original_inv_freq
        kept = torch.isclose(inv, base, rtol=0, atol=0)
        divided = torch.isclose(inv, base / rp["factor"], rtol=1e-6, atol=0)
        smoothed = ~kept & ~divided
        assert kept.any() and divided.any() and smoothed.any(), (kept, divided)
        facts["llama3_branches"] = {"kept": int(kept.sum()), "smoothed": int(smoothed.sum()), "divided": int(divided.sum())}
    if fam.name == "phi3":
        assert abs(rot.attention_scaling - math.sqrt(1 + math.log(64 / 16) / math.log(16))) < 1e-12
        assert rot.original_inv_freq.numel() == PHI3_ROTARY_DIM // 2
        lengths = [len(ids) for ids in ids_list]
        assert min(lengths) <= 16 < max(lengths), lengths  # both short and long factors get used
        facts["longrope"] = {"short_for_lengths<=": 16, "prompt_lengths": lengths}
    return facts


def check_phi3_rope(golden: dict, ids_list) -> None:
    """Independent re-derivation of what HF's Phi-3 RoPE did: partial rotary (first 12 of 16 dims,
    rotate_half within those 12), short factors for sequences of length <= 16, long factors above,
    cos/sin scaled by attention_factor sqrt(1 + ln(64/16) / ln(16)) for every sequence."""
    scale = math.sqrt(1 + math.log(64 / 16) / math.log(16))
    offsets = golden["prompt_offsets"].tolist()
    exps = torch.arange(0, PHI3_ROTARY_DIM, 2, dtype=torch.int64).float() / PHI3_ROTARY_DIM
    for l in range(N_LAYERS):
        for p, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            factors = PHI3_LONG_FACTOR if (b - a) > 16 else PHI3_SHORT_FACTOR
            inv_freq = 1.0 / (torch.tensor(factors) * 10000.0**exps)
            ang = torch.arange(b - a).float()[:, None] * inv_freq[None, :]
            ang = torch.cat([ang, ang], -1)[:, None, :]
            cos, sin = ang.cos() * scale, ang.sin() * scale
            for which in ("q", "k"):
                x = golden[f"blocks.{l}.attn.hook_{which}"][a:b]
                got = golden[f"blocks.{l}.attn.hook_rot_{which}"][a:b]
                xr = x[..., :PHI3_ROTARY_DIM]
                half = PHI3_ROTARY_DIM // 2
                rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
                want = torch.cat([xr * cos + rotated * sin, x[..., PHI3_ROTARY_DIM:]], -1)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def check_last_layer_interventions(model, fam: Family, golden: dict, cases, operands, results) -> None:
    """Cases 2 and 5 act on the last layer's MLP, so their logits can be re-derived from the clean
    goldens with the model's own modules: a cross-check of the hook plumbing."""
    last = model.model.layers[-1]
    resid_mid = golden[f"blocks.{N_LAYERS - 1}.hook_resid_mid"]

    def finish(mlp_out):
        with torch.no_grad():
            if fam.mlp_out_module != "mlp":
                mlp_out = getattr(last, fam.mlp_out_module)(mlp_out)
            logits = model.lm_head(model.model.norm(resid_mid + mlp_out))
            cap = getattr(model.config, "final_logit_softcapping", None)
            return torch.tanh(logits / cap) * cap if cap is not None else logits

    post = golden[f"blocks.{N_LAYERS - 1}.mlp.hook_post"].clone()
    post[:, cases[2]["neurons"]] *= cases[2]["alpha"]
    with torch.no_grad():
        scaled = last.mlp.down_proj(post)
    torch.testing.assert_close(results["case2.logits"], finish(scaled), rtol=1e-5, atol=1e-5)
    mean = operands["case5.mean"].expand_as(resid_mid)
    with torch.no_grad():
        logits5 = model.lm_head(model.model.norm(resid_mid + mean))
        cap = getattr(model.config, "final_logit_softcapping", None)
        logits5 = torch.tanh(logits5 / cap) * cap if cap is not None else logits5
    torch.testing.assert_close(results["case5.logits"], logits5, rtol=1e-5, atol=1e-5)


def attention_stats(golden: dict, n_layers: int, offsets: list[int]) -> str:
    parts = []
    for l in range(n_layers):
        pat = golden[f"blocks.{l}.attn.hook_pattern"]
        ent, uni = [], []
        for a, b in zip(offsets[:-1], offsets[1:]):
            T = b - a
            for i in range(1, T):
                row = pat[a + i, :, : i + 1].clamp_min(1e-30)
                ent.append((-(row * row.log()).sum(-1)).mean())
                uni.append(math.log(i + 1))
        parts.append(f"L{l} H/Hmax={float(sum(ent) / sum(uni)):.2f}")
    return " ".join(parts)


def build_family(fam: Family, base_tok: dict, out_root: str) -> None:
    out_dir = os.path.join(out_root, fam.name)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    # Tokenizer files.
    tok = family_tokenizer(base_tok, fam)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(fam, tok))
    tok_ids = {s: tok.token_to_id(s) for s in fam.specials}

    # Model: construct, re-randomise, round to bf16, save as a Hub checkpoint.
    config = fam.make_config(tok_ids)
    config._attn_implementation = "eager"
    torch.manual_seed(fam.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(fam.seed)
    randomise_(model, fam, gen)
    save_checkpoint(model, fam, out_dir)

    # Prompts with HF's tokenizer; it must agree with the raw tokenizers pipeline (what Rust uses).
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    ids_list = [hf_tok(t)["input_ids"] for t in TEXTS]
    for t, ids in zip(TEXTS, ids_list):
        assert ids == tok.encode(t).ids, (fam.name, t)
        assert hf_tok.decode(ids, skip_special_tokens=True) == t
    chat_text = hf_tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = list(
        hf_tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    assert chat_ids == tok.encode(chat_text, add_special_tokens=False).ids
    write_json(
        os.path.join(out_dir, "prompts.json"),
        {"texts": TEXTS, "ids": ids_list, "chat_messages": CHAT_MESSAGES, "chat_ids": chat_ids, "chat_text": chat_text},
    )

    # Reload from disk (both config layouts) and check it is the same model as the in-memory one.
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    sd_mem, sd_disk = model.state_dict(), loaded.state_dict()
    assert sd_mem.keys() == sd_disk.keys()
    for k in sd_mem:
        assert torch.equal(sd_mem[k], sd_disk[k]), k
    assert loaded.config.rope_parameters == model.config.rope_parameters, (
        loaded.config.rope_parameters,
        model.config.rope_parameters,
    )
    assert getattr(loaded.config, "sliding_window", None) == getattr(model.config, "sliding_window", None)
    for ids in ids_list:
        assert torch.equal(forward_logits(model, ids), forward_logits(loaded, ids)), fam.name
    del model

    facts = check_rope(loaded, fam, ids_list)
    golden = record_activations(loaded, fam, ids_list)
    meta = {"generator": GENERATOR, "transformers": transformers.__version__, "torch": torch.__version__}
    save_file(golden, os.path.join(out_dir, "golden.safetensors"), metadata=meta)

    if fam.name == "phi3":
        check_phi3_rope(golden, ids_list)

    cases, operands = intervention_cases(golden, torch.Generator().manual_seed(fam.seed + 500))
    results = run_interventions(loaded, fam, ids_list, cases, operands)
    check_last_layer_interventions(loaded, fam, golden, cases, operands, results)
    for i in range(len(cases)):
        delta = (results[f"case{i}.logits"] - golden["logits"]).abs().max().item()
        assert delta > 1e-3, (fam.name, i, delta)  # every case must actually change something
    write_json(
        os.path.join(out_dir, "interventions.json"),
        {
            "positions_note": "positions are relative to each prompt (-1 = its last token); 'all' = every position",
            "prompt_offsets": golden["prompt_offsets"].tolist(),
            "cases": cases,
        },
    )
    save_file({**operands, **results}, os.path.join(out_dir, "interventions.safetensors"), metadata=meta)

    offsets = golden["prompt_offsets"].tolist()
    rms = {k: golden[f"blocks.1.{k}"].pow(2).mean().sqrt().item() for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")}
    print(
        f"{fam.name:8s} lengths={[len(i) for i in ids_list]} chat={len(chat_ids)} "
        f"{attention_stats(golden, N_LAYERS, offsets)} "
        f"rms(L1 resid_pre/attn_out/mlp_out)={rms['hook_resid_pre']:.2f}/{rms['hook_attn_out']:.2f}/{rms['hook_mlp_out']:.2f} "
        f"logit_std={golden['logits'].std().item():.2f} {facts}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument(
        "--out",
        default=os.path.join(repo_root, "tests", "fixtures"),
        help="output directory (default: <repo root>/tests/fixtures)",
    )
    parser.add_argument("--families", nargs="*", default=FAMILIES, choices=FAMILIES)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    base_tok = train_base_tokenizer()
    os.makedirs(args.out, exist_ok=True)
    for name in args.families:
        build_family(FAMILY_SPECS[name], base_tok, args.out)


if __name__ == "__main__":
    main()
