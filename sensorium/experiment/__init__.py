"""Experiments: a YAML spec run end to end against the three services, ending in a report.

``run(spec_path)`` starts the services locally when no addresses are given (the same entry
points the containers run) and stops them at the end; with addresses it drives a running stack.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensorium.experiment.spec import ExperimentSpec, load_spec
from sensorium.experiment.runner import Plan, Say, plan_experiment, run_experiment

__all__ = ["Addresses", "ExperimentSpec", "Plan", "RunOutcome", "load_spec", "plan_experiment", "run"]


@dataclass(frozen=True)
class Addresses:
    analyzer: str = ""
    extractor: str = ""
    trainer: str = ""
    token: str | None = None

    @property
    def given(self) -> bool:
        return bool(self.analyzer or self.extractor or self.trainer)


@dataclass(frozen=True)
class RunOutcome:
    folder: Path
    report: Path
    summary: list[str]
    results: Any  # sensorium.report.ExperimentResults


def _local_tokenizer(spec: ExperimentSpec, models_dir: Path) -> Any | None:
    """The base model's tokenizer from the shared model store, when the word pool needs one."""
    if spec.words.max_tokens is None:
        return None
    from transformers import AutoTokenizer

    from sensorium.models import ModelRegistry, ModelStore

    store = ModelStore(models_dir)
    path = store.materialise(ModelRegistry.default(store).spec(spec.base_model))
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def run(spec_path: str | Path, out: str | Path | None = None, addresses: Addresses | None = None,
        say: Say = print, state: str | Path | None = None, services_env: dict[str, str] | None = None) -> RunOutcome:
    """Run an experiment spec; the run folder (default ``runs/<name>``) gets tables and report.html.

    The plan (word pool, training specs, test words) is worked out before any service starts, so
    an invalid spec or a missing data file costs nothing. ``services_env``: extra environment for
    services started locally (e.g. a model registry).
    """
    from sensorium import report
    from sensorium.client import Client
    import grpc

    from sensorium.errors import InvalidArgument, Unavailable
    from sensorium.experiment.launcher import LocalServices

    spec = load_spec(spec_path)
    addresses = addresses or Addresses()
    if addresses.given:
        missing = [n for n in ("analyzer", "extractor", "trainer") if not getattr(addresses, n)]
        if missing:
            raise InvalidArgument(f"give every service's address or none; missing: {', '.join(missing)}")
    folder = Path(out) if out else Path("runs") / spec.name
    state_dir = Path(state) if state else folder / "state"
    plan = plan_experiment(spec, _local_tokenizer(spec, state_dir / "models"), say)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        where = addresses
        if not addresses.given:
            say(f"[services] starting extractor, trainer and analyzer locally (state in {state_dir})")
            env = dict(services_env or {})
            if spec.paper_dir is not None:
                env.setdefault("SENSORIUM_TRAINER_PAPER_DIR", str(spec.paper_dir))
            if spec.norms_root is not None:
                env.setdefault("SENSORIUM_TRAINER_NORMS_ROOT", str(spec.norms_root))
            if spec.prompts is not None and spec.prompts.path is not None:
                sets = json.dumps({spec.prompts.name: str(spec.prompts.path)})
                env.setdefault("SENSORIUM_EXTRACTOR_PROMPT_SETS", sets)
                env.setdefault("SENSORIUM_TRAINER_PROMPT_SETS", sets)
            local = stack.enter_context(LocalServices(state_dir, env))
            where = Addresses(local.address("analyzer"), local.address("extractor"), local.address("trainer"))
        clients = stack.enter_context(Client(where.analyzer, where.extractor, where.trainer, token=addresses.token))
        try:
            results = run_experiment(plan, folder, clients, say)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            raise Unavailable(f"a service stayed unavailable after retries ({exc.code().name}: {exc.details()}); "
                              f"finished steps are kept in {folder / 'steps'} and the adapter store: run the "
                              "same spec again to continue") from None
    report.write_tables(results, folder)
    path = report.build_report(results, folder)
    return RunOutcome(folder, path, report.summary_lines(results), results)
