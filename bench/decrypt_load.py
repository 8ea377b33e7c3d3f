"""Benchmark: loading an encrypted model (read, verify, decrypt in memory, load) vs the same model in the clear.

What the agent does at every load of a model from its store (install, restart, rollback), timed
both ways on the same model file in the same run, in alternating rounds:

- raw: read ``model.tflite``, check its sha256 against the manifest, load it;
- encrypted: read ``model.tflite.enc``, check its sha256, unwrap the content key (X25519 + HKDF),
  decrypt every 256 KiB chunk (ChaCha20-Poly1305), check the plaintext's sha256, load it.

"Load" is measured at two levels: a raw ``Interpreter(model_content=...)`` + ``allocate_tensors``
(the smallest load there is, so the ratio is the worst case), and the agent's own
``agent.engine.load_model`` (XNNPACK on the x86-cpu profile, 2 threads) + smoke test. Files are
read from the page cache (each is read once before timing), as on a device that just wrote them.

    .venv/bin/python -m bench.decrypt_load [--quick] [--json]
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import FULL, SMALL, THREADS, Report, fmt_ratio, log, mobilenet, parse_args, ratio, summary

# The encrypted read path (read, verify, decrypt) must move at least this much: a 14 MB model then
# costs under 140 ms per load. Loads happen at install, start and rollback, never per inference.
MIN_DECRYPT_MB_S = 100.0


def prepare(model: bytes, directory: Path) -> dict[str, Any]:
    """The model in the clear and encrypted (chunk size 256 KiB), as the agent's store holds them."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.protocol import encryption, keys
    from agent.protocol.manifest import DEFAULT_CHUNK_SIZE, Manifest
    from tests.support.bundles import manifest_for
    device_key = X25519PrivateKey.generate()
    plain_doc = manifest_for(model, chunk_size=DEFAULT_CHUNK_SIZE)
    sealed_doc, ciphertext = encryption.encrypt(plain_doc, model, [keys.Recipient("device", device_key.public_key())])
    plain_path, sealed_path = directory / "model.tflite", directory / "model.tflite.enc"
    plain_path.write_bytes(model)
    sealed_path.write_bytes(ciphertext)
    for path in (plain_path, sealed_path):
        path.read_bytes()  # into the page cache
    return {"plain": (plain_path, Manifest.from_dict(plain_doc)), "sealed": (sealed_path, Manifest.from_dict(sealed_doc)),
            "key": device_key}


def readers(case: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
    """The bytes handed to the interpreter, the agent's way: raw, and decrypted in memory."""
    from agent.protocol import encryption
    plain_path, plain_manifest = case["plain"]
    sealed_path, sealed_manifest = case["sealed"]
    key = case["key"]

    def raw() -> bytes:
        data = plain_path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == plain_manifest.sha256
        return data

    def decrypted() -> bytes:
        data = sealed_path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sealed_manifest.sha256
        return encryption.decrypt_with(sealed_manifest, data, encryption.unwrap(sealed_manifest, key))

    return {"raw": raw, "encrypted": decrypted}


def interpreter_loader() -> Callable[[bytes], Any]:
    from ai_edge_litert.interpreter import Interpreter

    def load(model: bytes) -> Any:
        interp = Interpreter(model_content=model, num_threads=THREADS)
        interp.allocate_tensors()
        return interp
    return load


def agent_loader(manifest: Any) -> Callable[[bytes], Any]:
    from agent.engine import load_model, smoke_test
    from agent.protocol.profiles import load_profile
    profile = load_profile("x86-cpu")

    def load(model: bytes) -> Any:
        loaded = load_model(model, manifest, profile)
        smoke_test(loaded)
        loaded.close()
        return loaded
    return load


def alternate(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds per call, the calls alternating in rotating order so machine drift hits each alike."""
    import time
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for name in names:   # warm-up
        calls[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return samples


def measure(label: str, model: bytes, rounds: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="lf-decrypt-bench-") as tmp:
        case = prepare(model, Path(tmp))
        read = readers(case)
        assert read["encrypted"]() == model
        decrypt = alternate({"decrypt": read["encrypted"], "read": read["raw"]}, rounds)
        out = []
        for level, loader in (("Interpreter + allocate", interpreter_loader()),
                              ("agent load_model + smoke test", agent_loader(case["plain"][1]))):
            log(f"{label}: timing {level}")
            samples = alternate({"raw": lambda: loader(read["raw"]()),
                                 "encrypted": lambda: loader(read["encrypted"]())}, rounds)
            out.append({"model": label, "level": level, "bytes": len(model), "chunks": len(case["sealed"][1].chunks),
                        "decrypt": summary(decrypt["decrypt"]), "read": summary(decrypt["read"]),
                        "raw": summary(samples["raw"]), "encrypted": summary(samples["encrypted"])})
        return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    spec = SMALL if args.quick else FULL
    modes = ("int8",) if args.quick else ("int8", "float32")
    rounds = 5 if args.quick else 15
    results = []
    for mode in modes:
        path, _ = mobilenet(spec, mode, progress=log)
        results += measure(f"{spec.label} {mode}", path.read_bytes(), rounds)

    report = Report("Loading an encrypted model (read, verify, decrypt in memory, load) vs the same model in the clear",
                    ["model", "load", "MB", "read + verify ms", "read + verify + decrypt ms", "raw load ms",
                     "encrypted load ms", "adds ms", "ratio vs raw", "read + verify + decrypt MB/s"])
    slowest = float("inf")
    for r in results:
        raw_ms, enc_ms = r["raw"]["median_ms"], r["encrypted"]["median_ms"]
        decrypt_ms = r["decrypt"]["median_ms"]
        mb_s = r["bytes"] / 1e6 / (decrypt_ms / 1000.0)
        slowest = min(slowest, mb_s)
        report.add(r["model"], r["level"], r["bytes"] / 1e6, r["read"]["median_ms"], decrypt_ms, raw_ms, enc_ms,
                   enc_ms - raw_ms, fmt_ratio(ratio(enc_ms, raw_ms)), mb_s)
    report.notes.append(f"medians of {rounds} alternating rounds; raw = read model.tflite + sha256 + load; encrypted "
                        f"= read model.tflite.enc + sha256 + unwrap + ChaCha20-Poly1305 per 256 KiB chunk + "
                        f"plaintext sha256 + load; the ciphertext and the plaintext are both in memory during the "
                        f"load (about twice the model's size, briefly)")
    report.verdict(f"the encrypted read path moves at least {MIN_DECRYPT_MB_S:g} MB/s", slowest >= MIN_DECRYPT_MB_S,
                   f"slowest: {slowest:.0f} MB/s")
    report.data["results"] = results
    report.print(args.json)
    return 0 if all(v[1] for v in report.verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
