"""The CUDA kernel of tasks/engine/bf16_adamw.py: one AdamW update of a bf16 tensor and its bf16 moments,
fp32 arithmetic, stochastic rounding with Philox bits drawn in the kernel. Imported only on CUDA
(Triton ships with CUDA builds of torch)."""
import triton
import triton.language as tl


@triton.jit
def _round(x, noise):
    # fp32 -> bf16 stochastically: add 16 random bits below the kept ones, clear them (see round_stochastically)
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + noise) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def adamw_bf16_kernel(w_ptr, g_ptr, m_ptr, v_ptr, n, lr, beta1, beta2, eps, decay, step_size, correction2, seed,
                      BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    w = tl.load(w_ptr + offsets, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32) * beta1 + g * (1 - beta1)
    v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32) * beta2 + g * g * (1 - beta2)
    w = w * (1 - lr * decay) - step_size * m / (tl.sqrt(v / correction2) + eps)
    # independent bits for each of the three roundings, masked to 16: Triton before 3.4 draws 64-bit
    # values for int64 offsets
    r0, r1, _, _ = tl.randint4x(seed, offsets)
    tl.store(w_ptr + offsets, _round(w, (r0 & 0xFFFF).to(tl.int32)), mask=mask)
    tl.store(m_ptr + offsets, _round(m, ((r0 >> 16) & 0xFFFF).to(tl.int32)), mask=mask)
    tl.store(v_ptr + offsets, _round(v, (r1 & 0xFFFF).to(tl.int32)), mask=mask)


BLOCK = 1024


def update_on_cuda(weight, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step_size, correction2,
                   seed) -> None:
    n = weight.numel()
    adamw_bf16_kernel[(triton.cdiv(n, BLOCK),)](
        weight, grad, exp_avg, exp_avg_sq, n, lr, beta1, beta2, eps, weight_decay, step_size, correction2, seed,
        BLOCK=BLOCK)
