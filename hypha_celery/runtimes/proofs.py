"""Checkable generations: a compact commitment to a generation's last hidden states, and its check.

The idea is TOPLOC's (Prime Intellect, arXiv 2501.16007); its ``toploc`` 0.1.6 wheel is a C++
extension built against an older torch and does not import beside torch 2.13, so the few
lines are here. Per chunk of ``chunk`` generated tokens, the last hidden states at the
positions that predicted them (the lm head's input) are read; each position's ``k // chunk``
entries of largest magnitude (TOPLOC takes the chunk's top ``k`` wherever they fall; per position,
one altered token cannot hide among 31 honest ones) are points ``(flat index mod m, bf16 bits of
the value)`` with ``m`` the largest modulus below ``PRIME`` that keeps the indices apart; the
commitment is ``m`` and the ``k`` coefficients of the polynomial over GF(``PRIME``) through those
points: ``2 + 2k`` bytes (258 for ``k = 128``), whatever the hidden size.

A verifier recomputes the hidden states with one prefill over prompt and generated tokens,
takes its own top values per position, evaluates the polynomial at those indices and compares
what the prover claimed with what it computed. An index the prover did not commit yields a
pseudo-random 16-bit pattern there, so a swapped model, an altered prompt or other tokens
agree at almost no index; the same model with other numerics (batch size, device, bf16 vs
float32) agrees at most indices within a few percent. :data:`THRESHOLDS` is where the line is.

Pure numpy and torch: nothing here knows of Celery, the worker or the executor.
numpy and torch are imported by the functions that need them, so the worker can parse
a proof (:meth:`Proof.from_json`) without them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["CHUNK", "PRIME", "THRESHOLDS", "TOP_K", "Check", "Proof", "ProofFormatError", "Thresholds",
           "check", "commit", "evaluate", "interpolate"]

PRIME = 65521  # the largest prime below 2**16: coefficients fit two bytes, every finite bf16 pattern is below it
CHUNK = 32  # generated tokens per commitment
TOP_K = 128  # committed entries per chunk
VERSION = 1
MAX_TOKENS = 1 << 16  # a proof for more generated tokens than this is refused unread


class ProofFormatError(ValueError):
    """A proof that is not one: wrong fields, types or sizes."""


@dataclass(frozen=True)
class Thresholds:
    """When a chunk agrees: at least ``min_match`` of the verifier's top-k indices (and ``min_position_match``
    of every position's) carry a claimed value of the same sign within ``rel_tol`` (relative), and those
    agreeing values err by at most ``max_mean_err`` on average."""

    rel_tol: float = 0.05
    min_match: float = 0.75
    min_position_match: float = 0.5
    max_mean_err: float = 0.006


# Calibrated on the tiny Llama's corpus (tests/unit/test_proofs.py; the README's "Checkable generations"):
# honest replays (batch sizes 1-8; a bf16 prover, a float32 verifier) agree at >= 97% of a chunk's values and
# >= 3 of 4 of every position's, erring by 0.15-0.37% on average (bf16 rounding alone is 0.2-0.4%). A swapped
# model agrees at ~0%; one altered token leaves its position at 0-1 of 4; an altered prompt or float8-rounded
# weights still agree at 56-95% there (the toy's hidden state is mostly the token's embedding) but err by
# 1.3-3%. The bounds sit between: 0.6% is 1.6x the worst honest error and half the best dishonest one.
THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class Check:
    """A verifier's answer: ``stats`` has the worst chunk's match fraction and mean relative error."""

    accepted: bool
    reason: str
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "reason": self.reason, "stats": self.stats}


@dataclass(frozen=True)
class Proof:
    """What a generation carries: its token ids and one commitment per chunk of them.

    ``model`` and ``manifest_sha256`` name the weights the prover claims; ``dtype`` is the
    prover's compute dtype (informative: the check does not depend on it).
    """

    tokens: list[int]
    commitments: bytes
    k: int = TOP_K
    chunk: int = CHUNK
    dtype: str = "float32"
    model: str | None = None
    manifest_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "model": self.model, "manifest_sha256": self.manifest_sha256,
                "dtype": self.dtype, "k": self.k, "chunk": self.chunk, "tokens": list(self.tokens),
                "commitments": base64.b64encode(self.commitments).decode()}

    @classmethod
    def from_json(cls, data: Any) -> Proof:
        """Parse and check the fields' types and sizes; :class:`ProofFormatError` names what is wrong."""
        if not isinstance(data, dict):
            raise ProofFormatError("a proof is a JSON object")
        if data.get("version") != VERSION:
            raise ProofFormatError(f"proof version {data.get('version')!r} is not {VERSION}")
        tokens, k, chunk = data.get("tokens"), data.get("k"), data.get("chunk")
        if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_TOKENS or not all(
                type(t) is int and t >= 0 for t in tokens):
            raise ProofFormatError(f"proof.tokens must be 1 to {MAX_TOKENS} token ids (non-negative integers)")
        if not (type(k) is int and 1 <= k <= 4096):
            raise ProofFormatError("proof.k must be an integer from 1 to 4096")
        if not (type(chunk) is int and 1 <= chunk <= k):
            raise ProofFormatError("proof.chunk must be an integer from 1 to k (each position commits k // chunk)")
        for name in ("model", "manifest_sha256", "dtype"):
            if data.get(name) is not None and not isinstance(data.get(name), str):
                raise ProofFormatError(f"proof.{name} must be a string")
        encoded = data.get("commitments")
        if not isinstance(encoded, str) or len(encoded) > 4 * MAX_TOKENS * 4096:
            raise ProofFormatError("proof.commitments must be a base64 string")
        try:
            commitments = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ProofFormatError("proof.commitments is not valid base64") from None
        chunks = -(-len(tokens) // chunk)
        if len(commitments) % 2 or not chunks * 2 < len(commitments) <= chunks * (2 + 2 * k):
            raise ProofFormatError(f"proof.commitments holds {len(commitments)} bytes: not {chunks} commitment(s)")
        return cls(tokens=list(tokens), commitments=commitments, k=k, chunk=chunk,
                   dtype=data.get("dtype") or "float32", model=data.get("model"),
                   manifest_sha256=data.get("manifest_sha256"))


# --- polynomials over GF(PRIME) ----------------------------------------------------------------------


def _inverse(values: np.ndarray) -> np.ndarray:
    """Elementwise inverse mod PRIME (Fermat: a**(p-2)); values must be non-zero."""
    import numpy as np

    result = np.ones_like(values)
    base = values % PRIME
    exponent = PRIME - 2
    while exponent:
        if exponent & 1:
            result = result * base % PRIME
        base = base * base % PRIME
        exponent >>= 1
    return result


def interpolate(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The coefficients (lowest degree first) of the polynomial through distinct ``xs`` with values ``ys``."""
    import numpy as np

    xs = xs.astype(np.int64) % PRIME
    newton = ys.astype(np.int64) % PRIME
    count = len(xs)
    for j in range(1, count):  # divided differences, in place from the top
        newton[j:] = (newton[j:] - newton[j - 1:-1]) % PRIME * _inverse((xs[j:] - xs[:-j]) % PRIME) % PRIME
    coefficients = np.array([newton[-1]], dtype=np.int64)
    for j in range(count - 2, -1, -1):  # Newton form to monomials: p = p * (X - x_j) + c_j
        shifted = np.zeros(len(coefficients) + 1, dtype=np.int64)
        shifted[1:] = coefficients
        shifted[:-1] = (shifted[:-1] - xs[j] * coefficients) % PRIME
        shifted[0] = (shifted[0] + newton[j]) % PRIME
        coefficients = shifted
    return coefficients


def evaluate(coefficients: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The polynomial's values at ``xs`` (Horner)."""
    import numpy as np

    xs = xs.astype(np.int64) % PRIME
    values = np.zeros_like(xs)
    for coefficient in coefficients[::-1].astype(np.int64):
        values = (values * xs + coefficient) % PRIME
    return values


def _modulus(indices: np.ndarray) -> int:
    """The largest modulus below PRIME under which ``indices`` stay distinct (TOPLOC's injective modulus)."""
    import numpy as np

    for modulus in range(PRIME - 1, len(indices) - 1, -1):
        if len(np.unique(indices % modulus)) == len(indices):
            return modulus
    raise ValueError("no injective modulus")  # unreachable: the top-k indices are distinct


# --- commit and check -------------------------------------------------------------------------------


def _bf16_bits(values: torch.Tensor) -> np.ndarray:
    import numpy as np
    import torch

    bits = values.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().astype(np.int64)
    return bits & 0xFFFF


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def _chunks(hidden: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """``hidden`` [tokens, H] as runs of ``chunk`` positions."""
    return [hidden[start:start + chunk] for start in range(0, hidden.shape[0], chunk)]


def _top(states: torch.Tensor, per: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's ``per`` entries of largest magnitude: their flat indices in the chunk, and their values."""
    import torch

    top = states.abs().topk(per, dim=1).indices
    flat = (top + torch.arange(states.shape[0], device=states.device).unsqueeze(1) * states.shape[1]).reshape(-1)
    return flat, states.reshape(-1)[flat]


def _per_position(k: int, chunk: int, hidden: int) -> int:
    """Values each position commits: ``k // chunk`` (``k >= chunk``: a proof names at least one per position)."""
    return max(1, min(k // chunk, hidden))


def commit(hidden: torch.Tensor, *, k: int = TOP_K, chunk: int = CHUNK) -> bytes:
    """The commitments to ``hidden`` [generated tokens, hidden size]: per chunk, modulus then coefficients (uint16 BE).

    Each position of a chunk commits its own ``k // chunk`` largest entries (not the chunk's ``k`` largest
    wherever they fall): one altered token changes few positions, and each position must answer for itself.
    """
    import numpy as np
    import torch

    per = _per_position(k, chunk, hidden.shape[1])
    out = bytearray()
    for states in _chunks(torch.nan_to_num(hidden.detach()), chunk):
        flat, values = _top(states, per)
        indices = flat.cpu().numpy().astype(np.int64)
        modulus = _modulus(indices)
        coefficients = interpolate(indices % modulus, _bf16_bits(values))
        out += np.array([modulus, *coefficients], dtype=">u2").tobytes()
    return bytes(out)


def check(hidden: torch.Tensor, commitments: bytes, *, k: int = TOP_K, chunk: int = CHUNK,
          thresholds: Thresholds = THRESHOLDS) -> Check:
    """Compare the verifier's own ``hidden`` [generated tokens, hidden size] with ``commitments``."""
    import numpy as np
    import torch

    words = np.frombuffer(commitments, dtype=">u2").astype(np.int64)
    per = _per_position(k, chunk, hidden.shape[1])
    runs = _chunks(hidden.detach().float().cpu(), chunk)
    sizes = [states.shape[0] * per for states in runs]
    if len(words) != sum(1 + size for size in sizes):
        return Check(False, f"the proof holds {len(commitments)} bytes, not the commitments of {len(runs)} "
                            f"chunk(s) of {chunk} tokens with k={k}", {"chunks": len(runs)})
    matches: list[float] = []
    errors: list[float] = []
    worst_position = 1.0
    offset = 0
    for states, size in zip(runs, sizes, strict=True):
        modulus, coefficients = int(words[offset]), words[offset + 1:offset + 1 + size]
        offset += 1 + size
        flat, values = _top(states, per)
        mine = values.numpy()
        if modulus < size:
            matches.append(0.0)
            errors.append(float("inf"))
            worst_position = 0.0
            continue
        claimed = _from_bf16_bits(evaluate(coefficients, flat.numpy().astype(np.int64) % modulus))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            relative = np.abs(claimed - mine) / np.maximum(np.abs(mine), torch.finfo(torch.float32).tiny)
        agree = np.isfinite(relative) & (relative <= thresholds.rel_tol) & (np.sign(claimed) == np.sign(mine))
        matches.append(float(agree.mean()))
        errors.append(float(relative[agree].mean()) if agree.any() else float("inf"))
        worst_position = min(worst_position, float(agree.reshape(-1, per).mean(axis=1).min()))
    worst = int(np.argmin(matches))
    stats = {"chunks": len(runs), "min_match": matches[worst], "mean_match": float(np.mean(matches)),
             "max_mean_err": max(errors), "min_position_match": worst_position, "worst_chunk": worst}
    if matches[worst] < thresholds.min_match:
        return Check(False, f"chunk {worst}: {matches[worst]:.0%} of the committed hidden values agree "
                            f"(at least {thresholds.min_match:.0%} needed)", stats)
    if worst_position < thresholds.min_position_match:
        return Check(False, f"a position agrees at {worst_position:.0%} of its committed values "
                            f"(at least {thresholds.min_position_match:.0%} needed)", stats)
    if max(errors) > thresholds.max_mean_err:
        return Check(False, f"the agreeing values err by {max(errors):.2%} on average in a chunk "
                            f"(at most {thresholds.max_mean_err:.2%} allowed)", stats)
    return Check(True, "every chunk agrees", stats)
