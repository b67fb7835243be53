"""plan: what a job's training needs (parameters, adapter size, GPU memory per mode), computed offline.

The base is built from its config.json on the meta device (no weights, no GPU) and wrapped with PEFT exactly as
the train step does, so the parameter counts are PEFT's own. Memory is an estimate from formulas (see
`activation_bytes`), not a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from peft import get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from pydantic import BaseModel, ConfigDict
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from loraflow.base.load import resolve_base
from loraflow.config.job import JobConfig
from loraflow.config.lora import ALL_LINEAR, LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.errors import LoraflowError
from loraflow.training.arguments import peft_config
from loraflow.training.plan_memory import (
    GIB,
    MARGIN_GIB,
    activation_bytes,
    fused_head_bytes,
    layer_bytes,
    optimizer_bytes,
    safetensors_bytes,
    serving_share,
    usable_gib,
)

BASES_DIR = Path(__file__).resolve().parent / "bases"
MODES = ("full_bf16_adamw", "lora_bf16", "qlora_nf4")
COMPONENTS = ("weights", "gradients", "optimizer", "activations")


class PlanError(LoraflowError):
    """The base's config.json cannot be found offline."""


class ModulePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # the target module name (q_proj, ...)
    layers: int  # how many layers it wraps
    in_features: int
    out_features: int
    params_per_layer: int  # r·(in + out) for LoRA
    total: int


class TrainingPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    base: str
    revision: str | None
    config_source: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    r: int
    alpha: int
    target_modules: list[str]
    trainable_params: int
    base_params: int
    total_params: int
    trainable_percent: float
    modules: list[ModulePlan]
    other_trainable_params: int  # trainable outside the LoRA layers (bias="all"/"lora_only")
    adapter_dtype: str
    adapter_bytes: int  # adapter_model.safetensors as training saves it (header included)
    method: str  # sft or dpo
    batch_size: int  # conversations, or DPO pairs
    sequences_per_batch: int  # DPO: two per pair
    max_length: int
    gradient_checkpointing: bool
    optim: str
    double_quant: bool
    memory_gib: dict[str, dict[str, float]]  # mode -> weights, gradients, optimizer, activations, total
    serving_share: float  # the fraction of each GPU a serving vLLM on the same GPU holds (0: none)
    gpu_gib: dict[str, float]  # usable memory per GPU (after the serving share and the margin)
    fits: dict[str, list[str]]  # GPU -> modes whose total fits
    assumptions: list[str]


def base_config_path(model: ModelConfig) -> tuple[Path, str]:
    """config.json of the base without downloading anything: the embedded base's directory, a local directory, the
    hub cache (works under HF_HUB_OFFLINE=1), else the copy shipped in loraflow/training/bases/."""
    if model.is_embedded:
        return Path(resolve_base(model)) / "config.json", "embedded"
    if Path(model.base).is_dir():
        return Path(model.base) / "config.json", "local directory"
    try:
        return Path(hf_hub_download(model.base, "config.json", revision=model.revision,
                                    local_files_only=True)), "hub cache"
    except (LocalEntryNotFoundError, HFValidationError):
        shipped = BASES_DIR / f"{model.base.rsplit('/', 1)[-1]}.json"
        if shipped.is_file():
            return shipped, "shipped copy"
    raise PlanError(
        f"model.base: no config.json for {model.base!r} (revision {model.revision or 'main'}) in the local hub cache "
        f"and no shipped copy at {shipped}. Fetch it once (only config.json, no weights): "
        f"`hf download {model.base} config.json --revision {model.revision or 'main'}`, or set model.base to a local "
        "directory holding config.json."
    )


def load_base_config(model: ModelConfig) -> tuple[PretrainedConfig, str]:
    path, kind = base_config_path(model)
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("model_type") is None:
        raise PlanError(f"model.base: {path} has no model_type")
    return AutoConfig.for_model(**raw), f"{kind}: {path}"


