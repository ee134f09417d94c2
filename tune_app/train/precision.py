"""Precision: the dtype of a trial's frozen base weights and of its autocast, decided in one place.

Base weights stay in half precision on a GPU for half-precision checkpoints and for models of 1B parameters or
more (no fp32 copy of a 7B model); LoRA layers and the head always train in fp32. The parameter count comes from
config.json alone (no weights loaded), so the driver's memory estimate uses the same rule.
"""

from __future__ import annotations

from typing import Any

from tune_app.spec.families import FAMILIES

LARGE_MODEL_PARAMS = 1_000_000_000
"""From this size on, `dtype: auto` keeps frozen base weights in half precision on GPU (no fp32 copy)."""


HALF_DTYPES = ("float16", "bfloat16")


def _family(hf_config):
    return FAMILIES.get(getattr(hf_config, "model_type", None))


def dimensions(hf_config) -> dict[str, Any]:
    """The dimensions the estimate needs, from any transformers config (attribute_map covers GPT-2/DistilBERT)."""
    c = hf_config
    hidden = int(c.hidden_size)
    heads = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "hidden_dim", None)
    family = _family(c)
    decoder = family.decoder if family else bool(getattr(c, "is_decoder", False) or any(
        a.endswith("CausalLM") for a in (getattr(c, "architectures", None) or [])))
    gated = any("gate" in m for m in family.mlp) if family else getattr(c, "hidden_act", "") == "silu"
    return dict(hidden=hidden, layers=int(c.num_hidden_layers), heads=heads, head_dim=head_dim, kv_heads=kv_heads,
                inter=int(inter or 4 * hidden), vocab=int(c.vocab_size), decoder=decoder, gated=gated,
                positions=0 if decoder else int(getattr(c, "max_position_embeddings", 0) or 0),
                types=int(getattr(c, "type_vocab_size", 0) or 0))


def count_parameters(hf_config, num_labels: int = 2) -> int:
    """Parameters of the sequence classifier the config describes, from its dimensions (no weights loaded)."""
    d = dimensions(hf_config)
    h, i = d["hidden"], d["inter"]
    q_out, kv_out = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    embeddings = (d["vocab"] + d["positions"] + d["types"]) * h
    if d["decoder"]:  # q, k, v, o without biases; gated or plain MLP; two norms; score head without bias
        attention = h * (q_out + 2 * kv_out) + q_out * h
        mlp = (3 if d["gated"] else 2) * h * i
        per_layer = attention + mlp + 2 * h
        head = h + h * num_labels  # final norm + score
    else:  # BERT-like: biased q, k, v, o; two LayerNorms; MLP; pooler/dense + classifier
        attention = h * (q_out + 2 * kv_out) + q_out * h + q_out + 2 * kv_out + h
        mlp = 2 * h * i + i + h
        per_layer = attention + mlp + 4 * h
        embeddings += 2 * h  # embedding LayerNorm
        head = h * h + h + h * num_labels + num_labels
    return embeddings + d["layers"] * per_layer + head


def checkpoint_dtype(hf_config) -> Any:
    """The dtype a checkpoint's config.json names, if any: the `dtype` attribute since transformers 4.56, the
    `torch_dtype` attribute before. Read from the instance's own attributes: in transformers 5, `torch_dtype` is a
    property that logs a deprecation warning."""
    attributes = vars(hf_config)
    return attributes.get("dtype") or attributes.get("torch_dtype")


def weights_dtype(name: str, checkpoint_dtype: Any, n_params: int, *, on_gpu: bool, precision: str = "auto") -> str:
    """`dtype: auto` policy for the frozen base weights: 'half' (bf16, or fp16 where bf16 is unsupported) on GPU
    for half-precision checkpoints and models of >= 1B parameters, since autocast computes in half precision
    anyway and an fp32 copy of a 7B model costs 28 GB; fp32 otherwise (and always without autocast)."""
    if name != "auto":
        return name
    if not on_gpu or precision == "fp32":
        return "fp32"
    if str(checkpoint_dtype).replace("torch.", "") in HALF_DTYPES or n_params >= LARGE_MODEL_PARAMS:
        return "half"
    return "fp32"



def dtype_of(name: str):
    """torch dtype of a precision name: bf16, fp16 or fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def torch_dtype(name: str, hf_config: Any, on_gpu: bool, precision: str = "auto"):
    """torch dtype of the frozen base weights (policy: weights_dtype)."""
    try:
        n_params = count_parameters(hf_config)
    except (AttributeError, TypeError):  # an exotic config: decide by the checkpoint's dtype alone
        n_params = 0
    name = weights_dtype(name, checkpoint_dtype(hf_config), n_params, on_gpu=on_gpu, precision=precision)
    if name == "half":
        name = "fp16" if precision == "fp16" else gpu_half_precision()
    return dtype_of(name)


def gpu_half_precision() -> str:
    """bf16 where the GPU computes in it (Ampere and later), else fp16: not bf16 emulated in fp32 arithmetic."""
    import torch

    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_factory(device, precision: str):
    import contextlib

    import torch

    if device.type == "cuda":
        if precision == "auto":
            precision = gpu_half_precision()
        if precision in ("bf16", "fp16"):
            dtype = dtype_of(precision)
            return lambda: torch.autocast("cuda", dtype=dtype), precision
        return contextlib.nullcontext, "fp32"
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext, "fp32"
