"""Fuzz lowbit's two file formats as an attacker would: mutate a saved model, recompute every
checksum and size so the integrity checks pass, then load it and call it once.

What must hold for every case (issue 10):
- loading either succeeds or raises a LowbitError, and so does the first call of a loaded model;
- no code runs (no os.system, subprocess, exec or spawn audit event), no file outside the case's
  folder is opened, nothing is deleted or renamed;
- the process does not crash, and no case takes longer than --timeout seconds.

Cases run in a worker process that reports each case before and after it runs, so a crash or a
hang is pinned on its case and the worker is restarted after it. Runs are seeded: the same
--seed and --cases give the same files.

    python -m bench.fuzz_files --cases 10000 --seed 0        # the long run (about 15 minutes)
    python -m bench.fuzz_files --cases 300 --format sklearn  # one format

The test suite runs a few hundred cases per format (tests/formats/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
FORMATS = ("sklearn", "torch")
INTERESTING = [0, -1, 1, 2, 3, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1,
               -(2**63), 10**9, -(10**9), 0.5, -0.5, 1e308, -1e308, 1e-308, True, False, None, "", "x",
               "nan", "inf", "-inf", "os.system", "posix.system", "builtins.eval", "numpy.load",
               "sklearn.linear_model._sgd_fast.np.lib._npyio_impl.os.system", "numpy.memmap",
               "subprocess.Popen", "../../outside.bin", "/etc/passwd", "/proc/self/environ",
               "evilfactory:build", "os:abort", "\udcff", "\x00", "ÿ" * 9, [], {}, [[]],
               {"$": "ref", "id": 0}]


# ---- the seed models: real fitted estimators and small real torch/transformers models ----

def tiny_mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def wide_mlp():
    """Wide enough (8,192 weights) for a pruned layer to be stored as bitmask and kept values."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))


def tiny_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def residual_cnn():
    """Batch norms folded, ReLU6 fused, residual sums rounded: lowbit.json's `folded` and `roundings`."""
    from tests.fixtures_models import residual_net

    return residual_net()


def tied_lm():
    from tests.fixtures_models import tied_lm as make

    return make()


def _sklearn_seeds() -> dict[str, tuple[Any, Any]]:
    """name -> (fitted estimator, inputs for its first call)."""
    import numpy as np
    from sklearn import ensemble, linear_model, naive_bayes, neighbors, neural_network, svm
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lowbit.data import assets

    documents = assets.wikipedia_documents()
    sample = [documents[i] for i in np.random.default_rng(0).permutation(len(documents))[:400]]
    texts, topics = [d["extract"] for d in sample], [d["topic"] for d in sample]
    digits, digit_labels = load_digits(return_X_y=True)
    cancer, cancer_labels = load_breast_cancer(return_X_y=True)
    iris, iris_labels = load_iris(return_X_y=True)
    return {
        "tfidf-logistic": (make_pipeline(TfidfVectorizer(), linear_model.LogisticRegression(max_iter=300))
                           .fit(texts[:300], topics[:300]), texts[300:340]),
        "counts-nb": (make_pipeline(CountVectorizer(), naive_bayes.MultinomialNB())
                      .fit(texts[:300], topics[:300]), texts[300:340]),
        "forest": (ensemble.RandomForestClassifier(8, max_depth=6, random_state=0)
                   .fit(digits[:1000], digit_labels[:1000]), digits[1000:1040]),
        "hist-boosting": (ensemble.HistGradientBoostingClassifier(max_iter=10)
                          .fit(cancer[:400], cancer_labels[:400]), cancer[400:440]),
        "kneighbours": (make_pipeline(StandardScaler(), neighbors.KNeighborsClassifier(algorithm="kd_tree"))
                        .fit(cancer[:400], cancer_labels[:400]), cancer[400:440]),
        "svc": (svm.SVC(probability=True, random_state=0).fit(iris, iris_labels), iris[::4]),
        "mlp": (neural_network.MLPClassifier((16,), max_iter=50, random_state=0)
                .fit(digits[:600], digit_labels[:600]), digits[600:640]),
        "gaussian-nb": (naive_bayes.GaussianNB().fit(iris, iris_labels), iris[::4]),
        "boosting": (ensemble.GradientBoostingClassifier(n_estimators=5, random_state=0)
                     .fit(iris, iris_labels), iris[::4]),
    }