def build_plan(architecture: PretrainedConfig, lora: LoraSettings, training: TrainingConfig | None = None,
               quantization: QuantizationConfig | None = None, *, name: str = "", base: str = "",
               revision: str | None = None, config_source: str = "", share: float = 0.0) -> TrainingPlan:
    """The plan for any model architecture (a transformers PretrainedConfig): the base and its PEFT wrapping built on
    the meta device; `share` of each GPU is taken by serving (plan_memory.serving_share)."""
    training = training or TrainingConfig()
    quantization = quantization or QuantizationConfig()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
        head = model.get_output_embeddings()
        # bitsandbytes quantizes every nn.Linear weight but the output head; embeddings, norms, biases stay 16-bit
        quantized = sum(m.weight.numel() for m in model.modules()
                        if isinstance(m, torch.nn.Linear) and m is not head)
        base_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
        peft_model = get_peft_model(model, peft_config(lora))  # as the train step (and SFTTrainer) wraps it
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    total_params = sum(p.numel() for p in peft_model.parameters())

    groups: dict[tuple[str, int, int], list[int]] = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            key = (module_name.rsplit(".", 1)[-1], module.in_features, module.out_features)
            groups.setdefault(key, []).append(sum(p.numel() for n, p in module.named_parameters()
                                                  if p.requires_grad and "lora_" in n))
    order = {target: i for i, target in enumerate(ALL_LINEAR if isinstance(lora.target_modules, str)
                                                  else lora.target_modules)}
    modules = [ModulePlan(name=k[0], layers=len(v), in_features=k[1], out_features=k[2], params_per_layer=v[0],
                          total=sum(v)) for k, v in sorted(groups.items(), key=lambda kv: order.get(kv[0][0], 99))]

    # Adapter dtype: SFTTrainer casts the trainable parameters of a quantized (QLoRA) base to bf16; on a plain base,
    # PEFT's autocast_adapter_dtype keeps adapters in fp32 even for a bf16 base. save_pretrained writes them as they
    # are: 2 bytes/param for QLoRA, 4 otherwise (tiny-ko, NF4: 77,824 params -> 159,248 bytes with the header).
    adapter_dtype, itemsize = ("BF16", 2) if quantization.enabled else ("F32", 4)
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    adapter_bytes = safetensors_bytes({k: list(v.shape) for k, v in state.items()}, adapter_dtype, itemsize)

    text = architecture.get_text_config()
    b, s, dpo = training.batch_size, training.max_length, training.method == "dpo"
    # DPO: a batch of b pairs is 2b sequences (prompt + chosen, prompt + rejected) through the policy, then through the
    # reference without grad (one layer's activations at a time, while the policy's are held); TRL's fused head
    # computes their log-probs in tiles, never the b·s·V logits.
    sequences = 2 * b if dpo else b
    layer_act, logits = activation_bytes(sequences, s, text.hidden_size, text.num_hidden_layers,
                                         text.num_attention_heads, text.vocab_size, training.gradient_checkpointing)
    reference_act = layer_bytes(sequences, s, text.hidden_size, text.num_attention_heads) if dpo else 0.0
    if dpo:
        logits = fused_head_bytes(sequences * s, text.vocab_size)
    # The reference's own weights: a second bf16 model under full fine-tuning; with LoRA the base with adapters off,
    # or a frozen fp32 copy of the starting adapter (training.init_from).
    reference_full = 2 * base_params if dpo else 0
    reference_adapter = 4 * trainable_params if dpo and training.init_from else 0
    # lora_dropout keeps each wrapped module's dropped input (bf16) and its bool mask; lora_A's output is s·b·r
    per_wrapped = sum(m.layers * (3 * m.in_features + 2 * lora.r) for m in modules) if lora.dropout > 0 else 0
    kept_layers = 1 if training.gradient_checkpointing else text.num_hidden_layers
    lora_act = sequences * s * per_wrapped * kept_layers / max(1, text.num_hidden_layers)
    largest = max((m.in_features * m.out_features for m in modules), default=0)  # QLoRA dequantizes one at a time
    numels = [p.numel() for p in trainable]
    const_bits = (8 / 64 + 32 / (64 * 256)) if quantization.double_quant else 32 / 64  # blocksize 64
    nf4_weights = quantized * (0.5 + const_bits / 8) + (base_params - quantized) * 2
    raw = {
        # mixed precision: bf16 weights and grads, fp32 master copy (counted as optimizer state) and fp32 m, v
        "full_bf16_adamw": (2 * base_params + reference_full, 2 * base_params, 12 * base_params,
                            layer_act + logits + reference_act),
        "lora_bf16": (2 * base_params + 4 * trainable_params + reference_adapter, 4 * trainable_params,
                      optimizer_bytes(training.optim, numels, 4), layer_act + logits + lora_act + reference_act),
        "qlora_nf4": (nf4_weights + 2 * trainable_params + reference_adapter, 2 * trainable_params,
                      optimizer_bytes(training.optim, numels, 2),
                      layer_act + logits + lora_act + 2 * largest + reference_act),
    }
    memory = {mode: dict(zip(COMPONENTS, (round(x / GIB, 3) for x in parts), strict=True)) | {
        "total": round(sum(parts) / GIB, 3)} for mode, parts in raw.items()}
    gpu_gib = usable_gib(share)
    fits = {gpu: [mode for mode in MODES if sum(raw[mode]) / GIB <= usable] for gpu, usable in gpu_gib.items()}
    assumptions = [
        "estimates, not measurements: activations from formulas (Korthikanti et al. per layer, eager attention; "
        "SDPA/flash attention does not keep the a·s² scores and needs less)",
        "full_bf16_adamw: mixed precision, 16 bytes/param (bf16 weights 2 + bf16 grads 2 + fp32 master 4 + fp32 "
        "AdamW m, v 8; master counted under optimizer). A bf16-loaded model under HF Trainer keeps no master copy and "
        "bf16 states (8 bytes/param)",
        f"lora_bf16: frozen bf16 base, fp32 adapter (PEFT autocast); qlora_nf4: NF4 linears (0.5 byte/param + "
        f"{const_bits:.3f} bits/param of constants), head/embeddings/norms bf16, bf16 adapter (SFTTrainer's cast)",
        f"adapter optimizer: {training.optim}; 8-bit states 2 bytes/param, torch AdamW 2x the param dtype",
        f"batch {b} x {s} tokens (max_length, no packing), gradient checkpointing "
        f"{'on' if training.gradient_checkpointing else 'off'}; "
        + (f"DPO: {b} pairs = {sequences} sequences through the policy and the reference (no grad, one layer's "
           f"activations more: {reference_act / GIB:.2f} GiB); TRL's fused log-prob head: fp32 tiles of "
           f"{logits / GIB:.2f} GiB instead of the logits; the reference: a second bf16 model (full), the base with "
           "adapters off, or the starting adapter's fp32 copy (training.init_from)" if dpo else
           f"logits b·s·V fp32 = {logits / GIB:.2f} GiB counted, the loss backward's transient fp32 b·s·V buffers "
           f"(~{2 * logits / GIB:.1f} GiB more) not counted"),
        f"fits: total <= GPU memory x (1 - {share:g} serving share) - {MARGIN_GIB:g} GiB (CUDA context, "
        "fragmentation); the serving share is serving.gpu_memory_utilization when serving is enabled and the model is "
        "not on the CPU (vLLM beside the training on one GPU); paged optimizers can spill to CPU; T4 has no bf16 "
        "(use fp16 there)",
    ]
    return TrainingPlan(
        name=name, base=base, revision=revision, config_source=config_source,
        architecture=(architecture.architectures or [type(model).__name__])[0], num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size, vocab_size=text.vocab_size, r=lora.r, alpha=lora.alpha,
        target_modules=[m.name for m in modules], trainable_params=trainable_params, base_params=base_params,
        total_params=total_params, trainable_percent=100 * trainable_params / total_params, modules=modules,
        other_trainable_params=trainable_params - sum(m.total for m in modules), adapter_dtype=adapter_dtype,
        adapter_bytes=adapter_bytes, method=training.method, batch_size=b, sequences_per_batch=sequences, max_length=s,
        gradient_checkpointing=training.gradient_checkpointing, optim=training.optim,
        double_quant=quantization.double_quant, memory_gib=memory, serving_share=share, gpu_gib=gpu_gib, fits=fits,
        assumptions=assumptions,
    )


