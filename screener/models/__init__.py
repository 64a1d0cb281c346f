"""Everything that drives a model, in one place: scoring, extraction, steering, shift and explain use it.

- `loading`: local HF folders, hub ids, GGUF files and the default model (`resolve_model` → `ModelRef`,
  `ModelRef.load`), devices and dtypes (`pick_device`, `pick_dtype`).
- `adapters`: a PEFT adapter folder (a LoRA) on a base model (`resolve_adapter` → `AdapterRef`).
- `chat`: chat prompts as token ids (`chat_ids`; a conversation's prompts at once: `ConversationIds`), padding
  (`pad`, `pad_id`), end-of-turn ids (`eos_ids`).
- `hooks`: decoder blocks and final norm (`decoder_parts`), block outputs, reading `hidden_states[L]` with
  hooks and an early stop (`LayerTap`, `run_until_tapped`).
- `int8`: `--dtype int8` on CPUs: the decoder blocks' linear layers as dynamic int8 matmuls (`quantize_int8`).
- `generation`: batched generation that cuts each answer at its first end-of-turn token (`generate`), and
  one prefill per prompt, with a teacher-forced read in its pass, and a decode loop (`prefill`, `merge`,
  `decode`).
- `prefix`: a batch's shared prompt prefix run once, its rows reading the cached keys through SDPA's causal
  fast path (`SharedPrefix`, `prefix_attention`).

Layer convention (records.py): layer L is `hidden_states[L]` as transformers returns it. Import from
`screener.models`; the submodules say where each piece lives.
"""

from screener.models.adapters import (
    ADAPTER_CONFIG,
    AdapterRef,
    adapter_mismatches,
    is_adapter,
    resolve_adapter,
)
from screener.models.chat import (
    ConversationIds,
    chat_ids,
    chat_text,
    eos_ids,
    fast_ids,
    pad,
    pad_id,
    split_tokens,
    text_ids,
)
from screener.models.generation import (
    Generated,
    Prefill,
    decode,
    generate,
    merge,
    picker,
    plain_cache,
    prefill,
)
from screener.models.hooks import (
    LayerTap,
    StopForward,
    block_output,
    decoder_parts,
    run_until_tapped,
    with_block_output,
)
from screener.models.int8 import INT8, Int8Linear, is_int8, quantize_int8, weight_dtype
from screener.models.loading import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    ModelError,
    ModelRef,
    cache_dir,
    convert_gguf,
    default_gguf,
    load_model,
    load_tokenizer,
    model_config,
    pick_device,
    pick_dtype,
    resolve_model,
    sha256_file,
    weights_sha256,
)
from screener.models.prefix import MIN_SHARED, SharedPrefix, can_share, common_prefix, prefix_attention

__all__ = [
    "ADAPTER_CONFIG",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_NAME",
    "INT8",
    "MIN_SHARED",
    "AdapterRef",
    "ConversationIds",
    "Generated",
    "Int8Linear",
    "LayerTap",
    "ModelError",
    "ModelRef",
    "Prefill",
    "SharedPrefix",
    "StopForward",
    "adapter_mismatches",
    "block_output",
    "cache_dir",
    "can_share",
    "chat_ids",
    "chat_text",
    "common_prefix",
    "convert_gguf",
    "decode",
    "decoder_parts",
    "default_gguf",
    "eos_ids",
    "fast_ids",
    "generate",
    "is_adapter",
    "is_int8",
    "load_model",
    "load_tokenizer",
    "merge",
    "model_config",
    "pad",
    "pad_id",
    "pick_device",
    "pick_dtype",
    "picker",
    "plain_cache",
    "prefill",
    "prefix_attention",
    "quantize_int8",
    "resolve_adapter",
    "resolve_model",
    "run_until_tapped",
    "sha256_file",
    "split_tokens",
    "text_ids",
    "weight_dtype",
    "weights_sha256",
    "with_block_output",
]