def _write_sklearn_seeds(folder: Path) -> list[dict[str, Any]]:
    import warnings

    import numpy as np

    import lowbit.sklearn as lowbit_sklearn

    seeds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = _sklearn_seeds()
    for name, (estimator, inputs) in built.items():
        path = folder / f"{name}.lowbit"
        lowbit_sklearn.quantize(estimator, bits=8, data=inputs).save(path)
        inputs_path = folder / f"{name}.inputs.json"
        listed = inputs if isinstance(inputs, list) else np.asarray(inputs).tolist()
        inputs_path.write_text(json.dumps(listed))
        seeds.append({"format": "sklearn", "name": name, "path": str(path), "inputs": str(inputs_path)})
    return seeds


def _write_torch_seeds(folder: Path) -> list[dict[str, Any]]:
    import torch

    import lowbit

    plain = {"mlp-w8a8": ("bench.fuzz_files:tiny_mlp", "w8a8-dynamic", [2, 32]),
             "mlp-w4": ("bench.fuzz_files:tiny_mlp", "w4-g32", [3, 32]),
             "cnn-static": ("bench.fuzz_files:tiny_cnn", "w8a8-static", [2, 3, 6, 6]),
             "tied-w8": ("bench.fuzz_files:tied_lm", "w8", "ids"),
             "residual-static": ("bench.fuzz_files:residual_cnn", "w8a8-static", [2, 3, 8, 8]),
             "pruned-w8": ("bench.fuzz_files:wide_mlp", "w8", [2, 64])}
    seeds = []
    for name, (factory, recipe, shape) in plain.items():
        model = globals()[factory.rpartition(":")[2]]()  # a factory of this file
        if name.startswith("pruned"):  # its weights stored as bitmask and kept values
            model = lowbit.prune(model, 0.6)
        calibration = [torch.randn(4, *shape[1:]) for _ in range(4)] if recipe == "w8a8-static" else None
        quantized = lowbit.quantize(model, recipe, calibration=calibration, progress=False)
        lowbit.save(quantized, folder / name, runtime="torch")
        seeds.append({"format": "torch", "name": name, "path": str(folder / name), "skeleton": factory,
                      "shape": shape})
        if factory.endswith("residual_cnn"):  # and as a plain model's QDQ graph in ONNX Runtime
            lowbit.save(quantized, folder / f"{name}-ort", runtime="onnxruntime")
            seeds.append({"format": "torch", "name": f"{name}-ort", "path": str(folder / f"{name}-ort"),
                          "skeleton": None, "shape": shape})
    from tests.fixtures_models import tiny_bert, tiny_llama

    for name, make, recipe, runtime in (("bert-w8a8", tiny_bert, "w8a8-dynamic", "torch"),
                                        ("llama-w4", tiny_llama, "w4-g32", "torch"),
                                        ("bert-w8-ort", tiny_bert, "w8", "onnxruntime"),
                                        ("llama-w4-ort", tiny_llama, "w4-g32", "onnxruntime")):
        lowbit.save(lowbit.quantize(make(), recipe, progress=False), folder / name, runtime=runtime)
        seeds.append({"format": "torch", "name": name, "path": str(folder / name), "skeleton": None,
                      "shape": None})
    return seeds


def build_seeds(folder: Path, formats: tuple[str, ...]) -> list[dict[str, Any]]:
    seeds = []
    if "sklearn" in formats:
        seeds += _write_sklearn_seeds(folder)
    if "torch" in formats:
        seeds += _write_torch_seeds(folder)
    (folder / "seeds.json").write_text(json.dumps(seeds))
    return seeds


# ---- mutations ----

