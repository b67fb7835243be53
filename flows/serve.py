"""The `serve` flow, the serving reconciler: vLLM serves exactly the registry's aliased versions, each under
its immutable name (`tiny-ko-v3`), with the stable name (`tiny-ko`) following `champion` (docs/serving.md).

    python -m flows.serve --config configs/tiny-ko.yaml      # one pass; starts vLLM + router if not running
    python -m flows.serve --config configs/tiny-ko.yaml --stop
    prefect deployment run serve/tiny-ko                     # the scheduled reconciler
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow, get_run_logger

from loraflow.config import ConfigError, load_config
from loraflow.serving.deploy import deploy_aliases
from loraflow.serving.stack import stop_detached


@flow(name="serve")
def serve(
    config: str = "configs/tiny-ko.yaml", overrides: dict[str, Any] | None = None, start: bool = True
) -> dict[str, Any]:
    """One reconcile pass. `start=False` only reconciles a stack that is already running (fails otherwise)."""
    job = load_config(config, overrides)
    endpoint, report = deploy_aliases(job, start=start)
    logger = get_run_logger()
    for canary in report.canaries:
        logger.info(
            "canary %s-v%s: %s (%s)",
            job.registry.model_name,
            canary.version,
            "passed" if canary.passed else "FAILED",
            canary.reason,
        )
    logger.info("routes %s; loaded %s; unloaded %s", report.routes, report.loaded, report.unloaded)
    return {"base_url": f"{endpoint.router_url}/v1", **report.model_dump()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/tiny-ko.yaml")
    parser.add_argument("--stop", action="store_true", help="stop the job's vLLM + router and exit")
    args = parser.parse_args(argv)
    try:
        job = load_config(args.config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if args.stop:
        print("stopped" if stop_detached(job) else "nothing recorded as running")
        return 0
    summary = serve(config=args.config)
    print(f"serving at {summary['base_url']}: {summary['routes']} loaded={summary['loaded']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
