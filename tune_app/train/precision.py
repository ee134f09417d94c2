"""Precision: the dtype of a trial's frozen base weights and of its autocast, decided in one place.

Base weights stay in half precision on a GPU for half-precision checkpoints and for models of 1B parameters or
more (no fp32 copy of a 7B model); LoRA layers and the head always train in fp32. The parameter count comes from
config.json alone (no weights loaded), so the driver's memory estimate uses the same rule.

What trains is fp32 over any base (`train_in_fp32`); where a half-precision base runs without autocast (`dtype:
bf16` on a CPU, or `train.precision: fp32` on a GPU), each part computes in its own dtype and casts at its edges,
as autocast would have cast for it: PEFT's LoRA layers already cast their input to their fp32 weights; the head
copies (modules_to_save) get the same, and a base layer whose bias trains (lora_bias) uses a half-precision view of
its fp32 bias. Under autocast none of this runs: autocast casts as it always did.
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


# --------------------------------------------------------------------------------------------- what trains


HOOKS = "_tune_app_precision_hooks"
"""The attribute of a module holding the handles of the hooks `train_in_fp32` gave it (`remove_hooks` removes
them)."""


def train_in_fp32(model, family=None) -> None:
    """Adapters and heads train in fp32 even when the frozen base is in half precision (AdamW on bf16 weights loses
    updates): every trainable parameter is cast to fp32. Over a half-precision base, the parts that then hold fp32
    weights among half-precision ones compute without autocast too (see the module docstring):

    - each head copy (PEFT's modules_to_save) casts its inputs to its fp32 weights; its output stays fp32 for the
      family's head (the logits), and goes back to the dtype it came in for any other trained copy (a module the
      checkpoint lacked, which the base's half-precision layers read on from);
    - a base layer whose own parameters train (lora_bias all / lora_only) beside frozen half-precision weights uses
      a half-precision view of them in its forward, the trained parameters themselves staying fp32.

    Idempotent: a pack calls it again for each trial that joins. A kept base loses the base layers' hooks when its
    adapter is stripped (`remove_hooks`)."""
    import torch
    from peft.utils import ModulesToSaveWrapper

    from tune_app.spec.families import head_modules, inside

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if not any(_half(p) and not p.requires_grad for p in model.parameters()):
        return  # an fp32 base: everything computes in fp32 already
    heads = head_modules(family)
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            logits = any(inside(name, h) for h in heads)
            for trained_copy in module.modules_to_save.values():
                if HOOKS not in trained_copy.__dict__:
                    trained_copy.__dict__[HOOKS] = _cast_inputs_hooks(trained_copy, keep_fp32=logits)
            continue
        # A head copy holds nothing frozen, its original nothing trained: only base layers qualify here.
        own = dict(module.named_parameters(recurse=False))
        trained = tuple(n for n, p in own.items() if p.requires_grad)
        frozen = {p.dtype for p in own.values() if not p.requires_grad and _half(p)}
        if trained and len(frozen) == 1 and HOOKS not in module.__dict__:
            module.__dict__[HOOKS] = _half_view_hooks(module, trained, frozen.pop())


def remove_hooks(model) -> None:
    """Remove every hook `train_in_fp32` gave the modules of `model` (a base whose adapter is stripped)."""
    for module in model.modules():
        for handle in module.__dict__.pop(HOOKS, ()):
            handle.remove()


def _half(p) -> bool:
    import torch

    return p.dtype in (torch.float16, torch.bfloat16)


def _autocast_on(device) -> bool:
    import torch

    return torch.is_autocast_enabled(device.type)


def _cast_inputs_hooks(module, keep_fp32: bool) -> list:
    """A trained copy computing in its own dtype: floating-point inputs cast to it; the output back to the inputs'
    dtype unless `keep_fp32`. Nothing under autocast."""
    import torch

    def before(mod, args, kwargs):
        dtype = next((p.dtype for p in mod.parameters() if p.is_floating_point()), None)
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()]
        if dtype is None or not tensors or _autocast_on(tensors[0].device):
            return None
        mod.__dict__["_tune_app_input_dtype"] = tensors[0].dtype

        def cast(t):
            return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    def after(mod, args, output):
        came_in = mod.__dict__.pop("_tune_app_input_dtype", None)
        if came_in is not None and not keep_fp32 and torch.is_tensor(output) and output.is_floating_point():
            return output.to(came_in)
        return None

    return [module.register_forward_pre_hook(before, with_kwargs=True),
            module.register_forward_hook(after, always_call=True)]


def _half_view_hooks(module, names: tuple[str, ...], dtype) -> list:
    """A half-precision layer with fp32 parameters of its own that train: during its forward, those parameters are
    seen in the layer's dtype (gradients flow back to them through the cast), as autocast would cast them; put back
    after the forward, also when it raises. Nothing under autocast."""

    def before(mod, args):
        first = mod._parameters[names[0]]
        if _autocast_on(first.device):
            return
        kept = {n: mod._parameters[n] for n in names}
        mod.__dict__["_tune_app_trained"] = kept
        for n, p in kept.items():
            mod._parameters[n] = p.to(dtype)

    def after(mod, args, output):
        kept = mod.__dict__.pop("_tune_app_trained", None)
        if kept is not None:
            mod._parameters.update(kept)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]