def _containers(value: Any, found: list) -> list:
    """Every (container, key) pair in a JSON document (walked without recursion: a mutated
    document may nest thousands deep)."""
    stack = [value]
    while stack:
        node = stack.pop()
        pairs = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, item in pairs:
            found.append((node, key))
            stack.append(item)
    return found


def _scalars(value: Any) -> list:
    return [container[key] for container, key in _containers(value, [])
            if not isinstance(container[key], (dict, list))]


def _new_value(rng: random.Random, old: Any, document: Any) -> Any:
    choice = rng.random()
    if choice < 0.35:
        return rng.choice(INTERESTING)
    if choice < 0.6 and type(old) in (int, float) and not isinstance(old, bool):
        half = old // 2 if type(old) is int else old / 3
        return rng.choice([old + 1, old - 1, old * 2, -old, old * 10**9, half])
    if choice < 0.8:
        pool = _scalars(document)
        return rng.choice(pool) if pool else None
    if choice < 0.9:
        nested: Any = 0
        for _ in range(rng.choice([100, 1000, 5000])):
            nested = [nested]
        return nested
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz._:/$0123456789") for _ in range(rng.randint(1, 40)))


def mutate_json(document: Any, rng: random.Random) -> Any:
    """One to three random edits: a value replaced, a key or item dropped, an item duplicated."""
    for _ in range(rng.randint(1, 3)):
        places = _containers(document, [])
        if not places:
            return rng.choice(INTERESTING)
        container, key = rng.choice(places)
        action = rng.random()
        if action < 0.7:
            container[key] = _new_value(rng, container[key], document)
        elif action < 0.85:
            del container[key]
        elif isinstance(container, list):
            container.insert(rng.randint(0, len(container)), container[key])
        else:
            container[f"{key}_copy"] = container[key]
    return document


def _dumps(document: Any) -> bytes:
    import sys as _sys

    limit = _sys.getrecursionlimit()
    _sys.setrecursionlimit(20000)
    try:
        return json.dumps(document).encode()
    finally:
        _sys.setrecursionlimit(limit)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """The header's JSON edited (dtypes, shapes, offsets), or bytes of the data flipped, or the
    file cut short or padded."""
    action = rng.random()
    if action < 0.5 and len(data) >= 8:
        (length,) = struct.unpack("<Q", data[:8])
        try:
            header = json.loads(data[8:8 + length])
        except (ValueError, UnicodeDecodeError):
            header = None
        if isinstance(header, dict):
            body = _dumps(mutate_json(header, rng))
            return struct.pack("<Q", len(body)) + body + data[8 + length:]
    if action < 0.85 and data:
        mutable = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(mutable))
            mutable[position] = rng.choice([0, 0xFF, 0x80, 0x7F, rng.randrange(256), mutable[position] ^ 1])
        return bytes(mutable)
    if action < 0.93:
        return data[:rng.randrange(max(1, len(data)))]
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    mutable = bytearray(data or b"x")
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(mutable))
        mutable[position] = rng.choice([0xFF, 0xC3, 0x0A, 0x00, rng.randrange(256)])
    return bytes(mutable)


def mutate_bytes(name: str, data: bytes, rng: random.Random) -> bytes:
    if name.endswith(".json"):
        try:
            return _dumps(mutate_json(json.loads(data), rng))
        except (ValueError, UnicodeDecodeError):
            return mutate_text(data, rng)
    if name.endswith(".safetensors"):
        return mutate_safetensors(data, rng)
    return mutate_text(data, rng)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mutate_one(files: dict[str, bytes], rng: random.Random) -> Any:
    """Mutate one of `files` in place; return lowbit.json as parsed afterwards (None if it no
    longer parses), for the caller to re-sign."""
    victim = rng.choice(sorted(files))
    files[victim] = mutate_bytes(victim, files[victim], rng)
    try:
        return json.loads(files["lowbit.json"])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def mutated_sklearn_file(seed: Path, target: Path, rng: random.Random) -> None:
    """The seed's zip with one entry mutated and lowbit.json's checksums and sizes recomputed."""
    with zipfile.ZipFile(seed) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    manifest = _mutate_one(entries, rng)
    if isinstance(manifest, dict):
        for key, measure in (("sha256", _sha256), ("sizes", len)):
            if isinstance(manifest.get(key), dict):
                manifest[key] = {name: measure(entries[name]) if name in entries else value
                                 for name, value in manifest[key].items()}
        entries["lowbit.json"] = _dumps(manifest)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def _tensor_digests(data: bytes) -> dict[str, str] | None:
    try:
        from safetensors.torch import load

        from lowbit.core.digest import tensor_sha256

        return {name: tensor_sha256(tensor) for name, tensor in load(data).items()}
    except Exception:  # noqa: BLE001 - a mutated file the attacker cannot parse either
        return None


