"""The chunked cross-entropy: PyTorch's loss and gradients, with fp32 logits one chunk at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dsum.loss import chunked_cross_entropy

VOCAB = 50


def logits_and_labels(dtype=torch.float32):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, VOCAB) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (3, 7))
    labels[0, 5:] = -100  # padding
    labels[2, :2] = -100  # a prompt
    return logits, labels


def plain(logits, labels, smoothing):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100,
                           reduction="sum", label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("rows", [1, 4, 21, 100])  # a chunk a row, uneven chunks, all in one, more than there are
def test_loss_and_gradients_equal_pytorchs(smoothing, rows):
    logits, labels = logits_and_labels()
    expected = plain(logits, labels, smoothing)
    (expected * 0.37).backward()  # a scale, as the loop's per-token normalisation applies
    want = logits.grad.clone()
    logits.grad = None
    loss = chunked_cross_entropy(logits, labels, smoothing, chunk_elements=rows * VOCAB)
    (loss * 0.37).backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(logits.grad, want, atol=1e-6, rtol=0)
    assert logits.grad[0, 5:].abs().sum() == 0  # ignored rows get no gradient
    with torch.no_grad():  # validation: the loss alone
        torch.testing.assert_close(chunked_cross_entropy(logits, labels, smoothing, chunk_elements=rows * VOCAB),
                                   expected, atol=1e-5, rtol=1e-6)


def test_bf16_logits_keep_their_dtype_and_the_loss_is_taken_in_fp32():
    logits, labels = logits_and_labels(torch.bfloat16)
    expected = plain(logits, labels, 0.1)
    expected.backward()
    want = logits.grad.clone()
    logits.grad = None
    loss = chunked_cross_entropy(logits, labels, 0.1, chunk_elements=4 * VOCAB)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(logits.grad, want, atol=2e-3, rtol=1e-2)  # bf16's own rounding of the same values


class LargestFloat32(TorchDispatchMode):
    """The largest fp32 tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_fp32_logits_of_the_whole_batch_never_exist_at_once():
    logits, labels = logits_and_labels(torch.bfloat16)
    with LargestFloat32() as chunked:
        chunked_cross_entropy(logits, labels, 0.1, chunk_elements=4 * VOCAB).backward()
    assert chunked.largest == 4 * VOCAB  # one chunk
    with LargestFloat32() as whole:
        plain(logits, labels, 0.1).backward()
    assert whole.largest == logits.numel()
