"""The Gluon attention probe (bench/gluon_attention.py, ``python -m bench.gluon_attention``).

It compiles for sm_90 with the installed Triton on any machine (Triton ships ptxas), with the property it exists for:
the score GEMM's wait leaves one warpgroup MMA in flight (``wgmma.wait_group 1``: the PV GEMM runs under the
softmax). On an sm_90 GPU its output and lse match the fp32 reference.
"""

from __future__ import annotations

import re

import pytest
import torch

gluon_attention = pytest.importorskip("bench.gluon_attention", reason="triton.experimental.gluon not available")


def _signature(d: int, block_n: int) -> dict:
    from triton.experimental.gluon import language as gl

    def desc(rows):
        block = [1, rows, 1, d]
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return f"tensordesc<bf16[{','.join(map(str, block))}],{layout!r}>"

    sig = {name: desc(gluon_attention.ROWS.value) for name in ("q_desc", "o_desc")}
    sig |= {name: desc(block_n) for name in ("k_desc", "v_desc", "k_extra_desc", "v_extra_desc")}
    sig |= {"lse_ptr": "*fp32", "mask_ptr": "*u8", "qk_scale": "fp32"}
    sig |= {n: "i32" for n in ("stride_mask_b", "stride_mask_t", "lq", "n_keys", "n_extra", "heads_q", "group")}
    return sig


@pytest.mark.parametrize("ws", [False, True], ids=["one-warpgroup", "warp-specialised"])
@pytest.mark.parametrize("d", sorted(gluon_attention.CONFIGS))
def test_compiles_for_sm90_with_the_softmax_under_the_pv_gemm(d, ws):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    block_n, stages, q_in_regs, _ = next(c for c in gluon_attention.CONFIGS[d] if c[3] == ws)
    const = dict(HEAD_DIM=d, BLOCK_N=block_n, STAGES=stages, Q_IN_REGS=q_in_regs, WARP_SPECIALIZE=ws, HAS_EXTRA=True,
                 HAS_MASK=True)  # fmt: skip
    sig = _signature(d, block_n) | {k: "constexpr" for k in const}
    src = GluonASTSource(gluon_attention.attn_fwd_gluon_kernel, sig, const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
    assert "1" in waits, waits
    assert ("setmaxnreg" in ptx) == ws  # the loader warp hands its registers to the consumers


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)), reason="needs an sm_90 GPU"
)
@pytest.mark.parametrize("case", gluon_attention.CHECK_CASES)
@pytest.mark.parametrize("d", sorted(gluon_attention.CONFIGS))
def test_gpu_matches_reference(d, case):
    for cfg in gluon_attention.CONFIGS[d]:
        assert gluon_attention._check(cfg, *case[:6], d, case[6]) < 0.02, cfg