def mutated_torch_folder(seed: Path, target: Path, rng: random.Random) -> None:
    """A copy of the seed folder with one file mutated and every checksum, size and tensor digest
    in lowbit.json recomputed."""
    target.mkdir()
    files = {path.name: path.read_bytes() for path in seed.iterdir() if path.is_file()}
    manifest = _mutate_one(files, rng)
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name, entry in manifest["files"].items():
            if isinstance(entry, dict) and name in files:
                entry.update(sha256=_sha256(files[name]), bytes=len(files[name]))
                if isinstance(entry.get("tensors"), dict):
                    entry["tensors"] = _tensor_digests(files[name]) or entry["tensors"]
        files["lowbit.json"] = _dumps(manifest)
    for name, data in files.items():
        (target / name).write_bytes(data)


# ---- the worker: load, call, watch ----

class Watch:
    """An audit hook that records what a load must never do: run a program, open a file outside
    the allowed places, delete or rename a file."""

    FORBIDDEN = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.remove", "os.unlink", "os.rename", "os.rmdir", "shutil.rmtree", "pty.spawn")

    def __init__(self) -> None:
        self.active = False
        self.case_folder = ""
        self.events: list[str] = []
        roots = {sys.prefix, sys.base_prefix, *(p for p in sys.path if p)}
        self.allowed = tuple(sorted({os.path.realpath(p) for p in roots if os.path.isdir(p)}))
        sys.addaudithook(self.hook)

    def hook(self, event: str, arguments: tuple) -> None:
        if not self.active:
            return
        if event.startswith(self.FORBIDDEN):
            self.events.append(f"{event} {arguments[:1]!r}")
        elif event == "open" and isinstance(arguments[0], (str, bytes, os.PathLike)):
            self.check_open(os.fsdecode(arguments[0]))

    def check_open(self, path: str) -> None:
        real = os.path.realpath(path)
        if real.startswith(("/proc/", "/sys/", "/dev/")) or real.startswith(self.allowed):
            return
        if real.startswith(self.case_folder) or os.path.basename(os.path.dirname(real)).startswith("lowbit-"):
            return
        self.events.append(f"open {real}")


def first_call_inputs(seed: dict[str, Any]) -> Any:
    """What the first call of a loaded seed model gets (read before the watch starts)."""
    if seed["format"] == "sklearn":
        import numpy as np

        inputs = json.loads(Path(seed["inputs"]).read_text())
        return inputs if isinstance(inputs[0], str) else np.asarray(inputs)
    import torch

    if seed["shape"] == "ids":
        return torch.randint(0, 100, (2, 9))
    if seed["shape"]:
        return torch.randn(*seed["shape"])
    ids = torch.randint(0, 64, (2, 9))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load_and_call(path: Path, seed: dict[str, Any], inputs: Any) -> None:
    import lowbit

    if seed["format"] == "sklearn":
        lowbit.load(path).predict(inputs)
        return
    import torch

    model = lowbit.load(path, skeleton=seed["skeleton"]) if seed["skeleton"] else lowbit.load(path)
    with torch.inference_mode():
        model(**inputs) if isinstance(inputs, dict) else model(inputs)


