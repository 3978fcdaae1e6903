"""Experiments: a YAML spec run end to end against the three services, ending in a report.

``run(spec_path)`` starts the services locally when no addresses are given (the same entry
points the containers run) and stops them at the end; with addresses it drives a running stack.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensorium.experiment.spec import ExperimentSpec, load_spec
from sensorium.experiment.runner import Clients, Say, run_experiment

__all__ = ["Addresses", "ExperimentSpec", "RunOutcome", "load_spec", "run"]


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
        say: Say = print, state: str | Path | None = None) -> RunOutcome:
    """Run an experiment spec; the run folder (default ``runs/<name>``) gets tables and report.html."""
    from sensorium import report
    from sensorium.client import AnalyzerClient, ExtractorClient, TrainerClient
    from sensorium.errors import InvalidArgument
    from sensorium.experiment.launcher import LocalServices

    spec = load_spec(spec_path)
    folder = Path(out) if out else Path("runs") / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    addresses = addresses or Addresses()
    state_dir = Path(state) if state else folder / "state"
    with contextlib.ExitStack() as stack:
        if addresses.given:
            missing = [n for n in ("analyzer", "extractor", "trainer") if not getattr(addresses, n)]
            if missing:
                raise InvalidArgument(f"give every service's address or none; missing: {', '.join(missing)}")
            tokenizer = None if spec.words.max_tokens is None else _local_tokenizer(spec, state_dir / "models")
            where = addresses
        else:
            tokenizer = _local_tokenizer(spec, state_dir / "models")
            say(f"[services] starting extractor, trainer and analyzer locally (state in {state_dir})")
            local = stack.enter_context(LocalServices(state_dir))
            where = Addresses(local.address("analyzer"), local.address("extractor"), local.address("trainer"))
        clients = Clients(stack.enter_context(AnalyzerClient(where.analyzer, token=addresses.token)),
                          stack.enter_context(ExtractorClient(where.extractor, token=addresses.token)),
                          stack.enter_context(TrainerClient(where.trainer, token=addresses.token)))
        results = run_experiment(spec, folder, clients, say, tokenizer)
    report.write_tables(results, folder)
    path = report.build_report(results, folder)
    return RunOutcome(folder, path, report.summary_lines(results), results)
