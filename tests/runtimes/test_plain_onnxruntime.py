"""The deployment story: a lowbit folder's model.onnx and tokenizer run in a virtual environment
holding only onnxruntime, numpy and tokenizers (no lowbit, no torch, no transformers)."""

import json
import subprocess
import sys
import venv

import numpy as np
import torch

import lowbit
from tests.runtimes.test_onnxruntime import _reference_kernels

SCRIPT = """
import json, sys
import numpy as np, onnxruntime, tokenizers
for name in ("torch", "lowbit", "transformers"):
    try:
        __import__(name)
        raise SystemExit(name + " is importable here: this is not a bare environment")
    except ImportError:
        pass
folder = sys.argv[1]
tokenizer = tokenizers.Tokenizer.from_file(folder + "/tokenizer.json")
tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
encodings = tokenizer.encode_batch(json.loads(sys.argv[2]))
feeds = {"input_ids": np.array([e.ids for e in encodings], np.int64),
         "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
         "token_type_ids": np.array([e.type_ids for e in encodings], np.int64)}
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
session = onnxruntime.InferenceSession(folder + "/model.onnx", options, providers=["CPUExecutionProvider"])
hidden = session.run(["last_hidden_state"], feeds)[0]
mask = feeds["attention_mask"][..., None]
print(json.dumps(((hidden * mask).sum(1) / mask.sum(1)).tolist()))
"""


def test_model_onnx_runs_with_only_onnxruntime_numpy_and_tokenizers(minilm, tmp_path, wiki_sentences):
    model, tokenizer, _ = minilm
    quantized = lowbit.quantize(model, "w8", progress=False)
    folder = lowbit.save(quantized, tmp_path / "minilm-w8", runtime="onnxruntime")
    environment = tmp_path / "bare"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "onnxruntime", "numpy", "tokenizers"],
                   check=True, timeout=900)
    sentences = wiki_sentences[:8]
    result = subprocess.run([python, "-c", SCRIPT, str(folder), json.dumps(sentences)], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bare = torch.tensor(json.loads(result.stdout))
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        hidden = _reference_kernels(quantized)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert np.allclose(bare.numpy(), expected.numpy(), atol=1e-4)
    assert sys.executable != str(python)