def make_case(index: int, seed_value: int, seeds: list[dict[str, Any]], folder: Path) -> tuple[dict, Path]:
    rng = random.Random(seed_value * 1_000_003 + index)
    formats = sorted({seed["format"] for seed in seeds})
    of_format = [seed for seed in seeds if seed["format"] == formats[index % len(formats)]]
    seed = of_format[rng.randrange(len(of_format))]  # the formats take turns
    target = folder / f"case-{index}"
    if seed["format"] == "sklearn":
        target = target.with_suffix(".lowbit")
        mutated_sklearn_file(Path(seed["path"]), target, rng)
    else:
        mutated_torch_folder(Path(seed["path"]), target, rng)
    return seed, target


def run_case(index: int, seed_value: int, seeds: list[dict[str, Any]], folder: Path, watch: Watch) -> str:
    """'ok', 'refused' (a LowbitError), or what went wrong."""
    import warnings

    from lowbit.errors import LowbitError

    seed, path = make_case(index, seed_value, seeds, folder)
    inputs = first_call_inputs(seed)
    watch.case_folder, watch.events = os.path.realpath(path), []
    watch.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_and_call(path, seed, inputs)
        outcome = "ok"
    except LowbitError as error:
        outcome = f"refused {type(error).__name__}: {str(error)[-160:]}"
    except BaseException as error:  # noqa: BLE001 - the point is to see everything that escapes
        outcome = f"untyped {type(error).__name__}: {str(error)[:160]}"
    finally:
        watch.active = False
    if watch.events:
        outcome = f"forbidden {watch.events[0]}"
    elif not outcome.startswith("untyped"):
        outcome = inspect_outcome(path) or outcome
    return f"{seed['format']} {seed['name']}: {outcome}"


def inspect_outcome(path: Path) -> str | None:
    """`lowbit inspect` on the case, as a user would run it: exit 0, or exit 2 with a one-line
    message; None when it does, else what went wrong."""
    from typer.testing import CliRunner

    from lowbit.cli import app

    result = CliRunner().invoke(app, ["inspect", str(path)], env={"COLUMNS": "100"})
    if result.exit_code == 0:
        return None
    message = result.stderr.strip()
    if result.exit_code == 2 and message.startswith("error:") and "\n" not in message:
        return None
    return f"untyped inspect exit {result.exit_code}: {message[:200]}"


def worker(folder: Path, seed_value: int, start: int, stop: int) -> None:
    import shutil

    seeds = json.loads((folder / "seeds.json").read_text())
    for seed in seeds:  # unwatched: the first load imports scikit-learn, torch, transformers
        load_and_call(Path(seed["path"]), seed, first_call_inputs(seed))
    print("ready", flush=True)  # the per-case timeout starts here, not during the imports above
    watch = Watch()
    cases = folder / "cases"
    cases.mkdir(exist_ok=True)
    for index in range(start, stop):
        print(f"start {index}", flush=True)
        outcome = run_case(index, seed_value, seeds, cases, watch)
        print(f"done {index} {json.dumps(outcome)}", flush=True)
        for leftover in cases.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()


# ---- the parent: run workers, pin crashes and hangs on their cases ----

def _worker_process(folder: Path, seed_value: int, start: int, stop: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.fuzz_files", "--worker", str(folder), "--seed", str(seed_value),
               "--start", str(start), "--stop", str(stop)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT)}
    errors = open(folder / "worker-errors.txt", "a")  # noqa: SIM115 - the worker's stderr, kept for a crash
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True,
                            env=environment)


STARTUP_SECONDS = 300  # a worker's imports and seed loads, before its first case: not a case's time


def _read_line(process: subprocess.Popen, timeout: float) -> str | None:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else None


