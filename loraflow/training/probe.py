"""probe: a few real training steps of a job on this machine, at its worst-case batch: peak memory, tokens/s and
the whole training's projected time (`loraflow plan --probe`; bench/gpu.py measures with the same functions).

`loraflow plan` estimates memory from formulas; the probe measures it. Its rows are random tokens, every one exactly
`training.max_length` long: format_chat drops longer rows, so no batch of the job holds more tokens. They go through
the train step's own `train_here` (the job's base, quantization, SFTConfig, collator and attention kernel) in one
process, in a fresh directory (a leftover checkpoint would be resumed instead of trained).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from mlflow.entities import Metric, Param
from pydantic import BaseModel, ConfigDict
from transformers import set_seed

from loraflow import paths
from loraflow.base.load import load_tokenizer
from loraflow.config.job import JobConfig
from loraflow.data.format_chat import PAIR_COLUMNS
from loraflow.data.keys import chat_key, dataset_key
from loraflow.hub import RevisionError
from loraflow.outputs import load_result
from loraflow.registry.client import client_at, tracking_uri
from loraflow.results import ChatResult, DatasetResult
from loraflow.templates import template_sha
from loraflow.training.device import released_device_memory
from loraflow.training.live_metrics import Tracking
from loraflow.training.models import attn_implementation_for, device_for
from loraflow.training.plan import plan_job
from loraflow.training.train import train_here

log = logging.getLogger(__name__)

PROBE_STAGE = "probe"  # the run's `loraflow.stage` tag (a training's run says `training`)


class Measurement(BaseModel):
    """What `measure` saw: the Trainer's own clock and TRL's `num_tokens` (non-padding tokens)."""

    model_config = ConfigDict(frozen=True)

    device: str  # torch.cuda.get_device_name(), or "cpu"
    attn_implementation: str
    steps: int
    tokens: int
    seconds: float  # train_runtime: every step, the first (warm-up) and the final checkpoint's save included
    tokens_per_s: float
    seconds_per_step: float
    train_loss: float
    peak_gib: float
    # CUDA: torch.cuda.max_memory_allocated since before the base loaded (what `loraflow plan` estimates). CPU: the
    # process's peak RSS (libraries and every earlier step of the process included), no match for the plan.
    peak_source: str
    run_id: str | None = None


class ProbeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    base: str
    batch_size: int
    max_length: int
    measured: Measurement
    plan_mode: str
    plan_gib: float
    peak_vs_plan: float
    rows: int | None  # the job's training rows, when known
    rows_source: str  # "built dataset", "--rows" or "unknown"
    fill: float  # mean tokens per row / max_length (1.0: every row max_length, the upper bound)
    job_steps: int | None
    projected_hours: float | None


def random_rows(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in lengths]


def synthetic_chat(rows: list[list[int]], job: JobConfig, out_dir: Path) -> ChatResult:
    """The rows as the chat step writes them (tokenized/ with input_ids and assistant_masks), every token labeled;
    for a DPO job, pairs: each row's first half the prompt, its second half both answers (the chosen one reversed),
    so each of a pair's two sequences is the row's length."""
    if job.training.method == "dpo":
        halves = [(row[: len(row) // 2], row[len(row) // 2 :]) for row in rows]
        columns = dict(zip(PAIR_COLUMNS, ([p for p, _ in halves], [a[::-1] for _, a in halves],
                                          [a for _, a in halves]), strict=True))
        tokens = 2 * sum(map(len, rows))
    else:
        columns, tokens = {"input_ids": rows, "assistant_masks": [[1] * len(row) for row in rows]}, sum(map(len, rows))
    DatasetDict({"train": Dataset.from_dict(columns)}).save_to_disk(str(out_dir / "tokenized"))
    return ChatResult(key="probe", path=str(out_dir), dataset_sha="probe",
                      template_sha=template_sha(job.model.chat_template),
                      stats={"train_rows": len(rows), "train_tokens": tokens})


def measure(job: JobConfig, rows: list[list[int]], tracking: Tracking | None = None) -> Measurement:
    """One epoch over `rows` (whole optimizer steps of batch_size x gradient_accumulation_steps rows) through
    `train_here` with the job's settings, in one process; checkpoints only at the end."""
    per_step = job.training.batch_size * job.training.gradient_accumulation_steps
    steps = len(rows) // per_step
    if steps < 1:
        raise ValueError(f"{len(rows)} rows make no optimizer step of {per_step} rows")
    training = job.training.model_copy(update={"max_steps": steps, "save_steps": steps, "logging_steps": 1,
                                               "num_processes": 1, "accelerate_config": None})
    device = device_for(job.model)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=paths.sub("probe")) as tmp:
        out = Path(tmp)
        chat = synthetic_chat(rows[: steps * per_step], job, out)
        set_seed(training.seed)  # the adapter's initialization draws from the global RNG: equal for every call
        with released_device_memory():  # as the train task: the next measurement (or vLLM) finds the GPU free
            result = train_here(chat, job.model, job.lora, job.quantization, training, out, "probe", tracking)
        assert result is not None  # one process is rank 0
        history = json.loads(Path(result.log_history).read_text())
    seconds = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    tokens = int(max(entry.get("num_tokens", 0) for entry in history))
    gpu_mb = result.metrics.get("peak_gpu_allocated_mb")
    return Measurement(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        attn_implementation=attn_implementation_for(job.model, device, padding_free=training.padding_free_batches),
        steps=steps, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, seconds_per_step=seconds / steps,
        train_loss=result.metrics["train_loss"],
        peak_gib=(gpu_mb if gpu_mb is not None else result.metrics["peak_rss_mb"]) / 1024,
        peak_source="torch.cuda.max_memory_allocated" if gpu_mb is not None else "peak RSS of the process (CPU)",
        run_id=result.run_id,
    )


