"""Merging the adapter into the base, and serving adapters on vLLM's OpenAI-compatible API."""

from __future__ import annotations

from pydantic import Field, model_validator

from loraflow.config.base import DeviceName, DtypeName, Section

VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own --gpu-memory-utilization when the config leaves it None


class MergeConfig(Section):
    """merge_and_unload into a full-precision reload of the base (never the 4-bit training base). The merge and its
    check run in fp32; the result is saved in `dtype`."""

    enabled: bool = Field(default=False, description="Merge the adapter of a version the promote step made "
                          "champion into its base and attach the merged model to the version's run (a rejected or "
                          "challenger version is not merged; `loraflow merge CONFIG --version N` merges one later).")
    dtype: DtypeName = Field(
        default="auto", description="The saved dtype; `auto`: the model section's (the serving dtype: fp32 on CPU, "
        "bf16 on a bf16 GPU).")
    # fp32 weights are 4 bytes/parameter (7B: ~31 GB), so on a 24 GB GPU set `cpu` (needs that much RAM).
    device: DeviceName = Field(default="auto", description="Where the fp32 merge runs; `auto`: "
                                                   "model.device.")
    max_abs_logit_diff: float = Field(default=1e-3, gt=0, description="Merged logits must match base + adapter "
                                      "(both fp32) within this bound on the check prompts.")
    max_shard_size: str = Field(default="5GB", pattern=r"^[0-9]+[KMG]i?B$", description="The largest safetensors "
                                "file of the merged model (transformers' `max_shard_size`, e.g. `5GB`, `500MiB`): a "
                                "7B in bf16 (~15 GB) is written and uploaded as several files plus an index.")


class CanaryConfig(Section):
    """What a version must show before a served name points at it (docs/serving.md)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "대한민국 헌법 제1조는 무엇입니까?",
            "국회의 권한을 설명해 주세요.",
            "안녕하세요",
        ],
        min_length=1,
        description="The canary prompts, answered greedily by the version and by the base.",
    )
    max_tokens: int = Field(default=16, gt=0, description="Tokens generated per canary prompt.")
    min_changed: int = Field(default=1, gt=0, description="At least this many prompts must give a greedy output "
                             "different from the base's.")


class ParityConfig(Section):
    """After deploy, the configured benchmark tasks are scored on the served version (lm-eval `local-completions`
    through the router) and compared with the registered `tuned/...` metrics (docs/serving.md)."""

    enabled: bool = Field(default=True, description="Score the served version after deploy and tag "
                          "`serving.parity`.")
    limit: int | None = Field(default=None, gt=0, description="Items per task for the served run (None: all; the "
                              "comparison then covers the very items that were judged).")
    stderr_multiple: float = Field(default=1.0, gt=0, description="A metric is out of parity beyond this many "
                                   "standard errors (the larger of served and registered).")


class ServingConfig(Section):
    """How the job is served: its adapters on the vLLM of its base, shared with every job whose base and server
    settings are the same, behind the stack's one endpoint (docs/serving.md)."""

    enabled: bool = Field(default=False, description="The finetune flow ends by serving the registry's aliases; "
                          "while the stack's endpoint runs, a promotion in the MLflow UI reaches serving.")
    # The endpoint is the stack's, shared by every job: these are checked against the running one, never a second.
    host: str | None = Field(default=None, description="The address the stack's endpoint listens on; None: the "
                             "running endpoint's, else LORAFLOW_SERVING_HOST (default 127.0.0.1). A job naming "
                             "another address than the running endpoint's fails, naming this field.")
    port: int | None = Field(default=None, gt=0, lt=65536, description="The endpoint's port (OpenAI API of every "
                             "served job); None: the running endpoint's, else LORAFLOW_SERVING_PORT (default "
                             "8000). A job naming another port than the running endpoint's fails, naming this "
                             "field.")
    # The key itself never lives in a config.
    api_key_env: str = Field(default="LORAFLOW_VLLM_API_KEY", description="The name of the environment variable "
                             "holding the endpoint's API key (one per endpoint: every job served there names the "
                             "same variable).")
    max_loras: int | None = Field(default=None, gt=0, description="Adapters of this job its server keeps ready at "
                                  "once; None: its aliases plus one draining during a switch. The server's "
                                  "`--max-loras`/`--max-cpu-loras` is the sum over the jobs it serves.")
    max_lora_rank: int | None = Field(default=None, gt=0, description="The least `--max-lora-rank` this job needs; "
                                      "None: derived from `lora.r` and the adapters to serve. The server takes the "
                                      "largest over its jobs, rounded up to a rank vLLM accepts, and restarts to "
                                      "grow it.")
    max_model_len: int | None = Field(default=None, gt=0, description="vLLM's `--max-model-len`; None: the "
                                      "model's own. Part of what a shared server must agree on.")
    dtype: DtypeName = Field(
        default="auto", description="The served dtype; `auto`: the model's dtype on its device (fp32 on CPU, bf16 "
        "on a GPU that has it, else fp16). Part of what a shared server must agree on.")
    cpu_kv_cache_gib: int = Field(default=1, gt=0, description="vLLM's CPU KV cache in GiB "
                                  "(VLLM_CPU_KVCACHE_SPACE); ignored on CUDA.")
    # vLLM's default 0.9 leaves no room for a training on the same GPU: docs/stack.md.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="The fraction of each GPU's "
                                                 "memory the job's vLLM takes for weights + KV cache; None: vLLM's "
                                                 "default (0.9). Ignored on CPU. Servers of different bases on one "
                                                 "GPU must sum to at most 1.")
    # Multi-GPU serving of a large base: GPUs = tensor_parallel_size x pipeline_parallel_size.
    tensor_parallel_size: int = Field(default=1, gt=0, description="vLLM's tensor parallel size (GPUs per "
                                      "pipeline stage).")
    pipeline_parallel_size: int = Field(default=1, gt=0, description="vLLM's pipeline parallel size (stages).")
    startup_timeout_s: float = Field(default=300, gt=0, description="Seconds vLLM may take to become healthy "
                                     "(a cold 7B start on CUDA loads ~15 GB and captures CUDA graphs: set ~900).")
    aliases: list[str] = Field(default_factory=lambda: ["champion", "challenger"], min_length=1,
                               description="Registry aliases served under their versioned names; `champion` also "
                               "answers to the stable name.")
    canary: CanaryConfig = CanaryConfig()
    parity: ParityConfig = ParityConfig()
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` arguments, appended as "
                                  "they are. Part of what a shared server must agree on.")

    @model_validator(mode="after")
    def _champion_served(self) -> ServingConfig:
        if "champion" not in self.aliases:
            raise ValueError("`aliases` must include `champion` (the stable name follows it)")
        if self.max_loras is not None and self.max_loras < len(self.aliases):
            raise ValueError(f"`max_loras` ({self.max_loras}) must hold the {len(self.aliases)} aliased versions "
                             f"({', '.join(self.aliases)})")
        return self

    @property
    def slots(self) -> int:
        """Adapters of this job its server keeps ready: the aliased versions and one draining during a switch."""
        return self.max_loras or len(self.aliases) + 1
