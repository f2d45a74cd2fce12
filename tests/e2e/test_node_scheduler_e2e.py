"""A scheduler in another language: the Node.js example signs, a real verifying worker runs its task.

``examples/node-scheduler`` canonicalizes with ``canonicalize`` (RFC 8785), signs with ``tweetnacl``
and sends with ``celery-node``; none of it shares code with this package, so a task it signs that
runs here (and one it tampers with that is refused) shows the spec in ``docs/envelope.md`` is enough.
The same holds the other way: Node checks the worker's signature over the result (``--verify``).

Needs ``node`` and the example's ``node_modules`` (``make install`` runs ``npm ci`` when npm is
present): without them these tests skip with the reason locally, and fail in CI (``CI=true``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import redis

from hypha_celery.client import submit
from hypha_celery.registry import list_workers
from hypha_celery.security import generate_key, peer_id, verify_result
from tests.conftest import IN_CI, ROOT

EXAMPLE = ROOT / "examples" / "node-scheduler"
VECTORS = ROOT / "docs" / "envelope-vectors"
IRIS = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` binary, once the example's dependencies are installed."""
    found = shutil.which("node")
    if found is None:
        reason = "node is not on PATH: the Node.js scheduler example cannot run (install Node.js >= 18)"
    elif not (EXAMPLE / "node_modules").is_dir():
        reason = f"{EXAMPLE.relative_to(ROOT)}/node_modules is missing: run `npm ci` there (make install does)"
    else:
        return found
    if IN_CI:
        pytest.fail(reason)
    print(f"skipped: {reason}")
    pytest.skip(reason)


def run_node(node: str, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, script, *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=timeout)


def test_node_reproduces_every_vector(node: str, tmp_path: Path) -> None:
    # Given the committed vectors, When the Node implementation checks them, Then every one agrees
    done = run_node(node, "verify-vectors.js", str(VECTORS))
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(list(VECTORS.glob("*.json")))
    assert f"{count} of {count} vectors agree" in done.stdout
    # ... and a vector whose float was printed the Python way in its canonical bytes is caught
    shutil.copytree(VECTORS, tmp_path / "vectors")
    floats = tmp_path / "vectors" / "02-floats.json"
    vec = json.loads(floats.read_text())
    vec["body_canonical"] = vec["body_canonical"].replace("1e-7", "1e-07")
    floats.write_text(json.dumps(vec))
    broken = run_node(node, "verify-vectors.js", str(tmp_path / "vectors"))
    assert broken.returncode == 1 and "FAIL 02-floats: body canonical text" in broken.stderr


def test_a_node_signed_infer_runs_and_a_tampered_one_is_refused(
    node: str, start_worker: Callable[..., Any], celery_client: Callable[..., Any], redis_url: str,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    # Given a scheduler key (the Python key file format) and a worker that only accepts that key
    key_file = tmp_path / "scheduler.key"
    key = generate_key(key_file)
    shown = run_node(node, "scheduler.js", "--key", str(key_file), "--print-key-id")
    assert shown.returncode == 0 and shown.stdout.strip() == peer_id(key.verify_key), shown.stderr
    start_worker({"security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]}})

    # When the Node scheduler sends a signed hypha.infer on the built-in mlp, and checks the worker's signature
    sent = run_node(node, "scheduler.js", "--key", str(key_file), "--broker", redis_url, "--timeout", "90", "--verify")
    # Then the worker verified and ran it, and Node read the result from the result backend, signed by that worker
    assert sent.returncode == 0, sent.stdout + sent.stderr
    done = json.loads(sent.stdout.strip().splitlines()[-1])
    assert done["status"] == "SUCCESS" and done["result"]["model"] == "mlp"
    [record] = list_workers(redis_client)
    assert done["signer"] == record["peer_id"] == verify_result(done["result"], done["task_id"])
    assert len(done["result"]["output"]) == 1
    # ... with the output a Python scheduler gets for the same inputs
    python = submit("hypha.infer", model="mlp", inputs=IRIS, signing_key=key, app=celery_client(), queue="hypha")
    assert done["result"]["output"] == python.get(timeout=60)["output"]

    # When the inputs are changed after signing, Then the worker refuses the message with InvalidSignature
    tampered = run_node(node, "scheduler.js", "--key", str(key_file), "--broker", redis_url, "--tamper", "--timeout", "90")
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    refused = json.loads(tampered.stdout.strip().splitlines()[-1])
    assert refused["status"] == "FAILURE" and refused["result"]["exc_type"] == "InvalidSignature"
    assert "arguments differ from the signed ones" in str(refused["result"]["exc_message"])

    # When Node accepts answers only from another worker, Then it refuses this worker's answer, naming why
    stranger = peer_id(nacl.signing.SigningKey.generate().verify_key)
    elsewhere = run_node(node, "scheduler.js", "--key", str(key_file), "--broker", redis_url, "--timeout", "90",
                         "--allow-worker", stranger)
    assert elsewhere.returncode == 1, elsewhere.stdout + elsewhere.stderr
    other = json.loads(elsewhere.stdout.strip().splitlines()[-1])
    assert other["status"] == "INVALID_SIGNATURE" and "not among the allowed workers" in other["error"]


def test_a_node_scheduler_streams_a_generation_from_its_token_stream(
    node: str, start_worker: Callable[..., Any], tmp_path: Path, redis_url: str,
) -> None:
    # Given a worker that accepts a Node scheduler's key
    key_file = tmp_path / "scheduler.key"
    key = generate_key(key_file)
    start_worker({"security": {"verify_task_signatures": True, "allowed_schedulers": [peer_id(key.verify_key)]}})
    # When Node sends a signed hypha.generate and reads its token stream with XREAD BLOCK
    sent = run_node(node, "scheduler.js", "--key", str(key_file), "--broker", redis_url, "--timeout", "120",
                    "--model", "tiny-llama", "--prompt", "The cat sat on", "--max-new-tokens", "16")
    # Then the pieces it printed as they came join into the result's text
    assert sent.returncode == 0, sent.stdout + sent.stderr
    done = json.loads(sent.stdout.strip().splitlines()[-1])
    assert done["status"] == "SUCCESS" and done["streamed"] == done["result"]["output"]["text"] != ""
    assert sent.stderr.startswith(done["streamed"])