def plan_job(job: JobConfig) -> TrainingPlan:
    architecture, source = load_base_config(job.model)
    return build_plan(architecture, job.lora, job.training, job.quantization, name=job.name, base=job.model.base,
                      revision=job.model.revision, config_source=source, share=serving_share(job))


def format_plan(plan: TrainingPlan) -> str:
    at = f" @ {plan.revision}" if plan.revision else ""
    lines = [
        f"plan: {plan.name} — {plan.base}{at} ({plan.architecture}, {plan.num_layers} layers, hidden "
        f"{plan.hidden_size}, vocab {plan.vocab_size})",
        f"config: {plan.config_source}",
        f"LoRA r={plan.r} alpha={plan.alpha} on {', '.join(plan.target_modules)}",
        "",
        f"trainable  {plan.trainable_params:>15,}  ({plan.trainable_percent:.3f}% of total)",
        f"base       {plan.base_params:>15,}",
        f"total      {plan.total_params:>15,}",
        f"adapter    {plan.adapter_bytes / 1e6:>12.1f} MB  ({plan.adapter_bytes:,} bytes of adapter_model.safetensors, "
        f"{plan.adapter_dtype})",
        "",
        f"{'module':<12}{'layers':>7}{'in':>8}{'out':>8}{'params/layer':>14}{'total':>14}",
    ]
    lines += [f"{m.name:<12}{m.layers:>7}{m.in_features:>8}{m.out_features:>8}{m.params_per_layer:>14,}"
              f"{m.total:>14,}" for m in plan.modules]
    if plan.other_trainable_params:
        lines.append(f"{'other':<49}{plan.other_trainable_params:>14,}")
    lines.append(f"{'sum':<49}{plan.trainable_params:>14,}")
    per_batch = (f"{plan.batch_size} pairs = {plan.sequences_per_batch} sequences" if plan.method == "dpo"
                 else str(plan.batch_size))
    lines += ["", f"memory estimate, GiB ({plan.method}, batch {per_batch} x {plan.max_length} tokens, gradient "
              f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, optimizer {plan.optim})",
              f"{'mode':<17}" + "".join(f"{c:>12}" for c in (*COMPONENTS, "total")) + "  fits"]
    for mode, parts in plan.memory_gib.items():
        fits = [gpu for gpu, modes in plan.fits.items() if mode in modes]
        lines.append(f"{mode:<17}" + "".join(f"{parts[c]:>12.2f}" for c in (*COMPONENTS, "total"))
                     + f"  {', '.join(fits) or 'none of the GPUs below'}")
    served = f" (after serving's {plan.serving_share:.0%} of each GPU)" if plan.serving_share else ""
    lines += ["", f"usable GiB{served}: " + ", ".join(f"{gpu} {gib:.2f}" for gpu, gib in plan.gpu_gib.items())]
    lines += [f"{gpu}: {', '.join(modes) or '-'}" for gpu, modes in plan.fits.items()]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)
