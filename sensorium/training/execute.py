"""A fine-tuning job from spec to published adapter: resolve names, build the data, train, publish.

Clients name models, norms and item sets; they never send paths. ``DataCatalog`` is where the
names a trainer offers are resolved, and ``TrainingJobs`` is the ``Execute`` its job runner
calls. Publishing is the last step and happens once: a job that died after publishing finds
its adapter (the manifest names the job) and finishes without training again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensorium.errors import FailedPrecondition, NotFound
from sensorium.models.adapters import AdapterStore
from sensorium.models.store import ModelRegistry
from sensorium.storage import library_versions
from sensorium.training.jobs import Job
from sensorium.training.spec import TrainingSpec

logger = logging.getLogger(__name__)

PERCEPTUALQA = "perceptualqa"
# The loop's own start and end are steps inside a job's life, named apart from the job's.
LOOP_KINDS = {"started": "training", "finished": "trained"}
# recorded in each adapter's manifest: what produced it
TRAINING_LIBRARIES = ("sensorium", "torch", "transformers", "peft", "safetensors", "numpy")


class DataCatalog:
    """Norms datasets and multiple-choice item sets a trainer offers, by name.

    Norms are the built-in ones, those configured by declaration, and, when ``norms_root`` names
    the folder holding their files, every registered dataset (``sensorium.norms.registry``).
    """

    def __init__(self, norms: Mapping[str, str] | None = None, paper_dir: Path | None = None,
                 choice_items: Mapping[str, tuple[Path, Path]] | None = None,
                 prompt_sets: Mapping[str, Path] | None = None, norms_root: Path | None = None) -> None:
        from sensorium.prompts.sets import PromptSets

        self._norms = dict(norms or {})
        self.norms_root = norms_root
        self.prompts = PromptSets(prompt_sets)
        self.paper_dir = paper_dir
        self._items = dict(choice_items or {})
        if paper_dir is not None and PERCEPTUALQA not in self._items:
            folder = Path(paper_dir) / "perceptualqa"
            self._items[PERCEPTUALQA] = (folder / "train_60.json", folder / "test_40.json")
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def norms_names(self) -> list[str]:
        from sensorium.norms.builtin import BUILTIN
        from sensorium.norms.registry import registered

        return sorted({*BUILTIN, *self._norms, *(registered() if self.norms_root is not None else ())})

    def norms(self, name: str):
        """Loaded once per name: a dataset of 40,000 words takes a fraction of a second, not nothing."""
        from sensorium.norms import load_norms
        from sensorium.norms.builtin import BUILTIN
        from sensorium.norms.registry import registered

        key = name.strip().casefold()
        with self._lock:
            if key not in self._loaded:
                if name in self._norms:
                    self._loaded[key] = load_norms(Path(self._norms[name]))
                elif key in BUILTIN or (self.norms_root is not None and key in registered()):
                    self._loaded[key] = load_norms(key, root=self.norms_root)
                elif key in registered():
                    raise FailedPrecondition(f"norms {name!r} are registered, but this trainer has no norms_root "
                                             "(the folder holding the norms files) to read them from")
                else:
                    raise NotFound(f"unknown norms {name!r}; known: {', '.join(self.norms_names())}")
            return self._loaded[key]

    def choice_items(self, name: str):
        from sensorium.training.data import load_choice_items

        if name not in self._items:
            raise NotFound(f"unknown multiple-choice items {name!r}; known: {', '.join(sorted(self._items)) or 'none'}")
        train, test = self._items[name]
        return load_choice_items(train), load_choice_items(test)


@dataclass(frozen=True)
class Plan:
    """What a spec resolves to, reported before anything runs."""

    train_examples: int
    validation_examples: int
    test_examples: int
    split_digest: str
    total_steps: int


def total_steps(spec: TrainingSpec, n_train: int) -> int:
    """Optimizer steps: ``max_steps``, else epochs over batches of the effective batch size."""
    if spec.optim.max_steps is not None:
        return spec.optim.max_steps
    return max(1, math.ceil(spec.optim.epochs * math.ceil(n_train / spec.optim.batch_size)))


class TrainingJobs:
    """The trainer's ``Execute``: one job from its spec to an adapter in the store."""

    def __init__(self, registry: ModelRegistry, adapters: AdapterStore, workdir: Path, catalog: DataCatalog,
                 device: str = "auto") -> None:
        self.registry = registry
        self.adapters = adapters
        self.workdir = Path(workdir)
        self.catalog = catalog
        self.device = device

    def data(self, spec: TrainingSpec):
        from sensorium.training.data import build_training_data

        self.registry.spec(spec.base_model)  # NotFound before any data is read
        return build_training_data(spec, norms=self.catalog.norms, choice_items=self.catalog.choice_items,
                                   paper_dir=self.catalog.paper_dir, prompts=self.catalog.prompts)

    def plan(self, spec: TrainingSpec) -> Plan:
        data = self.data(spec)
        return Plan(len(data.train), len(data.validation), len(data.test), data.split.digest,
                    total_steps(spec, len(data.train)))

    def execute(self, job: Job, record: Callable[[str, dict[str, Any]], None],
                should_stop: Callable[[], bool]) -> dict[str, float] | None:
        from sensorium.training.loop import train

        spec = TrainingSpec.model_validate_json(job.spec_json)
        published = self._already_published(job)
        if published is not None:
            return published
        model_spec = self.registry.spec(spec.base_model)
        model_dir = self.registry.store.materialise(model_spec)
        base_digest = self.registry.store.digest(model_dir)
        data = self.data(spec)
        workdir = self.workdir / job.id

        def on_event(event: Any) -> None:
            fields = {k: getattr(event, k) for k in ("step", "total_steps", "epoch", "loss", "learning_rate",
                                                      "metrics", "eta_seconds", "tokens_per_second")
                      if getattr(event, k, None) is not None}
            if getattr(event, "message", ""):
                fields["message"] = event.message
            if event.kind == "started" and event.step:
                fields["resumed_from_step"] = event.step
            record(LOOP_KINDS.get(event.kind, event.kind), fields)

        result = train(spec, model_dir, data, workdir, on_event=on_event, should_stop=should_stop,
                       device=self.device)
        if getattr(result, "stopped", False):
            return None
        metrics = {k: float(v) for k, v in result.metrics.items() if v is not None and math.isfinite(float(v))}
        training = {
            "job": job.id, "spec": json.loads(job.spec_json), "spec_digest": job.spec_digest,
            "task": spec.task, "objective": spec.objective, "language": data.language,
            "dimensions": list(data.dimensions), "split": {"name": data.split.name, "seed": data.split.seed,
                                                         "digest": data.split.digest,
                                                         "words": {"train": len(data.split.train),
                                                                   "validation": len(data.split.validation),
                                                                   "test": len(data.split.test)}},
            "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
            "steps": result.steps, "seconds": round(result.seconds, 3), "metrics": metrics,
            "libraries": library_versions(TRAINING_LIBRARIES),
        }
        split = json.dumps(data.split.to_json(), sort_keys=True).encode()
        manifest = self.adapters.publish(job.adapter_id, Path(result.adapter_dir), base_model=spec.base_model,
                                         base_digest=base_digest, training=training,
                                         extra_files={"split.json": split})
        record("published", {"message": f"adapter {manifest.id} ({manifest.digest[:12]})", "metrics": metrics})
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        return metrics

    def _already_published(self, job: Job) -> dict[str, float] | None:
        try:
            manifest = self.adapters.manifest(job.adapter_id)
        except NotFound:
            return None
        if manifest.training.get("job") != job.id:
            raise FailedPrecondition(f"adapter id {job.adapter_id!r} was taken by another run meanwhile")
        return {k: float(v) for k, v in manifest.training.get("metrics", {}).items()}
