"""`train.compile`: regional torch.compile of the model's repeated blocks (`CompiledBlocks`), and the count of
graphs it made."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

BACKEND = "inductor"
# Every block of a class runs one code object, whose variants all count against one limit (8 by default):
# T5's four variants with their dynamic recompilations already reach it, and past it torch runs eagerly.
RECOMPILE_LIMIT = 64


class CompiledBlocks:
    """Each block of a run of identical blocks (a `ModuleList` of one class: T5's encoder and decoder layers, a
    decoder-only model's layers) is compiled in place, as torchtune does; the embeddings, the output head and the
    loss stay eager. The blocks of a class share one compiled code object, so a 24-layer stack compiles like one
    layer.

    Each variant of a block's code (T5's first block computes the relative position bias and the others take it;
    an encoder block differs from a decoder block) compiles once for the shapes it first sees and once more with
    sizes marked dynamic when a shape changes, so the number of graphs (`graphs`, logged as `compiled_graphs`)
    stays bounded over an epoch however the batch shapes vary. `train.pad_to_multiple_of` (64 by default when
    compiling) keeps the kernels on aligned shapes.
    """

    def __init__(self, model: torch.nn.Module, backend: str = BACKEND):
        import torch._dynamo

        self.graphs = 0
        self.blocks = stack_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no run of identical blocks to compile")
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compile_graph = torch._dynamo.lookup_backend(backend)

        def counting(graph: torch.fx.GraphModule, example_inputs):
            self.graphs += 1
            return compile_graph(graph, example_inputs)

        for block in self.blocks:
            block.compile(backend=counting)

    def describe(self) -> str:
        kinds = sorted({type(block).__name__ for block in self.blocks})
        return f"train.compile: {len(self.blocks)} blocks ({', '.join(kinds)}) compiled; the first steps wait for it"

    @contextmanager
    def eager(self) -> Iterator[None]:
        """The blocks run uncompiled inside the block: validation and generation, whose shapes, modes and
        caches would only compile more variants."""
        with torch.compiler.set_stance("force_eager"):
            yield


def stack_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of every ModuleList whose modules are all of one class (the layers of a transformer
    stack), outermost first: a list inside a block chosen already is compiled with it."""
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 0
                and all(type(block) is type(module[0]) for block in module)):
            blocks += list(module)
            inside.update(id(part) for block in module for part in block.modules())
    return blocks
