"""What importing costs: the package does no work, Celery still finds the app, the app needs no worker
packages, and the worker's own process never imports torch (only executor processes touch torch and CUDA).

Each check runs in a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _modules_after(code: str) -> set[str]:
    """The modules loaded by a fresh interpreter that runs ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_package_builds_no_app_and_loads_neither_celery_nor_torch() -> None:
    # When a program imports hypha_celery
    loaded = _modules_after("import hypha_celery")
    # Then no Celery app was built and nothing heavy came with it
    assert "hypha_celery.celery" not in loaded
    assert not {"celery", "redis", "nacl", "torch", "numpy"} & loaded


def test_celery_finds_the_app_from_the_package_name() -> None:
    # When Celery resolves `-A hypha_celery` the way its CLI does
    out = subprocess.run(
        [sys.executable, "-c", "from celery.app.utils import find_app; app = find_app('hypha_celery'); "
                               "print(app.main, *app.conf.task_routes)"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )
    # Then it is hypha's app, with hypha's routing setting
    assert out.stdout.split() == ["hypha_celery", "hypha_celery.routing.route_by_requirements"]


def test_a_scheduler_building_the_app_loads_no_worker_packages() -> None:
    # When a scheduler imports the app and the client, and places a task (no Redis here: it falls back)
    loaded = _modules_after("import hypha_celery.celery, hypha_celery.client, hypha_celery.routing")
    # (redis-py 8 loads opentelemetry-sdk's metrics when it is installed, [otel], and that loads psutil: not ours)
    theirs = _modules_after("import redis, celery")
    # Then neither torch nor the worker's own packages were imported
    assert not {"torch", "numpy", "safetensors", "psutil", "prometheus_client", "pynvml", "boto3"} & (loaded - theirs)
    assert not any(name.startswith(("hypha_celery.executor", "hypha_celery.models", "hypha_celery.worker.bootsteps"))
                   for name in loaded)


def test_an_operators_celeryconfig_overrides_the_package_settings(tmp_path: Path) -> None:
    # Given a celeryconfig.py in the directory a worker or scheduler starts from
    (tmp_path / "celeryconfig.py").write_text("result_expires = 1234\n")
    # When the app is built there
    out = subprocess.run(
        [sys.executable, "-c", "from hypha_celery.celery import app; print(app.conf.result_expires, app.conf.task_acks_late)"],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # Then its value wins, and every other setting is still the package's
    assert out.stdout.split() == ["1234", "True"]


def test_the_worker_side_never_imports_torch() -> None:
    # Given a fresh interpreter, When it loads everything a worker's own process runs (tasks, stages,
    # bootsteps, manifests), Then torch is not imported: only executor processes touch torch/CUDA
    code = (
        "import sys, hypha_celery, hypha_celery.worker.bootsteps, hypha_celery.worker.control, hypha_celery.tasks.infer, "
        "hypha_celery.tasks.train, hypha_celery.tasks.noop\n"
        "from hypha_celery.formats.registry import read_manifest\n"
        "read_manifest({'format': 'hypha-model/1', 'id': 'm', 'architecture': 'mlp', 'input_shape': [4],"
        " 'files': {'weights.safetensors': {'sha256': '0' * 64, 'size': 1}}}, 'm')\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_the_worker_validates_a_transformers_manifest_without_torch_or_transformers() -> None:
    # Given a fresh interpreter, When it validates a version-2 transformers manifest and loads the format checks
    # (allow-list, safetensors header parser, directory scan) the worker's own process uses
    code = (
        "import sys\n"
        "from hypha_celery.formats.registry import read_manifest\n"
        "import hypha_celery.formats.huggingface, hypha_celery.formats.safetensors, hypha_celery.models.store\n"
        "entry = {'sha256': '0' * 64, 'size': 1}\n"
        "m = read_manifest({'format': 'hypha-model/2', 'id': 'm', 'runtime': 'transformers', 'model_type': 'llama',"
        " 'architecture': 'LlamaForCausalLM', 'task': 'text-generation', 'dtype': 'bfloat16',"
        " 'files': {'config.json': entry, 'model.safetensors': entry},"
        " 'memory': {'parameters': 1, 'weights_bytes': 2, 'kv_bytes_per_token': 2}}, 'm')\n"
        "print(m.runtime, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    # Then it is accepted, and neither torch nor transformers was imported
    assert out.stdout.split() == ["transformers", "False", "False"]