def built_chat(job: JobConfig) -> ChatResult | None:
    """The job's tokenized dataset when a run on this LORAFLOW_HOME built it (found by the flow's own keys); None
    when none was built or a hub reference cannot be resolved here (offline, not in the hub cache)."""
    try:
        dataset = load_result("dataset", dataset_key(job.data), DatasetResult)
        return load_result("chat", chat_key(dataset, job.model, job.training), ChatResult) if dataset else None
    except RevisionError:
        return None


def job_steps(job: JobConfig, rows: int) -> int:
    """The optimizer steps of the whole training, as the Trainer counts them."""
    training = job.training
    if training.max_steps > 0:
        return training.max_steps
    batches = math.ceil(rows / (training.batch_size * training.num_processes))
    return math.ceil(training.epochs * math.ceil(batches / training.gradient_accumulation_steps))


def probe_job(job: JobConfig, steps: int, rows: int | None = None, tracking: Tracking | None = None) -> ProbeResult:
    """`steps` optimizer steps of worst-case batches, compared with the plan's estimate; projected onto the job's
    rows: `rows` when given, else the built dataset's train split, else no projection. The projection is measured
    seconds per worst-case step x the job's steps, scaled by the rows' fill (mean length / max_length) when batches
    are padding-free (they cost by the token): an upper bound, the probe's steps including the warm-up and a
    checkpoint's save."""
    training = job.training
    count = steps * training.batch_size * training.gradient_accumulation_steps
    vocab = len(load_tokenizer(job.model))
    measured = measure(job, random_rows([training.max_length] * count, vocab, training.seed), tracking)
    mode = "qlora_nf4" if job.quantization.enabled else "lora_bf16"
    plan_gib = plan_job(job).memory_gib[mode]["total"]
    chat = None if rows is not None else built_chat(job)
    if chat is not None:
        rows, source = chat.stats["train_rows"], "built dataset"
        fill = chat.stats["train_tokens"] / rows / training.max_length if training.padding_free_batches else 1.0
    else:
        source, fill = ("--rows" if rows is not None else "unknown"), 1.0
    total = job_steps(job, rows) if rows is not None else None
    return ProbeResult(
        name=job.name, base=job.model.base, batch_size=training.batch_size, max_length=training.max_length,
        measured=measured, plan_mode=mode, plan_gib=plan_gib, peak_vs_plan=measured.peak_gib / plan_gib, rows=rows,
        rows_source=source, fill=fill, job_steps=total,
        projected_hours=total * measured.seconds_per_step * fill / 3600 if total is not None else None,
    )


def probe_metrics(result: ProbeResult) -> dict[str, float]:
    measured = result.measured
    metrics = {"peak_gib": measured.peak_gib, "tokens_per_s": measured.tokens_per_s,
               "seconds_per_step": measured.seconds_per_step, "train_loss": measured.train_loss,
               "plan_gib": result.plan_gib, "peak_vs_plan": result.peak_vs_plan, "fill": result.fill}
    extra = {"rows": result.rows, "job_steps": result.job_steps, "projected_hours": result.projected_hours}
    return metrics | {name: float(value) for name, value in extra.items() if value is not None}


def probe_and_log(job: JobConfig, steps: int, rows: int | None = None) -> ProbeResult:
    """`loraflow plan --probe`: the probe, watched live by a run in the job's experiment (train/* and system
    metrics, as a training's run), which then gets the probe's params and `probe/...` metrics and the tag
    `loraflow.stage=probe`."""
    tracking = Tracking(uri=tracking_uri(job.registry), experiment=job.registry.experiment or job.name,
                        run_name=f"{job.name}-probe")
    result = probe_job(job, steps, rows, tracking)
    measured = result.measured
    assert measured.run_id is not None
    params = {"base": result.base, "device": measured.device, "attn_implementation": measured.attn_implementation,
              "steps": measured.steps, "batch_size": result.batch_size, "max_length": result.max_length,
              "rows_source": result.rows_source, "peak_source": measured.peak_source, "plan_mode": result.plan_mode}
    stamp = int(time.time() * 1000)
    client = client_at(tracking.uri)
    client.log_batch(measured.run_id, params=[Param(f"probe.{k}", str(v)) for k, v in params.items()],
                     metrics=[Metric(f"probe/{k}", v, stamp, 0) for k, v in probe_metrics(result).items()])
    client.set_tag(measured.run_id, "loraflow.stage", PROBE_STAGE)
    client.set_terminated(measured.run_id)
    log.info("probe logged to run %s at %s", measured.run_id, tracking.uri)
    return result


def format_probe(result: ProbeResult) -> str:
    measured = result.measured
    projection = "no projection: no built dataset of the job here; pass --rows N (its training rows)"
    if result.projected_hours is not None:
        projection = (f"{result.projected_hours:.2f} h for {result.job_steps:,} steps ({result.rows:,} rows: "
                      f"{result.rows_source}, fill {result.fill:.2f}; an upper bound)")
    return "\n".join([
        f"probe: {result.name} — {result.base} on {measured.device} ({measured.attn_implementation}), "
        f"{measured.steps} steps of worst-case batches ({result.batch_size} x {result.max_length} tokens)",
        f"peak memory  {measured.peak_gib:.2f} GiB ({measured.peak_source}); plan {result.plan_mode} "
        f"{result.plan_gib:.2f} GiB -> {result.peak_vs_plan:.2f}x",
        f"throughput   {measured.tokens_per_s:,.0f} tokens/s, {measured.seconds_per_step:.2f} s/step (warm-up and "
        f"final checkpoint included), loss {measured.train_loss:.4f}",
        f"projection   {projection}",
        *([f"MLflow run   {measured.run_id}"] if measured.run_id else []),
    ])
