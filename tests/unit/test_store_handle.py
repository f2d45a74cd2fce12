"""The store's handle: a model is opened once (manifest, folder, digest) and handed down; only the store spells
paths inside an entry, and every new entry goes through one transaction (lock, "already exists", staging, install)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import torch

from hypha_celery.errors import InvalidTask, UnsupportedModel
from hypha_celery.formats.builtin import build
from hypha_celery.manifest import MODEL_MANIFEST, WEIGHTS
from hypha_celery.models.store import ModelStore

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hypha_celery"
# Where an entry's insides may be spelled: the store, and the formats writing into a transaction's folder.
ALLOWED = {PACKAGE / "models" / "store.py", *(PACKAGE / "formats").glob("*.py")}


def _receiver(node: ast.expr) -> str:
    return ast.unparse(node).rsplit("(", 1)[0] if isinstance(node, ast.Call) else ast.unparse(node)


def _builds_entry_path(node: ast.AST) -> str | None:
    """Code spelling a path inside a store entry: ``store.path(id) / NAME``, ``entry.folder / NAME``,
    ``store.root / ...``, or ``store.path(id)`` handed to a call (``shutil.rmtree(store.path(id))``)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        left = node.left
        if isinstance(left, ast.Call) and _receiver(left).endswith("store.path"):
            return ast.unparse(node)
        if isinstance(left, ast.Attribute) and (left.attr == "folder" or _receiver(left).endswith("store.root")):
            return ast.unparse(node)
    if isinstance(node, ast.Call):
        for argument in node.args:
            if isinstance(argument, ast.Call) and _receiver(argument).endswith("store.path"):
                return ast.unparse(node)
    return None


def test_no_code_outside_the_store_builds_paths_inside_an_entry() -> None:
    # Given every module but the store and the formats (which fill a transaction's folder)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ALLOWED or "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            spelled = _builds_entry_path(node)
            if spelled is not None:
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {spelled}")
    # Then none reaches into an entry: they take an Entry from store.open and ask it for its files
    assert found == []


def test_the_check_above_can_fail() -> None:
    # Given the patterns the rule forbids, as code elsewhere would spell them
    spelled = ["store.path(model) / 'config.json'", "ctx.store.root / '.checkpoints'", "entry.folder / name",
               "shutil.rmtree(store.path(name))"]
    # Then each is caught, and what the handle offers is not
    assert all(_builds_entry_path(ast.parse(code, mode="eval").body) for code in spelled)
    assert _builds_entry_path(ast.parse("entry.file('config.json')", mode="eval").body) is None


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    torch.manual_seed(0)
    store.add("builtin", build("mlp", {"in_features": 4, "hidden": 8, "out_features": 3}), "mlp", architecture="mlp",
              config={"in_features": 4, "hidden": 8, "out_features": 3}, input_shape=[4])
    return store


def test_open_hands_over_the_manifest_its_folder_and_the_digest_of_the_bytes_it_read(store: ModelStore) -> None:
    # When the model is opened
    entry = store.open("mlp")
    # Then the digest is the stored manifest's, the same a scheduler pins by, and files come from the handle
    assert entry.sha256 == hashlib.sha256((store.path("mlp") / MODEL_MANIFEST).read_bytes()).hexdigest()
    assert entry.sha256 == store.manifest_sha256("mlp") and entry.manifest == store.manifest("mlp")
    assert entry.file(WEIGHTS) == entry.files()[WEIGHTS] and entry.file(WEIGHTS).is_file()
    # And a file the manifest does not list is refused, not spelled
    with pytest.raises(UnsupportedModel, match=r"has no config\.json"):
        entry.file("config.json")


def test_open_verifies_the_files(store: ModelStore) -> None:
    # Given a weights file altered in place (same size)
    weights = store.path("mlp") / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    # Then opening refuses it
    with pytest.raises(UnsupportedModel, match="does not match the manifest"):
        store.open("mlp")


def test_one_already_exists_check_for_models_and_data_sets(store: ModelStore) -> None:
    # Given a model "mlp" and a data set "rows"
    store.save_dataset("rows", [[1.0, 2.0, 3.0, 4.0]], [0])
    # Then a new entry of either id is refused by the transaction, whatever would fill it
    for taken in ("mlp", "rows"):
        with pytest.raises(UnsupportedModel, match="already exists"), store.transaction(taken):
            pass
        with pytest.raises(UnsupportedModel, match="already exists"):
            store.save_texts(taken, ["a text"])
    # And validation asks the same question, with its own error type and the argument's name
    with pytest.raises(InvalidTask, match="new_model 'rows' already exists"):
        store.refuse_taken("rows", InvalidTask, "new_model ")
    assert store.taken("rows") and not store.has("rows") and store.has("rows", dataset=True)


def test_a_transaction_left_without_install_leaves_nothing(store: ModelStore) -> None:
    # When a transaction writes into its folder and ends without installing
    with store.transaction("half") as new:
        (new.folder / "x.bin").write_bytes(b"x")
        staged = new.folder
    # Then its folder is gone and the id is still free
    assert not staged.exists() and not store.taken("half")