def run(cases: int, seed_value: int = 0, formats: tuple[str, ...] = FORMATS, timeout: float = 10.0,
        progress: bool = False) -> dict[str, Any]:
    """Run `cases` mutated files; returns counts per outcome and every failing case."""
    outcomes: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as scratch:
        folder = Path(scratch)
        build_seeds(folder, formats)
        started = time.perf_counter()
        next_case = 0
        while next_case < cases:
            process = _worker_process(folder, seed_value, next_case, cases)
            current, ready = None, False
            while True:
                line = _read_line(process, timeout if ready else STARTUP_SECONDS)
                if line is None and not ready:
                    process.kill()
                    raise RuntimeError(f"the fuzz worker did not load its seeds within {STARTUP_SECONDS} s")
                if line is None:  # no word within the timeout: the current case hangs
                    process.kill()
                    outcomes[current if current is not None else next_case] = f"hang over {timeout:.0f} s"
                    break
                if not line:  # the worker ended: done, or crashed inside the current case
                    code = process.wait()
                    if current is None and code != 0:  # died before any case: a broken harness
                        tail = (folder / "worker-errors.txt").read_text().strip().splitlines()[-3:]
                        raise RuntimeError(f"the fuzz worker failed to start (exit {code}): {tail}")
                    if current is not None:
                        tail = (folder / "worker-errors.txt").read_text().strip().splitlines()[-1:]
                        outcomes[current] = f"crash (exit {code}) {' '.join(tail)[:200]}"
                    break
                word, *fields = line.rstrip("\n").split(" ", 2)
                ready = ready or word == "ready"
                if word not in ("start", "done") or not fields:
                    continue  # a library's own output on the worker's stdout, not the protocol
                index, rest = fields[0], fields[1:]
                if word == "start":
                    current = int(index)
                elif word == "done":
                    outcomes[int(index)] = json.loads(rest[0])
                    current = None
                    if progress and int(index) % 500 == 0:
                        print(f"  {int(index) + 1}/{cases} cases, {time.perf_counter() - started:.0f} s",
                              flush=True)
            next_case = max(outcomes, default=-1) + 1
            process.wait()
    return summarise(outcomes, time.perf_counter() - started)


def _kind(outcome: str) -> str:
    text = outcome.split(": ", 1)[-1]
    for kind in ("ok", "refused", "untyped", "forbidden", "crash", "hang"):
        if text.startswith(kind):
            return kind
    return "other"


def summarise(outcomes: dict[int, str], seconds: float) -> dict[str, Any]:
    kinds = Counter(_kind(outcome) for outcome in outcomes.values())
    failures = {index: outcome for index, outcome in sorted(outcomes.items())
                if _kind(outcome) not in ("ok", "refused")}
    reasons = Counter(_reason(outcome) for outcome in outcomes.values() if _kind(outcome) == "refused")
    return {"cases": len(outcomes), "seconds": round(seconds, 1), "outcomes": dict(kinds),
            "per_format": dict(Counter(outcome.split(" ", 1)[0] for outcome in outcomes.values())),
            "refusals": dict(reasons.most_common(60)), "failures": failures}


def _reason(outcome: str) -> str:
    """A refusal's message without paths and numbers, to count refusals by kind."""
    import re

    text = re.sub(r"/\S+", "PATH", outcome.split(": ", 1)[-1])
    return re.sub(r"-?\d[\d,.e+-]*", "N", text)[:110]


def show(index: int, seed_value: int, formats: tuple[str, ...]) -> None:
    """Rebuild one case and run it in this process, so its traceback shows."""
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as scratch:
        seeds = build_seeds(Path(scratch), formats)
        seed, path = make_case(index, seed_value, seeds, Path(scratch))
        print(f"case {index}: {seed['format']} {seed['name']} -> {path}")
        load_and_call(path, seed, first_call_inputs(seed))
        print("loaded and called without error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=(*FORMATS, "both"), default="both")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a case may take")
    parser.add_argument("--show", type=int, help="rebuild case N and run it here, with a traceback")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments.worker, arguments.seed, arguments.start, arguments.stop)
        return
    formats = FORMATS if arguments.format == "both" else (arguments.format,)
    if arguments.show is not None:
        show(arguments.show, arguments.seed, formats)
        return
    result = run(arguments.cases, arguments.seed, formats, arguments.timeout, progress=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz_files.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({key: value for key, value in result.items() if key != "failures"}, indent=2))
    for index, outcome in list(result["failures"].items())[:40]:
        print(f"case {index}: {outcome}")
    print(f"{len(result['failures'])} failing cases of {result['cases']}; "
          "all in bench/results/fuzz_files.json")
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
