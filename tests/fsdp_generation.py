"""Generation under FSDP2 right after a training step, each rank asking for another length, checked on rank 0
against the gathered model: launched by tests/test_fsdp.py with `accelerate launch` and two ranks."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from transformers import T5Config, T5ForConditionalGeneration

from dsum import checkpoint, distributed


def main() -> None:
    accelerator = Accelerator()
    distributed.configure_fsdp(accelerator)
    torch.manual_seed(0)
    config = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=64, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)  # tied embeddings, as T5's
    model = T5ForConditionalGeneration(config)
    gathered = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    distributed.fit_for_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)

    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    model(input_ids=ids, labels=ids).loss.backward()  # the root unit's weights are sharded again after it
    optimizer.step()
    model.eval()
    rank = distributed.rank()
    prompt = torch.tensor([[10 + rank, 11, 12, 1]])
    length = 4 + 4 * rank  # rank 1 decodes on after rank 0 has finished: synced_gpus keeps rank 0 in step
    with torch.no_grad(), distributed.whole_root(model):
        output = model.generate(input_ids=prompt, max_new_tokens=length, min_new_tokens=length, do_sample=False,
                                synced_gpus=distributed.synced_gpus(accelerator, model))
    outputs = distributed.gather_objects(output.tolist())
    state_dict = checkpoint.gathered_state_dict(accelerator, model)
    if rank == 0:
        gathered.load_state_dict(state_dict)
        gathered.eval()
        for r, generated in enumerate(outputs):
            expected = gathered.generate(input_ids=torch.tensor([[10 + r, 11, 12, 1]]), max_new_tokens=4 + 4 * r,
                                         min_new_tokens=4 + 4 * r, do_sample=False)
            assert generated == expected.tolist(), (r, generated, expected.tolist())
        print(f"generated lengths {[len(o[0]) - 1 for o in outputs]}, as the gathered model", flush=True)
    distributed.barrier()


if __name__ == "__main__":
    main()
