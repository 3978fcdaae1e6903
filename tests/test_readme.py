"""README examples are executed, so that they cannot rot; every setting is documented."""

from __future__ import annotations

import re

from conftest import ROOT, ServiceProcess, extractor_env
from services.analyzer.settings import AnalyzerSettings
from services.common import ServiceSettings, settings_env_table

README = (ROOT / "README.md").read_text()


def snippet(name: str) -> str:
    block = re.search(rf"<!-- START {name}.*?-->\s*```python\n(.*?)```\s*<!-- END {name} -->", README, re.S)
    assert block, f"README has no {name} block"
    return block.group(1)


def test_client_example_runs(analyzer_process: ServiceProcess, capsys) -> None:
    exec(compile(snippet("client-example"), "README.md:client-example", "exec"), {"ADDRESS": analyzer_process.address})
    out = capsys.readouterr().out
    assert "tuned" in out and "tuned - base:" in out


def test_extractor_example_runs(tmp_path, tiny_model_path, tiny_adapters, capsys) -> None:
    svc = ServiceProcess("extractor", tmp_path, extractor_env(tiny_model_path))
    try:
        exec(compile(snippet("extractor-example"), "README.md:extractor-example", "exec"),
             {"EXTRACTOR": svc.address, "MODEL": "tiny"})
    finally:
        svc.stop()
    out = capsys.readouterr().out
    assert "lemon gustatory" in out and f"layer {2}" in out
    assert all(f"{a} " in out for a in tiny_adapters)


def test_every_setting_is_documented() -> None:
    from services.extractor.settings import ExtractorSettings
    from services.trainer.settings import TrainerSettings

    for env, _, _ in settings_env_table(AnalyzerSettings):
        assert f"`{env}`" in README, f"{env} is missing from the README settings table"
    common = {name.upper() for name in ServiceSettings.model_fields}
    for cls, prefix in ((ExtractorSettings, "SENSORIUM_EXTRACTOR_"), (TrainerSettings, "SENSORIUM_TRAINER_")):
        for env, _, _ in settings_env_table(cls):
            documented = f"`{env}`" in README or env.removeprefix(prefix) in common
            assert documented, f"{env} is missing from the README"
    assert make_commands_first()


def make_commands_first() -> bool:
    head = README[:800]
    return "make demo" in head and "make test" in head


def test_reliability_figures_cover_every_rpc_of_a_full_run() -> None:
    """README's Reliability figures come from a run of the suites at full size, not a shortened one."""
    import sys

    from sensorium.v1 import analyzer_pb2, extractor_pb2, trainer_pb2

    sys.path.insert(0, str(ROOT / "bench"))
    import reliability_readme

    text = (ROOT / "README.md").read_text()
    block = text.split(reliability_readme.BEGIN, 1)[1].split(reliability_readme.END, 1)[0]
    rpcs = [f"{svc}.{m.name}" for svc, mod in (("extractor", extractor_pb2), ("analyzer", analyzer_pb2),
                                                ("trainer", trainer_pb2))
            for m in mod.DESCRIPTOR.services_by_name[svc.capitalize()].methods]
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (\w+\.\w+) \| ([\d,]+) \| ([\d,]+) \| [\d,]+ \| [^|]+ \| (\d+) \|$", block, re.M)}
    assert sorted(rows) == sorted(rpcs)
    for rpc, (requests, valid, internal) in rows.items():
        n, v = int(requests.replace(",", "")), int(valid.replace(",", ""))
        assert n >= 500 and v >= 0.2 * n and internal == "0", rpc
    loads = re.findall(r"^\| (extractor|analyzer) \| (\d+) x (\d+) \| (\d+) \|", block, re.M)
    assert sorted(name for name, *_ in loads) == ["analyzer", "extractor"]
    assert all(int(c) >= 16 and int(r) >= 50 and failed == "0" for _, c, r, failed in loads)
    assert "Faults survived" in block and "Security" in block and "Queue depth" in block
