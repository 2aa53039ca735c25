"""The one adapter between sae-circuits and nnsight (pinned to 0.8.1).

nnsight has broken its downstream projects on every minor release, so every nnsight call of the
toolkit lives here; the rest of the code asks this module to wrap a model, open a trace, read
or write a module's input or output, save a value, or stop the forward early.

nnsight 0.8 facts this relies on:
- `TransformersModel(hf_model, tokenizer=..., task="text-generation")` wraps a loaded model.
- A trace body is compiled from its source file, so traces must live in real files.
- Modules must be accessed in forward order within one trace; `tracer.stop()` ends the forward
  after the last access (the early-stop exception is swallowed by the trace).
- `.save()` returns the real tensor after the trace exits.
- Values computed inside a trace are real tensors in the caller's thread and grad mode, so
  autograd graphs built there survive the trace: save leaves, run `.backward()` after exit.
- `model.generate(...)` is a trace over the whole decode loop; `tracer.iter[:n]` binds the body
  of a `for` loop to the first n forwards (the prompt, then one per new token). An unbounded
  loop (`tracer.all()`) ends the body early, so generation here always runs a fixed number of
  steps (`min_new_tokens = max_new_tokens`).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

NNSIGHT_VERSION = "0.8.1"


def wrap(hf_model: torch.nn.Module, tokenizer: Any) -> Any:
    """Wrap a loaded `transformers` causal LM for tracing."""
    import nnsight
    from nnsight import TransformersModel

    if nnsight.__version__ != NNSIGHT_VERSION:
        warnings.warn(f"sae-circuits is tested with nnsight=={NNSIGHT_VERSION}, found "
                      f"{nnsight.__version__}; install the pinned version if traces fail", stacklevel=2)
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def _installed() -> str:
    import nnsight

    return nnsight.__version__


def envoy(traced: Any, path: str) -> Any:
    """The nnsight envoy of the submodule at dotted `path` ("model.layers.3.mlp")."""
    node = traced
    for part in path.split(".") if path else ():
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def trace(traced: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
    """A trace over a batch of token ids [batch, pos], to enter with `with ... as tracer:`.

    nnsight compiles the body of that `with` block from the caller's source file, so this
    returns the unentered tracer rather than wrapping it in a context manager of our own."""
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    return traced.trace(inputs)


def read(traced: Any, path: str, io: str, tuple_index: int | None) -> Any:
    """Inside a trace: the tensor a module receives (`io="input"`, first positional argument) or
    returns (`io="output"`, element `tuple_index` of a tuple output)."""
    node = envoy(traced, path)
    value = node.input if io == "input" else node.output
    return value if tuple_index is None else value[tuple_index]


def write(traced: Any, path: str, io: str, tuple_index: int | None, value: Any) -> None:
    """Inside a trace: replace what `read` would return with `value` (same shape)."""
    node = envoy(traced, path)
    if io == "input":
        node.input = value
    elif tuple_index is None:
        node.output = value
    else:
        out = node.output
        node.output = (*out[:tuple_index], value, *out[tuple_index + 1:])


def logits(traced: Any) -> Any:
    """Inside a trace: the model's output logits [batch, pos, vocab] (read after every site)."""
    return traced.output.logits


def save(value: Any) -> Any:
    """Mark a traced value to be kept after the trace exits."""
    import nnsight

    return nnsight.save(value)


def stop(tracer: Any) -> None:
    """End the traced forward here: later modules do not run."""
    tracer.stop()


def generate(traced: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, **kwargs: Any) -> Any:
    """A traced greedy generation of exactly `max_new_tokens` tokens (EOS does not stop it), to
    enter with `with ... as tracer:` and step through with `for _ in steps(tracer, n):`."""
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    kwargs.setdefault("do_sample", False)
    # `traced.generate(...)` only returns a tracer when called as the `with` statement itself
    # (otherwise it just generates), so build the tracer as its wrapper does: a trace whose
    # traced function is the undecorated `generate`.
    raw = getattr(type(traced).generate, "__wrapped__", None)
    if raw is None:
        raise RuntimeError(f"cannot open a generation trace with nnsight {_installed()}: "
                           f"sae-circuits is tested with nnsight=={NNSIGHT_VERSION}")
    method = raw.__get__(traced, type(traced))
    return traced.trace(inputs, fn=method, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                        **kwargs)


def steps(tracer: Any, n: int) -> Any:
    """Inside a `generate` trace: iterate over its first `n` forwards (the prompt, then one per
    generated token); reads and writes in the loop body apply to the current forward."""
    return tracer.iter[:n]


def result(tracer: Any) -> Any:
    """Inside a `generate` trace, after the step loop: the token ids [batch, prompt + new]."""
    return tracer.result
