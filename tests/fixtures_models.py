"""Small importable factories for tests that need `package.module:factory` specs."""

import torch
from torch import nn


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=16),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


class TiedLM(nn.Module):
    """An embedding and an output head that share one weight, as many language models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.embed(ids))))


def tied_lm() -> nn.Module:
    return TiedLM()


class StaticSamePaddingConv(nn.Conv2d):
    """The EfficientNet/timm pattern: a Conv2d subclass that pads with a module before convolving."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride,
                                          self.padding, self.dilation, self.groups)


def same_padding_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(StaticSamePaddingConv(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4))


def sensitive_mlp() -> nn.Module:
    """A classifier whose middle layer '2' has one huge weight per group of 32 inputs, on input
    features that ReLU always zeroes: harmless in float, but in 4 bits it takes every other
    weight of its group to zero. Tune's sensitivity must find it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model.eval()
    dead = [0, 32]
    with torch.no_grad():
        model[0].weight[dead] = 0.0
        model[0].bias[dead] = -1.0
        model[2].weight[:, dead] = 1000.0
    return model


def tiny_bert():
    """A two-layer BERT with a 64-token vocabulary: a real transformers model, in milliseconds."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def tiny_llama():
    """A two-layer Llama causal LM with grouped-query attention and a 64-token vocabulary."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def trained_like_llama():
    """tiny_llama with heavier-tailed weights than the init, as trained ones are."""
    model = tiny_llama()
    for parameter in model.parameters():
        parameter.data += 0.05 * torch.randn_like(parameter).pow(3)
    return model


def token_batches(model, count: int, seed: int) -> list[dict]:
    """`count` batches of two random 32-token sequences from the model's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 32), generator=generator)}
            for _ in range(count)]


class Residual(nn.Module):
    """An inverted-residual block between two convolutions: the sum is another module's output."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.norm, self.act = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        self.project, self.project_norm = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.project_norm(self.project(self.act(self.norm(self.expand(x))))) + x


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), Residual(), Residual(),
                         nn.Conv2d(8, 4, 1)).eval()


class _DiesInAWorker(nn.Module):
    """An MLP whose forward kills the process it runs in when that is a worker process (a real
    crash, as an out-of-memory kill would be): tune's executors must retry once, then record it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp()

    def forward(self, x):
        import multiprocessing
        import os

        if multiprocessing.parent_process() is not None:
            os._exit(9)
        return self.body(x)


def dies_in_a_worker() -> nn.Module:
    return _DiesInAWorker().eval()
