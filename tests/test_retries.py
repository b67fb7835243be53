"""Only what can heal is retried: a bad mapping fails its task on the first attempt, naming the columns the file
does have; connection errors and 5xx keep their retries (the MLflow crash in tests/test_registry_postgres.py)."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import httpx
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from prefect import flow, get_client
from pydantic import ValidationError

from loraflow.config.data import DataConfig
from loraflow.errors import InputError
from loraflow.process import ProcessFailed
from tasks.build_dataset import build_dataset
from tasks.prefect_glue import is_transient


@flow
def dataset_flow(data: DataConfig) -> tuple[bool, str, UUID | None]:
    state = build_dataset(data, return_state=True)
    return state.is_failed(), str(state.result(raise_on_failure=False)), state.state_details.task_run_id


@pytest.mark.slow  # a real Prefect flow run (Prefect's temporary server)
def test_a_source_mapping_a_missing_column_fails_at_once_naming_the_files_columns(tmp_path: Path) -> None:
    source = tmp_path / "qa.csv"
    pd.DataFrame({"q": ["1+1?", "2+2?"], "a": ["2", "4"]}).to_csv(source, index=False)
    data = DataConfig.model_validate({"sources": [{"path": str(source),
                                                   "fields": {"prompt": "question", "response": "a"}}]})
    failed, message, task_run_id = dataset_flow(data)
    assert failed and "missing field(s) ['question']" in message and "['a', 'q']" in message, message
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(task_run_id)
    assert task_run.run_count == 1, f"an input error was retried: {task_run.run_count} attempts"


def test_what_is_retried() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:1/x")
    status = {code: httpx.HTTPStatusError("", request=request, response=httpx.Response(code, request=request))
              for code in (404, 429, 503)}
    try:
        DataConfig.model_validate({"sources": "nope"})
    except ValidationError as error:
        invalid = error
    healing = [httpx.ConnectError("refused", request=request), status[503], status[429], ConnectionResetError(),
               MlflowException("API request to http://127.0.0.1:5000 failed"), ProcessFailed("vllm exited"),
               TimeoutError()]
    permanent = [status[404], MlflowException("no such version", RESOURCE_DOES_NOT_EXIST), InputError("bad"),
                 FileNotFoundError("data.sources[0].path"), invalid, ValueError("missing field(s)"), KeyError("x")]
    assert [is_transient(e) for e in healing] == [True] * len(healing)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
