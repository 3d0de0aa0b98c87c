"""Every numerical tolerance of the equivalence tests, in one place. Never loosen one to get green.

fp32, bitwise: where the arithmetic is identical the tests assert torch.equal. Two data-parallel ranks
against torch DDP is such a case (a + b is commutative and every loss scale is a power of two): the
measured difference is exactly zero.

fp32, bounded: with four ranks Gloo's ring all-reduce adds the four contributions in an order that
depends on where an element falls in its bucket's chunks, and one process accumulates micro-batches as
((g1+g2)+g3)+g4 where two ranks compute (g1+g2)+(g3+g4). Each step then agrees to a few ulps, and Adam's
g/sqrt(v) magnifies that on the odd element whose gradient nearly cancels, so parameters are compared
per tensor in the 2-norm, ||ours - ref|| <= 1e-5 * ||ref|| (the 1e-5 of docs/design.md), and losses and
gradient norms elementwise to 1e-5 relative. Measured worst case on the tiny model over 6 steps:
1.5e-6 per-tensor relative, 1.2e-7 relative on the loss.

fp64: layouts that change the arithmetic itself (tensor parallelism sums partial matmuls and splits
softmax reductions) agree with torch DDP per step to ~3e-7 in fp32, but after a few Adam steps a
parameter whose gradient nearly cancels can differ by more than 1e-5: the absolute rounding error of a
sum is an ulp of its largest terms, which is a large relative error for a near-zero result, and Adam's
g/sqrt(v) turns relative error into update error (measured: embed.weight 1.4e-5 after 6 steps at tp=2).
Such layouts are therefore also trained in float64, where rounding is 2^29 times smaller, and there
every loss, gradient norm and parameter must match to 1e-10 (measured: 1e-14 to 8e-14 relative). The
fp32 run of the same layout compares losses and gradient norms at the FP32 bound.
Compiled blocks (train.compile) change the arithmetic too (inductor fuses and reorders float
operations) and are held to the eager run the same way, in float64 (measured: 4e-15 on the parameters).

bf16 / fp16: 16-bit parameters with fp32 masters against torch FSDP2 with the same mixed precision
(param_dtype 16-bit, reduce_dtype fp32 or bf16), both forwards in the parameters' dtype. A last-bit
difference in an fp32 master weight can flip the rounding of its 16-bit copy, which moves the loss by up
to about one 16-bit ulp of the activations; bounds below hold over 8 steps of the tiny model. They need
identical micro-batch shapes. Measured at dp 2 (DDP and ZeRO 1-3, fp32 gradients; ZeRO-1 with bf16
gradients): losses and parameters bitwise equal, gradient norms 8e-8 to 3e-7 relative (the norm's
summation order); ZeRO-2 with bf16 gradients, which sums each micro-batch's reduced shard in bf16 where
FSDP2 accumulates whole bf16 gradients first, 1.7e-2 on the parameters.

Logits against transformers (HF_LOGITS, absolute, on logits of magnitude ~1.5): both compute the same
functions with other kernels and orders (SDPA against transformers' attention, our rotary angles in
float64 against its float32 ones), measured max |difference| 4e-7 to 8e-7 in fp32 over the five test
families and every layout. transformers computes rotary cos/sin in float32 even for a float64 model, so
float64 does not get closer than 1.5e-7 to 3e-7 there; the same bound, about 2.5 times the worst
measured, serves both.

16-bit, layouts that change the arithmetic (tensor, pipeline or expert parallelism): any change of
shapes (micro-batch size, pipeline cuts) changes kernel blocking, so no fixed bound is meaningful: two
torch FSDP2 runs that differ only in micro-batch size (4 against 1) already drift apart after 8 steps by
6e-5 to 5e-4 (loss), 1.1e-3 to 1.3e-2 (grad norm) and 1.5e-2 to 3.8e-2 (parameters, per-tensor 2-norm).
Such a layout must stay within LOW_PRECISION_NOISE_FACTOR times that drift, measured in the same test,
against the reference at the layout's own micro-batch shapes. A tensor-parallel rank rounds its partial
matmul to 16 bits before the all-reduce where the dense matmul rounds once, so its reference is torch's
DTensor tensor parallelism under FSDP2, which rounds the same partial sums (measured: 0.2x to 0.7x of
that reference's drift; against FSDP2 alone it was 0.9x to 2.4x, and that drift is the CPU's: smaller on
one with AMX-BF16, where tp2-sp bf16 reached 2.0x and tp2 fp16 5.4x). A pipeline changes no arithmetic
and agrees with FSDP2 to 1e-6. Expert parallelism has no torch reference: an expert's weight gradient is
one 16-bit matmul over every rank's rows where FSDP2 rounds each rank's part and sums them in fp32
(measured, ep2 x dp2 over 8 steps: 0.2x to 0.8x in bf16, 0.9x to 1.4x in fp16, with capacity for every
slot and no load-balancing loss, so that the micro-batch size of the noise run changes only rounding).
Known limit: on the AMX-BF16 / AVX512-FP16 CPU the ep2 x dp2 fp16 case measured 2.1x on the loss, over
the factor. Exactness of all these layouts is shown in float64 above.

KV cache in 16 bits: a cached step multiplies one query row by the cached keys where the uncached
model reruns every row, so the 16-bit matmuls and attention run other shapes and blockings and a logit
may round differently. No fixed count of ulps holds: the same model fed the whole continuation in one
forward (causal, so equal to the stepwise logits in exact arithmetic) already drifts from its stepwise
logits by 1.0 to 4.6 units of eps times the largest |logit| of a prompt's steps (the five test
families, bf16 and fp16, per prompt). The cache must stay within LOW_PRECISION_NOISE_FACTOR times that
drift (at least one unit), measured in the same test (measured over the same cases: 0.8 to 3.4 units,
0.4x to 1.6x of the drift, the worst a left-padded fp16 Qwen2 row). Two logits closer than that are a
tie either pick may take, so greedy tokens are compared up to the first such step.

MoE dispatch, fp64 (the MoE benchmark): our all-to-all dispatcher and the benchmark's all-gather one route
with the same router and capacity and run every expert on the same rows in the same order; they differ
only in how a token's weighted expert outputs are summed and moved back (the reverse all-to-all and the
combine, against index_add and a reduce-scatter), so each output and gradient element may differ by a few
fp64 ulps of its largest terms: |difference| <= MOE_DISPATCH_FP64 * the largest |value| of that tensor
(measured: bitwise equal on the tiny layer).
"""

FP32 = {"rtol": 1e-5, "atol": 0.0}
HF_LOGITS = {"rtol": 0.0, "atol": 2e-6}
LOW_PRECISION_NOISE_FACTOR = 2.0
FP64 = {"rtol": 1e-10, "atol": 0.0}
LOW_PRECISION = {
    "bf16": {"rtol": 2e-2, "atol": 0.0},
    "fp16": {"rtol": 5e-3, "atol": 0.0},
}
MOE_DISPATCH_FP64 = 1e-12
