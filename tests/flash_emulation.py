"""Run transformers' own flash-attention dispatch on CPU, with exact reference kernels standing in for flash_attn's.

What is under test is everything above the kernel: transformers' `flash_attention_forward`, its choice between the
plain and the variable-length kernel (`_flash_attention_forward`), the masks it builds (none), and what fsdp_train.py
passes it. Only the CUDA kernels are replaced: a causal sdpa over each row is exactly what `flash_attn_func` computes,
and the same over each `cu_seqlens` segment is exactly `flash_attn_varlen_func`.

`install()` patches transformers 5.24 by name (all private; FIELD-NOTES 2026-12-06 says why each is needed). If a
later transformers renames one, `install()` raises AttributeError and the tests that use it fail loudly rather than
silently testing sdpa. `KERNEL_CALLS` counts which kernel ran, so a test can prove which path a forward took.

Also a torchrun entry point: `python -m torch.distributed.run ... tests/flash_emulation.py FSDP_TRAIN_FLAGS` runs
fsdp_train.main with the emulation installed. `mixing_varlen_fn` is a broken kernel (it ignores the segments), to prove
the start-up check refuses a kernel that lets documents see each other.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

KERNEL_CALLS: Counter = Counter()


def _attend(q, k, v, softmax_scale, causal):
    """(B, S, H, D) queries, (B, S, Hkv, D) keys/values: attention within each row, in fp32 like flash_attn's
    accumulators, returned in the inputs' dtype."""
    out = F.scaled_dot_product_attention(
        *(x.transpose(1, 2).float() for x in (q, k, v)), is_causal=causal, scale=softmax_scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2).to(q.dtype)


def flash_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func's maths: causal within each row of the batch."""
    KERNEL_CALLS["plain"] += 1
    assert dropout_p == 0.0, "the stand-in kernel has no dropout"
    return _attend(q, k, v, softmax_scale, causal)


def flash_varlen_fn(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """flash_attn_varlen_func's maths: (T, H, D) tokens, attention only inside each [cu[i], cu[i+1]) segment."""
    KERNEL_CALLS["varlen"] += 1
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(cu_seqlens_q[-1]) == q.shape[0], (cu_seqlens_q, q.shape)
    lengths = cu_seqlens_q.diff()
    assert int(lengths.max()) == int(max_seqlen_q), (lengths, max_seqlen_q)  # flash_attn sizes its grid by it
    bounds = cu_seqlens_q.tolist()
    parts = [
        _attend(q[a:b][None], k[a:b][None], v[a:b][None], softmax_scale, causal)[0]
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    return torch.cat(parts)


def mixing_varlen_fn(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """A broken kernel: ignores the segments and attends causally over everything it is given."""
    KERNEL_CALLS["varlen"] += 1
    return _attend(q[None], k[None], v[None], softmax_scale, causal)[0]


class _Permanent:
    """The two MonkeyPatch methods install() uses, without the undo (for the torchrun entry point)."""

    setattr = staticmethod(setattr)

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


def install(varlen=flash_varlen_fn, patch=_Permanent) -> None:
    """Make transformers' flash_attention_2 dispatch run on CPU with the stand-in kernels. `patch`: a pytest
    MonkeyPatch, to undo it after a test."""
    from transformers import modeling_flash_attention_utils as fa
    from transformers import modeling_utils

    def lazy_import_flash_attention(implementation=None, attention_wrapper=None, allow_all_kernels=False):
        process = fa._lazy_define_process_function(varlen)
        return (flash_fn, varlen, None, fa._pad_input, None), (process, process)

    for module in (fa, modeling_utils):  # modeling_utils imported the name itself
        assert hasattr(module, "lazy_import_flash_attention"), module
        patch.setattr(module, "lazy_import_flash_attention", lazy_import_flash_attention)
    patch.setitem(fa.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", lambda: True)  # not hub
    assert hasattr(modeling_utils.PreTrainedModel, "_flash_attn_can_dispatch")
    patch.setattr(modeling_utils.PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *a, **k: True)  # "no GPU"


if __name__ == "__main__":  # torchrun entry point: fsdp_train.py with the emulated kernels
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install()
    import fsdp_train

    fsdp_train.CUDA_ONLY_ATTENTION = frozenset()  # this process emulates the CUDA kernels
    sys.exit(fsdp_train.main(sys.argv[1:]))
